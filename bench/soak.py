"""Soak: writers and projection workers run while PostgreSQL is restarted under them.

What it does (issue #10). It starts a throwaway PostgreSQL cluster of its own
(``tests/pg_cluster.py``: ``initdb`` + ``pg_ctl`` on a free port; the shared server is
never touched), creates a database, migrates it with ``eventsource.upgrade`` and runs,
all at once:

- ``--writers`` threads appending one to three events at a time to shared ``Order``
  and ``Account`` aggregates through ``eventsource.run_in_transaction`` (many attempts,
  backoff capped at 0.5 s), so that they ride out the restarts. An append whose commit
  happened but whose acknowledgement was lost is retried with the same events (same
  ``event_id``) and then fails with ``DuplicateEventError``: that counts as committed
  ("ack lost, committed");
- one ``eventsource.Runner`` (in a thread, ``handle_signals=False``) with three
  projections on the default ``RetryPolicy`` and ``poll_interval`` 0.05 s: ``soak_audit``
  (every event, ``handle_batch``), ``soak_orders`` (scoped to ``Order``, ``handle``) and
  ``soak_ledger`` (every event, two partitions, ``handle``). Each writes an insert-only
  read model with no key (``event_id``, ``global_position``), so an event applied twice
  shows as an extra row. A metrics object records when each batch committed and when
  each transient failure was retried;
- every ``--restart-every`` seconds, ``--restarts`` times, the server is stopped with
  ``pg_ctl -m fast`` (or ``--mode immediate``), kept down ``--down`` seconds and started
  again. A probe connects every 5 ms meanwhile, to time when the server accepts
  connections again.

After the last restart it lets everything run one more period, stops the writers, waits
(at most ``--catch-up-timeout`` seconds) until every projection partition has no lag,
stops the runner and prints:

- events: acknowledged to the writers, in the store, acknowledged but missing from the
  store, in the store but never acknowledged (an append whose outcome the writer never
  learnt), writer retries and failures;
- per projection: events in its scope, rows, distinct events, lost (in scope but not
  in the read model), doubled (rows minus distinct events), foreign (rows matching no
  event of its scope with the same id and position);
- per restart: the server's down time, and per projection partition (and the writers)
  the transient failures retried and the "resume" time, from the moment the server
  accepted connections again to the first batch that committed (``resume s``) and to
  the first that handled events (``events s``); for the writers, to the first
  acknowledged append;
- whether the runner ever raised (then a fresh runner catches up, so the read models
  can still be checked).

Exit code 1 when anything was lost, doubled or foreign, when an acknowledged event is
missing although the server was meant to keep it (below), when the runner raised or a
projection did not catch up: the script doubles as a check.

``--mode immediate`` and the server's own losses. The throwaway cluster runs with
``fsync=off`` and ``synchronous_commit=off`` (it is built for fast tests). ``fsync=off``
does not matter here: it only loses data when the operating system crashes, and it
does not. ``synchronous_commit=off`` does: a commit is acknowledged before its WAL
record leaves PostgreSQL's memory (the WAL writer writes it out within about
3 x ``wal_writer_delay``, 600 ms), so an immediate shutdown, which is a crash of the
server's processes, can lose commits that were already acknowledged. Those are
reported as "acknowledged but missing from the store" and, in that configuration only,
do not fail the check: the server lost them, not the library. They cannot cause lost
or doubled read-model rows: WAL is replayed as a prefix, so a projection's batch,
committed after the events it read, survives only if they do. A fast shutdown writes
everything out first, so nothing acknowledged may go missing; neither may anything
with ``--synchronous-commit on`` (set on the soak database), which makes
``--mode immediate`` a check of acknowledged appends too.

Logs: ``-v`` prints the library's and this script's INFO logs with millisecond
timestamps (every retry with its cause and wait, every batch, each restart step), the
way to see where the time went when a resume is slow; ``-vv`` adds DEBUG (idle polls).

Usage::

    python bench/soak.py                                   # 3 fast restarts, 5 s apart
    python bench/soak.py --mode immediate --restarts 2
    python bench/soak.py --mode immediate --synchronous-commit on
    python bench/soak.py --restarts 10 --restart-every 3 --down 2 -v
"""

from __future__ import annotations

import argparse
import functools
import logging
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import eventsource
from eventsource import (
    BatchResult,
    DuplicateEventError,
    Event,
    EventStore,
    ExpectedVersion,
    PersistedEvent,
    Processor,
    ProcessorConfig,
    Projection,
    RetryPolicy,
    Runner,
)
from eventsource.retry import describe, is_transient
from eventsource.status import status

# isort: split
# bench/ is this script's directory, so first on sys.path: the benchmarks' shared helpers.
from _common import exit_on_sigterm, print_table, psycopg_conninfo

# The repository root, for the throwaway cluster of the test suite (not installed).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.pg_cluster import Cluster, throwaway_cluster

logger = logging.getLogger("soak")

DATABASE = "soak"
BOUNDED_CONTEXT = "soak"
AGGREGATE_TYPES = ("Order", "Account")
#: Writers retry for as long as a restart may take; the backoff is capped well below it.
WRITER_ATTEMPTS = 10_000
WRITER_POLICY = RetryPolicy(initial_backoff=0.01, max_backoff=0.5, budget=None)
POLL_INTERVAL = 0.05
PROBE_INTERVAL = 0.005
#: The cause of a writer's retry after another writer appended to its aggregate first.
CONFLICT = "OptimisticConcurrencyError"
#: max_connections of the throwaway cluster is 20: writers, workers, probe and checks.
MAX_WRITERS = 10


# -- projections: insert-only read models, doubles show as extra rows ----------------------


def _insert(table: str) -> sa.TextClause:
    return sa.text(f"INSERT INTO {table} (event_id, global_position) VALUES (:id, :pos)")


class Audit(Projection):
    """Every event; the whole batch in one executemany (``handle_batch``)."""

    name = "soak_audit"

    def handle_batch(self, events: Sequence[PersistedEvent], session: Session) -> None:
        session.execute(
            _insert(self.name), [{"id": e.event_id, "pos": e.global_position} for e in events]
        )


class Orders(Projection):
    """Order events only (scoped in SQL), one statement per event."""

    name = "soak_orders"
    aggregate_types = ("Order",)

    def handle(self, event: PersistedEvent, session: Session) -> None:
        session.execute(_insert(self.name), {"id": event.event_id, "pos": event.global_position})


class Ledger(Projection):
    """Every event, run as two partitions, one statement per event."""

    name = "soak_ledger"
    partitions = 2

    def handle(self, event: PersistedEvent, session: Session) -> None:
        session.execute(_insert(self.name), {"id": event.event_id, "pos": event.global_position})


PROJECTIONS: tuple[Projection, ...] = (Audit(), Orders(), Ledger())


def partitions(projection: Projection) -> int:
    return int(getattr(projection, "partitions", 1))


def scope_sql(projection: Projection) -> str:
    """The projection's scope as a condition on ``events e``."""
    if projection.aggregate_types:
        names = ", ".join(f"'{name}'" for name in projection.aggregate_types)
        return f"e.aggregate_type IN ({names})"
    return "TRUE"


# -- what happened, with times --------------------------------------------------------------


Key = str  # "projection/partition", or "writers"
WRITERS = "writers"


@dataclass
class Recorder:
    """The processors' metrics hook and the writers' outcomes, with monotonic times."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: (time, handled) of every committed batch, idle polls included.
    batches: dict[Key, list[tuple[float, int]]] = field(default_factory=dict)
    #: (time, cause) of every transient failure retried.
    retries: dict[Key, list[tuple[float, str]]] = field(default_factory=dict)
    failed_batches: dict[Key, int] = field(default_factory=dict)
    acked: list[uuid.UUID] = field(default_factory=list)
    ack_lost: list[uuid.UUID] = field(default_factory=list)
    #: Appends that ran out of attempts or failed otherwise: outcome unknown.
    unknown: list[uuid.UUID] = field(default_factory=list)
    writer_errors: list[str] = field(default_factory=list)

    # ProcessorMetrics, plus the optional batch_retried hook.
    def batch_completed(self, projection: str, partition: int, result: BatchResult) -> None:
        with self.lock:
            self.batches.setdefault(f"{projection}/{partition}", []).append(
                (time.monotonic(), result.handled)
            )

    def batch_failed(self, projection: str, partition: int) -> None:
        with self.lock:
            key = f"{projection}/{partition}"
            self.failed_batches[key] = self.failed_batches.get(key, 0) + 1

    def batch_retried(self, projection: str, partition: int, cause: str) -> None:
        self.retried(f"{projection}/{partition}", cause)

    def retried(self, key: Key, cause: str) -> None:
        with self.lock:
            self.retries.setdefault(key, []).append((time.monotonic(), cause))

    def appended(self, events: Sequence[Event], outcome: str) -> None:
        ids = [event.event_id for event in events]
        with self.lock:
            {"acked": self.acked, "ack lost": self.ack_lost, "unknown": self.unknown}[
                outcome
            ].extend(ids)
            if outcome != "unknown":
                self.batches.setdefault(WRITERS, []).append((time.monotonic(), len(ids)))


@dataclass
class Restart:
    number: int
    began: float
    """``pg_ctl stop`` called."""
    stopped: float
    """``pg_ctl stop`` returned: the server is down."""
    ready: float
    """The probe's first successful connection."""
    started: float
    """``pg_ctl start`` returned."""


# -- the parts that run -----------------------------------------------------------------------


def writer(
    number: int,
    engine: sa.Engine,
    store: EventStore,
    recorder: Recorder,
    stopping: threading.Event,
    aggregates: int,
    pause: float,
) -> None:
    sessions = sessionmaker(engine, expire_on_commit=False)
    rng = random.Random(number)
    seq = 0
    while not stopping.is_set():
        kind = rng.choice(AGGREGATE_TYPES)
        aggregate_id = f"{kind.lower()}-{rng.randrange(aggregates)}"
        events = [
            Event(
                bounded_context=BOUNDED_CONTEXT,
                aggregate_type=kind,
                aggregate_id=aggregate_id,
                event_type=f"{kind}Changed",
                payload={"writer": number, "seq": seq + i},
            )
            for i in range(rng.choice((1, 1, 2, 3)))
        ]
        seq += len(events)
        calls = 0

        def work(session: Session, events: list[Event] = events) -> None:
            nonlocal calls
            calls += 1
            store.append(session, events, ExpectedVersion.any())

        try:
            eventsource.run_in_transaction(
                sessions, work, attempts=WRITER_ATTEMPTS, policy=WRITER_POLICY
            )
            outcome = "acked"
        except DuplicateEventError:
            # Only a retry can meet its own events: the first attempt committed, its
            # acknowledgement was lost. A first attempt failing so is a bug.
            outcome = "ack lost" if calls > 1 else "unknown"
            if calls == 1:
                recorder.writer_errors.append(f"writer {number}: duplicate on a first attempt")
        except Exception as exc:
            outcome = "unknown"
            recorder.writer_errors.append(f"writer {number}: {describe(exc)}: {exc!r}"[:300])
            if not is_transient(exc):
                recorder.appended(events, outcome)
                return
        recorder.appended(events, outcome)
        if pause:
            stopping.wait(pause)


class WriterRetries(logging.Handler):
    """Records the writers' retries as ``run_in_transaction`` logs them, with their cause.

    Attached to the ``eventsource.retry`` logger, set to INFO whatever ``-v`` says (the
    printing handler keeps its own level), so each failure is recorded when it happens.
    """

    def __init__(self, recorder: Recorder) -> None:
        super().__init__(logging.INFO)
        self.recorder = recorder

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName and record.threadName.startswith("writer-"):
            self.recorder.retried(WRITERS, str(getattr(record, "cause", "?")))


class Background:
    """A daemon thread that keeps the error its target raised."""

    def __init__(self, name: str, target: Callable[[], object]) -> None:
        self.error: BaseException | None = None
        self._target = target
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as exc:
            self.error = exc
            logger.error("%s raised %r", self.thread.name, exc)

    def start(self) -> Background:
        self.thread.start()
        return self

    def join(self, timeout: float) -> bool:
        """Whether it has ended."""
        self.thread.join(timeout)
        return not self.thread.is_alive()


def probe_until_ready(conninfo: str, deadline: float) -> float | None:
    """Connect every few ms until the server answers; the time it first did."""
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(conninfo, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return time.monotonic()
        except psycopg.Error:
            time.sleep(PROBE_INTERVAL)
    return None


def restart(cluster: Cluster, number: int, mode: str, down: float, conninfo: str) -> Restart:
    logger.info("restart %d: pg_ctl stop -m %s", number, mode)
    began = time.monotonic()
    cluster.stop(mode)
    stopped = time.monotonic()
    logger.info("restart %d: server down after %.3f s", number, stopped - began)
    if down:
        time.sleep(down)
    ready: list[float | None] = [None]

    def probe() -> None:
        ready[0] = probe_until_ready(conninfo, time.monotonic() + 120)

    prober = threading.Thread(target=probe, name="probe", daemon=True)
    prober.start()
    cluster.start()
    started = time.monotonic()
    prober.join(120)
    accepted = ready[0] if ready[0] is not None else started
    logger.info(
        "restart %d: server accepting connections (probe) %.3f s after the stop began; "
        "pg_ctl start returned %.3f s after that",
        number,
        accepted - began,
        started - accepted,
    )
    return Restart(number, began, stopped, accepted, started)


def caught_up(engine: sa.Engine, expected: set[tuple[str, int]]) -> bool:
    rows = status(engine)
    lags = {(row.projection, row.partition_key): row.lag for row in rows}
    return expected <= set(lags) and all(lags[key] == 0 for key in expected)


def wait_caught_up(engine: sa.Engine, expected: set[tuple[str, int]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if caught_up(engine, expected):
                return True
        except sa.exc.DBAPIError as exc:  # pragma: no cover - only while the server is away
            logger.info("status failed: %s", describe(exc))
        time.sleep(0.2)
    return False


# -- the report -------------------------------------------------------------------------------


@dataclass
class ReadModel:
    name: str
    scope: str
    in_scope: int
    rows: int
    distinct: int
    lost: int
    foreign: int

    @property
    def doubled(self) -> int:
        return self.rows - self.distinct


def read_model(conn: sa.Connection, projection: Projection) -> ReadModel:
    table, scope = projection.name, scope_sql(projection)

    def count(query: str) -> int:
        return int(conn.exec_driver_sql(query).scalar_one())

    return ReadModel(
        name=f"{table} ({partitions(projection)} partition(s))",
        scope=", ".join(projection.aggregate_types) or "all",
        in_scope=count(f"SELECT count(*) FROM events e WHERE {scope}"),
        rows=count(f"SELECT count(*) FROM {table}"),
        distinct=count(f"SELECT count(DISTINCT event_id) FROM {table}"),
        lost=count(
            f"SELECT count(*) FROM events e WHERE {scope} AND NOT EXISTS "
            f"(SELECT 1 FROM {table} r WHERE r.event_id = e.event_id)"
        ),
        foreign=count(
            f"SELECT count(*) FROM {table} r WHERE NOT EXISTS (SELECT 1 FROM events e "
            f"WHERE e.event_id = r.event_id AND e.global_position = r.global_position "
            f"AND {scope})"
        ),
    )


def first_after(samples: Sequence[tuple[float, int]], after: float, handled: bool) -> float | None:
    for at, count in samples:
        if at > after and (count > 0 or not handled):
            return at
    return None


def fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report_restarts(restarts: list[Restart], recorder: Recorder, keys: list[Key]) -> list[str]:
    """Print the per-restart table; return the resume times over 1 s, as warnings."""
    slow: list[str] = []
    rows: list[list[str]] = []
    for index, one in enumerate(restarts):
        until = restarts[index + 1].began if index + 1 < len(restarts) else float("inf")
        for key in [*keys, WRITERS]:
            samples = recorder.batches.get(key, [])
            retried = [
                t
                for t, cause in recorder.retries.get(key, [])
                if one.began <= t < until and cause != CONFLICT
            ]
            resumed = first_after(samples, one.stopped, handled=False)
            handled = first_after(samples, one.stopped, handled=True)
            resume = None if resumed is None else resumed - one.ready
            events = None if handled is None else handled - one.ready
            if resume is not None and resume > 1.0:
                slow.append(f"restart {one.number}: {key} resumed {resume:.3f} s after the server")
            rows.append(
                [
                    str(one.number) if key == keys[0] else "",
                    f"{one.ready - one.began:.3f}" if key == keys[0] else "",
                    key,
                    str(len(retried)),
                    f"{retried[-1] - one.ready:+.3f}" if retried else "-",
                    fmt_seconds(resume),
                    fmt_seconds(events),
                ]
            )
    print(
        "\nper restart (times in s, from the probe's first connection after the restart)\n"
        "  down: from pg_ctl stop to that connection; retries: transient failures retried "
        "in the restart's period\n"
        "  (writers: attempts made again); last retry: the last of them (workers: when the "
        "failure was seen;\n"
        "  writers: when the new attempt began); resume / events: the first committed batch "
        "/ the first one that\n"
        "  handled events (writers: the first acknowledged append)"
    )
    print_table(
        ["restart", "down s", "worker", "retries", "last retry s", "resume s", "events s"],
        rows,
        ">><>>>>",
    )
    return slow


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writers", type=int, default=4, help="appending threads (default 4)")
    parser.add_argument("--restarts", type=int, default=3, help="server restarts (default 3)")
    parser.add_argument(
        "--restart-every", type=float, default=5.0, help="seconds between restarts (default 5)"
    )
    parser.add_argument(
        "--mode", choices=("fast", "immediate"), default="fast", help="pg_ctl stop mode"
    )
    parser.add_argument(
        "--down", type=float, default=0.0, help="seconds to keep the server down (default 0)"
    )
    parser.add_argument(
        "--synchronous-commit",
        choices=("off", "on"),
        default="off",
        help="synchronous_commit of the soak database (default off, as the cluster)",
    )
    parser.add_argument(
        "--aggregates", type=int, default=50, help="aggregates the writers share (default 50)"
    )
    parser.add_argument(
        "--pause", type=float, default=0.0, help="seconds each writer waits between appends"
    )
    parser.add_argument(
        "--catch-up-timeout",
        type=float,
        default=120.0,
        help="seconds to wait at the end for the projections to catch up (default 120)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v INFO, -vv DEBUG")
    args = parser.parse_args()
    if not 1 <= args.writers <= MAX_WRITERS:
        parser.error(f"--writers must be in 1..{MAX_WRITERS} (the cluster's connection limit)")
    if args.restarts < 0 or args.restart_every <= 0 or args.down < 0 or args.aggregates < 1:
        parser.error("--restarts >= 0, --restart-every > 0, --down >= 0, --aggregates >= 1")
    level = (logging.ERROR, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    printing = logging.StreamHandler()
    printing.setLevel(level)  # on the handler: WriterRetries needs the retry logger's INFO
    printing.setFormatter(
        logging.Formatter(
            "%(asctime)s.%(msecs)03d %(threadName)-22s %(name)s %(levelname)s %(message)s",
            "%H:%M:%S",
        )
    )
    logging.getLogger().addHandler(printing)
    logging.getLogger().setLevel(level)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the migration's own chatter
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    with throwaway_cluster() as cluster:
        return soak(cluster, args)


def soak(cluster: Cluster, args: argparse.Namespace) -> int:
    admin = sa.create_engine(cluster.url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {DATABASE}")
        conn.exec_driver_sql(
            f"ALTER DATABASE {DATABASE} SET synchronous_commit = {args.synchronous_commit}"
        )
    admin.dispose()
    url = cluster.database_url(DATABASE)
    conninfo = psycopg_conninfo(url)
    eventsource.upgrade(url)
    checks = eventsource.create_engine(url, poolclass=sa.NullPool)
    with checks.begin() as conn:
        for projection in PROJECTIONS:
            conn.exec_driver_sql(
                f"CREATE TABLE {projection.name} "
                "(event_id UUID NOT NULL, global_position BIGINT NOT NULL)"
            )
        rows = conn.exec_driver_sql(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('server_version', 'fsync', 'synchronous_commit', 'wal_writer_delay')"
        ).all()
        settings = {str(name): str(value) for name, value in rows}

    store = EventStore()
    recorder = Recorder()
    retry_logger = logging.getLogger("eventsource.retry")
    retry_logger.setLevel(min(retry_logger.getEffectiveLevel(), logging.INFO))
    retry_logger.addHandler(WriterRetries(recorder))
    processors = sum(partitions(projection) for projection in PROJECTIONS)
    workers_engine = eventsource.create_engine(url, pool_size=processors, max_overflow=2)
    writers_engine = eventsource.create_engine(url, pool_size=args.writers, max_overflow=0)
    pairs: list[tuple[Projection, Processor]] = []
    for projection in PROJECTIONS:
        total = partitions(projection)
        for key in range(total):
            config = ProcessorConfig(
                poll_interval=POLL_INTERVAL, partition_key=key, total_partitions=total
            )
            pairs.append((projection, Processor(workers_engine, store, config, metrics=recorder)))
    keys = [f"{p.name}/{proc.config.partition_key}" for p, proc in pairs]
    expected = {(p.name, proc.config.partition_key) for p, proc in pairs}

    runner = Runner(handle_signals=False)
    stopping = threading.Event()
    running = Background("runner", lambda: runner.run(pairs))
    writers = [
        Background(
            f"writer-{n}",
            functools.partial(
                writer, n, writers_engine, store, recorder, stopping, args.aggregates, args.pause
            ),
        )
        for n in range(args.writers)
    ]
    restarts: list[Restart] = []
    runner_error: BaseException | None = None
    caught = False
    began = time.monotonic()
    try:
        running.start()
        for thread in writers:
            thread.start()
        for number in range(1, args.restarts + 1):
            time.sleep(args.restart_every)
            if not running.thread.is_alive():
                logger.error("the runner has ended; no more restarts")
                break
            restarts.append(restart(cluster, number, args.mode, args.down, conninfo))
        time.sleep(args.restart_every)  # one more period under load after the last restart
        logger.info("stopping the writers")
        stopping.set()
        for thread in writers:
            thread.join(60)
        logger.info("writers stopped; waiting for the projections to catch up")
        if running.thread.is_alive():
            caught = wait_caught_up(checks, expected, args.catch_up_timeout)
        runner.stop()
        running.join(60)
        runner_error = running.error
        if runner_error is not None:
            # Catch up with a fresh runner so the read models can still be checked.
            logger.info("the runner raised; catching up with a fresh one")
            fresh = Runner(handle_signals=False)
            again = Background("catch-up", lambda: fresh.run_until_caught_up(pairs)).start()
            caught = again.join(args.catch_up_timeout) and again.error is None
            if not again.join(0):
                fresh.stop()
                again.join(30)
    finally:
        stopping.set()
        runner.stop()
        running.join(30)
        for thread in writers:
            thread.join(5)
        workers_engine.dispose()
        writers_engine.dispose()
    elapsed = time.monotonic() - began

    with checks.connect() as conn:
        stored = {row[0] for row in conn.exec_driver_sql("SELECT event_id FROM events")}
        models = [read_model(conn, projection) for projection in PROJECTIONS]
    checks.dispose()

    acked = set(recorder.acked) | set(recorder.ack_lost)
    missing = acked - stored
    unacknowledged = stored - acked
    server_may_lose = args.mode == "immediate" and args.synchronous_commit == "off"
    writer_causes = [cause for _, cause in recorder.retries.get(WRITERS, [])]
    conflicts = writer_causes.count(CONFLICT)
    transient = len(writer_causes) - conflicts

    print(
        f"\nsoak: {args.writers} writers, {len(pairs)} workers ({len(PROJECTIONS)} projections), "
        f"{len(restarts)} restart(s) with pg_ctl -m {args.mode} every {args.restart_every:g} s, "
        f"down {args.down:g} s; {elapsed:.1f} s in all"
    )
    print(
        f"server {settings.get('server_version')}: fsync={settings.get('fsync')}, "
        f"synchronous_commit={settings.get('synchronous_commit')} (soak database), "
        f"wal_writer_delay={settings.get('wal_writer_delay')} ms"
    )
    print("\nevents")
    note = " (the server may lose them: immediate, async commit)" if server_may_lose else ""
    print_table(
        ["", "events"],
        [
            ["acknowledged to the writers", f"{len(acked):,}"],
            ["  of which ack lost, committed", f"{len(recorder.ack_lost):,}"],
            ["in the store", f"{len(stored):,}"],
            [f"acknowledged but missing from the store{note}", f"{len(missing):,}"],
            ["in the store, never acknowledged", f"{len(unacknowledged):,}"],
            ["appends of unknown outcome (writer gave up)", f"{len(recorder.unknown):,}"],
            ["writer retries after other transient failures", f"{transient:,}"],
            ["writer retries after version conflicts", f"{conflicts:,}"],
        ],
        "<>",
    )
    print("\nread models (lost: in scope, not in the read model; doubled: rows - distinct)")
    print_table(
        ["projection", "scope", "in scope", "rows", "distinct", "lost", "doubled", "foreign"],
        [
            [
                m.name,
                m.scope,
                f"{m.in_scope:,}",
                f"{m.rows:,}",
                f"{m.distinct:,}",
                f"{m.lost:,}",
                f"{m.doubled:,}",
                f"{m.foreign:,}",
            ]
            for m in models
        ],
        "<<>>>>>>",
    )
    slow = report_restarts(restarts, recorder, keys)
    failed_batches = sum(recorder.failed_batches.values())
    print(
        f"\nbatches rolled back by an error: {failed_batches:,}; "
        f"batches committed: {sum(len(v) for k, v in recorder.batches.items() if k != WRITERS):,}"
    )
    print(f"runner raised: {'no' if runner_error is None else repr(runner_error)}")
    for error in recorder.writer_errors[:10]:
        print(f"writer error: {error}")

    problems: list[str] = []
    for m in models:
        if m.lost or m.doubled or m.foreign:
            problems.append(f"{m.name}: {m.lost} lost, {m.doubled} doubled, {m.foreign} foreign")
    if missing and not server_may_lose:
        problems.append(f"{len(missing)} acknowledged event(s) missing from the store")
    if runner_error is not None:
        problems.append("the runner raised")
    if not caught:
        problems.append(f"the projections did not catch up within {args.catch_up_timeout:g} s")
    if recorder.writer_errors:
        problems.append(f"{len(recorder.writer_errors)} writer error(s)")
    for line in slow:
        print(f"note: {line} (more than 1 s)")
    if problems:
        print("\nFAILED: " + "; ".join(problems))
        return 1
    print("\nOK: nothing lost, nothing doubled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
