"""Append throughput on PostgreSQL: the event store against raw psycopg, in one run.

Measures events per second appended

  (a) 1 event per transaction, one writer;
  (b) 10 events per transaction, one writer;
  (c) 1 event per transaction (``--concurrent-batch``), 4 writer threads (``--writers``)
      on distinct aggregates, sharing one Engine (store) or one connection each (raw);

each through the store (``EventStore.append`` in a fresh ``Session`` per transaction,
``ExpectedVersion.exact(v)`` with ``v`` tracked per aggregate) and through hand-written
psycopg 3 statements into the same tables; for (c) also through a "table-lock store":
the same append preceded by ``LOCK TABLE events IN EXCLUSIVE MODE``, i.e. a store that
serialises its writers. Targets (issue): store/raw >= 0.6 at 1 event/tx and >= 0.7 at
10 events/tx; with 4 writers, store >= 4x the table-lock store.

The machine is shared and noisy, so the variants run interleaved: every round runs
each variant once (scenarios in turn, the order of variants inside a scenario rotated
each round), and the figures are per-variant medians over the rounds. Ratios are
taken between the medians of this run (PASS/BELOW compares them with the targets);
the ratio within each round (variants back to back) is shown too, as median and
range. The client's own CPU per transaction is printed beside: on a loaded machine it
is steadier than wall time and shows what the Python side costs.

The script creates its own throwaway database next to the admin URL's
(``--url`` / ``EVENTSOURCE_BENCH_PG_URL``, default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``), migrates it with
``eventsource.upgrade`` and drops it at the end, also on error or interrupt.

Usage::

    python bench/append.py                 # about 1.5 minutes
    python bench/append.py --seconds 1 --rounds 3
    python bench/append.py --events 2000   # fixed work per measurement instead of time
    python bench/append.py --check         # exit 1 when a ratio is below its target
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql
from psycopg.types.json import Jsonb
from sqlalchemy.orm import Session

import eventsource
from eventsource import Event, EventStore, ExpectedVersion
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

TARGET_STORE_VS_RAW_1 = 0.6
TARGET_STORE_VS_RAW_10 = 0.7
TARGET_STORE_VS_TABLE_LOCK = 4.0

#: The server settings printed in the report's header.
SERVER_SETTINGS = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "wal_sync_method",
    "commit_delay",
)

#: Runs one transaction and returns how many events it appended.
Transaction = Callable[[], int]


def make_payload(seq: int) -> dict[str, Any]:
    """The payload of every event, store and raw alike: a small dict."""
    return {"name": f"item-{seq}", "amount": 12.5, "tags": ["bench", "append"]}


# -- writers ---------------------------------------------------------------------------


@dataclass
class Aggregates:
    """One writer's own aggregates, appended to round robin, with their current versions."""

    ids: list[str]
    versions: list[int] = field(init=False)
    next_index: int = 0
    seq: int = 0

    def __post_init__(self) -> None:
        self.versions = [0] * len(self.ids)

    @classmethod
    def for_writer(cls, code: str, writer: int, count: int) -> Aggregates:
        # Same id length for every variant, so index sizes compare.
        return cls([f"{code}-{writer}-{i:06d}" for i in range(count)])

    def take(self) -> int:
        index = self.next_index
        self.next_index = (index + 1) % len(self.ids)
        return index


class StoreWriter:
    """Appends through ``EventStore.append``, one Session and transaction per call.

    With ``lock_table`` each transaction first takes ``LOCK TABLE events IN EXCLUSIVE
    MODE``: a store that serialises all writers, the baseline of target (c).
    """

    def __init__(
        self,
        engine: sa.Engine,
        store: EventStore,
        aggregates: Aggregates,
        batch: int,
        *,
        lock_table: bool = False,
    ) -> None:
        self.engine = engine
        self.store = store
        self.aggregates = aggregates
        self.batch = batch
        self.lock: sa.TextClause | None = None
        if lock_table:
            table = store.tables.events.name
            self.lock = sa.text(f'LOCK TABLE "{table}" IN EXCLUSIVE MODE')

    def __call__(self) -> int:
        aggs = self.aggregates
        index = aggs.take()
        aggregate_id = aggs.ids[index]
        events = []
        for _ in range(self.batch):
            aggs.seq += 1
            events.append(
                Event(
                    bounded_context=BOUNDED_CONTEXT,
                    aggregate_type=AGGREGATE_TYPE,
                    aggregate_id=aggregate_id,
                    event_type=EVENT_TYPE,
                    payload=make_payload(aggs.seq),
                )
            )
        with Session(self.engine) as session, session.begin():
            if self.lock is not None:
                session.execute(self.lock)
            result = self.store.append(session, events, ExpectedVersion.exact(aggs.versions[index]))
        aggs.versions[index] = result.to_version
        return len(events)


# The raw baseline: what a hand-written application would minimally do for the same
# append with the same guarantee, on one plain psycopg 3 connection (autocommit off,
# so psycopg sends BEGIN before the first statement, as it does under SQLAlchemy):
#
#   1. upsert the aggregate's row in aggregate_heads: insert it for a new aggregate,
#      else move its version on only if it still equals the expected one (the
#      optimistic-concurrency check, rowcount 0 = conflict), and record the writing
#      transaction id, as the store does;
#   2. one INSERT ... VALUES of the events, one row per event (a multi-row VALUES for a
#      batch), with every column the store writes: the aggregate key, its version,
#      partition_hash (FNV-1a 32 of the aggregate id, computed per transaction as the
#      store does), a fresh uuid4 event_id, event_type, event_version, the payload as
#      jsonb, metadata/causation/correlation/trace ids (NULL, as the store writes them
#      here) and created_at (now, UTC); transaction_id comes from the column default
#      for both;
#   3. COMMIT.
#
# What it leaves out, because such an application would not need it: RETURNING the
# positions (the store returns them in its AppendResult), the store's input
# validation, and the heads check of invariant 3 (a WHERE on the writer's transaction
# id: no measurable cost). Statements are pre-rendered once; psycopg prepares them
# server-side after 5 executions, exactly as it does the store's statement.

RAW_HEADS_UPSERT = b"""
    INSERT INTO aggregate_heads AS h
        (bounded_context, aggregate_type, aggregate_id, version, transaction_id)
    VALUES (%s, %s, %s, %s, pg_current_xact_id())
    ON CONFLICT (bounded_context, aggregate_type, aggregate_id) DO UPDATE
        SET version = EXCLUDED.version, transaction_id = EXCLUDED.transaction_id
        WHERE h.version = %s"""


def raw_insert_statement(conn: psycopg.Connection[Any], rows: int) -> bytes:
    """``INSERT INTO events (...) VALUES (...), (...)`` for ``rows`` events, rendered once."""
    one_row = sql.SQL("({})").format(
        sql.SQL(", ").join(sql.Placeholder() for _ in EVENT_WRITE_COLUMNS)
    )
    statement = sql.SQL("INSERT INTO events ({}) VALUES {}").format(
        sql.SQL(", ").join(sql.Identifier(name) for name in EVENT_WRITE_COLUMNS),
        sql.SQL(", ").join(one_row for _ in range(rows)),
    )
    return statement.as_bytes(conn)


class ConflictError(RuntimeError):
    """The raw baseline's optimistic-concurrency failure (never expected here)."""


class RawWriter:
    """Appends with hand-written psycopg statements on its own connection."""

    def __init__(self, conn: psycopg.Connection[Any], aggregates: Aggregates, batch: int) -> None:
        self.conn = conn
        self.aggregates = aggregates
        self.batch = batch
        self.insert = raw_insert_statement(conn, batch)

    def __call__(self) -> int:
        aggs = self.aggregates
        index = aggs.take()
        aggregate_id = aggs.ids[index]
        expected = aggs.versions[index]
        new_version = expected + self.batch
        partition_hash = fnv1a_32(aggregate_id)
        now = datetime.now(UTC)
        params: list[Any] = []
        for i in range(self.batch):
            aggs.seq += 1
            params += (
                BOUNDED_CONTEXT,
                AGGREGATE_TYPE,
                aggregate_id,
                expected + 1 + i,
                partition_hash,
                uuid.uuid4(),
                EVENT_TYPE,
                1,
                Jsonb(make_payload(aggs.seq)),
                None,
                None,
                None,
                None,
                now,
            )
        conn = self.conn
        try:
            with conn.cursor() as cur:
                cur.execute(
                    RAW_HEADS_UPSERT,
                    (BOUNDED_CONTEXT, AGGREGATE_TYPE, aggregate_id, new_version, expected),
                )
                if cur.rowcount != 1:
                    raise ConflictError(f"{aggregate_id} is not at version {expected}")
                cur.execute(self.insert, params)
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        aggs.versions[index] = new_version
        return self.batch


# -- measuring -------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    scenario: str
    label: str
    writers: list[Transaction]
    batch: int


@dataclass(frozen=True)
class Measurement:
    events: int
    seconds: float
    #: CPU time of the writer threads (this process only: the client's own cost).
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def run_writer(
    tx: Transaction,
    barrier: threading.Barrier | None,
    seconds: float | None,
    transactions: int | None,
) -> tuple[float, float, int, float]:
    """Run ``tx`` for ``seconds`` or ``transactions`` times: (start, end, events, CPU)."""
    if barrier is not None:
        barrier.wait()
    events = 0
    cpu = time.thread_time()
    start = time.perf_counter()
    if transactions is not None:
        for _ in range(transactions):
            events += tx()
    else:
        assert seconds is not None
        deadline = start + seconds
        while time.perf_counter() < deadline:
            events += tx()
    return start, time.perf_counter(), events, time.thread_time() - cpu


def measure(
    variant: Variant,
    pool: ThreadPoolExecutor,
    *,
    seconds: float | None,
    events: int | None,
) -> Measurement:
    """Events/s of one variant: its writers run at once, from a common start."""
    writers = variant.writers
    transactions = None
    if events is not None:
        transactions = max(1, -(-events // (variant.batch * len(writers))))
    if len(writers) == 1:
        start, end, count, cpu = run_writer(writers[0], None, seconds, transactions)
        return Measurement(count, end - start, cpu)
    barrier = threading.Barrier(len(writers))
    futures = [pool.submit(run_writer, tx, barrier, seconds, transactions) for tx in writers]
    results = [f.result() for f in futures]
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    return Measurement(sum(r[2] for r in results), end - start, sum(r[3] for r in results))


# -- reporting -------------------------------------------------------------------------


@dataclass(frozen=True)
class Ratio:
    label: str
    numerator: str
    denominator: str
    target: float | None


# -- main ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_url_argument(parser)
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(
        "--seconds", type=float, default=1.0, help="duration of each measurement (default 1)"
    )
    amount.add_argument(
        "--events", type=int, default=None, help="events per measurement instead of a duration"
    )
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--writers", type=int, default=4, help="writers in (c) (default 4)")
    parser.add_argument(
        "--concurrent-batch", type=int, default=1, help="events per transaction in (c) (default 1)"
    )
    parser.add_argument(
        "--aggregates", type=int, default=100, help="aggregates per writer (default 100)"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when a ratio is below its target"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.writers < 1 or args.concurrent_batch < 1 or args.aggregates < 1:
        parser.error("--rounds, --writers, --concurrent-batch and --aggregates must be >= 1")
    if args.events is not None:
        if args.events < 1:
            parser.error("--events must be >= 1")
        args.seconds = None
    elif args.seconds <= 0:
        parser.error("--seconds must be > 0")
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
    store = EventStore()
    raw_conns: list[psycopg.Connection[Any]] = []

    def raw_conn() -> psycopg.Connection[Any]:
        conn = psycopg.connect(conninfo, autocommit=False)
        raw_conns.append(conn)
        return conn

    n_aggs = args.aggregates
    cb = args.concurrent_batch
    w = args.writers
    a, b, c = "(a) 1 event/tx", "(b) 10 events/tx", f"(c) {w} writers, {cb} event/tx"
    scenarios: dict[str, list[Variant]] = {
        a: [
            Variant(
                a,
                "store",
                [StoreWriter(engine, store, Aggregates.for_writer("sa", 0, n_aggs), 1)],
                1,
            ),
            Variant(
                a,
                "raw psycopg",
                [RawWriter(raw_conn(), Aggregates.for_writer("ra", 0, n_aggs), 1)],
                1,
            ),
        ],
        b: [
            Variant(
                b,
                "store",
                [StoreWriter(engine, store, Aggregates.for_writer("sb", 0, n_aggs), 10)],
                10,
            ),
            Variant(
                b,
                "raw psycopg",
                [RawWriter(raw_conn(), Aggregates.for_writer("rb", 0, n_aggs), 10)],
                10,
            ),
        ],
        c: [
            Variant(
                c,
                "store",
                [
                    StoreWriter(engine, store, Aggregates.for_writer("sc", i, n_aggs), cb)
                    for i in range(w)
                ],
                cb,
            ),
            Variant(
                c,
                "raw psycopg",
                [
                    RawWriter(raw_conn(), Aggregates.for_writer("rc", i, n_aggs), cb)
                    for i in range(w)
                ],
                cb,
            ),
            Variant(
                c,
                "table-lock store",
                [
                    StoreWriter(
                        engine, store, Aggregates.for_writer("lc", i, n_aggs), cb, lock_table=True
                    )
                    for i in range(w)
                ],
                cb,
            ),
        ],
    }
    ratios = [
        Ratio(f"{a}: store / raw", f"{a}|store", f"{a}|raw psycopg", TARGET_STORE_VS_RAW_1),
        Ratio(f"{b}: store / raw", f"{b}|store", f"{b}|raw psycopg", TARGET_STORE_VS_RAW_10),
        Ratio(f"{c}: store / raw", f"{c}|store", f"{c}|raw psycopg", None),
        Ratio(
            f"{c}: store / table-lock store",
            f"{c}|store",
            f"{c}|table-lock store",
            TARGET_STORE_VS_TABLE_LOCK,
        ),
    ]

    per_measure = f"{args.events} events" if args.events is not None else f"{args.seconds:g} s"
    print("eventsource append benchmark")
    print_setup(settings, url)
    print(
        f"{args.rounds} interleaved rounds x {per_measure} per measurement; "
        f"ExpectedVersion.exact(v) tracked per aggregate; {n_aggs} aggregates per writer, "
        "round robin; one Session per transaction"
    )
    print()

    results: dict[str, list[Measurement]] = {}
    with ThreadPoolExecutor(max_workers=w) as pool:
        # Warm-up (not measured): creates every aggregate (so measured appends move
        # existing heads), fills the connection pool, lets psycopg prepare statements.
        for variants in scenarios.values():
            for variant in variants:
                n = n_aggs * variant.batch * len(variant.writers) + 10 * variant.batch * len(
                    variant.writers
                )
                measure(variant, pool, seconds=None, events=n)
        for rnd in range(args.rounds):
            for variants in scenarios.values():
                shift = rnd % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    m = measure(variant, pool, seconds=args.seconds, events=args.events)
                    results.setdefault(f"{variant.scenario}|{variant.label}", []).append(m)
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    engine.dispose()
    for conn in raw_conns:
        conn.close()

    medians = {key: statistics.median(m.rate for m in ms) for key, ms in results.items()}
    rows = []
    for variants in scenarios.values():
        for variant in variants:
            key = f"{variant.scenario}|{variant.label}"
            ms = results[key]
            rates = [m.rate for m in ms]
            tx_rate = medians[key] / variant.batch
            cpu_per_tx = statistics.median(m.cpu_seconds * variant.batch / m.events for m in ms)
            rows.append(
                [
                    variant.scenario if variant is variants[0] else "",
                    variant.label,
                    fmt_rate(medians[key]),
                    fmt_rate(min(rates)),
                    fmt_rate(max(rates)),
                    f"{1000 * len(variant.writers) / tx_rate:.2f}",
                    f"{1000 * cpu_per_tx:.2f}",
                ]
            )
    print_table(
        ["scenario", "variant", "events/s", "min", "max", "ms/tx", "client CPU ms/tx"],
        rows,
        "<<>>>>>",
    )
    print(
        "events/s: median over rounds (min, max: slowest and fastest round); ms/tx: "
        "wall time per transaction per writer at the median; client CPU: this process's "
        "CPU per transaction (median), summed over writer threads"
    )
    print()

    below = False
    ratio_rows = []
    for ratio in ratios:
        value = medians[ratio.numerator] / medians[ratio.denominator]
        paired = [
            n.rate / d.rate
            for n, d in zip(results[ratio.numerator], results[ratio.denominator], strict=True)
        ]
        if ratio.target is None:
            target, verdict = "-", "-"
        else:
            target = f">= {ratio.target:.2f}"
            verdict = "PASS" if value >= ratio.target else "BELOW"
            below = below or value < ratio.target
        ratio_rows.append(
            [
                ratio.label,
                f"{value:.2f}",
                f"{statistics.median(paired):.2f}",
                f"{min(paired):.2f}..{max(paired):.2f}",
                target,
                verdict,
            ]
        )
    print_table(
        ["ratio", "of medians", "per round: median", "range", "target", "result"],
        ratio_rows,
        "<>>><<",
    )
    print(
        "result compares the ratio of medians with the target; per round: the same ratio "
        "within each round (back-to-back runs)"
    )
    return 1 if args.check and below else 0


if __name__ == "__main__":
    sys.exit(main())
