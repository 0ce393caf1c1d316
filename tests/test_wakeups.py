"""Wake-ups (eventsource.wakeups): a committed append wakes the processors it concerns.

Processors here sleep 30 s between polls unless a test says otherwise, so an event
handled within a few seconds was handled because a hint woke its processor; the
bounds are generous (WAKE_BOUND) and measure behaviour, not speed (the latency figures
come from bench/latency.py). Batches are counted through ``Processor(metrics=...)``:
a processor that a hint must not concern runs no batch after it.

Other processes are ``tests/scripts/wakeup_writer.py``, which appends on command.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource import wakeups
from eventsource.partition import fnv1a_32
from tests.projection_support import (
    AppliedLog,
    Background,
    LogA,
    LogB,
    LogC,
    append,
    create_applied_table,
    event,
    reader,
    wait_until,
)

WRITER = Path(__file__).parent / "scripts" / "wakeup_writer.py"

#: A woken processor handles the event well within this, far below its 30 s poll.
WAKE_BOUND = 10.0
#: A start-up is over once no batch has ended for this long (see settle).
SETTLE = 1.0
#: How long a processor that must not be woken is watched after the one that must.
QUIET = 1.0
#: Seconds between the polls of a sleeping processor: only a hint wakes it in a test.
ASLEEP = 30.0


# -- processors that count their batches ---------------------------------------------


class Batches:
    """ProcessorMetrics: when each batch ended (monotonic), and how many failed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ended: list[float] = []
        self.failed = 0

    def batch_completed(self, projection: str, partition: int, result: es.BatchResult) -> None:
        with self._lock:
            self.ended.append(time.monotonic())

    def batch_failed(self, projection: str, partition: int) -> None:
        with self._lock:
            self.failed += 1

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.ended)

    def gaps(self, since: float, until: float) -> list[float]:
        """Seconds between consecutive batches that ended in [since, until]."""
        with self._lock:
            ended = [t for t in self.ended if since <= t <= until]
        return [b - a for a, b in itertools.pairwise(ended)]


class Run:
    """One ``Processor.run`` in a thread, with its batches counted."""

    def __init__(
        self,
        engine: sa.Engine,
        projection: es.Projection,
        *,
        store: es.EventStore | None = None,
        **config: Any,
    ) -> None:
        self.engine = engine
        self.projection = projection
        self.batches = Batches()
        self.processor = es.Processor(
            engine, store or es.EventStore(), es.ProcessorConfig(**config), metrics=self.batches
        )
        self.background = Background(
            lambda: self.processor.run(projection, handle_signals=False),
            name=f"run-{projection.name}",
        )

    @property
    def count(self) -> int:
        return self.batches.count


class Runs:
    """Starts runs; on exit stops and joins them all (before the database is dropped)
    and raises the first error one of them had."""

    def __init__(self) -> None:
        self.runs: list[Run] = []

    def start(
        self,
        engine: sa.Engine,
        projection: es.Projection,
        *,
        store: es.EventStore | None = None,
        **config: Any,
    ) -> Run:
        config.setdefault("poll_interval", ASLEEP)
        run = Run(engine, projection, store=store, **config)
        self.runs.append(run)
        run.background.start()
        return run

    def __enter__(self) -> Runs:
        return self

    def __exit__(self, failed: type[BaseException] | None, *exc: object) -> None:
        for run in self.runs:
            run.processor.stop()
        for run in self.runs:
            run.background.join(30)
        for run in self.runs:  # a processor's error explains the rest
            if run.background.error is not None:
                raise run.background.error
        if failed is not None:
            return  # the test's own failure says the rest
        for run in self.runs:
            assert run.batches.failed == 0, f"{run.projection.name}: a batch failed"
        # The last subscription gone, the listener closes its connection.
        for engine in {id(run.engine): run.engine for run in self.runs}.values():
            if engine.dialect.name == "postgresql":
                wait_until(functools.partial(no_listener, engine), timeout=10)


def listener_pids(engine: sa.Engine) -> list[int]:
    """Backends of this database idle after a LISTEN: this process's wake-up listener."""
    with engine.connect() as conn:
        return [
            int(pid)
            for pid in conn.execute(
                sa.text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query ILIKE 'LISTEN%' AND state = 'idle'"
                )
            ).scalars()
        ]


def no_listener(engine: sa.Engine) -> bool:
    return not listener_pids(engine)


def settle(engine: sa.Engine, runs: list[Run]) -> None:
    """Wait until the runs' start-up is over: on PostgreSQL the listener listens (its
    first LISTEN wakes every subscriber once), each run has done a batch, and no batch
    has ended for SETTLE seconds. From then on only a hint (or a 30 s poll) makes one."""
    if engine.dialect.name == "postgresql":
        wait_until(lambda: bool(listener_pids(engine)), timeout=30)
    wait_until(lambda: all(run.count for run in runs), timeout=30)
    deadline = time.monotonic() + 30
    counts = [run.count for run in runs]
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < SETTLE:
        assert time.monotonic() < deadline, "processors never went idle"
        time.sleep(0.05)
        now = [run.count for run in runs]
        if now != counts:
            counts, quiet_since = now, time.monotonic()


def positions(engine: sa.Engine, name: str) -> set[int]:
    with reader(engine).connect() as conn:
        return set(
            conn.execute(
                sa.text("SELECT global_position FROM applied WHERE projection = :p"), {"p": name}
            ).scalars()
        )


def handled_within(engine: sa.Engine, name: str, position: int, since: float) -> float:
    """Seconds from ``since`` until ``name`` has handled ``position`` (at most WAKE_BOUND)."""
    while position not in positions(engine, name):
        waited = time.monotonic() - since
        assert waited < WAKE_BOUND, (
            f"{name} did not handle event {position} within {WAKE_BOUND} s: not woken"
        )
        time.sleep(0.02)
    return time.monotonic() - since


def append_one(
    engine: sa.Engine,
    aggregate_id: str,
    aggregate_type: str = "Order",
    store: es.EventStore | None = None,
) -> int:
    stored = append(
        engine, store or es.EventStore(), [[event(aggregate_id, aggregate_type=aggregate_type)]]
    )
    return stored[-1].global_position


@contextlib.contextmanager
def unrelated_open_transaction(engine: sa.Engine) -> Iterator[None]:
    """On PostgreSQL, a transaction with an id held open that never appends: the server's
    xmin stays below the appends made meanwhile, so a processor reads them only with a
    store horizon computed after they committed. A woken batch must compute one, not
    reuse the one it cached for the previous append (for up to its 30 s poll interval)."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_current_xact_id()"))
        yield
        conn.rollback()


# -- another process -------------------------------------------------------------------


class Writer:
    """tests/scripts/wakeup_writer.py: appends in a process of its own, on command."""

    def __init__(self, url: sa.URL, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(WRITER), url.render_as_string(hide_password=False), *options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def answer(self, timeout: float = 60.0) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the writer did not answer within {timeout} s") from None
        if line is None:
            raise AssertionError("the writer exited (its stderr follows at teardown)")
        return line

    def wait_ready(self) -> None:
        assert self.answer() == "ready"

    def command(self, line: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.answer()

    def append(self, aggregate_id: str, aggregate_type: str = "Order") -> int:
        answer = self.command(f"append {aggregate_type} {aggregate_id}")
        assert answer.startswith("appended "), answer
        return int(answer.split()[1])

    def rollback(self, aggregate_id: str, aggregate_type: str = "Order") -> None:
        assert self.command(f"rollback {aggregate_type} {aggregate_id}") == "rolled back"

    def close(self) -> None:
        """End its input and wait for it to exit 0 (killed after 30 s)."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        if self.process.stderr.closed:
            return
        try:
            self.process.stdin.close()
            try:
                code = self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
                raise
            self._reader.join(30)
            errors = self.process.stderr.read()
        finally:
            self.process.stdout.close()
            self.process.stderr.close()
        assert code == 0, errors


@pytest.fixture
def writer(pg_url: sa.URL) -> Iterator[Callable[..., Writer]]:
    """Starts writers on the test's PostgreSQL database; closes them before it is dropped."""
    started: list[Writer] = []

    def start(*options: str) -> Writer:
        started.append(Writer(pg_url, *options))
        return started[-1]

    yield start
    for each in started:
        each.close()


# -- 1. a hint wakes a sleeping worker -------------------------------------------------


@pytest.mark.postgres
def test_a_commit_in_another_process_wakes_a_sleeping_worker_and_a_rollback_does_not(
    pg_engine: sa.Engine, writer: Callable[..., Writer]
) -> None:
    create_applied_table(pg_engine)
    other = writer()  # starting Python takes a while: meanwhile the processor starts
    with Runs() as runs:
        run = runs.start(pg_engine, LogA())
        other.wait_ready()
        settle(pg_engine, [run])
        before = run.count
        with unrelated_open_transaction(pg_engine):
            # Rolled back in the other process: nothing is sent, nobody wakes.
            other.rollback("o-1")
            time.sleep(QUIET)
            assert run.count == before, "a rolled-back append in another process woke it"
            for aggregate_id in ("o-1", "o-2"):  # the second with a horizon cached
                position = other.append(aggregate_id)
                handled_within(pg_engine, "log_a", position, time.monotonic())
        # The metrics hear of a batch just after its commit, which handled_within saw.
        wait_until(lambda: run.count > before, timeout=WAKE_BOUND)


@pytest.mark.postgres
def test_a_writer_that_exits_right_after_its_commit_still_wakes_workers(
    pg_engine: sa.Engine, writer: Callable[..., Writer]
) -> None:
    create_applied_table(pg_engine)
    other = writer()
    with Runs() as runs:
        run = runs.start(pg_engine, LogA())
        other.wait_ready()
        settle(pg_engine, [run])
        position = other.append("o-1")
        other.close()  # end of its input: it exits at once, as a script does
        # Its hint left before the exit (wakeups drains the notifier at exit): without
        # that, the daemon notifier thread usually died first and nobody woke.
        handled_within(pg_engine, "log_a", position, time.monotonic())


def test_a_commit_in_this_process_wakes_a_sleeping_worker_at_once(engine: sa.Engine) -> None:
    """In-process delivery (SQLite and PostgreSQL): one batch per append (on PostgreSQL
    the listener skips the hints this process sent). A processor with wake-ups off
    sleeps on."""
    create_applied_table(engine)
    with Runs() as runs:
        woken = runs.start(engine, LogA())
        deaf = runs.start(engine, LogB(), wake_ups=False)
        settle(engine, [woken, deaf])
        counts = woken.count, deaf.count
        with unrelated_open_transaction(engine):
            for aggregate_id in ("o-1", "o-2"):  # the second with a horizon cached
                position = append_one(engine, aggregate_id)
                handled_within(engine, "log_a", position, time.monotonic())
        time.sleep(QUIET)
        assert woken.count == counts[0] + 2, "not one batch per append"
        assert deaf.count == counts[1], "wake_ups=False, yet a hint woke the processor"
        assert not positions(engine, "log_b")


@pytest.mark.postgres
def test_a_hint_that_arrives_during_a_batch_is_not_lost(pg_engine: sa.Engine) -> None:
    """An append that commits while the processor's batch is running (the batch cannot
    read it) calls for another batch right after, not for the next poll."""
    create_applied_table(pg_engine)
    entered, release = threading.Event(), threading.Event()

    class Blocking(AppliedLog):
        name = "blocking"

        def handle(self, event: es.PersistedEvent, session: Session) -> None:
            if event.aggregate_id == "first":
                entered.set()
                assert release.wait(30), "never released"
            super().handle(event, session)

    with Runs() as runs:
        run = runs.start(pg_engine, Blocking())
        settle(pg_engine, [run])
        append_one(pg_engine, "first")
        try:
            assert entered.wait(WAKE_BOUND), "the first append did not wake the processor"
            # Its hint is delivered (in this process) when the session returns its
            # connection, before append_one returns: while the batch still runs.
            position = append_one(pg_engine, "second")
        finally:
            release.set()
        handled_within(pg_engine, "blocking", position, time.monotonic())


# -- 2. a missed hint: the fallback polls ----------------------------------------------


def test_a_missed_hint_is_covered_by_the_fallback_poll(engine: sa.Engine) -> None:
    """``EventStore(notify=False)`` sends no hint: a processor polling every 0.05 s (on
    PostgreSQL backed off to max_poll_interval=1 s) still handles the event, one polling
    every 30 s does not within 2 s; a later append with its hint wakes it for both."""
    create_applied_table(engine)
    postgresql = engine.dialect.name == "postgresql"
    with Runs() as runs:
        polling = runs.start(engine, LogA(), poll_interval=0.05, max_poll_interval=1.0)
        asleep = runs.start(engine, LogB())
        settle(engine, [asleep])
        if postgresql:  # idle with the listener on: its polls grow to the 1 s ceiling
            wait_until(lambda: max(polling.batches.gaps(0, time.monotonic()), default=0) > 0.8)
        before = asleep.count
        appended_at = time.monotonic()
        silent = append_one(engine, "o-1", store=es.EventStore(notify=False))
        handled_within(engine, "log_a", silent, appended_at)
        time.sleep(max(0.0, appended_at + 2.0 - time.monotonic()))
        assert silent not in positions(engine, "log_b"), "notify=False, yet a hint was sent"
        assert asleep.count == before
        loud = append_one(engine, "o-2")
        handled_within(engine, "log_b", loud, time.monotonic())
        assert silent in positions(engine, "log_b")


# -- 3. the listener survives connection loss ------------------------------------------


@pytest.mark.postgres
def test_the_listener_reconnects_after_its_connection_is_killed(
    pg_engine: sa.Engine, writer: Callable[..., Writer]
) -> None:
    create_applied_table(pg_engine)
    other = writer()
    with Runs() as runs:
        run = runs.start(pg_engine, LogA())
        other.wait_ready()
        settle(pg_engine, [run])
        [killed] = listener_pids(pg_engine)
        before = run.count
        with pg_engine.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": killed}).scalar()
        wait_until(lambda: bool(set(listener_pids(pg_engine)) - {killed}), timeout=30)
        # Listening again, it wakes every subscriber: hints may have been missed meanwhile.
        wait_until(lambda: run.count > before, timeout=WAKE_BOUND)
        settle(pg_engine, [run])
        position = other.append("o-1")
        handled_within(pg_engine, "log_a", position, time.monotonic())


# -- 4. scopes and partitions ----------------------------------------------------------


class OnlyA(AppliedLog):
    name = "only_a"
    aggregate_types = ("A",)


class Quartered(AppliedLog):
    name = "quartered"


def aggregate_in(partition: int, total: int = 4) -> str:
    """An aggregate id whose events belong to ``partition`` of ``total`` (hash strategy)."""
    return next(f"agg-{i}" for i in range(1000) if fnv1a_32(f"agg-{i}") % total == partition)


def check_scopes_and_partitions(engine: sa.Engine, append_as: Callable[[str, str], int]) -> None:
    """A processor runs a batch for an append only when its scope and partition could
    read it; ``append_as(aggregate_type, aggregate_id)`` commits one event."""
    create_applied_table(engine)
    with Runs() as runs:
        only_a = runs.start(engine, OnlyA())
        quarters = [
            runs.start(engine, Quartered(partition=key), total_partitions=4, partition_key=key)
            for key in range(4)
        ]
        everyone = [only_a, *quarters]
        settle(engine, everyone)

        def expect(aggregate_type: str, partition: int, woken: list[Run]) -> None:
            counts = {id(run): run.count for run in everyone}
            started = time.monotonic()
            position = append_as(aggregate_type, aggregate_in(partition))
            for run in woken:
                handled_within(engine, run.projection.name, position, started)
            time.sleep(QUIET)
            for run in everyone:
                label = f"{run.projection.name} partition {run.processor.config.partition_key}"
                if run in woken:
                    assert run.count > counts[id(run)], f"{label} was not woken"
                else:
                    assert run.count == counts[id(run)], (
                        f"{label} ran a batch for a {aggregate_type} event of partition "
                        f"{partition} of 4"
                    )

        expect("B", 1, [quarters[1]])
        expect("A", 2, [only_a, quarters[2]])


def test_scopes_and_partitions_are_respected_in_this_process(engine: sa.Engine) -> None:
    check_scopes_and_partitions(
        engine,
        lambda aggregate_type, aggregate_id: append_one(engine, aggregate_id, aggregate_type),
    )


@pytest.mark.postgres
def test_scopes_and_partitions_are_respected_across_processes(
    pg_engine: sa.Engine, writer: Callable[..., Writer]
) -> None:
    other = writer()
    other.wait_ready()
    check_scopes_and_partitions(
        pg_engine, lambda aggregate_type, aggregate_id: other.append(aggregate_id, aggregate_type)
    )


# -- 5. a rollback wakes nobody --------------------------------------------------------


def test_a_rolled_back_append_wakes_nobody_and_a_committed_one_does(engine: sa.Engine) -> None:
    create_applied_table(engine)
    store = es.EventStore()
    with Runs() as runs:
        run = runs.start(engine, LogA())
        settle(engine, [run])
        before = run.count
        # Rolled back, and the session returns its connection to the pool.
        with Session(engine) as session:
            store.append(session, [event("o-1")])
            session.rollback()
        # Rolled back, then the same connection commits a transaction without an append.
        with engine.connect() as conn:
            store.append(conn, [event("o-1")])
            conn.rollback()
            conn.execute(sa.text("SELECT 1"))
            conn.commit()
        time.sleep(QUIET)
        assert run.count == before, "a rolled-back append woke a processor"
        position = append_one(engine, "o-1")
        handled_within(engine, "log_a", position, time.monotonic())
        # The metrics hear of a batch just after its commit, which handled_within saw.
        wait_until(lambda: run.count > before, timeout=WAKE_BOUND)


# -- 6. idle backoff -------------------------------------------------------------------


def test_idle_polls_back_off_only_while_hints_arrive_from_every_process(
    engine: sa.Engine,
) -> None:
    """On PostgreSQL, with the listener listening, an idle processor's polls grow from
    poll_interval up to max_poll_interval; with wake_ups=False they stay at
    poll_interval, and so they do on SQLite, where other processes' appends send no hint."""
    create_applied_table(engine)
    postgresql = engine.dialect.name == "postgresql"
    with Runs() as runs:
        woken = runs.start(engine, LogA(), poll_interval=0.05, max_poll_interval=0.4)
        polling = runs.start(
            engine, LogB(), poll_interval=0.05, max_poll_interval=0.4, wake_ups=False
        )
        # Doubling without its ceiling, it would wait 0.8 s after 1.5 s and 1.6 s after 3.
        capped = runs.start(engine, LogC(), poll_interval=0.05, max_poll_interval=0.1)
        if postgresql:
            wait_until(lambda: bool(listener_pids(engine)), timeout=30)
        since = time.monotonic()
        time.sleep(3.0 if postgresql else 2.0)
        until = time.monotonic()
    woken_gaps, polling_gaps = woken.batches.gaps(since, until), polling.batches.gaps(since, until)
    capped_gaps = capped.batches.gaps(since, until)
    assert statistics.median(polling_gaps) < 0.25, f"wake_ups=False backed off: {polling_gaps}"
    assert max(capped_gaps) < 0.6, f"polls grew past max_poll_interval: {capped_gaps}"
    if postgresql:
        assert len(woken_gaps) < len(polling_gaps) / 2, (woken_gaps, polling_gaps)
        assert max(woken_gaps) > 0.35, f"never reached max_poll_interval: {woken_gaps}"
    else:
        assert statistics.median(woken_gaps) < 0.25, f"backed off on SQLite: {woken_gaps}"


# -- 7. configuration ------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"wake_ups": "yes"},
        {"wake_ups": 1},
        {"max_poll_interval": 0},
        {"max_poll_interval": -1.0},
        {"max_poll_interval": True},
        {"max_poll_interval": "5"},
    ],
)
def test_bad_wake_up_settings_are_refused(config: dict[str, Any]) -> None:
    with pytest.raises(es.ConfigurationError, match=next(iter(config))):
        es.ProcessorConfig(**config)


@pytest.mark.parametrize("notify", [1, "yes", None])
def test_bad_notify_is_refused(notify: Any) -> None:
    with pytest.raises(es.ConfigurationError, match="notify"):
        es.EventStore(notify=notify)


# -- 8. payloads and channels ----------------------------------------------------------


def test_a_payload_round_trips() -> None:
    first = wakeups.Hint(appended=frozenset({("sales", "Order", 4_000_000_000)}))
    second = wakeups.Hint(
        appended=frozenset({("billing", "Invoice", 7), ("sales", "Order", 4_000_000_000)}),
        checkpoints=frozenset({"log_a", "quartered"}),
    )
    token, hint = wakeups.decode(wakeups.encode("tok", [first, second]))
    assert token == "tok"
    assert hint == wakeups.Hint(
        appended=frozenset({("billing", "Invoice", 7), ("sales", "Order", 4_000_000_000)}),
        checkpoints=frozenset({"log_a", "quartered"}),
    )
    assert not hint.everything
    assert wakeups.decode(wakeups.encode("tok", [first, wakeups.EVERYTHING])) == (
        "tok",
        wakeups.EVERYTHING,
    )


def test_a_payload_too_long_for_notify_says_everything() -> None:
    many = wakeups.Hint(
        appended=frozenset(("sales", "Order", n) for n in range(1000)),
    )
    payload = wakeups.encode("tok", [many])
    assert len(payload.encode()) <= wakeups.MAX_PAYLOAD < 8000
    assert wakeups.decode(payload) == ("tok", wakeups.EVERYTHING)
    few = wakeups.Hint(appended=frozenset(("sales", "Order", n) for n in range(10)))
    assert wakeups.decode(wakeups.encode("tok", [few])) == ("tok", few)


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "null",
        "[]",
        "42",
        '{"a": 5}',
        '{"a": [["sales", "Order"]]}',
        '{"a": [["sales", "Order", "not a number"]]}',
        '{"a": [["sales", "Order", null]]}',
        '{"c": 3}',
    ],
)
def test_a_garbage_payload_decodes_to_everything(payload: str) -> None:
    assert wakeups.decode(payload)[1] == wakeups.EVERYTHING


def test_channels_fit_postgresql_identifiers_and_stay_distinct() -> None:
    assert wakeups.channel_for("events") == "eventsource.events"
    names = [
        "events",
        "x" * 51,  # "eventsource." + 51 bytes: exactly 63
        "x" * 52,
        "x" * 200,
        "x" * 199 + "y",
        "é" * 30,  # 30 characters, 60 bytes
        "é" * 31,
    ]
    channels = [wakeups.channel_for(name) for name in names]
    assert all(len(channel.encode()) <= 63 for channel in channels), channels
    assert len(set(channels)) == len(names), channels
    assert wakeups.channel_for("x" * 51) == "eventsource." + "x" * 51
    assert all(channel.startswith("eventsource.") for channel in channels)


@pytest.mark.postgres
def test_an_append_through_an_async_engines_run_sync_notifies_other_processes(
    pg_url: sa.URL,
) -> None:
    """The notifier is a thread: for an async engine it connects synchronously (the
    async pool connects only inside its event loop)."""
    import asyncio

    import psycopg
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    conninfo = pg_url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as listening:
        listening.execute(f'LISTEN "{wakeups.channel_for("events")}"')

        async def append() -> None:
            async_engine = create_async_engine(pg_url)
            try:
                async with AsyncSession(async_engine) as session, session.begin():
                    await session.run_sync(lambda s: es.EventStore().append(s, [event("async-1")]))
            finally:
                await async_engine.dispose()

        asyncio.run(append())
        received = list(listening.notifies(timeout=10, stop_after=1))
    assert len(received) == 1
    token, hint = wakeups.decode(received[0].payload)
    assert token is not None
    assert ("sales", "Order", fnv1a_32("async-1")) in hint.appended
