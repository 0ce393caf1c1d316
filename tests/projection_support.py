"""Shared helpers for the projection, processor, runner, gap and partition tests.

Everything here talks to a real database: read models are real tables created by the
tests (``create_applied_table``), events are appended through the real store, and
checkpoints are read back from the library's ``projection_checkpoints`` table.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource import horizon

#: One read-model table for many test projections: the primary key on
#: (projection, global_position) makes a double-applied event fail loudly.
APPLIED_DDL = """
CREATE TABLE applied (
    projection TEXT NOT NULL,
    global_position BIGINT NOT NULL,
    bounded_context TEXT NOT NULL,
    aggregate_type TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    aggregate_version BIGINT NOT NULL,
    event_type TEXT NOT NULL,
    partition_key INTEGER,
    seq BIGINT NOT NULL,
    PRIMARY KEY (projection, global_position)
)
"""

INSERT_APPLIED = sa.text(
    "INSERT INTO applied (projection, global_position, bounded_context, aggregate_type, "
    "aggregate_id, aggregate_version, event_type, partition_key, seq) VALUES (:projection, "
    ":global_position, :bounded_context, :aggregate_type, :aggregate_id, :aggregate_version, "
    ":event_type, :partition_key, :seq)"
)

#: Handle order across every projection and thread (``next`` on a count is atomic).
_sequence = itertools.count(1)


def reader(engine: sa.Engine) -> sa.Engine:
    """An engine for the test's own reads while processors run.

    On SQLite the library's engine starts every transaction with BEGIN IMMEDIATE, so a
    read through it queues for the write lock behind busy processors; a plain pysqlite
    engine reads beside them (WAL). On PostgreSQL the engine itself is fine.
    """
    if engine.dialect.name != "sqlite":
        return engine
    key = engine.url.render_as_string(hide_password=False)
    plain = _readers.get(key)
    if plain is None:
        plain = sa.create_engine(engine.url, poolclass=sa.NullPool, connect_args={"timeout": 30})
        _readers[key] = plain
    return plain


_readers: dict[str, sa.Engine] = {}


def create_applied_table(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(APPLIED_DDL)


class Boom(RuntimeError):
    """The error a test handler raises on purpose."""


class AppliedLog(es.Projection, abstract=True):
    """Writes every event it handles into ``applied`` under its own name.

    ``partition`` is recorded with each row (the partition this instance serves),
    ``delay`` sleeps before each event, and ``fail_when`` raises :class:`Boom` for the
    events it selects while ``failing`` is true.
    """

    def __init__(
        self,
        *,
        partition: int | None = None,
        delay: float = 0.0,
        fail_when: Callable[[es.PersistedEvent], bool] | None = None,
    ) -> None:
        self.partition = partition
        self.delay = delay
        self.fail_when = fail_when
        self.failing = fail_when is not None
        self.calls = 0
        self._lock = threading.Lock()

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        with self._lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.failing and self.fail_when is not None and self.fail_when(event):
            raise Boom(f"handler refused event {event.global_position}")
        session.execute(
            INSERT_APPLIED,
            {
                "projection": self.name,
                "global_position": event.global_position,
                "bounded_context": event.bounded_context,
                "aggregate_type": event.aggregate_type,
                "aggregate_id": event.aggregate_id,
                "aggregate_version": event.aggregate_version,
                "event_type": event.event_type,
                "partition_key": self.partition,
                "seq": next(_sequence),
            },
        )


class LogA(AppliedLog):
    name = "log_a"


class LogB(AppliedLog):
    name = "log_b"


class LogC(AppliedLog):
    name = "log_c"


def event(
    aggregate_id: str,
    event_type: str = "Happened",
    *,
    bounded_context: str = "sales",
    aggregate_type: str = "Order",
    payload: Any = None,
) -> es.Event:
    return es.Event(
        bounded_context=bounded_context,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        event_type=event_type,
        payload={} if payload is None else payload,
    )


def append(
    engine: sa.Engine,
    store: es.EventStore,
    batches: Iterable[Sequence[es.Event]],
    *,
    per_transaction: int = 50,
) -> list[es.PersistedEvent]:
    """Append each batch (one aggregate's events), ``per_transaction`` appends per commit."""
    stored: list[es.PersistedEvent] = []
    pending = list(batches)
    for start in range(0, len(pending), per_transaction):
        with Session(engine) as session, session.begin():
            for batch in pending[start : start + per_transaction]:
                stored.extend(store.append(session, batch).events)
    return stored


def append_spread(
    engine: sa.Engine,
    store: es.EventStore,
    count: int,
    *,
    aggregates: int = 20,
    prefix: str = "agg",
    **fields: Any,
) -> list[es.PersistedEvent]:
    """``count`` single-event appends spread round-robin over ``aggregates`` aggregates."""
    return append(
        engine,
        store,
        ([event(f"{prefix}-{i % aggregates}", **fields)] for i in range(count)),
    )


@dataclass(frozen=True, slots=True)
class Checkpoint:
    global_position: int
    transaction_id: int
    events_handled: int
    total_partitions: int


def checkpoint(engine: sa.Engine, name: str, partition_key: int = 0) -> Checkpoint | None:
    with reader(engine).connect() as conn:
        row = conn.execute(
            sa.text(
                "SELECT global_position, transaction_id, events_handled, total_partitions "
                "FROM projection_checkpoints WHERE projection_name = :n AND partition_key = :k"
            ),
            {"n": name, "k": partition_key},
        ).first()
    return None if row is None else Checkpoint(*(int(v) for v in row))


def checkpoint_position(engine: sa.Engine, name: str, partition_key: int = 0) -> int:
    found = checkpoint(engine, name, partition_key)
    return 0 if found is None else found.global_position


def checkpoint_rows(engine: sa.Engine) -> set[tuple[str, int]]:
    with reader(engine).connect() as conn:
        rows = conn.execute(
            sa.text("SELECT projection_name, partition_key FROM projection_checkpoints")
        ).all()
    return {(str(name), int(key)) for name, key in rows}


def head(engine: sa.Engine) -> int:
    with reader(engine).connect() as conn:
        return int(conn.execute(sa.text("SELECT MAX(global_position) FROM events")).scalar() or 0)


def all_events(engine: sa.Engine) -> list[tuple[int, str, int]]:
    """(global_position, aggregate_id, aggregate_version) of every stored event."""
    with reader(engine).connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT global_position, aggregate_id, aggregate_version FROM events "
                "ORDER BY global_position"
            )
        ).all()
    return [(int(p), str(a), int(v)) for p, a, v in rows]


@dataclass(frozen=True, slots=True)
class Applied:
    global_position: int
    bounded_context: str
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int
    event_type: str
    partition_key: int | None
    seq: int


def applied(engine: sa.Engine, projection: str) -> list[Applied]:
    """Rows the projection wrote, in position order."""
    with reader(engine).connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT global_position, bounded_context, aggregate_type, aggregate_id, "
                "aggregate_version, event_type, partition_key, seq FROM applied "
                "WHERE projection = :p ORDER BY global_position"
            ),
            {"p": projection},
        ).all()
    return [Applied(*row) for row in rows]


def applied_triples(engine: sa.Engine, projection: str) -> list[tuple[int, str, int]]:
    return [
        (row.global_position, row.aggregate_id, row.aggregate_version)
        for row in applied(engine, projection)
    ]


def versions_in_handle_order(rows: Iterable[Applied]) -> dict[str, list[int]]:
    """Each aggregate's versions in the order the projection handled them."""
    by_aggregate: dict[str, list[int]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r.seq):
        by_aggregate[row.aggregate_id].append(row.aggregate_version)
    return dict(by_aggregate)


def assert_versions_in_order(rows: Iterable[Applied]) -> None:
    for aggregate_id, versions in versions_in_handle_order(rows).items():
        assert versions == sorted(versions), f"{aggregate_id} handled out of order: {versions}"


def assert_matches_checkpoint(engine: sa.Engine, projection: str) -> None:
    """The checkpoint says exactly what the read model holds: events 1..checkpoint, once."""
    rows = applied(engine, projection)
    found = checkpoint(engine, projection)
    position = 0 if found is None else found.global_position
    assert [r.global_position for r in rows] == [
        p for p, _, _ in all_events(engine) if p <= position
    ]
    if found is not None:
        assert found.events_handled == len(rows)


def wait_readable(engine: sa.Engine, *, timeout: float = 30.0, rule: str | None = None) -> None:
    """Wait until a processor may read every committed event (PostgreSQL).

    ``rule``: the processors' horizon rule (default: the suite's, ``horizon_rule``).
    Under the server rule processors read only below the oldest
    transaction still running anywhere on the server (DESIGN invariant 2), and other
    databases' transactions count too: under ``pytest -n``, or on a busy server, a
    foreign write transaction can hold committed events back for a while; under the
    store rule only the store's own writers do. Tests that expect exact batches, or
    need a batch to read an event at a given step, call this first. SQLite needs no wait.
    """
    if engine.dialect.name != "postgresql":
        return
    query = sa.text(
        "SELECT MAX(transaction_id)::text, pg_snapshot_xmin(pg_current_snapshot())::text "
        "FROM events"
    )
    shared = horizon.for_store(engine, es.EventStore().tables.names)

    def readable() -> bool:
        with engine.connect() as conn:
            newest, server = conn.execute(query).one()
            if newest is None:
                return True
            # Under the store rule (the default) only the store's writers count.
            server_rule = (rule or horizon_rule) == "server"
            bound = int(server) if server_rule else max(int(server), shared.peek(conn))
            return int(newest) < bound

    wait_until(readable, timeout=timeout)


#: Generous: under the server rule, other tests' transactions on the shared server hold
#: events back too (the suite runs on several xdist workers).
SHARED_SERVER_WAIT = 120.0


def wait_until(
    condition: Callable[[], bool], *, timeout: float = 15.0, interval: float = 0.02
) -> None:
    """Poll ``condition`` until true; fail (AssertionError) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


class Background:
    """Runs a callable in a daemon thread and keeps its result or exception."""

    def __init__(self, target: Callable[[], Any], name: str = "test-background") -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._target = target
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self.result = self._target()
        except BaseException as exc:
            self.error = exc

    def start(self) -> Background:
        self.thread.start()
        return self

    def join(self, timeout: float = 15.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still running after {timeout} s"

    def finished_within(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; whether the callable returned (or raised) by itself.

        Record this before any clean-up that makes the callable return (``stop()``,
        committing a blocker...), and assert it after: a clean-up that ends a hang must
        not let the test pass.
        """
        self.thread.join(timeout)
        return not self.thread.is_alive()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()


def processor(
    engine: sa.Engine,
    store: es.EventStore | None = None,
    **config: Any,
) -> es.Processor:
    config.setdefault("poll_interval", 0.01)
    config.setdefault("horizon", horizon_rule)
    return es.Processor(engine, store or es.EventStore(), es.ProcessorConfig(**config))


#: The horizon rule processor() gives processors (test_gaps runs its tests under both).
horizon_rule: Any = "store"
