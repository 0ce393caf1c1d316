"""How far behind is each projection? Typed status rows for CLIs, health checks and web apps."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from eventsource import cluster, database, errors
from eventsource.models import _PGXid8
from eventsource.projection import Projection
from eventsource.store import EventStore, SessionOrConnection, connection_of


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    """One projection partition's progress against the store's head."""

    projection: str
    partition_key: int
    total_partitions: int
    checkpoint: int
    """Global position of the last event the partition has passed (0: none yet)."""
    head: int
    """Highest global position in the store."""
    lag: int
    """Events in the store after the checkpoint (what the partition has still to read)."""
    events_handled: int
    updated_at: datetime | None
    """When the checkpoint last moved (None: never ran)."""
    age_seconds: float | None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["updated_at"] = self.updated_at.isoformat() if self.updated_at else None
        return data


def status(
    target: sa.Engine | SessionOrConnection,
    *,
    store: EventStore | None = None,
    projections: Iterable[str | Projection] = (),
    now: datetime | None = None,
) -> list[ProjectionStatus]:
    """Status of every checkpointed projection partition, plus ``projections`` never run.

    On PostgreSQL "after the checkpoint" follows the processor's (transaction id,
    position) order, so events held back by an open transaction count as lag. Stored
    ids ahead of the server's (a restore from another cluster) would show as no lag
    while nothing moves, so they raise :class:`~eventsource.errors.TransactionIdsAheadError`.
    """
    store = store or EventStore()
    now = now or datetime.now(UTC)
    if isinstance(target, sa.Engine):
        with target.connect() as connection:
            # Only reads: on SQLite do not queue behind writers for the write lock.
            connection.execution_options(**{database.READ_ONLY_OPTION: True})
            return _status(connection, store, projections, now)
    return _status(connection_of(target), store, projections, now)


def _status(
    conn: sa.Connection,
    store: EventStore,
    projections: Iterable[str | Projection],
    now: datetime,
) -> list[ProjectionStatus]:
    require_schema(conn, store)
    cluster.check(conn, store.tables, record=False)
    ev = store.tables.events
    ck = store.tables.projection_checkpoints
    head = int(conn.execute(sa.select(sa.func.max(ev.c.global_position))).scalar() or 0)
    total_events = int(conn.execute(sa.select(sa.func.count()).select_from(ev)).scalar() or 0)
    if conn.dialect.name == "postgresql":

        def after(tx: int, pos: int) -> sa.ColumnElement[bool]:
            xid = sa.cast(sa.cast(sa.literal(tx, sa.BigInteger), sa.Text), _PGXid8())
            return sa.tuple_(ev.c.transaction_id, ev.c.global_position) > sa.tuple_(xid, pos)
    else:

        def after(tx: int, pos: int) -> sa.ColumnElement[bool]:
            return ev.c.global_position > pos

    rows: list[ProjectionStatus] = []
    seen: set[str] = set()
    checkpoints = conn.execute(
        sa.select(ck).order_by(ck.c.projection_name, ck.c.partition_key)
    ).mappings()
    for row in checkpoints:
        lag = int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(ev)
                .where(after(row["transaction_id"], row["global_position"]))
            ).scalar()
            or 0
        )
        updated: datetime = row["updated_at"]
        seen.add(row["projection_name"])
        rows.append(
            ProjectionStatus(
                projection=row["projection_name"],
                partition_key=row["partition_key"],
                total_partitions=row["total_partitions"],
                checkpoint=row["global_position"],
                head=head,
                lag=lag,
                events_handled=row["events_handled"],
                updated_at=updated,
                age_seconds=max(0.0, (now - updated).total_seconds()),
            )
        )
    for item in projections:
        name = item.name if isinstance(item, Projection) else item
        if name in seen:
            continue
        seen.add(name)
        rows.append(ProjectionStatus(name, 0, 1, 0, head, total_events, 0, None, None))
    return rows


def require_schema(conn: sa.Connection, store: EventStore) -> None:
    """Raise SchemaMissingError naming the missing tables, before any query fails on them."""
    inspector = sa.inspect(conn)
    names = store.tables.names
    missing = [
        name
        for name in (names.events, names.aggregate_heads, names.projection_checkpoints)
        if not inspector.has_table(name)
    ]
    if missing:
        raise errors.SchemaMissingError(
            f"the database has no {', '.join(missing)} table(s): run `eventsource db upgrade` "
            "(or `alembic upgrade head`, or eventsource.upgrade(engine)) first"
        )
