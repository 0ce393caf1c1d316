"""Resharding (eventsource.reshard) step by step on SQLite and PostgreSQL: the boundary,
the switch, every refusal leaving things as they were, and the CLI. Resharding under
load with worker processes is in test_claims."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

import eventsource as es
from eventsource import deadletters
from eventsource import processor as processor_module
from eventsource.partition import fnv1a_32
from eventsource.processor import lock_rebuild, unlock_rebuild
from eventsource.status import status
from tests.projection_support import (
    AppliedLog,
    Background,
    LogA,
    all_events,
    append_spread,
    applied,
    assert_versions_in_order,
    create_applied_table,
    processor,
    reader,
    wait_readable,
)


@pytest.fixture
def engine_with_log(engine: sa.Engine) -> sa.Engine:
    create_applied_table(engine)
    return engine


def run_partitions(engine: sa.Engine, total: int, projection: es.Projection | None = None) -> None:
    for key in range(total):
        processor(engine, partition_key=key, total_partitions=total).run_until_caught_up(
            projection or LogA()
        )


def checkpoints(engine: sa.Engine) -> list[tuple[int, int, int | None]]:
    with reader(engine).connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT partition_key, total_partitions, stop_global_position "
                "FROM projection_checkpoints WHERE projection_name = 'log_a' "
                "ORDER BY partition_key"
            )
        ).all()
    return [(int(k), int(t), None if s is None else int(s)) for k, t, s in rows]


def assert_exactly_once_in_order(engine: sa.Engine) -> None:
    rows = applied(engine, "log_a")  # the primary key refuses a second application
    assert [r.global_position for r in rows] == [p for p, _, _ in all_events(engine)]
    assert_versions_in_order(rows)


def test_reshard_with_the_projection_runs_the_laggards_and_switches_exactly_once(
    engine_with_log: sa.Engine, store: es.EventStore
) -> None:
    engine = engine_with_log
    append_spread(engine, store, 90, aggregates=30)
    wait_readable(engine)
    # Only partition 0 of 3 ran: partitions 1 and 2 are far behind the boundary.
    processor(engine, partition_key=0, total_partitions=3).run_until_caught_up(LogA())
    append_spread(engine, store, 30, aggregates=30, prefix="agg")
    wait_readable(engine)
    done = es.reshard(engine, LogA(), 5)
    assert (done.from_partitions, done.to_partitions) == (3, 5)
    assert done.boundary_position == 90  # partition 0's checkpoint, the furthest
    assert checkpoints(engine) == [(key, 5, None) for key in range(5)]
    # Up to the boundary the old partitions handled everything, nothing after it.
    assert [r.global_position for r in applied(engine, "log_a")] == list(range(1, 91))
    run_partitions(engine, 5)
    assert_exactly_once_in_order(engine)


def test_reshard_waits_for_the_workers_then_starts_the_new_partitions_at_the_boundary(
    engine_with_log: sa.Engine, store: es.EventStore
) -> None:
    engine = engine_with_log
    append_spread(engine, store, 40, aggregates=10)
    wait_readable(engine)
    processor(engine, partition_key=0, total_partitions=2).run_until_caught_up(LogA())
    processor(engine, partition_key=1, total_partitions=2).check_partitions(LogA())
    # A worker with a fixed key runs partition 1, far behind partition 0.
    worker = processor(engine, partition_key=1, total_partitions=2)
    running = Background(lambda: worker.run(LogA(), handle_signals=False)).start()
    done = es.reshard(engine, "log_a", 4, timeout=30)
    assert done.boundary_position == 40
    # After the switch its next batch finds the new count: it stops, as documented.
    running.join(timeout=30)
    assert isinstance(running.error, es.PartitionCountChangedError)
    append_spread(engine, store, 20, aggregates=10, prefix="later")
    wait_readable(engine)
    run_partitions(engine, 4)
    assert_exactly_once_in_order(engine)


def test_a_reshard_that_times_out_changes_nothing(
    engine_with_log: sa.Engine, store: es.EventStore
) -> None:
    engine = engine_with_log
    append_spread(engine, store, 20)
    wait_readable(engine)
    processor(engine, partition_key=0, total_partitions=2).run_until_caught_up(LogA())
    processor(engine, partition_key=1, total_partitions=2).check_partitions(LogA())
    with pytest.raises(
        es.ReshardError, match=r"partitions 1 of 2 did not move towards the boundary"
    ):
        es.reshard(engine, "log_a", 3, timeout=0.3)
    assert checkpoints(engine) == [(0, 2, None), (1, 2, None)]  # no boundary left behind
    run_partitions(engine, 2)  # partition 1 runs on past where it would have stopped
    assert_exactly_once_in_order(engine)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda e: es.reshard(e, "log_a", 0), es.ConfigurationError),
        (lambda e: es.reshard(e, "log_a", True), es.ConfigurationError),
        (lambda e: es.reshard(e, "", 3), es.ConfigurationError),
        (lambda e: es.reshard(e, "log_a", 3, timeout=0), es.ConfigurationError),
        (lambda e: es.reshard(e, "never_ran", 3), es.ReshardError),
        (lambda e: es.reshard(e, "log_a", 2), es.ReshardError),  # already 2
    ],
)
def test_bad_reshards_are_refused_before_anything_changes(
    engine_with_log: sa.Engine,
    store: es.EventStore,
    call: Callable[[sa.Engine], object],
    error: type[Exception],
) -> None:
    append_spread(engine_with_log, store, 10)
    wait_readable(engine_with_log)
    run_partitions(engine_with_log, 2)
    with pytest.raises(error):
        call(engine_with_log)
    assert checkpoints(engine_with_log) == [(0, 2, None), (1, 2, None)]


def test_workers_with_a_fixed_key_stop_after_a_reshard_and_restart_with_the_new_count(
    engine_with_log: sa.Engine, store: es.EventStore
) -> None:
    engine = engine_with_log
    append_spread(engine, store, 20)
    wait_readable(engine)
    run_partitions(engine, 2)
    es.reshard(engine, "log_a", 3)
    append_spread(engine, store, 10, prefix="later")
    wait_readable(engine)
    with pytest.raises(es.PartitionCountChangedError):
        processor(engine, partition_key=0, total_partitions=2).run_until_caught_up(LogA())
    run_partitions(engine, 3)
    assert_exactly_once_in_order(engine)


def test_an_interrupted_reshard_shows_its_boundary_and_can_be_cancelled_or_finished(
    engine_with_log: sa.Engine,
    store: es.EventStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = engine_with_log
    append_spread(engine, store, 20)
    wait_readable(engine)
    processor(engine, partition_key=0, total_partitions=2).run_until_caught_up(LogA())
    processor(engine, partition_key=1, total_partitions=2).check_partitions(LogA())
    # What a reshard killed while it waited leaves behind (its first step).
    from eventsource.reshard import _set_boundary

    with sa.orm.Session(engine) as session, session.begin():
        assert _set_boundary(session, store, "log_a", 3, None) is not None
    assert [row.reshard_boundary for row in status(reader(engine))] == [20, 20]
    # Meanwhile partition 1 runs up to the boundary and no further.
    append_spread(engine, store, 10, prefix="later")
    wait_readable(engine)
    processor(engine, partition_key=1, total_partitions=2).run_until_caught_up(LogA())
    assert checkpoints(engine) == [(0, 2, 20), (1, 2, 20)]
    assert len(applied(engine, "log_a")) == 20
    # A worker standing there says so, naming the way out.
    monkeypatch.setattr(processor_module, "BOUNDARY_WARNING_AFTER", 0.0)
    standing = processor(engine, partition_key=1, total_partitions=2)
    for _ in range(2):
        standing.process_batch(LogA())
    assert "on a reshard's boundary (position 20)" in caplog.text
    assert "eventsource reshard log_a --cancel" in caplog.text
    assert es.cancel_reshard(engine, "log_a")
    assert not es.cancel_reshard(engine, "log_a")
    run_partitions(engine, 2)
    assert_exactly_once_in_order(engine)
    # Set again, then finished by running the reshard again.
    with sa.orm.Session(engine) as session, session.begin():
        _set_boundary(session, store, "log_a", 3, None)
    assert es.reshard(engine, "log_a", 3).boundary_position == 30
    run_partitions(engine, 3)
    assert_exactly_once_in_order(engine)


def test_dead_letters_move_to_their_aggregates_new_partitions(
    engine_with_log: sa.Engine, store: es.EventStore
) -> None:
    engine = engine_with_log

    class Quarantining(AppliedLog):
        name = "log_a"
        on_error = es.OnError.QUARANTINE_AGGREGATE

    append_spread(engine, store, 20, aggregates=5)
    wait_readable(engine)
    failing = Quarantining(fail_when=lambda event: event.aggregate_id == "agg-3")
    run_partitions(engine, 2, failing)
    before = deadletters.list_dead_letters(reader(engine), projection="log_a")
    assert before
    es.reshard(engine, failing, 3)
    after = deadletters.list_dead_letters(reader(engine), projection="log_a")
    assert {entry.partition_key for entry in after} == {fnv1a_32("agg-3") % 3}
    assert {entry.total_partitions for entry in after} == {3}
    assert len(after) == len(before)


@pytest.mark.postgres
def test_a_reshard_is_refused_while_an_online_rebuild_runs(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(pg_engine)
    append_spread(pg_engine, store, 10)
    wait_readable(pg_engine)
    run_partitions(pg_engine, 2)
    with pg_engine.connect() as conn:
        with conn.begin():
            lock_rebuild(conn, "log_a")
        try:
            with pytest.raises(es.ReshardError, match="online rebuild"):
                es.reshard(pg_engine, "log_a", 3)
        finally:
            unlock_rebuild(conn, "log_a")
            conn.commit()
    assert checkpoints(pg_engine) == [(0, 2, None), (1, 2, None)]


def test_the_reshard_command(engine_with_log: sa.Engine, store: es.EventStore) -> None:
    engine = engine_with_log
    append_spread(engine, store, 30)
    wait_readable(engine)
    processor(engine, partition_key=0, total_partitions=2).run_until_caught_up(LogA())
    url = engine.url.render_as_string(hide_password=False)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "eventsource", "--database-url", url, "reshard", "log_a", *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).parent.parent,
        )

    refused = cli("--total-partitions", "4", "--timeout", "0.2", "--yes")
    assert refused.returncode == 1, refused.stderr
    assert "did not move towards the boundary" in refused.stderr
    assert checkpoints(engine) == [(0, 2, None), (1, 2, None)]
    done = cli("--total-partitions", "4", "--app", "tests.test_reshard:APP", "--yes")
    assert done.returncode == 0, done.stderr
    assert "resharded log_a: 2 -> 4 partitions at position 30" in done.stdout
    assert cli("--cancel").stdout == "log_a: no reshard in progress\n"
    assert cli().returncode == 2  # no count given
    run_partitions(engine, 4)
    assert_exactly_once_in_order(engine)


APP = [LogA()]


class EvenOdd:
    """A strategy with no SQL filter: the processor filters in Python."""

    def should_process(self, aggregate_id: str, partition_key: int, total_partitions: int) -> bool:
        return int(aggregate_id.rsplit("-", 1)[1]) % total_partitions == partition_key


def test_the_partitions_run_by_reshard_use_the_workers_strategy(
    engine_with_log: sa.Engine, store: es.EventStore
) -> None:
    engine = engine_with_log
    append_spread(engine, store, 60, aggregates=12)
    wait_readable(engine)
    config = es.ProcessorConfig(partition_strategy=EvenOdd(), poll_interval=0.01)

    def run(key: int, total: int) -> None:
        own = dataclasses.replace(config, partition_key=key, total_partitions=total)
        es.Processor(engine, store, own).run_until_caught_up(LogA())

    run(0, 2)  # partition 1 lags: the reshard runs it, with the same strategy
    processor(engine, partition_key=1, total_partitions=2).check_partitions(LogA())
    es.reshard(engine, LogA(), 3, config=config)
    append_spread(engine, store, 30, aggregates=12, prefix="agg")
    wait_readable(engine)
    for key in range(3):
        run(key, 3)
    assert_exactly_once_in_order(engine)


def test_a_partition_past_the_boundary_fails_the_reshard_at_once(
    engine_with_log: sa.Engine, store: es.EventStore
) -> None:
    """A worker that does not know boundaries (an older version) ran past it."""
    engine = engine_with_log
    append_spread(engine, store, 20)
    wait_readable(engine)
    processor(engine, partition_key=0, total_partitions=2).run_until_caught_up(LogA())
    processor(engine, partition_key=1, total_partitions=2).check_partitions(LogA())
    from eventsource.reshard import _set_boundary

    with sa.orm.Session(engine) as session, session.begin():
        _set_boundary(session, store, "log_a", 3, None)
    with engine.begin() as conn:  # as such a worker would leave it
        conn.exec_driver_sql(
            "UPDATE projection_checkpoints SET global_position = 25, transaction_id = "
            "(SELECT transaction_id + 1 FROM projection_checkpoints WHERE partition_key = 0) "
            "WHERE partition_key = 1"
        )
    with pytest.raises(es.ReshardError, match="partitions 1 moved past the boundary"):
        es.reshard(engine, LogA(), 3, timeout=30)
    assert checkpoints(engine) == [(0, 2, None), (1, 2, None)]  # the boundary is gone
