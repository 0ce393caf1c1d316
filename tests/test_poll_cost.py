"""An idle poll reads about the same whether or not events wait behind an open
transaction (issue #9 point 7).

While any write transaction is open, events committed after it are not readable yet
(DESIGN invariant 2). A poll must not scan them: its readable bound has to be an
index condition. Time is not a behaviour, so this looks at what the poll's statements
touch, with ``EXPLAIN (ANALYZE, BUFFERS)`` on the processor's own statements and
parameters, and compares it with the same poll when nothing waits.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from tests.projection_support import append, append_spread, event, processor, wait_readable

pytestmark = pytest.mark.postgres


class Everything(es.Projection):
    name = "everything"

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        pass


class RareOnly(es.Projection):
    name = "rare_only"
    aggregate_types = ("Rare",)

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        pass


def buffers_touched(
    engine: sa.Engine, proc: es.Processor, projection: es.Projection, plan_cache_mode: str
) -> int:
    """Shared buffers the poll's batch (and horizon) statements touch: each is run as
    the processor runs it (same statement, same parameters), then again under EXPLAIN
    ANALYZE with the SQL and parameters the driver was given. ``plan_cache_mode``
    chooses the plan: psycopg prepares a statement after a few executions, and a
    prepared statement's generic plan cannot fold parameters away."""
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        sent.append((statement, parameters))

    total = 0
    with engine.connect() as conn, Session(conn) as session, session.begin():
        queries = proc._queries_for(session, projection)
        checkpoint = queries.lock_checkpoint(session, projection.name, proc.config)
        assert checkpoint is not None
        statements: list[Any] = [queries.batch]
        if queries.horizon is not None:
            statements.append(queries.horizon)
        sa.event.listen(conn, "before_cursor_execute", capture)
        try:
            for statement in statements:
                session.execute(statement, checkpoint.params(100)).all()
        finally:
            sa.event.remove(conn, "before_cursor_execute", capture)
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(f"SET LOCAL plan_cache_mode = {plan_cache_mode}")
        for sql, parameters in sent:
            cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", parameters)
            plan = cursor.fetchone()[0]
            top = (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]
            total += int(top.get("Shared Hit Blocks", 0))
            total += int(top.get("Shared Read Blocks", 0))
    assert len(sent) == len(statements)
    return total


@pytest.mark.parametrize("plan", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("bulk", [False, True], ids=["small transactions", "one bulk import"])
def test_an_idle_poll_does_not_scan_the_events_waiting_behind_an_open_transaction(
    pg_engine: sa.Engine, store: es.EventStore, bulk: bool, plan: str
) -> None:
    engine = pg_engine
    append_spread(engine, store, 50)
    wait_readable(engine)
    polls = {p.name: (p, processor(engine, store)) for p in (Everything(), RareOnly())}
    for projection, proc in polls.values():
        proc.run_until_caught_up(projection)
    idle = {name: buffers_touched(engine, proc, p, plan) for name, (p, proc) in polls.items()}

    with engine.connect() as blocker:
        store.append(blocker, [event("blocker")])  # an open writer: it holds them back
        waiting = [[event(f"behind-{i}")] for i in range(3000)]
        append(engine, store, waiting, per_transaction=3000 if bulk else 10)
        for name, (projection, proc) in polls.items():
            assert proc.process_batch(projection).handled == 0  # nothing readable yet
            behind = buffers_touched(engine, proc, projection, plan)
            # Reading 3,000 waiting rows would touch hundreds of buffers; a bounded
            # scan touches as many as an idle poll with nothing waiting, give or take
            # an index page.
            assert behind <= idle[name] + 4, (name, idle[name], behind)
        blocker.rollback()
