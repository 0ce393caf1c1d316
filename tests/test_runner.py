"""The runner: many projections in one process, each at its own pace, failing fast.

The three projections of the Go original's "multiple projections" example (user
counter, revenue tracker, activity log) run here on real read-model tables.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from tests.projection_support import (
    AppliedLog,
    Background,
    LogA,
    LogB,
    LogC,
    all_events,
    append,
    append_spread,
    applied,
    applied_triples,
    assert_matches_checkpoint,
    checkpoint,
    checkpoint_position,
    checkpoint_rows,
    create_applied_table,
    event,
    head,
    processor,
    reader,
    wait_until,
)

# -- the seed example's projections ------------------------------------------------

SEED_TABLES = [
    "CREATE TABLE user_counter (id INTEGER PRIMARY KEY, users BIGINT NOT NULL)",
    "INSERT INTO user_counter (id, users) VALUES (1, 0)",
    "CREATE TABLE revenue (id INTEGER PRIMARY KEY, total BIGINT NOT NULL, orders BIGINT NOT NULL)",
    "INSERT INTO revenue (id, total, orders) VALUES (1, 0, 0)",
    "CREATE TABLE activity_log (global_position BIGINT PRIMARY KEY, "
    "event_type TEXT NOT NULL, aggregate_id TEXT NOT NULL)",
]


class UserCounterProjection(es.Projection):
    """Counts user creation events."""

    name = "user_counter"
    aggregate_types = ("User",)

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        if event.event_type == "UserCreated":
            session.execute(sa.text("UPDATE user_counter SET users = users + 1 WHERE id = 1"))


class RevenueProjection(es.Projection):
    """Tracks total revenue from orders."""

    name = "revenue"
    aggregate_types = ("Order",)

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        if event.event_type == "OrderPlaced":
            session.execute(
                sa.text(
                    "UPDATE revenue SET total = total + :amount, orders = orders + 1 WHERE id = 1"
                ),
                {"amount": event.payload["amount"]},
            )


class ActivityLogProjection(es.Projection):
    """Logs all events regardless of type."""

    name = "activity_log"

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        session.execute(
            sa.text(
                "INSERT INTO activity_log (global_position, event_type, aggregate_id) "
                "VALUES (:p, :t, :a)"
            ),
            {"p": event.global_position, "t": event.event_type, "a": event.aggregate_id},
        )


class SlowLog(AppliedLog):
    name = "slow_log"


class LateLog(AppliedLog):
    name = "late_log"


def seed_events(engine: sa.Engine, store: es.EventStore, n: int, start: int = 0) -> None:
    batches: list[list[es.Event]] = []
    for i in range(start, start + n):
        batches.append(
            [event(f"user-{i}", "UserCreated", bounded_context="identity", aggregate_type="User")]
        )
        placed = event(f"order-{i}", "OrderPlaced", payload={"amount": i % 97 + 1})
        batches.append([placed, event(f"order-{i}", "OrderShipped")] if i % 3 == 0 else [placed])
    append(engine, store, batches)


def user_count(engine: sa.Engine) -> int:
    with reader(engine).connect() as conn:
        return int(conn.execute(sa.text("SELECT users FROM user_counter")).scalar_one())


def revenue(engine: sa.Engine) -> tuple[int, int]:
    with reader(engine).connect() as conn:
        total, orders = conn.execute(sa.text("SELECT total, orders FROM revenue")).one()
    return int(total), int(orders)


def expected_revenue(engine: sa.Engine) -> tuple[int, int]:
    events = es.EventStore().tables.events
    with reader(engine).connect() as conn:
        payloads = conn.execute(
            sa.select(events.c.payload).where(events.c.event_type == "OrderPlaced")
        ).scalars()
        amounts = [int(p["amount"]) for p in payloads]
    return sum(amounts), len(amounts)


def count_events(engine: sa.Engine, where: str = "1 = 1") -> int:
    with reader(engine).connect() as conn:
        return int(conn.execute(sa.text(f"SELECT COUNT(*) FROM events WHERE {where}")).scalar_one())


def activity_positions(engine: sa.Engine) -> list[int]:
    with reader(engine).connect() as conn:
        rows = conn.execute(
            sa.text("SELECT global_position FROM activity_log ORDER BY global_position")
        ).scalars()
        return [int(p) for p in rows]


def prepare_seed(engine: sa.Engine, store: es.EventStore) -> sa.Engine:
    with engine.begin() as conn:
        for statement in SEED_TABLES:
            conn.exec_driver_sql(statement)
    create_applied_table(engine)
    seed_events(engine, store, 240)
    return engine


@pytest.fixture
def seeded(engine: sa.Engine, store: es.EventStore) -> sa.Engine:
    return prepare_seed(engine, store)


@pytest.fixture
def pg_seeded(pg_engine: sa.Engine, store: es.EventStore) -> sa.Engine:
    return prepare_seed(pg_engine, store)


def seed_pairs(engine: sa.Engine, store: es.EventStore) -> list[es.ProjectionRunner]:
    """The example's three projections, each with its own batch size."""
    return [
        es.ProjectionRunner(UserCounterProjection(), processor(engine, store, batch_size=100)),
        es.ProjectionRunner(RevenueProjection(), processor(engine, store, batch_size=50)),
        es.ProjectionRunner(ActivityLogProjection(), processor(engine, store, batch_size=200)),
    ]


SEED_NAMES = ["user_counter", "revenue", "activity_log"]


def assert_seed_read_models_complete(engine: sa.Engine) -> None:
    assert user_count(engine) == count_events(engine, "event_type = 'UserCreated'")
    assert revenue(engine) == expected_revenue(engine)
    assert activity_positions(engine) == [p for p, _, _ in all_events(engine)]


@pytest.mark.postgres
def test_slow_projection_does_not_hold_back_fast_ones(
    pg_seeded: sa.Engine, store: es.EventStore
) -> None:
    """PostgreSQL only: on SQLite every batch holds the database's single write lock,
    so a handler that is slow inside its transaction does delay the others there."""
    engine = pg_seeded
    slow = SlowLog(delay=0.02)  # 630 events: about 13 s on its own
    # Small batches keep a slow projection's transactions short.
    pairs = [
        *seed_pairs(engine, store),
        es.ProjectionRunner(slow, processor(engine, store, batch_size=5)),
    ]
    runner = es.Runner(handle_signals=False)
    running = Background(lambda: runner.run(pairs), name="runner").start()
    try:
        top = head(engine)
        wait_until(lambda: all(checkpoint_position(engine, n) == top for n in SEED_NAMES))
        # The fast ones are done while the slow one is still far behind.
        assert checkpoint_position(engine, "slow_log") < top // 2
        assert_seed_read_models_complete(engine)
    finally:
        runner.stop()
        running.join(15)
    assert running.error is None
    assert_matches_checkpoint(engine, "slow_log")
    assert checkpoint_position(engine, "slow_log") < top


def test_projections_stop_restart_and_join_independently(
    seeded: sa.Engine, store: es.EventStore
) -> None:
    engine = seeded
    pairs = seed_pairs(engine, store)
    orders, revenue_processor = pairs[1].projection, pairs[1].processor
    runner = es.Runner(handle_signals=False)
    running = Background(lambda: runner.run(pairs), name="runner").start()
    try:
        top = head(engine)
        wait_until(lambda: all(checkpoint_position(engine, n) == top for n in SEED_NAMES))
        assert_seed_read_models_complete(engine)

        # Stop one: the others go on without it.
        revenue_processor.stop()
        wait_until(lambda: not revenue_processor.stopping)
        stopped_at = checkpoint(engine, "revenue")
        assert stopped_at is not None
        assert stopped_at.global_position == top
        seed_events(engine, store, 30, start=1000)
        new_top = head(engine)
        others = [n for n in SEED_NAMES if n != "revenue"]
        wait_until(lambda: all(checkpoint_position(engine, n) == new_top for n in others))
        assert checkpoint(engine, "revenue") == stopped_at
        assert user_count(engine) == count_events(engine, "event_type = 'UserCreated'")
        assert revenue(engine) != expected_revenue(engine)
        assert running.alive

        # Restart it: it resumes from its own checkpoint and catches up.
        handled = es.Runner(handle_signals=False).run_until_caught_up([(orders, revenue_processor)])
        missed = count_events(engine, f"aggregate_type = 'Order' AND global_position > {top}")
        assert handled == {("revenue", 0): missed}
        assert_seed_read_models_complete(engine)

        # A projection added later catches up from the very beginning.
        counts = es.Runner(handle_signals=False).run_until_caught_up(
            [(LateLog(), processor(engine, store, batch_size=70))]
        )
        assert counts == {("late_log", 0): count_events(engine)}
        assert applied_triples(engine, "late_log") == all_events(engine)
    finally:
        runner.stop()
        running.join(15)
    assert running.error is None

    everything = count_events(engine)
    for name, handled_events in [
        ("user_counter", count_events(engine, "aggregate_type = 'User'")),
        ("revenue", count_events(engine, "aggregate_type = 'Order'")),
        ("activity_log", everything),
        ("late_log", everything),
    ]:
        found = checkpoint(engine, name)
        assert found is not None
        assert (found.global_position, found.events_handled) == (new_top, handled_events)
    assert checkpoint_rows(engine) == {(name, 0) for name in [*SEED_NAMES, "late_log"]}


# -- fail fast ------------------------------------------------------------------------


def test_one_failing_projection_stops_the_runner_and_others_keep_their_progress(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    stored = append_spread(engine, store, 300)
    bad = stored[180]
    good, also_good = LogA(delay=0.001), LogC(delay=0.001)
    failing = LogB(delay=0.002, fail_when=lambda e: e.global_position == bad.global_position)
    pairs = [
        (good, processor(engine, store, batch_size=25)),
        (failing, processor(engine, store, batch_size=20)),
        (also_good, processor(engine, store, batch_size=40)),
    ]
    runner = es.Runner(handle_signals=False)
    running = Background(lambda: runner.run(pairs)).start()
    running.join(20)  # fails, and the others stop, within a bounded time

    error = running.error
    assert isinstance(error, es.ProjectionError)
    assert error.projection == "log_b"
    assert error.global_position == bad.global_position
    assert "log_b" in str(error)
    # Everyone's committed progress stays, and says exactly what its read model holds.
    for name in ("log_a", "log_b", "log_c"):
        assert_matches_checkpoint(engine, name)
    assert checkpoint_position(engine, "log_b") < bad.global_position

    # Fixed and restarted with the same processors: everything once, nothing twice.
    failing.failing = False
    before = {name: len(applied(engine, name)) for name in ("log_a", "log_b", "log_c")}
    counts = es.Runner(handle_signals=False).run_until_caught_up(pairs)
    assert counts == {(name, 0): len(stored) - done for name, done in before.items()}
    for name in ("log_a", "log_b", "log_c"):
        assert applied_triples(engine, name) == all_events(engine)
        assert_matches_checkpoint(engine, name)


def test_runner_names_the_projection_when_it_fails_outside_handle(
    engine: sa.Engine, store: es.EventStore
) -> None:
    """A database error outside handle() (here: a column the processor needs is gone)
    is still named; a missing library table is the typed SchemaMissingError."""
    create_applied_table(engine)
    append_spread(engine, store, 5)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE projection_checkpoints DROP COLUMN events_handled")
    with pytest.raises(es.ProjectionError, match="log_a") as info:
        es.Runner(handle_signals=False).run_until_caught_up([(LogA(), processor(engine, store))])
    assert info.value.projection == "log_a"
    assert info.value.global_position is None
    assert isinstance(info.value.__cause__, sa.exc.DBAPIError)

    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE projection_checkpoints")
    with pytest.raises(es.SchemaMissingError, match="eventsource db upgrade"):
        es.Runner(handle_signals=False).run_until_caught_up([(LogA(), processor(engine, store))])


# -- stopping ---------------------------------------------------------------------------


def test_stop_from_another_thread_stops_run(engine: sa.Engine, store: es.EventStore) -> None:
    create_applied_table(engine)
    append_spread(engine, store, 300)
    slow = LogA(delay=0.01)  # 3 s for everything: stopped well before the end
    pairs = [
        (slow, processor(engine, store, batch_size=10, poll_interval=0.2)),
        (LogB(), processor(engine, store, batch_size=50, poll_interval=0.2)),
    ]
    runner = es.Runner(handle_signals=False)
    running = Background(lambda: runner.run(pairs)).start()
    wait_until(lambda: checkpoint_position(engine, "log_a") > 0)
    runner.stop()
    running.join(10)  # about one poll interval plus one batch; generous bound
    assert running.error is None
    assert 0 < checkpoint_position(engine, "log_a") < head(engine)
    assert_matches_checkpoint(engine, "log_a")
    assert_matches_checkpoint(engine, "log_b")

    # The same runner and processors run again afterwards, from where they stopped.
    slow.delay = 0
    done = len(applied(engine, "log_a"))
    counts = runner.run_until_caught_up(pairs)
    assert counts[("log_a", 0)] == 300 - done
    assert applied_triples(engine, "log_a") == all_events(engine)


def test_stop_while_run_is_starting_is_not_lost(engine: sa.Engine, store: es.EventStore) -> None:
    create_applied_table(engine)
    append_spread(engine, store, 10)
    reading_pairs = threading.Event()

    def slow_pairs() -> Iterator[tuple[es.Projection, es.Processor]]:
        reading_pairs.set()
        time.sleep(0.3)  # run() is still reading its pairs when stop() arrives
        yield LogA(), processor(engine, store)
        yield LogB(), processor(engine, store)

    runner = es.Runner(handle_signals=False)
    running = Background(lambda: runner.run(slow_pairs())).start()
    assert reading_pairs.wait(10)
    runner.stop()
    running.join(10)
    assert running.error is None

    # The stop was used up by that run: the runner runs again normally.
    counts = runner.run_until_caught_up([(LogA(), processor(engine, store))])
    assert counts[("log_a", 0)] + len(applied(engine, "log_a")) >= 10
    assert applied_triples(engine, "log_a") == all_events(engine)


# -- configuration refused at run() -------------------------------------------------------


@pytest.fixture
def offline_engine(tmp_path: Path) -> sa.Engine:
    """An engine that is never connected to: run() must refuse before touching it."""
    return es.create_engine(f"sqlite:///{tmp_path / 'never.db'}", pool_size=5, max_overflow=0)


def test_runner_refuses_two_classes_sharing_a_name(offline_engine: sa.Engine) -> None:
    class Impostor(AppliedLog):
        name = "log_a"

    pairs = [(LogA(), processor(offline_engine)), (Impostor(), processor(offline_engine))]
    with pytest.raises(es.ConfigurationError, match="two different projection classes share"):
        es.Runner().run(pairs)


def test_runner_refuses_the_same_partition_twice(offline_engine: sa.Engine) -> None:
    projection = LogA()
    pairs = [(projection, processor(offline_engine)), (projection, processor(offline_engine))]
    with pytest.raises(es.ConfigurationError, match="given partition 0 twice"):
        es.Runner().run(pairs)
    pairs = [(LogA(), processor(offline_engine)), (LogA(), processor(offline_engine))]
    with pytest.raises(es.ConfigurationError, match="given partition 0 twice"):
        es.Runner().run_until_caught_up(pairs)


def test_runner_refuses_one_processor_in_two_pairs(offline_engine: sa.Engine) -> None:
    shared = processor(offline_engine)
    with pytest.raises(es.ConfigurationError, match="one Processor instance appears in two"):
        es.Runner().run([(LogA(), shared), (LogB(), shared)])


def test_runner_refuses_no_pairs_and_bad_items(offline_engine: sa.Engine) -> None:
    with pytest.raises(es.ConfigurationError, match="at least one"):
        es.Runner().run([])
    with pytest.raises(es.ConfigurationError, match="pairs"):
        es.Runner().run([LogA()])  # type: ignore[list-item]
    with pytest.raises(es.ConfigurationError, match="not a Projection instance"):
        es.Runner().run([(LogA, processor(offline_engine))])  # type: ignore[list-item]
    with pytest.raises(es.ConfigurationError, match="not a Processor"):
        es.Runner().run([(LogA(), offline_engine)])  # type: ignore[list-item]


def test_runner_refuses_different_partition_totals_for_one_name(
    offline_engine: sa.Engine,
) -> None:
    pairs = [
        (LogA(), processor(offline_engine, partition_key=0, total_partitions=2)),
        (LogA(), processor(offline_engine, partition_key=1, total_partitions=3)),
    ]
    with pytest.raises(es.ConfigurationError, match="different total_partitions"):
        es.Runner().run(pairs)


def test_more_processors_than_the_pool_holds_is_refused(
    db_url: sa.URL, store: es.EventStore
) -> None:
    small = es.create_engine(db_url, pool_size=2, max_overflow=0)
    try:
        pairs = [(LogA(), processor(small, store)), (LogB(), processor(small, store))]
        pairs.append((LogC(), processor(small, store)))
        with pytest.raises(es.ConfigurationError, match=r"pool_size=2") as info:
            es.Runner().run(pairs)
        assert "pool_size >= 3" in str(info.value)
    finally:
        small.dispose()
    roomy = es.create_engine(db_url, pool_size=2, max_overflow=1)
    try:
        create_applied_table(roomy)
        append_spread(roomy, store, 10)
        pairs = [(LogA(), processor(roomy, store)), (LogB(), processor(roomy, store))]
        pairs.append((LogC(), processor(roomy, store)))
        counts = es.Runner(handle_signals=False).run_until_caught_up(pairs)
        assert counts == {("log_a", 0): 10, ("log_b", 0): 10, ("log_c", 0): 10}
    finally:
        roomy.dispose()


# -- the worker-pool pattern --------------------------------------------------------------


def test_one_projection_instance_under_several_partition_keys(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    append_spread(engine, store, 200, aggregates=37)
    projection = LogA()
    pairs = [
        (projection, processor(engine, store, partition_key=k, total_partitions=4, batch_size=9))
        for k in range(4)
    ]
    counts = es.Runner(handle_signals=False).run_until_caught_up(pairs)
    assert sorted(counts) == [("log_a", k) for k in range(4)]
    assert sum(counts.values()) == 200
    assert all(n > 0 for n in counts.values())
    assert applied_triples(engine, "log_a") == all_events(engine)
    assert checkpoint_rows(engine) == {("log_a", k) for k in range(4)}
    assert projection.calls == 200
