"""No event is skipped, and each aggregate's versions arrive in order, under concurrent writers.

On PostgreSQL a later-numbered event can commit before an earlier one (DESIGN
invariant 2). The deterministic tests engineer that interleaving by hand; the stress
test lets eight writers produce it at random while a runner projects concurrently.
A naive position-checkpoint reader is run against both as a negative control: it
must miss an event, which proves the set-up bites.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource.partition import fnv1a_32
from tests import projection_support
from tests.projection_support import (
    SHARED_SERVER_WAIT,
    Background,
    LogA,
    LogB,
    all_events,
    applied,
    applied_triples,
    assert_versions_in_order,
    checkpoint,
    create_applied_table,
    event,
    processor,
    versions_in_handle_order,
    wait_readable,
)

pytestmark = pytest.mark.postgres

#: Tests of a transaction that took its id before it appended (T1 below), as the server
#: rule treats it: it holds projections back from the moment it has an id. Under the
#: store rule it does not (it is no writer yet) and its late append is refused instead;
#: tests/test_horizon.py proves that side.
SERVER_RULE_ONLY = {
    "test_an_older_transaction_that_appends_last_is_read_before_the_newer_one",
    "test_older_transaction_is_refused_after_a_newer_one_appended",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test here runs under both horizon rules (but those above)."""
    only_server = metafunc.function.__name__ in SERVER_RULE_ONLY
    rules = ["server"] if only_server else ["store", "server"]
    metafunc.parametrize("horizon_rule", rules, indirect=True)


@pytest.fixture(autouse=True)
def horizon_rule(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """processor() (tests/projection_support.py) builds processors with this rule."""
    monkeypatch.setattr(projection_support, "horizon_rule", request.param)
    return str(request.param)


class NaiveReader:
    """What not to do: checkpoint = the highest position read so far."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.checkpoint = 0
        self.seen: list[int] = []

    def poll(self, limit: int = 100) -> int:
        with self.engine.connect() as conn:
            positions = [
                int(p)
                for p in conn.execute(
                    sa.text(
                        "SELECT global_position FROM events WHERE global_position > :ck "
                        "ORDER BY global_position LIMIT :n"
                    ),
                    {"ck": self.checkpoint, "n": limit},
                ).scalars()
            ]
        self.seen.extend(positions)
        if positions:
            self.checkpoint = max(positions)
        return len(positions)

    def drain(self) -> None:
        while self.poll():
            pass


class OpenAppend:
    """An append whose transaction stays open until ``commit``/``rollback``."""

    def __init__(self, engine: sa.Engine, store: es.EventStore, events: list[es.Event]) -> None:
        self.conn = engine.connect()
        self.transaction = self.conn.begin()
        self.result = store.append(self.conn, events)

    @property
    def position(self) -> int:
        return self.result.events[-1].global_position

    def commit(self) -> None:
        self.transaction.commit()
        self.conn.close()

    def rollback(self) -> None:
        self.transaction.rollback()
        self.conn.close()


def append_committed(engine: sa.Engine, store: es.EventStore, e: es.Event) -> int:
    with Session(engine) as session, session.begin():
        return store.append(session, [e]).events[0].global_position


# -- the engineered interleaving ----------------------------------------------------


def test_naive_reader_never_sees_an_event_that_commits_after_a_later_one(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """Negative control: T1 appends and holds, T2 appends and commits, T1 commits."""
    naive = NaiveReader(pg_engine)
    t1 = OpenAppend(pg_engine, store, [event("held")])
    try:
        p2 = append_committed(pg_engine, store, event("quick"))
        assert p2 > t1.position
        naive.drain()
        assert naive.checkpoint == p2  # moved past T1's position, still in flight
    finally:
        t1.commit()
    naive.drain()
    assert [p for p, _, _ in all_events(pg_engine)] == [t1.position, p2]
    assert naive.seen == [p2]  # T1's event is lost for good


def test_processor_waits_for_the_open_transaction_and_then_handles_its_event(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(pg_engine)
    projection = LogA()
    proc = processor(pg_engine, store, poll_interval=0.02)
    t1 = OpenAppend(pg_engine, store, [event("held")])
    catching_up: Background | None = None
    try:
        p2 = append_committed(pg_engine, store, event("quick"))
        # T2's event is committed, but T1 may still commit below it: do not read past T1.
        result = proc.process_batch(projection)
        assert result.handled == 0
        found = checkpoint(pg_engine, projection.name)
        assert found is not None
        assert found.global_position < t1.position
        assert applied(pg_engine, projection.name) == []

        # run_until_caught_up waits for T1 instead of returning without T2's event.
        catching_up = Background(
            lambda: processor(pg_engine, store, poll_interval=0.02).run_until_caught_up(projection)
        ).start()
        time.sleep(0.5)
        assert catching_up.alive, "returned while an older transaction was still open"
    finally:
        t1.commit()
    assert catching_up is not None
    catching_up.join(SHARED_SERVER_WAIT)  # the server rule waits for other tests too
    assert catching_up.error is None
    assert catching_up.result == 2
    rows = applied(pg_engine, projection.name)
    assert [r.global_position for r in rows] == [t1.position, p2]
    # In transaction order: T1 took its id first.
    assert [r.aggregate_id for r in sorted(rows, key=lambda r: r.seq)] == ["held", "quick"]
    found = checkpoint(pg_engine, projection.name)
    assert found is not None
    assert found.global_position == p2
    assert found.events_handled == 2


class AfterFirstBatch(es.Processor):
    """A processor that runs ``callback`` once, right after its first batch commits."""

    def __init__(self, *args: Any, callback: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.callback: Callable[[], None] | None = callback

    def process_batch(self, projection: es.Projection) -> es.BatchResult:
        result = super().process_batch(projection)
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()
        return result


def test_catch_up_does_not_stop_when_the_blocking_transaction_ends_between_polls(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """T2's event was committed before the call: it must be handled before returning.

    The blocker commits after a batch that could not read past it but before the
    processor asks whether anything still waits: the events are readable by then, not
    blocked, and a check for "blocked only" would return with them unhandled.
    """
    create_applied_table(pg_engine)
    projection = LogA()
    t1 = OpenAppend(pg_engine, store, [event("held")])
    try:
        p2 = append_committed(pg_engine, store, event("quick"))
    except BaseException:
        t1.rollback()
        raise
    proc = AfterFirstBatch(
        pg_engine,
        store,
        es.ProcessorConfig(poll_interval=0.01, horizon=projection_support.horizon_rule),
        callback=t1.commit,
    )
    handled = proc.run_until_caught_up(projection)
    assert [r.global_position for r in applied(pg_engine, projection.name)] == [t1.position, p2]
    assert handled == 2


# -- out-of-order commits for scoped and partitioned projections ---------------------
#
# Staged step by step on separate connections: T1 begins and takes its transaction id,
# T2 (newer) appends and commits, the processor polls, T1 appends at higher positions
# than T2's and commits last. The projection wants events on both sides and filters out
# some of T2's (another aggregate type, or the other partition).


def id_in_partition(prefix: str, partition: int, total: int = 2) -> str:
    """The first id ``prefix-N`` whose FNV-1a hash puts it in ``partition``."""
    return next(
        f"{prefix}-{n}" for n in range(1000) if fnv1a_32(f"{prefix}-{n}") % total == partition
    )


class ScopedOrders(LogA):
    name = "scoped_orders"
    aggregate_types = ("Order",)


class OnePartition(LogB):
    name = "one_partition"


@dataclass(frozen=True)
class Scope:
    """A projection, its processor settings, an event it wants and, when it filters,
    one it does not want (``None``: it wants everything)."""

    projection: Callable[[], es.Projection]
    config: dict[str, Any]
    wanted: Callable[[str], es.Event]
    unwanted: Callable[[str], es.Event] | None


SCOPES = {
    "whole": Scope(LogA, {}, event, None),
    "scoped": Scope(
        ScopedOrders,
        {},
        lambda name: event(name, aggregate_type="Order"),
        lambda name: event(name, bounded_context="identity", aggregate_type="User"),
    ),
    "partitioned": Scope(
        lambda: OnePartition(partition=0),
        {"partition_key": 0, "total_partitions": 2},
        lambda name: event(id_in_partition(name, 0)),
        lambda name: event(id_in_partition(name, 1)),
    ),
}


def begin_with_id(engine: sa.Engine) -> tuple[sa.Connection, sa.RootTransaction]:
    """T1: begun, its transaction id taken now (older than every transaction after it)."""
    conn = engine.connect()
    transaction = conn.begin()
    conn.execute(sa.text("SELECT pg_current_xact_id()"))
    return conn, transaction


def commit_events(
    engine: sa.Engine, store: es.EventStore, *events: es.Event
) -> list[es.PersistedEvent]:
    """One committed transaction appending each event (each to its own aggregate)."""
    with Session(engine) as session, session.begin():
        return [store.append(session, [e]).events[0] for e in events]


def assert_handled_once_in_version_order(
    engine: sa.Engine, name: str, wanted: list[es.PersistedEvent]
) -> None:
    """The wanted events, each exactly once, each aggregate's versions in order."""
    rows = applied(engine, name)  # its primary key refuses a second apply anyway
    assert sorted(r.global_position for r in rows) == sorted(e.global_position for e in wanted)
    assert_versions_in_order(rows)
    by_aggregate: dict[str, list[int]] = {}
    for e in wanted:
        by_aggregate.setdefault(e.aggregate_id, []).append(e.aggregate_version)
    assert versions_in_handle_order(rows) == by_aggregate
    found = checkpoint(engine, name)
    assert found is not None
    assert found.events_handled == len(wanted)


@pytest.mark.parametrize("scope", list(SCOPES))
def test_an_older_transaction_that_appends_last_is_read_before_the_newer_one(
    pg_engine: sa.Engine, store: es.EventStore, scope: str
) -> None:
    """Events are read in (transaction id, position) order, not in position order.

    T1 (older id) appends A v2 after T2's B v1, at a higher position. Read by position, B
    would move the checkpoint past A v2, which would be skipped (batches of one: each
    batch starts from the last one's checkpoint; larger batches would handle B twice).
    """
    spec = SCOPES[scope]
    create_applied_table(pg_engine)
    projection = spec.projection()
    proc = processor(pg_engine, store, batch_size=1, **spec.config)
    wanted = commit_events(pg_engine, store, spec.wanted("a"))
    wait_readable(pg_engine)  # A v1 is read now, whatever else runs on the server
    assert proc.run_until_caught_up(projection) == 1

    t1, t1_transaction = begin_with_id(pg_engine)
    try:
        t2 = commit_events(
            pg_engine,
            store,
            spec.wanted("b"),
            *([] if spec.unwanted is None else [spec.unwanted("c")]),
        )
        assert proc.process_batch(projection).handled == 0  # T1 is older and still open
        a2 = store.append(t1, [spec.wanted("a")], es.ExpectedVersion.exact(1)).events[0]
        assert a2.global_position > max(e.global_position for e in t2)
        t1_transaction.commit()
    finally:
        t1.close()
    wanted += [a2, *(t2 if spec.unwanted is None else t2[:1])]
    # Both transactions readable at once: the next batch could take either event first.
    wait_readable(pg_engine)
    proc.run_until_caught_up(projection)
    assert_handled_once_in_version_order(pg_engine, projection.name, wanted)
    # In transaction order: T1 took its id before T2.
    handled = sorted(applied(pg_engine, projection.name), key=lambda row: row.seq)
    assert [row.global_position for row in handled] == [e.global_position for e in wanted]


@pytest.mark.parametrize("scope", ["scoped", "partitioned"])
def test_filtered_out_events_never_move_the_checkpoint_past_an_open_transaction(
    pg_engine: sa.Engine, store: es.EventStore, scope: str
) -> None:
    """Filtered-out events move the checkpoint only as far as what is readable.

    T2's events, unwanted and committed while T1 is open, must not carry the checkpoint
    past T1's id: T1's wanted events (one before T2's positions, one after) commit after
    the poll and would sort before that checkpoint, skipped for good.
    """
    spec = SCOPES[scope]
    assert spec.unwanted is not None
    create_applied_table(pg_engine)
    projection = spec.projection()
    proc = processor(pg_engine, store, **spec.config)
    wanted = commit_events(pg_engine, store, spec.wanted("a"))
    wait_readable(pg_engine)  # A v1 is read now, whatever else runs on the server
    assert proc.run_until_caught_up(projection) == 1

    t1, t1_transaction = begin_with_id(pg_engine)
    try:
        a2 = store.append(t1, [spec.wanted("a")], es.ExpectedVersion.exact(1)).events[0]
        t2 = commit_events(pg_engine, store, spec.unwanted("c"), spec.unwanted("d"))
        # Nothing wanted is readable: only the horizon could move the checkpoint now.
        assert proc.process_batch(projection).handled == 0
        b1 = store.append(t1, [spec.wanted("b")]).events[0]
        assert a2.global_position < t2[0].global_position < b1.global_position
        t1_transaction.commit()
    finally:
        t1.close()
    proc.run_until_caught_up(projection)
    assert_handled_once_in_version_order(pg_engine, projection.name, [*wanted, a2, b1])


# -- DESIGN invariant 3: an older transaction cannot append behind a newer one -------


@pytest.mark.parametrize(
    "expected", [es.ExpectedVersion.any(), es.ExpectedVersion.exact(1)], ids=["any", "exact1"]
)
def test_older_transaction_is_refused_after_a_newer_one_appended(
    pg_engine: sa.Engine, store: es.EventStore, expected: es.ExpectedVersion
) -> None:
    create_applied_table(pg_engine)
    projection = LogA()
    proc = processor(pg_engine, store)
    with pg_engine.connect() as t1:
        t1_transaction = t1.begin()
        t1.execute(sa.text("SELECT pg_current_xact_id()"))  # T1 takes its transaction id
        append_committed(pg_engine, store, event("A", "V1"))  # T2: A v1, committed
        assert proc.process_batch(projection).handled == 0  # T1 is older and still open
        # T1 (older) would write A v2 and be read before v1: refused instead.
        with pytest.raises(es.OptimisticConcurrencyError, match="newer transaction") as info:
            store.append(t1, [event("A", "V2")], expected)
        assert info.value.aggregate_id == "A"
        t1_transaction.rollback()
    # The caller retries in a new transaction, which succeeds.
    with Session(pg_engine) as session, session.begin():
        assert store.append(session, [event("A", "V2")], expected).to_version == 2
    proc.run_until_caught_up(projection)
    rows = applied(pg_engine, projection.name)
    assert versions_in_handle_order(rows) == {"A": [1, 2]}
    assert [r.event_type for r in sorted(rows, key=lambda r: r.seq)] == ["V1", "V2"]


def test_older_transaction_blocked_on_the_aggregate_is_refused_when_the_newer_commits(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """The racing form: T1's append queues on T2's row lock, then sees T2 committed."""
    create_applied_table(pg_engine)
    projection = LogA()
    with pg_engine.connect() as t1:
        t1_transaction = t1.begin()
        t1.execute(sa.text("SELECT pg_current_xact_id()"))
        t2 = OpenAppend(pg_engine, store, [event("A", "V1")])
        try:
            blocked = Background(lambda: store.append(t1, [event("A", "V2")])).start()
            time.sleep(0.2)
            assert blocked.alive  # waiting for T2's lock on the aggregate's head
        finally:
            t2.commit()
        blocked.join(10)
        assert isinstance(blocked.error, es.OptimisticConcurrencyError)
        t1_transaction.rollback()
    with Session(pg_engine) as session, session.begin():
        store.append(session, [event("A", "V2")])
    processor(pg_engine, store).run_until_caught_up(projection)
    rows = applied(pg_engine, projection.name)
    assert versions_in_handle_order(rows) == {"A": [1, 2]}


# -- stress ----------------------------------------------------------------------------

WRITERS = 8
TRANSACTIONS_PER_WRITER = 120
SHARED_AGGREGATES = 12
PARTITIONS = 3


class StressLog(LogA):
    name = "stress_whole"


class StressPartition(LogB):
    name = "stress_partitioned"


@pytest.mark.slow
def test_concurrent_out_of_order_commits_are_projected_exactly_once_in_version_order(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(pg_engine)
    whole = StressLog()
    parts = [StressPartition(partition=k) for k in range(PARTITIONS)]
    pairs: list[tuple[es.Projection, es.Processor]] = [
        (whole, processor(pg_engine, store, batch_size=50, poll_interval=0.005))
    ]
    pairs += [
        (
            parts[k],
            processor(
                pg_engine,
                store,
                batch_size=20,
                partition_key=k,
                total_partitions=PARTITIONS,
                poll_interval=0.005,
            ),
        )
        for k in range(PARTITIONS)
    ]
    runner = es.Runner(handle_signals=False)
    running = Background(lambda: runner.run(pairs), name="stress-runner").start()

    naive = NaiveReader(pg_engine)
    writers_done = threading.Event()

    def read_naively() -> None:
        while not writers_done.is_set():
            naive.poll()

    naive_thread = Background(read_naively, name="naive-reader").start()
    retries = [0] * WRITERS

    def write(w: int) -> None:
        rng = random.Random(w)
        for i in range(TRANSACTIONS_PER_WRITER):
            while True:
                try:
                    with Session(pg_engine) as session, session.begin():
                        # The first append takes the transaction id...
                        store.append(session, [event(f"w{w}-{i // 5}", f"T{i}")])
                        time.sleep(rng.uniform(0, 0.01))
                        # ...the second may then meet a newer writer on a shared aggregate.
                        target = (
                            f"shared-{rng.randrange(SHARED_AGGREGATES)}"
                            if rng.random() < 0.6
                            else f"w{w}-solo-{i}"
                        )
                        store.append(
                            session,
                            [event(target, f"T{i}.{k}") for k in range(rng.randint(1, 3))],
                        )
                        time.sleep(rng.uniform(0, 0.03))  # appended, not yet committed
                    break
                except es.OptimisticConcurrencyError:
                    retries[w] += 1

    writers = [Background(partial(write, w), name=f"writer-{w}") for w in range(WRITERS)]
    try:
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(60)
            assert writer.error is None, writer.error
        handled_while_writing = len(applied(pg_engine, whole.name))
    finally:
        writers_done.set()
        runner.stop()
        naive_thread.join(10)
        running.join(SHARED_SERVER_WAIT)
    assert running.error is None, running.error
    es.Runner(handle_signals=False).run_until_caught_up(pairs)

    events = all_events(pg_engine)
    assert len(events) > WRITERS * TRANSACTIONS_PER_WRITER * 2
    # The runner really ran beside the writers (not only in the final catch-up), and
    # older transactions were refused behind newer ones (DESIGN invariant 3) and retried.
    assert handled_while_writing > 0
    assert sum(retries) > 0

    # Every committed event exactly once (the primary key refuses a second time).
    assert applied_triples(pg_engine, whole.name) == events
    assert_versions_in_order(applied(pg_engine, whole.name))
    part_rows = applied(pg_engine, StressPartition.name)
    assert sorted((r.global_position, r.aggregate_id, r.aggregate_version) for r in part_rows) == (
        events
    )
    assert_versions_in_order(part_rows)
    for row in part_rows:
        assert row.partition_key == fnv1a_32(row.aggregate_id) % PARTITIONS
    found = checkpoint(pg_engine, whole.name)
    assert found is not None
    assert found.events_handled == len(events)
    # (transaction id, position) order: the last one read is the newest transaction's.
    assert found.global_position in {p for p, _, _ in events}

    # Negative control: under the same writers, max-position checkpointing lost events.
    naive.drain()
    assert len(naive.seen) == len(set(naive.seen))
    missed = {p for p, _, _ in events} - set(naive.seen)
    assert missed, "the naive reader saw everything: the stress set-up did not bite"
