"""Bulk import throughput on PostgreSQL: ``bulk_append`` against raw psycopg COPY, in one run.

Measures events per second written into an empty store, in one transaction each:

  (a) raw psycopg: ONE binary ``COPY events (...) FROM STDIN`` of rows computed
      beforehand (aggregate versions, FNV-1a partition hashes, the payloads' JSON),
      the fastest a hand-written loader can go, and what bench/projection.py's seeding
      does (here in binary, the faster format on this table); no heads, no checks;
  (b) ``EventStore.bulk_append`` of the same events (``Event`` objects built
      beforehand, outside the timed section), chunk by chunk: validation of every
      event, the heads upsert of invariant 3, the binary COPY;

and prints the ratio bulk / raw (target: >= 0.5). Both write the same rows: the same
aggregates, versions, hashes, event ids and payloads.

``--order`` says how the aggregates' events come: ``streams`` (default) has each
aggregate's events together, one stream after another, as an export read stream by
stream comes; ``round-robin`` interleaves them perfectly (event i belongs to aggregate
i mod N), the worst case, in which every event is a validation call and a head update
of its own within a chunk (a larger ``--chunk-size`` helps there).

The machine is shared and noisy, so the variants run interleaved: every round runs
both, which goes first alternating by round, and the figures are per-variant medians
over the rounds; the ratio of medians is compared with the target, and the ratio within
each round is shown too (median and range). Before every measurement the tables are
truncated and the server is checkpointed (``CHECKPOINT``), so no run pays for another's
dirty pages. The client's own CPU per event is printed beside: on a loaded machine it
is steadier than wall time and shows what the Python side costs.

The script creates its own throwaway database next to the admin URL's
(``--url`` / ``EVENTSOURCE_BENCH_PG_URL``, default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``), migrates it with
``eventsource.upgrade`` and drops it at the end, also on error or interrupt.

Usage::

    python bench/bulk.py                          # 100k events, 10k aggregates, 5 rounds
    python bench/bulk.py --events 20000 --aggregates 2000 --rounds 3
    python bench/bulk.py --order round-robin --chunk-size 50000
    python bench/bulk.py --check                  # exit 1 when the ratio is below 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql

import eventsource
from eventsource import Event, EventStore
from eventsource.partition import fnv1a_32

# isort: split
# bench/ is this script's directory, so first on sys.path: the benchmarks' shared helpers.
from _common import (
    EVENT_WRITE_COLUMNS,
    add_url_argument,
    exit_on_sigterm,
    fmt_rate,
    print_setup,
    print_table,
    psycopg_conninfo,
    server_settings,
    throwaway_database,
)

BOUNDED_CONTEXT = "bench"
AGGREGATE_TYPE = "Order"
EVENT_TYPE = "OrderLinePriced"

TARGET_BULK_VS_RAW = 0.5

#: The server settings printed in the report's header.
SERVER_SETTINGS = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "wal_sync_method",
    "commit_delay",
)

#: The binary COPY's types for EVENT_WRITE_COLUMNS. The JSON goes as jsonb's binary
#: format (a version byte, then the text), passed through as bytes.
COPY_TYPES = {
    "bounded_context": "text",
    "aggregate_type": "text",
    "aggregate_id": "text",
    "aggregate_version": "int8",
    "partition_hash": "int8",
    "event_id": "uuid",
    "event_type": "text",
    "event_version": "int4",
    "payload": "bytea",
    "metadata": "bytea",
    "causation_id": "text",
    "correlation_id": "text",
    "trace_id": "text",
    "created_at": "timestamptz",
}


def make_payload(seq: int) -> dict[str, Any]:
    """The payload of every event, as in bench/append.py: a small dict."""
    return {"name": f"item-{seq}", "amount": 12.5, "tags": ["bench", "append"]}


# -- the data --------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """The events to write, as Events for bulk_append and as finished COPY rows."""

    events: list[Event]
    rows: list[tuple[Any, ...]]
    aggregates: int


def make_data(count: int, aggregates: int, order: str) -> Data:
    """``count`` events over ``aggregates`` aggregates, in ``order``; every aggregate's
    versions are 1, 2, ... in input order, as bulk_append gives them."""
    ids = [f"order-{a:07d}" for a in range(aggregates)]
    hashes = [fnv1a_32(aggregate_id) for aggregate_id in ids]
    per_aggregate = -(-count // aggregates)
    versions = [0] * aggregates
    now = datetime.now(UTC)
    events: list[Event] = []
    rows: list[tuple[Any, ...]] = []
    for i in range(count):
        a = i % aggregates if order == "round-robin" else i // per_aggregate
        versions[a] += 1
        payload = make_payload(i)
        event = Event(
            bounded_context=BOUNDED_CONTEXT,
            aggregate_type=AGGREGATE_TYPE,
            aggregate_id=ids[a],
            event_type=EVENT_TYPE,
            payload=payload,
            created_at=now,
        )
        events.append(event)
        encoded = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        rows.append(
            (
                BOUNDED_CONTEXT,
                AGGREGATE_TYPE,
                ids[a],
                versions[a],
                hashes[a],
                event.event_id,
                EVENT_TYPE,
                1,
                b"\x01" + encoded.encode(),
                None,
                None,
                None,
                None,
                now,
            )
        )
    return Data(events, rows, sum(1 for v in versions if v))


# -- the variants ----------------------------------------------------------------------


class RawCopy:
    """(a): one binary COPY of the precomputed rows, then COMMIT, on its own connection."""

    def __init__(self, conninfo: str, data: Data) -> None:
        self.statement = sql.SQL("COPY events ({}) FROM STDIN (FORMAT BINARY)").format(
            sql.SQL(", ").join(sql.Identifier(name) for name in EVENT_WRITE_COLUMNS)
        )
        self.types = [COPY_TYPES[name] for name in EVENT_WRITE_COLUMNS]
        self.conn = psycopg.connect(conninfo, autocommit=False)
        self.data = data

    def __call__(self) -> int:
        with self.conn.cursor() as cursor, cursor.copy(self.statement) as copy:
            copy.set_types(self.types)
            for row in self.data.rows:
                copy.write_row(row)
        self.conn.commit()
        return len(self.data.rows)


def bulk(engine: sa.Engine, data: Data, chunk_size: int) -> Callable[[], int]:
    """(b): bulk_append of the Events in one transaction, then COMMIT."""
    store = EventStore()

    def run() -> int:
        with engine.begin() as conn:
            result = store.bulk_append(conn, data.events, chunk_size=chunk_size)
        assert result.events == len(data.events)
        assert result.aggregates == data.aggregates
        return result.events

    return run


@dataclass(frozen=True)
class Measurement:
    events: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def measure(run: Callable[[], int], reset: Callable[[], None]) -> Measurement:
    reset()
    cpu = time.process_time()
    start = time.perf_counter()
    events = run()
    seconds = time.perf_counter() - start
    return Measurement(events, seconds, time.process_time() - cpu)


def check_same_rows(conninfo: str, data: Data) -> None:
    """Both variants wrote the rows the other did (checked after a bulk run)."""
    with psycopg.connect(conninfo) as conn:
        written = conn.execute(
            "SELECT count(*), count(DISTINCT aggregate_id), max(aggregate_version), "
            "sum(partition_hash) FROM events"
        ).fetchone()
    expected = (
        len(data.rows),
        data.aggregates,
        max(row[3] for row in data.rows),
        sum(row[4] for row in data.rows),
    )
    if written != expected:
        raise SystemExit(f"bulk_append wrote {written}, raw COPY writes {expected}")


# -- main ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_url_argument(parser)
    parser.add_argument("--events", type=int, default=100_000, help="per round (default 100000)")
    parser.add_argument(
        "--aggregates", type=int, default=10_000, help="the events' aggregates (default 10000)"
    )
    parser.add_argument(
        "--order",
        choices=("streams", "round-robin"),
        default="streams",
        help="how the aggregates' events come (default streams)",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=5000, help="bulk_append's chunk_size (default 5000)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 when bulk / raw is below {TARGET_BULK_VS_RAW}",
    )
    args = parser.parse_args(argv)
    if min(args.events, args.aggregates, args.chunk_size, args.rounds) < 1:
        parser.error("--events, --aggregates, --chunk-size and --rounds must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    admin_url = eventsource.database_url(args.url)
    with throwaway_database(admin_url, "eventsource_bench_") as url:
        return run(args, url)


def run(args: argparse.Namespace, url: sa.URL) -> int:
    eventsource.upgrade(url)
    conninfo = psycopg_conninfo(url)
    settings = server_settings(conninfo, SERVER_SETTINGS)
    engine = eventsource.create_engine(url)
    admin = psycopg.connect(conninfo, autocommit=True)

    def reset() -> None:
        admin.execute("TRUNCATE events, aggregate_heads RESTART IDENTITY")
        admin.execute("CHECKPOINT")

    built = time.perf_counter()
    data = make_data(args.events, args.aggregates, args.order)
    built = time.perf_counter() - built
    raw = RawCopy(conninfo, data)
    variants: dict[str, Callable[[], int]] = {
        "raw psycopg COPY": raw,
        "bulk_append": bulk(engine, data, args.chunk_size),
    }

    print("eventsource bulk import benchmark")
    print_setup(settings, url)
    print(
        f"{args.rounds} interleaved rounds of {args.events:,} events over "
        f"{data.aggregates:,} aggregates ({args.order}), each variant in one transaction "
        f"into emptied tables; bulk_append chunk_size {args.chunk_size:,}; "
        f"data built in {built:.1f}s (not measured)"
    )
    print()

    results: dict[str, list[Measurement]] = {name: [] for name in variants}
    names = list(variants)
    # Warm-up (not measured): connections, psycopg's prepared statements, caches; then
    # what bulk_append wrote is checked against the raw rows.
    for name in names:
        measure(variants[name], reset)
    check_same_rows(conninfo, data)
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            results[name].append(measure(variants[name], reset))
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    engine.dispose()
    admin.close()
    raw.conn.close()

    medians = {name: statistics.median(m.rate for m in ms) for name, ms in results.items()}
    rows = []
    for name, ms in results.items():
        rates = [m.rate for m in ms]
        cpu = statistics.median(m.cpu_seconds / m.events for m in ms)
        rows.append(
            [
                name,
                fmt_rate(medians[name]),
                fmt_rate(min(rates)),
                fmt_rate(max(rates)),
                f"{1e6 * cpu:.1f}",
            ]
        )
    print_table(["variant", "events/s", "min", "max", "client CPU us/event"], rows, "<>>>>")
    print(
        "events/s: median over rounds (min, max: slowest and fastest round); client CPU: "
        "this process's CPU per event (median)"
    )
    print()

    value = medians["bulk_append"] / medians["raw psycopg COPY"]
    paired = [
        b.rate / r.rate
        for b, r in zip(results["bulk_append"], results["raw psycopg COPY"], strict=True)
    ]
    verdict = "PASS" if value >= TARGET_BULK_VS_RAW else "BELOW"
    print_table(
        ["ratio", "of medians", "per round: median", "range", "target", "result"],
        [
            [
                "bulk_append / raw COPY",
                f"{value:.2f}",
                f"{statistics.median(paired):.2f}",
                f"{min(paired):.2f}..{max(paired):.2f}",
                f">= {TARGET_BULK_VS_RAW:.2f}",
                verdict,
            ]
        ],
        "<>>><<",
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at the end: {load} ({os.cpu_count()} CPUs)")
    return 1 if args.check and value < TARGET_BULK_VS_RAW else 0


if __name__ == "__main__":
    sys.exit(main())
