"""Identical worker processes share one projection's partitions through leases.

No process is told which partition to run: every worker runs the same command with
``ProcessorConfig(total_partitions=12, claim=True)``, and the workers share the 12
partitions through leases kept in the database (``eventsource.claims``). This launcher
tells the story while a producer appends events the whole time:

1. it starts 3 workers, and shows who owns which partitions (4 each);
2. it kills one with SIGKILL: its partitions stay leased until the lease runs out
   (``--lease``, 2 s here), then the two others take them over;
3. it starts one more worker, which gets a share at once (the others release some);
4. it reshards the projection from 12 to 6 partitions with ``eventsource.reshard``
   while everything runs; the workers adopt the new count by themselves;
5. it stops the producer, lets the workers drain, stops them with SIGTERM and checks
   that every event was counted exactly once, and in order per meter.

    python examples/claimed_workers/main.py
    python examples/claimed_workers/main.py --workers 4 --lease 3
    python examples/claimed_workers/main.py worker --run RUN_ID     # one more worker

The database is ``$DATABASE_URL`` (default: ``eventsource.db`` in the current directory).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import eventsource
from eventsource import Event, EventStore, PersistedEvent, Processor, ProcessorConfig, Projection
from eventsource.claims import PartitionClaim, partition_claims
from eventsource.models import EventRecord

PROJECTION = "cw_meter_readings"
BOUNDED_CONTEXT = "metering"
METERS = 24
PARTITIONS = 12
RESHARD_TO = 6
#: How long the launcher waits for the workers to settle after each step (seconds).
SETTLE_TIMEOUT = 30.0
#: How long the launcher lets the workers work between two steps (seconds).
HOLD = 1.0
MAIN = Path(__file__).resolve()


class Base(DeclarativeBase):
    pass


class HandledEvent(Base):
    """One row per event a projection handled; ``times`` would show a duplicate."""

    __tablename__ = "cw_handled_events"

    projection: Mapped[str] = mapped_column(sa.String(100), primary_key=True)
    global_position: Mapped[int] = mapped_column(
        sa.BigInteger, primary_key=True, autoincrement=False
    )
    times: Mapped[int]
    worker_pid: Mapped[int]


class Meter(Base):
    """Per meter: readings counted, and whether they came in version order."""

    __tablename__ = "cw_meters"

    projection: Mapped[str] = mapped_column(sa.String(100), primary_key=True)
    meter_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    readings: Mapped[int]
    last_version: Mapped[int]
    out_of_order: Mapped[int]


def names(run: str) -> tuple[str, str]:
    """A run's projection and bounded context: each launcher run is a metering site of
    its own, so a rerun neither replays nor counts the readings of earlier runs."""
    return f"{PROJECTION}_{run}", f"{BOUNDED_CONTEXT}_{run}"


class MeterReadings(Projection):
    """Counts a site's readings, and checks they come in order per meter."""

    name = PROJECTION

    def __init__(self, run: str) -> None:
        self.name, context = names(run)
        self.bounded_contexts = (context,)

    def handle(self, event: PersistedEvent, session: Session) -> None:
        key = (self.name, event.global_position)
        handled = session.get(HandledEvent, key)
        if handled is None:
            session.add(
                HandledEvent(
                    projection=self.name,
                    global_position=event.global_position,
                    times=1,
                    worker_pid=os.getpid(),
                )
            )
        else:
            handled.times += 1  # never happens: the check at the end says so
        meter = session.get(Meter, (self.name, event.aggregate_id))
        if meter is None:
            meter = Meter(
                projection=self.name,
                meter_id=event.aggregate_id,
                readings=0,
                last_version=0,
                out_of_order=0,
            )
            session.add(meter)
        if event.aggregate_version != meter.last_version + 1:
            meter.out_of_order += 1
        meter.readings += 1
        meter.last_version = event.aggregate_version


# -- the worker: the same command in every process ---------------------------------------


def work(args: argparse.Namespace) -> int:
    if args.verbose:  # the claims' log: what each worker claims and releases, and why
        logging.basicConfig(
            level=logging.INFO,
            format=f"%(asctime)s.%(msecs)03d pid {os.getpid()} %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    # A claiming worker may run every partition at once, each holding a connection,
    # beside its coordinator's.
    engine = eventsource.create_engine(args.database_url, pool_size=args.total_partitions + 2)
    config = ProcessorConfig(
        batch_size=100, total_partitions=args.total_partitions, claim=True, lease=args.lease
    )
    try:
        # Until SIGTERM / Ctrl+C: the batches in hand commit, the partitions are released.
        Processor(engine, EventStore(), config).run(MeterReadings(args.run))
    finally:
        engine.dispose()
    return 0


# -- the launcher -------------------------------------------------------------------------


def produce(
    engine: sa.Engine, context: str, rate: float, stop: threading.Event, appended: list[int]
) -> None:
    """Append readings to the meters in turn, one transaction each, until ``stop``."""
    store = EventStore()
    meters = [str(uuid.uuid4()) for _ in range(METERS)]
    for n in itertools.count():
        if stop.wait(1 / rate):
            return
        with Session(engine) as session, session.begin():
            store.append(
                session,
                [
                    Event(
                        bounded_context=context,
                        aggregate_type="Meter",
                        aggregate_id=meters[n % METERS],
                        event_type="ReadingRecorded",
                        payload={"kwh": n % 17},
                    )
                ],
            )
        appended[0] += 1


def by_label(label: str) -> tuple[int, str]:
    """w1, w2... w10 in that order, then the workers started by hand."""
    return (int(label[1:]), "") if label[1:].isdigit() else (1 << 30, label)


class Launcher:
    def __init__(self, engine: sa.Engine, args: argparse.Namespace, run: str) -> None:
        self.engine = engine
        self.args = args
        self.run = run
        self.projection, self.context = names(run)
        self.started = time.monotonic()
        self.workers: dict[str, subprocess.Popen[bytes]] = {}  # label -> process
        self.killed: set[str] = set()
        self.env = dict(os.environ)
        if args.database_url:  # through the environment: not shown by ps
            self.env["DATABASE_URL"] = args.database_url

    def start_worker(self) -> str:
        label = f"w{len(self.workers) + 1}"
        command = [
            sys.executable,
            str(MAIN),
            "worker",
            "--run",
            self.run,
            "--total-partitions",
            str(PARTITIONS),
            "--lease",
            str(self.args.lease),
        ]
        if self.args.verbose:
            command.append("--verbose")
        # A session of its own: Ctrl+C in the terminal reaches the launcher only, which
        # stops its workers with one SIGTERM each (a second signal would make a worker
        # roll back the batches in hand instead of committing them).
        self.workers[label] = subprocess.Popen(command, env=self.env, start_new_session=True)
        return label

    def label(self, owner: str | None) -> str:
        """A worker's label (w1, w2...) from its worker id, ``host:pid:suffix``."""
        if owner is None:
            return "-"
        pid = int(owner.rsplit(":", 2)[1])
        for label, process in self.workers.items():
            if process.pid == pid:
                return label
        return f"pid {pid}"  # a worker started by hand

    def claims(self) -> list[PartitionClaim]:
        # A read-only connection: on SQLite it does not queue for the write lock.
        with self.engine.connect().execution_options(eventsource_read_only=True) as conn:
            return partition_claims(conn, projection=self.projection)

    def ownership(self, claims: list[PartitionClaim]) -> str:
        owned: dict[str, list[int]] = {}
        for claim in claims:
            if claim.owner is not None and not claim.expired:
                owned.setdefault(self.label(claim.owner), []).append(claim.partition_key)
        free = [c.partition_key for c in claims if c.owner is None or c.expired]
        parts = [
            f"{label}: {' '.join(map(str, keys))}"
            for label, keys in sorted(owned.items(), key=lambda item: by_label(item[0]))
        ]
        if free:
            parts.append(f"free: {' '.join(map(str, free))}")
        total = claims[0].total_partitions if claims else 0
        return f"{total:>2} partitions  " + " | ".join(parts)

    def settled(self, total: int, labels: set[str]) -> Callable[[], list[PartitionClaim] | None]:
        """The claims once ``labels`` share ``total`` partitions fairly (else None)."""

        def check() -> list[PartitionClaim] | None:
            claims = self.claims()
            if len(claims) != total or any(c.total_partitions != total for c in claims):
                return None
            if any(c.owner is None or c.expired for c in claims):
                return None
            held: dict[str, int] = {}
            for claim in claims:
                label = self.label(claim.owner)
                held[label] = held.get(label, 0) + 1
            # Workers started by hand (not in self.workers) may share them too.
            ours = set(held) & set(self.workers)
            if ours != labels or max(held.values()) - min(held.values()) > 1:
                return None
            return claims

        return check

    def wait_settled(self, total: int, labels: set[str], what: str) -> list[PartitionClaim]:
        check = self.settled(total, labels)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (claims := check()) is None:
            for label in labels:
                code = self.workers[label].poll()
                if code is not None:
                    raise SystemExit(f"worker {label} exited with status {code} ({what})")
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting until {what}: {self.ownership(self.claims())}")
            time.sleep(0.1)
        return claims

    def show(self, claims: list[PartitionClaim], note: str = "", *, hold: bool = True) -> None:
        """Print who owns which partitions; then (``hold``) let the workers work a while."""
        elapsed = time.monotonic() - self.started
        print(f"  t+{elapsed:4.1f}s  {self.ownership(claims)}{note}", flush=True)
        if hold:
            time.sleep(HOLD)

    def pids(self, labels: list[str]) -> str:
        return ", ".join(f"{label} (pid {self.workers[label].pid})" for label in labels)

    def live(self) -> set[str]:
        return set(self.workers) - self.killed

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every live worker (it commits the batches in hand and releases its
        partitions); their exit codes."""
        running = sorted(label for label in self.live() if self.workers[label].poll() is None)
        for label in running:
            self.workers[label].send_signal(signal.SIGTERM)
        codes = {}
        for label in running:
            try:
                codes[label] = self.workers[label].wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.workers[label].kill()
                codes[label] = self.workers[label].wait()
        return codes


def count_handled(engine: sa.Engine, run: str) -> tuple[int, int]:
    """(the site's events in the store, distinct events its projection handled)."""
    projection, context = names(run)
    with engine.connect().execution_options(eventsource_read_only=True) as conn:
        stored = conn.scalar(
            sa.select(sa.func.count())
            .select_from(EventRecord)
            .where(EventRecord.bounded_context == context)
        )
        handled = conn.scalar(
            sa.select(sa.func.count())
            .select_from(HandledEvent)
            .where(HandledEvent.projection == projection)
        )
    return int(stored or 0), int(handled or 0)


def check(engine: sa.Engine, launcher: Launcher) -> bool:
    """Compare the read model with the event store: every event once, in order per meter."""
    projection, context = names(launcher.run)
    with Session(engine) as session:
        stored = set(
            session.scalars(
                sa.select(EventRecord.global_position).where(EventRecord.bounded_context == context)
            )
        )
        handled = session.execute(
            sa.select(
                HandledEvent.global_position, HandledEvent.times, HandledEvent.worker_pid
            ).where(HandledEvent.projection == projection)
        ).all()
        out_of_order = session.scalar(
            sa.select(sa.func.coalesce(sa.func.sum(Meter.out_of_order), 0)).where(
                Meter.projection == projection
            )
        )
    per_pid: dict[int, int] = {}
    for _, _, pid in handled:
        per_pid[pid] = per_pid.get(pid, 0) + 1
    counts = []
    for label, process in launcher.workers.items():
        killed = " (killed)" if label in launcher.killed else ""
        counts.append(f"{label} {per_pid.pop(process.pid, 0)}{killed}")
    if per_pid:
        counts.append(f"started by hand {sum(per_pid.values())}")
    print("Handled per worker: " + ", ".join(counts))
    positions = {position for position, _, _ in handled}
    missing = len(stored - positions)
    extra = len(positions - stored)
    twice = sum(1 for _, times, _ in handled if times != 1)
    if missing or extra or twice:
        print(
            f"exactly once: FAILED ({missing} missing, {twice} counted more than once, "
            f"{extra} unknown)"
        )
        return False
    print(f"exactly once: OK ({len(stored)} events, each counted once)")
    if out_of_order:
        print(f"in order per meter: FAILED ({out_of_order} readings out of order)")
        return False
    print(f"in order per meter: OK ({METERS} meters)")
    return True


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM, like Ctrl+C: stop the workers on the way out


def launch(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, interrupt)
    engine = eventsource.create_engine(args.database_url)
    print(f"Database: {engine.url.render_as_string(hide_password=True)}")
    eventsource.upgrade(engine)  # the library's tables, through its Alembic migrations
    Base.metadata.create_all(engine)  # this example's read-model tables
    # Each run is a new site: a new projection (checkpoints from scratch, 12 partitions
    # again after the last run's reshard) over a bounded context of its own.
    launcher = Launcher(engine, args, uuid.uuid4().hex[:8])
    projection = launcher.projection
    print(
        f"Projection {projection}: {PARTITIONS} partitions shared by identical workers "
        f"(lease {args.lease:g} s); the producer appends {args.rate:g} readings/s "
        f"to {launcher.context}."
    )
    appended = [0]
    stop_producing = threading.Event()
    producer = threading.Thread(
        target=produce,
        args=(engine, launcher.context, args.rate, stop_producing, appended),
        daemon=True,
    )
    producer.start()
    ok = False
    try:
        first = [launcher.start_worker() for _ in range(args.workers)]
        print(f"+ started {launcher.pids(first)}")
        launcher.show(launcher.wait_settled(PARTITIONS, set(first), "the workers share"))

        victim = first[1] if len(first) > 1 else first[0]
        launcher.workers[victim].kill()  # SIGKILL: no clean-up, its leases stay
        launcher.workers[victim].wait()
        launcher.killed.add(victim)
        killed_at = time.monotonic()
        print(f"x killed {victim} with SIGKILL: its partitions stay leased until the lease ends")
        launcher.show(launcher.claims(), f"  ({victim}'s leases not expired yet)", hold=False)
        claims = launcher.wait_settled(PARTITIONS, launcher.live(), "the survivors take over")
        taken = time.monotonic() - killed_at
        launcher.show(claims, f"  (taken over {taken:.1f} s after the kill)")

        joined = launcher.start_worker()
        print(f"+ started {launcher.pids([joined])}")
        launcher.show(
            launcher.wait_settled(PARTITIONS, launcher.live(), "the new one gets a share")
        )

        print(f"~ resharding {PARTITIONS} -> {RESHARD_TO} partitions while everything runs")
        result = eventsource.reshard(engine, projection, RESHARD_TO)
        print(
            f"  resharded {result.from_partitions} -> {result.to_partitions} in "
            f"{result.seconds:.2f} s (boundary: position {result.boundary_position})"
        )
        launcher.show(launcher.wait_settled(RESHARD_TO, launcher.live(), "the new count is shared"))

        stop_producing.set()
        producer.join()
        print(f"- producer stopped after {appended[0]} readings; the workers drain")
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (counts := count_handled(engine, launcher.run))[1] < counts[0]:
            if time.monotonic() > deadline:
                print(f"  timed out draining: {counts[1]} of {counts[0]} events handled")
                break
            time.sleep(0.1)
        codes = launcher.stop_all()
        exits = ", ".join(f"{label} {code}" for label, code in codes.items())
        released = sum(1 for claim in launcher.claims() if claim.owner is None)
        print(
            f"- stopped the workers with SIGTERM (exit codes: {exits}); "
            f"{released} of {RESHARD_TO} partitions released"
        )
        ok = check(engine, launcher) and not any(codes.values())
    except KeyboardInterrupt:
        print("Interrupted: stopping the producer and the workers (no check).")
        stop_producing.set()
        codes = launcher.stop_all()
        ok = not any(codes.values())
    finally:
        stop_producing.set()
        producer.join()
        launcher.stop_all()
        engine.dispose()
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "role",
        nargs="?",
        choices=("launch", "worker"),
        default="launch",
        help="launch: the whole story (default); worker: one worker process",
    )
    parser.add_argument(
        "--database-url",
        help="database URL (default: $DATABASE_URL, else sqlite:///eventsource.db)",
    )
    parser.add_argument("--workers", type=int, default=3, help="workers to start (default 3)")
    parser.add_argument(
        "--lease", type=float, default=2.0, help="seconds a worker's lease lasts (default 2)"
    )
    parser.add_argument("--rate", type=float, default=40.0, help="readings appended per second")
    parser.add_argument("--verbose", action="store_true", help="workers log their claims")
    parser.add_argument("--run", help="worker: the launcher's run id (in its projection's name)")
    parser.add_argument(
        "--total-partitions",
        type=int,
        default=PARTITIONS,
        help=f"worker: the count it starts with (default {PARTITIONS}; {RESHARD_TO} if resharded)",
    )
    args = parser.parse_args(argv)
    if args.role == "worker":
        if not args.run:
            parser.error("worker needs --run RUN_ID (the launcher prints it)")
        return work(args)
    if args.workers < 2:
        parser.error("--workers must be at least 2 (one of them is killed)")
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
