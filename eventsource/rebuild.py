"""Resetting and rebuilding a projection, safely while its workers run.

Both first take the projection's exclusive lock, the one whose shared side every
batch holds (DESIGN invariant 6): they wait for the batches in hand of every
partition, and new batches wait for them. Both run at READ COMMITTED whatever the
engine's isolation, so what they clear is what the finished batches committed.

A reset deletes the checkpoints (and the projection's dead letters) and clears the
read model through the projection's ``reset`` hook in one transaction; a running
worker then replays from the start, as a restarted one would. Without the hook the
read model would keep every effect and the replay would apply them again, so that
needs ``keep_read_model=True``.

A rebuild runs in one database transaction: the reset, then every event replayed (each
batch in a savepoint), and only then the commit. A failed or interrupted rebuild
therefore leaves the read model and the checkpoints exactly as they were, and running
workers carry on from the rebuilt checkpoints afterwards. The price, on PostgreSQL, is
one long transaction: while it runs, this projection's workers wait, and other
projections do not see events committed after it started (see "Why nothing is ever
skipped" in the README).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from eventsource import database, errors
from eventsource.processor import (
    BatchResult,
    Processor,
    ProcessorConfig,
    lock_projection,
    read_committed,
)
from eventsource.projection import Projection
from eventsource.status import require_schema
from eventsource.store import EventStore, SessionOrConnection

#: How long a reset or rebuild waits for the batches in hand by default (seconds).
DEFAULT_WAIT = 60.0


@dataclass(frozen=True, slots=True)
class RebuildProgress:
    """Where a rebuild is: rows read so far out of the events in the projection's scope."""

    projection: str
    done: int
    total: int
    handled: int
    elapsed: float

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        if self.rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / self.rate)


def has_reset(projection: Projection) -> bool:
    """Whether the projection clears its read model itself (overrides ``reset``)."""
    return type(projection).reset is not Projection.reset


def reset(
    target: sa.Engine | SessionOrConnection,
    name: str,
    *,
    store: EventStore | None = None,
    projection: Projection | None = None,
    keep_read_model: bool = False,
    wait: float | None = DEFAULT_WAIT,
) -> int:
    """Delete the checkpoints of projection ``name`` and clear its read model through
    ``projection.reset``, in one transaction. Returns the checkpoint rows deleted.

    Refused (:class:`~eventsource.errors.ConfigurationError`, nothing changed) when the
    read model would survive the reset, i.e. without a ``projection`` whose ``reset``
    clears it, unless ``keep_read_model=True`` says the replay may apply every event
    again on top of it (an idempotent read model, or one cleared another way).
    Waits up to ``wait`` seconds (None: forever) for the batches in hand, then raises
    :class:`~eventsource.errors.ProjectionBusyError`. With an Engine this commits; with
    a Connection or Session the caller does.
    """
    store = store or EventStore()
    if projection is not None and projection.name != name:
        raise errors.ConfigurationError(f"reset({name!r}) was given projection {projection.name!r}")
    _check_read_model(name, projection, keep_read_model, "reset")
    if isinstance(target, sa.Engine):
        database.require_configured(target, what="reset")
        with Session(read_committed(target)) as session, session.begin():
            return reset(
                session,
                name,
                store=store,
                projection=projection,
                keep_read_model=keep_read_model,
                wait=wait,
            )
    if isinstance(target, scoped_session):  # its registry's current Session
        session = target()
    elif isinstance(target, Session):
        session = target
    else:
        session = Session(bind=target)
    require_schema(session.connection(), store)
    lock_projection(session, name, store=store, timeout=wait)
    ck = store.tables.projection_checkpoints
    if projection is not None:
        projection.reset(session)
    result = session.connection().execute(ck.delete().where(ck.c.projection_name == name))
    # The replay applies (or quarantines again) the events it had quarantined.
    dead_letters = store.tables.dead_letters
    if sa.inspect(session.connection()).has_table(dead_letters.name):  # before es0003: none
        session.execute(dead_letters.delete().where(dead_letters.c.projection_name == name))
    return int(result.rowcount or 0)


def rebuild(
    engine: sa.Engine,
    projection: Projection,
    *,
    store: EventStore | None = None,
    batch_size: int = 1000,
    total_partitions: int | None = None,
    keep_read_model: bool = False,
    wait: float | None = DEFAULT_WAIT,
    on_progress: Callable[[RebuildProgress], None] | None = None,
) -> RebuildProgress:
    """Clear ``projection``'s read model and replay every event into it, atomically.

    ``total_partitions`` defaults to the count its checkpoints were written with, so
    partitioned workers can resume afterwards; all partitions are replayed here. A
    projection without a ``reset`` hook is refused unless ``keep_read_model=True``
    (see :func:`reset`); ``wait`` bounds the wait for the batches in hand.
    """
    store = store or EventStore()
    _check_read_model(projection.name, projection, keep_read_model, "rebuild")
    database.require_configured(engine, what="rebuild")
    started = time.monotonic()
    with read_committed(engine).connect() as connection, connection.begin():
        require_schema(connection, store)
        sessions = sessionmaker(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        with sessions() as session, session.begin():
            # Before reading the partition count: a worker starting the projection for
            # the first time may be creating its checkpoint right now.
            lock_projection(session, projection.name, store=store, timeout=wait)
            if total_partitions is None:
                total_partitions = _current_partitions(session, store, projection.name)
            reset(
                session,
                projection.name,
                store=store,
                projection=projection,
                keep_read_model=keep_read_model,
                wait=wait,
            )
        total = _events_in_scope(connection, store, projection)
        done = handled = 0

        def report(result: BatchResult) -> None:
            nonlocal done, handled
            done += result.read
            handled += result.handled
            if on_progress is not None:
                on_progress(
                    RebuildProgress(
                        projection.name, done, total, handled, time.monotonic() - started
                    )
                )

        for key in range(total_partitions):
            config = ProcessorConfig(
                batch_size=batch_size, partition_key=key, total_partitions=total_partitions
            )
            replay = Processor(sessions, store, config)
            # This transaction commits: its own rows (events the handlers append) wait
            # for the workers, behind any older transaction still open.
            replay.read_own_transaction = False
            replay.run_until_caught_up(projection, on_batch=report)
    return RebuildProgress(projection.name, done, total, handled, time.monotonic() - started)


def _check_read_model(
    name: str, projection: Projection | None, keep_read_model: bool, what: str
) -> None:
    if keep_read_model or (projection is not None and has_reset(projection)):
        return
    whose = (
        f"{type(projection).__qualname__} has no reset() method"
        if projection is not None
        else "no projection was given to clear it"
    )
    raise errors.ConfigurationError(
        f"{what} of projection {name!r} would keep its read model ({whose}), and the "
        "replay would apply every event again on top of it. Give the projection a "
        "reset(self, session) that clears its read model, or pass keep_read_model=True "
        "(CLI: --keep-read-model) if replaying onto it is safe."
    )


def _current_partitions(session: Session, store: EventStore, name: str) -> int:
    ck = store.tables.projection_checkpoints
    totals = set(
        session.execute(
            sa.select(ck.c.total_partitions).where(ck.c.projection_name == name).distinct()
        ).scalars()
    )
    if len(totals) > 1:
        raise errors.PartitionCountChangedError(
            f"projection {name!r} has checkpoints with several partition counts "
            f"{sorted(totals)}: pass total_partitions explicitly"
        )
    return totals.pop() if totals else 1


def _events_in_scope(conn: sa.Connection, store: EventStore, projection: Projection) -> int:
    ev = store.tables.events
    query = sa.select(sa.func.count()).select_from(ev)
    if projection.aggregate_types:
        query = query.where(ev.c.aggregate_type.in_(projection.aggregate_types))
    if projection.bounded_contexts:
        query = query.where(ev.c.bounded_context.in_(projection.bounded_contexts))
    return int(conn.execute(query).scalar() or 0)
