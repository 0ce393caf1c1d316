"""Operations while workers run (DESIGN invariant 6): rebuild, reset, isolation levels,
first starts with two partition counts, checkpoints deleted behind the lock.

Every interleaving is staged step by step with real transactions: a gate in a handler
holds a batch open at a known point, and on PostgreSQL the test waits until the
operator's transaction is seen waiting on the projection's advisory lock
(``pg_stat_activity``) before letting the batch go, so the order is certain.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import eventsource as es
from eventsource.processor import lock_projection
from eventsource.rebuild import rebuild, reset
from tests.projection_support import (
    Background,
    append_spread,
    checkpoint,
    event,
    processor,
    reader,
    wait_readable,
    wait_until,
)

#: Insert-only, no key: an event applied twice shows up as a second row, not an error.
READ_MODEL_DDL = "CREATE TABLE seen (projection TEXT NOT NULL, global_position BIGINT NOT NULL)"


class Gated(es.Projection, abstract=True):
    """Inserts a row per event; holds its batch open at ``hold_at`` until released."""

    def __init__(self, hold_at: int | None = None) -> None:
        self.hold_at = hold_at
        self.inside = threading.Event()
        self.release = threading.Event()
        self.calls: Counter[int] = Counter()
        self._lock = threading.Lock()

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        with self._lock:
            self.calls[event.global_position] += 1
        session.execute(
            sa.text("INSERT INTO seen (projection, global_position) VALUES (:p, :g)"),
            {"p": self.name, "g": event.global_position},
        )
        if event.global_position == self.hold_at:
            self.inside.set()
            assert self.release.wait(30), "the test never released the gate"


class Counted(Gated):
    name = "counted"

    def reset(self, session: Session) -> None:
        session.execute(sa.text("DELETE FROM seen WHERE projection = :p"), {"p": self.name})


class NoReset(Gated):
    name = "no_reset"


@pytest.fixture
def ops_engine(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        conn.exec_driver_sql(READ_MODEL_DDL)
    return engine


def seen(engine: sa.Engine, projection: str) -> list[int]:
    with reader(engine).connect() as conn:
        rows = conn.execute(
            sa.text("SELECT global_position FROM seen WHERE projection = :p ORDER BY 1"),
            {"p": projection},
        )
        return [int(row[0]) for row in rows]


def waiting_on_advisory_lock(engine: sa.Engine) -> int:
    """How many sessions of this database wait for an advisory lock right now."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
                )
            ).scalar_one()
        )


def wait_until_blocked(engine: sa.Engine, operation: Background, sessions: int = 1) -> None:
    """Until ``operation`` is seen waiting for the batch in hand (PostgreSQL), or for a
    moment on SQLite, where BEGIN IMMEDIATE waits without a trace to look at."""
    if engine.dialect.name == "postgresql":
        wait_until(lambda: waiting_on_advisory_lock(engine) >= sessions, timeout=30)
    else:
        operation.thread.join(0.3)
    assert operation.alive, f"did not wait for the batch in hand: {operation.error!r}"


@pytest.fixture
def held() -> Iterator[list[Gated]]:
    """Projections whose gates are opened at teardown, so a failing test never hangs."""
    projections: list[Gated] = []
    yield projections
    for projection in projections:
        projection.release.set()


def hold_a_batch(
    engine: sa.Engine, store: es.EventStore, projection: Gated, held: list[Gated]
) -> Background:
    """Start a batch of ``projection`` and return once its handler waits at the gate,
    with the events before the gate written but not committed."""
    held.append(projection)
    batch = Background(lambda: processor(engine, store, batch_size=100).process_batch(projection))
    batch.start()
    assert projection.inside.wait(30), f"the batch never reached the gate: {batch.error!r}"
    return batch


def test_rebuild_waits_for_the_batch_in_hand_and_applies_each_event_once(
    ops_engine: sa.Engine, store: es.EventStore, held: list[Gated]
) -> None:
    engine = ops_engine
    append_spread(engine, store, 10)
    wait_readable(engine)
    worker = Counted(hold_at=5)
    batch = hold_a_batch(engine, store, worker, held)

    rebuilding = Background(lambda: rebuild(engine, Counted())).start()
    wait_until_blocked(engine, rebuilding)
    worker.release.set()
    batch.join(30)
    rebuilding.join(30)

    assert batch.error is None, batch.error
    assert rebuilding.error is None, rebuilding.error
    assert batch.result.handled == 10
    assert rebuilding.result.handled == 10
    assert seen(engine, "counted") == list(range(1, 11))  # once each: no 19 rows
    found = checkpoint(engine, "counted")
    assert found is not None
    assert found.global_position == 10
    # The worker carries on from the rebuilt checkpoint: nothing left to apply.
    assert processor(engine, store).run_until_caught_up(worker) == 0
    assert seen(engine, "counted") == list(range(1, 11))


def test_reset_waits_for_the_batch_in_hand_then_workers_replay_once(
    ops_engine: sa.Engine, store: es.EventStore, held: list[Gated]
) -> None:
    engine = ops_engine
    append_spread(engine, store, 10)
    wait_readable(engine)
    worker = Counted(hold_at=5)
    batch = hold_a_batch(engine, store, worker, held)

    resetting = Background(lambda: reset(engine, "counted", projection=Counted())).start()
    wait_until_blocked(engine, resetting)
    worker.release.set()
    batch.join(30)
    resetting.join(30)

    assert batch.error is None, batch.error
    assert resetting.error is None, resetting.error
    assert resetting.result == 1
    assert seen(engine, "counted") == []  # the committed batch's rows were cleared too
    assert checkpoint(engine, "counted") is None
    # The same running worker (same processor) replays from the start, exactly once.
    worker.hold_at = None
    assert processor(engine, store).run_until_caught_up(worker) == 10
    assert seen(engine, "counted") == list(range(1, 11))


@pytest.mark.postgres
def test_reset_and_rebuild_refuse_after_their_wait_and_change_nothing(
    pg_engine: sa.Engine, store: es.EventStore, held: list[Gated]
) -> None:
    engine = pg_engine
    with engine.begin() as conn:
        conn.exec_driver_sql(READ_MODEL_DDL)
    append_spread(engine, store, 10)
    wait_readable(engine)
    processor(engine, store, batch_size=3).process_batch(Counted())  # checkpoint at 3
    worker = Counted(hold_at=5)
    batch = hold_a_batch(engine, store, worker, held)

    with pytest.raises(es.ProjectionBusyError, match=r"still had a batch in hand after 0\.2 s"):
        reset(engine, "counted", projection=Counted(), wait=0.2)
    with pytest.raises(es.ProjectionBusyError, match="Nothing was changed"):
        rebuild(engine, Counted(), wait=0.2)
    worker.release.set()
    batch.join(30)
    assert batch.error is None
    assert seen(engine, "counted") == list(range(1, 11))
    found = checkpoint(engine, "counted")
    assert found is not None
    assert found.global_position == 10


@pytest.mark.postgres
def test_a_batch_whose_checkpoint_was_deleted_by_hand_fails_and_rolls_back(
    pg_engine: sa.Engine, store: es.EventStore, held: list[Gated]
) -> None:
    engine = pg_engine
    with engine.begin() as conn:
        conn.exec_driver_sql(READ_MODEL_DDL)
    append_spread(engine, store, 10)
    wait_readable(engine)
    worker = Counted(hold_at=5)
    processor(engine, store, batch_size=2).process_batch(Counted())  # rows 1-2, checkpoint 2
    batch = hold_a_batch(engine, store, worker, held)
    with engine.begin() as conn:  # not through reset(): no lock taken
        conn.exec_driver_sql("DELETE FROM projection_checkpoints")
    worker.release.set()
    batch.join(30)

    assert isinstance(batch.error, es.CheckpointLostError), batch.error
    assert "was deleted while a batch ran; the batch was rolled back" in str(batch.error)
    assert seen(engine, "counted") == [1, 2]  # nothing of the failed batch committed
    assert checkpoint(engine, "counted") is None


def test_reset_and_rebuild_refuse_to_keep_a_read_model_unless_asked(
    ops_engine: sa.Engine, store: es.EventStore
) -> None:
    engine = ops_engine
    append_spread(engine, store, 4)
    wait_readable(engine)
    processor(engine, store).run_until_caught_up(NoReset())
    processor(engine, store).run_until_caught_up(Counted())

    for attempt in (
        lambda: reset(engine, "counted"),
        lambda: reset(engine, "no_reset", projection=NoReset()),
        lambda: rebuild(engine, NoReset()),
    ):
        with pytest.raises(es.ConfigurationError, match="keep_read_model=True"):
            attempt()
    assert len(seen(engine, "no_reset")) == 4
    assert all(checkpoint(engine, name) is not None for name in ("counted", "no_reset"))

    final = rebuild(engine, NoReset(), keep_read_model=True)
    assert final.handled == 4
    assert len(seen(engine, "no_reset")) == 8  # what the caller asked for, knowingly
    assert reset(engine, "no_reset", keep_read_model=True) == 1


# -- isolation levels -----------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("how", ["REPEATABLE READ", "SERIALIZABLE", "database default"])
def test_two_workers_on_one_partition_apply_each_event_once_at_any_isolation(
    pg_url: sa.URL, store: es.EventStore, held: list[Gated], how: str
) -> None:
    """At REPEATABLE READ or SERIALIZABLE the lock statement would take the snapshot
    before the lock is granted: the second worker would read the checkpoint as it was
    and handle the first worker's events again, then fail to serialise."""
    if how == "database default":
        admin = es.create_engine(pg_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        with admin.connect() as conn:
            conn.exec_driver_sql(
                f"ALTER DATABASE {pg_url.database} SET default_transaction_isolation "
                "= 'serializable'"
            )
        admin.dispose()
        engine = es.create_engine(pg_url, pool_size=5)
        with engine.connect() as conn:
            level = conn.exec_driver_sql("SHOW transaction_isolation").scalar()
        assert level == "serializable"
    else:
        engine = es.create_engine(pg_url, pool_size=5, isolation_level=how)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(READ_MODEL_DDL)
        append_spread(engine, store, 10)
        wait_readable(engine)
        first = Counted(hold_at=5)
        batch = hold_a_batch(engine, store, first, held)
        second = Counted()
        other = Background(
            lambda: processor(engine, store, batch_size=100).process_batch(second)
        ).start()
        wait_until_blocked(engine, other)
        first.release.set()
        batch.join(30)
        other.join(30)

        assert batch.error is None, batch.error
        assert other.error is None, other.error
        assert other.result.handled == 0
        assert sum(second.calls.values()) == 0
        assert seen(engine, "counted") == list(range(1, 11))
        # Resets and rebuilds take their lock first too, at any isolation.
        assert rebuild(engine, Counted()).handled == 10
        assert seen(engine, "counted") == list(range(1, 11))
    finally:
        engine.dispose()


# -- first start with two partition counts ------------------------------------------------


@pytest.mark.postgres
def test_first_start_with_two_partition_counts_lets_exactly_one_in(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """Both processes reach the start-up check while it is held; the check and the first
    checkpoint are one locked step, so the second sees the first's count. They use
    different partition keys (2 of 4, 1 of 3), so no shared checkpoint row can refuse
    the second one in their place."""
    engine = pg_engine
    with engine.begin() as conn:
        conn.exec_driver_sql(READ_MODEL_DDL)
    append_spread(engine, store, 40, aggregates=40)
    wait_readable(engine)
    gate = Session(engine)
    gate.begin()
    lock_projection(gate, "counted", store=store)  # as an operator's reset would
    try:
        starts = [
            Background(
                functools.partial(
                    processor(
                        engine, store, partition_key=total - 2, total_partitions=total
                    ).run_until_caught_up,
                    Counted(),
                )
            ).start()
            for total in (4, 3)
        ]
        wait_until(lambda: waiting_on_advisory_lock(engine) >= 2, timeout=30)
    finally:
        gate.rollback()
        gate.close()
    for start in starts:
        start.join(30)
    errors = [start.error for start in starts if start.error is not None]
    assert len(errors) == 1, errors
    assert isinstance(errors[0], es.PartitionCountChangedError)
    winner = next(start for start in starts if start.error is None)
    rows = seen(engine, "counted")
    assert len(rows) == winner.result == len(set(rows))  # one partition's events, once


def test_racing_first_starts_with_two_partition_counts_never_both_run(
    ops_engine: sa.Engine, store: es.EventStore
) -> None:
    engine = ops_engine
    append_spread(engine, store, 30, aggregates=30)
    wait_readable(engine)
    for trial in range(5):

        class Racer(Gated):
            name = f"racer_{trial}"

        barrier = threading.Barrier(2)

        def start(total: int, barrier: threading.Barrier = barrier) -> int:
            # Different keys: no checkpoint row is shared, only the projection's lock
            # keeps the two from both starting.
            proc = processor(engine, store, partition_key=total - 2, total_partitions=total)
            barrier.wait(10)
            return proc.run_until_caught_up(Racer())

        starts = [Background(functools.partial(start, t)).start() for t in (4, 3)]
        for one in starts:
            one.join(30)
        errors = [one.error for one in starts if one.error is not None]
        assert len(errors) == 1, (trial, errors)
        assert isinstance(errors[0], es.PartitionCountChangedError)
        rows = seen(engine, f"racer_{trial}")
        assert len(rows) == len(set(rows))


# -- the CLI --------------------------------------------------------------------------


APP = """
import sqlalchemy as sa
import eventsource as es


class Plain(es.Projection):
    name = "plain"

    def handle(self, event, session):
        insert = sa.text("INSERT INTO seen VALUES ('plain', :g)")
        session.execute(insert, {"g": event.global_position})


PROJECTIONS = [Plain()]
"""


def test_cli_rebuild_of_a_projection_without_reset_says_so_and_needs_consent(
    ops_engine: sa.Engine, store: es.EventStore, tmp_path: Path
) -> None:
    import subprocess
    import sys

    engine = ops_engine
    (tmp_path / "plainapp.py").write_text(APP)
    append_spread(engine, store, 3)
    url = engine.url.render_as_string(hide_password=False)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "eventsource", "--database-url", url, *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    refused = cli("rebuild", "plain", "--app", "plainapp:PROJECTIONS", "--yes")
    assert refused.returncode == 2, refused.stderr
    assert "Plain has no reset() method" in refused.stderr
    assert "--keep-read-model" in refused.stderr
    assert seen(engine, "plain") == []

    kept = cli("rebuild", "plain", "--app", "plainapp:PROJECTIONS", "--keep-read-model", "--yes")
    assert kept.returncode == 0, kept.stderr
    assert seen(engine, "plain") == [1, 2, 3]

    refused_reset = cli("reset", "plain", "--app", "plainapp:PROJECTIONS", "--yes")
    assert refused_reset.returncode == 2
    assert "Plain has no reset() method" in refused_reset.stderr


# -- inside a caller's transaction ---------------------------------------------------------


def test_a_new_projection_in_a_callers_transaction_keeps_that_transaction(
    ops_engine: sa.Engine, store: es.EventStore
) -> None:
    """A sessionmaker bound to the caller's connection (default join mode): creating
    the first checkpoint must not roll the caller's transaction back."""
    engine = ops_engine
    with engine.connect() as conn:
        outer = conn.begin()
        sessions = sessionmaker(bind=conn)
        with sessions() as session:
            store.append(session, [event("in-tx-1")])
            store.append(session, [event("in-tx-2")])
        proc = es.Processor(sessions, store)
        proc.warn_on_own_transaction = False
        result = proc.process_batch(Counted())
        assert result.handled == 2
        assert outer.is_active
        rows = conn.execute(sa.text("SELECT count(*) FROM seen")).scalar_one()
        assert rows == 2
        outer.rollback()
    assert checkpoint(engine, "counted") is None  # nothing escaped the caller's rollback
    assert seen(engine, "counted") == []


class Echo(es.Projection):
    """A reactor: records each order event and appends a reaction to stream echo-1."""

    name = "echo"

    def __init__(self, store: es.EventStore) -> None:
        self.store = store

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        session.execute(
            sa.text("INSERT INTO seen (projection, global_position) VALUES ('echo', :g)"),
            {"g": event.global_position},
        )
        if event.aggregate_type == "Order":
            reaction = es.Event(
                bounded_context="sales",
                aggregate_type="Echo",
                aggregate_id="echo-1",
                event_type="Echoed",
                payload={"of": event.global_position},
            )
            self.store.append(session, [reaction])

    def reset(self, session: Session) -> None:
        session.execute(sa.text("DELETE FROM seen WHERE projection = 'echo'"))


@pytest.mark.postgres
def test_a_rebuild_whose_handlers_append_never_passes_an_older_open_writer(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """The rebuild's own rows carry its transaction id; reading them while an older
    write transaction is open would put the checkpoint past that writer's events."""
    engine = pg_engine
    with engine.begin() as conn:
        conn.exec_driver_sql(READ_MODEL_DDL)
    append_spread(engine, store, 3)
    wait_readable(engine)
    with engine.connect() as older:
        older.begin()
        store.append(older, [event("late")])  # older id, not committed yet
        rebuilt = rebuild(engine, Echo(store), batch_size=2)  # a second batch sees own rows
        assert rebuilt.handled == 3
        older.commit()
    while processor(engine, store).run_until_caught_up(Echo(store)):
        pass  # echoes appended by one catch-up are handled by the next
    with engine.connect() as conn:
        orders = conn.execute(
            sa.text("SELECT global_position FROM events WHERE aggregate_type = 'Order'")
        ).scalars()
        echoes = conn.execute(
            sa.text("SELECT count(*) FROM events WHERE aggregate_type = 'Echo'")
        ).scalar_one()
        total = conn.execute(sa.text("SELECT count(*) FROM events")).scalar_one()
        order_positions = sorted(orders)
    assert len(order_positions) == 4
    handled = seen(engine, "echo")
    assert len(handled) == len(set(handled)) == total  # every event once, "late" included
    assert set(order_positions) <= set(handled)
    assert echoes >= 4


def test_a_worker_with_a_batch_timeout_waits_out_a_rebuild(
    ops_engine: sa.Engine, store: es.EventStore
) -> None:
    """The statement timeout is set after the batch's lock: waiting for a rebuild is
    not a stuck batch, and does not use up the retry budget."""
    engine = ops_engine
    append_spread(engine, store, 5)
    wait_readable(engine)
    short = es.RetryPolicy(initial_backoff=0.01, max_backoff=0.05, budget=0.5)
    worker = es.Processor(
        engine, store, es.ProcessorConfig(poll_interval=0.01, batch_timeout=0.2, retry=short)
    )
    worker.run_until_caught_up(Counted())  # checkpoint exists
    append_spread(engine, store, 5, prefix="during")
    gate = Session(engine)
    gate.begin()
    if engine.dialect.name == "postgresql":
        lock_projection(gate, "counted", store=store)
    else:
        gate.execute(sa.text("DELETE FROM seen WHERE 1 = 0"))  # holds SQLite's write lock
    running = Background(lambda: worker.run_until_caught_up(Counted())).start()
    try:
        running.thread.join(1.5)  # three times the budget
        assert running.alive, running.error
    finally:
        gate.rollback()
        gate.close()
    running.join(60)
    assert running.error is None, running.error
    assert seen(engine, "counted") == list(range(1, 11))


@pytest.mark.postgres
def test_a_running_worker_stops_on_a_restored_checkpoint_the_counter_has_overtaken(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """A checkpoint whose id is above the transaction that wrote the row came from
    another cluster (a restore). Once the counter has passed it, nothing is "ahead"
    any more; the per-batch check must still stop a worker that never restarts."""
    engine = pg_engine
    with engine.begin() as conn:
        conn.exec_driver_sql(READ_MODEL_DDL)
    append_spread(engine, store, 3)
    wait_readable(engine)
    worker = processor(engine, store)
    worker.run_until_caught_up(Counted())
    with engine.begin() as conn:  # as pg_restore would leave it: an id from elsewhere
        conn.exec_driver_sql(
            "UPDATE projection_checkpoints SET transaction_id = "
            "pg_snapshot_xmax(pg_current_snapshot())::text::bigint + 50"
        )
    burner = engine.execution_options(isolation_level="AUTOCOMMIT")
    with burner.connect() as conn:
        for _ in range(80):  # the counter overtakes the restored id
            conn.exec_driver_sql("SELECT pg_current_xact_id()")
    append_spread(engine, store, 2, prefix="since")
    with pytest.raises(es.TransactionIdsAheadError, match="eventsource db rebase"):
        worker.process_batch(Counted())
    assert seen(engine, "counted") == [1, 2, 3]
