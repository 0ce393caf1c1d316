"""``eventsource.status.status()``: typed rows with exact lag, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource.status import ProjectionStatus, status
from tests.projection_support import (
    LogA,
    LogB,
    append_spread,
    applied,
    create_applied_table,
    event,
    processor,
    wait_until,
)


def settled(row: ProjectionStatus) -> ProjectionStatus:
    """``row`` without ``held_back``: on PostgreSQL any transaction open on the server
    (another test's, in another database) holds fresh events back for a moment."""
    return dataclasses.replace(row, held_back=False)


def test_rows_are_typed_and_lag_is_exact(engine: sa.Engine, store: es.EventStore) -> None:
    create_applied_table(engine)
    append_spread(engine, store, 12)

    before = [settled(row) for row in status(engine, projections=[LogA(), "log_b"])]
    assert before == [
        ProjectionStatus("log_a", 0, 1, 0, 12, 12, 0, None, None),
        ProjectionStatus("log_b", 0, 1, 0, 12, 12, 0, None, None),
    ]
    assert status(engine) == []  # never-run projections appear only when named

    started = datetime.now(UTC)
    assert processor(engine, store, batch_size=5).run_until_caught_up(LogA()) == 12
    append_spread(engine, store, 5, prefix="late")

    rows = status(engine, projections=[LogA(), LogB()])
    assert [type(row) for row in rows] == [ProjectionStatus, ProjectionStatus]
    ran, never = rows
    assert (ran.projection, ran.partition_key, ran.total_partitions) == ("log_a", 0, 1)
    assert (ran.checkpoint, ran.head, ran.lag, ran.events_handled) == (12, 17, 5, 12)
    assert ran.updated_at is not None
    assert ran.updated_at.tzinfo is not None
    assert started - timedelta(seconds=1) <= ran.updated_at <= datetime.now(UTC)
    assert ran.age_seconds is not None
    assert 0 <= ran.age_seconds < 60
    assert settled(never) == ProjectionStatus("log_b", 0, 1, 0, 17, 17, 0, None, None)
    assert len(applied(engine, "log_a")) == 12

    # age is measured against ``now``; to_dict is the JSON shape.
    later = ran.updated_at + timedelta(seconds=90)
    (fixed,) = status(engine, now=later)
    assert fixed.age_seconds == 90.0
    assert settled(fixed).to_dict() == {
        "projection": "log_a",
        "partition_key": 0,
        "total_partitions": 1,
        "checkpoint": 12,
        "head": 17,
        "lag": 5,
        "events_handled": 12,
        "updated_at": ran.updated_at.isoformat(),
        "age_seconds": 90.0,
        "lag_capped": False,
        "held_back": False,
        "owner": None,
        "lease_age_seconds": None,
        "lease_expired": False,
        "reshard_boundary": None,
    }

    assert processor(engine, store).run_until_caught_up(LogA()) == 5
    (done,) = status(engine)
    assert (done.checkpoint, done.head, done.lag, done.events_handled) == (17, 17, 0, 17)


def test_lag_is_exact_up_to_the_cap_then_a_lower_bound(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    append_spread(engine, store, 12)
    processor(engine, store).run_until_caught_up(LogA())
    append_spread(engine, store, 7, prefix="late")

    def lags(cap: int | None) -> list[tuple[str, int, bool]]:
        rows = status(engine, projections=["log_b"], lag_cap=cap)
        return [(row.projection, row.lag, row.lag_capped) for row in rows]

    assert lags(None) == [("log_a", 7, False), ("log_b", 19, False)]
    assert lags(100) == [("log_a", 7, False), ("log_b", 19, False)]
    assert lags(19) == [("log_a", 7, False), ("log_b", 19, False)]  # at the cap: exact
    assert lags(7) == [("log_a", 7, False), ("log_b", 7, True)]
    assert lags(5) == [("log_a", 5, True), ("log_b", 5, True)]
    (capped,) = status(engine, lag_cap=1)
    assert (capped.checkpoint, capped.head, capped.lag, capped.lag_capped) == (12, 19, 1, True)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(es.ConfigurationError, match="lag_cap"):
            status(engine, lag_cap=bad)  # type: ignore[arg-type]


def test_status_accepts_a_connection_or_a_session(engine: sa.Engine, store: es.EventStore) -> None:
    create_applied_table(engine)
    append_spread(engine, store, 4)
    processor(engine, store).run_until_caught_up(LogA())
    with engine.connect() as conn:
        from_connection = status(conn)
    with Session(engine) as session:
        from_session = status(session)
    assert [(r.projection, r.checkpoint, r.lag) for r in from_connection] == [("log_a", 4, 0)]
    assert [(r.projection, r.checkpoint, r.lag) for r in from_session] == [("log_a", 4, 0)]


def test_one_row_per_partition(engine: sa.Engine, store: es.EventStore) -> None:
    create_applied_table(engine)
    append_spread(engine, store, 20, aggregates=8)
    for key in (1, 0):
        processor(engine, store, partition_key=key, total_partitions=2).run_until_caught_up(
            LogA(partition=key)
        )
    rows = status(engine)
    assert [(r.projection, r.partition_key, r.total_partitions) for r in rows] == [
        ("log_a", 0, 2),
        ("log_a", 1, 2),
    ]
    assert [(r.checkpoint, r.head, r.lag) for r in rows] == [(20, 20, 0), (20, 20, 0)]
    assert sum(r.events_handled for r in rows) == 20
    assert all(r.events_handled > 0 for r in rows)


def test_scoped_projection_lag_counts_every_event_after_its_checkpoint(
    engine: sa.Engine, store: es.EventStore
) -> None:
    """Lag is store positions still ahead of the checkpoint, whatever the scope."""

    class InvoicesOnly(LogA):
        name = "invoices_only"
        aggregate_types = ("Invoice",)

    create_applied_table(engine)
    append_spread(engine, store, 6, aggregate_type="Invoice")
    processor(engine, store).run_until_caught_up(InvoicesOnly())
    append_spread(engine, store, 4, prefix="order", aggregate_type="Order")
    (row,) = status(engine)
    assert (row.checkpoint, row.head, row.lag, row.events_handled) == (6, 10, 4, 6)
    processor(engine, store).run_until_caught_up(InvoicesOnly())
    (row,) = status(engine)
    # Out-of-scope events still move the checkpoint: nothing is left to read.
    assert (row.checkpoint, row.head, row.lag, row.events_handled) == (10, 10, 0, 6)


@pytest.mark.postgres
def test_open_transaction_holds_events_back_and_lag_counts_them(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(pg_engine)
    append_spread(pg_engine, store, 30)
    projection = LogA()
    proc = processor(pg_engine, store)
    with Session(pg_engine) as slow:
        slow.begin()
        store.append(slow, [event("slow-writer")])  # position 31, not committed
        append_spread(pg_engine, store, 1, prefix="fast")  # position 32, committed
        # 32 committed, but a transaction older than it is still open: not readable yet.
        # (The horizon is cluster-wide: a transaction open in another database of the
        # server also holds 1..30 back for a while, hence the polling.)
        wait_until(lambda: proc.process_batch(projection).global_position == 30, timeout=60)
        assert proc.process_batch(projection).global_position == 30
        (row,) = status(pg_engine)
        assert (row.checkpoint, row.head, row.lag, row.events_handled) == (30, 32, 1, 30)
        slow.commit()
    (row,) = status(pg_engine)
    assert (row.checkpoint, row.head, row.lag) == (30, 32, 2)
    assert proc.run_until_caught_up(projection) == 2
    (row,) = status(pg_engine)
    assert (row.checkpoint, row.head, row.lag, row.events_handled) == (32, 32, 0, 32)
    assert [r.global_position for r in applied(pg_engine, "log_a")] == list(range(1, 33))


def test_unmigrated_database_raises_schema_missing(tmp_path: Path) -> None:
    engine = es.create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        with pytest.raises(es.SchemaMissingError, match="run `eventsource db upgrade`"):
            status(engine)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_unmigrated_postgresql_raises_schema_missing(empty_pg_url: sa.URL) -> None:
    engine = es.create_engine(empty_pg_url)
    try:
        with pytest.raises(es.SchemaMissingError, match="projection_checkpoints"):
            status(engine)
    finally:
        engine.dispose()
