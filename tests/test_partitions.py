"""Partitioned projections: each aggregate in one partition, every event exactly once."""

from __future__ import annotations

import random
import uuid
from collections import defaultdict

import pytest
import sqlalchemy as sa

import eventsource as es
from eventsource.partition import fnv1a_32
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
    assert_versions_in_order,
    checkpoint,
    checkpoint_position,
    checkpoint_rows,
    create_applied_table,
    event,
    head,
    processor,
    wait_readable,
    wait_until,
)

TOTAL = 4


def aggregate_ids(n: int) -> list[str]:
    return [str(uuid.UUID(int=i * 7919 + 13)) for i in range(n)] + [f"order-{i}" for i in range(n)]


def append_mixed(engine: sa.Engine, store: es.EventStore, count: int, ids: list[str]) -> None:
    rng = random.Random(count)
    append(engine, store, ([event(rng.choice(ids))] for _ in range(count)))


def partitioned_pairs(
    engine: sa.Engine, store: es.EventStore, cls: type[AppliedLog] = LogA, batch_size: int = 15
) -> list[tuple[es.Projection, es.Processor]]:
    return [
        (
            cls(partition=k),
            processor(
                engine, store, partition_key=k, total_partitions=TOTAL, batch_size=batch_size
            ),
        )
        for k in range(TOTAL)
    ]


def assert_partitioned_exactly_once(engine: sa.Engine, name: str) -> None:
    rows = applied(engine, name)
    assert [(r.global_position, r.aggregate_id, r.aggregate_version) for r in rows] == all_events(
        engine
    )
    partitions: dict[str, set[int | None]] = defaultdict(set)
    for row in rows:
        partitions[row.aggregate_id].add(row.partition_key)
    for aggregate_id, keys in partitions.items():
        assert keys == {fnv1a_32(aggregate_id) % TOTAL}, aggregate_id
    assert_versions_in_order(rows)
    top = head(engine)
    for k in range(TOTAL):
        found = checkpoint(engine, name, k)
        assert found is not None
        assert found.total_partitions == TOTAL
        assert found.events_handled == sum(1 for r in rows if r.partition_key == k)
        # Each partition's checkpoint passes the other partitions' events too.
        assert found.global_position == top


#: Pinned in test_processor too: FNV-1a 32 of the UUID text, modulo 4.
PINNED = {
    "123e4567-e89b-12d3-a456-426614174000": 3,
    "550e8400-e29b-41d4-a716-446655440000": 0,
    "00000000-0000-0000-0000-000000000000": 1,
    "03333333-3333-3333-3333-333333333333": 2,
}


def test_four_partitions_in_one_runner_apply_every_event_once(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    ids = aggregate_ids(20) + list(PINNED)
    append_mixed(engine, store, 300, ids)
    pairs = partitioned_pairs(engine, store)
    runner = es.Runner(handle_signals=False)
    running = Background(lambda: runner.run(pairs)).start()
    try:
        # More events while the partitions run.
        for _ in range(4):
            append_mixed(engine, store, 40, ids)
        top = head(engine)
        wait_until(lambda: all(checkpoint_position(engine, "log_a", k) == top for k in range(4)))
    finally:
        runner.stop()
        running.join(15)
    assert running.error is None
    assert_partitioned_exactly_once(engine, "log_a")
    rows = applied(engine, "log_a")
    assert {r.aggregate_id for r in rows} == set(ids)
    assert {r.partition_key for r in rows} == set(range(TOTAL))
    # The SQL filter on the hash stored at append agrees with the published numbers.
    served = {r.aggregate_id: r.partition_key for r in rows if r.aggregate_id in PINNED}
    assert served == PINNED
    assert checkpoint_rows(engine) == {("log_a", k) for k in range(TOTAL)}


def test_partitioned_and_unpartitioned_projections_in_one_runner(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    append_mixed(engine, store, 250, aggregate_ids(15))

    class OrdersOnly(AppliedLog):
        name = "orders_only"
        aggregate_types = ("Order",)

    users = [
        [event(f"user-{i}", bounded_context="identity", aggregate_type="User")] for i in range(20)
    ]
    append(engine, store, users)
    pairs = partitioned_pairs(engine, store, LogA)
    pairs += [(LogB(), processor(engine, store, batch_size=40))]
    pairs += [
        (
            OrdersOnly(partition=k),
            processor(engine, store, partition_key=k, total_partitions=TOTAL, batch_size=7),
        )
        for k in range(TOTAL)
    ]
    counts = es.Runner(handle_signals=False).run_until_caught_up(pairs)

    everything = all_events(engine)
    assert sum(n for (name, _), n in counts.items() if name == "log_a") == len(everything)
    assert counts[("log_b", 0)] == len(everything)
    assert_partitioned_exactly_once(engine, "log_a")
    assert applied_triples(engine, "log_b") == everything
    orders = applied(engine, "orders_only")
    assert {r.aggregate_type for r in orders} == {"Order"}
    assert len(orders) == len(everything) - len(users)
    for row in orders:
        assert row.partition_key == fnv1a_32(row.aggregate_id) % TOTAL
    assert checkpoint_rows(engine) == (
        {("log_a", k) for k in range(TOTAL)}
        | {("log_b", 0)}
        | {("orders_only", k) for k in range(TOTAL)}
    )


def test_changing_the_partition_count_is_refused(engine: sa.Engine, store: es.EventStore) -> None:
    create_applied_table(engine)
    append_spread(engine, store, 60)
    es.Runner(handle_signals=False).run_until_caught_up(partitioned_pairs(engine, store))
    before = applied(engine, "log_a")
    checkpoints = [checkpoint(engine, "log_a", k) for k in range(TOTAL)]
    append_spread(engine, store, 10, prefix="later")

    two = processor(engine, store, partition_key=0, total_partitions=2)
    with pytest.raises(es.PartitionCountChangedError) as info:
        two.run_until_caught_up(LogA())
    message = str(info.value)
    assert "total_partitions=[4]" in message
    assert "total_partitions=2" in message
    assert "Start it with the old count" in message
    assert "eventsource reshard log_a --total-partitions 2" in message
    assert "eventsource rebuild log_a" in message
    assert "eventsource reset log_a" in message
    assert isinstance(info.value, es.ConfigurationError)

    # Through a runner, and from run(): refused the same way, nothing handled.
    pairs = [
        (LogA(), processor(engine, store, partition_key=k, total_partitions=2)) for k in range(2)
    ]
    with pytest.raises(es.PartitionCountChangedError, match="Start it with the old count"):
        es.Runner(handle_signals=False).run(pairs)
    one = processor(engine, store)
    with pytest.raises(es.PartitionCountChangedError, match=r"total_partitions=\[4\]"):
        one.run(LogA())
    # Even a lone batch (no start-up check) refuses to touch a checkpoint of another count.
    with pytest.raises(es.PartitionCountChangedError, match="total_partitions=4"):
        two.process_batch(LogA())
    assert applied(engine, "log_a") == before
    assert [checkpoint(engine, "log_a", k) for k in range(TOTAL)] == checkpoints
    assert checkpoint(engine, "log_a", TOTAL) is None

    # The old count still works.
    es.Runner(handle_signals=False).run_until_caught_up(partitioned_pairs(engine, store))
    assert_partitioned_exactly_once(engine, "log_a")

    # And the other way round: unpartitioned checkpoints refuse a partitioned start.
    processor(engine, store).run_until_caught_up(LogC())
    with pytest.raises(es.PartitionCountChangedError, match=r"total_partitions=\[1\]"):
        processor(engine, store, partition_key=1, total_partitions=3).run_until_caught_up(LogC())
    assert checkpoint(engine, "log_c", 1) is None


class ByNumber:
    """A custom strategy with no SQL form: the processor filters in Python."""

    def should_process(self, aggregate_id: str, partition_key: int, total_partitions: int) -> bool:
        return int(aggregate_id.rsplit("-", 1)[1]) % total_partitions == partition_key


def test_custom_strategy_without_sql_filter_filters_in_python(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    stored = append_spread(engine, store, 90, aggregates=9)
    procs = [
        processor(
            engine,
            store,
            partition_key=k,
            total_partitions=3,
            batch_size=20,
            partition_strategy=ByNumber(),
        )
        for k in range(3)
    ]
    projections = [LogA(partition=k) for k in range(3)]

    wait_readable(engine)
    results = []
    while True:
        result = procs[0].process_batch(projections[0])
        results.append(result)
        if result.read == 0:
            break
    mine = [e for e in stored if int(e.aggregate_id.split("-")[1]) % 3 == 0]
    assert sum(r.handled for r in results) == len(mine) == 30
    assert sum(r.skipped for r in results) == len(stored) - len(mine) == 60
    assert all(r.handled + r.skipped == r.read for r in results)
    # Skipped events still move the checkpoint: it reaches the head.
    found = checkpoint(engine, "log_a", 0)
    assert found is not None
    assert (found.global_position, found.events_handled) == (stored[-1].global_position, 30)

    for k in (1, 2):
        assert procs[k].run_until_caught_up(projections[k]) == 30
        assert checkpoint_position(engine, "log_a", k) == stored[-1].global_position
    rows = applied(engine, "log_a")
    assert [r.global_position for r in rows] == [e.global_position for e in stored]
    for row in rows:
        assert row.partition_key == int(row.aggregate_id.split("-")[1]) % 3

    # With a scope as well: filtered-out and skipped events both move the checkpoint.
    class ScopedPython(AppliedLog):
        name = "scoped_python"
        aggregate_types = ("Order",)

    stored += append_spread(engine, store, 15, prefix="user", aggregate_type="User")
    for k in range(3):
        proc = processor(
            engine,
            store,
            partition_key=k,
            total_partitions=3,
            batch_size=8,
            partition_strategy=ByNumber(),
        )
        assert proc.run_until_caught_up(ScopedPython(partition=k)) == 30
        assert checkpoint_position(engine, "scoped_python", k) == stored[-1].global_position
    scoped = applied(engine, "scoped_python")
    assert len(scoped) == 90
    assert {r.aggregate_type for r in scoped} == {"Order"}
