"""eventsource against its peer, the eventsourcing library (9.5), on one PostgreSQL, in one run.

Part 1, appends: events per second appended

  (a) 1 event per transaction, one writer;
  (b) 10 events per transaction, one writer;
  (c) 1 event per transaction, 4 writer processes (``--writers``) on distinct
      aggregates, started together (one byte each on a shared pipe), each counting its
      own events: events/s = all events / wall time from the first start to the last end;

through eventsource (``EventStore.append`` in a fresh ``Session`` and transaction,
``ExpectedVersion.exact(v)`` with ``v`` tracked per aggregate, round robin over the
writer's own aggregates, exactly as bench/append.py) and through the peer's PostgreSQL
application recorder (``PostgresApplicationRecorder.insert_events``, its default path,
one call and transaction per append, ``StoredEvent`` s of one aggregate with
``originator_version`` tracked per aggregate, its tables made by its ``create_table()``
in a schema of their own). Both write the same ~200-byte JSON payload (the peer: as
bytes, JSON-encoded as its transcoder does). Every writer runs in a worker process of its
own (``bench/_peer_worker.py``, one Engine or one peer datastore per process), in (a) and
(b) too. Targets (eventsource / peer, ratio of medians): >= 1.3 at (a), >= 1.2 at (b),
>= 2.5 at (c) -- the peer serialises its writers with a table lock.

Part 2, projection catch-up: the same ``--catch-up-events`` events (default 100,000,
round robin over one tenth as many aggregates, same payloads) are seeded into both
stores, not measured: eventsource's by COPY into its tables (emptied of part 1's appends
first), the peer's by ``insert_events`` in batches of 1,000 into its application's own
table. Then each side runs a counter projection over the whole log from the start, in
a fresh process (``bench/_peer_worker.py``, importing that side's library only):

  - eventsource: a ``Projection`` whose ``handle`` runs ``UPDATE counter SET n = n + 1``
    through the batch's session, caught up by ``Processor.run_until_caught_up`` with the
    default ``ProcessorConfig`` (batches of 100, one transaction per batch);
  - the peer: its ``ProjectionRunner`` (application, subscription, processing thread)
    with a view, its PostgreSQL tracking recorder plus one method that runs the same
    UPDATE and inserts the tracking record in one transaction (one per event, the peer's
    design), stopped once the projection has processed every event.

Printed: events/s (events / time from starting the processor or runner to the last
event processed), the ratio, the CPU time of that process per event, and its peak RSS:
``VmHWM`` from /proc/self/status (beside it, the same before the run: interpreter,
imports, set-up). Not ``ru_maxrss``: on Linux a child's includes its parent's resident
size, which fork and exec carry over (printed too, to show it). No target.

The machine is shared and noisy, so the variants run interleaved: every round runs
each variant once, the order of the two sides alternating by round, and the figures are
per-variant medians over the rounds; the ratio within each round (back to back) is
printed too, as median and range. The client's CPU per transaction (each writer
process's own) is printed beside: steadier than wall time on a loaded machine.

The script installs nothing: without the peer it says so and exits 2. It creates its own
throwaway database next to the admin URL's (``--url`` / ``EVENTSOURCE_BENCH_PG_URL``,
default ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``), migrates it with
``eventsource.upgrade`` and drops it at the end, also on error or interrupt.

Usage::

    pip install -e '.[bench]'              # the peer
    python bench/peer.py                   # about 8 minutes, most of it the peer's catch-up
    python bench/peer.py --only append --seconds 1 --rounds 3
    python bench/peer.py --only projection --catch-up-events 20000 --catch-up-rounds 1
    python bench/peer.py --check           # exit 1 when an append ratio is below its target
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql

import eventsource
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
from _peer_worker import (
    AGGREGATE_TYPE,
    BOUNDED_CONTEXT,
    COUNTER_NAME,
    ES_COUNTER_TABLE,
    ES_PROJECTION_NAME,
    EVENT_TYPE,
    PEER_APP_NAME,
    PEER_APP_TABLE,
    PEER_APPEND_TABLE,
    PEER_COUNTER_TABLE,
    PEER_SCHEMA,
    PEER_TOPIC,
    PEER_TRACKING_TABLE,
    AppendSpec,
    CatchUpSpec,
    Database,
    encode_payload,
    make_payload,
    seeded_aggregate_id,
    seeded_originator_id,
    spec_json,
)

NEEDS_PEER = "this benchmark needs the peer: pip install -e '.[bench]'"
WORKER = str(Path(__file__).with_name("_peer_worker.py"))

ES, PEER = "eventsource", "peer"
SIDES = (ES, PEER)
LABELS = {ES: "eventsource", PEER: "eventsourcing 9.5"}

TARGET_A = 1.3
TARGET_B = 1.2
TARGET_C = 2.5

#: Events per peer ``insert_events`` call when seeding the catch-up log.
PEER_SEED_BATCH = 1000

#: The server settings printed in the report's header.
SERVER_SETTINGS = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "wal_sync_method",
    "commit_delay",
)


def peer_version() -> str | None:
    """The peer's version, or None when it (or its PostgreSQL extra) cannot be imported."""
    try:
        import eventsourcing.postgres  # noqa: F401
    except ImportError:
        return None
    return importlib.metadata.version("eventsourcing")


# -- worker processes ------------------------------------------------------------------


class Worker:
    """One ``_peer_worker.py append`` process and its command/answer lines."""

    def __init__(self, spec: AppendSpec) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, "append", spec_json(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=(spec.go_fd,),
        )

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"writer process {self.proc.pid} exited ({self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self) -> None:
        """Ask it to stop, then end it by its pid if it does not within 30 s."""
        try:
            self.send({"cmd": "stop"})
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass(frozen=True)
class Measurement:
    events: int
    transactions: int
    seconds: float
    #: CPU time of the writer processes, summed (the client's own cost).
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


class Writers:
    """The writer processes of the append part, and the pipe that starts them together."""

    def __init__(self, db: Database, count: int, aggregates: int) -> None:
        self.go_read, self.go_write = os.pipe()
        self.workers: list[Worker] = []
        #: Events appended per side, warm-up included (checked against the tables).
        self.appended = dict.fromkeys(SIDES, 0)
        try:
            for writer in range(count):
                spec = AppendSpec(db=db, writer=writer, aggregates=aggregates, go_fd=self.go_read)
                self.workers.append(Worker(spec))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        os.close(self.go_read)
        os.close(self.go_write)

    def measure(
        self,
        case: Case,
        side: str,
        *,
        seconds: float | None = None,
        transactions: int | None = None,
    ) -> Measurement:
        """Events/s of one side in one case: its writers start together and run at once."""
        active = self.workers[: case.writers]
        barrier = len(active) > 1
        command = {
            "side": side,
            "case": case.code,
            "batch": case.batch,
            "seconds": seconds,
            "transactions": transactions,
            "barrier": barrier,
        }
        for worker in active:
            worker.send(command)
        for worker in active:
            if not worker.receive().get("ready"):
                raise RuntimeError(f"writer process {worker.proc.pid} is not ready")
        if barrier:
            os.write(self.go_write, b"g" * len(active))
        answers = [worker.receive() for worker in active]
        self.appended[side] += sum(int(a["events"]) for a in answers)
        start = min(float(a["start"]) for a in answers)
        end = max(float(a["end"]) for a in answers)
        return Measurement(
            events=sum(int(a["events"]) for a in answers),
            transactions=sum(int(a["transactions"]) for a in answers),
            seconds=end - start,
            cpu_seconds=sum(float(a["cpu"]) for a in answers),
        )


# -- part 1: appends -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    code: str
    label: str
    batch: int
    writers: int
    target: float


def create_peer_append_table(db: Database) -> None:
    """The peer's events table of the append part, made by its own ``create_table()``."""
    from eventsourcing.postgres import PostgresApplicationRecorder

    datastore = db.peer_datastore()
    try:
        PostgresApplicationRecorder(datastore, events_table_name=PEER_APPEND_TABLE).create_table()
    finally:
        datastore.close()


def stored_events(conninfo: str) -> dict[str, int]:
    """How many events each side's table of the append part holds."""
    tables = {ES: sql.Identifier("events"), PEER: sql.Identifier(PEER_SCHEMA, PEER_APPEND_TABLE)}
    counts = {}
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for side, table in tables.items():
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
            assert row is not None
            counts[side] = int(row[0])
    return counts


def run_appends(args: argparse.Namespace, conninfo: str, db: Database) -> bool:
    """Part 1; True when a ratio is below its target."""
    create_peer_append_table(db)
    w = args.writers
    cases = [
        Case("a", "(a) 1 event/tx", 1, 1, TARGET_A),
        Case("b", "(b) 10 events/tx", 10, 1, TARGET_B),
        Case("c", f"(c) {w} writer processes, 1 event/tx", 1, w, TARGET_C),
    ]
    print(
        f"Part 1, appends: interleaved rounds: {args.rounds}, {args.seconds:g} s per "
        f"measurement; {args.aggregates} aggregates per writer, round robin, versions "
        "tracked per aggregate; one writer process per writer, ~200-byte JSON payload"
    )
    sys.stdout.flush()

    results: dict[tuple[str, str], list[Measurement]] = {}
    writers = Writers(db, w, args.aggregates)
    try:
        # Warm-up (not measured): creates every aggregate (so measured appends move
        # existing ones on), makes the connections, lets psycopg prepare statements.
        for case in cases:
            for side in SIDES:
                writers.measure(case, side, transactions=args.aggregates + 10)
        for rnd in range(args.rounds):
            for case in cases:
                for side in SIDES if rnd % 2 == 0 else SIDES[::-1]:
                    m = writers.measure(case, side, seconds=args.seconds)
                    results.setdefault((case.code, side), []).append(m)
            print(f"append round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        writers.close()
    stored = stored_events(conninfo)
    if stored != writers.appended:
        raise RuntimeError(
            f"the writers appended {writers.appended} events, the tables hold {stored}"
        )

    medians = {key: statistics.median(m.rate for m in ms) for key, ms in results.items()}
    rows = []
    for case in cases:
        for side in SIDES:
            ms = results[(case.code, side)]
            rates = [m.rate for m in ms]
            wall_per_tx = statistics.median(m.seconds * case.writers / m.transactions for m in ms)
            cpu_per_tx = statistics.median(m.cpu_seconds / m.transactions for m in ms)
            rows.append(
                [
                    case.label if side == SIDES[0] else "",
                    LABELS[side],
                    fmt_rate(medians[(case.code, side)]),
                    fmt_rate(min(rates)),
                    fmt_rate(max(rates)),
                    f"{1000 * wall_per_tx:.2f}",
                    f"{1000 * cpu_per_tx:.2f}",
                ]
            )
    print()
    print_table(
        ["case", "variant", "events/s", "min", "max", "ms/tx", "client CPU ms/tx"],
        rows,
        "<<>>>>>",
    )
    print(
        "events/s: median over rounds (min, max: slowest and fastest round); ms/tx: wall "
        "time per transaction per writer (median); client CPU: the writer processes' CPU "
        "per transaction (median)"
    )
    print()

    below = False
    ratio_rows = []
    for case in cases:
        value = medians[(case.code, ES)] / medians[(case.code, PEER)]
        paired = [
            e.rate / p.rate
            for e, p in zip(results[(case.code, ES)], results[(case.code, PEER)], strict=True)
        ]
        ok = value >= case.target
        below = below or not ok
        ratio_rows.append(
            [
                f"{case.label}: eventsource / peer",
                f"{value:.2f}",
                f"{statistics.median(paired):.2f}",
                f"{min(paired):.2f}..{max(paired):.2f}",
                f">= {case.target:.1f}",
                "PASS" if ok else "BELOW",
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
    return below


# -- part 2: projection catch-up -------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    events: int
    aggregates: int
    eventsource_seconds: float
    peer_seconds: float


def create_catch_up_tables(conninfo: str, db: Database) -> None:
    """Both counters (one row each); the peer's events and tracking tables, by its
    own ``create_table()`` (the catch-up process then runs with ``CREATE_TABLE=n``)."""
    from eventsourcing.postgres import PostgresApplicationRecorder, PostgresTrackingRecorder

    with psycopg.connect(conninfo, autocommit=True) as conn:
        for schema, table in (("public", ES_COUNTER_TABLE), (PEER_SCHEMA, PEER_COUNTER_TABLE)):
            name = sql.Identifier(schema, table)
            conn.execute(
                sql.SQL("CREATE TABLE {} (name text PRIMARY KEY, n bigint NOT NULL)").format(name)
            )
            conn.execute(sql.SQL("INSERT INTO {} VALUES (%s, 0)").format(name), (COUNTER_NAME,))
    datastore = db.peer_datastore()
    try:
        PostgresApplicationRecorder(datastore, events_table_name=PEER_APP_TABLE).create_table()
        PostgresTrackingRecorder(datastore, tracking_table_name=PEER_TRACKING_TABLE).create_table()
    finally:
        datastore.close()


def seed(conninfo: str, db: Database, events: int, aggregates: int) -> Seeded:
    """The same ``events`` events into both stores, round robin over ``aggregates``.

    Event ``i`` belongs to aggregate ``i % aggregates`` at version ``i // aggregates + 1``
    and carries ``make_payload(i)``: eventsource's by COPY (events and aggregate_heads,
    in transactions of 20,000), the peer's by ``insert_events`` in batches of 1,000, in
    the same order.
    """
    from eventsourcing.persistence import StoredEvent
    from eventsourcing.postgres import PostgresApplicationRecorder

    started = time.perf_counter()
    ids = [seeded_aggregate_id(a) for a in range(aggregates)]
    hashes = [fnv1a_32(aggregate_id) for aggregate_id in ids]
    columns = sql.SQL(", ").join(sql.Identifier(name) for name in EVENT_WRITE_COLUMNS)
    copy_events = sql.SQL("COPY events ({}) FROM STDIN").format(columns)
    per_transaction = 20_000
    with psycopg.connect(conninfo) as conn:
        for start in range(0, events, per_transaction):
            now = datetime.now(UTC)
            with conn.cursor() as cur, cur.copy(copy_events) as copy:
                for i in range(start, min(events, start + per_transaction)):
                    a = i % aggregates
                    copy.write_row(
                        (
                            BOUNDED_CONTEXT,
                            AGGREGATE_TYPE,
                            ids[a],
                            i // aggregates + 1,
                            hashes[a],
                            uuid.uuid4(),
                            EVENT_TYPE,
                            1,
                            json.dumps(make_payload(i)),
                            None,
                            None,
                            None,
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
            for a, aggregate_id in enumerate(ids):
                version = events // aggregates + (a < events % aggregates)
                if version:
                    copy.write_row((BOUNDED_CONTEXT, AGGREGATE_TYPE, aggregate_id, version))
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM (ANALYZE) events")
        conn.execute("VACUUM (ANALYZE) aggregate_heads")
    eventsource_seconds = time.perf_counter() - started

    started = time.perf_counter()
    originator_ids = [seeded_originator_id(a) for a in range(aggregates)]
    datastore = db.peer_datastore()
    try:
        recorder = PostgresApplicationRecorder(datastore, events_table_name=PEER_APP_TABLE)
        for start in range(0, events, PEER_SEED_BATCH):
            recorder.insert_events(
                [
                    StoredEvent(
                        originator_id=originator_ids[i % aggregates],
                        originator_version=i // aggregates + 1,
                        topic=PEER_TOPIC,
                        state=encode_payload(make_payload(i)),
                    )
                    for i in range(start, min(events, start + PEER_SEED_BATCH))
                ]
            )
    finally:
        datastore.close()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(
            sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(PEER_SCHEMA, PEER_APP_TABLE))
        )
    return Seeded(events, aggregates, eventsource_seconds, time.perf_counter() - started)


@dataclass
class CatchUps:
    """What the catch-up processes of one side reported, one entry per round."""

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peak_rss_mib: list[float] = field(default_factory=list)
    ru_maxrss_mib: list[float] = field(default_factory=list)
    setup_rss_mib: list[float] = field(default_factory=list)


def reset_catch_up(conninfo: str) -> None:
    """Both counters at zero, no checkpoint or tracking record, nothing dirty in buffers."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for schema, table in (("public", ES_COUNTER_TABLE), (PEER_SCHEMA, PEER_COUNTER_TABLE)):
            conn.execute(sql.SQL("UPDATE {} SET n = 0").format(sql.Identifier(schema, table)))
        conn.execute(
            "DELETE FROM projection_checkpoints WHERE projection_name = %s", (ES_PROJECTION_NAME,)
        )
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE application_name = %s").format(
                sql.Identifier(PEER_SCHEMA, PEER_TRACKING_TABLE)
            ),
            (PEER_APP_NAME,),
        )
        conn.execute("CHECKPOINT")


def counter_value(conninfo: str, side: str) -> int:
    schema, table = (
        ("public", ES_COUNTER_TABLE) if side == ES else (PEER_SCHEMA, PEER_COUNTER_TABLE)
    )
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT n FROM {} WHERE name = %s").format(sql.Identifier(schema, table)),
            (COUNTER_NAME,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def catch_up(conninfo: str, db: Database, side: str, events: int) -> dict[str, Any]:
    """One catch-up of ``side`` in a fresh process; checks that it counted every event."""
    reset_catch_up(conninfo)
    timeout = 120 + events / 50
    spec = CatchUpSpec(db=db, side=side, events=events, timeout=timeout)
    done = subprocess.run(
        [sys.executable, WORKER, "catch-up", spec_json(spec)],
        stdout=subprocess.PIPE,
        text=True,
        timeout=timeout + 60,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    counted = counter_value(conninfo, side)
    if (int(result["handled"]), counted) != (events, events):
        raise RuntimeError(
            f"{side}: handled {result['handled']} events and counted {counted}, expected {events}"
        )
    return result


def run_catch_up(args: argparse.Namespace, conninfo: str, db: Database) -> None:
    """Part 2."""
    n = args.catch_up_events
    aggregates = max(1, n // 10)
    create_catch_up_tables(conninfo, db)
    seeded = seed(conninfo, db, n, aggregates)
    print(
        f"Part 2, projection catch-up: {n:,} events over {aggregates:,} aggregates in each "
        f"store (seeded in {seeded.eventsource_seconds:.1f} s eventsource, "
        f"{seeded.peer_seconds:.1f} s peer; not measured); catch-up rounds: "
        f"{args.catch_up_rounds}, sides alternating, each catch-up in a fresh process"
    )
    sys.stdout.flush()

    results = {side: CatchUps() for side in SIDES}
    for rnd in range(args.catch_up_rounds):
        times = {}
        for side in SIDES if rnd % 2 == 0 else SIDES[::-1]:
            reported = catch_up(conninfo, db, side, n)
            results[side].seconds.append(float(reported["seconds"]))
            results[side].cpu_seconds.append(float(reported["cpu"]))
            results[side].peak_rss_mib.append(float(reported["peak_rss_mib"]))
            results[side].ru_maxrss_mib.append(float(reported["ru_maxrss_mib"]))
            results[side].setup_rss_mib.append(float(reported["setup_rss_mib"]))
            times[side] = float(reported["seconds"])
        line = "  ".join(f"{side} {seconds:.2f}s" for side, seconds in times.items())
        print(
            f"catch-up round {rnd + 1}/{args.catch_up_rounds}: {line}", file=sys.stderr, flush=True
        )

    rows = []
    for side in SIDES:
        r = results[side]
        seconds = statistics.median(r.seconds)
        rows.append(
            [
                LABELS[side],
                fmt_rate(n / seconds),
                f"{seconds:.2f}",
                f"{min(r.seconds):.2f}..{max(r.seconds):.2f}",
                f"{statistics.median(r.cpu_seconds) / n * 1e6:.0f}",
                f"{max(r.peak_rss_mib):.1f}",
                f"{max(r.setup_rss_mib):.1f}",
            ]
        )
    print()
    print_table(
        ["variant", "events/s", "seconds", "range", "CPU us/ev", "peak RSS MiB", "before run"],
        rows,
        "<>>>>>>",
    )
    paired = [
        peer_seconds / es_seconds
        for es_seconds, peer_seconds in zip(results[ES].seconds, results[PEER].seconds, strict=True)
    ]
    value = statistics.median(results[PEER].seconds) / statistics.median(results[ES].seconds)
    print(
        f"eventsource / peer: {value:.2f} (ratio of medians; per round median "
        f"{statistics.median(paired):.2f}, range {min(paired):.2f}..{max(paired):.2f}; no target)"
    )
    print(
        "events/s: events / median seconds from starting the processor (runner) to its last "
        "event; CPU: that process's, per event (median); peak RSS: its VmHWM, the largest "
        "over rounds; before run: the same after imports and set-up"
    )
    ru = ", ".join(f"{side} {max(results[side].ru_maxrss_mib):.1f}" for side in SIDES)
    print(
        f"(ru_maxrss of the same processes, MiB: {ru} -- not their own: Linux counts this "
        "parent's resident size in a child's)"
    )


# -- main ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_url_argument(parser)
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="duration of each append measurement (default 3)"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved append rounds (default 5)"
    )
    parser.add_argument(
        "--writers", type=int, default=4, help="writer processes in (c) (default 4)"
    )
    parser.add_argument(
        "--aggregates", type=int, default=100, help="aggregates per writer (default 100)"
    )
    parser.add_argument(
        "--catch-up-events",
        type=int,
        default=100_000,
        help="events seeded for the catch-up (default 100000)",
    )
    parser.add_argument(
        "--catch-up-rounds", type=int, default=3, help="catch-ups per side (default 3)"
    )
    parser.add_argument(
        "--only", choices=("append", "projection"), default=None, help="run one part only"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when an append ratio is below its target"
    )
    args = parser.parse_args(argv)
    counts = (
        args.rounds,
        args.writers,
        args.aggregates,
        args.catch_up_events,
        args.catch_up_rounds,
    )
    if min(counts) < 1:
        parser.error(
            "--rounds, --writers, --aggregates, --catch-up-events and --catch-up-rounds "
            "must be >= 1"
        )
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    version = peer_version()
    if version is None:
        print(NEEDS_PEER, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    admin_url = eventsource.database_url(args.url)
    with throwaway_database(admin_url, "eventsource_bench_peer_") as url:
        return run(args, url, version)


def database(url: sa.URL) -> Database:
    return Database(
        url=url.render_as_string(hide_password=False),
        dbname=url.database or "",
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password or "",
    )


@contextmanager
def reporting_load() -> Iterator[None]:
    started = time.perf_counter()
    yield
    load = os.getloadavg()
    print()
    print(
        f"measured in {time.perf_counter() - started:.0f} s; load average "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs"
    )


def run(args: argparse.Namespace, url: sa.URL, version: str) -> int:
    eventsource.upgrade(url)
    conninfo = psycopg_conninfo(url)
    settings = server_settings(conninfo, SERVER_SETTINGS)
    db = database(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(PEER_SCHEMA)))

    print("eventsource against eventsourcing (bench/peer.py)")
    print_setup(settings, url)
    print(
        f"peer: eventsourcing {version} (PostgreSQL recorders, schema {PEER_SCHEMA!r}), "
        f"psycopg_pool {importlib.metadata.version('psycopg-pool')}"
    )
    print()
    sys.stdout.flush()

    below = False
    with reporting_load():
        if args.only in (None, "append"):
            below = run_appends(args, conninfo, db)
        if args.only is None:
            print()
            # The catch-up reads the whole log: empty eventsource's store of the appends
            # (the peer's catch-up reads a table of its own, holding the seeded events only).
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute("TRUNCATE events, aggregate_heads")
        if args.only in (None, "projection"):
            run_catch_up(args, conninfo, db)
    return 1 if args.check and below else 0


if __name__ == "__main__":
    sys.exit(main())
