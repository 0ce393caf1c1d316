"""Blue/green rebuilds: a projection's next version builds beside the one readers use.

A projection that declares ``version = 2`` keeps its own checkpoints, keyed by
``"<name>@v2"`` (:attr:`Projection.checkpoint_name`), and writes its own tables, named
by :meth:`Projection.table_name` (``self.table_name("user_stats")`` is
``"user_stats_v2"``). So it replays the whole log beside the running version without
touching it, and both progress independently (DESIGN invariant 4).

Readers ask the database which version to read: :func:`active_version` (one
primary-key lookup in ``<events>_projection_versions``) and :func:`table_name`.
:func:`switch` moves them over, in one transaction that holds the exclusive lock of
the projection and of every version it touches (the lock every batch holds the shared
side of, see :func:`eventsource.processor.lock_projection`), so it never interleaves
with a batch:

1. it refuses (:class:`~eventsource.errors.VersionNotCaughtUpError`, nothing changed)
   while the new version lags: some partition has no checkpoint, or committed events
   remain after one (``force=True`` switches anyway);
2. it records the new active version, the previous one and the time;
3. it retires every older version (and the unversioned projection of the same name):
   their checkpoints and dead letters are deleted, their read model is dropped by
   ``retire.retire(session)`` when a projection is given as ``retire=``. A worker of a
   retired version that still runs stops at its next batch with
   :class:`~eventsource.errors.ProjectionRetiredError` instead of replaying from
   scratch. Versions only move forward.

Why readers never see a half-built version: the active version changes only in the
switch's transaction, and that commits only when the new version had passed every
event committed before it, under the lock that keeps its batches out. Every event the
old version had applied when a reader last read it, the new one had applied when it
became active. The price: until the switch, each event is projected twice, and the
read model is stored twice.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session

from eventsource import database, errors, models
from eventsource import status as status_module
from eventsource.processor import lock_projection, read_committed
from eventsource.projection import (
    Projection,
    check_version,
    versioned_name,
    versioned_table,
)
from eventsource.store import EventStore, SessionOrConnection, connection_of

#: How long a switch waits for the batches in hand by default (seconds).
DEFAULT_WAIT = 60.0

_VERSIONED = re.compile(r"^(?P<name>.+)@v(?P<version>[1-9][0-9]*)$", re.DOTALL)


def table_name(base: str, version: int | None) -> str:
    """The read-model table ``base`` of ``version``: ``"<base>_v<version>"`` (None:
    ``base``), as :meth:`Projection.table_name` names it for the projection's writes."""
    return versioned_table(base, version)


def checkpoint_name(name: str, version: int | None) -> str:
    """What keys the checkpoints of projection ``name`` at ``version``:
    ``"<name>@v<version>"`` (None: ``name``)."""
    return versioned_name(name, version)


def parse_checkpoint_name(value: str) -> tuple[str, int | None]:
    """``(name, version)`` of a checkpoint name: ``"stats@v2"`` is ``("stats", 2)``,
    ``"stats"`` is ``("stats", None)``."""
    match = _VERSIONED.match(value)
    if match is None:
        return value, None
    return match["name"], int(match["version"])


# -- readers ----------------------------------------------------------------------------


def active_version(
    target: sa.Engine | SessionOrConnection,
    name: str,
    *,
    store: EventStore | None = None,
    default: int | None = None,
) -> int | None:
    """The version of projection ``name`` that readers use: the one the last
    :func:`switch` made active, else ``default`` (None: the unversioned projection).

    Pass the Session or Connection the request reads the read model with, so the
    version and the rows come from the same transaction.
    """
    table = (store or EventStore()).tables.projection_versions
    query = sa.select(table.c.active_version).where(table.c.projection_name == name)
    try:
        if isinstance(target, sa.Engine):
            with target.connect() as connection:
                connection.execution_options(**{database.READ_ONLY_OPTION: True})
                value = connection.execute(query).scalar()
        else:
            value = connection_of(target).execute(query).scalar()
    except sa.exc.DBAPIError as exc:
        database.raise_if_schema_missing(
            exc, (store or EventStore()).tables.names, own_statement=True
        )
        raise
    return default if value is None else int(value)


# -- status -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """One version of a versioned projection: how far it is, and whether readers use it."""

    projection: str
    version: int | None
    """None: the unversioned projection of that name."""
    checkpoint_name: str
    active: bool
    """Readers use this version (see :func:`active_version`)."""
    partitions: int
    """Partitions with a checkpoint (0: never ran)."""
    total_partitions: int
    checkpoint: int
    """The lowest global position its partitions have passed."""
    head: int
    lag: int
    """The most events any of its partitions has still to read."""
    events_handled: int
    updated_at: datetime | None
    """When a checkpoint of it last moved (None: never ran)."""
    switched_at: datetime | None
    """When readers switched to it (the active version only; None: never switched)."""

    @property
    def caught_up(self) -> bool:
        """Every partition ran and none lags: :func:`switch` would accept it."""
        return self.partitions > 0 and self.partitions == self.total_partitions and not self.lag

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["caught_up"] = self.caught_up
        for key in ("updated_at", "switched_at"):
            value = data[key]
            data[key] = value.isoformat() if value else None
        return data


def status(
    target: sa.Engine | SessionOrConnection,
    *,
    store: EventStore | None = None,
    projections: Iterable[Projection] = (),
    name: str | None = None,
) -> list[VersionStatus]:
    """Every version of every versioned projection (of ``name`` only, if given): its
    checkpoint, its lag, and which one readers use.

    A projection is listed once it has a versioned checkpoint or was switched;
    ``projections`` adds versions that never ran. Lag is counted as
    :func:`eventsource.status.status` counts it.
    """
    store = store or EventStore()
    if isinstance(target, sa.Engine):
        with target.connect() as connection:
            connection.execution_options(**{database.READ_ONLY_OPTION: True})
            return _status(connection, store, list(projections), name)
    return _status(connection_of(target), store, list(projections), name)


def _status(
    conn: sa.Connection, store: EventStore, projections: list[Projection], only: str | None
) -> list[VersionStatus]:
    for projection in projections:
        if not isinstance(projection, Projection):
            raise errors.ConfigurationError(f"expected Projection instances, got {projection!r}")
    declared = [p.checkpoint_name for p in projections if only is None or p.name == only]
    rows = status_module.status(conn, store=store, projections=declared)
    switched = _switched(conn, store)
    head = rows[0].head if rows else 0
    groups: dict[tuple[str, int | None], list[status_module.ProjectionStatus]] = {}
    for row in rows:
        groups.setdefault(parse_checkpoint_name(row.projection), []).append(row)
    versioned = {name for name, version in groups if version is not None} | set(switched)
    result: list[VersionStatus] = []
    for (name, version), parts in groups.items():
        if name not in versioned or (only is not None and name != only):
            continue
        ran = [part for part in parts if part.updated_at is not None]
        record = switched.get(name)
        active = record[0] == version if record is not None else version is None
        updates = [part.updated_at for part in ran if part.updated_at is not None]
        result.append(
            VersionStatus(
                projection=name,
                version=version,
                checkpoint_name=checkpoint_name(name, version),
                active=active,
                partitions=len(ran),
                total_partitions=max((part.total_partitions for part in parts), default=1),
                checkpoint=min(part.checkpoint for part in parts),
                head=head,
                lag=max(part.lag for part in parts),
                events_handled=sum(part.events_handled for part in ran),
                updated_at=max(updates) if updates else None,
                switched_at=record[1] if record is not None and active else None,
            )
        )
    # A switched projection whose active version has no checkpoints (yet) is listed too.
    listed = {(item.projection, item.version) for item in result}
    for name, (version, switched_at) in switched.items():
        if (only is None or name == only) and (name, version) not in listed:
            result.append(
                VersionStatus(
                    name,
                    version,
                    checkpoint_name(name, version),
                    True,
                    0,
                    1,
                    0,
                    head,
                    head,
                    0,
                    None,
                    switched_at,
                )
            )
    result.sort(key=lambda item: (item.projection, item.version or 0))
    return result


def _switched(conn: sa.Connection, store: EventStore) -> dict[str, tuple[int, datetime]]:
    """Active version and switch time per switched projection ({} before es0004)."""
    table = store.tables.projection_versions
    if not sa.inspect(conn).has_table(table.name):
        return {}
    query = sa.select(table.c.projection_name, table.c.active_version, table.c.switched_at)
    return {row[0]: (int(row[1]), row[2]) for row in conn.execute(query)}


# -- switching ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SwitchResult:
    """What :func:`switch` did."""

    projection: str
    version: int
    previous_version: int | None
    """The version readers used before (None: the unversioned projection)."""
    switched: bool
    """False: ``version`` already was the active one, and nothing changed."""
    retired: tuple[str, ...]
    """Checkpoint names of the versions retired (whose checkpoints were deleted)."""
    checkpoints_deleted: int
    dead_letters_deleted: int
    switched_at: datetime | None

    def summary(self) -> str:
        if not self.switched:
            return f"{self.projection}: version {self.version} already is the active one"
        before = "unversioned" if self.previous_version is None else f"v{self.previous_version}"
        retired = ", ".join(self.retired) or "nothing"
        return (
            f"{self.projection}: readers switched from {before} to v{self.version}; retired "
            f"{retired} ({self.checkpoints_deleted} checkpoint row(s), "
            f"{self.dead_letters_deleted} dead letter(s) deleted)"
        )


def switch(
    target: sa.Engine | SessionOrConnection,
    name: str,
    version: int,
    *,
    store: EventStore | None = None,
    force: bool = False,
    retire: Projection | None = None,
    wait: float | None = DEFAULT_WAIT,
) -> SwitchResult:
    """Make ``version`` the version of projection ``name`` that readers use, and retire
    the older ones, in one transaction under their locks.

    Refused with :class:`~eventsource.errors.VersionNotCaughtUpError` (nothing changed)
    while the version lags, unless ``force``; with
    :class:`~eventsource.errors.ProjectionRetiredError` for a version older than the
    active one. ``retire``, a projection of an older version of ``name``, has its
    :meth:`~Projection.retire` hook called in the transaction to drop its read model.
    Waits up to ``wait`` seconds (None: forever) for the batches in hand, then raises
    :class:`~eventsource.errors.ProjectionBusyError`. With an Engine this commits; with
    a Connection or Session the caller does. Switching to the active version again
    changes nothing.
    """
    store = store or EventStore()
    if not isinstance(name, str) or not name.strip():
        raise errors.ConfigurationError(f"switch needs a projection name, got {name!r}")
    if version is None or check_version(version, "switch") is None:
        raise errors.ConfigurationError(
            f"switch needs the version to make active (an int >= 1), got {version!r}"
        )
    if retire is not None and (
        not isinstance(retire, Projection)
        or retire.name != name
        or (retire.version is not None and retire.version >= version)
    ):
        raise errors.ConfigurationError(
            f"switch({name!r}, {version}): retire= must be a projection {name!r} of an older "
            f"version (or unversioned), got {retire!r}"
        )
    if isinstance(target, sa.Engine):
        database.require_configured(target, what="switch")
        with Session(read_committed(target)) as session, session.begin():
            return switch(
                session, name, version, store=store, force=force, retire=retire, wait=wait
            )
    if isinstance(target, scoped_session):  # its registry's current Session
        session = target()
    elif isinstance(target, Session):
        session = target
    else:
        session = Session(bind=target)
    return _switch(session, store, name, version, force=force, retire=retire, wait=wait)


def _switch(
    session: Session,
    store: EventStore,
    name: str,
    version: int,
    *,
    force: bool,
    retire: Projection | None,
    wait: float | None,
) -> SwitchResult:
    conn = session.connection()
    status_module.require_schema(conn, store)
    tables = store.tables
    versions = tables.projection_versions
    if not sa.inspect(conn).has_table(versions.name):
        raise errors.SchemaMissingError(
            f"the database has no {versions.name} table (added by the library's migration "
            "es0004): run `eventsource db upgrade` (or `alembic upgrade head`, or "
            "eventsource.upgrade(engine)) first"
        )
    ck = tables.projection_checkpoints
    target_name = checkpoint_name(name, version)
    stored = conn.execute(
        sa.select(ck.c.projection_name)
        .where(
            (ck.c.projection_name == name)
            | ck.c.projection_name.startswith(f"{name}@v", autoescape=True)
        )
        .distinct()
    ).scalars()
    older = sorted(
        stored_name
        for stored_name in stored
        if parse_checkpoint_name(stored_name)[0] == name
        and (parse_checkpoint_name(stored_name)[1] or 0) < version
    )
    # The unversioned name's lock serialises switches of the projection; the others keep
    # batches of the versions involved out. One order for all, so two switches never
    # wait on each other in a cycle (batches take one projection's lock only).
    for locked in sorted({name, target_name, *older}):
        lock_projection(session, locked, store=store, timeout=wait)

    record = conn.execute(
        sa.select(versions.c.active_version).where(versions.c.projection_name == name)
    ).first()
    previous = int(record[0]) if record is not None else None
    if previous == version:
        return SwitchResult(name, version, previous, False, (), 0, 0, None)
    if previous is not None and version < previous:
        raise errors.ProjectionRetiredError(
            f"projection {name!r} version {version} was retired: readers use version "
            f"{previous}. Versions only move forward: deploy that code as version "
            f"{previous + 1}, let it catch up, and switch to it. Nothing was changed."
        )
    if not force:
        _require_caught_up(conn, tables, name, version)

    now = datetime.now(UTC)
    values = {"active_version": version, "previous_version": previous, "switched_at": now}
    if record is None:
        conn.execute(versions.insert().values(projection_name=name, **values))
    else:
        conn.execute(versions.update().where(versions.c.projection_name == name).values(values))
    deleted = dead = 0
    if older:
        deleted = int(
            conn.execute(ck.delete().where(ck.c.projection_name.in_(older))).rowcount or 0
        )
        letters = tables.dead_letters
        if sa.inspect(conn).has_table(letters.name):
            dead = int(
                conn.execute(letters.delete().where(letters.c.projection_name.in_(older))).rowcount
                or 0
            )
    if retire is not None:
        retire.retire(session)
    return SwitchResult(name, version, previous, True, tuple(older), deleted, dead, now)


def _require_caught_up(conn: sa.Connection, tables: models.Tables, name: str, version: int) -> None:
    ck, ev = tables.projection_checkpoints, tables.events
    target_name = checkpoint_name(name, version)
    rows = conn.execute(
        sa.select(ck.c.partition_key, ck.c.total_partitions, ck.c.transaction_id)
        .add_columns(ck.c.global_position)
        .where(ck.c.projection_name == target_name)
        .order_by(ck.c.partition_key)
    ).all()
    remedy = (
        f"Run its workers (checkpoints {target_name!r}) until `eventsource versions status` "
        "shows it caught up, then switch again (or force it). Nothing was changed."
    )
    total_events = int(conn.execute(sa.select(sa.func.count()).select_from(ev)).scalar() or 0)
    if not rows:
        raise errors.VersionNotCaughtUpError(
            f"projection {name!r} version {version} has not run yet: {total_events} "
            f"event(s) to go. {remedy}",
            projection=name,
            version=version,
            lag=total_events,
        )
    total = rows[0].total_partitions
    keys = {row.partition_key for row in rows}
    if keys != set(range(total)):
        missing = sorted(set(range(total)) - keys)
        raise errors.VersionNotCaughtUpError(
            f"projection {name!r} version {version}: partitions {missing} of {total} have "
            f"not run yet. {remedy}",
            projection=name,
            version=version,
            lag=total_events,
        )
    lag = 0
    for row in rows:
        if conn.dialect.name == "postgresql":
            # The processor's order (DESIGN invariant 2): events held back behind an
            # open transaction, committed since, are still ahead of the checkpoint.
            after = sa.tuple_(ev.c.transaction_id, ev.c.global_position) > sa.tuple_(
                models.as_xid8(int(row.transaction_id)), sa.literal(int(row.global_position))
            )
        else:
            after = ev.c.global_position > int(row.global_position)
        count = conn.execute(sa.select(sa.func.count()).select_from(ev).where(after)).scalar()
        lag = max(lag, int(count or 0))
    if lag:
        raise errors.VersionNotCaughtUpError(
            f"projection {name!r} version {version} lags {lag} event(s) behind the store. {remedy}",
            projection=name,
            version=version,
            lag=lag,
        )


def refuse_retired(conn: sa.Connection, tables: models.Tables, projection: Projection) -> None:
    """Raise :class:`~eventsource.errors.ProjectionRetiredError` when ``projection`` is
    a version older than the active one (or unversioned, once a version is active).

    Processors call it when they create a checkpoint: a retired version's were deleted
    by the switch, and replaying it from scratch would only waste work.
    """
    table = tables.projection_versions
    if not sa.inspect(conn).has_table(table.name):  # before es0004: nothing was switched
        return
    row = conn.execute(
        sa.select(table.c.active_version, table.c.switched_at).where(
            table.c.projection_name == projection.name
        )
    ).first()
    if row is None:
        return
    active = int(row[0])
    if projection.version is not None and projection.version >= active:
        return
    which = "unversioned" if projection.version is None else f"version {projection.version}"
    raise errors.ProjectionRetiredError(
        f"projection {projection.name!r} {which} was retired: readers use version {active} "
        f"since {row[1]:%Y-%m-%d %H:%M:%S} UTC (eventsource.versions.switch deleted its "
        "checkpoints). Stop its workers: deploy the code of the active version or a newer one."
    )
