"""The worker processes of ``bench/peer.py``: writers, and one catch-up per process.

Not meant to be run by hand: ``bench/peer.py`` starts it as
``python bench/_peer_worker.py MODE SPEC`` (``SPEC``: a JSON object) in two modes:

- ``append``: one writer, alive for the whole append part. It reads commands on stdin,
  one JSON object per line (``{"side", "batch", "transactions" | "seconds",
  "barrier"}``), answers ``{"ready": true}`` once it holds the writer, then, with
  ``barrier``, blocks until the parent writes one byte per writer to the shared "go"
  pipe (so the writers start together), runs the writer for the time or number of
  transactions asked and answers with what it did (events, transactions, start and end
  on ``time.monotonic()``, which every process shares on Linux, and its CPU time).
  ``{"cmd": "stop"}`` or the end of stdin ends it. Each side's connections are made
  the first time that side is asked for, in this process (an Engine for eventsource, a
  ``PostgresDatastore`` with one connection for the peer).
- ``catch-up``: one catch-up of a counter projection over the seeded log, by one side
  (``spec["side"]``), then one JSON line with its time, CPU time and peak RSS
  (``VmHWM``; ``ru_maxrss`` too, see :func:`max_rss_mib`), and exit.
  This module imports only the standard library at its top: each side's library is
  imported only when that side runs, so the peak RSS of a catch-up process is that
  side's alone.

The events, payloads and table names both sides use are defined here, so the parent and
the workers agree on them. Everything else on stdout would corrupt the protocol: it gets
its own copy of the stdout descriptor and descriptor 1 is pointed at stderr.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

BOUNDED_CONTEXT = "bench"
AGGREGATE_TYPE = "Order"
EVENT_TYPE = "OrderLinePriced"

#: The peer's tables live in a schema of their own in the throwaway database.
PEER_SCHEMA = "peer"
#: The peer's events table of the append part (its application recorder's table).
PEER_APPEND_TABLE = "append_events"
#: The peer application of the catch-up part; its factory names its table after it.
PEER_APP_NAME = "PeerOrders"
PEER_APP_TABLE = "peerorders_events"
#: The peer projection of the catch-up part; its factory names its tracking table after it.
PEER_PROJECTION_NAME = "peercounter"
PEER_TRACKING_TABLE = "peercounter_tracking"
PEER_COUNTER_TABLE = "peer_counter"
#: The eventsource projection of the catch-up part and its counter table (schema public).
ES_PROJECTION_NAME = "bench_peer_counter"
ES_COUNTER_TABLE = "bench_peer_counter"
#: The key of the one row of each counter table.
COUNTER_NAME = "events"

#: The peer's topic of the seeded events: resolved (imported) by its mapper on reading.
PEER_TOPIC = "_peer_worker:OrderLinePriced"

NOTE = "priced by bench/peer.py: the same JSON in both stores"


def make_payload(seq: int) -> dict[str, Any]:
    """The payload of every event, both sides alike: about 200 bytes of JSON."""
    return {
        "order_line": seq,
        "sku": f"SKU-{seq % 1_000_000:06d}",
        "name": f"item-{seq}",
        "quantity": 1 + seq % 7,
        "unit_price": "12.50",
        "currency": "EUR",
        "tags": ["bench", "peer"],
        "note": NOTE,
    }


def encode_payload(payload: dict[str, Any]) -> bytes:
    """A payload as the peer stores it: compact JSON in UTF-8, as its JSONTranscoder writes."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf8")


def seeded_aggregate_id(index: int) -> str:
    """The eventsource aggregate id of seeded aggregate ``index``."""
    return f"order-{index:07d}"


def seeded_originator_id(index: int) -> uuid.UUID:
    """The peer's id of the same aggregate (the peer's default id type is UUID)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"bench/{seeded_aggregate_id(index)}")


class OrderLinePriced:
    """The peer's event class of the seeded events (``PEER_TOPIC``).

    Its mapper resolves the topic, takes the id type from this annotation and sets the
    decoded state as the new object's ``__dict__``: nothing more is needed.
    """

    originator_id: uuid.UUID
    originator_version: int


# -- connection parameters -------------------------------------------------------------


@dataclass(frozen=True)
class Database:
    """Where the throwaway database is: an SQLAlchemy URL and the same as libpq fields."""

    url: str
    dbname: str
    host: str
    port: int
    user: str
    password: str

    def peer_datastore(self, **options: Any) -> Any:
        """The peer's PostgreSQL datastore on this database, in its schema (the caller
        closes it)."""
        from eventsourcing.postgres import PostgresDatastore

        return PostgresDatastore(
            dbname=self.dbname,
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            schema=PEER_SCHEMA,
            **options,
        )

    def peer_env(self) -> dict[str, str]:
        """The peer's environment for its PostgreSQL infrastructure factory."""
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": self.dbname,
            "POSTGRES_HOST": self.host,
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": self.user,
            "POSTGRES_PASSWORD": self.password,
            "POSTGRES_SCHEMA": PEER_SCHEMA,
        }


@dataclass(frozen=True)
class AppendSpec:
    db: Database
    writer: int
    aggregates: int
    go_fd: int


@dataclass(frozen=True)
class CatchUpSpec:
    db: Database
    side: str
    events: int
    timeout: float


def spec_json(spec: AppendSpec | CatchUpSpec) -> str:
    return json.dumps(asdict(spec))


# -- writers ---------------------------------------------------------------------------


@dataclass
class Aggregates:
    """One writer's own aggregates, appended to round robin, with their current versions."""

    count: int
    versions: list[int] = field(init=False)
    next_index: int = 0
    seq: int = 0

    def __post_init__(self) -> None:
        self.versions = [0] * self.count

    def take(self) -> int:
        index = self.next_index
        self.next_index = (index + 1) % self.count
        return index


#: Runs one transaction and returns how many events it appended.
Transaction = Callable[[], int]


class Sides:
    """This writer process's connections, one set per side, made when first needed."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.closers: list[Callable[[], None]] = []
        self._eventsource: tuple[Any, Any] | None = None
        self._peer: Any = None

    def eventsource_writer(self, code: str, aggregates: Aggregates, batch: int) -> Transaction:
        from sqlalchemy.orm import Session

        import eventsource
        from eventsource import Event, EventStore, ExpectedVersion

        if self._eventsource is None:
            engine = eventsource.create_engine(self.db.url)
            self.closers.append(engine.dispose)
            self._eventsource = (engine, EventStore())
        engine, store = self._eventsource
        ids = [f"{code}-{i:06d}" for i in range(aggregates.count)]

        def append() -> int:
            """``EventStore.append`` in a fresh Session and transaction, as bench/append.py."""
            index = aggregates.take()
            aggregate_id = ids[index]
            events = []
            for _ in range(batch):
                aggregates.seq += 1
                events.append(
                    Event(
                        bounded_context=BOUNDED_CONTEXT,
                        aggregate_type=AGGREGATE_TYPE,
                        aggregate_id=aggregate_id,
                        event_type=EVENT_TYPE,
                        payload=make_payload(aggregates.seq),
                    )
                )
            with Session(engine) as session, session.begin():
                result = store.append(
                    session, events, ExpectedVersion.exact(aggregates.versions[index])
                )
            aggregates.versions[index] = result.to_version
            return batch

        return append

    def peer_writer(self, aggregates: Aggregates, batch: int) -> Transaction:
        from eventsourcing.persistence import StoredEvent
        from eventsourcing.postgres import PostgresApplicationRecorder

        if self._peer is None:
            datastore = self.db.peer_datastore(pool_size=1)
            self.closers.append(datastore.close)
            self._peer = PostgresApplicationRecorder(datastore, events_table_name=PEER_APPEND_TABLE)
        recorder: PostgresApplicationRecorder = self._peer
        ids = [uuid.uuid4() for _ in range(aggregates.count)]

        def insert() -> int:
            """One ``insert_events`` call (its own transaction) for one aggregate."""
            index = aggregates.take()
            originator_id = ids[index]
            version = aggregates.versions[index]
            stored = []
            for i in range(batch):
                aggregates.seq += 1
                stored.append(
                    StoredEvent(
                        originator_id=originator_id,
                        originator_version=version + 1 + i,
                        topic=PEER_TOPIC,
                        state=encode_payload(make_payload(aggregates.seq)),
                    )
                )
            recorder.insert_events(stored)
            aggregates.versions[index] = version + batch
            return batch

        return insert

    def close(self) -> None:
        for close in reversed(self.closers):
            close()


def protocol_stream() -> TextIO:
    """A private copy of stdout for the protocol; descriptor 1 now goes to stderr."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return stream


def send(stream: TextIO, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def append_worker(spec: AppendSpec) -> None:
    out = protocol_stream()
    sides = Sides(spec.db)
    writers: dict[tuple[str, str], Transaction] = {}
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if command.get("cmd") == "stop":
                break
            side, case, batch = str(command["side"]), str(command["case"]), int(command["batch"])
            tx = writers.get((side, case))
            if tx is None:
                # Each case has its own aggregates, per side and writer.
                aggregates = Aggregates(spec.aggregates)
                if side == "eventsource":
                    tx = sides.eventsource_writer(f"{case}-w{spec.writer}", aggregates, batch)
                else:
                    tx = sides.peer_writer(aggregates, batch)
                writers[(side, case)] = tx
            send(out, {"ready": True})
            if command.get("barrier"):
                os.read(spec.go_fd, 1)
            events = transactions = 0
            cpu = time.process_time()
            start = time.monotonic()
            if command.get("transactions") is not None:
                for _ in range(int(command["transactions"])):
                    events += tx()
                    transactions += 1
                end = time.monotonic()
            else:
                deadline = start + float(command["seconds"])
                end = start
                while end < deadline:
                    events += tx()
                    transactions += 1
                    end = time.monotonic()
            send(
                out,
                {
                    "events": events,
                    "transactions": transactions,
                    "start": start,
                    "end": end,
                    "cpu": time.process_time() - cpu,
                },
            )
    finally:
        sides.close()


# -- catch-up --------------------------------------------------------------------------


def max_rss_mib() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux), in MiB.

    Not this process's own peak on Linux: exec carries the high-water mark of the memory
    it replaces into it, and a child starts with its parent's (copy-on-write) pages, so
    a child of a large parent reports at least the parent's resident size.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib() -> float:
    """This process's own peak resident set size in MiB: ``VmHWM`` of /proc/self/status
    (the high-water mark of its memory since exec), else ``ru_maxrss`` where there is no
    /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return max_rss_mib()


def eventsource_catch_up(spec: CatchUpSpec) -> dict[str, Any]:
    """``Processor.run_until_caught_up`` of a counter projection, default ProcessorConfig."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    import eventsource
    from eventsource import EventStore, PersistedEvent, Processor, ProcessorConfig, Projection

    increment = sa.text(f"UPDATE {ES_COUNTER_TABLE} SET n = n + 1 WHERE name = :name")

    class Counter(Projection):
        """Counts every event in one row, in the processor's batch transaction."""

        name = ES_PROJECTION_NAME

        def handle(self, event: PersistedEvent, session: Session) -> None:
            session.execute(increment, {"name": COUNTER_NAME})

    engine = eventsource.create_engine(spec.db.url)
    try:
        setup_rss = peak_rss_mib()
        cpu = time.process_time()
        started = time.monotonic()
        processor = Processor(engine, EventStore(), ProcessorConfig())
        handled = processor.run_until_caught_up(Counter())
        seconds = time.monotonic() - started
        cpu_seconds = time.process_time() - cpu
    finally:
        engine.dispose()
    return {
        "handled": handled,
        "seconds": seconds,
        "cpu": cpu_seconds,
        "setup_rss_mib": setup_rss,
    }


def peer_catch_up(spec: CatchUpSpec) -> dict[str, Any]:
    """The peer's ``ProjectionRunner``: its application, a counter view, a projection.

    The view is the peer's PostgreSQL tracking recorder plus one method that increments
    the counter and records the tracking object in one transaction (the peer's way to
    make a view exactly once: one transaction per event). The projection counts the
    events in memory too and notes the moment it has processed ``spec.events``: the
    end of the catch-up.
    """
    from eventsourcing.application import Application
    from eventsourcing.persistence import Tracking
    from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
    from eventsourcing.projection import Projection, ProjectionRunner
    from psycopg.sql import SQL, Identifier

    class PeerOrders(Application[uuid.UUID]):
        name = PEER_APP_NAME

    class CounterView(PostgresTrackingRecorder):
        def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
            super().__init__(datastore, **kwargs)
            self.increment = SQL("UPDATE {}.{} SET n = n + 1 WHERE name = %s").format(
                Identifier(self.datastore.schema), Identifier(PEER_COUNTER_TABLE)
            )

        def incr_counter(self, tracking: Tracking) -> None:
            with self.datastore.transaction(commit=True) as curs:
                curs.execute(self.increment, (COUNTER_NAME,), prepare=True)
                self._insert_tracking(curs, tracking)

    done = threading.Event()
    finished: list[float] = []
    processed = [0]  # events processed, by the runner's processing thread

    class CounterProjection(Projection[CounterView]):
        name = PEER_PROJECTION_NAME

        def process_event(self, domain_event: Any, tracking: Tracking) -> None:
            self.view.incr_counter(tracking)
            processed[0] += 1
            if processed[0] >= spec.events and not done.is_set():
                finished.append(time.monotonic())
                done.set()

    # The tables exist (the parent made them with the peer's own create_table()).
    env = {**spec.db.peer_env(), "CREATE_TABLE": "n"}
    setup_rss = peak_rss_mib()
    cpu = time.process_time()
    started = time.monotonic()
    deadline = started + spec.timeout
    with ProjectionRunner(
        application_class=PeerOrders,
        projection_class=CounterProjection,
        view_class=CounterView,
        env=env,
    ) as runner:
        while not done.wait(timeout=0.05):
            if runner.is_interrupted.is_set():
                runner.run_forever(timeout=0)  # raises the processing thread's error
                raise RuntimeError("the peer's projection runner stopped before the end")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the peer's catch-up took over {spec.timeout:.0f} s")
        cpu_seconds = time.process_time() - cpu
        handled = processed[0]
    runner.view.datastore.close()
    return {
        "handled": handled,
        "seconds": finished[0] - started,
        "cpu": cpu_seconds,
        "setup_rss_mib": setup_rss,
    }


def catch_up_worker(spec: CatchUpSpec) -> None:
    out = protocol_stream()
    result = eventsource_catch_up(spec) if spec.side == "eventsource" else peer_catch_up(spec)
    result["peak_rss_mib"] = peak_rss_mib()
    result["ru_maxrss_mib"] = max_rss_mib()
    send(out, result)


def main(argv: list[str]) -> int:
    mode, raw = argv
    spec = json.loads(raw)
    db = Database(**spec.pop("db"))
    if mode == "append":
        append_worker(AppendSpec(db=db, **spec))
    elif mode == "catch-up":
        catch_up_worker(CatchUpSpec(db=db, **spec))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
