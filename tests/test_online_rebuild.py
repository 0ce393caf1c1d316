"""Online rebuilds (the default): the projection's workers step aside, the replay commits
batch by batch, other projections stay live, and a killed rebuild is finished exactly
once by the workers or by a second run. ``atomic=True`` keeps the one-transaction rebuild.

Interleavings are staged with gates, never with sleeps: the rebuild's ``on_progress``
callback runs after each committed batch, outside any transaction, so blocking it holds
the rebuild between two batches at a known point; a handler that blocks holds a batch
open. The killed rebuild is a real process, killed with SIGKILL while a batch is open.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource.rebuild import RateWindow, RebuildProgress, rebuild
from tests.projection_support import (
    Background,
    append,
    append_spread,
    checkpoint,
    event,
    processor,
    reader,
    wait_readable,
    wait_until,
)

#: Insert-only, one row per event, the event id unique: an event applied twice fails the
#: batch that applies it (an error, not a quiet second row).
READ_MODEL_DDL = (
    "CREATE TABLE rebuilt (projection TEXT NOT NULL, event_id TEXT NOT NULL, "
    "global_position BIGINT NOT NULL, UNIQUE (projection, event_id))"
)
COUNTER_DDL = "CREATE TABLE counter (name TEXT PRIMARY KEY, events BIGINT NOT NULL)"


class InsertOnce(es.Projection):
    """Inserts one row per event; ``reset`` deletes its rows."""

    name = "insert_once"

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        with self._lock:
            self.calls += 1
        session.execute(
            sa.text("INSERT INTO rebuilt VALUES (:p, :e, :g)"),
            {"p": self.name, "e": str(event.event_id), "g": event.global_position},
        )

    def reset(self, session: Session) -> None:
        session.execute(sa.text("DELETE FROM rebuilt WHERE projection = :p"), {"p": self.name})


class Live(InsertOnce):
    """Another projection, running live beside a rebuild; notes when it sees the probe
    (the only event in its scope: its checkpoint moves past the others unread)."""

    name = "live"
    aggregate_types = ("Probe",)

    def __init__(self) -> None:
        super().__init__()
        self.seen_probe = threading.Event()
        self.seen_at = 0.0

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        super().handle(event, session)
        if event.aggregate_id == "probe":
            self.seen_at = time.monotonic()
            self.seen_probe.set()


class HotRow(es.Projection):
    """One counter row, updated for every event (a hot row)."""

    name = "hot_row"

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        updated = session.execute(
            sa.text("UPDATE counter SET events = events + 1 WHERE name = 'all'")
        )
        if updated.rowcount == 0:  # type: ignore[attr-defined]
            session.execute(sa.text("INSERT INTO counter VALUES ('all', 1)"))

    def reset(self, session: Session) -> None:
        session.execute(sa.text("DELETE FROM counter"))


@pytest.fixture
def rm_engine(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        conn.exec_driver_sql(READ_MODEL_DDL)
        conn.exec_driver_sql(COUNTER_DDL)
    return engine


@pytest.fixture
def pg_rm_engine(pg_engine: sa.Engine) -> sa.Engine:
    with pg_engine.begin() as conn:
        conn.exec_driver_sql(READ_MODEL_DDL)
        conn.exec_driver_sql(COUNTER_DDL)
    return pg_engine


def rows(engine: sa.Engine, projection: str) -> list[int]:
    with reader(engine).connect() as conn:
        found = conn.execute(
            sa.text("SELECT global_position FROM rebuilt WHERE projection = :p ORDER BY 1"),
            {"p": projection},
        )
        return [int(row[0]) for row in found]


def counter(engine: sa.Engine) -> int | None:
    with reader(engine).connect() as conn:
        value = conn.execute(sa.text("SELECT events FROM counter WHERE name = 'all'")).scalar()
    return None if value is None else int(value)


def positions(engine: sa.Engine) -> list[int]:
    with reader(engine).connect() as conn:
        found = conn.execute(sa.text("SELECT global_position FROM events ORDER BY 1"))
        return [int(row[0]) for row in found]


def append_many(engine: sa.Engine, store: es.EventStore, count: int, *, per_stream: int) -> None:
    """``count`` events in appends of ``per_stream`` events to one aggregate each."""
    streams = count // per_stream
    append(
        engine,
        store,
        ([event(f"many-{i}") for _ in range(per_stream)] for i in range(streams)),
        per_transaction=20,
    )


class Gate:
    """An ``on_progress`` callback that blocks the rebuild, between two batches, once
    ``done`` reaches ``at``, until the test opens it (opened at teardown in any case)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.reached = threading.Event()
        self.open = threading.Event()
        self.seen: list[RebuildProgress] = []

    def __call__(self, progress: RebuildProgress) -> None:
        self.seen.append(progress)
        if progress.done >= self.at and not self.reached.is_set():
            self.reached.set()
            assert self.open.wait(60), "the test never opened the gate"


@pytest.fixture
def gates() -> Iterator[list[Gate]]:
    made: list[Gate] = []
    yield made
    for gate in made:
        gate.open.set()


def start_gated_rebuild(
    engine: sa.Engine,
    store: es.EventStore,
    projection: es.Projection,
    gate: Gate,
    gates: list[Gate],
    **options: object,
) -> Background:
    gates.append(gate)
    running = Background(
        lambda: rebuild(engine, projection, store=store, on_progress=gate, **options)  # type: ignore[arg-type]
    ).start()
    assert gate.reached.wait(60), f"the rebuild never reached its gate: {running.error!r}"
    return running


# -- the ETA ---------------------------------------------------------------------------------


def test_the_eta_follows_the_recent_rate_not_the_average() -> None:
    window = RateWindow(10.0)
    assert window.rate is None
    window.add(0.0, 0)
    assert window.rate is None  # one sample: no rate yet
    for second in range(1, 21):  # 100 events/s for 20 s...
        window.add(float(second), 100 * second)
    assert window.rate == pytest.approx(100.0)
    for second in range(21, 31):  # ...then 10 events/s for 10 s
        window.add(float(second), 2000 + 10 * (second - 20))
    assert window.rate == pytest.approx(10.0)
    progress = RebuildProgress(
        "p", done=2100, total=5000, handled=2100, elapsed=30.0, recent_rate=window.rate
    )
    assert progress.average_rate == pytest.approx(70.0)
    # 2900 events left at the current 10/s, not at the 70/s average (41 s).
    assert progress.eta_seconds == pytest.approx(290.0)


def test_the_window_spans_a_batch_longer_than_itself_and_stalls_show() -> None:
    window = RateWindow(10.0)
    window.add(0.0, 0)
    window.add(25.0, 500)  # one batch of 25 s
    assert window.rate == pytest.approx(20.0)
    window.add(26.0, 520)
    assert window.rate == pytest.approx(20.0)  # (520 - 0) / 26: the anchor stays until passed
    window.add(40.0, 520)  # nothing moved for 14 s (waiting behind an open transaction)
    assert window.rate == pytest.approx(0.0)
    stalled = RebuildProgress("p", 520, 1000, 520, 40.0, window.rate)
    assert stalled.eta_seconds is None  # not a made-up number
    assert RebuildProgress("p", 1000, 1000, 1000, 41.0, 0.0).eta_seconds == 0.0
    # Before the window has a rate, the average stands in.
    early = RebuildProgress("p", 10, 100, 10, 2.0)
    assert (early.rate, early.eta_seconds) == (5.0, 18.0)
    with pytest.raises(es.ConfigurationError, match="seconds must be > 0"):
        RateWindow(0)


# -- workers and readers during an online rebuild ------------------------------------------


def test_workers_running_during_an_online_rebuild_neither_fail_nor_apply_twice(
    rm_engine: sa.Engine,
    store: es.EventStore,
    gates: list[Gate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL: the workers step aside (idle polls) until the rebuild ends, then carry
    on. SQLite: they share the replay through the checkpoint rows. Either way each event
    is applied once (a second application would break the unique event id)."""
    engine = rm_engine
    append_spread(engine, store, 300)
    wait_readable(engine)
    worker_projection = InsertOnce()
    worker = processor(engine, store, batch_size=20)
    worker.run_until_caught_up(worker_projection)
    assert rows(engine, "insert_once") == list(range(1, 301))
    caplog.set_level(logging.INFO, logger="eventsource.processor")
    running_worker = Background(lambda: worker.run(worker_projection, handle_signals=False))
    running_worker.start()
    try:
        calls_before = worker_projection.calls
        postgres = engine.dialect.name == "postgresql"
        # After its first batch on SQLite, where the worker may have taken the first ones.
        gate = Gate(at=50 if postgres else 0)
        rebuilt = InsertOnce()
        rebuilding = start_gated_rebuild(engine, store, rebuilt, gate, gates, batch_size=50)
        # The rebuild stands between two batches, what it replayed committed.
        append_spread(engine, store, 20, prefix="during")
        if postgres:
            # The worker polls and steps aside: nothing of the replay, nor the new events.
            wait_until(lambda: "an online rebuild holds it" in caplog.text, timeout=30)
            running_worker.thread.join(0.5)
            assert worker_projection.calls == calls_before
            assert rows(engine, "insert_once") == list(range(1, 51))
        else:
            # SQLite: the worker carries the replay on from the shared checkpoint.
            wait_until(lambda: len(rows(engine, "insert_once")) == 320, timeout=30)
            assert worker_projection.calls > calls_before
        assert running_worker.alive, running_worker.error
        gate.open.set()
        rebuilding.join(60)
        assert rebuilding.error is None, rebuilding.error
        wait_until(lambda: len(rows(engine, "insert_once")) == 320, timeout=30)
        assert running_worker.alive, running_worker.error
    finally:
        worker.stop()
        running_worker.join(30)
    assert running_worker.error is None, running_worker.error
    assert rows(engine, "insert_once") == list(range(1, 321))
    # Each event handled once in all, by the rebuild or by the worker.
    assert rebuilt.calls + worker_projection.calls - calls_before == 320
    found = checkpoint(engine, "insert_once")
    assert found is not None
    assert found.global_position == 320
    if engine.dialect.name == "postgresql":
        said = [r for r in caplog.records if "an online rebuild holds it" in r.getMessage()]
        assert [r.levelno for r in said] == [logging.INFO]  # once, at INFO (then DEBUG)
        assert "the rebuild is over" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("atomic", [False, True], ids=["online", "atomic"])
def test_readers_see_a_hot_row_rebuilt_batch_by_batch_unless_atomic(
    rm_engine: sa.Engine, store: es.EventStore, gates: list[Gate], atomic: bool
) -> None:
    engine = rm_engine
    append_spread(engine, store, 200)
    wait_readable(engine)
    processor(engine, store).run_until_caught_up(HotRow())
    assert counter(engine) == 200
    gate = Gate(at=100)
    rebuilding = start_gated_rebuild(
        engine, store, HotRow(), gate, gates, batch_size=50, atomic=atomic
    )
    # Online: two batches committed, the count restarted from zero. Atomic: nothing yet.
    assert counter(engine) == (200 if atomic else 100)
    gate.open.set()
    rebuilding.join(60)
    assert rebuilding.error is None, rebuilding.error
    assert counter(engine) == 200
    assert rebuilding.result.handled == 200


@pytest.mark.postgres
def test_a_second_rebuild_waits_then_gives_up_changing_nothing(
    pg_rm_engine: sa.Engine, store: es.EventStore, gates: list[Gate]
) -> None:
    engine = pg_rm_engine
    append_spread(engine, store, 100)
    wait_readable(engine)
    gate = Gate(at=50)
    first = start_gated_rebuild(engine, store, InsertOnce(), gate, gates, batch_size=50)
    with pytest.raises(es.ProjectionBusyError, match="another rebuild of it was running"):
        rebuild(engine, InsertOnce(), store=store, wait=0.2)
    assert rows(engine, "insert_once") == list(range(1, 51))  # the second reset nothing
    gate.open.set()
    first.join(60)
    assert first.error is None, first.error
    assert rows(engine, "insert_once") == list(range(1, 101))
    # The lock went with the rebuild: a worker's batch goes ahead at once.
    append_spread(engine, store, 1, prefix="after")
    wait_readable(engine)
    result = processor(engine, store).process_batch(InsertOnce())
    assert (result.rebuilding, result.handled) == (False, 1)


def test_a_failed_online_rebuild_leaves_a_consistent_model_that_a_rerun_finishes(
    rm_engine: sa.Engine, store: es.EventStore
) -> None:
    engine = rm_engine
    append_spread(engine, store, 60)
    wait_readable(engine)

    class Failing(InsertOnce):
        def handle(self, event: es.PersistedEvent, session: Session) -> None:
            if event.global_position == 37:
                raise RuntimeError("refusing 37")
            super().handle(event, session)

    with pytest.raises(es.ProjectionError, match="position 37"):
        rebuild(engine, Failing(), store=store, batch_size=10)
    # Three batches committed with their checkpoint; the fourth rolled back.
    assert rows(engine, "insert_once") == list(range(1, 31))
    found = checkpoint(engine, "insert_once")
    assert found is not None
    assert (found.global_position, found.events_handled) == (30, 30)
    assert rebuild(engine, InsertOnce(), store=store, batch_size=10).handled == 60
    assert rows(engine, "insert_once") == list(range(1, 61))


# -- other projections stay live ---------------------------------------------------------------

REBUILT_EVENTS = 30_000


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize(
    ("atomic", "rule"),
    [(False, "store"), (True, "store"), (True, "server")],
    ids=["online", "atomic", "atomic-server-rule"],
)
def test_a_live_projection_sees_new_events_while_another_is_rebuilt(
    pg_rm_engine: sa.Engine, store: es.EventStore, gates: list[Gate], atomic: bool, rule: str
) -> None:
    """A probe event is appended a third into a 30,000-event rebuild; the rebuild is held
    (between batches) before its last part until the live projection has seen it, or 3 s.
    The live projection sees it within its usual latency while the rebuild is still
    running, online or atomic (the rebuild's transaction appends nothing, so under the
    store's horizon it holds nobody back); under the server rule an atomic rebuild's
    transaction holds it back until the commit."""
    held_back = atomic and rule == "server"
    engine = pg_rm_engine
    append_many(engine, store, REBUILT_EVENTS, per_stream=100)
    wait_readable(engine)
    live = Live()
    live_worker = processor(engine, store, batch_size=100, poll_interval=0.05, horizon=rule)
    live_worker.run_until_caught_up(live)
    appended_at: list[float] = []
    seen_in_time: list[bool] = []

    def on_progress(progress: RebuildProgress) -> None:
        if progress.done >= 10_000 and not appended_at:
            append(engine, store, [[event("probe", aggregate_type="Probe")]])
            appended_at.append(time.monotonic())
        if progress.done >= 25_000 and not seen_in_time:
            seen_in_time.append(live.seen_probe.wait(3 if held_back else 30))

    running_live = Background(lambda: live_worker.run(live, handle_signals=False)).start()
    try:
        started = time.monotonic()
        final = rebuild(
            engine,
            InsertOnce(),
            store=store,
            batch_size=500,
            on_progress=on_progress,
            atomic=atomic,
        )
        took = time.monotonic() - started
        assert live.seen_probe.wait(30), "the live projection never saw the probe"
    finally:
        live_worker.stop()
        running_live.join(30)
    assert running_live.error is None, running_live.error
    assert final.handled == REBUILT_EVENTS
    assert rows(engine, "insert_once") == list(range(1, REBUILT_EVENTS + 1))
    latency = live.seen_at - appended_at[0]
    if held_back:
        assert seen_in_time == [False]  # held back for the rest of the rebuild
        assert latency > 3
    else:
        assert seen_in_time == [True]
        assert latency < 5, latency
        assert took > latency  # seen while the rebuild ran (the gate held it until then)


# -- killed mid-rebuild ---------------------------------------------------------------------------

KILLED_REBUILD = """
import pathlib, sys, time
import sqlalchemy as sa
import eventsource as es
from eventsource.rebuild import rebuild

url, block_at, marker = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])


class InsertOnce(es.Projection):
    name = "insert_once"

    def handle(self, event, session):
        session.execute(
            sa.text("INSERT INTO rebuilt VALUES (:p, :e, :g)"),
            {"p": self.name, "e": str(event.event_id), "g": event.global_position},
        )
        if event.global_position == block_at:  # a batch open, its events half applied
            marker.write_text("blocked")
            time.sleep(600)

    def reset(self, session):
        session.execute(sa.text("DELETE FROM rebuilt WHERE projection = :p"), {"p": self.name})


engine = es.create_engine(url)
rebuild(engine, InsertOnce(), batch_size=50)
"""

KILLED_EVENTS = 1000
BLOCK_AT = 437  # inside the batch 401..450: checkpoint 400 when killed


@pytest.mark.parametrize("finish", ["workers", "rerun"])
def test_a_rebuild_killed_midway_is_finished_exactly_once(
    rm_engine: sa.Engine, store: es.EventStore, tmp_path: Path, finish: str
) -> None:
    engine = rm_engine
    append_spread(engine, store, KILLED_EVENTS)
    wait_readable(engine)
    processor(engine, store, batch_size=200).run_until_caught_up(InsertOnce())
    assert len(rows(engine, "insert_once")) == KILLED_EVENTS
    script = tmp_path / "killed_rebuild.py"
    script.write_text(textwrap.dedent(KILLED_REBUILD))
    marker = tmp_path / "blocked"
    url = engine.url.render_as_string(hide_password=False)
    process = subprocess.Popen(
        [sys.executable, str(script), url, str(BLOCK_AT), str(marker)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    try:
        wait_until(lambda: marker.exists() or process.poll() is not None, timeout=120)
        assert process.poll() is None, process.communicate()[1].decode()
        assert checkpoint_position(engine) == 400
        if engine.dialect.name == "postgresql":  # the workers step aside meanwhile
            polled = Background(lambda: processor(engine, store).process_batch(InsertOnce()))
            assert polled.start().finished_within(30), "a worker waited for the rebuild"
            assert polled.error is None, polled.error
            assert polled.result.rebuilding
            assert polled.result.global_position == 400
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    # Exactly as consistent as its checkpoint: the open batch left nothing behind.
    assert rows(engine, "insert_once") == list(range(1, 401))
    found = checkpoint(engine, "insert_once")
    assert found is not None
    assert (found.global_position, found.events_handled) == (400, 400)

    wait_readable(engine)
    if finish == "workers":
        # On PostgreSQL the rebuild's lock died with its connection: they go ahead.
        assert processor(engine, store, batch_size=100).run_until_caught_up(InsertOnce()) == 600
    else:
        final = rebuild(engine, InsertOnce(), store=store, batch_size=100)
        assert (final.done, final.handled) == (KILLED_EVENTS, KILLED_EVENTS)
    assert rows(engine, "insert_once") == positions(engine)
    assert len(rows(engine, "insert_once")) == KILLED_EVENTS
    found = checkpoint(engine, "insert_once")
    assert found is not None
    assert (found.global_position, found.events_handled) == (KILLED_EVENTS, KILLED_EVENTS)


def checkpoint_position(engine: sa.Engine) -> int:
    found = checkpoint(engine, "insert_once")
    return 0 if found is None else found.global_position
