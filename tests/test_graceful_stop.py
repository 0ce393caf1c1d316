"""SIGINT/SIGTERM: a runner, or a bare processor, in its own process finishes the batch
in hand and exits 0; a second signal stops at once and the batch in hand rolls back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import sqlalchemy as sa

import eventsource as es
from tests.projection_support import (
    append_spread,
    checkpoint,
    checkpoint_position,
    head,
    reader,
    wait_until,
)

SCRIPT = Path(__file__).parent / "scripts" / "graceful_runner.py"

#: The same projection as graceful_runner.py, under a bare ``Processor.run`` (no Runner).
PROCESSOR_SCRIPT = """\
import sys
import time

import sqlalchemy as sa

import eventsource as es


class GracefulLog(es.Projection):
    name = "graceful_log"

    def handle(self, event, session):
        print(f"handling {event.global_position}", flush=True)
        time.sleep(float(sys.argv[2]))
        session.execute(
            sa.text("INSERT INTO graceful_log (global_position) VALUES (:p)"),
            {"p": event.global_position},
        )


engine = es.create_engine(sys.argv[1])
config = es.ProcessorConfig(batch_size=10, poll_interval=0.05)
es.Processor(engine, es.EventStore(), config).run(GracefulLog())  # until SIGINT/SIGTERM
engine.dispose()
print("stopped cleanly", flush=True)
"""


def start(script: Path, url: sa.URL, delay: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), url.render_as_string(hide_password=False), delay],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def script_for(kind: str, tmp_path: Path) -> Path:
    if kind == "runner":
        return SCRIPT
    path = tmp_path / "graceful_processor.py"
    path.write_text(PROCESSOR_SCRIPT)
    return path


def logged_positions(engine: sa.Engine) -> list[int]:
    with reader(engine).connect() as conn:
        rows = conn.execute(
            sa.text("SELECT global_position FROM graceful_log ORDER BY global_position")
        ).scalars()
        return [int(p) for p in rows]


def interrupt_mid_stream(
    engine: sa.Engine,
    store: es.EventStore,
    url: sa.URL,
    cwd: Path,
    signum: signal.Signals,
    kind: str = "runner",
) -> None:
    """Start the script, signal it once it is mid-stream, check the aftermath."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE graceful_log (global_position BIGINT PRIMARY KEY)")
    stored = append_spread(engine, store, 300)  # 6 s of work at 20 ms an event
    process = start(script_for(kind, cwd), url, "0.02", cwd)
    try:
        # Mid-stream: the checkpoint has moved, the stream is far from done.
        wait_until(
            lambda: checkpoint_position(engine, "graceful_log") > 0 or process.poll() is not None,
            timeout=30,
        )
        assert process.poll() is None, process.communicate()
        process.send_signal(signum)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "stopped cleanly" in out
    assert "Traceback" not in err, err

    found = checkpoint(engine, "graceful_log")
    assert found is not None
    positions = logged_positions(engine)
    # What the checkpoint says is exactly what the read model holds.
    assert positions == [
        e.global_position for e in stored if e.global_position <= found.global_position
    ]
    assert found.global_position == max(positions)
    assert found.events_handled == len(positions)
    assert found.global_position < head(engine)  # stopped, not finished


def test_sigint_stops_the_runner_after_the_batch_in_hand(
    engine: sa.Engine, store: es.EventStore, db_url: sa.URL, tmp_path: Path
) -> None:
    interrupt_mid_stream(engine, store, db_url, tmp_path, signal.SIGINT)


@pytest.mark.postgres
def test_sigterm_stops_the_runner_the_same_way(
    pg_engine: sa.Engine, store: es.EventStore, pg_url: sa.URL, tmp_path: Path
) -> None:
    interrupt_mid_stream(pg_engine, store, pg_url, tmp_path, signal.SIGTERM)


def test_sigint_stops_a_bare_processor_after_the_batch_in_hand(
    engine: sa.Engine, store: es.EventStore, db_url: sa.URL, tmp_path: Path
) -> None:
    """``processor.run(projection)`` without a Runner: Ctrl+C is a clean stop too."""
    interrupt_mid_stream(engine, store, db_url, tmp_path, signal.SIGINT, kind="processor")


@pytest.mark.postgres
def test_sigterm_stops_a_bare_processor_the_same_way(
    pg_engine: sa.Engine, store: es.EventStore, pg_url: sa.URL, tmp_path: Path
) -> None:
    interrupt_mid_stream(pg_engine, store, pg_url, tmp_path, signal.SIGTERM, kind="processor")


@pytest.mark.parametrize("kind", ["runner", "processor"])
def test_a_second_sigint_stops_at_once_and_the_batch_in_hand_rolls_back(
    engine: sa.Engine, store: es.EventStore, db_url: sa.URL, tmp_path: Path, kind: str
) -> None:
    """A handler stuck in a long batch: the first Ctrl+C waits, the second one does not."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE graceful_log (global_position BIGINT PRIMARY KEY)")
    append_spread(engine, store, 30)
    # 10 s per event: the first batch would take 100 s.
    process = start(script_for(kind, tmp_path), db_url, "10", tmp_path)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # the handler announces its first event
        assert first.startswith("handling"), (first, process.communicate())
        process.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=1)  # still finishing the batch in hand
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode != 0
    assert "stopped cleanly" not in out
    assert "KeyboardInterrupt" in err
    assert logged_positions(engine) == []
    assert checkpoint_position(engine, "graceful_log") == 0


def test_run_restores_the_signal_handlers_it_found(engine: sa.Engine, store: es.EventStore) -> None:
    """In the main thread, run() handles SIGINT (a stop) only while it runs."""

    def mine(_signum: int, _frame: FrameType | None) -> None:
        raise AssertionError("run() should have handled this signal")

    processor = es.Processor(engine, store, es.ProcessorConfig(poll_interval=0.01))
    during: list[Any] = []

    class Watch(es.Projection):
        name = "watch"

        def handle(self, event: es.PersistedEvent, session: Any) -> None:
            pass

    def interrupt() -> None:
        during.append(signal.getsignal(signal.SIGINT))
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C

    def look_then_stop() -> None:
        during.append(signal.getsignal(signal.SIGINT))
        processor.stop()

    previous = signal.signal(signal.SIGINT, mine)
    try:
        timer = threading.Timer(0.3, interrupt)
        timer.start()
        processor.run(Watch())  # returns: no KeyboardInterrupt, no AssertionError
        timer.join()
        assert signal.getsignal(signal.SIGINT) is mine
        assert len(during) == 1
        assert during[0] is not mine  # run() had its own handler in place
        assert not processor.stopping  # the next run() starts afresh
        # handle_signals=False leaves the handler alone while it runs.
        during.clear()
        timer = threading.Timer(0.3, look_then_stop)
        timer.start()
        processor.run(Watch(), handle_signals=False)
        timer.join()
        assert during == [mine]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_run_off_the_main_thread_leaves_signals_alone(
    engine: sa.Engine, store: es.EventStore
) -> None:
    """Only the main thread receives signals; a worker thread's run() must not touch them
    (signal.signal would raise ValueError there)."""
    append_spread(engine, store, 5)
    processor = es.Processor(engine, store, es.ProcessorConfig(poll_interval=0.01))
    failures: list[BaseException] = []

    class Counted(es.Projection):
        name = "counted"

        def handle(self, event: es.PersistedEvent, session: Any) -> None:
            pass

    def work() -> None:
        try:
            processor.run(Counted())
        except BaseException as exc:
            failures.append(exc)

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=work)
    thread.start()
    wait_until(lambda: checkpoint_position(engine, "counted") == head(engine), timeout=30)
    assert signal.getsignal(signal.SIGINT) is before
    processor.stop()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert failures == []
