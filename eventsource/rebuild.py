"""Resetting and rebuilding a projection, safely while its workers run.

A reset deletes the checkpoints (and the projection's dead letters) and clears the
read model through the projection's ``reset`` hook in one transaction; a running
worker then replays from the start, as a restarted one would. Without the hook the
read model would keep every effect and the replay would apply them again, so that
needs ``keep_read_model=True``. It first takes the projection's exclusive lock, the
one whose shared side every batch holds (DESIGN invariant 6): it waits for the batches
in hand of every partition, and new batches wait for it.

A rebuild is a reset followed by a replay of every event. By default it is *online*:

1. On PostgreSQL it takes the projection's rebuild lock (a session-level advisory lock
   on a connection of its own, :func:`~eventsource.processor.lock_rebuild`), waiting
   for the batches in hand. From then on the projection's workers step aside: each
   batch finds the lock taken and returns like an idle poll (no error, no retry).
2. The reset, in one short transaction, which also writes the partitions' first
   checkpoints (the partition count is fixed with it).
3. The replay in ordinary batches, partition after partition, each committing with its
   checkpoint, exactly as workers do. Other projections stay live: no transaction
   outlives a batch. Readers see the read model being rebuilt from empty.
4. The lock is released (or dies with the connection, when the process is killed) and
   the workers carry on from the rebuilt checkpoints.

The read model is as consistent as its checkpoints at every commit, so a rebuild that
fails or is killed leaves a partly rebuilt projection that workers, or the same rebuild
run again, finish exactly once. The lock only keeps the workers out of the way: their
exactly-once effects rest on the per-partition locks and checkpoints, as always.
SQLite has no advisory locks: there, workers running during a rebuild share the replay
through the same checkpoint rows (every batch, theirs or the rebuild's, advances them
under ``BEGIN IMMEDIATE``), still exactly once.

``atomic=True`` runs the whole rebuild in one database transaction instead (each batch
in a savepoint): a failed or interrupted rebuild leaves the read model and checkpoints
exactly as they were, and readers never see a partial model. The price, on PostgreSQL,
is one long transaction: its workers wait, and under the server horizon rule every
projection on the server stops seeing events committed after it started until it ends
(the store rule, the default, waits only for writers of the store, which a rebuild is
not; see docs/horizon.md); a hot row updated per event also gets slower as its dead
versions pile up inside the transaction. Both modes run at READ COMMITTED whatever the
engine's isolation, so what they clear is what the finished batches committed.

Progress (:class:`RebuildProgress`) carries the rate over the last :data:`RATE_WINDOW`
seconds (:class:`RateWindow`), so its ETA follows the current speed, not the average
since the start.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from eventsource import database, errors, retry
from eventsource.processor import (
    BatchResult,
    Processor,
    ProcessorConfig,
    lock_projection,
    lock_rebuild,
    partition_counts,
    read_committed,
    unlock_rebuild,
)
from eventsource.projection import Projection
from eventsource.status import require_schema
from eventsource.store import EventStore, SessionOrConnection

logger = logging.getLogger("eventsource.rebuild")

#: How long a reset or rebuild waits for the batches in hand by default (seconds).
DEFAULT_WAIT = 60.0
#: The rate behind a rebuild's ETA is measured over about this many recent seconds.
RATE_WINDOW = 10.0
#: How often a rebuild logs its progress (INFO, logger ``eventsource.rebuild``).
PROGRESS_LOG_INTERVAL = 10.0


class RateWindow:
    """Events per second over the last ``seconds``, from ``(time, done)`` samples.

    The average since the start makes a poor ETA: a rebuild's speed changes as it goes
    (a hot row slowing down, caches warming, another load on the server), and the
    average remembers all of it. This keeps the samples of the last ``seconds`` plus the
    newest one before them, so the rate spans the whole window, and a batch longer than
    the window still gives one. Feed it times from a monotonic clock.
    """

    def __init__(self, seconds: float = RATE_WINDOW) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
            raise errors.ConfigurationError(f"seconds must be > 0, got {seconds!r}")
        self.seconds = float(seconds)
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, at: float, done: int) -> None:
        """Record that ``done`` events were done at time ``at`` (seconds)."""
        self._samples.append((at, done))
        while len(self._samples) > 2 and self._samples[1][0] <= at - self.seconds:
            self._samples.popleft()

    @property
    def rate(self) -> float | None:
        """Events per second across the window; None before two samples apart in time."""
        if len(self._samples) < 2:
            return None
        (first_at, first_done), (last_at, last_done) = self._samples[0], self._samples[-1]
        if last_at <= first_at:
            return None
        return max(0.0, (last_done - first_done) / (last_at - first_at))


@dataclass(frozen=True, slots=True)
class RebuildProgress:
    """Where a rebuild is: rows read so far out of the events in the projection's scope."""

    projection: str
    done: int
    """Events replayed so far. When it ends, at least ``total``: events appended during
    the rebuild count too, and on SQLite workers may have replayed some of them."""
    total: int
    """Events in the projection's scope when the replay began."""
    handled: int
    """Events the rebuild passed to ``handle``."""
    elapsed: float
    recent_rate: float | None = None
    """Events per second over the last :data:`RATE_WINDOW` seconds (None: too early)."""

    @property
    def average_rate(self) -> float:
        """Events per second since the rebuild began."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def rate(self) -> float:
        """The recent rate, or the average until there is one."""
        return self.recent_rate if self.recent_rate is not None else self.average_rate

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the recent rate; 0.0 once done, None while nothing moves."""
        if self.done >= self.total:
            return 0.0
        if self.rate <= 0:
            return None
        return (self.total - self.done) / self.rate


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
    if projection is not None and projection.checkpoint_name != name:
        raise errors.ConfigurationError(
            f"reset({name!r}) was given projection {projection.checkpoint_name!r}"
        )
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
    atomic: bool = False,
) -> RebuildProgress:
    """Clear ``projection``'s read model and replay every event into it.

    Online by default: the projection's workers step aside, the reset is one short
    transaction and the replay commits batch by batch, so other projections stay live
    and readers see the model rebuilt from empty; killed or failed, it leaves a partly
    rebuilt projection that workers or a second run finish, each event once.
    ``atomic=True``: one transaction, all or nothing, at the price (under the server
    horizon rule) of holding every projection's reading horizon on a PostgreSQL server
    for its duration (see the module docstring).

    ``total_partitions`` defaults to the count its checkpoints were written with, so
    partitioned workers can resume afterwards; all partitions are replayed here. A
    projection without a ``reset`` hook is refused unless ``keep_read_model=True``
    (see :func:`reset`); ``wait`` bounds the wait for the batches in hand.
    ``on_progress`` is called after every batch.
    """
    store = store or EventStore()
    _check_read_model(projection.checkpoint_name, projection, keep_read_model, "rebuild")
    database.require_configured(engine, what="rebuild")
    tracker = _Tracker(projection.checkpoint_name, on_progress)
    if atomic:
        args = (engine, projection, store, batch_size, total_partitions, keep_read_model, wait)
        try:
            return _rebuild_atomic(*args, tracker, mark_first=False)
        except errors.ProjectionError as exc:
            if retry.append_order_error(exc) is None:
                raise
        # Its handlers write, then append, and a reader passed the transaction's id
        # (docs/horizon.md): again, marked as the store's writer from the start. Other
        # projections then wait for it, as for any writer, until it commits.
        logger.info(
            "rebuild %s (atomic): its handlers append after other writes; running it "
            "again as a writer of the store from its start",
            projection.checkpoint_name,
        )
        tracker = _Tracker(projection.checkpoint_name, on_progress)
        return _rebuild_atomic(*args, tracker, mark_first=True)
    name = projection.checkpoint_name
    with _rebuild_lock(engine, name, store, wait):
        with Session(read_committed(engine)) as session, session.begin():
            require_schema(session.connection(), store)
            total_partitions = _reset_for_replay(
                session, projection, store, total_partitions, keep_read_model, wait
            )
            # Fixes the partition count with the reset: a worker starting meanwhile with
            # another count is refused, instead of refusing the rebuild's batches.
            _create_checkpoints(session, store, name, total_partitions)
        with engine.connect() as connection:  # outside the reset's transaction: it can be slow
            tracker.start(_events_in_scope(connection, store, projection), "online")
        for key in range(total_partitions):
            config = ProcessorConfig(
                batch_size=batch_size, partition_key=key, total_partitions=total_partitions
            )
            replay = Processor(engine, store, config)
            replay.yields_to_rebuild = False  # the lock the workers yield to is ours
            replay.run_until_caught_up(projection, on_batch=tracker.batch)
    return tracker.finish()


def _reset_for_replay(
    session: Session,
    projection: Projection,
    store: EventStore,
    total_partitions: int | None,
    keep_read_model: bool,
    wait: float | None,
) -> int:
    """Reset the projection under its exclusive lock; the partition count to replay."""
    name = projection.checkpoint_name
    # Before reading the partition count: a worker starting the projection for the
    # first time may be creating its checkpoint right now.
    lock_projection(session, name, store=store, timeout=wait)
    if total_partitions is None:
        total_partitions = _current_partitions(session, store, name)
    reset(
        session,
        name,
        store=store,
        projection=projection,
        keep_read_model=keep_read_model,
        wait=wait,
    )
    return total_partitions


def _rebuild_atomic(
    engine: sa.Engine,
    projection: Projection,
    store: EventStore,
    batch_size: int,
    total_partitions: int | None,
    keep_read_model: bool,
    wait: float | None,
    tracker: _Tracker,
    *,
    mark_first: bool,
) -> RebuildProgress:
    with read_committed(engine).connect() as connection, connection.begin():
        require_schema(connection, store)
        if mark_first:
            store.mark_writer(connection)
        sessions = sessionmaker(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        with sessions() as session, session.begin():
            total_partitions = _reset_for_replay(
                session, projection, store, total_partitions, keep_read_model, wait
            )
        tracker.start(_events_in_scope(connection, store, projection), "atomic")
        for key in range(total_partitions):
            config = ProcessorConfig(
                batch_size=batch_size, partition_key=key, total_partitions=total_partitions
            )
            replay = Processor(sessions, store, config)
            # This transaction commits: its own rows (events the handlers append) wait
            # for the workers, behind any older transaction still open.
            replay.read_own_transaction = False
            replay.run_until_caught_up(projection, on_batch=tracker.batch)
    return tracker.finish()


@contextmanager
def _rebuild_lock(
    engine: sa.Engine, name: str, store: EventStore, wait: float | None
) -> Iterator[None]:
    """Hold projection ``name``'s rebuild lock on a connection of its own (PostgreSQL)."""
    if engine.dialect.name != "postgresql":
        yield  # SQLite: workers share the replay (module docstring)
        return
    with read_committed(engine).connect() as connection:
        with connection.begin():  # the lock outlives this transaction: no id, no horizon
            lock_rebuild(connection, name, store=store, timeout=wait)
        try:
            yield
        finally:
            try:
                with connection.begin():
                    unlock_rebuild(connection, name, store=store)
            except Exception:
                # The session ends with the connection, and the lock with it.
                connection.invalidate()
                raise


class _Tracker:
    """Counts a rebuild's batches into :class:`RebuildProgress`, reports and logs it."""

    def __init__(
        self, projection: str, on_progress: Callable[[RebuildProgress], None] | None
    ) -> None:
        self.projection = projection
        self.on_progress = on_progress
        self.started = time.monotonic()
        self.window = RateWindow()
        self.total = self.done = self.handled = 0
        self.logged = self.started

    def start(self, total: int, mode: str) -> None:
        self.total = total
        self.window.add(time.monotonic(), 0)
        logger.info(
            "rebuild %s (%s): replaying %d events",
            self.projection,
            mode,
            total,
            extra={"projection": self.projection, "total": total, "mode": mode},
        )

    def batch(self, result: BatchResult) -> None:
        now = time.monotonic()
        self.done += result.read
        self.handled += result.handled
        self.window.add(now, self.done)
        progress = self.progress(now)
        if self.on_progress is not None:
            self.on_progress(progress)
        if now - self.logged >= PROGRESS_LOG_INTERVAL:
            self.logged = now
            self._log(progress)

    def progress(self, now: float) -> RebuildProgress:
        return RebuildProgress(
            self.projection,
            self.done,
            self.total,
            self.handled,
            now - self.started,
            self.window.rate,
        )

    def finish(self) -> RebuildProgress:
        # Every event in scope is replayed by now, some maybe by workers (SQLite).
        self.done = max(self.done, self.total)
        final = self.progress(time.monotonic())
        self._log(final)
        return final

    def _log(self, progress: RebuildProgress) -> None:
        eta = progress.eta_seconds
        logger.info(
            "rebuild %s: %d/%d events, %.1f events/s, ETA %s",
            progress.projection,
            progress.done,
            progress.total,
            progress.rate,
            "unknown" if eta is None else f"{eta:.0f} s",
            extra={
                "projection": progress.projection,
                "done": progress.done,
                "total": progress.total,
                "rate": round(progress.rate, 1),
                "eta_seconds": None if eta is None else round(eta, 1),
            },
        )


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
    totals = partition_counts(session, store.tables, name)
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


def _create_checkpoints(session: Session, store: EventStore, name: str, partitions: int) -> None:
    ck = store.tables.projection_checkpoints
    now = datetime.now(UTC)
    session.execute(
        ck.insert(),
        [
            {
                "projection_name": name,
                "partition_key": key,
                "total_partitions": partitions,
                "updated_at": now,
            }
            for key in range(partitions)
        ],
    )
