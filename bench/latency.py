"""Latency from commit to handler, and what an idle worker costs: polling against wake-ups.

A worker on its default settings polls every ``poll_interval`` (100 ms), so an event
committed at a random moment waits half an interval on average before a projection
sees it. This measures, on PostgreSQL, per mode:

  - ``poll``: ``ProcessorConfig(wake_ups=False)``, the processors only poll (the
    behaviour before wake-ups; with an eventsource whose ``ProcessorConfig`` has no
    ``wake_ups`` field, its plain default, which is that);
  - ``wake``: ``ProcessorConfig(wake_ups=True)``, the default settings with wake-ups
    (LISTEN/NOTIFY). Needs a ``ProcessorConfig`` with that field; the script says so and
    exits otherwise. Where ``EventStore`` takes ``notify=``, the stores are made with
    ``notify=True`` here and ``notify=False`` in ``poll`` mode (else it is left out).

For each mode a fresh worker process (``bench/_latency_worker.py``) runs one
``eventsource.Runner`` with ``--projections`` projections (default 4), each on its own
processor with otherwise default ``ProcessorConfig()``, as ``eventsource run`` would.
Each projection's ``handle`` reads the clock first and inserts (global_position,
projection, handled at) into a read-model table. Once the worker is ready and has
handled ``--warmup`` events (not measured), the writer in this process appends
``--events`` single-event transactions (default 300) ``--interval`` ms apart (default
20; paced against a fixed schedule), each ``EventStore.append`` in a Session of its
own, and reads the clock right after ``commit()`` returns. When every projection has
handled every event (or ``--timeout`` has passed: an error), the latency of each
(event, projection) is handled at minus committed at. The clock is
``time.monotonic()``, which on Linux (and macOS, Windows) is one clock for every
process of the machine; the worker's first message checks that, and the script falls
back to ``time.time()`` (wall clock, which may step) where the two processes disagree.
A handler may start before ``commit()`` has returned in the writer (the server
committed, the reply is still on its way): such latencies are negative, kept so and
counted in the ``< 0`` column.

Then the idle cost. ``--settle`` seconds after the last event was handled (default 5,
so that a poller that backs off when idle is measured in its steady state), the worker
zeroes its counters and ``--idle-seconds`` later (default 10) reports what its engine
did meanwhile: statements (a ``before_cursor_execute`` listener) and transactions
(``commit`` and ``rollback`` events) per second, and the worker process's CPU time
(``time.process_time()``: all its threads). On a local server the CPU time of the
worker's PostgreSQL backends (from /proc, found by ``application_name``) is shown too.
The same counters cover the writes themselves (from the first measured append until
everything was handled), printed per event appended.

With ``--mode both`` (the default) the modes alternate, ``--rounds`` times (default 2),
the order reversed every other round (poll, wake, wake, poll), so drift on a shared
machine hits both; latencies are pooled over the rounds of a mode, idle figures are
medians over rounds, and the ratios poll / wake are printed (of the pooled figures, and
within each round). ``wake`` rows are checked against the issue's target for default
settings on an idle machine: p50 < 3 ms, p99 < 10 ms, and fewer idle statements than
polling (``--check``: exit 1 when one is missed).

It creates a throwaway database beside the admin URL (``--url`` /
``EVENTSOURCE_BENCH_PG_URL``, default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``), migrates it with
``eventsource.upgrade`` and drops it at the end, also on error, Ctrl+C or SIGTERM; the
worker process is stopped then too (and stops by itself when this process vanishes).
Run it against another checkout (``PYTHONPATH=/path/to/checkout python
bench/latency.py``) to compare versions.

About 1.5 minutes with the defaults (4 worker runs of about 22 s each).

Usage::

    python bench/latency.py                    # poll and wake, 2 rounds, 300 events each
    python bench/latency.py --mode poll        # the polling worker alone
    python bench/latency.py --quick            # smoke run: --events 50 --idle-seconds 3 ...
    python bench/latency.py --projections 8 --events 1000 --interval 5
    python bench/latency.py --check            # exit 1 when wake misses a target
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.orm import Session

import eventsource
from eventsource import Event, EventStore, ExpectedVersion, ProcessorConfig

# isort: split
# bench/ is this script's directory, so first on sys.path: the benchmarks' shared helpers.
from _common import (
    add_url_argument,
    exit_on_sigterm,
    print_table,
    psycopg_conninfo,
    server_settings,
    throwaway_database,
)
from _latency_worker import read_model_table

WORKER_SCRIPT = Path(__file__).resolve().with_name("_latency_worker.py")
READ_MODEL = "bench_latency_handled"
APP_PREFIX = "es_bench_latency"
BOUNDED_CONTEXT = "bench"
MODES = ("poll", "wake")
#: The issue's target for ``wake`` on default settings, idle machine (milliseconds).
TARGET_P50_MS = 3.0
TARGET_P99_MS = 10.0
#: How far apart the two processes' (wall - monotonic) may be for one monotonic clock.
CLOCK_TOLERANCE = 0.005
#: How often the parent looks whether everything was handled.
WAIT_POLL = 0.01
SERVER_SETTINGS = ("server_version", "fsync", "synchronous_commit")

QUICK = {"events": 50, "idle_seconds": 3.0, "settle": 2.0, "rounds": 1}
DEFAULTS = {"events": 300, "idle_seconds": 10.0, "settle": 5.0, "rounds": 2}


def has_wake_ups() -> bool:
    return "wake_ups" in {f.name for f in dataclasses.fields(ProcessorConfig)}


def has_notify() -> bool:
    return "notify" in inspect.signature(EventStore.__init__).parameters


def mode_settings(mode: str) -> tuple[bool | None, bool | None]:
    """(``wake_ups``, ``notify``) for a mode; None where this eventsource has no such knob."""
    wake = mode == "wake"
    return (wake if has_wake_ups() else None, wake if has_notify() else None)


def describe_settings(mode: str) -> str:
    wake_ups, notify = mode_settings(mode)
    parts = ["default ProcessorConfig()" if wake_ups is None else f"wake_ups={wake_ups}"]
    if notify is not None:
        parts.append(f"notify={notify}")
    return ", ".join(parts)


# -- the worker process -----------------------------------------------------------------


class Worker:
    """``bench/_latency_worker.py`` in a process (and session) of its own, over pipes."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            # Ctrl+C in the terminal reaches this process only; it stops the worker.
            start_new_session=True,
        )
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, name="worker-reader", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.messages.put(json.loads(line))
            except ValueError:
                print(f"worker: {line.rstrip()}", file=sys.stderr)
        self.messages.put(None)

    def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        """The worker's next message of ``kind``; an error if it exits or says nothing."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"the worker sent no {kind!r} within {timeout:g} s") from None
            if message is None:
                raise RuntimeError(
                    f"the worker exited with code {self.proc.wait()} (waiting for {kind!r}; "
                    "its log is above)"
                )
            if message.get("event") == "error":
                raise RuntimeError(f"worker: {message.get('message')}")
            if message.get("event") == kind:
                return message

    def request(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.expect(command, timeout)

    def check(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise RuntimeError(f"the worker exited with code {code} (its log is above)")

    def stop(self, timeout: float = 30.0) -> None:
        """``stop`` (batches in hand commit); SIGTERM, then SIGKILL, if it takes too long."""
        stdin = self.proc.stdin
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                if stdin is not None:
                    stdin.write("stop\n")
                    stdin.close()  # end of input stops it as well
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"the worker ignored stop for {timeout:g} s: SIGTERM", file=sys.stderr)
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        elif stdin is not None:
            with contextlib.suppress(OSError):
                stdin.close()


# -- CPU of the worker's PostgreSQL backends (best effort: local server, Linux) -------------


def backend_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a local PostgreSQL backend, or None (not local, gone, not Linux)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            if not f.read().startswith("postgres"):
                return None  # another pid namespace: not the server's process
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backends_cpu(pids: Sequence[int]) -> dict[int, float]:
    times = {pid: backend_cpu_seconds(pid) for pid in pids}
    return {pid: t for pid, t in times.items() if t is not None}


# -- one round ----------------------------------------------------------------------------


@dataclass
class Round:
    """One worker run in one mode."""

    index: int
    mode: str
    clock: str = "monotonic"
    latencies: list[float] = field(default_factory=list)
    """Seconds, one per (event, projection)."""
    append_seconds: list[float] = field(default_factory=list)
    """Per append: from before ``append`` to after ``commit()``."""
    write_span: float = 0.0
    active: dict[str, Any] = field(default_factory=dict)
    idle: dict[str, Any] = field(default_factory=dict)
    backend_cpu: float | None = None
    """Seconds of CPU of the worker's backends over the idle window, or None."""

    def idle_rate(self, key: str) -> float:
        return float(self.idle[key]) / float(self.idle["seconds"])

    def idle_transactions(self) -> float:
        return (float(self.idle["commits"]) + float(self.idle["rollbacks"])) / float(
            self.idle["seconds"]
        )


@dataclass
class Bench:
    args: argparse.Namespace
    url: sa.URL
    engine: sa.Engine
    admin: psycopg.Connection[Any]
    worker: Worker | None = None

    def table(self) -> sql.Identifier:
        return sql.Identifier(READ_MODEL)

    def spec(self, mode: str, application_name: str) -> dict[str, Any]:
        wake_ups, notify = mode_settings(mode)
        return {
            "url": self.url.render_as_string(hide_password=False),
            "read_model": READ_MODEL,
            "projections": [f"latency_{i}" for i in range(self.args.projections)],
            "application_name": application_name,
            "wake_ups": wake_ups,
            "notify": notify,
            "verbose": self.args.verbose,
        }

    def write(
        self, store: EventStore, count: int, tag: str, round_: Round | None
    ) -> dict[int, tuple[float, float]]:
        """``count`` single-event transactions ``--interval`` apart: position -> commit times."""
        interval = self.args.interval / 1000
        committed: dict[int, tuple[float, float]] = {}
        start = time.monotonic()
        for i in range(count):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            event = Event(
                bounded_context=BOUNDED_CONTEXT,
                aggregate_type="Order",
                aggregate_id=f"{tag}-{i}",
                event_type="OrderPlaced",
                payload={"seq": i, "tag": tag},
            )
            with Session(self.engine) as session:
                began = time.monotonic()
                result = store.append(session, [event], ExpectedVersion.no_stream())
                session.commit()
                monotonic = time.monotonic()
                wall = time.time()
            committed[result.global_positions[0]] = (monotonic, wall)
            if round_ is not None:
                round_.append_seconds.append(monotonic - began)
        if round_ is not None:
            round_.write_span = time.monotonic() - start
        return committed

    def handled(self, first: int, last: int) -> int:
        row = self.admin.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE global_position BETWEEN %s AND %s").format(
                self.table()
            ),
            (first, last),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def wait_handled(self, positions: Sequence[int], worker: Worker) -> None:
        """Until every projection has a row for every position (or ``--timeout``)."""
        first, last = min(positions), max(positions)
        expected = len(positions) * self.args.projections
        deadline = time.monotonic() + self.args.timeout
        while self.handled(first, last) < expected:
            worker.check()
            if time.monotonic() > deadline:
                rows = self.admin.execute(
                    sql.SQL(
                        "SELECT projection, count(*) FROM {} WHERE global_position "
                        "BETWEEN %s AND %s GROUP BY 1 ORDER BY 1"
                    ).format(self.table()),
                    (first, last),
                ).fetchall()
                counts = ", ".join(f"{name}: {n}" for name, n in rows) or "none"
                raise RuntimeError(
                    f"not every projection handled the {len(positions)} events of positions "
                    f"{first}..{last} within {self.args.timeout:g} s (handled: {counts})"
                )
            time.sleep(WAIT_POLL)

    def backend_pids(self, application_name: str) -> list[int]:
        return [
            int(row[0])
            for row in self.admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                "AND datname = current_database()",
                (application_name,),
            )
        ]

    def run_round(self, index: int, mode: str) -> Round:
        args = self.args
        result = Round(index, mode)
        application_name = f"{APP_PREFIX}_{mode}_r{index}"
        _, notify = mode_settings(mode)
        store_args: dict[str, Any] = {} if notify is None else {"notify": notify}
        store = EventStore(**store_args)  # the writer's: notifies as the worker's would
        self.worker = worker = Worker(self.spec(mode, application_name))
        try:
            ready = worker.expect("ready", timeout=120)
            offset_here = time.time() - time.monotonic()
            offset_there = float(ready["wall"]) - float(ready["monotonic"])
            if abs(offset_here - offset_there) > CLOCK_TOLERANCE:
                result.clock = "wall"
                print(
                    "time.monotonic() differs between the processes "
                    f"({(offset_here - offset_there) * 1000:+.1f} ms): using time.time()",
                    file=sys.stderr,
                )
            if args.verbose:
                print(f"worker {ready['pid']}: {ready['config']}", file=sys.stderr)
            tag = f"{mode}-r{index}"
            if args.warmup:
                self.wait_handled(
                    list(self.write(store, args.warmup, f"{tag}-warmup", None)), worker
                )

            worker.request("reset")
            committed = self.write(store, args.events, tag, result)
            positions = sorted(committed)
            self.wait_handled(positions, worker)
            result.active = worker.request("report")

            rows = self.admin.execute(
                sql.SQL(
                    "SELECT global_position, handled_monotonic, handled_wall FROM {} "
                    "WHERE global_position BETWEEN %s AND %s"
                ).format(self.table()),
                (positions[0], positions[-1]),
            ).fetchall()
            column = 0 if result.clock == "monotonic" else 1
            for position, monotonic, wall in rows:
                handled_at = monotonic if column == 0 else wall
                result.latencies.append(float(handled_at) - committed[int(position)][column])

            time.sleep(args.settle)
            pids = self.backend_pids(application_name)
            before = backends_cpu(pids)
            worker.request("reset")
            time.sleep(args.idle_seconds)
            result.idle = worker.request("report")
            after = backends_cpu(pids)
            if before and before.keys() == after.keys():
                result.backend_cpu = sum(after.values()) - sum(before.values())
        finally:
            worker.stop()
            self.worker = None
        if worker.proc.returncode != 0:
            raise RuntimeError(f"the worker exited with code {worker.proc.returncode} on stop")
        return result


# -- report -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 else "-"


def order(modes: Sequence[str], r: int) -> list[str]:
    """The modes of round ``r``: reversed every other round (ABBA), so neither always leads."""
    return list(modes) if r % 2 == 0 else list(reversed(modes))


def report(args: argparse.Namespace, modes: Sequence[str], rounds: list[Round]) -> bool:
    """Print the figures; False when ``wake`` misses one of the issue's targets."""
    by_mode = {m: [r for r in rounds if r.mode == m] for m in modes}
    pooled = {m: [x for r in by_mode[m] for x in r.latencies] for m in modes}
    clocks = {r.clock for r in rounds}
    clock = (
        "time.monotonic(), one clock for both processes"
        if clocks == {"monotonic"}
        else "time.time() (wall clock) in some rounds"
    )
    print(
        f"\nlatency from commit() returning in the writer to the start of handle() in the "
        f"worker: {args.events:,} single-event transactions {args.interval:g} ms apart per "
        f"round, {args.projections} projections in one Runner, {args.rounds} round(s) per "
        f"mode; ms, pooled over rounds (clock: {clock})"
    )
    rows = []
    for m in modes:
        values = pooled[m]
        rows.append(
            [
                m,
                describe_settings(m),
                f"{len(values):,}",
                ms(percentile(values, 0.5)),
                ms(percentile(values, 0.9)),
                ms(percentile(values, 0.99)),
                ms(max(values)),
                ms(min(values)),
                f"{sum(1 for v in values if v < 0):,}",
            ]
        )
    print_table(
        ["mode", "settings", "samples", "p50", "p90", "p99", "max", "min", "< 0"],
        rows,
        "<<>>>>>>>",
    )
    rows = []
    for m in modes:
        appends = [x for r in by_mode[m] for x in r.append_seconds]
        spans = [r.write_span for r in by_mode[m]]
        rows.append(
            [
                m,
                ms(statistics.median(appends)),
                ms(percentile(appends, 0.99)),
                f"{statistics.median(spans):.2f}",
            ]
        )
    print()
    print_table(["mode", "append+commit p50", "p99", "write span s"], rows, "<>>>")
    print(
        "the writer's own time per transaction (ms), and how long the writes took "
        f"(median over rounds; the schedule: {(args.events - 1) * args.interval / 1000:.2f} s)"
    )

    ok = True
    if "poll" in modes and "wake" in modes:
        print()
        rows = []
        for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
            per_round = []
            for index in range(args.rounds):
                pair = {r.mode: r for r in rounds if r.index == index}
                per_round.append(
                    ratio(
                        percentile(pair["poll"].latencies, q), percentile(pair["wake"].latencies, q)
                    )
                )
            rows.append(
                [
                    label,
                    ratio(percentile(pooled["poll"], q), percentile(pooled["wake"], q)),
                    ", ".join(per_round),
                ]
            )
        print_table(["latency", "poll / wake", "per round"], rows, "<><")

    if "wake" in modes:
        wake = pooled["wake"]
        checks = [
            ("p50 < 3 ms", percentile(wake, 0.5) * 1000, TARGET_P50_MS),
            ("p99 < 10 ms", percentile(wake, 0.99) * 1000, TARGET_P99_MS),
        ]
        rows = []
        for label, value, target in checks:
            passed = value < target
            ok = ok and passed
            rows.append([label, f"{value:.2f}", "PASS" if passed else "MISS"])
        print()
        print_table(["wake: issue's target", "ms", "result"], rows, "<>>")

    print()
    rows = []
    idle_statements: dict[str, float] = {}
    for m in modes:
        rs = by_mode[m]
        idle_statements[m] = statistics.median(r.idle_rate("statements") for r in rs)
        cpu = statistics.median(r.idle_rate("cpu_seconds") for r in rs)
        backend = [
            r.backend_cpu / float(r.idle["seconds"]) for r in rs if r.backend_cpu is not None
        ]
        rows.append(
            [
                m,
                f"{idle_statements[m]:.1f}",
                f"{statistics.median(r.idle_transactions() for r in rs):.1f}",
                f"{cpu * 100:.2f}",
                f"{statistics.median(backend) * 100:.2f}" if backend else "-",
            ]
        )
    print_table(
        ["idle worker", "statements/s", "transactions/s", "worker CPU %", "backends CPU %"],
        rows,
        "<>>>>",
    )
    print(
        f"over {args.idle_seconds:g} s starting {args.settle:g} s after the last event was "
        "handled, medians over rounds; statements and transactions: the worker's engine; "
        "CPU: % of one core (backends: the worker's PostgreSQL backends, local server only)"
    )
    if "poll" in modes and "wake" in modes:
        poll_s, wake_s = idle_statements["poll"], idle_statements["wake"]
        fewer = wake_s < poll_s
        ok = ok and fewer
        print(
            f"idle statements/s poll / wake: {ratio(poll_s, wake_s) if wake_s else 'inf'} "
            f"({'PASS' if fewer else 'MISS'}: the issue wants fewer idle queries with wake-ups)"
        )

    print()
    rows = []
    for m in modes:
        rs = by_mode[m]
        per_event = [float(r.active["statements"]) / args.events for r in rs]
        tx = [(float(r.active["commits"]) + float(r.active["rollbacks"])) / args.events for r in rs]
        cpu_per_event = [float(r.active["cpu_seconds"]) / args.events for r in rs]
        rows.append(
            [
                m,
                f"{statistics.median(per_event):.1f}",
                f"{statistics.median(tx):.1f}",
                ms(statistics.median(cpu_per_event)),
            ]
        )
    print_table(
        ["during the writes", "statements/event", "transactions/event", "worker CPU ms/event"],
        rows,
        "<>>>",
    )
    print(
        f"from the first measured append until every projection handled the last one, per "
        f"event appended (all {args.projections} projections together), medians over rounds"
    )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return ok


# -- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_url_argument(parser)
    parser.add_argument(
        "--mode",
        choices=("poll", "wake", "both"),
        default="both",
        help="poll: ProcessorConfig(wake_ups=False); wake: wake_ups=True (default settings); "
        "both (default): alternate them in one run",
    )
    parser.add_argument("--projections", type=int, default=4, help="projections in the worker")
    parser.add_argument(
        "--events", type=int, default=None, help="measured single-event transactions per round"
    )
    parser.add_argument(
        "--interval", type=float, default=20.0, help="ms between appends (default 20)"
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=None, help="idle window (default 10 s)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help="seconds from the last event handled to the idle window (default 5)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per mode (default 2)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="events handled before measuring (default 5)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds the projections have to handle every event after the last append",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --events 50 --idle-seconds 3 --settle 2 --rounds 1 (explicit ones win)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when wake misses one of the issue's targets"
    )
    parser.add_argument("--verbose", action="store_true", help="the worker logs at INFO")
    args = parser.parse_args()
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.projections, args.events, args.rounds) < 1 or args.warmup < 0:
        parser.error("--projections, --events and --rounds must be >= 1, --warmup >= 0")
    if args.interval < 0 or args.idle_seconds <= 0 or args.settle < 0 or args.timeout <= 0:
        parser.error("--interval, --settle must be >= 0; --idle-seconds, --timeout > 0")
    modes = MODES if args.mode == "both" else (args.mode,)
    if "wake" in modes and not has_wake_ups():
        parser.error(
            f"--mode {args.mode} needs ProcessorConfig(wake_ups=...), which the eventsource "
            f"imported from {Path(eventsource.__file__).parent} does not have (yet): run "
            "--mode poll to measure polling alone"
        )
    signal.signal(signal.SIGTERM, exit_on_sigterm)

    rounds: list[Round] = []
    with throwaway_database(sa.make_url(args.url), f"{APP_PREFIX}_") as url:
        conninfo = psycopg_conninfo(url.set(drivername="postgresql"))
        settings = server_settings(conninfo, SERVER_SETTINGS)
        engine = eventsource.create_engine(url, application_name=f"{APP_PREFIX}_writer")
        try:
            eventsource.upgrade(engine)
            read_model_table(READ_MODEL).create(engine)
            with psycopg.connect(conninfo, autocommit=True) as admin:
                bench = Bench(args, url, engine, admin)
                try:
                    for r in range(args.rounds):
                        for mode in order(modes, r):
                            result = bench.run_round(r, mode)
                            rounds.append(result)
                            print(
                                f"round {r + 1}/{args.rounds} {mode}: p50 "
                                f"{ms(percentile(result.latencies, 0.5))} ms, p99 "
                                f"{ms(percentile(result.latencies, 0.99))} ms, max "
                                f"{ms(max(result.latencies))} ms; idle "
                                f"{result.idle_rate('statements'):.1f} statements/s, worker "
                                f"CPU {result.idle_rate('cpu_seconds') * 100:.2f}%",
                                file=sys.stderr,
                            )
                finally:
                    if bench.worker is not None:
                        bench.worker.stop(timeout=10)
        finally:
            engine.dispose()
    print(
        f"\nPostgreSQL {settings.get('server_version', '?')} (fsync={settings.get('fsync', '?')}, "
        f"synchronous_commit={settings.get('synchronous_commit', '?')}), {os.cpu_count()} CPUs; "
        f"default poll_interval {ProcessorConfig().poll_interval:g} s; wake_ups "
        f"{'available' if has_wake_ups() else 'not in this ProcessorConfig'}, EventStore "
        f"notify= {'available' if has_notify() else 'not available'}"
    )
    ok = report(args, modes, rounds)
    if args.check and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
