"""SIGINT/SIGTERM: a runner in its own process finishes the batch in hand and exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

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


def logged_positions(engine: sa.Engine) -> list[int]:
    with reader(engine).connect() as conn:
        rows = conn.execute(
            sa.text("SELECT global_position FROM graceful_log ORDER BY global_position")
        ).scalars()
        return [int(p) for p in rows]


def interrupt_mid_stream(
    engine: sa.Engine, store: es.EventStore, url: sa.URL, cwd: Path, signum: signal.Signals
) -> None:
    """Start the runner script, signal it once it is mid-stream, check the aftermath."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE graceful_log (global_position BIGINT PRIMARY KEY)")
    stored = append_spread(engine, store, 300)  # 6 s of work at 20 ms an event
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), url.render_as_string(hide_password=False), "0.02"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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


def test_a_second_sigint_stops_at_once_and_the_batch_in_hand_rolls_back(
    engine: sa.Engine, store: es.EventStore, db_url: sa.URL, tmp_path: Path
) -> None:
    """A handler stuck in a long batch: the first Ctrl+C waits, the second one does not."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE graceful_log (global_position BIGINT PRIMARY KEY)")
    append_spread(engine, store, 30)
    process = subprocess.Popen(  # 10 s per event: the first batch would take 100 s
        [sys.executable, str(SCRIPT), db_url.render_as_string(hide_password=False), "10"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
