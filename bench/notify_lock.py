"""What NOTIFY costs concurrent writers: NOTIFY inside the append transaction against
eventsource's hints sent after commit, in one run.

PostgreSQL keeps one notification queue per cluster and appends a transaction's
notifications to it at commit, in commit order. To keep that order it takes a
heavyweight lock on the database (``LockSharedObject(DatabaseRelationId, ...)`` in
``PreCommit_Notify``) before committing and holds it until the transaction has ended,
that is through the commit's WAL flush. So every transaction that issued NOTIFY
commits one at a time: with NOTIFY in the append transaction, concurrent writers
queue behind each other's fsync. eventsource therefore sends nothing inside the
append transaction: the store notes what it wrote, and after the commit a notifier
thread per process sends coalesced hints in short transactions of its own
(``synchronous_commit`` off), see ``eventsource/wakeups.py``. This script measures
both.

Events (transactions) per second with 1 and ``--writers`` (default 4) writer
processes, each committing single-event transactions as fast as it can for
``--seconds`` (default 3) per measurement, in four modes:

  - ``raw``: plain psycopg 3, ``BEGIN; INSERT`` one row into a small table of its own
    ``; COMMIT`` per transaction, no NOTIFY;
  - ``raw+notify-in-tx``: the same with ``SELECT pg_notify(channel, payload)`` before
    ``COMMIT`` (what the issue's prototype did; one more round trip);
  - ``eventsource notify=False``: ``EventStore(notify=False).append`` of one event
    (``ExpectedVersion.exact(v)``, v tracked per aggregate, 100 aggregates per writer
    round robin) in a fresh ``Session`` per transaction;
  - ``eventsource notify=True``: the same with ``EventStore(notify=True)`` (the
    default): each process's notifier thread sends the hints after the commits.

The writer processes (``multiprocessing``, ``spawn``) live for the whole run, with
their connections open, and start each measurement together at a common moment. A
thread of this process LISTENs on both channels (the raw one and the store's
``eventsource.events``) for the whole run and drains the queue, as workers would in
production; the notifications it received are counted per measurement (after the
last one has arrived). Another thread samples ``pg_stat_activity`` every 25 ms and
counts the writers' backends waiting on the notification lock (wait event ``Lock:
object``) and on the WAL (``IO`` or ``LWLock`` wait events named ``WAL...``): the
mean number per sample is printed beside each rate.

The machine is shared and noisy, so the measurements are interleaved: each round runs
every mode with 1 writer, then with ``--writers`` writers, the order of the modes
rotated every round; figures are medians over rounds. The ratios ``raw+notify-in-tx /
raw`` and ``notify=True / notify=False`` are taken of the medians and within each
round (back-to-back runs, median and range), and the scaling from 1 to ``--writers``
writers is printed per mode: where NOTIFY serialises the commits, it stays near 1.

It creates a throwaway database beside the admin URL (``--url`` /
``EVENTSOURCE_BENCH_PG_URL``, default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``), migrates it with
``eventsource.upgrade`` and drops it at the end, also on error, Ctrl+C or SIGTERM; the
writer processes are stopped then too (and stop by themselves when this process
vanishes). No transaction is left open between measurements.

About 2.5 minutes with the defaults (5 rounds of 8 measurements of 3 s); ``--quick``
(1 round of 1 s measurements) about 20 s.

Usage::

    python bench/notify_lock.py                 # 1 and 4 writers, 5 rounds x 3 s
    python bench/notify_lock.py --writers 8 --rounds 3
    python bench/notify_lock.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import queue
import signal
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.queues import Queue
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql
from psycopg.types.json import Jsonb
from sqlalchemy.orm import Session

import eventsource
from eventsource import Event, EventStore, ExpectedVersion
from eventsource.wakeups import channel_for

# isort: split
# bench/ is this script's directory, so first on sys.path: the benchmarks' shared helpers.
from _common import (
    add_url_argument,
    exit_on_sigterm,
    fmt_rate,
    print_setup,
    print_table,
    psycopg_conninfo,
    server_settings,
    throwaway_database,
)

APP_PREFIX = "es_bench_notify"
RAW_TABLE = "bench_notify_rows"
RAW_CHANNEL = "bench_notify_lock"
BOUNDED_CONTEXT = "bench"
AGGREGATE_TYPE = "Order"
EVENT_TYPE = "OrderPlaced"
#: Aggregates per writer and eventsource mode, appended to round robin.
AGGREGATES = 100

MODES = ("raw", "raw+notify-in-tx", "eventsource notify=False", "eventsource notify=True")
#: The ratios printed: (numerator, denominator) modes.
RATIOS = (("raw+notify-in-tx", "raw"), ("eventsource notify=True", "eventsource notify=False"))

#: The server settings printed in the report's header.
SERVER_SETTINGS = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "wal_sync_method",
    "commit_delay",
)
#: How often the sampler reads pg_stat_activity.
SAMPLE_INTERVAL = 0.025
#: A measurement's notifications have all arrived once the listener heard nothing
#: for this long (at most DRAIN_TIMEOUT after the measurement).
DRAIN_QUIET = 0.3
DRAIN_TIMEOUT = 15.0
#: The writers start a measurement together, this long after it was sent to them.
START_DELAY = 0.15

QUICK = {"seconds": 1.0, "rounds": 1, "warmup": 20}
DEFAULTS = {"seconds": 3.0, "rounds": 5, "warmup": AGGREGATES}


# -- the writer processes ---------------------------------------------------------------


@dataclass(frozen=True)
class WriterSpec:
    """What a writer process needs (pickled to it by ``spawn``)."""

    index: int
    url: str
    conninfo: str
    application_name: str


class RawWriter:
    """One-row INSERT per transaction on a psycopg connection, optionally with NOTIFY."""

    def __init__(self, conn: psycopg.Connection[Any], writer: int, notify: bool) -> None:
        self.conn = conn
        self.writer = writer
        self.notify = notify
        self.seq = 0
        self.insert = sql.SQL("INSERT INTO {} (writer, seq, payload) VALUES (%s, %s, %s)").format(
            sql.Identifier(RAW_TABLE)
        )

    def __call__(self) -> None:
        self.seq += 1
        payload = {"writer": self.writer, "seq": self.seq, "note": "notify lock bench"}
        conn = self.conn
        try:
            with conn.cursor() as cur:  # autocommit off: psycopg sends BEGIN first
                cur.execute(self.insert, (self.writer, self.seq, Jsonb(payload)))
                if self.notify:
                    # About the size of a store hint's payload.
                    hint = json.dumps(
                        {"w": self.writer, "s": self.seq, "a": [[BOUNDED_CONTEXT, AGGREGATE_TYPE]]}
                    )
                    cur.execute("SELECT pg_notify(%s, %s)", (RAW_CHANNEL, hint))
            conn.commit()
        except BaseException:
            conn.rollback()
            raise


class StoreWriter:
    """``EventStore.append`` of one event in a Session of its own per transaction."""

    def __init__(self, engine: sa.Engine, store: EventStore, code: str, writer: int) -> None:
        self.engine = engine
        self.store = store
        self.ids = [f"{code}-{writer}-{i:04d}" for i in range(AGGREGATES)]
        self.versions = [0] * AGGREGATES
        self.next_index = 0
        self.seq = 0

    def __call__(self) -> None:
        index = self.next_index
        self.next_index = (index + 1) % AGGREGATES
        self.seq += 1
        event = Event(
            bounded_context=BOUNDED_CONTEXT,
            aggregate_type=AGGREGATE_TYPE,
            aggregate_id=self.ids[index],
            event_type=EVENT_TYPE,
            payload={"seq": self.seq, "note": "notify lock bench"},
        )
        with Session(self.engine) as session, session.begin():
            result = self.store.append(
                session, [event], ExpectedVersion.exact(self.versions[index])
            )
        self.versions[index] = result.to_version


@dataclass(frozen=True)
class Command:
    """Run ``mode``: ``count`` transactions (warm-up), or from ``start`` (``time.time()``)
    for ``seconds``."""

    mode: str
    start: float
    seconds: float | None = None
    count: int | None = None


def writer_main(spec: WriterSpec, commands: Queue[Command | None], results: Queue[Any]) -> None:
    """A writer process: its connections stay open; runs the commands it is sent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the parent's to handle
    parent = os.getppid()
    engine = eventsource.create_engine(spec.url, application_name=spec.application_name)
    raw = psycopg.connect(spec.conninfo, autocommit=False, application_name=spec.application_name)
    try:
        writers: dict[str, Callable[[], None]] = {
            "raw": RawWriter(raw, spec.index, notify=False),
            "raw+notify-in-tx": RawWriter(raw, spec.index, notify=True),
            "eventsource notify=False": StoreWriter(
                engine, EventStore(notify=False), "off", spec.index
            ),
            "eventsource notify=True": StoreWriter(
                engine, EventStore(notify=True), "on", spec.index
            ),
        }
        with engine.connect() as conn:  # fail here, not in a measurement, if unreachable
            conn.execute(sa.text("SELECT 1"))
        results.put(("ready", spec.index))
        while True:
            try:
                command = commands.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:  # the parent vanished (killed)
                    return
                continue
            if command is None:
                return
            tx = writers[command.mode]
            delay = command.start - time.time()
            if delay > 0:
                time.sleep(delay)
            done = 0
            started = time.time()
            if command.count is not None:
                for _ in range(command.count):
                    tx()
                done = command.count
            else:
                assert command.seconds is not None
                deadline = started + command.seconds
                while time.time() < deadline:
                    tx()
                    done += 1
            results.put(("done", spec.index, started, time.time(), done))
    except BaseException:
        results.put(("error", spec.index, traceback.format_exc()))
        raise
    finally:
        with contextlib.suppress(Exception):
            raw.close()
        engine.dispose()


# -- the listener and the sampler (threads of this process) ------------------------------


class Listener(threading.Thread):
    """LISTENs on ``channels`` on a connection of its own and counts what arrives."""

    def __init__(self, conninfo: str, channels: Sequence[str]) -> None:
        super().__init__(name="listener", daemon=True)
        self.conn = psycopg.connect(
            conninfo, autocommit=True, application_name=f"{APP_PREFIX}_listener"
        )
        for channel in channels:
            self.conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        self.received = 0
        self.last_received = time.monotonic()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                for _ in self.conn.notifies(timeout=0.1):
                    self.received += 1
                    self.last_received = time.monotonic()
        except BaseException as exc:
            self.error = exc

    def drained(self, since: float) -> int:
        """The count once nothing arrived for DRAIN_QUIET (and DRAIN_QUIET after ``since``)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            if self.error is not None:
                raise RuntimeError(f"the listener failed: {self.error}")
            now = time.monotonic()
            if now - max(self.last_received, since) >= DRAIN_QUIET:
                break
            time.sleep(0.05)
        return self.received

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        with contextlib.suppress(Exception):
            self.conn.close()


@dataclass
class Waits:
    samples: int = 0
    lock: int = 0
    """Writer backends waiting on the notification lock, summed over samples."""
    wal: int = 0
    """Writer backends waiting on WAL writes or flushes, summed over samples."""


class Sampler(threading.Thread):
    """Reads the writers' wait events from pg_stat_activity during a measurement's window."""

    def __init__(self, conninfo: str, application_names: Sequence[str]) -> None:
        super().__init__(name="sampler", daemon=True)
        self.conn = psycopg.connect(
            conninfo, autocommit=True, application_name=f"{APP_PREFIX}_sampler"
        )
        self.names = list(application_names)
        self.window: tuple[str, float, float] | None = None
        """(label, start, end) in ``time.time()``: when and under what to count."""
        self.waits: dict[str, Waits] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        query = """
            SELECT count(*) FILTER (WHERE wait_event_type = 'Lock' AND wait_event = 'object'),
                   count(*) FILTER (WHERE wait_event_type IN ('IO', 'LWLock')
                                    AND wait_event LIKE 'WAL%%')
            FROM pg_stat_activity WHERE application_name = ANY(%s)"""
        with contextlib.suppress(Exception):  # best effort: figures show "-" without it
            while not self.stopping.wait(SAMPLE_INTERVAL):
                window = self.window
                if window is None or not window[1] <= time.time() <= window[2]:
                    continue
                row = self.conn.execute(query, (self.names,)).fetchone()
                if row is None:
                    continue
                waits = self.waits.setdefault(window[0], Waits())
                waits.samples += 1
                waits.lock += int(row[0])
                waits.wal += int(row[1])

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        with contextlib.suppress(Exception):
            self.conn.close()


# -- measuring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    transactions: int
    seconds: float
    notifications: int
    waits: Waits | None

    @property
    def rate(self) -> float:
        return self.transactions / self.seconds


@dataclass
class Writers:
    """The writer processes, each with a command queue; results come back on one queue."""

    specs: list[WriterSpec]
    ctx: SpawnContext = field(default_factory=lambda: multiprocessing.get_context("spawn"))
    procs: list[SpawnProcess] = field(default_factory=list)
    commands: list[Queue[Command | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.results: Queue[Any] = self.ctx.Queue()

    def start(self) -> None:
        for spec in self.specs:
            commands: Queue[Command | None] = self.ctx.Queue()
            proc = self.ctx.Process(
                target=writer_main,
                args=(spec, commands, self.results),
                name=f"notify-lock-writer-{spec.index}",
                daemon=True,
            )
            self.commands.append(commands)
            self.procs.append(proc)
            proc.start()
        for _ in self.specs:
            self.expect("ready", timeout=120)

    def expect(self, kind: str, timeout: float) -> tuple[Any, ...]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self.results.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode is not None]
                if dead:
                    codes = ", ".join(f"{p.name}: exit code {p.exitcode}" for p in dead)
                    raise RuntimeError(f"a writer process ended ({codes})") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no {kind!r} from the writers within {timeout:g} s"
                    ) from None
                continue
            if message[0] == "error":
                raise RuntimeError(f"writer {message[1]} failed:\n{message[2]}")
            if message[0] == kind:
                return tuple(message)

    def run(self, writers: int, command: Command, timeout: float) -> list[tuple[Any, ...]]:
        """Send ``command`` to the first ``writers`` processes; their (start, end, count)."""
        for commands in self.commands[:writers]:
            commands.put(command)
        return [self.expect("done", timeout)[2:] for _ in range(writers)]

    def stop(self) -> None:
        """Ask every process to exit; SIGTERM, then SIGKILL, what has not after a while."""
        for commands in self.commands:
            with contextlib.suppress(Exception):
                commands.put(None)
        deadline = time.monotonic() + 10
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.exitcode is None:
                p.terminate()
                p.join(5)
            if p.exitcode is None:
                p.kill()
                p.join(5)


@dataclass
class Bench:
    args: argparse.Namespace
    writers: Writers
    listener: Listener
    sampler: Sampler

    def warm_up(self, mode: str) -> None:
        """Not measured: connections and pool filled, statements prepared, aggregates made."""
        count = self.args.warmup
        self.writers.run(
            len(self.writers.specs), Command(mode, time.time(), count=count), timeout=120
        )
        self.listener.drained(time.monotonic())

    def measure(self, mode: str, writers: int, label: str) -> Measurement:
        seconds = self.args.seconds
        before = self.listener.received
        start = time.time() + START_DELAY
        self.sampler.window = (label, start, start + seconds)
        try:
            done = self.writers.run(writers, Command(mode, start, seconds=seconds), seconds + 60)
        finally:
            self.sampler.window = None
        ended = time.monotonic()
        notifications = self.listener.drained(ended) - before
        began = min(d[0] for d in done)
        end = max(d[1] for d in done)
        waits = self.sampler.waits.pop(label, None)
        return Measurement(sum(d[2] for d in done), end - began, notifications, waits)


# -- reporting ---------------------------------------------------------------------------


def scenario(writers: int) -> str:
    return f"{writers} writer" + ("s" if writers != 1 else "")


def mean_waits(ms: Sequence[Measurement], attribute: str) -> str:
    samples = sum(m.waits.samples for m in ms if m.waits is not None)
    if not samples:
        return "-"
    total = sum(getattr(m.waits, attribute) for m in ms if m.waits is not None)
    return f"{total / samples:.2f}"


def paired(numerator: Sequence[Measurement], denominator: Sequence[Measurement]) -> list[float]:
    return [n.rate / d.rate for n, d in zip(numerator, denominator, strict=True)]


def report(
    args: argparse.Namespace,
    counts: Sequence[int],
    results: dict[tuple[int, str], list[Measurement]],
) -> None:
    medians = {key: statistics.median(m.rate for m in ms) for key, ms in results.items()}
    rows = []
    for n in counts:
        for mode in MODES:
            ms = results[(n, mode)]
            rates = [m.rate for m in ms]
            transactions = sum(m.transactions for m in ms)
            notifications = sum(m.notifications for m in ms)
            rows.append(
                [
                    scenario(n) if mode == MODES[0] else "",
                    mode,
                    fmt_rate(medians[(n, mode)]),
                    fmt_rate(min(rates)),
                    fmt_rate(max(rates)),
                    f"{1000 * n / medians[(n, mode)]:.2f}",
                    fmt_rate(statistics.median(m.notifications for m in ms)),
                    f"{notifications / transactions:.2f}",
                    mean_waits(ms, "lock"),
                    mean_waits(ms, "wal"),
                ]
            )
    print_table(
        [
            "writers",
            "mode",
            "ev/s",
            "min",
            "max",
            "ms/tx",
            "notifications",
            "per tx",
            "lock wait",
            "WAL wait",
        ],
        rows,
        "<<>>>>>>>>",
    )
    print(
        "ev/s: single-event transactions committed per second, median over rounds (min, "
        "max: slowest and fastest round); ms/tx: wall time per transaction per writer at "
        "the median; notifications: received by the listener per measurement (median); "
        "per tx: notifications / transactions over all rounds; lock wait, WAL wait: mean "
        "number of writer backends waiting on the notification lock (Lock: object) and on "
        f"WAL writes/flushes, per pg_stat_activity sample ({SAMPLE_INTERVAL * 1000:g} ms)"
    )

    print()
    rows = []
    for n in counts:
        for numerator, denominator in RATIOS:
            per_round = paired(results[(n, numerator)], results[(n, denominator)])
            rows.append(
                [
                    scenario(n),
                    f"{numerator} / {denominator}",
                    f"{medians[(n, numerator)] / medians[(n, denominator)]:.2f}",
                    f"{statistics.median(per_round):.2f}",
                    f"{min(per_round):.2f}..{max(per_round):.2f}",
                ]
            )
    print_table(["writers", "ratio", "of medians", "per round: median", "range"], rows, "<<>>>")
    print("per round: the same ratio within each round (the two modes back to back)")

    if len(counts) > 1:
        low, high = counts[0], counts[-1]
        print()
        rows = []
        for mode in MODES:
            per_round = paired(results[(high, mode)], results[(low, mode)])
            rows.append(
                [
                    mode,
                    f"{medians[(high, mode)] / medians[(low, mode)]:.2f}",
                    f"{statistics.median(per_round):.2f}",
                    f"{min(per_round):.2f}..{max(per_round):.2f}",
                ]
            )
        print_table(
            ["mode", f"{scenario(high)} / {low}", "per round: median", "range"], rows, "<>>>"
        )
        print(
            f"scaling: ev/s with {high} writers over ev/s with {low}; commits that run one "
            "at a time keep it near 1"
        )


# -- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_url_argument(parser)
    parser.add_argument(
        "--writers", type=int, default=4, help="writer processes (default 4; 1 is run too)"
    )
    parser.add_argument(
        "--seconds", type=float, default=None, help="duration of each measurement (default 3)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"transactions per writer and mode before measuring (default {AGGREGATES})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: --seconds 1 --rounds 1 --warmup 20 (explicit ones win)",
    )
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.writers < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--writers and --rounds must be >= 1, --warmup >= 0")
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    admin_url = eventsource.database_url(args.url)
    with throwaway_database(admin_url, f"{APP_PREFIX}_") as url:
        run(args, url)
    return 0


def run(args: argparse.Namespace, url: sa.URL) -> None:
    eventsource.upgrade(url)
    conninfo = psycopg_conninfo(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                "writer int NOT NULL, seq bigint NOT NULL, payload jsonb NOT NULL)"
            ).format(sql.Identifier(RAW_TABLE))
        )
    settings = server_settings(conninfo, SERVER_SETTINGS)
    counts = sorted({1, args.writers})
    store_channel = channel_for(EventStore().tables.names.events)
    specs = [
        WriterSpec(
            i,
            url.render_as_string(hide_password=False),
            conninfo,
            f"{APP_PREFIX}_w{i}",
        )
        for i in range(max(counts))
    ]

    print("NOTIFY and concurrent writers: appends per second")
    print_setup(settings, url)
    print(
        f"{args.rounds} interleaved rounds x {args.seconds:g} s per measurement, "
        f"{' and '.join(scenario(n) for n in counts)} (processes), single-event "
        f"transactions; one listener on {RAW_CHANNEL!r} and {store_channel!r}"
    )
    print()

    results: dict[tuple[int, str], list[Measurement]] = {}
    writers = Writers(specs)
    listener = Listener(conninfo, [RAW_CHANNEL, store_channel])
    sampler = Sampler(conninfo, [spec.application_name for spec in specs])
    listener.start()
    sampler.start()
    try:
        writers.start()
        bench = Bench(args, writers, listener, sampler)
        for mode in MODES:
            bench.warm_up(mode)
        for rnd in range(args.rounds):
            shift = rnd % len(MODES)
            for n in counts:
                for mode in MODES[shift:] + MODES[:shift]:
                    label = f"{rnd}|{n}|{mode}"
                    results.setdefault((n, mode), []).append(bench.measure(mode, n, label))
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            row = conn.execute("SELECT pg_notification_queue_usage()").fetchone()
            usage = float(row[0]) if row is not None else float("nan")
    finally:
        writers.stop()
        sampler.stop()
        listener.stop()

    report(args, counts, results)
    print(f"notification queue usage at the end: {usage:.4f} (the listener drained it)")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
