"""Resetting and rebuilding a projection.

A rebuild runs in one database transaction: the projection's ``reset`` hook clears
its read model, its checkpoints are deleted, every event is replayed (each batch in a
savepoint), and only then does it commit. A failed or interrupted rebuild therefore
leaves the read model and the checkpoints exactly as they were. The price, on
PostgreSQL, is one long transaction: while it runs, other projections do not see
events committed after it started (see "Why nothing is ever skipped" in the README).
Stop the projection's workers before rebuilding it; if they keep running they wait
on the checkpoint lock and carry on from the rebuilt checkpoint afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from eventsource import errors
from eventsource.processor import BatchResult, Processor, ProcessorConfig
from eventsource.projection import Projection
from eventsource.status import require_schema
from eventsource.store import EventStore


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


def reset(
    target: sa.Engine | sa.Connection | Session,
    name: str,
    *,
    store: EventStore | None = None,
    projection: Projection | None = None,
) -> int:
    """Delete the checkpoints of projection ``name`` (and clear its read model through
    ``projection.reset`` when given), in one transaction. Returns the rows deleted.

    With an Engine this commits; with a Connection or Session the caller does.
    """
    store = store or EventStore()
    if projection is not None and projection.name != name:
        raise errors.ConfigurationError(f"reset({name!r}) was given projection {projection.name!r}")
    if isinstance(target, sa.Engine):
        with Session(target) as session, session.begin():
            return reset(session, name, store=store, projection=projection)
    session = target if isinstance(target, Session) else Session(bind=target)
    require_schema(session.connection(), store)
    ck = store.tables.projection_checkpoints
    if projection is not None:
        projection.reset(session)
    result = session.connection().execute(ck.delete().where(ck.c.projection_name == name))
    return int(result.rowcount or 0)


def rebuild(
    engine: sa.Engine,
    projection: Projection,
    *,
    store: EventStore | None = None,
    batch_size: int = 1000,
    total_partitions: int | None = None,
    on_progress: Callable[[RebuildProgress], None] | None = None,
) -> RebuildProgress:
    """Clear ``projection``'s read model and replay every event into it, atomically.

    ``total_partitions`` defaults to the count its checkpoints were written with, so
    partitioned workers can resume afterwards; all partitions are replayed here.
    """
    store = store or EventStore()
    started = time.monotonic()
    with engine.connect() as connection, connection.begin():
        require_schema(connection, store)
        sessions = sessionmaker(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        with sessions() as session, session.begin():
            if total_partitions is None:
                total_partitions = _current_partitions(session, store, projection.name)
            reset(session, projection.name, store=store, projection=projection)
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
            Processor(sessions, store, config).run_until_caught_up(projection, on_batch=report)
    return RebuildProgress(projection.name, done, total, handled, time.monotonic() - started)


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
