"""Projection catch-up throughput on PostgreSQL: the processor against raw psycopg, in one run.

Measures, over ``--events`` stored events (default 100,000):

  (a) catch-up of a projection whose ``handle`` upserts one read-model row per event
      (``session.execute(upsert, {...})``), run by ``Processor.run_until_caught_up``
      from an empty checkpoint, at batch sizes 100 and 1000 ("store, per-event handler");
  (b) the same work done by a hand-written psycopg 3 loop (see :class:`RawLoop`), at the
      same batch sizes ("raw psycopg, per-event"), printed as the ratio store/raw --
      the issue's target: store per-event handler / raw per-event loop >= 0.7;
  (c) a projection overriding ``handle_batch`` instead, which upserts the whole batch
      with ONE ``session.execute(upsert, [{...}, ...])`` (an executemany; "store,
      batched handler"), and the raw loop doing the same with one
      ``cur.executemany(upsert, params)`` per batch ("raw psycopg, executemany");
      printed as batched / raw per-event and batched / raw executemany, and the best
      store handler / raw per-event loop against the same 0.7;
  (d) a scoped projection (``aggregate_types = ("Rare",)``, 1% of the events) against
      the unscoped one, at batch size 100, as events/s of the log scanned (events in
      the store / seconds to catch up) and the speedup of the scoped one.

The batched upsert is correct with the same aggregate twice in one batch: an executemany
runs the statement once per parameter set (psycopg 3 pipelines them; SQLAlchemy's
"insertmanyvalues" rewrite into one multi-row INSERT, which ON CONFLICT DO UPDATE would
reject with "cannot affect row a second time", is used for INSERT ... RETURNING only on
psycopg). The script checks it before measuring (:func:`check_duplicate_keys`), and every
measurement checks that the counts in the read model add up to the events handled.

The machine is shared and noisy, so the variants run interleaved: every round runs each
variant once (per batch size: store per-event and raw per-event back to back, then store
batched and raw executemany back to back, which of a pair goes first alternating by
round), and the figures are per-variant medians over the rounds. Ratios are computed
within a round (same data, same round); the median and the range over rounds are
printed. Before every measurement the read model is truncated, the checkpoints are
deleted and the server is checkpointed (``CHECKPOINT``), so no run pays for another's
dirty pages.

The script creates its own throwaway database next to the admin URL's
(``--url`` / ``EVENTSOURCE_BENCH_PG_URL``, default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``), migrates it with
``eventsource.upgrade``, seeds it with COPY (seeding time is not measured) and drops it
at the end, also on error or interrupt.

Each round is eight catch-ups over the whole log plus the scoped one, about 3.5 minutes
at 100,000 events on a 2-core machine (the four per-event catch-ups are most of it), so
the default is ONE round: about 4 minutes in all with seeding, more when other work
competes for the CPUs (the last line prints the load average). One round gives no
spread; pass ``--rounds 3`` (about 11 minutes) for medians over interleaved rounds.
Besides events/s, the table shows the CPU time of this Python process per event, the
client-side cost the store/raw ratio is about, which other load on the machine distorts
less than wall time.

Usage::

    python bench/projection.py                  # 100k events, 1 round (~4 minutes)
    python bench/projection.py --rounds 3       # steadier: medians of 3 rounds
    python bench/projection.py --events 20000 --rounds 5
    python bench/projection.py --check          # exit 1 when the issue's target is missed
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

import eventsource
from eventsource import EventStore, PersistedEvent, Processor, ProcessorConfig, Projection
from eventsource.partition import fnv1a_32
from eventsource.store import EVENT_COLUMNS

# isort: split
# bench/ is this script's directory, so first on sys.path: the benchmarks' shared helpers.
from _common import (
    EVENT_WRITE_COLUMNS,
    add_url_argument,
    exit_on_sigterm,
    fmt_rate,
    print_table,
    psycopg_conninfo,
    server_settings,
    throwaway_database,
)

BOUNDED_CONTEXT = "bench"
RARE = "Rare"
#: Aggregates whose index is a multiple of this are "Rare": 1% of aggregates and events.
RARE_EVERY = 100
READ_MODEL = "bench_read_model"
RAW_CHECKPOINTS = "bench_raw_checkpoints"

TARGET_STORE_VS_RAW = 0.7
BATCH_SIZES = (100, 1000)
SCOPED_BATCH_SIZE = 100

#: The server settings printed in the report's header.
SERVER_SETTINGS = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "shared_buffers",
)

# The variants measured at every batch size, as labelled in the report.
STORE = "store, per-event handler"
BATCHED = "store, batched handler"
RAW = "raw psycopg, per-event"
RAW_MANY = "raw psycopg, executemany"
BEST = "best store handler"

ISSUE, BATCHED_VS_RAW, BATCHED_VS_MANY, BEST_VS_RAW = "issue", "batched", "batched-many", "best"
#: The ratios reported per batch size: (key, store side, raw side, label, has the 0.7 target).
RATIOS: tuple[tuple[str, str, str, str, bool], ...] = (
    (ISSUE, STORE, RAW, "store per-event handler / raw per-event loop", True),
    (BATCHED_VS_RAW, BATCHED, RAW, "store batched handler / raw per-event loop", False),
    (BATCHED_VS_MANY, BATCHED, RAW_MANY, "store batched handler / raw executemany", False),
    (BEST_VS_RAW, BEST, RAW, "best store handler / raw per-event loop", True),
)
RATIO_LABELS = {key: label for key, _, _, label, _ in RATIOS}


# -- schema of the benchmark's own tables -------------------------------------------------

bench_metadata = sa.MetaData()
read_model = sa.Table(
    READ_MODEL,
    bench_metadata,
    sa.Column("aggregate_id", sa.Text, primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("last_position", sa.BigInteger, nullable=False),
)
raw_checkpoints = sa.Table(
    RAW_CHECKPOINTS,
    bench_metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("global_position", sa.BigInteger, nullable=False),
    sa.Column("events_handled", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


def core_upsert() -> sa.Insert:
    """The handler's statement, built once: one row per aggregate, counting its events."""
    insert = postgresql.insert(read_model).values(
        aggregate_id=sa.bindparam("aggregate_id"),
        count=1,
        last_position=sa.bindparam("position"),
    )
    return insert.on_conflict_do_update(
        index_elements=[read_model.c.aggregate_id],
        set_={
            "count": read_model.c.count + 1,
            "last_position": insert.excluded.last_position,
        },
    )


#: The same statement for the raw loop and for ``--handler text``.
UPSERT_SQL = (
    f"INSERT INTO {READ_MODEL} (aggregate_id, count, last_position) VALUES ({{aid}}, 1, {{pos}}) "
    f"ON CONFLICT (aggregate_id) DO UPDATE "
    f"SET count = {READ_MODEL}.count + 1, last_position = EXCLUDED.last_position"
)


# -- the projections ------------------------------------------------------------------------


class UpsertProjection(Projection):
    """One upsert per event through the processor's session (the issue's handler)."""

    name = "bench_upsert"
    statement: ClassVar[sa.Executable] = core_upsert()

    def handle(self, event: PersistedEvent, session: Session) -> None:
        session.execute(
            self.statement,
            {"aggregate_id": event.aggregate_id, "position": event.global_position},
        )


class ScopedUpsertProjection(UpsertProjection):
    """The same handler, scoped to the Rare aggregates (1% of the events)."""

    name = "bench_upsert_rare"
    aggregate_types = (RARE,)


class BatchedUpsertProjection(Projection):
    """The same upsert for the whole batch: ONE ``session.execute`` with a list of params.

    SQLAlchemy runs it as a DBAPI ``executemany`` (psycopg 3 pipelines the executions),
    one execution per event, so an aggregate twice in the batch counts twice.
    """

    name = "bench_upsert_batched"
    statement: ClassVar[sa.Executable] = core_upsert()

    def handle_batch(self, events: Sequence[PersistedEvent], session: Session) -> None:
        session.execute(
            self.statement,
            [
                {"aggregate_id": event.aggregate_id, "position": event.global_position}
                for event in events
            ],
        )


STORE_PROJECTIONS: tuple[type[Projection], ...] = (
    UpsertProjection,
    ScopedUpsertProjection,
    BatchedUpsertProjection,
)


def use_text_handler() -> None:
    """``--handler text``: the same upsert as ``sa.text`` instead of a Core insert."""
    statement = sa.text(UPSERT_SQL.format(aid=":aggregate_id", pos=":position"))
    UpsertProjection.statement = statement
    ScopedUpsertProjection.statement = statement
    BatchedUpsertProjection.statement = statement


# -- the raw baseline -----------------------------------------------------------------------


class RawLoop:
    """The processor's work hand-written with psycopg 3, one connection, no SQLAlchemy.

    Per batch, one transaction: ``SELECT ... FOR UPDATE`` of its checkpoint row, select
    the next ``batch_size`` events after it (the same columns the processor reads:
    ``EVENT_COLUMNS`` plus ``transaction_id``) as plain tuples, one ``cur.execute`` of
    the same upsert per event (one statement and round trip per event, as the
    handler) -- or, with ``executemany=True``, one ``cur.executemany`` of it for the
    batch (as the batched handler) -- update the checkpoint (position and events
    handled), commit; until a batch comes back short.

    Fairness: the database work per batch is the processor's, statement for statement
    and round trip for round trip (psycopg prepares repeated statements server-side
    after 5 runs on both paths). What the loop leaves out is what the library adds on
    top: sessions and their pool checkout, SQLAlchemy statement caching and result
    processing, a ``PersistedEvent`` per row, and the per-batch logging and
    bookkeeping. It is a slightly *stricter* baseline than that: it reads in plain
    ``global_position`` order, where the processor reads in (transaction id,
    position) order below ``pg_snapshot_xmin(pg_current_snapshot())`` so no event is
    ever skipped (DESIGN invariant 2) -- a hand-written loop that orders by position
    alone can skip events committed out of order. On data committed before the run
    both orders return the same rows and use an index scan each.
    """

    def __init__(
        self, conn: psycopg.Connection[Any], batch_size: int, *, executemany: bool = False
    ) -> None:
        self.conn = conn
        self.batch_size = batch_size
        self.executemany = executemany
        self.name = "raw_upsert_many" if executemany else "raw_upsert"
        columns = sql.SQL(", ").join(sql.Identifier(name) for name in EVENT_COLUMNS)
        self.lock = sql.SQL("SELECT global_position FROM {} WHERE name = %s FOR UPDATE").format(
            sql.Identifier(RAW_CHECKPOINTS)
        )
        self.create = sql.SQL(
            "INSERT INTO {} (name, global_position, events_handled, updated_at) "
            "VALUES (%s, 0, 0, now()) ON CONFLICT DO NOTHING"
        ).format(sql.Identifier(RAW_CHECKPOINTS))
        self.batch = sql.SQL(
            "SELECT {}, transaction_id FROM events WHERE global_position > %s "
            "ORDER BY global_position LIMIT %s"
        ).format(columns)
        self.upsert = UPSERT_SQL.format(aid="%s", pos="%s")
        self.update = sql.SQL(
            "UPDATE {} SET global_position = %s, events_handled = events_handled + %s, "
            "updated_at = %s WHERE name = %s"
        ).format(sql.Identifier(RAW_CHECKPOINTS))

    def run(self, max_batches: int | None = None) -> int:
        """Catch up (or run ``max_batches`` batches); return the events handled."""
        conn, name, size, upsert = self.conn, self.name, self.batch_size, self.upsert
        many = self.executemany
        handled = batches = 0
        with conn.cursor() as cur:
            while max_batches is None or batches < max_batches:
                batches += 1
                cur.execute(self.lock, (name,))
                row = cur.fetchone()
                if row is None:
                    cur.execute(self.create, (name,))
                    cur.execute(self.lock, (name,))
                    row = cur.fetchone()
                    assert row is not None
                cur.execute(self.batch, (row[0], size))
                rows = cur.fetchall()
                if many:
                    if rows:
                        cur.executemany(upsert, [(event[3], event[0]) for event in rows])
                else:
                    for event in rows:
                        cur.execute(upsert, (event[3], event[0]))
                if rows:
                    cur.execute(self.update, (rows[-1][0], len(rows), datetime.now(UTC), name))
                conn.commit()
                handled += len(rows)
                if len(rows) < size:
                    break
        return handled


@dataclass(frozen=True)
class Seeded:
    events: int
    aggregates: int
    rare_events: int
    seconds: float


def aggregate_of(index: int) -> tuple[str, str]:
    """(aggregate_type, aggregate_id) of aggregate number ``index``."""
    kind = RARE if index % RARE_EVERY == 0 else ("User" if index % 2 else "Order")
    return kind, f"{kind.lower()}-{index:07d}"


def seed(conninfo: str, events: int, aggregates: int, per_transaction: int = 20_000) -> Seeded:
    """COPY ``events`` events, round robin over ``aggregates`` aggregates, and their heads.

    Event ``i`` belongs to aggregate ``i % aggregates`` at version ``i // aggregates + 1``,
    so every batch touches many aggregates and the Rare ones (1%) are spread evenly.
    """
    started = time.perf_counter()
    kinds = [aggregate_of(a) for a in range(aggregates)]
    hashes = [fnv1a_32(aggregate_id) for _, aggregate_id in kinds]
    event_type = {RARE: "RareThingHappened", "User": "UserRenamed", "Order": "OrderLinePriced"}
    metadata = json.dumps({"source": "bench", "user": "seed"})
    columns = sql.SQL(", ").join(sql.Identifier(name) for name in EVENT_WRITE_COLUMNS)
    copy_events = sql.SQL("COPY events ({}) FROM STDIN").format(columns)
    rare = 0
    with psycopg.connect(conninfo) as conn:
        for start in range(0, events, per_transaction):
            now = datetime.now(UTC)
            with conn.cursor() as cur, cur.copy(copy_events) as copy:
                for i in range(start, min(events, start + per_transaction)):
                    a = i % aggregates
                    kind, aggregate_id = kinds[a]
                    rare += kind == RARE
                    payload = {"seq": i, "name": f"item-{i}", "amount": 12.5, "tags": ["bench"]}
                    copy.write_row(
                        (
                            BOUNDED_CONTEXT,
                            kind,
                            aggregate_id,
                            i // aggregates + 1,
                            hashes[a],
                            uuid.uuid4(),
                            event_type[kind],
                            1,
                            json.dumps(payload),
                            metadata,
                            None,
                            str(uuid.uuid4()),
                            None,
                            now,
                        )
                    )
            conn.commit()
        copy_heads = sql.SQL(
            "COPY aggregate_heads (bounded_context, aggregate_type, aggregate_id, version) "
            "FROM STDIN"
        )
        with conn.cursor() as cur, cur.copy(copy_heads) as copy:
            for a, (kind, aggregate_id) in enumerate(kinds):
                version = events // aggregates + (a < events % aggregates)
                if version:
                    copy.write_row((BOUNDED_CONTEXT, kind, aggregate_id, version))
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM (ANALYZE) events")
        conn.execute("VACUUM (ANALYZE) aggregate_heads")
    return Seeded(events, aggregates, rare, time.perf_counter() - started)


# -- measuring --------------------------------------------------------------------------------


@dataclass
class Variant:
    """One thing measured: a name, how to run it once, what it must have handled."""

    key: str
    run: Callable[[], int]
    expected_handled: int
    expected_rows: int
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    """CPU time of this (client) process during each run."""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def cpu_us_per_event(self) -> float:
        return statistics.median(self.cpu_seconds) / self.expected_handled * 1e6


class Bench:
    """Connections to the throwaway database and how to run each path on them."""

    def __init__(self, url: sa.URL) -> None:
        self.conninfo = psycopg_conninfo(url)
        self.engine = eventsource.create_engine(url)
        self.store = EventStore()
        self.raw_conn = psycopg.connect(self.conninfo)
        self.admin = psycopg.connect(self.conninfo, autocommit=True)

    def close(self) -> None:
        self.engine.dispose()
        self.raw_conn.close()
        self.admin.close()

    def reset(self) -> None:
        """Empty read model, no checkpoints, nothing dirty in shared buffers."""
        self.admin.execute(
            "DELETE FROM projection_checkpoints WHERE projection_name = ANY(%s)",
            ([projection.name for projection in STORE_PROJECTIONS],),
        )
        self.admin.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(RAW_CHECKPOINTS)))
        self.admin.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(READ_MODEL)))
        self.admin.execute("CHECKPOINT")

    def read_model_state(self) -> tuple[int, int]:
        row = self.admin.execute(
            sql.SQL("SELECT count(*), coalesce(sum(count), 0) FROM {}").format(
                sql.Identifier(READ_MODEL)
            )
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def store_run(self, projection: Projection, batch_size: int) -> Callable[[], int]:
        def run() -> int:
            processor = Processor(self.engine, self.store, ProcessorConfig(batch_size=batch_size))
            return processor.run_until_caught_up(projection)

        return run

    def raw_run(self, batch_size: int, *, executemany: bool = False) -> Callable[[], int]:
        loop = RawLoop(self.raw_conn, batch_size, executemany=executemany)
        return lambda: loop.run()

    def warm_up(self, batches: int = 5) -> None:
        """A few batches of every path: connections, compiled and prepared statements."""
        for size in BATCH_SIZES:
            for projection_type in STORE_PROJECTIONS:
                projection = projection_type()
                processor = Processor(self.engine, self.store, ProcessorConfig(batch_size=size))
                for _ in range(batches):
                    processor.process_batch(projection)
            for executemany in (False, True):
                RawLoop(self.raw_conn, size, executemany=executemany).run(max_batches=batches)
            self.reset()

    def check_duplicate_keys(self) -> None:
        """Both batched paths count an aggregate twice in one batch twice (rolled back).

        An upsert ON CONFLICT DO UPDATE must not touch a row twice in one statement; an
        executemany is one execution per parameter set, so this holds as long as neither
        SQLAlchemy nor psycopg folds the batch into one multi-row INSERT.
        """
        key = "check-duplicate-key"
        now = datetime.now(UTC)
        events = [
            PersistedEvent(
                global_position=version,
                bounded_context=BOUNDED_CONTEXT,
                aggregate_type="Check",
                aggregate_id=key,
                aggregate_version=version,
                event_id=uuid.uuid4(),
                event_type="Checked",
                event_version=1,
                payload={},
                metadata=None,
                causation_id=None,
                correlation_id=None,
                trace_id=None,
                created_at=now,
            )
            for version in (1, 2, 3)
        ]
        count = sa.select(read_model.c.count).where(read_model.c.aggregate_id == key)
        with Session(self.engine) as session:
            BatchedUpsertProjection().handle_batch(events, session)
            session_count = session.execute(count).scalar_one()
            session.rollback()
        upsert = RawLoop(self.raw_conn, len(events)).upsert
        with self.raw_conn.cursor() as cur:
            cur.executemany(
                upsert, [(event.aggregate_id, event.global_position) for event in events]
            )
            cur.execute(
                sql.SQL("SELECT count FROM {} WHERE aggregate_id = %s").format(
                    sql.Identifier(READ_MODEL)
                ),
                (key,),
            )
            raw_row = cur.fetchone()
        self.raw_conn.rollback()
        if (session_count, raw_row) != (len(events), (len(events),)):
            raise RuntimeError(
                f"an aggregate {len(events)} times in one batch counted {session_count} "
                f"(store, batched handler) and {raw_row} (raw executemany)"
            )

    def measure(self, variant: Variant) -> float:
        self.reset()
        started, cpu_started = time.perf_counter(), time.process_time()
        handled = variant.run()
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        rows, total = self.read_model_state()
        if (handled, total, rows) != (
            variant.expected_handled,
            variant.expected_handled,
            variant.expected_rows,
        ):
            raise RuntimeError(
                f"{variant.key}: handled {handled} events into {rows} rows counting {total}, "
                f"expected {variant.expected_handled} events into {variant.expected_rows} rows"
            )
        variant.seconds.append(seconds)
        variant.cpu_seconds.append(cpu_seconds)
        return seconds


def rare_aggregates(seeded: Seeded) -> int:
    present = min(seeded.aggregates, seeded.events)
    return sum(1 for a in range(present) if a % RARE_EVERY == 0)


# -- reporting ----------------------------------------------------------------------------------


def fmt_range(values: Sequence[float], digits: int = 2) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_url_argument(parser)
    parser.add_argument(
        "--events", type=int, default=100_000, help="events in the store (default 100000)"
    )
    parser.add_argument(
        "--aggregates",
        type=int,
        default=None,
        help="aggregates the events are spread over (default events/10; a multiple of "
        f"{RARE_EVERY} keeps the Rare share at exactly 1%%)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default 1)")
    parser.add_argument(
        "--handler",
        choices=("core", "text"),
        default="core",
        help="the handler's upsert: a Core postgresql.insert (default) or sa.text",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 when the issue's target (store per-event handler / raw per-event loop "
        f">= {TARGET_STORE_VS_RAW}) is missed at some batch size",
    )
    args = parser.parse_args(argv)
    if args.aggregates is None:
        args.aggregates = max(RARE_EVERY, args.events // 10)
    if args.events < 1 or args.rounds < 1 or args.aggregates < 1:
        parser.error("--events, --rounds and --aggregates must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    if args.handler == "text":
        use_text_handler()
    admin_url = eventsource.database_url(args.url)
    with throwaway_database(admin_url, "eventsource_bench_proj_") as url:
        return run(args, url)


def run(args: argparse.Namespace, url: sa.URL) -> int:
    eventsource.upgrade(url)
    conninfo = psycopg_conninfo(url)
    settings = server_settings(conninfo, SERVER_SETTINGS)
    engine = sa.create_engine(url)
    try:
        bench_metadata.create_all(engine)
    finally:
        engine.dispose()
    seeded = seed(conninfo, args.events, args.aggregates)
    aggregates = min(seeded.aggregates, seeded.events)

    print("eventsource projection catch-up benchmark (bench/projection.py)")
    print(
        f"PostgreSQL {settings.get('server_version', '?')}: "
        f"fsync={settings.get('fsync', '?')} "
        f"synchronous_commit={settings.get('synchronous_commit', '?')} "
        f"full_page_writes={settings.get('full_page_writes', '?')} "
        f"wal_sync_method={settings.get('wal_sync_method', '?')} "
        f"shared_buffers={settings.get('shared_buffers', '?')}"
    )
    print(
        f"store: {seeded.events:,} events over {aggregates:,} aggregates, "
        f"{seeded.rare_events:,} of them Rare ({seeded.rare_events / seeded.events:.1%}); "
        f"seeded in {seeded.seconds:.1f} s (not measured)"
    )
    print(
        f"handlers: one session.execute({args.handler} upsert) per event (per-event), one "
        f"session.execute({args.handler} upsert, [params]) per batch (batched); "
        f"{args.rounds} interleaved rounds, medians; python {sys.version.split()[0]}, "
        f"SQLAlchemy {sa.__version__}, psycopg {psycopg.__version__}"
    )
    sys.stdout.flush()

    bench = Bench(url)
    try:
        return measure_all(bench, args, seeded, aggregates)
    finally:
        bench.close()


def measure_all(bench: Bench, args: argparse.Namespace, seeded: Seeded, aggregates: int) -> int:
    n = seeded.events
    # Per batch size, in report order: (label, variant).
    variants: dict[int, dict[str, Variant]] = {}
    for size in BATCH_SIZES:
        variants[size] = {
            STORE: Variant(
                f"store/{size}", bench.store_run(UpsertProjection(), size), n, aggregates
            ),
            BATCHED: Variant(
                f"batched/{size}", bench.store_run(BatchedUpsertProjection(), size), n, aggregates
            ),
            RAW: Variant(f"raw/{size}", bench.raw_run(size), n, aggregates),
            RAW_MANY: Variant(
                f"raw-many/{size}", bench.raw_run(size, executemany=True), n, aggregates
            ),
        }
    scoped = Variant(
        f"scoped/{SCOPED_BATCH_SIZE}",
        bench.store_run(ScopedUpsertProjection(), SCOPED_BATCH_SIZE),
        seeded.rare_events,
        rare_aggregates(seeded),
    )
    unscoped = variants[SCOPED_BATCH_SIZE][STORE]

    bench.check_duplicate_keys()
    bench.warm_up()
    started = time.perf_counter()
    ratios: dict[int, dict[str, list[float]]] = {
        size: {key: [] for key, *_ in RATIOS} for size in BATCH_SIZES
    }
    speedups: list[float] = []
    for round_no in range(args.rounds):
        times: dict[str, float] = {}
        order: list[Variant] = []
        for size in BATCH_SIZES:
            v = variants[size]
            for pair in ([v[STORE], v[RAW]], [v[BATCHED], v[RAW_MANY]]):
                order += pair if round_no % 2 == 0 else pair[::-1]
        # The scoped run sits next to the unscoped one it is compared with.
        at = order.index(unscoped)
        order.insert(at + 1 if round_no % 2 == 0 else at, scoped)
        for variant in order:
            times[variant.key] = bench.measure(variant)
        for size in BATCH_SIZES:
            t = {label: times[variant.key] for label, variant in variants[size].items()}
            for key, store_label, raw_label, _, _ in RATIOS:
                if store_label == BEST:
                    ratio = t[RAW] / min(t[STORE], t[BATCHED])
                else:
                    ratio = t[raw_label] / t[store_label]
                ratios[size][key].append(ratio)
        speedups.append(times[unscoped.key] / times[scoped.key])
        line = "  ".join(f"{key} {seconds:.2f}s" for key, seconds in times.items())
        print(f"round {round_no + 1}/{args.rounds}: {line}", file=sys.stderr)
    elapsed = time.perf_counter() - started

    print()
    print(
        f"(a)-(c) catch-up from an empty checkpoint, {n:,} events "
        "(events/s = events handled / median seconds)"
    )
    rows = []
    for size in BATCH_SIZES:
        for label, variant in variants[size].items():
            rows.append(
                [
                    str(size),
                    label,
                    fmt_rate(n / variant.median),
                    f"{variant.median:.2f}",
                    f"{variant.cpu_us_per_event():.0f}",
                ]
            )
    print_table(["batch", "variant", "ev/s", "seconds", "cpu us/ev"], rows, "><>>>")
    print(
        "cpu us/ev: CPU time of this Python process per event (the client-side cost; "
        "less sensitive than wall time to other load on the machine)"
    )

    print()
    print("ratios of throughput (= raw seconds / store seconds, per round; median and range)")
    rows = []
    below_issue = False
    for size in BATCH_SIZES:
        for key, _, _, description, target in RATIOS:
            values = ratios[size][key]
            ratio = statistics.median(values)
            marker = ""
            if target:
                ok = ratio >= TARGET_STORE_VS_RAW
                marker = "PASS" if ok else "BELOW"
                if key == ISSUE:
                    below_issue |= not ok
            rows.append(
                [
                    str(size),
                    description,
                    f"{ratio:.2f}",
                    fmt_range(values),
                    f">= {TARGET_STORE_VS_RAW}" if target else "-",
                    marker,
                ]
            )
    print_table(["batch", "ratio", "median", "per round", "target", ""], rows, "><>><<")
    print(
        f"{RATIO_LABELS[ISSUE]}: the issue's target; "
        f"{RATIO_LABELS[BEST_VS_RAW]}: the faster of the two store handlers, per round"
    )

    print()
    print(
        f"(d) scoped (aggregate_types=({RARE!r},), {seeded.rare_events:,} events) vs unscoped, "
        f"per-event handler, batch {SCOPED_BATCH_SIZE} "
        f"(events/s of the log scanned = {n:,} / seconds to catch up)"
    )
    print_table(
        ["projection", "handled", "seconds", "log ev/s"],
        [
            ["unscoped", f"{n:,}", f"{unscoped.median:.2f}", fmt_rate(n / unscoped.median)],
            [
                "scoped",
                f"{seeded.rare_events:,}",
                f"{scoped.median:.3f}",
                fmt_rate(n / scoped.median),
            ],
        ],
        "<>>>",
    )
    print(
        f"speedup of scoped: {statistics.median(speedups):.1f}x "
        f"(per round {fmt_range(speedups, 1)}; no target in the issue)"
    )
    print()
    load = os.getloadavg()
    print(
        f"measured {args.rounds} rounds in {elapsed:.0f} s; "
        f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs"
    )
    if below_issue:
        print(
            f"BELOW TARGET: {RATIO_LABELS[ISSUE]} < {TARGET_STORE_VS_RAW} at some batch size "
            "(the issue's target)"
        )
        if args.check:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
