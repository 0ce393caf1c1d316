"""Changing a projection's partition count while its workers run, each event once.

Partition ``k`` of ``N`` handles the aggregates whose hash is ``k`` modulo ``N``, and
each partition has its own checkpoint, a (transaction id, position) point of the read
order (DESIGN invariant 2). A new count sends most aggregates to other partitions, so
starting the new partitions anywhere but at one point that every old partition has
reached exactly would skip events or apply them twice. :func:`reshard` makes that point:

1. **The boundary.** Under the projection's exclusive lock (it waits for the batches
   in hand) it sets a boundary ``B`` on every old checkpoint: the furthest checkpoint
   of them, a point below the reading horizon that every later event sorts after. From
   then on each old partition's batches read no further than ``B``, and a partition
   that has handled all its events up to ``B`` stands exactly on it.
2. **The catch-up.** The running workers bring the partitions that are behind up to
   ``B`` (or this call does, given the projection itself). Partitions on ``B`` idle.
3. **The switch**, in one transaction under the exclusive lock again: every old
   checkpoint is on ``B``; they are replaced by ``M`` new ones on ``B``, the
   projection's dead letters move to their aggregates' new partitions, and its claim
   rows (:mod:`eventsource.claims`) to the new count.

Every event up to ``B`` was handled by its old partition, every event after it will be
by its new one; an aggregate's events all come before or all after the switch in their
order, so per-aggregate order holds across it. Claiming workers adopt the new count at
their next heartbeat; workers started with a fixed ``--partition-key`` stop with
PartitionCountChangedError (restart them with the new count).

If the old partitions stop moving towards ``B`` for ``timeout`` seconds (no worker runs
some of them), the boundary is removed again and :class:`~eventsource.errors.ReshardError`
raised: nothing changed, the projection runs on with its old count. A reshard killed
before the switch leaves the boundary set (``eventsource status`` shows it): run it
again to finish, or :func:`cancel_reshard`.

The dead letters' new partitions follow :class:`~eventsource.HashPartitionStrategy`, the
one the partition filters of the store's SQL use. A projection partitioned by a custom
:class:`~eventsource.PartitionStrategy` whose dead letters park aggregates
(``QUARANTINE_AGGREGATE``) should have none parked when it is resharded: retry or
discard them first, or the parked aggregate's later events may be applied by another
partition before its parked ones.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from eventsource import database, errors
from eventsource.processor import (
    Processor,
    ProcessorConfig,
    lock_projection,
    read_committed,
    rebuild_running,
)
from eventsource.projection import Projection
from eventsource.store import EventStore

logger = logging.getLogger("eventsource.reshard")

#: Seconds :func:`reshard` waits for the old partitions to reach the boundary.
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class ReshardResult:
    """What a reshard did."""

    projection: str
    from_partitions: int
    to_partitions: int
    boundary_transaction_id: int
    """The boundary every old partition stopped at and every new one starts from
    (always 0 on SQLite, where the position alone orders events)."""
    boundary_position: int
    seconds: float
    """How long it took, most of it waiting for the old partitions to reach the boundary."""


@dataclass(frozen=True, slots=True)
class _Row:
    key: int
    total: int
    at: tuple[int, int]
    stop: tuple[int, int] | None


def reshard(
    engine: sa.Engine,
    projection: str | Projection,
    total_partitions: int,
    *,
    store: EventStore | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    wait: float | None = None,
    poll_interval: float = 0.1,
    config: ProcessorConfig | None = None,
) -> ReshardResult:
    """Change ``projection``'s partition count to ``total_partitions``, exactly once.

    ``projection`` is its name (``checkpoint_name``: ``"orders@v2"`` for a version), and
    its workers bring the old partitions to the boundary; or the Projection itself, and
    this call also runs the partitions that lag (so it works with no worker running).
    ``timeout`` bounds how long they may go without moving towards the boundary (then
    ReshardError, nothing changed: a long catch-up that progresses is no stall); ``wait`` bounds
    each wait for the projection's lock (then ProjectionBusyError). Safe to run while
    workers run, and again after an interrupted run. ``config`` is the workers'
    ProcessorConfig, whose settings (partition strategy, batch size, horizon) the
    partitions run here use: give it when they are not the defaults.
    """
    started = time.monotonic()
    total = _check_count(total_partitions)
    for label, value in (("timeout", timeout), ("poll_interval", poll_interval)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise errors.ConfigurationError(f"{label} must be seconds > 0, got {value!r}")
    if not isinstance(engine, sa.Engine):
        raise errors.ConfigurationError(f"reshard needs an Engine, got {type(engine).__name__}")
    database.require_configured(engine, what="reshard")
    store = store if store is not None else EventStore()
    name, runs = _name_of(projection)
    if config is not None and not isinstance(config, ProcessorConfig):
        raise errors.ConfigurationError(f"config must be a ProcessorConfig, got {config!r}")
    sessions = sessionmaker(read_committed(engine), expire_on_commit=False)
    with sessions() as session, session.begin():
        begun = _set_boundary(session, store, name, total, wait)
    if begun is None:
        raise errors.ReshardError(
            f"projection {name!r} already has {total} partitions; nothing changed"
        )
    old, boundary = begun
    logger.info(
        "resharding projection %s from %d to %d partitions at (transaction %d, position %d)",
        name,
        old,
        total,
        *boundary,
        extra={"projection": name, "from_partitions": old, "to_partitions": total},
    )
    try:
        _catch_up(
            engine, sessions, store, name, old, boundary, runs, config, timeout, poll_interval
        )
        with sessions() as session, session.begin():
            _switch(session, store, name, old, total, boundary, wait)
    except BaseException:
        # Nothing half-done: the old partitions carry on past the boundary.
        try:
            cancel_reshard(engine, name, store=store)
        except sa.exc.DBAPIError as exc:
            logger.warning(
                "projection %s: could not remove the reshard boundary (%s); run "
                "`eventsource reshard %s --cancel`",
                name,
                exc,
                name,
            )
        raise
    seconds = time.monotonic() - started
    logger.info(
        "resharded projection %s from %d to %d partitions in %.1f s",
        name,
        old,
        total,
        seconds,
        extra={"projection": name, "from_partitions": old, "to_partitions": total},
    )
    return ReshardResult(name, old, total, boundary[0], boundary[1], seconds)


def cancel_reshard(
    engine: sa.Engine, projection: str | Projection, *, store: EventStore | None = None
) -> bool:
    """Remove an unfinished reshard's boundary, so the old partitions carry on past it;
    whether one was set."""
    name, _ = _name_of(projection)
    ck = (store or EventStore()).tables.projection_checkpoints
    with sessionmaker(read_committed(engine))() as session, session.begin():
        cleared = session.execute(
            ck.update()
            .where(ck.c.projection_name == name, ck.c.stop_global_position.is_not(None))
            .values(stop_transaction_id=None, stop_global_position=None)
        )
    return bool(cleared.rowcount)  # type: ignore[attr-defined]


def _check_count(total_partitions: object) -> int:
    if (
        isinstance(total_partitions, bool)
        or not isinstance(total_partitions, int)
        or total_partitions < 1
    ):
        raise errors.ConfigurationError(
            f"total_partitions must be an int >= 1, got {total_partitions!r}"
        )
    return total_partitions


def _name_of(projection: str | Projection) -> tuple[str, Projection | None]:
    if isinstance(projection, Projection):
        return projection.checkpoint_name, projection
    if not isinstance(projection, str) or not projection:
        raise errors.ConfigurationError(
            f"expected a projection name or a Projection, got {projection!r}"
        )
    return projection, None


def _rows(session: Session, store: EventStore, name: str) -> list[_Row]:
    ck = store.tables.projection_checkpoints
    found = session.execute(
        sa.select(
            ck.c.partition_key,
            ck.c.total_partitions,
            ck.c.transaction_id,
            ck.c.global_position,
            ck.c.stop_transaction_id,
            ck.c.stop_global_position,
        )
        .where(ck.c.projection_name == name)
        .order_by(ck.c.partition_key)
    )
    return [
        _Row(
            int(r[0]),
            int(r[1]),
            (int(r[2]), int(r[3])),
            None if r[5] is None else (int(r[4]), int(r[5])),
        )
        for r in found
    ]


def _locked(session: Session, store: EventStore, name: str, wait: float | None) -> None:
    """The projection's exclusive lock; refused while an online rebuild runs."""
    lock_projection(session, name, store=store, timeout=wait)
    if rebuild_running(session, name, store=store):
        raise errors.ReshardError(
            f"an online rebuild of projection {name!r} is running: reshard it once the "
            "rebuild is over (or rebuild it with --total-partitions). Nothing changed."
        )


def _set_boundary(
    session: Session, store: EventStore, name: str, total: int, wait: float | None
) -> tuple[int, tuple[int, int]] | None:
    """Set (or find) the boundary; the old count and the boundary (None: nothing to do)."""
    _locked(session, store, name, wait)
    rows = _rows(session, store, name)
    if not rows:
        raise errors.ReshardError(
            f"projection {name!r} has no checkpoints: nothing to reshard. Start its "
            f"workers with total_partitions={total} (--total-partitions {total})."
        )
    totals = {row.total for row in rows}
    stops = {row.stop for row in rows if row.stop is not None}
    if len(totals) > 1 or len(stops) > 1:
        raise errors.ReshardError(
            f"projection {name!r} has checkpoints with partition counts {sorted(totals)} "
            f"and boundaries {sorted(stops)}: reset or rebuild it. Nothing changed."
        )
    old = totals.pop()
    ck = store.tables.projection_checkpoints
    if old == total:
        if stops:  # an unfinished reshard from this count: undo it
            session.execute(
                ck.update()
                .where(ck.c.projection_name == name)
                .values(stop_transaction_id=None, stop_global_position=None)
            )
        return None
    # Where the furthest partition stands: below every horizon any batch read under,
    # so every event still to come sorts after it, and every event up to it is readable.
    boundary = stops.pop() if stops else max(row.at for row in rows)
    now = datetime.now(UTC)
    missing = sorted(set(range(old)) - {row.key for row in rows})
    if missing:
        # A partition that never ran (fixed keys, one never started) has all its events
        # up to the boundary still to handle: from the start, like any new partition.
        session.execute(
            ck.insert(),
            [
                {
                    "projection_name": name,
                    "partition_key": key,
                    "total_partitions": old,
                    "updated_at": now,
                }
                for key in missing
            ],
        )
    session.execute(
        ck.update()
        .where(ck.c.projection_name == name)
        .values(stop_transaction_id=boundary[0], stop_global_position=boundary[1])
    )
    return old, boundary


def _catch_up(
    engine: sa.Engine,
    sessions: sessionmaker[Session],
    store: EventStore,
    name: str,
    old: int,
    boundary: tuple[int, int],
    projection: Projection | None,
    config: ProcessorConfig | None,
    timeout: float,
    poll_interval: float,
) -> None:
    """Wait until every old partition stands on the boundary (running the lagging ones
    when the projection was given)."""
    deadline = time.monotonic() + timeout
    seen: dict[int, tuple[int, int]] = {}
    while True:
        with sessions() as session:
            rows = _rows(session, store, name)
        _check_unchanged(rows, name, old, boundary)
        now = {row.key: row.at for row in rows}
        if now != seen:  # progress: a long catch-up is not a stall
            seen = now
            deadline = time.monotonic() + timeout
        past = [row.key for row in rows if row.at > boundary]
        if past:
            raise errors.ReshardError(
                f"projection {name!r}: partitions {', '.join(map(str, past))} moved past the "
                "boundary: a worker that does not know reshard boundaries runs them (one "
                "started before `eventsource db upgrade` to es0006, or of an older version "
                "of eventsource). Restart or upgrade it, then reshard again. Nothing changed."
            )
        behind = [row.key for row in rows if row.at != boundary]
        if not behind:
            return
        if projection is not None:
            template = config if config is not None else ProcessorConfig()
            for key in behind:
                own = dataclasses.replace(
                    template, claim=False, partition_key=key, total_partitions=old
                )
                Processor(engine, store, own).run_until_caught_up(projection)
        if time.monotonic() >= deadline:
            raise errors.ReshardError(
                f"projection {name!r}: partitions {', '.join(map(str, behind))} of {old} did "
                f"not move towards the boundary for {timeout:g} s. Are their workers running? "
                "(Or pass the projection itself, eventsource reshard --app, to run them "
                f"here.) Nothing changed: it runs on with {old} partitions."
            )
        if projection is None:
            time.sleep(poll_interval)


def _check_unchanged(rows: list[_Row], name: str, old: int, boundary: tuple[int, int]) -> None:
    if len(rows) != old or any(r.total != old or r.stop != boundary for r in rows):
        raise errors.ReshardError(
            f"projection {name!r} was reset, rebuilt or resharded by someone else while "
            "this reshard waited. Nothing changed by this one."
        )


def _switch(
    session: Session,
    store: EventStore,
    name: str,
    old: int,
    total: int,
    boundary: tuple[int, int],
    wait: float | None,
) -> None:
    """Replace the old checkpoints, all on the boundary, by ``total`` new ones there."""
    _locked(session, store, name, wait)
    rows = _rows(session, store, name)
    _check_unchanged(rows, name, old, boundary)
    if any(row.at != boundary for row in rows):  # cannot happen: the batches stop there
        raise errors.ReshardError(f"projection {name!r} moved past the boundary")
    tables = store.tables
    ck = tables.projection_checkpoints
    now = datetime.now(UTC)
    session.execute(ck.delete().where(ck.c.projection_name == name))
    session.execute(
        ck.insert(),
        [
            {
                "projection_name": name,
                "partition_key": key,
                "total_partitions": total,
                "transaction_id": boundary[0],
                "global_position": boundary[1],
                "updated_at": now,
            }
            for key in range(total)
        ],
    )
    # Parked and failed events wait in their aggregate's partition (deadletters).
    dead = tables.dead_letters
    ev = tables.events
    session.execute(
        dead.update()
        .where(dead.c.projection_name == name)
        .values(
            partition_key=sa.select(ev.c.partition_hash % total)
            .where(ev.c.global_position == dead.c.global_position)
            .scalar_subquery(),
            total_partitions=total,
        )
    )
    claims = tables.partition_claims
    epoch = session.execute(
        sa.select(sa.func.max(claims.c.epoch)).where(claims.c.projection_name == name)
    ).scalar()
    if epoch is not None:  # claiming workers run it: new, free claims for the new count
        session.execute(claims.delete().where(claims.c.projection_name == name))
        session.execute(
            claims.insert(),
            [
                {
                    "projection_name": name,
                    "partition_key": key,
                    "total_partitions": total,
                    "epoch": int(epoch) + 1,
                }
                for key in range(total)
            ],
        )
