"""Hand-written statements sent straight to psycopg, on the caller's connection.

The append is one prepared statement whose parameters are already plain values, so
SQLAlchemy's execution layer (parameter processing, result metadata, the statement
events) is pure overhead on the hottest path of the library: about a tenth of an
append's client CPU. :func:`fetch_all` skips it when nothing would notice.

Nothing changes for the caller: the statement runs in the caller's transaction,
SQLAlchemy's Connection knows that transaction has begun (so its ``commit()`` commits
it), and a failure reaches the caller as the same ``sqlalchemy.exc.DBAPIError``
subclass, after the same invalidation of a lost connection and the same
``handle_error`` hooks, as through ``exec_driver_sql``. When anything listens to the
statement events (tracing, query logging, ``echo``), the statement goes through
SQLAlchemy as before, so they see it.

psycopg's pipeline mode, which could send the transaction's ``BEGIN`` in the same
round trip as the statement, was measured here and left out: on a local server its
Python bookkeeping cost more client CPU than the round trip it saved
(docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa


def fetch_all(
    conn: sa.Connection, statement: str, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """Run a driver-level (``%(name)s``) statement on ``conn`` and return its rows."""
    if not _direct(conn):
        return [tuple(row) for row in conn.exec_driver_sql(statement, params)]
    if not conn.in_transaction():
        conn.begin()  # what exec_driver_sql's autobegin does; the caller commits it
    cursor = None
    try:
        raw: Any = conn.connection.driver_connection
        cursor = raw.cursor()
        cursor.execute(statement, params)
        rows: list[tuple[Any, ...]] = cursor.fetchall()
        cursor.close()
        return rows
    except Exception as exc:
        # SQLAlchemy's own error path: wraps the error in its DBAPIError subclass,
        # invalidates a lost connection, runs handle_error hooks, closes the cursor.
        conn._handle_dbapi_exception(exc, statement, dict(params), cursor, None)
        raise  # pragma: no cover - the line above always raises


def _direct(conn: sa.Connection) -> bool:
    """Whether the statement may bypass SQLAlchemy: synchronous psycopg underneath, and
    nobody listening to statement execution or logging it.

    Usually the engine's listeners are asked, not the Connection's: a Connection's own
    collections (its listeners joined with the engine's) are built afresh for each
    Connection, which costs more than the check saves. They are asked when the
    Connection may have listeners of its own: SQLAlchemy 2.1 then marks it
    (``_has_events`` in its ``__dict__``, or on the class); 2.0 marks every Connection
    of an engine with any listener, so there they are always asked.
    """
    if conn.dialect.driver != "psycopg" or conn.dialect.is_async:
        return False  # an async engine's driver connection (run_sync) needs awaiting
    if getattr(conn, "_echo", True):
        return False
    own = "_has_events" in vars(conn) or getattr(type(conn), "_has_events", True)
    dispatch = conn.dispatch if own else conn.engine.dispatch
    return not (
        dispatch.before_execute
        or dispatch.after_execute
        or dispatch.before_cursor_execute
        or dispatch.after_cursor_execute
    )
