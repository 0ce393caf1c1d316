"""Scale-out: catch-up of ONE projection by 1, 2 and 4 worker processes sharing its partitions.

Claimed partitions (``ProcessorConfig(total_partitions=N, claim=True)``, see
``eventsource.claims``) let identical worker processes share the N partitions of one
projection through leases in the database; each process runs the partitions it claims
in threads of its own. This measures what that buys for catching up a backlog:

  - ``--events`` stored events (default 50,000) round robin over ``--aggregates``
    aggregates (default 1,000), seeded once with COPY (not measured);
  - a projection whose handler does read-model work: one upsert per event into a
    counter table keyed by aggregate (count, sum of the payload's amount, last
    position); ``--handler batch`` upserts a batch with one executemany instead;
  - for each worker count (``--workers``, default 1,2,4): a fresh projection name (so
    no checkpoint, claim or worker row of an earlier round), an empty read model and a
    server CHECKPOINT; the workers are started (``multiprocessing``, ``spawn``), each
    builds its engine and processor and says it is ready; then the clock starts, the
    workers are released together, each runs
    ``Processor(engine, store, ProcessorConfig(total_partitions=N, claim=True, ...)).run``,
    and the parent polls the read model (autocommit, no transaction left open) until
    its counts add up to every event: that is the catch-up time. Interpreter start-up
    and imports are not in it; claiming and rebalancing are;
  - then SIGTERM stops the workers (each finishes its batch in hand and releases its
    partitions; a worker that does not exit within ``--stop-timeout`` is killed and the
    run fails), and the read model is checked against the events: every aggregate's
    count, amount and last position, and the checkpoints' ``events_handled``, so every
    event was handled exactly once.

While it catches up the parent also watches the claims table: "first claim" is when a
worker first held a partition (seconds after the start), "spread" how long after that
every worker held its fair share (N divided by the workers); it keeps watching after
the catch-up, up to two leases, when the shares were not reached before. The CPU time
the worker processes used during the catch-up is read from /proc (so is that of their
PostgreSQL backends on a local server), and the machine's busy share from /proc/stat:
on a small machine the workers and the server compete for the same cores, and these
figures show it.

The rounds are interleaved and rotate the order (``--rounds 2``: 1,2,4 then 2,4,1), so
that drift on a shared machine and the first-round position hit every worker count;
the figures are medians over the rounds, and the ratio to 1 worker is taken both of
the medians and within each round (median and range printed).

By default the script creates a throwaway database beside the admin URL (``--url`` /
``EVENTSOURCE_BENCH_PG_URL``, default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``) and drops it at the end,
also on error or interrupt. ``--database-url`` runs in an existing database instead:
the script then creates its tables under names of its own (``scaleout_<hex>_...``) and
drops them at the end. Worker processes are stopped on any exit of the parent (error,
Ctrl+C, SIGTERM); a worker whose parent vanished (SIGKILL) stops by itself.

About 1.5 minutes with the defaults on a 2-core machine (2 rounds of 1, 2 and 4
workers over 50,000 events); ``--rounds 3`` takes about 2 minutes.

Usage::

    python bench/scaleout.py                       # 50k events, 8 partitions, 2 rounds
    python bench/scaleout.py --rounds 3 --events 100000
    python bench/scaleout.py --partitions 12 --workers 1,2,3,4
    python bench/scaleout.py --database-url postgresql://postgres@127.0.0.1/scratch
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import queue
import secrets
import signal
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

import eventsource
from eventsource import EventStore, PersistedEvent, Processor, ProcessorConfig, Projection
from eventsource.models import TableNames
from eventsource.partition import fnv1a_32

# isort: split
# bench/ is this script's directory, so first on sys.path: the benchmarks' shared helpers.
from _common import (
    EVENT_WRITE_COLUMNS,
    add_url_argument,
    exit_on_sigterm,
    fmt_rate,
    print_table,
    psycopg_conninfo,
    throwaway_database,
)

BOUNDED_CONTEXT = "bench"
READ_MODEL = "bench_scaleout_counts"
APP_PREFIX = "es_bench_scaleout"
#: How often the parent polls the read model and the claims while workers catch up.
PARENT_POLL = 0.05


# -- the projection (runs in the workers) ---------------------------------------------------


def read_model_table(name: str) -> sa.Table:
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("aggregate_id", sa.Text, primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("last_position", sa.BigInteger, nullable=False),
    )


def upsert_statement(table: sa.Table) -> sa.Insert:
    """One row per aggregate: how many events, the sum of their amounts, the last one."""
    insert = postgresql.insert(table).values(
        aggregate_id=sa.bindparam("aggregate_id"),
        count=1,
        amount=sa.bindparam("amount"),
        last_position=sa.bindparam("position"),
    )
    return insert.on_conflict_do_update(
        index_elements=[table.c.aggregate_id],
        set_={
            "count": table.c.count + 1,
            "amount": table.c.amount + insert.excluded.amount,
            "last_position": insert.excluded.last_position,
        },
    )


def params_of(event: PersistedEvent) -> dict[str, Any]:
    return {
        "aggregate_id": event.aggregate_id,
        "amount": int(event.payload["amount"]),
        "position": event.global_position,
    }


class CounterProjection(Projection):
    """One upsert per event through the processor's session."""

    name = "bench_scaleout"

    def __init__(self, name: str, read_model: str) -> None:
        self.name = name
        self.upsert = upsert_statement(read_model_table(read_model))

    def handle(self, event: PersistedEvent, session: Session) -> None:
        session.execute(self.upsert, params_of(event))


class BatchedCounterProjection(CounterProjection):
    """The same upsert for a whole batch: one ``session.execute`` with a list (executemany)."""

    def handle_batch(self, events: Sequence[PersistedEvent], session: Session) -> None:
        session.execute(self.upsert, [params_of(event) for event in events])


# -- the worker process ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs (pickled to it by ``spawn``)."""

    url: str
    events_table: str
    heads_table: str
    checkpoints_table: str
    read_model: str
    projection: str
    batched: bool
    partitions: int
    lease: float
    batch_size: int
    poll_interval: float
    application_name: str
    verbose: bool

    def table_names(self) -> TableNames:
        return TableNames(
            events=self.events_table,
            aggregate_heads=self.heads_table,
            projection_checkpoints=self.checkpoints_table,
        )


def worker_main(spec: WorkerSpec, ready: Queue[Any], go: MpEvent) -> None:
    """One identical claiming worker: ready, wait for ``go``, run until SIGTERM."""
    logging.basicConfig(
        level=logging.INFO if spec.verbose else logging.WARNING,
        format=f"%(asctime)s worker {os.getpid()} %(threadName)s %(name)s: %(message)s",
    )
    parent = os.getppid()
    engine = eventsource.create_engine(
        spec.url, application_name=spec.application_name, pool_size=spec.partitions + 2
    )
    try:
        projection_type = BatchedCounterProjection if spec.batched else CounterProjection
        projection = projection_type(spec.projection, spec.read_model)
        config = ProcessorConfig(
            total_partitions=spec.partitions,
            claim=True,
            lease=spec.lease,
            batch_size=spec.batch_size,
            poll_interval=spec.poll_interval,
        )
        processor = Processor(engine, EventStore(table_names=spec.table_names()), config)
        with engine.connect() as conn:  # fail here, not after the start, if unreachable
            conn.execute(sa.text("SELECT 1"))
        ready.put(os.getpid())
        if not go.wait(timeout=120):
            return
        finished = threading.Event()

        def watchdog() -> None:
            """The parent vanished (killed): stop, and exit if stopping takes too long."""
            while not finished.wait(0.5):
                if os.getppid() != parent:
                    processor.stop()
                    if not finished.wait(30):
                        os._exit(3)
                    return

        threading.Thread(target=watchdog, name="watchdog", daemon=True).start()
        try:
            processor.run(projection)  # SIGTERM: batches in hand commit, partitions released
        finally:
            finished.set()
    finally:
        engine.dispose()


# -- the database and the backlog -----------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where the benchmark runs: a URL and the table names in it."""

    url: sa.URL
    names: TableNames
    read_model: str


@contextmanager
def target_database(args: argparse.Namespace) -> Iterator[Target]:
    """A throwaway database (default), or tables of our own in ``--database-url``."""
    if args.database_url is None:
        with throwaway_database(sa.make_url(args.url), "es_bench_scaleout_") as url:
            yield Target(url, TableNames(), READ_MODEL)
        return
    url = eventsource.database_url(args.database_url)
    prefix = f"scaleout_{secrets.token_hex(4)}"
    names = TableNames(
        events=f"{prefix}_events",
        aggregate_heads=f"{prefix}_heads",
        projection_checkpoints=f"{prefix}_checkpoints",
    )
    target = Target(url, names, f"{prefix}_counts")
    try:
        yield target
    finally:
        engine = eventsource.create_engine(url, application_name=APP_PREFIX)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{target.read_model}"'))
            eventsource.downgrade(engine, "base", table_names=names)
            with engine.begin() as conn:
                version = eventsource.database.version_table(names)
                conn.execute(sa.text(f'DROP TABLE IF EXISTS "{version}"'))
        finally:
            engine.dispose()
        print(f"dropped the tables {prefix}_* in {url.database}", file=sys.stderr)


@dataclass(frozen=True)
class Seeded:
    events: int
    aggregates: int
    partition_sizes: list[int]
    seconds: float


def seed(
    conninfo: str,
    names: TableNames,
    events: int,
    aggregates: int,
    partitions: int,
    per_transaction: int = 20_000,
) -> Seeded:
    """COPY ``events`` events round robin over ``aggregates`` aggregates, and their heads.

    Event ``i`` belongs to aggregate ``i % aggregates`` at version ``i // aggregates + 1``
    and carries the amount ``i % 100 + 1``.
    """
    started = time.perf_counter()
    ids = [f"account-{a:06d}" for a in range(aggregates)]
    hashes = [fnv1a_32(aggregate_id) for aggregate_id in ids]
    metadata = json.dumps({"source": "bench", "user": "seed"})
    columns = sql.SQL(", ").join(sql.Identifier(name) for name in EVENT_WRITE_COLUMNS)
    copy_events = sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(names.events), columns)
    sizes = [0] * partitions
    with psycopg.connect(conninfo) as conn:
        for start in range(0, events, per_transaction):
            now = datetime.now(UTC)
            with conn.cursor() as cur, cur.copy(copy_events) as copy:
                for i in range(start, min(events, start + per_transaction)):
                    a = i % aggregates
                    sizes[hashes[a] % partitions] += 1
                    payload = {"seq": i, "amount": i % 100 + 1, "note": f"deposit {i}"}
                    copy.write_row(
                        (
                            BOUNDED_CONTEXT,
                            "Account",
                            ids[a],
                            i // aggregates + 1,
                            hashes[a],
                            uuid.uuid4(),
                            "Deposited",
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
            "COPY {} (bounded_context, aggregate_type, aggregate_id, version) FROM STDIN"
        ).format(sql.Identifier(names.aggregate_heads))
        with conn.cursor() as cur, cur.copy(copy_heads) as copy:
            for a, aggregate_id in enumerate(ids):
                version = events // aggregates + (a < events % aggregates)
                if version:
                    copy.write_row((BOUNDED_CONTEXT, "Account", aggregate_id, version))
        conn.commit()
        conn.autocommit = True
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(names.events)))
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(names.aggregate_heads)))
    return Seeded(events, aggregates, sizes, time.perf_counter() - started)


# -- CPU accounting (best effort: local server, Linux) --------------------------------------


def machine_cpu() -> tuple[float, float] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user
    return total - idle, total


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a local process, or None (not local, gone, not Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- one round --------------------------------------------------------------------------------


@dataclass
class Round:
    """One catch-up by ``workers`` processes."""

    index: int
    workers: int
    seconds: float = 0.0
    first_claim: float | None = None
    spread: float | None = None
    """Seconds from the first claim until every worker held its fair share."""
    worker_cpu: float | None = None
    server_cpu: float | None = None
    machine_busy: float | None = None
    """Share of the machine's CPU time (all cores) busy during the catch-up."""

    def rate(self, events: int) -> float:
        return events / self.seconds


@dataclass
class Bench:
    args: argparse.Namespace
    target: Target
    conninfo: str
    admin: psycopg.Connection[Any]
    ctx: SpawnContext = field(default_factory=lambda: multiprocessing.get_context("spawn"))
    children: list[SpawnProcess] = field(default_factory=list)

    def q(self, name: str) -> sql.Identifier:
        return sql.Identifier(name)

    def reset(self) -> None:
        """Empty read model, nothing dirty in shared buffers."""
        self.admin.execute(sql.SQL("TRUNCATE {}").format(self.q(self.target.read_model)))
        self.admin.execute("CHECKPOINT")

    def forget(self, projection: str) -> None:
        """Delete a finished round's checkpoints, claims and worker rows."""
        names = self.target.names
        for table in (
            names.projection_checkpoints,
            names.partition_claims,
            names.partition_workers,
        ):
            self.admin.execute(
                sql.SQL("DELETE FROM {} WHERE projection_name = %s").format(self.q(table)),
                (projection,),
            )

    def handled(self) -> int:
        row = self.admin.execute(
            sql.SQL("SELECT coalesce(sum(count), 0) FROM {}").format(self.q(self.target.read_model))
        ).fetchone()
        assert row is not None
        return int(row[0])

    def owners(self, projection: str) -> list[str | None]:
        return [
            row[0]
            for row in self.admin.execute(
                sql.SQL("SELECT owner FROM {} WHERE projection_name = %s").format(
                    self.q(self.target.names.partition_claims)
                ),
                (projection,),
            )
        ]

    def backend_cpu(self, application_name: str) -> float | None:
        pids = [
            int(row[0])
            for row in self.admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                (application_name,),
            )
        ]
        times = [process_cpu_seconds(pid) for pid in pids]
        if not times or any(t is None for t in times):
            return None
        return sum(t for t in times if t is not None)

    def mismatches(self, projection: str) -> list[str]:
        """What contradicts exactly-once: aggregates whose row is off, checkpoint totals."""
        names, model = self.target.names, self.target.read_model
        problems = []
        rows = self.admin.execute(
            sql.SQL(
                """SELECT coalesce(e.aggregate_id, m.aggregate_id), e.n, m.count
                FROM (SELECT aggregate_id, count(*) AS n,
                             sum((payload->>'amount')::bigint) AS amount,
                             max(global_position) AS last
                      FROM {events} GROUP BY aggregate_id) e
                FULL JOIN {model} m ON m.aggregate_id = e.aggregate_id
                WHERE e.n IS DISTINCT FROM m.count OR e.amount IS DISTINCT FROM m.amount
                    OR e.last IS DISTINCT FROM m.last_position
                ORDER BY 1 LIMIT 5"""
            ).format(events=self.q(names.events), model=self.q(model))
        ).fetchall()
        for aggregate_id, expected, counted in rows:
            problems.append(f"aggregate {aggregate_id}: {expected} events, counted {counted}")
        row = self.admin.execute(
            sql.SQL(
                "SELECT count(*), coalesce(sum(events_handled), 0) FROM {} "
                "WHERE projection_name = %s"
            ).format(self.q(names.projection_checkpoints)),
            (projection,),
        ).fetchone()
        assert row is not None
        if int(row[0]) != self.args.partitions or int(row[1]) != self.args.events:
            problems.append(
                f"checkpoints: {row[0]} partitions handled {row[1]} events "
                f"(expected {self.args.partitions} and {self.args.events})"
            )
        return problems

    def spec(self, projection: str) -> WorkerSpec:
        names, args = self.target.names, self.args
        return WorkerSpec(
            url=self.target.url.render_as_string(hide_password=False),
            events_table=names.events,
            heads_table=names.aggregate_heads,
            checkpoints_table=names.projection_checkpoints,
            read_model=self.target.read_model,
            projection=projection,
            batched=args.handler == "batch",
            partitions=args.partitions,
            lease=args.lease,
            batch_size=args.batch_size,
            poll_interval=args.poll_interval,
            application_name=f"{APP_PREFIX}_{projection}",
            verbose=args.verbose,
        )

    def workers_cpu(self, procs: Sequence[SpawnProcess]) -> float | None:
        times = [None if p.pid is None else process_cpu_seconds(p.pid) for p in procs]
        if any(t is None for t in times):
            return None
        return sum(t for t in times if t is not None)

    def check_children(self, procs: Sequence[SpawnProcess]) -> None:
        dead = [p for p in procs if p.exitcode is not None]
        if dead:
            codes = ", ".join(f"pid {p.pid}: exit code {p.exitcode}" for p in dead)
            raise RuntimeError(f"a worker ended before it was stopped ({codes})")

    def stop(self, procs: Sequence[SpawnProcess], timeout: float) -> list[SpawnProcess]:
        """SIGTERM (graceful), wait up to ``timeout``; kill what is left, return it."""
        for p in procs:
            if p.exitcode is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        stuck = [p for p in procs if p.exitcode is None]
        for p in stuck:
            p.kill()
            p.join(5)
        return stuck

    def kill_all(self) -> None:
        """On any exit: no worker outlives the parent."""
        left = [p for p in self.children if p.exitcode is None]
        if left:
            print(f"stopping {len(left)} worker process(es)", file=sys.stderr)
            self.stop(left, timeout=10)
        self.children.clear()

    def run_round(self, index: int, workers: int) -> Round:
        args = self.args
        projection = f"scaleout_r{index}_w{workers}"
        spec = self.spec(projection)
        self.reset()
        ready: Queue[Any] = self.ctx.Queue()
        go = self.ctx.Event()
        procs = [
            self.ctx.Process(
                target=worker_main,
                args=(spec, ready, go),
                name=f"scaleout-worker-{i}",
                daemon=True,
            )
            for i in range(workers)
        ]
        self.children.extend(procs)
        for p in procs:
            p.start()
        waiting = workers
        deadline = time.monotonic() + 120
        while waiting:
            try:
                ready.get(timeout=0.5)
                waiting -= 1
            except queue.Empty:
                self.check_children(procs)
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not start within 120 s") from None

        result = Round(index, workers)
        cpu_before = machine_cpu()
        workers_before = self.workers_cpu(procs)
        started = time.perf_counter()
        go.set()
        done: float | None = None
        watch_until = float("inf")
        while True:
            time.sleep(PARENT_POLL)
            now = time.perf_counter() - started
            if done is None:
                self.check_children(procs)
                if self.handled() >= args.events:
                    done = now
                    result.server_cpu = self.backend_cpu(spec.application_name)
                    workers_after = self.workers_cpu(procs)
                    if workers_before is not None and workers_after is not None:
                        result.worker_cpu = workers_after - workers_before
                    cpu_after = machine_cpu()
                    if cpu_before and cpu_after:
                        busy = cpu_after[0] - cpu_before[0]
                        result.machine_busy = busy / max(1.0, cpu_after[1] - cpu_before[1])
                    watch_until = now + 2 * args.lease
                elif now > args.timeout:
                    raise RuntimeError(
                        f"{workers} worker(s) did not catch up within {args.timeout} s "
                        f"({self.handled():,} of {args.events:,} events)"
                    )
            if result.spread is None:
                owners = self.owners(projection)
                held = [o for o in owners if o is not None]
                if held and result.first_claim is None:
                    result.first_claim = now
                per_owner = [held.count(o) for o in set(held)]
                if (
                    len(held) == args.partitions
                    and len(per_owner) == workers
                    and max(per_owner) - min(per_owner) <= 1
                ):
                    assert result.first_claim is not None
                    result.spread = now - result.first_claim
            if done is not None and (result.spread is not None or now > watch_until):
                break
        assert done is not None
        result.seconds = done

        stuck = self.stop(procs, args.stop_timeout)
        for p in procs:
            self.children.remove(p)
        if stuck:
            raise RuntimeError(f"{len(stuck)} worker(s) ignored SIGTERM for {args.stop_timeout} s")
        failed = [p for p in procs if p.exitcode != 0]
        if failed:
            codes = ", ".join(f"pid {p.pid}: {p.exitcode}" for p in failed)
            raise RuntimeError(f"worker(s) exited with an error after SIGTERM: {codes}")
        problems = self.mismatches(projection)
        if problems:
            raise AssertionError(
                f"{workers} worker(s), round {index + 1}: not exactly once: " + "; ".join(problems)
            )
        self.forget(projection)
        return result


# -- report -----------------------------------------------------------------------------------


def order(workers: Sequence[int], r: int) -> list[int]:
    """The worker counts of round ``r``, rotated so none always goes first."""
    k = r % len(workers)
    return [*workers[k:], *workers[:k]]


def fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def median_of(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def report(args: argparse.Namespace, seeded: Seeded, rounds: list[Round]) -> None:
    events = args.events
    counts = args.workers
    by_count = {n: [r for r in rounds if r.workers == n] for n in counts}
    base = counts[0]
    base_rate = statistics.median(r.rate(events) for r in by_count[base])
    per_round: dict[int, list[float]] = {n: [] for n in counts}
    for index in range(args.rounds):
        in_round = {r.workers: r for r in rounds if r.index == index}
        for n in counts:
            per_round[n].append(in_round[n].rate(events) / in_round[base].rate(events))

    handler = "one upsert per event" if args.handler == "per-event" else "one executemany per batch"
    print(
        f"\ncatch-up of one projection, {events:,} events over {seeded.aggregates:,} aggregates, "
        f"{args.partitions} claimed partitions (events per partition "
        f"{min(seeded.partition_sizes):,}..{max(seeded.partition_sizes):,}), lease {args.lease} s, "
        f"batch {args.batch_size}, handler: {handler}; {args.rounds} round(s), "
        f"order rotated per round"
    )
    rows = []
    for n in counts:
        rates = [r.rate(events) for r in by_count[n]]
        ratios = per_round[n]
        rows.append(
            [
                str(n),
                fmt_rate(statistics.median(rates)),
                fmt_rate(min(rates)),
                fmt_rate(max(rates)),
                f"{statistics.median(r.seconds for r in by_count[n]):.2f}",
                f"{statistics.median(rates) / base_rate:.2f}",
                f"{statistics.median(ratios):.2f}",
                f"{min(ratios):.2f}..{max(ratios):.2f}",
            ]
        )
    print_table(
        [
            "workers",
            "events/s",
            "min",
            "max",
            "seconds",
            f"/ {base} worker",
            "per round: median",
            "range",
        ],
        rows,
        ">>>>>>>>",
    )
    print(
        f"events/s: median over rounds (min, max: slowest and fastest round); / {base} worker: "
        f"ratio of the medians; per round: the same ratio within each round"
    )

    rows = []
    for n in counts:
        rs = by_count[n]
        worker_cpu = median_of([r.worker_cpu for r in rs])
        server_cpu = median_of([r.server_cpu for r in rs])
        busy = median_of([r.machine_busy for r in rs])
        rows.append(
            [
                str(n),
                fmt_seconds(median_of([r.first_claim for r in rs])),
                fmt_seconds(median_of([r.spread for r in rs])),
                "-" if worker_cpu is None else f"{worker_cpu / events * 1e6:.0f}",
                "-" if server_cpu is None else f"{server_cpu / events * 1e6:.0f}",
                "-" if busy is None else f"{busy * 100:.0f}%",
            ]
        )
    print()
    print_table(
        [
            "workers",
            "first claim s",
            "spread s",
            "worker CPU us/ev",
            "server CPU us/ev",
            f"machine busy ({os.cpu_count()} CPUs)",
        ],
        rows,
        ">>>>>>",
    )
    unspread = [r for r in rounds if r.spread is None]
    print(
        "first claim: seconds from the start until a worker held a partition; spread: from "
        "then until every worker held its fair share"
        + (
            f" (-: not reached within 2 leases after catching up in {len(unspread)} round(s))"
            if unspread
            else ""
        )
        + "; CPU: all worker processes, and their PostgreSQL backends (local server), per "
        "event; machine busy: all cores, during the catch-up (medians over rounds)"
    )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def parse_workers(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of worker counts: {text!r}") from None
    if not counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"worker counts must be distinct and >= 1: {text!r}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_url_argument(parser)
    parser.add_argument(
        "--database-url",
        default=None,
        help="run in this existing PostgreSQL database instead of a throwaway one (in "
        "tables of the script's own, dropped at the end)",
    )
    parser.add_argument("--events", type=int, default=50_000, help="events in the backlog")
    parser.add_argument("--aggregates", type=int, default=1_000, help="aggregates they span")
    parser.add_argument("--partitions", type=int, default=8, help="total_partitions (default 8)")
    parser.add_argument(
        "--workers",
        type=parse_workers,
        default=[1, 2, 4],
        help="worker process counts, comma-separated (default 1,2,4; ratios are to the first)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--batch-size", type=int, default=100, help="processor batch size")
    parser.add_argument(
        "--handler",
        choices=("per-event", "batch"),
        default="per-event",
        help="per-event: one upsert per event (default); batch: one executemany per batch",
    )
    parser.add_argument("--lease", type=float, default=5.0, help="claim lease (seconds)")
    parser.add_argument(
        "--poll-interval", type=float, default=0.05, help="the workers' poll interval (seconds)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="fail a catch-up that takes longer (s)"
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="seconds a worker has to exit after SIGTERM before it is killed (run fails)",
    )
    parser.add_argument("--verbose", action="store_true", help="the workers log their claims")
    args = parser.parse_args()
    if args.events < 1 or args.aggregates < 1 or args.partitions < 1 or args.rounds < 1:
        parser.error("--events, --aggregates, --partitions and --rounds must be >= 1")
    signal.signal(signal.SIGTERM, exit_on_sigterm)

    with target_database(args) as target:
        setup = eventsource.create_engine(target.url, application_name=APP_PREFIX)
        try:
            eventsource.upgrade(setup, table_names=target.names)
            read_model_table(target.read_model).create(setup)
        finally:
            setup.dispose()
        conninfo = psycopg_conninfo(target.url.set(drivername="postgresql"))
        print(
            f"seeding {args.events:,} events over {args.aggregates:,} aggregates...",
            file=sys.stderr,
        )
        seeded = seed(conninfo, target.names, args.events, args.aggregates, args.partitions)
        print(f"seeded in {seeded.seconds:.1f} s", file=sys.stderr)
        rounds: list[Round] = []
        with psycopg.connect(conninfo, autocommit=True) as admin:
            bench = Bench(args, target, conninfo, admin)
            try:
                for r in range(args.rounds):
                    for n in order(args.workers, r):
                        result = bench.run_round(r, n)
                        rounds.append(result)
                        print(
                            f"round {r + 1}/{args.rounds}: {n} worker(s) caught up in "
                            f"{result.seconds:.2f} s ({fmt_rate(result.rate(args.events))} "
                            f"events/s), spread {fmt_seconds(result.spread)} s; exactly once",
                            file=sys.stderr,
                        )
            finally:
                bench.kill_all()
    report(args, seeded, rounds)


if __name__ == "__main__":
    main()
