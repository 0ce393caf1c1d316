"""Claimed partitions in one process, step by step (eventsource.claims), on SQLite and
PostgreSQL: settings, fair shares, hand-overs, the fence, status. The same with real
worker processes under a writer is in test_claims."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import eventsource as es
from eventsource import claims
from eventsource.claims import fair_share
from eventsource.partition import fnv1a_32
from eventsource.status import ProjectionStatus, status
from tests.projection_support import (
    AppliedLog,
    Background,
    LogA,
    all_events,
    append,
    append_spread,
    applied,
    assert_versions_in_order,
    create_applied_table,
    event,
    processor,
    reader,
    wait_readable,
    wait_until,
)


@pytest.fixture
def applied_engine(engine: sa.Engine) -> sa.Engine:
    create_applied_table(engine)
    return engine


def claiming(engine: sa.Engine, worker: str, total: int = 4, **config: Any) -> es.Processor:
    config.setdefault("lease", 1.0)
    proc = processor(engine, total_partitions=total, claim=True, **config)
    proc.worker_id = worker
    return proc


def held(engine: sa.Engine, name: str = "log_a") -> dict[str | None, list[int]]:
    with reader(engine).connect() as conn:
        found = claims.partition_claims(conn, projection=name)
    owners: dict[str | None, list[int]] = {}
    for claim in found:
        owners.setdefault(None if claim.expired else claim.owner, []).append(claim.partition_key)
    return owners


def running(proc: es.Processor, projection: es.Projection) -> Background:
    return Background(lambda: proc.run(projection, handle_signals=False)).start()


# -- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"claim": "yes"},
        {"claim": True, "partition_key": 1, "total_partitions": 4},
        {"claim": True, "lease": 0},
        {"claim": True, "lease": -1.0},
        {"claim": True, "lease": True},
    ],
)
def test_bad_claim_settings_are_refused(settings: dict[str, object]) -> None:
    with pytest.raises(es.ConfigurationError):
        es.ProcessorConfig(**settings)  # type: ignore[arg-type]


def test_catching_up_does_not_claim(applied_engine: sa.Engine) -> None:
    with pytest.raises(es.ConfigurationError, match="does not claim"):
        claiming(applied_engine, "w1").run_until_caught_up(LogA())


def test_claiming_inside_a_callers_transaction_is_refused(applied_engine: sa.Engine) -> None:
    with applied_engine.connect() as conn:
        proc = es.Processor(
            sessionmaker(bind=conn), config=es.ProcessorConfig(total_partitions=2, claim=True)
        )
        with pytest.raises(es.ConfigurationError, match="needs a Processor on an Engine"):
            proc.run(LogA(), handle_signals=False)


def test_fair_shares_add_up_and_differ_by_one_at_most() -> None:
    for total in (1, 5, 12, 16):
        for workers in range(1, 8):
            live = [f"w{i}" for i in range(workers)]
            shares = [fair_share(total, live, worker) for worker in live]
            assert sum(shares) == total
            assert max(shares) - min(shares) <= 1
    assert fair_share(12, ["a", "b"], "c") == 0


# -- sharing --------------------------------------------------------------------------


def test_two_workers_share_hand_over_and_apply_each_event_once(
    applied_engine: sa.Engine, store: es.EventStore
) -> None:
    engine = applied_engine
    append_spread(engine, store, 60)
    first, second = claiming(engine, "w1"), claiming(engine, "w2")
    projection = LogA()
    one = running(first, projection)
    wait_until(lambda: held(engine) == {"w1": [0, 1, 2, 3]})
    two = running(second, projection)
    wait_until(
        lambda: sorted(map(len, held(engine).values())) == [2, 2] and None not in held(engine)
    )
    append_spread(engine, store, 60, prefix="more")
    first.stop()  # releases its partitions at once: the other takes them over
    one.join()
    assert one.error is None
    wait_until(lambda: held(engine) == {"w2": [0, 1, 2, 3]})
    append_spread(engine, store, 60, prefix="last")
    wait_readable(engine)
    wait_until(lambda: len(applied(engine, "log_a")) == 180)
    second.stop()
    two.join()
    assert two.error is None
    rows = applied(engine, "log_a")
    assert [r.global_position for r in rows] == [p for p, _, _ in all_events(engine)]
    assert_versions_in_order(rows)
    assert held(engine) == {None: [0, 1, 2, 3]}  # both left: every partition is free


def test_status_shows_each_partitions_owner_and_lease(
    applied_engine: sa.Engine, store: es.EventStore
) -> None:
    append_spread(applied_engine, store, 10)
    worker = claiming(applied_engine, "w1", total=2, lease=30.0)
    run = running(worker, LogA())
    wait_until(lambda: held(applied_engine) == {"w1": [0, 1]})
    rows = [row for row in es_status(applied_engine) if row.projection == "log_a"]
    assert [(row.partition_key, row.owner) for row in rows] == [(0, "w1"), (1, "w1")]
    assert all(row.lease_age_seconds is not None and row.lease_age_seconds < 30 for row in rows)
    assert not any(row.lease_expired for row in rows)
    worker.stop()
    run.join()
    rows = [row for row in es_status(applied_engine) if row.projection == "log_a"]
    assert [row.owner for row in rows] == [None, None]


def es_status(engine: sa.Engine) -> list[ProjectionStatus]:
    return status(reader(engine))


def test_a_claiming_worker_started_with_another_count_follows_the_checkpoints(
    applied_engine: sa.Engine, store: es.EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart never changes the count (only a reshard does), nor is it refused: a
    claiming worker shares the partitions the checkpoints have, and says so."""
    append_spread(applied_engine, store, 10)
    wait_readable(applied_engine)
    processor(applied_engine, total_partitions=4).check_partitions(LogA())
    worker = claiming(applied_engine, "w1", total=3)
    run = running(worker, LogA())
    wait_until(lambda: held(applied_engine) == {"w1": [0, 1, 2, 3]})
    wait_until(lambda: len(applied(applied_engine, "log_a")) == 10)
    worker.stop()
    run.join()
    assert run.error is None
    assert "has 4 partitions (resharded), not the 3 this worker was started with" in caplog.text
    # A worker with a fixed key and another count is still refused.
    with pytest.raises(es.PartitionCountChangedError):
        processor(applied_engine, total_partitions=3).run_until_caught_up(LogA())


def test_a_handler_failure_in_a_claimed_partition_stops_the_worker(
    applied_engine: sa.Engine, store: es.EventStore
) -> None:
    append_spread(applied_engine, store, 20)

    class Failing(AppliedLog):
        name = "log_a"

    projection = Failing(fail_when=lambda event: event.global_position == 7)
    worker = claiming(applied_engine, "w1", total=3)
    run = running(worker, projection)
    run.join(timeout=30)
    assert isinstance(run.error, es.ProjectionError)
    assert held(applied_engine) == {None: [0, 1, 2]}  # it left, releasing them


# -- the fence ---------------------------------------------------------------------------


def claim_row(engine: sa.Engine, key: int, owner: str, epoch: int, total: int = 1) -> None:
    table = es.EventStore().tables.partition_claims
    with engine.begin() as conn:
        conn.execute(table.delete().where(table.c.projection_name == "log_a"))
        conn.execute(
            table.insert().values(
                projection_name="log_a",
                partition_key=key,
                total_partitions=total,
                owner=owner,
                epoch=epoch,
                lease_expires_at=datetime.now(UTC) - timedelta(seconds=1),
            )
        )


def test_a_batch_under_a_lost_claim_commits_nothing(
    applied_engine: sa.Engine, store: es.EventStore
) -> None:
    engine = applied_engine
    append_spread(engine, store, 5)
    wait_readable(engine)
    claim_row(engine, 0, "old", 1)
    stale = processor(engine)
    stale.fence = ("old", 1)
    assert stale.process_batch(LogA()).handled == 5
    append_spread(engine, store, 5, prefix="later")
    wait_readable(engine)
    claim_row(engine, 0, "new", 2)  # taken over while "old" was paused
    with pytest.raises(es.PartitionLostError, match="passed to another worker"):
        stale.process_batch(LogA())
    assert len(applied(engine, "log_a")) == 5  # nothing of the stale batch committed
    fresh = processor(engine)
    fresh.fence = ("new", 2)
    assert fresh.process_batch(LogA()).handled == 5


@pytest.mark.postgres
def test_a_claim_waits_for_the_batch_in_hand_which_commits_before_it(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """The previous owner's batch in hand holds the partition: the takeover cannot commit
    before it ends, and every batch of the old owner after the takeover is fenced."""
    engine = pg_engine
    create_applied_table(engine)
    append_spread(engine, store, 3)
    wait_readable(engine)
    claim_row(engine, 0, "old", 1)
    entered, release = threading.Event(), threading.Event()

    class Gated(AppliedLog):
        name = "log_a"

        def handle(self, event: es.PersistedEvent, session: Session) -> None:
            entered.set()
            assert release.wait(30)
            super().handle(event, session)

    stale = processor(engine)
    stale.fence = ("old", 1)
    batch = Background(lambda: stale.process_batch(Gated())).start()
    assert entered.wait(30)
    taker = claiming(engine, "new", total=1)
    coordinator = claims._Coordinator(taker, LogA())
    assert coordinator._claim(0) is None  # the batch in hand holds the partition
    release.set()
    batch.join()
    assert batch.error is None
    assert batch.result.handled == 3
    assert coordinator._claim(0) == 2
    append_spread(engine, store, 2, prefix="later")
    wait_readable(engine)
    with pytest.raises(es.PartitionLostError):
        stale.process_batch(LogA())
    assert len(applied(engine, "log_a")) == 3


def test_a_store_before_es0006_runs_unclaimed_projections_and_refuses_claims_clearly(
    empty_engine: sa.Engine, store: es.EventStore
) -> None:
    """Upgrades need no particular order: new code on a store at es0005 projects as
    before; only claiming asks for the migration."""
    engine = empty_engine
    es.upgrade(engine, "es0005")
    create_applied_table(engine)
    append_spread(engine, store, 10)
    wait_readable(engine)
    assert processor(engine, total_partitions=2, partition_key=1).run_until_caught_up(LogA()) > 0
    assert [row.owner for row in es_status(engine)] == [None]
    with pytest.raises(es.SchemaMissingError, match="es0006"):
        claiming(engine, "w1").run(LogA(), handle_signals=False)


def test_a_pool_too_small_for_every_claimed_partition_is_refused(db_url: sa.URL) -> None:
    engine = es.create_engine(db_url, pool_size=3, max_overflow=0)
    try:
        with pytest.raises(es.ConfigurationError, match="pool_size >= 5"):
            claiming(engine, "w1", total=4).run(LogA(), handle_signals=False)
        with pytest.raises(es.ConfigurationError, match="pool_size >= 5"):
            es.Runner(handle_signals=False).run([(LogA(), claiming(engine, "w1", total=4))])
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_worker_joining_while_a_batch_is_paused_holds_up_no_other_partition(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """The paused batch's partition waits; the joining worker and every other partition
    go on (a join must not queue for the projection's exclusive lock behind it)."""
    engine = pg_engine
    create_applied_table(engine)
    total, paused_key = 4, fnv1a_32("paused") % 4
    others = [f"o{i}" for i in range(200) if fnv1a_32(f"o{i}") % total != paused_key][:30]
    gate, entered = threading.Event(), threading.Event()

    class Pausing(AppliedLog):
        name = "log_a"

        def handle(self, event: es.PersistedEvent, session: Session) -> None:
            if event.aggregate_id == "paused":
                entered.set()
                gate.wait(60)
            super().handle(event, session)

    first, second = claiming(engine, "w1", total), claiming(engine, "w2", total)
    one = running(first, Pausing())
    try:
        wait_until(lambda: held(engine) == {"w1": [0, 1, 2, 3]})
        append(engine, store, [[event("paused")]])
        assert entered.wait(30)
        two = running(second, Pausing())
        append(engine, store, [[event(agg)] for agg in others])
        wait_readable(engine)
        # Every event but the paused partition's is handled while its batch stays open.
        wait_until(lambda: len(applied(engine, "log_a")) >= len(others), timeout=30)
        wait_until(lambda: "w2" in held(engine), timeout=30)
    finally:
        gate.set()
        first.stop()
        second.stop()
    one.join(timeout=30)
    two.join(timeout=30)
    assert one.error is None
    assert two.error is None
