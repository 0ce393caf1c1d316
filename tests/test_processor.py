"""The processor: configuration, hash partitioning, exactly-once batches, visibility, logs."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import eventsource as es
from eventsource.partition import fnv1a_32
from tests.projection_support import (
    AppliedLog,
    Background,
    Boom,
    LogA,
    append,
    append_spread,
    applied,
    assert_matches_checkpoint,
    checkpoint,
    create_applied_table,
    event,
    head,
    processor,
    wait_readable,
    wait_until,
)

# -- ProcessorConfig ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_size": -5}, "batch_size must be >= 1"),
        ({"batch_size": 2.5}, "batch_size must be an int"),
        ({"batch_size": True}, "batch_size must be an int"),
        ({"batch_size": "100"}, "batch_size must be an int"),
        ({"partition_key": -1, "total_partitions": 4}, r"partition_key must be in 0\.\.3"),
        ({"partition_key": 4, "total_partitions": 4}, r"partition_key must be in 0\.\.3"),
        ({"partition_key": 1}, r"partition_key must be in 0\.\.0"),
        ({"partition_key": 1.0, "total_partitions": 2}, "partition_key must be an int"),
        ({"total_partitions": 0}, "total_partitions must be >= 1"),
        ({"total_partitions": -2}, "total_partitions must be >= 1"),
        ({"total_partitions": "4"}, "total_partitions must be an int"),
        ({"poll_interval": -0.1}, "poll_interval must be a number of seconds >= 0"),
        ({"poll_interval": "1"}, "poll_interval must be a number of seconds >= 0"),
        ({"poll_interval": None}, "poll_interval must be a number of seconds >= 0"),
        ({"partition_strategy": object()}, "partition_strategy must have should_process"),
    ],
)
def test_invalid_processor_config_is_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(es.ConfigurationError, match=message):
        es.ProcessorConfig(**fields)


def test_valid_processor_configs() -> None:
    default = es.ProcessorConfig()
    assert (default.batch_size, default.partition_key, default.total_partitions) == (100, 0, 1)
    assert isinstance(default.partition_strategy, es.HashPartitionStrategy)
    assert es.ProcessorConfig(poll_interval=0).poll_interval == 0
    last = es.ProcessorConfig(partition_key=3, total_partitions=4, batch_size=1)
    assert last.partition_key == 3


def test_processor_refuses_wrong_engine_and_config(tmp_path: Path) -> None:
    engine = es.create_engine(f"sqlite:///{tmp_path / 'never.db'}")
    with pytest.raises(es.ConfigurationError, match="Engine or a sessionmaker"):
        es.Processor("sqlite://")  # type: ignore[arg-type]
    with pytest.raises(es.ConfigurationError, match="config must be a ProcessorConfig"):
        es.Processor(engine, es.EventStore(), {"batch_size": 10})  # type: ignore[arg-type]


# -- HashPartitionStrategy --------------------------------------------------------------


def reference_fnv1a_32(text: str) -> int:
    """FNV-1a 32, written out here independently of the library."""
    value = 2166136261
    for byte in text.encode("utf-8"):
        value ^= byte
        value = (value * 16777619) % 2**32
    return value


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", 0x811C9DC5), ("a", 0xE40C292C), ("foobar", 0xBF9CF968)],
)
def test_fnv1a_32_published_vectors(text: str, expected: int) -> None:
    assert reference_fnv1a_32(text) == expected
    assert fnv1a_32(text) == expected


#: UUID strings and their partition out of 4 (FNV-1a 32 of the text, modulo 4).
UUID_PARTITIONS = [
    ("123e4567-e89b-12d3-a456-426614174000", 0xD02023FF, 3),
    ("550e8400-e29b-41d4-a716-446655440000", 0x889E3528, 0),
    ("00000000-0000-0000-0000-000000000000", 0xBE478ED1, 1),
    ("03333333-3333-3333-3333-333333333333", 0x177DCD92, 2),
]


@pytest.mark.parametrize(("aggregate_id", "hashed", "partition"), UUID_PARTITIONS)
def test_hash_partition_strategy_assigns_each_id_to_exactly_one_partition(
    aggregate_id: str, hashed: int, partition: int
) -> None:
    assert reference_fnv1a_32(aggregate_id) == hashed
    assert fnv1a_32(aggregate_id) == hashed
    strategy = es.HashPartitionStrategy()
    claims = [k for k in range(4) if strategy.should_process(aggregate_id, k, 4)]
    assert claims == [partition]
    assert strategy.should_process(aggregate_id, 0, 1)
    assert strategy.sql_filter(sa.column("partition_hash"), 0, 1) is None


# -- exactly once -------------------------------------------------------------------------


class Exactly(AppliedLog):
    name = "exactly_once"


def test_failed_batch_leaves_nothing_and_a_restart_applies_every_event_once(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    stored = append_spread(engine, store, 250, aggregates=13, event_type="Counted")
    wait_readable(engine)  # batches of exactly 100, not cut short by a foreign transaction
    bad = stored[156]  # the 57th event of the second batch of 100
    projection = Exactly(fail_when=lambda e: e.global_position == bad.global_position)
    proc = processor(engine, store, batch_size=100)

    with pytest.raises(es.ProjectionError) as info:
        proc.run_until_caught_up(projection)

    error = info.value
    assert error.projection == "exactly_once"
    assert error.partition_key == 0
    assert error.global_position == bad.global_position
    assert error.event_type == "Counted"
    assert error.aggregate_id == bad.aggregate_id
    message = str(error)
    for part in ("exactly_once", str(bad.global_position), "Counted", bad.aggregate_id):
        assert part in message
    assert isinstance(error.__cause__, Boom)
    assert projection.calls == 157

    # The first batch stays committed; nothing of the failed batch does.
    first_batch = [e.global_position for e in stored[:100]]
    assert [r.global_position for r in applied(engine, projection.name)] == first_batch
    found = checkpoint(engine, projection.name)
    assert found is not None
    assert (found.global_position, found.events_handled) == (first_batch[-1], 100)

    # Trying again without a fix fails the same way and changes nothing.
    with pytest.raises(es.ProjectionError):
        proc.run_until_caught_up(projection)
    assert len(applied(engine, projection.name)) == 100

    projection.failing = False  # the fix is deployed
    assert proc.run_until_caught_up(projection) == 150
    rows = applied(engine, projection.name)
    assert [r.global_position for r in rows] == [e.global_position for e in stored]
    found = checkpoint(engine, projection.name)
    assert found is not None
    assert (found.global_position, found.events_handled) == (head(engine), 250)


def test_run_raises_the_handler_error_after_rolling_back(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    stored = append_spread(engine, store, 30)
    wait_readable(engine)
    projection = Exactly(fail_when=lambda e: e.global_position == stored[14].global_position)
    running = Background(lambda: processor(engine, store, batch_size=10).run(projection))
    running.start().join(15)
    assert isinstance(running.error, es.ProjectionError)
    assert running.error.global_position == stored[14].global_position
    assert_matches_checkpoint(engine, projection.name)
    assert len(applied(engine, projection.name)) == 10


class SameName(AppliedLog):
    name = "contended"


def test_two_processors_on_one_partition_never_apply_an_event_twice(
    engine: sa.Engine, store: es.EventStore
) -> None:
    """Outside a Runner nothing stops two processes serving one partition: the
    checkpoint row lock makes them take turns (a double apply would hit the key)."""
    create_applied_table(engine)
    stored = append_spread(engine, store, 400)
    projection = SameName()
    workers = [
        Background(
            lambda: processor(engine, store, batch_size=7).run_until_caught_up(projection)
        ).start()
        for _ in range(3)
    ]
    for worker in workers:
        worker.join(60)
        assert worker.error is None, worker.error
    assert sum(worker.result for worker in workers) == 400
    rows = applied(engine, projection.name)
    assert [r.global_position for r in rows] == [e.global_position for e in stored]
    assert_matches_checkpoint(engine, projection.name)


# -- the processor inside a caller's transaction -----------------------------------------


def test_processor_in_the_callers_transaction_sees_its_uncommitted_events(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    with engine.connect() as conn:
        outer = conn.begin()
        sessions = sessionmaker(bind=conn, join_transaction_mode="create_savepoint")
        with sessions() as session, session.begin():
            stored = store.append(session, [event("in-tx") for _ in range(5)]).events
        projection = LogA()
        proc = es.Processor(sessions, store, es.ProcessorConfig(poll_interval=0.01))
        assert proc.engine is None  # bound to a connection, not an engine

        assert proc.run_until_caught_up(projection) == 5

        rows = conn.execute(
            sa.text("SELECT global_position FROM applied WHERE projection = 'log_a'")
        ).scalars()
        assert sorted(rows) == [e.global_position for e in stored]
        position = conn.execute(
            sa.text(
                "SELECT global_position FROM projection_checkpoints WHERE projection_name = 'log_a'"
            )
        ).scalar()
        assert position == stored[-1].global_position
        outer.rollback()
    # Nothing of it outside the transaction.
    assert head(engine) == 0
    assert applied(engine, "log_a") == []
    assert checkpoint(engine, "log_a") is None


# -- logging ----------------------------------------------------------------------------------


class CountingProcessor(es.Processor):
    """Counts its batches (polls) so a test can wait for some without sleeping blindly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches = 0

    def process_batch(self, projection: es.Projection) -> es.BatchResult:
        result = super().process_batch(projection)
        self.batches += 1
        return result


def test_processor_logs_start_batches_and_errors_but_not_idle_polls(
    engine: sa.Engine, store: es.EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="eventsource")
    create_applied_table(engine)
    stored = append_spread(engine, store, 25, event_type="Logged")
    wait_readable(engine)
    projection = LogA()
    proc = CountingProcessor(
        engine, store, es.ProcessorConfig(batch_size=10, poll_interval=0.005, wake_ups=False)
    )
    proc.run_until_caught_up(projection)

    starts = [r for r in caplog.records if "started" in r.getMessage()]
    assert len(starts) == 1
    start: Any = starts[0]
    assert (start.projection, start.partition, start.batch_size) == ("log_a", 0, 10)
    assert start.levelno == logging.INFO

    batches: list[Any] = [r for r in caplog.records if hasattr(r, "handled")]
    assert [(r.handled, r.skipped, r.checkpoint) for r in batches] == [
        (10, 0, stored[9].global_position),
        (10, 0, stored[19].global_position),
        (5, 0, stored[24].global_position),
    ]
    for record in batches:
        assert record.levelno == logging.INFO
        assert record.projection == "log_a"
        assert isinstance(record.duration_ms, float)
        assert record.duration_ms >= 0

    # Idle: many polls, no INFO beyond "started" and "stopped".
    caplog.clear()
    polls_before = proc.batches
    running = Background(lambda: proc.run(projection)).start()
    wait_until(lambda: proc.batches >= polls_before + 20)
    proc.stop()
    running.join(10)
    assert running.error is None
    info = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(info) == 2, [r.getMessage() for r in info]
    assert "started" in info[0].getMessage()
    assert "stopped" in info[1].getMessage()
    assert not any(hasattr(r, "handled") for r in caplog.records)

    # An error names the projection, position, aggregate and event type.
    caplog.clear()
    bad = append(engine, store, [[event("breaks", "Broken")]])[0]
    failing = LogA(fail_when=lambda e: e.event_type == "Broken")
    with pytest.raises(es.ProjectionError):
        proc.run_until_caught_up(failing)
    errors: list[Any] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    error = errors[0]
    assert (error.projection, error.global_position, error.aggregate_id, error.event_type) == (
        "log_a",
        bad.global_position,
        "breaks",
        "Broken",
    )


def test_batch_result_reports_what_the_batch_did(engine: sa.Engine, store: es.EventStore) -> None:
    create_applied_table(engine)
    stored = append_spread(engine, store, 12)
    wait_readable(engine)
    proc = processor(engine, store, batch_size=5)
    projection = LogA()
    results = [proc.process_batch(projection) for _ in range(4)]
    assert [(r.handled, r.read, r.full) for r in results] == [
        (5, 5, True),
        (5, 5, True),
        (2, 2, False),
        (0, 0, False),
    ]
    assert [r.global_position for r in results] == [
        stored[4].global_position,
        stored[9].global_position,
        stored[11].global_position,
        stored[11].global_position,
    ]
    assert all(r.skipped == 0 and r.duration >= 0 for r in results)


def test_session_in_handle_is_the_batch_transaction(
    engine: sa.Engine, store: es.EventStore
) -> None:
    """handle() gets the processor's session inside the batch transaction: it may not
    commit it, and what it writes is visible to the next handle() of the batch."""
    create_applied_table(engine)
    append_spread(engine, store, 3)
    seen: list[int] = []
    lock = threading.Lock()

    class Reads(AppliedLog):
        name = "reads_own_writes"

        def handle(self, event: es.PersistedEvent, session: Session) -> None:
            super().handle(event, session)
            assert session.in_transaction()
            count = session.execute(
                sa.text("SELECT COUNT(*) FROM applied WHERE projection = :p"), {"p": self.name}
            ).scalar()
            with lock:
                seen.append(int(count or 0))

    processor(engine, store, batch_size=10).run_until_caught_up(Reads())
    assert seen == [1, 2, 3]


@pytest.mark.postgres
def test_an_open_batch_that_has_not_written_holds_no_other_projection_back(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """The checkpoint lock gives the batch no transaction id (an advisory lock, not a row
    lock), so a slow handler that has not written yet (e.g. an outbox publisher waiting
    on a broker) does not hold back the reading horizon of other projections."""

    class Publisher(es.Projection):
        name = "publisher"

        def __init__(self) -> None:
            self.inside = threading.Event()
            self.release = threading.Event()

        def handle(self, event: es.PersistedEvent, session: Session) -> None:
            self.inside.set()
            assert self.release.wait(120)

    class Fast(es.Projection):
        name = "fast"

        def __init__(self) -> None:
            self.positions: list[int] = []

        def handle(self, event: es.PersistedEvent, session: Session) -> None:
            self.positions.append(event.global_position)

    first = append_spread(pg_engine, store, 1)
    publisher = Publisher()
    publishing = es.Processor(pg_engine, store, es.ProcessorConfig(batch_size=1))
    publisher.release.set()
    # Its checkpoint row exists from now on (creating it is a write). Wait first: a write
    # transaction elsewhere on the server may hold the event back for a while.
    wait_readable(pg_engine)
    assert publishing.process_batch(publisher).handled == 1
    publisher.release.clear()
    publisher.inside.clear()  # set by the first batch
    second = append_spread(pg_engine, store, 1, prefix="second")
    wait_readable(pg_engine)  # so the next batch reads it and stays open in handle()

    def publish_second() -> None:
        # A batch may still use the horizon cached before "second" (at most a poll
        # interval old) and read nothing: then the next one reads it.
        while publishing.process_batch(publisher).handled == 0:
            time.sleep(0.02)

    slow = Background(publish_second).start()
    try:
        assert publisher.inside.wait(30)
        third = append_spread(pg_engine, store, 1, prefix="third")  # committed meanwhile
        fast = Fast()
        catching_up = Background(lambda: es.Processor(pg_engine, store).run_until_caught_up(fast))
        # Generous: a foreign transaction may delay it a little, the open batch must not.
        returned = catching_up.start().finished_within(30)
        still_open = slow.alive
    finally:
        publisher.release.set()
        slow.join(30)
    assert returned, "catch-up waited for a batch that has not written"
    assert still_open, "the slow batch ended before the fast catch-up: nothing was proven"
    assert catching_up.error is None, catching_up.error
    assert fast.positions == [e.global_position for e in first + second + third]
    assert slow.error is None
