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
    append,
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


def untimed(row: ProjectionStatus) -> ProjectionStatus:
    """``settled(row)`` without the times that depend on the clock (tested on their own)."""
    return dataclasses.replace(settled(row), last_handled_at=None, lag_seconds=None)


def test_rows_are_typed_and_lag_is_exact(engine: sa.Engine, store: es.EventStore) -> None:
    create_applied_table(engine)
    append_spread(engine, store, 12)

    before = [untimed(row) for row in status(engine, projections=[LogA(), "log_b"])]
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
    assert untimed(never) == ProjectionStatus("log_b", 0, 1, 0, 17, 17, 0, None, None)
    assert len(applied(engine, "log_a")) == 12

    # age is measured against ``now``; to_dict is the JSON shape.
    later = ran.updated_at + timedelta(seconds=90)
    (fixed,) = status(engine, now=later)
    assert fixed.age_seconds == 90.0
    assert fixed.last_handled_at is not None
    assert fixed.lag_seconds is not None
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
        "last_handled_at": fixed.last_handled_at.isoformat(),
        "lag_seconds": fixed.lag_seconds,
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


def aged(aggregate_id: str, created_at: datetime) -> es.Event:
    return dataclasses.replace(event(aggregate_id), created_at=created_at)


def stored_times(engine: sa.Engine, store: es.EventStore) -> dict[int, datetime]:
    """``created_at`` of every event by position, as the store gives it back."""
    with Session(engine) as session:
        return {e.global_position: e.created_at for e in store.read_all(session)}


def process_one(engine: sa.Engine, store: es.EventStore, projection: es.Projection) -> None:
    """Pass exactly one event (on PostgreSQL, once no open transaction holds it back)."""
    proc = processor(engine, store, batch_size=1)
    wait_until(lambda: proc.process_batch(projection).handled == 1, timeout=60)


def test_lag_in_seconds_is_the_wait_of_the_first_event_not_passed(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    now = datetime.now(UTC).replace(microsecond=0)
    ages = (timedelta(minutes=10), timedelta(minutes=5), timedelta(minutes=2))
    append(engine, store, [[aged(f"agg-{i}", now - age)] for i, age in enumerate(ages)])
    times = stored_times(engine, store)
    assert times == {1: now - ages[0], 2: now - ages[1], 3: now - ages[2]}

    # Never run: the store's first event has waited since it was appended.
    (never,) = status(engine, projections=["log_a"], now=now)
    assert (never.checkpoint, never.lag, never.last_handled_at) == (0, 3, None)
    assert never.lag_seconds == 600.0

    process_one(engine, store, LogA())
    (row,) = status(engine, now=now)
    assert (row.checkpoint, row.lag) == (1, 2)
    assert row.last_handled_at == times[1]
    assert row.lag_seconds == pytest.approx((now - times[2]).total_seconds(), abs=0.01)
    assert row.lag_seconds == pytest.approx(300.0, abs=1.0)
    data = settled(row).to_dict()
    assert data["last_handled_at"] == times[1].isoformat()
    assert data["lag_seconds"] == row.lag_seconds
    # Writers' clocks may run ahead of the reader's: never a negative wait.
    (early,) = status(engine, now=now - timedelta(hours=1))
    assert (early.lag, early.lag_seconds) == (2, 0.0)

    process_one(engine, store, LogA())
    (row,) = status(engine, now=now)
    assert (row.checkpoint, row.lag, row.last_handled_at) == (2, 1, times[2])
    assert row.lag_seconds == pytest.approx(120.0, abs=1.0)

    assert processor(engine, store).run_until_caught_up(LogA()) == 1
    (done,) = status(engine, now=now + timedelta(days=1))
    assert (done.checkpoint, done.lag, done.last_handled_at, done.lag_seconds) == (
        3,
        0,
        times[3],
        0.0,
    )


def test_an_empty_store_and_an_empty_checkpoint_have_no_times(engine: sa.Engine) -> None:
    (never,) = status(engine, projections=["log_a"])
    assert (never.lag, never.last_handled_at, never.lag_seconds) == (0, None, 0.0)
    assert settled(never).to_dict()["last_handled_at"] is None


@pytest.mark.postgres
def test_lag_in_seconds_follows_the_read_order_on_postgresql(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """The first event not passed is the first in (transaction id, position) order: a
    transaction that took its id first and committed last is read first."""
    create_applied_table(pg_engine)
    now = datetime.now(UTC).replace(microsecond=0)
    with Session(pg_engine) as older, older.begin():
        older.execute(sa.text("SELECT pg_current_xact_id()"))  # takes the lower id
        append(pg_engine, store, [[aged("newer", now - timedelta(minutes=5))]])  # position 1
        store.append(older, [aged("older", now - timedelta(minutes=10))])  # position 2
    times = stored_times(pg_engine, store)

    (never,) = status(pg_engine, projections=["log_a"], now=now)
    assert never.lag_seconds == 600.0  # position 2, read first; position 1 waited 300 s

    process_one(pg_engine, store, LogA())
    (row,) = status(pg_engine, now=now)
    assert (row.checkpoint, row.lag, row.last_handled_at) == (2, 1, times[2])
    assert row.lag_seconds == 300.0  # position 1 is still ahead in read order


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
