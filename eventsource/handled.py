"""Read-your-writes: wait until projections have handled an event.

A request that appends and then reads a read model wants the projections to have
handled its own events first::

    with Session(engine) as session, session.begin():
        result = store.append(session, [event])
    wait_until_handled(engine, [OrderSummary()], result)  # then read the read model

"Handled" is exact, also when writers commit out of position order (DESIGN invariant
2). Processors read in (transaction id, position) order on PostgreSQL, so a
checkpoint's position alone proves nothing about a lower position: the event of an
older transaction that commits late sorts before events that committed earlier,
whatever their positions. With E the awaited event at (tx_E, pos_E), a projection
partition whose checkpoint is (tx_c, pos_c) has handled E when

(a) (tx_c, pos_c) >= (tx_E, pos_E): it has read everything up to E; or
(b) nothing it would handle lies between: no event of its scope (its bounded contexts
    and aggregate types and, with :class:`~eventsource.HashPartitionStrategy`, its
    partition) is in ((tx_c, pos_c), (tx_E, pos_E)], and no transaction that could
    still add one is open: the reading horizon (the server's oldest running
    transaction, or the store's, see :mod:`eventsource.horizon`) is past tx_E. An idle
    partition that E is not for has handled it.

SQLite has no transaction ids and commits in position order: positions alone. With
another partition strategy, or a projection given by its name (scope unknown), every
event counts in (b): such a wait may take longer, never return early.

Which partitions count: by default the one that owns E's aggregate under the
checkpoints' partition count (``partition_strategy.should_process``), with
``all_partitions`` every partition of that count. A projection without checkpoints
never ran, or was reset: not handled. Checkpoints are read afresh at every check, so
a reshard or a reset meanwhile is taken into account. Quarantined events
(:mod:`eventsource.deadletters`) count as handled: their partition has passed them.

Waiting re-checks as soon as a processor says its checkpoint moved
(:mod:`eventsource.wakeups`: at once in this process, and on PostgreSQL from other
processes through LISTEN/NOTIFY), and polls as a fallback, from 5 ms doubling to
250 ms (50 ms while no hint from other processes can arrive: on SQLite, or before
the listener listens). Each check is one or two short read-only transactions; none
is held while waiting.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from eventsource import database, errors, horizon, wakeups
from eventsource.events import AppendResult, PersistedEvent
from eventsource.partition import HashPartitionStrategy, PartitionStrategy
from eventsource.processor import _xid8, read_committed
from eventsource.projection import Projection
from eventsource.status import _horizon, _read_order
from eventsource.store import EventStore

#: Seconds :func:`wait_until_handled` waits by default.
DEFAULT_TIMEOUT = 10.0
#: The first fallback poll after a check (seconds); it doubles up to MAX_POLL_INTERVAL.
FIRST_POLL_INTERVAL = 0.005
#: The longest fallback poll while hints from every process arrive (PostgreSQL).
MAX_POLL_INTERVAL = 0.25
#: The longest while they cannot (SQLite: other processes send none; PostgreSQL
#: until the listener listens).
MAX_POLL_INTERVAL_UNHEARD = 0.05

Target = sa.Engine | sessionmaker[Session]
Projections = Projection | str | Iterable[Projection | str]
Position = int | AppendResult | PersistedEvent


def wait_until_handled(
    engine: Target,
    projections: Projections,
    position: Position,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    all_partitions: bool = False,
    store: EventStore | None = None,
    partition_strategy: PartitionStrategy | None = None,
) -> None:
    """Return once ``projections`` have handled the event at ``position``; raise
    :class:`~eventsource.errors.WaitTimeoutError` (naming the partitions still behind)
    after ``timeout`` seconds.

    ``engine``: an Engine, or a ``sessionmaker`` (bound to an Engine; one bound to a
    Connection checks inside that connection's transaction). ``projections``: one or
    several Projection instances, or checkpoint names (``"orders"``, ``"orders@v2"``).
    ``position``: a global position, or the :class:`~eventsource.AppendResult` (its
    last event) or :class:`~eventsource.PersistedEvent` of an append whose
    transaction has committed. ``all_partitions``: wait for every partition, not only
    the one that owns the event's aggregate. ``store`` and ``partition_strategy``:
    the processors' (defaults: ``EventStore()``, ``HashPartitionStrategy()``).

    Bad arguments raise :class:`~eventsource.errors.ValidationError` or
    :class:`~eventsource.errors.ConfigurationError` before any query; a position with
    no committed event raises ValidationError. See the module's documentation for
    what "handled" means exactly.
    """
    check = _Check(engine, projections, position, all_partitions, store, partition_strategy)
    seconds = _seconds(timeout)
    deadline = time.monotonic() + seconds
    check.locate()
    woken = threading.Event()
    # Subscribed before the first check: a checkpoint that moves after it wakes the wait.
    subscription = (
        wakeups.subscribe(check.engine, check.events_table, check.matches, woken.set, waiter=True)
        if seconds > 0
        else None
    )
    try:
        interval = FIRST_POLL_INTERVAL
        while True:
            woken.clear()  # a hint from now on calls for another check
            behind = check.run()
            if not behind:
                return
            remaining = deadline - time.monotonic()
            if subscription is None or remaining <= 0:
                break
            ceiling = MAX_POLL_INTERVAL if subscription.active else MAX_POLL_INTERVAL_UNHEARD
            if woken.wait(min(interval, ceiling, remaining)):
                interval = FIRST_POLL_INTERVAL
            else:
                interval = min(interval * 2, MAX_POLL_INTERVAL)
    finally:
        if subscription is not None:
            subscription.close()
    raise errors.WaitTimeoutError(
        f"{check.describe_event()} was not handled within {seconds:g} s by: " + "; ".join(behind),
        position=check.position,
        timeout=seconds,
        behind=tuple(behind),
    )


def is_handled(
    engine: Target,
    projections: Projections,
    position: Position,
    *,
    all_partitions: bool = False,
    store: EventStore | None = None,
    partition_strategy: PartitionStrategy | None = None,
) -> bool:
    """Whether ``projections`` have handled the event at ``position`` now: one check of
    :func:`wait_until_handled`, with the same arguments and errors (but no timeout)."""
    check = _Check(engine, projections, position, all_partitions, store, partition_strategy)
    check.locate()
    return not check.run()


@dataclass(frozen=True, slots=True)
class _Projection:
    """What is known of one awaited projection: its checkpoint name and scope."""

    name: str
    bounded_contexts: tuple[str, ...] = ()
    aggregate_types: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Event:
    position: int
    transaction_id: int
    """0 on SQLite, where positions alone order events."""
    bounded_context: str
    aggregate_type: str
    aggregate_id: str
    partition_hash: int

    @property
    def at(self) -> tuple[int, int]:
        return (self.transaction_id, self.position)


@dataclass(frozen=True, slots=True)
class _Row:
    """One checkpoint row, as read by a check."""

    projection: str
    key: int
    total: int
    at: tuple[int, int]
    """(transaction id, position); the transaction id is 0 on SQLite."""


class _Check:
    """The arguments of one wait, checked, and the check it repeats."""

    def __init__(
        self,
        engine: object,
        projections: object,
        position: object,
        all_partitions: object,
        store: object,
        partition_strategy: object,
    ) -> None:
        self.engine, self._connect, self._owns_connections = _connections(engine)
        self.projections = _projections(projections)
        self.position, self._event_id = _position(position)
        if not isinstance(all_partitions, bool):
            raise errors.ValidationError(f"all_partitions must be a bool, got {all_partitions!r}")
        self.all_partitions = all_partitions
        if store is None:
            store = EventStore()
        elif not isinstance(store, EventStore):
            raise errors.ConfigurationError(f"store must be an EventStore, got {store!r}")
        self.store = store
        if partition_strategy is None:
            partition_strategy = HashPartitionStrategy()
        elif not isinstance(partition_strategy, PartitionStrategy):
            raise errors.ConfigurationError(
                "partition_strategy must have should_process(aggregate_id, partition_key, "
                f"total_partitions), got {partition_strategy!r}"
            )
        self.strategy = partition_strategy
        self.names = frozenset(p.name for p in self.projections)
        self.events_table = store.tables.names.events
        self.is_pg = self.engine.dialect.name == "postgresql"
        #: The last check found partitions held back only by an open transaction: any
        #: append's hint (its end, perhaps) calls for another check.
        self._held_back = False
        self._event: _Event | None = None
        self._owners: dict[int, range | list[int]] = {}
        ck = store.tables.projection_checkpoints
        columns: list[sa.ColumnElement[Any]] = [
            ck.c.projection_name,
            ck.c.partition_key,
            ck.c.total_partitions,
            ck.c.transaction_id,
            ck.c.global_position,
        ]
        if self.is_pg:
            # The server's horizon, taken by the same snapshot, and what the store's
            # horizon needs to know which store and server lifetime this is.
            columns.append(sa.cast(_horizon(), sa.Text))
            columns.append(horizon.store_identity(store.tables.names))
        self._checkpoints = sa.select(*columns).where(ck.c.projection_name.in_(sorted(self.names)))

    # -- the event

    def locate(self) -> None:
        """Read the awaited event (once: events never change); ValidationError when no
        committed event is at the position."""
        ev = self.store.tables.events
        query = sa.select(
            ev.c.transaction_id,
            ev.c.bounded_context,
            ev.c.aggregate_type,
            ev.c.aggregate_id,
            ev.c.partition_hash,
            ev.c.event_id,
        ).where(ev.c.global_position == self.position)
        with self._reading() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise errors.ValidationError(
                f"no committed event at position {self.position} in {self.events_table!r}: "
                "wait after the append's transaction has committed (the events of one "
                "that rolled back are never handled)"
            )
        if self._event_id is not None and row.event_id != self._event_id:
            raise errors.ValidationError(
                f"the event at position {self.position} in {self.events_table!r} is "
                f"{row.event_id}, not the appended {self._event_id}: is this the "
                "database and store it was appended to?"
            )
        self._event = _Event(
            self.position,
            int(row.transaction_id) if self.is_pg else 0,
            row.bounded_context,
            row.aggregate_type,
            row.aggregate_id,
            int(row.partition_hash),
        )

    def describe_event(self) -> str:
        text = f"the event at position {self.position}"
        if self.is_pg and self._event is not None:
            text += f" (transaction {self._event.transaction_id})"
        return text

    # -- checks

    def matches(self, hint: wakeups.Hint) -> bool:
        """Whether a wake-up hint calls for another check."""
        return bool(hint.checkpoints & self.names) or (self._held_back and bool(hint.appended))

    def run(self) -> list[str]:
        """One check: what has not handled the event yet (one line each; none: done)."""
        event = self._event
        assert event is not None, "locate() first"
        with self._reading() as conn:
            found = conn.execute(self._checkpoints).all()
        rows: dict[str, dict[tuple[int, int], _Row]] = {}
        for r in found:
            tx = int(r[3]) if self.is_pg else 0
            read = _Row(str(r[0]), int(r[1]), int(r[2]), (tx, int(r[4])))
            rows.setdefault(read.projection, {})[(read.key, read.total)] = read
        behind: list[str] = []
        unsure: list[tuple[_Projection, _Row]] = []  # decided by clause (b)
        for projection in self.projections:
            present = rows.get(projection.name)
            if not present:
                behind.append(
                    f"projection {projection.name!r}: no checkpoint (it never ran, or was reset)"
                )
                continue
            for key, total in self._wanted({total for _, total in present}):
                row = present.get((key, total))
                if row is None:
                    behind.append(
                        f"projection {projection.name!r} partition {key}/{total}: no "
                        "checkpoint (it never ran)"
                    )
                elif row.at >= event.at:
                    continue  # (a)
                elif self._covers(projection, row):
                    behind.append(self._describe(row))  # the event itself is still ahead
                else:
                    unsure.append((projection, row))
        self._held_back = False
        if unsure and self.is_pg and not self._past_horizon(found[0][5], found[0][6]):
            self._held_back = True
            behind.extend(
                f"{self._describe(row)}, and a transaction older than the event's is still "
                "open (events it appends would come first)"
                for _, row in unsure
            )
        elif unsure:
            with self._reading() as conn:
                for projection, row in unsure:
                    if conn.execute(self._between(projection, row), self._range(row)).scalar():
                        behind.append(self._describe(row))
        return behind

    def _wanted(self, totals: set[int]) -> list[tuple[int, int]]:
        """The (partition key, count) pairs that must have handled the event."""
        event = self._event
        assert event is not None
        wanted: list[tuple[int, int]] = []
        for total in sorted(totals):
            keys = self._owners.get(total)
            if keys is None:
                keys = range(total)
                if not self.all_partitions:
                    owners = [
                        key
                        for key in keys
                        if self.strategy.should_process(event.aggregate_id, key, total)
                    ]
                    keys = owners or keys  # a strategy that owns it nowhere: all of them
                self._owners[total] = keys
            wanted.extend((key, total) for key in keys)
        return wanted

    def _by_hash(self, total: int) -> bool:
        """Partitions filter on the stored hash (other strategies: every event counts)."""
        return type(self.strategy) is HashPartitionStrategy and total > 1

    def _covers(self, projection: _Projection, row: _Row) -> bool:
        """Whether the awaited event is in the partition's scope (as :meth:`_between`
        would count it)."""
        event = self._event
        assert event is not None
        contexts, types = projection.bounded_contexts, projection.aggregate_types
        return (
            (not contexts or event.bounded_context in contexts)
            and (not types or event.aggregate_type in types)
            and (not self._by_hash(row.total) or event.partition_hash % row.total == row.key)
        )

    def _past_horizon(self, server: str, identity: str) -> bool:
        """Whether no transaction that could still append before the event is open: the
        server's horizon (read with the checkpoints), else the store's, computed now,
        before the statement that looks between checkpoint and event takes its
        snapshot (which then sees every event below it)."""
        event = self._event
        assert event is not None
        bound = int(server)
        if bound <= event.transaction_id and self._owns_connections:
            names = self.store.tables.names
            found = horizon.for_store(self.engine, names, identity).get(self.engine, max_age=0)
            bound = horizon.combine(bound, found, None)
        return bound > event.transaction_id

    def _between(self, projection: _Projection, row: _Row) -> sa.Select[Any]:
        """Whether an event of the partition's scope lies after its checkpoint, up to
        the awaited event, in read order."""
        ev = self.store.tables.events
        order = sa.tuple_(*_read_order(ev, self.is_pg))
        where = [
            order > sa.tuple_(*self._point("ck_tx", "ck_pos")),
            order <= sa.tuple_(*self._point("e_tx", "e_pos")),
        ]
        if projection.bounded_contexts:
            where.append(ev.c.bounded_context.in_(projection.bounded_contexts))
        if projection.aggregate_types:
            where.append(ev.c.aggregate_type.in_(projection.aggregate_types))
        if self._by_hash(row.total):
            partition = HashPartitionStrategy().sql_filter(ev.c.partition_hash, row.key, row.total)
            assert partition is not None
            where.append(partition)
        return sa.select(sa.exists().where(*where))

    def _point(self, tx: str, pos: str) -> tuple[sa.ColumnElement[Any], ...]:
        """A point of the read order, as bound parameters (see status._read_order)."""
        position = sa.bindparam(pos, type_=sa.BigInteger)
        return (_xid8(tx), position) if self.is_pg else (position,)

    def _range(self, row: _Row) -> dict[str, int]:
        event = self._event
        assert event is not None
        params = {"ck_pos": row.at[1], "e_pos": event.position}
        if self.is_pg:
            params.update(ck_tx=row.at[0], e_tx=event.transaction_id)
        return params

    def _describe(self, row: _Row) -> str:
        text = (
            f"projection {row.projection!r} partition {row.key}/{row.total} at position {row.at[1]}"
        )
        return text + (f" (transaction {row.at[0]})" if self.is_pg else "")

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sa.Connection]:
        try:
            with self._connect() as conn:
                yield conn
        except sa.exc.DBAPIError as exc:  # a database never migrated: say so
            database.raise_if_schema_missing(exc, self.store.tables.names, own_statement=True)
            raise


def _connections(
    target: object,
) -> tuple[sa.Engine, Callable[[], contextlib.AbstractContextManager[sa.Connection]], bool]:
    """(engine, how to get a connection for one check, whether those are our own)."""
    if isinstance(target, sessionmaker):
        bind = target.kw.get("bind")
        if isinstance(bind, sa.Connection):
            return bind.engine, lambda: _joined(bind), False
        if not isinstance(bind, sa.Engine):
            raise errors.ConfigurationError(
                f"the sessionmaker must be bound to an Engine or a Connection, got {bind!r}"
            )
        target = bind
    if isinstance(target, scoped_session):
        raise errors.ConfigurationError(
            "wait_until_handled needs an Engine or a sessionmaker, got a scoped_session: "
            "pass the Engine (Flask-SQLAlchemy: db.engine)"
        )
    if not isinstance(target, sa.Engine):
        raise errors.ConfigurationError(
            f"wait_until_handled needs an Engine or a sessionmaker, got {type(target).__name__}"
        )
    database.require_configured(target, what="wait_until_handled")
    # READ COMMITTED: each statement's snapshot is taken when it starts (after the
    # store's horizon was computed). Read-only: on SQLite, no queueing for the write lock.
    reads = read_committed(target).execution_options(**{database.READ_ONLY_OPTION: True})
    return target, reads.connect, True


@contextlib.contextmanager
def _joined(connection: sa.Connection) -> Iterator[sa.Connection]:
    """The caller's connection: inside its transaction, or in one of ours rolled back."""
    if connection.in_transaction():
        yield connection
        return
    transaction = connection.begin()
    try:
        yield connection
    finally:
        transaction.rollback()


def _projections(projections: object) -> tuple[_Projection, ...]:
    items: list[object]
    if isinstance(projections, Projection | str):
        items = [projections]
    elif isinstance(projections, Iterable) and not isinstance(projections, bytes):
        items = list(projections)
    else:
        raise errors.ConfigurationError(
            f"projections must be a Projection, a checkpoint name or a list of them, got "
            f"{projections!r}"
        )
    if not items:
        raise errors.ConfigurationError("no projections given: nothing to wait for")
    found: dict[str, _Projection] = {}
    for item in items:
        if isinstance(item, Projection):
            wanted = _Projection(item.checkpoint_name, item.bounded_contexts, item.aggregate_types)
        elif isinstance(item, str) and item:
            wanted = _Projection(item)  # scope unknown: every event counts
        else:
            raise errors.ConfigurationError(
                f"expected a Projection instance or a checkpoint name, got {item!r}"
            )
        known = found.get(wanted.name)
        # The same checkpoints given twice with two scopes: the wider one, every event.
        found[wanted.name] = wanted if known in (None, wanted) else _Projection(wanted.name)
    return tuple(found.values())


def _position(position: object) -> tuple[int, uuid.UUID | None]:
    """The awaited position, and the event id it must hold (when an event was given)."""
    if isinstance(position, AppendResult):
        if not position.events:
            raise errors.ValidationError("the AppendResult holds no event")
        position = position.events[-1]
    if isinstance(position, PersistedEvent):
        return position.global_position, position.event_id
    if isinstance(position, bool) or not isinstance(position, int):
        raise errors.ValidationError(
            "position must be a global position (int), an AppendResult or a "
            f"PersistedEvent, got {position!r}"
        )
    if position < 1:
        raise errors.ValidationError(f"position must be >= 1, got {position}")
    return position, None


def _seconds(timeout: object) -> float:
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout < 0
    ):
        raise errors.ValidationError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
    return float(timeout)
