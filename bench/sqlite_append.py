"""What durability costs on SQLite: appends under ``synchronous = FULL`` against NORMAL.

``eventsource.create_engine`` runs SQLite files in WAL mode with ``PRAGMA synchronous
= FULL`` (each commit syncs the write-ahead log, so an acknowledged append survives a
power loss or an OS crash); ``sqlite_synchronous="NORMAL"`` skips that sync. This
script measures events per second appended through ``EventStore.append``

  (a) 1 event per transaction (``--events`` transactions);
  (b) ``--batch`` events per transaction (``--events`` events in all);

each under FULL and under NORMAL, one writer, a fresh ``Session`` per transaction,
``ExpectedVersion.exact(v)`` tracked per aggregate. Each (scenario, level) pair has its
own SQLite file, migrated with ``eventsource.upgrade``, in a temporary directory
(``--dir``, default the system's; the cost of a sync depends on the disk under it:
on tmpfs it is nearly free) that is removed at the end, also on error or interrupt.

The machine is shared and noisy, so the variants run interleaved: every round runs
each scenario under both levels back to back (the order of the levels alternating from
round to round), and the figures are per-variant medians over the rounds. The ratio
FULL / NORMAL is taken between the medians of this run, and within each round.

Usage::

    python bench/sqlite_append.py               # about half a minute
    python bench/sqlite_append.py --rounds 3 --events 200
    python bench/sqlite_append.py --dir /var/tmp  # measure on another disk
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource
from eventsource import Event, EventStore, ExpectedVersion
from eventsource.database import SqliteSynchronous

# isort: split
# bench/ is this script's directory, so first on sys.path: the benchmarks' shared helpers.
from _common import exit_on_sigterm, fmt_rate, print_table

BOUNDED_CONTEXT = "bench"
AGGREGATE_TYPE = "Order"
EVENT_TYPE = "OrderLinePriced"
LEVELS: tuple[SqliteSynchronous, ...] = ("FULL", "NORMAL")


def make_payload(seq: int) -> dict[str, Any]:
    """The payload of every event: the same small dict as bench/append.py."""
    return {"name": f"item-{seq}", "amount": 12.5, "tags": ["bench", "append"]}


@dataclass
class Writer:
    """Appends ``batch`` events per transaction round robin over its own aggregates."""

    engine: sa.Engine
    store: EventStore
    batch: int
    ids: list[str]
    versions: list[int]
    next_index: int = 0
    seq: int = 0

    def transaction(self) -> None:
        index = self.next_index
        self.next_index = (index + 1) % len(self.ids)
        aggregate_id = self.ids[index]
        events = []
        for _ in range(self.batch):
            self.seq += 1
            events.append(
                Event(
                    bounded_context=BOUNDED_CONTEXT,
                    aggregate_type=AGGREGATE_TYPE,
                    aggregate_id=aggregate_id,
                    event_type=EVENT_TYPE,
                    payload=make_payload(self.seq),
                )
            )
        expected = ExpectedVersion.exact(self.versions[index])  # exact(0): no stream yet
        with Session(self.engine) as session, session.begin():
            self.store.append(session, events, expected)
        self.versions[index] += self.batch


@dataclass(frozen=True)
class Measurement:
    events: int
    transactions: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def measure(writer: Writer, transactions: int) -> Measurement:
    cpu = time.process_time()
    start = time.perf_counter()
    for _ in range(transactions):
        writer.transaction()
    seconds = time.perf_counter() - start
    return Measurement(
        transactions * writer.batch, transactions, seconds, time.process_time() - cpu
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--events", type=int, default=500, help="events per measurement (default 500)"
    )
    parser.add_argument(
        "--batch", type=int, default=50, help="events per transaction in (b) (default 50)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument(
        "--aggregates", type=int, default=100, help="aggregates per variant (default 100)"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the temporary SQLite files go"
    )
    args = parser.parse_args(argv)
    if min(args.events, args.batch, args.rounds, args.aggregates) < 1:
        parser.error("--events, --batch, --rounds and --aggregates must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="eventsource_bench_sqlite_", dir=args.dir) as tmp:
        return run(args, Path(tmp))


def run(args: argparse.Namespace, directory: Path) -> int:
    a, b = "(a) 1 event/tx", f"(b) {args.batch} events/tx"
    batches = {a: 1, b: args.batch}
    store = EventStore()
    engines: list[sa.Engine] = []
    writers: dict[tuple[str, str], Writer] = {}
    for scenario, batch in batches.items():
        for level in LEVELS:
            path = directory / f"{len(writers)}-{level.lower()}.db"
            engine = eventsource.create_engine(f"sqlite:///{path}", sqlite_synchronous=level)
            eventsource.upgrade(engine)
            with engine.connect() as conn:
                actual = conn.exec_driver_sql("PRAGMA synchronous").scalar()
            assert actual == {"FULL": 2, "NORMAL": 1}[level], (level, actual)
            engines.append(engine)
            code = f"{scenario[1]}{level[0].lower()}"
            ids = [f"{code}-{i:06d}" for i in range(args.aggregates)]
            writers[scenario, level] = Writer(engine, store, batch, ids, [0] * len(ids))

    print(
        f"SQLite {sqlite3.sqlite_version}, WAL, files in {directory} "
        f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start); "
        f"{args.events} events per measurement, {args.rounds} rounds"
    )
    print()
    results: dict[tuple[str, str], list[Measurement]] = {key: [] for key in writers}
    try:
        for rnd in range(args.rounds):
            order = LEVELS if rnd % 2 == 0 else LEVELS[::-1]
            for scenario, batch in batches.items():
                transactions = max(1, args.events // batch)
                for level in order:
                    results[scenario, level].append(measure(writers[scenario, level], transactions))
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        for engine in engines:
            engine.dispose()

    medians = {key: statistics.median(m.rate for m in ms) for key, ms in results.items()}
    rows = []
    for scenario in batches:
        for level in LEVELS:
            ms = results[scenario, level]
            rates = [m.rate for m in ms]
            ms_per_tx = statistics.median(1000 * m.seconds / m.transactions for m in ms)
            cpu_per_tx = statistics.median(1000 * m.cpu_seconds / m.transactions for m in ms)
            rows.append(
                [
                    scenario if level == LEVELS[0] else "",
                    level,
                    fmt_rate(medians[scenario, level]),
                    fmt_rate(min(rates)),
                    fmt_rate(max(rates)),
                    f"{ms_per_tx:.2f}",
                    f"{cpu_per_tx:.2f}",
                ]
            )
    print_table(
        ["scenario", "synchronous", "events/s", "min", "max", "ms/tx", "CPU ms/tx"],
        rows,
        "<<>>>>>",
    )
    print(
        "events/s: median over rounds (min, max: slowest and fastest round); ms/tx: wall "
        "time per transaction (median); CPU: this process's CPU per transaction (median)"
    )
    print()

    ratio_rows = []
    for scenario in batches:
        full, normal = results[scenario, "FULL"], results[scenario, "NORMAL"]
        value = medians[scenario, "FULL"] / medians[scenario, "NORMAL"]
        paired = [f.rate / n.rate for f, n in zip(full, normal, strict=True)]
        ratio_rows.append(
            [
                scenario,
                f"{value:.2f}",
                f"{1 / value:.2f}x",
                f"{statistics.median(paired):.2f}",
                f"{min(paired):.2f}..{max(paired):.2f}",
            ]
        )
    print_table(
        ["FULL / NORMAL events/s", "of medians", "FULL slower by", "per round: median", "range"],
        ratio_rows,
        "<>>>>",
    )
    print(
        "per round: the same ratio within each round (FULL and NORMAL back to back); "
        "below 1 means FULL appends fewer events per second"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
