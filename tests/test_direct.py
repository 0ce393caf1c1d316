"""The append statement sent straight to psycopg (eventsource.direct), on PostgreSQL.

What the shortcut must keep from SQLAlchemy's own path: the caller's transaction (a
Connection that never began one still commits what was appended), the same typed
errors, invalidation of a lost connection, ``handle_error`` hooks, and statement
events and logging, which see the statement whenever anyone listens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource import direct

pytestmark = pytest.mark.postgres


def order(aggregate_id: str = "o-1", **fields: Any) -> es.Event:
    return es.Event(
        bounded_context="sales",
        aggregate_type="Order",
        aggregate_id=aggregate_id,
        event_type="OrderPlaced",
        payload={"total": 10},
        **fields,
    )


@pytest.fixture
def engine(pg_url: sa.URL) -> Iterator[sa.Engine]:
    eng = es.create_engine(pg_url)
    yield eng
    eng.dispose()


def is_append(statement: str) -> bool:
    return "INSERT INTO events" in statement.replace('"', "")


def appended(engine: sa.Engine, store: es.EventStore, aggregate_id: str = "o-1") -> int:
    with engine.connect() as conn:
        return store.stream_version(conn, "sales", "Order", aggregate_id)


def test_a_plain_engine_takes_the_direct_path(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        assert direct._direct(conn)


def test_a_connection_that_never_began_commits_what_it_appended(
    engine: sa.Engine, store: es.EventStore
) -> None:
    with engine.connect() as conn:
        assert not conn.in_transaction()
        store.append(conn, [order()])
        assert conn.in_transaction()  # begun, as exec_driver_sql's autobegin would
        conn.commit()
    assert appended(engine, store) == 1
    with engine.connect() as conn:
        store.append(conn, [order()])
        conn.rollback()
    assert appended(engine, store) == 1


def test_a_connection_closed_without_commit_keeps_nothing(
    engine: sa.Engine, store: es.EventStore
) -> None:
    with engine.connect() as conn:
        store.append(conn, [order()])
    assert appended(engine, store) == 0


def test_the_append_joins_work_the_caller_did_first(
    engine: sa.Engine, store: es.EventStore
) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE side (x int)")
        store.append(conn, [order()])
        conn.exec_driver_sql("INSERT INTO side VALUES (1)")
        conn.rollback()
    assert appended(engine, store) == 0
    with Session(engine) as session, session.begin():
        session.execute(sa.text("SELECT 1"))
        store.append(session, [order()])
    assert appended(engine, store) == 1


def test_a_duplicate_event_id_is_the_same_typed_error(
    engine: sa.Engine, store: es.EventStore
) -> None:
    first = order()
    with Session(engine) as session, session.begin():
        store.append(session, [first])
    with Session(engine) as session:
        with pytest.raises(es.DuplicateEventError) as caught:
            store.append(session, [order(event_id=first.event_id)])
        assert isinstance(caught.value.__cause__, sa.exc.IntegrityError)
        # SQLAlchemy knows the transaction failed, as through its own path.
        with pytest.raises(sa.exc.InternalError):
            session.execute(sa.text("SELECT 1"))
        session.rollback()
        assert session.execute(sa.text("SELECT 1")).scalar() == 1


def test_a_lost_connection_is_invalidated_and_reported_as_sqlalchemy_would(
    engine: sa.Engine, store: es.EventStore
) -> None:
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        conn.rollback()
        with engine.connect() as killer:
            killer.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
            killer.commit()
        with pytest.raises(sa.exc.OperationalError) as caught:
            store.append(conn, [order()])
        assert caught.value.connection_invalidated
        assert conn.invalidated
    # The pool replaced the dead connection: the next append works.
    with Session(engine) as session, session.begin():
        store.append(session, [order()])
    assert appended(engine, store) == 1


def test_handle_error_hooks_see_a_failed_append(engine: sa.Engine, store: es.EventStore) -> None:
    seen: list[BaseException] = []

    @sa.event.listens_for(engine, "handle_error")
    def record(context: sa.engine.ExceptionContext) -> None:
        seen.append(context.original_exception)

    first = order()
    with Session(engine) as session, session.begin():
        store.append(session, [first])
    with Session(engine) as session, pytest.raises(es.DuplicateEventError):
        store.append(session, [order(event_id=first.event_id)])
    assert len(seen) == 1
    assert "uq_events_event_id" in str(seen[0])


def test_statement_listeners_see_the_append(engine: sa.Engine, store: es.EventStore) -> None:
    statements: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def record(conn: sa.Connection, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    with engine.connect() as conn:
        assert not direct._direct(conn)
    with Session(engine) as session, session.begin():
        store.append(session, [order()])
    assert any(is_append(s) for s in statements)
    assert appended(engine, store) == 1


def test_a_listener_on_one_connection_sees_its_append(
    engine: sa.Engine, store: es.EventStore
) -> None:
    statements: list[str] = []
    with engine.connect() as conn:
        sa.event.listen(
            conn, "after_cursor_execute", lambda c, cur, statement, *a: statements.append(statement)
        )
        store.append(conn, [order()])
        conn.commit()
    assert any(is_append(s) for s in statements)


def test_sqlalchemy_logging_shows_the_append(
    pg_url: sa.URL, store: es.EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    logged = es.create_engine(pg_url, echo=True)
    try:
        with (
            caplog.at_level(logging.INFO, logger="sqlalchemy.engine"),
            Session(logged) as session,
            session.begin(),
        ):
            store.append(session, [order()])
        assert any(is_append(r.getMessage()) for r in caplog.records)
    finally:
        logged.dispose()


def test_an_async_engines_run_sync_takes_sqlalchemys_path(
    pg_url: sa.URL, engine: sa.Engine
) -> None:
    """Inside ``run_sync`` the driver connection is psycopg's async one: the direct path
    would get coroutines back, so the statement goes through SQLAlchemy, which awaits."""
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    store = es.EventStore()

    async def scenario() -> tuple[int, str]:
        async_engine = create_async_engine(pg_url)
        try:
            async with AsyncSession(async_engine) as session, session.begin():
                result = await session.run_sync(lambda s: store.append(s, [order()]))
            async with AsyncSession(async_engine) as session:
                with pytest.raises(es.ConfigurationError) as refused:
                    await session.run_sync(lambda s: store.bulk_append(s, [order("o-2")]))
            return result.to_version, str(refused.value)
        finally:
            await async_engine.dispose()

    version, refusal = asyncio.run(scenario())
    assert version == 1
    assert "synchronous engine" in refusal
    assert appended(engine, store) == 1
    assert appended(engine, store, "o-2") == 0
