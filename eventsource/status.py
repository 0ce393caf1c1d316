"""How far behind is each projection, and what holds it back? Typed rows for CLIs,
health checks, metrics and web apps.

:func:`status` costs a few index lookups however long the log: the head comes from
the primary key's index, and lag is counted over the lag range only (the events after
the checkpoint, in the processor's order and through the index its reads use), at most
``lag_cap`` of them; the times beside it (``last_handled_at``, ``lag_seconds``) are
two more index lookups in the same statement. :func:`blockers` names the open
transactions on a PostgreSQL server that projections wait for (see DESIGN invariant 2:
events committed after a transaction started are read once it ends).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa

from eventsource import cluster, database, errors, models
from eventsource import horizon as store_horizon
from eventsource.horizon import HORIZON_RULES, HorizonRule
from eventsource.models import UtcDateTime, _PGXid8
from eventsource.projection import Projection
from eventsource.store import EventStore, SessionOrConnection, connection_of

#: Lag is counted up to this many events per partition; past it a row says "more than"
#: (``lag_capped``), so a partition far behind costs a bounded count, not the whole log.
DEFAULT_LAG_CAP = 100_000
#: How much of a blocking session's current query :func:`blockers` reports.
QUERY_PREFIX_CHARS = 100
#: How many blocking transactions :func:`blockers` reports by default (oldest first).
DEFAULT_BLOCKERS_LIMIT = 5


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
    """Events in the store after the checkpoint (what the partition has still to read);
    with ``lag_capped``, a lower bound: more than ``lag`` events."""
    events_handled: int
    updated_at: datetime | None
    """When the checkpoint last moved (None: never ran)."""
    age_seconds: float | None
    lag_capped: bool = False
    """More than ``lag`` events are after the checkpoint: counting stopped at
    ``status(lag_cap=...)``."""
    held_back: bool = False
    """PostgreSQL: part of the lag is committed events the partition cannot read yet,
    because a transaction that started before them is still open, anywhere on the
    server (:func:`blockers` names it). Nothing is lost: they are read once it ends."""
    owner: str | None = None
    """Claimed partitions (:mod:`eventsource.claims`): the worker holding the lease
    (None: free, or not claimed)."""
    lease_age_seconds: float | None = None
    """Seconds since the owner last renewed its lease (it renews every third of it)."""
    lease_expired: bool = False
    """The owner stopped renewing (killed, paused, cut off): another worker takes the
    partition over."""
    reshard_boundary: int | None = None
    """While the projection is resharded (:func:`eventsource.reshard`): the position the
    partition stops at until the new partitions take over."""
    last_handled_at: datetime | None = None
    """``created_at`` of the event at the checkpoint, the last one the partition passed
    (None: checkpoint 0). The store sets ``created_at`` when it appends the event (unless
    the application gave ``Event(created_at=...)``): the closest stored stand-in for the
    event's commit time."""
    lag_seconds: float | None = None
    """How long the oldest event the partition has not passed has waited: ``now`` minus
    the ``created_at`` of the first event after the checkpoint, in the processor's read
    order (the first of those ``lag`` counts; never run: the store's first event).
    0.0 when ``lag`` is 0, and never negative (writers' clocks may differ)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["updated_at"] = self.updated_at.isoformat() if self.updated_at else None
        data["last_handled_at"] = self.last_handled_at.isoformat() if self.last_handled_at else None
        return data


@dataclass(frozen=True, slots=True)
class Blocker:
    """An open transaction on the PostgreSQL server that committed events wait behind.

    ``kind`` is ``"transaction"`` (a session, from ``pg_stat_activity``) or
    ``"prepared"`` (a two-phase transaction, from ``pg_prepared_xacts``: no session,
    it lasts until ``COMMIT PREPARED`` or ``ROLLBACK PREPARED``). What a role may not
    see of another role's session is None (``age_seconds``, ``state``) or PostgreSQL's
    ``<insufficient privilege>`` (``query``): grant ``pg_read_all_stats`` to see all.
    """

    kind: Literal["transaction", "prepared"]
    transaction_id: int
    database: str | None
    user: str | None
    """The session's user, or the prepared transaction's owner."""
    pid: int | None
    application_name: str | None
    state: str | None
    """E.g. ``idle in transaction``: a session that holds its transaction open and
    does nothing."""
    started_at: datetime | None
    """When the transaction began (prepared: when it was prepared)."""
    age_seconds: float | None
    query: str | None
    """The start of the session's current or last query."""
    gid: str | None = None
    """The prepared transaction's identifier."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat() if self.started_at else None
        return data

    def describe(self) -> str:
        """One line for people: who, where, for how long, doing what."""
        age = "" if self.age_seconds is None else f", open {format_age(self.age_seconds)}"
        if self.kind == "prepared":
            return (
                f"prepared transaction {self.gid!r} in database {self.database!r} (owner "
                f"{self.user!r}{age}): finish it with COMMIT PREPARED or ROLLBACK PREPARED"
            )
        parts = [f"pid {self.pid} in database {self.database!r}", f"user {self.user!r}"]
        if self.application_name:
            parts.append(f"application {self.application_name!r}")
        text = f"{parts[0]} ({', '.join(parts[1:])}{age}"
        if self.state:
            text += f", {self.state}"
        text += ")"
        if self.query:
            text += f": {' '.join(self.query.split())}"
        return text


def status(
    target: sa.Engine | SessionOrConnection,
    *,
    store: EventStore | None = None,
    projections: Iterable[str | Projection] = (),
    now: datetime | None = None,
    lag_cap: int | None = DEFAULT_LAG_CAP,
    horizon: HorizonRule = "store",
) -> list[ProjectionStatus]:
    """Status of every checkpointed projection partition, plus ``projections`` never run.

    On PostgreSQL "after the checkpoint" follows the processor's (transaction id,
    position) order, so events held back by an open transaction count as lag (and
    the row says ``held_back``). Stored ids ahead of the server's (a restore from
    another cluster) would show as no lag while nothing moves, so they raise
    :class:`~eventsource.errors.TransactionIdsAheadError`.

    Lag is exact up to ``lag_cap`` events; past it the row has ``lag == lag_cap`` and
    ``lag_capped``. The cost is a few index lookups plus the events counted (at most
    ``lag_cap`` per partition), never a scan of the whole log. ``lag_cap=None`` counts
    every event, however many. ``horizon`` is the processors' rule
    (:attr:`~eventsource.ProcessorConfig.horizon`) that ``held_back`` follows. ``now``
    is what ``age_seconds`` and ``lag_seconds`` are measured against.
    """
    _check_rule(horizon)
    if lag_cap is not None and (
        isinstance(lag_cap, bool) or not isinstance(lag_cap, int) or lag_cap < 1
    ):
        raise errors.ConfigurationError(f"lag_cap must be an int >= 1 or None, got {lag_cap!r}")
    store = store or EventStore()
    now = now or datetime.now(UTC)
    if isinstance(target, sa.Engine):
        with target.connect() as connection:
            # Only reads: on SQLite do not queue behind writers for the write lock.
            connection.execution_options(**{database.READ_ONLY_OPTION: True})
            return _status(connection, store, projections, now, lag_cap, horizon)
    return _status(connection_of(target), store, projections, now, lag_cap, horizon)


def _status(
    conn: sa.Connection,
    store: EventStore,
    projections: Iterable[str | Projection],
    now: datetime,
    lag_cap: int | None,
    rule: HorizonRule,
) -> list[ProjectionStatus]:
    require_schema(conn, store)
    cluster.check(conn, store.tables, record=False)
    ev = store.tables.events
    ck = store.tables.projection_checkpoints
    is_pg = conn.dialect.name == "postgresql"
    # The head from the primary key's index: one lookup, where count(*) reads the log.
    # On PostgreSQL also the last event in read order that no reader can read yet
    # (its transaction id at or above the horizon; the caller's own rows aside): a
    # partition whose checkpoint is before it is held back. One backward index step.
    head_query = sa.select(sa.func.max(ev.c.global_position)).scalar_subquery()
    waiting: tuple[int, int] | None = None
    head: int | None = None
    if is_pg:
        top = conn.execute(_last_unreadable(ev).add_columns(head_query)).first()
        if top is not None:
            head = int(top[3] or 0)
            if int(top[0]) >= _bound(conn, store, int(top[2]), rule):
                waiting = (int(top[0]), int(top[1]))
    if head is None:  # SQLite, or no event (but the caller's own) on PostgreSQL
        head = int(conn.execute(sa.select(head_query)).scalar() or 0)

    # The processor's "after the checkpoint" as one index range per partition
    # (PostgreSQL: the read-order index, (transaction id, position) > checkpoint;
    # SQLite: positions), counted through a LIMITed subquery so that counting stops
    # past the cap. One small statement per partition, not one correlated statement
    # for all: the planner cannot know how few checkpoint rows there are, and its
    # estimate of such a statement is costly enough to set off JIT compilation, which
    # alone takes longer than every count here.
    # The same statement looks up two times, one index step each: the created_at of the
    # first event after the checkpoint in that order (lag_seconds), and of the event at
    # the checkpoint (last_handled_at, by primary key).
    ck_pos = sa.bindparam("ck_pos", type_=sa.BigInteger)
    read_order = _read_order(ev, is_pg)
    if is_pg:
        ck_xid = sa.cast(sa.cast(sa.bindparam("ck_tx", type_=sa.BigInteger), sa.Text), _PGXid8())
        after = sa.tuple_(ev.c.transaction_id, ev.c.global_position) > sa.tuple_(ck_xid, ck_pos)
    else:
        after = ev.c.global_position > ck_pos
    lag_query = sa.select(
        _capped(sa.select(sa.literal(1)).where(after), lag_cap),
        _first_created(ev, read_order, after),
        sa.select(ev.c.created_at).where(ev.c.global_position == ck_pos).scalar_subquery(),
    )

    from eventsource import claims  # it imports the processor, which imports this module
    from eventsource.processor import has_claims_schema

    # A store not yet at es0006 (upgrades need no particular order) has no claims.
    reshardable = has_claims_schema(conn, store.tables)
    leases = {
        (claim.projection, claim.partition_key, claim.total_partitions): claim
        for claim in (claims.partition_claims(conn, store=store) if reshardable else [])
    }
    rows: list[ProjectionStatus] = []
    seen: set[str] = set()
    columns = [
        ck.c.projection_name,
        ck.c.partition_key,
        ck.c.total_partitions,
        ck.c.transaction_id,
        ck.c.global_position,
        ck.c.events_handled,
        ck.c.updated_at,
        (ck.c.stop_global_position if reshardable else sa.null()).label("stop_global_position"),
    ]
    checkpoints = conn.execute(
        sa.select(*columns).order_by(ck.c.projection_name, ck.c.partition_key)
    ).mappings()
    for row in checkpoints.all():
        tx, pos = int(row["transaction_id"]), int(row["global_position"])
        counted, first_waiting, last_handled = conn.execute(
            lag_query, {"ck_tx": tx, "ck_pos": pos}
        ).one()
        lag, capped = _cap(int(counted or 0), lag_cap)
        updated: datetime = row["updated_at"]
        seen.add(row["projection_name"])
        lease = leases.get((row["projection_name"], row["partition_key"], row["total_partitions"]))
        rows.append(
            ProjectionStatus(
                projection=row["projection_name"],
                partition_key=row["partition_key"],
                total_partitions=row["total_partitions"],
                checkpoint=pos,
                head=head,
                lag=lag,
                events_handled=row["events_handled"],
                updated_at=updated,
                age_seconds=max(0.0, (now - updated).total_seconds()),
                lag_capped=capped,
                held_back=waiting is not None and (tx, pos) < waiting,
                owner=lease.owner if lease is not None else None,
                lease_age_seconds=lease.lease_age_seconds if lease is not None else None,
                lease_expired=lease.expired if lease is not None else False,
                reshard_boundary=row["stop_global_position"],
                last_handled_at=last_handled,
                lag_seconds=_waited(lag, first_waiting, now),
            )
        )
    never_run: tuple[int, bool, datetime | None] | None = None
    for item in projections:
        name = item.checkpoint_name if isinstance(item, Projection) else item
        if name in seen:
            continue
        seen.add(name)
        if never_run is None:  # every event is after an empty checkpoint
            everything = _capped(sa.select(sa.literal(1)).select_from(ev), lag_cap)
            counted, first_waiting = conn.execute(
                sa.select(everything, _first_created(ev, read_order))
            ).one()
            never_run = (*_cap(int(counted or 0), lag_cap), first_waiting)
        lag_count, capped, first_waiting = never_run
        rows.append(
            ProjectionStatus(
                name,
                0,
                1,
                0,
                head,
                lag_count,
                0,
                None,
                None,
                lag_capped=capped,
                held_back=waiting is not None,
                lag_seconds=_waited(lag_count, first_waiting, now),
            )
        )
    return rows


def _read_order(ev: sa.Table, is_pg: bool) -> tuple[sa.ColumnElement[Any], ...]:
    """The processor's read order: (transaction id, position) on PostgreSQL."""
    return (ev.c.transaction_id, ev.c.global_position) if is_pg else (ev.c.global_position,)


def _first_created(
    ev: sa.Table, order: tuple[sa.ColumnElement[Any], ...], *where: sa.ColumnElement[bool]
) -> sa.ScalarSelect[Any]:
    """``created_at`` of the first event (matching ``where``) in ``order``: one index step."""
    return sa.select(ev.c.created_at).where(*where).order_by(*order).limit(1).scalar_subquery()


def _waited(lag: int, first_waiting: datetime | None, now: datetime) -> float | None:
    """``lag_seconds``: 0.0 when caught up, else how long the first unpassed event waited."""
    if lag == 0:
        return 0.0
    if first_waiting is None:  # cannot be: one statement counted the lag and found it
        return None
    return max(0.0, (now - first_waiting).total_seconds())


def _capped(rows: sa.Select[Any], cap: int | None) -> sa.ScalarSelect[Any]:
    """How many rows ``rows`` returns, counting at most ``cap + 1`` (see :func:`_cap`)."""
    if cap is not None:
        rows = rows.limit(cap + 1)
    return sa.select(sa.func.count()).select_from(rows.subquery()).scalar_subquery()


def _cap(counted: int, cap: int | None) -> tuple[int, bool]:
    """(lag, capped) from a count of at most ``cap + 1`` rows."""
    if cap is not None and counted > cap:
        return cap, True
    return counted, False


def _horizon() -> sa.ColumnElement[Any]:
    """The oldest transaction still running on the server (DESIGN invariant 2)."""
    return sa.func.pg_snapshot_xmin(sa.func.pg_current_snapshot())


def _check_rule(rule: object) -> None:
    if rule not in HORIZON_RULES:
        raise errors.ConfigurationError(
            f"horizon must be one of {', '.join(map(repr, HORIZON_RULES))}, got {rule!r}"
        )


def _bound(conn: sa.Connection, store: EventStore, server: int, rule: HorizonRule) -> int:
    """The id below which processors under ``rule`` read now (from the server's bound)."""
    if rule == "server":
        return server
    shared = store_horizon.for_store(conn.engine, store.tables.names)
    if not shared.available(conn):  # processors fall back to the server rule too
        return server
    return max(server, shared.peek(conn))


def _not_own(ev: sa.Table) -> sa.ColumnElement[bool]:
    # Rows of the caller's own open transaction carry its id, which is not below the
    # horizon, yet processors inside that transaction read them: they wait for nothing.
    return sa.func.coalesce(
        ev.c.transaction_id != sa.func.pg_current_xact_id_if_assigned(), sa.true()
    )


def _last_unreadable(ev: sa.Table) -> sa.Select[Any]:
    return (
        sa.select(
            sa.cast(ev.c.transaction_id, sa.Text),
            ev.c.global_position,
            sa.cast(_horizon(), sa.Text),
        )
        .where(_not_own(ev))
        .order_by(ev.c.transaction_id.desc(), ev.c.global_position.desc())
        .limit(1)
    )


def blockers(
    target: sa.Engine | SessionOrConnection,
    *,
    store: EventStore | None = None,
    limit: int = DEFAULT_BLOCKERS_LIMIT,
    horizon: HorizonRule = "store",
) -> list[Blocker]:
    """The open transactions that committed events of the store wait behind, oldest first.

    PostgreSQL only (an empty list elsewhere, and when no event waits). Projections
    read only events whose transaction is older than every transaction still running
    on the server (DESIGN invariant 2), so a transaction held open anywhere on the
    server, in any database, delays every projection until it ends; nothing is lost.
    This lists the transactions that started before the oldest waiting event's: the
    sessions (``pg_stat_activity.backend_xid``) and prepared transactions
    (``pg_prepared_xacts``). A session that only holds a snapshot (``backend_xmin``,
    e.g. an idle REPEATABLE READ transaction that has written nothing) holds back
    VACUUM, not projections, and is not listed. Needs nothing beyond the default
    visibility of ``pg_stat_activity``; what the role may not see stays hidden (see
    :class:`Blocker`).

    That is the ``"server"`` rule. Under the ``"store"`` rule (``horizon``, the
    processors' default: see docs/horizon.md) only the store's writers hold
    projections back, so only transactions that hold its writer mark are listed.
    """
    _check_rule(horizon)
    if isinstance(target, sa.Engine):
        with target.connect() as connection:
            connection.execution_options(**{database.READ_ONLY_OPTION: True})
            return _blockers(connection, store or EventStore(), limit, horizon)
    return _blockers(connection_of(target), store or EventStore(), limit, horizon)


def _blockers(
    conn: sa.Connection, store: EventStore, limit: int, rule: HorizonRule
) -> list[Blocker]:
    if conn.dialect.name != "postgresql":
        return []
    ev = store.tables.events
    # The oldest waiting event's transaction: one forward step on the read-order index.
    bound: sa.ColumnElement[Any] = _horizon()
    if rule == "store":
        server = int(conn.execute(sa.select(sa.cast(_horizon(), sa.Text))).scalar_one())
        bound = models.as_xid8(_bound(conn, store, server, rule))
    oldest = conn.execute(
        sa.select(
            sa.cast(
                sa.select(sa.func.min(ev.c.transaction_id))
                .where(ev.c.transaction_id >= bound, _not_own(ev))
                .scalar_subquery(),
                sa.Text,
            ),
            sa.cast(sa.func.pg_snapshot_xmax(sa.func.pg_current_snapshot()), sa.Text),
        )
    ).one()
    if oldest[0] is None:
        return []
    waiting_for, next_id = int(oldest[0]), int(oldest[1])
    found = []
    query = _BLOCKERS if rule == "server" else _store_blockers(store)
    for row in conn.execute(query, {"prefix": QUERY_PREFIX_CHARS}).mappings():
        full_id = _full_transaction_id(int(row["xid"]), next_id)
        if full_id >= waiting_for:
            continue
        found.append(
            Blocker(
                kind=row["kind"],
                transaction_id=full_id,
                database=row["database"],
                user=row["usr"],
                pid=row["pid"],
                application_name=row["application_name"],
                state=row["state"],
                started_at=row["started_at"],
                age_seconds=None if row["age"] is None else max(0.0, float(row["age"])),
                query=row["query"],
                gid=row["gid"],
            )
        )
    found.sort(key=lambda blocker: blocker.transaction_id)
    return found[:limit]


# The server's views of open transactions: PostgreSQL-only catalogs, hence raw SQL.
# backend_xid is a 32-bit id (no xid8 there): it is widened in Python against the next
# id, which every running transaction is less than 2**31 below.
_BLOCKERS_SQL = """
    SELECT 'transaction' AS kind, backend_xid::text AS xid, datname AS database,
           usename AS usr, pid, application_name, state, xact_start AS started_at,
           extract(epoch FROM clock_timestamp() - xact_start) AS age,
           left(query, :prefix) AS query, NULL AS gid
    FROM pg_stat_activity
    WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()
    UNION ALL
    SELECT 'prepared', transaction::text, database, owner, NULL, NULL, NULL, prepared,
           extract(epoch FROM clock_timestamp() - prepared), NULL, gid
    FROM pg_prepared_xacts
    """
_BLOCKERS = sa.text(_BLOCKERS_SQL).columns(started_at=UtcDateTime())


def _store_blockers(store: EventStore) -> sa.TextualSelect:
    """_BLOCKERS, but only the sessions that hold the store's writer mark, and the
    prepared transactions of this database (which the store rule counts, writers or
    not: see eventsource.horizon)."""
    writers = store_horizon.writers_sql(store.tables.names.events)
    sessions, prepared = _BLOCKERS_SQL.split("UNION ALL")
    return sa.text(
        f"""{sessions} AND pid IN (SELECT pid FROM ({writers}) AS w WHERE pid IS NOT NULL)
        UNION ALL {prepared}
        WHERE database = current_database()"""
    ).columns(started_at=UtcDateTime())


def _full_transaction_id(xid32: int, next_id: int) -> int:
    """The 64-bit id of a running transaction's 32-bit id: the one below ``next_id``."""
    return next_id - (next_id - xid32) % 2**32


def format_age(seconds: float) -> str:
    """A duration for people: 45s, 12m, 5h, 3d."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


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
