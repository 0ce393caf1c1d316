"""The processor: feeds one projection (one partition of it) in batches, exactly once.

A batch is one transaction: lock the checkpoint row, read the next events, call
``handle`` for each, move the checkpoint, commit. A handler error rolls everything
back, read-model writes included.

Nothing is ever skipped on PostgreSQL, although writers commit out of position order
(event 11 can be visible while event 10's transaction is still open): the processor
only reads rows whose inserting transaction is below a horizon that no transaction
still able to add rows is below, orders them by (transaction id, position) and keeps
both in the checkpoint. Every row that can still appear later sorts after the
checkpoint. The horizon is the store's (``ProcessorConfig.horizon="store"``, the
default: only the store's writers count, see eventsource.horizon and docs/horizon.md)
or the server's (``"server"``: ``pg_snapshot_xmin(pg_current_snapshot())``, every
transaction on the server that holds an id). The price: a writer held open delays
projections (never loses events). Rows written by the processor's own transaction
are read too, so a test can append and project inside one transaction. SQLite
serialises writers, so position order is commit order there.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from eventsource import cluster, database, errors, horizon, models, retry, signals, wakeups
from eventsource.events import PersistedEvent
from eventsource.horizon import HORIZON_RULES, HorizonRule
from eventsource.partition import HashPartitionStrategy, PartitionStrategy, fnv1a_32
from eventsource.projection import Projection
from eventsource.retry import Retrier, RetryPolicy
from eventsource.store import EVENT_COLUMNS, EventStore, event_from_row

logger = logging.getLogger("eventsource.processor")

T = TypeVar("T")

DEFAULT_BATCH_SIZE = 100
DEFAULT_POLL_INTERVAL = 0.1
#: The longest idle poll with wake-ups listening (ProcessorConfig.max_poll_interval).
DEFAULT_MAX_POLL_INTERVAL = 5.0
#: How often run_until_caught_up says it is waiting for an open transaction.
WAIT_LOG_INTERVAL = 5.0
#: Seconds a processor waits behind the same open transaction before it names it in a
#: WARNING (ProcessorConfig.blocked_warning_after), and then again every as many.
DEFAULT_BLOCKED_WARNING_AFTER = 30.0
#: Seconds a partition stands on a reshard's boundary before a WARNING says so (and
#: again every as many seconds): a reshard killed before its switch leaves it there.
BOUNDARY_WARNING_AFTER = 30.0
#: Seconds a claimed partition's lease lasts without renewal (ProcessorConfig.lease).
DEFAULT_LEASE = 5.0


#: What holds projections back under each horizon rule, for people (logs, status).
HELD_BACK_BY: dict[str, str] = {
    "store": "A writer of the store (a transaction that appended, or marked itself) held "
    "open delays every projection of the store; nothing is lost, the events are read "
    "once it ends.",
    "server": "A transaction held open anywhere on the server, in any database, delays "
    "every projection; nothing is lost, the events are read once it ends.",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessorConfig:
    """How one processor reads: batch size, which partition, how often to poll."""

    batch_size: int = DEFAULT_BATCH_SIZE
    partition_key: int = 0
    total_partitions: int = 1
    partition_strategy: PartitionStrategy = field(default_factory=HashPartitionStrategy)
    poll_interval: float = DEFAULT_POLL_INTERVAL
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """How ``run`` and ``run_until_caught_up`` retry transient failures (DESIGN
    invariant 8); ``eventsource.retry.NO_RETRY`` restores fail-at-once."""
    batch_timeout: float | None = None
    """PostgreSQL: bound each statement of a batch (``statement_timeout``), so a batch
    stuck on a dead connection or a lock fails, rolls back and is retried."""
    horizon: HorizonRule = "store"
    """PostgreSQL: which open transactions hold the projection back (DESIGN invariant
    2). ``"store"``: only those that can still append to this store (they mark
    themselves; docs/horizon.md). ``"server"``: every transaction on the server that
    holds an id, in any database (the rule before the store's horizon existed, and
    the fallback, logged, where the store rule cannot be computed)."""
    claim: bool = False
    """Share the projection's ``total_partitions`` with every other worker that claims
    them, instead of running one fixed ``partition_key``: identical processes each take
    a lease on a fair share, rebalance as workers come and go, and take over the
    partitions of one that died once its lease expires (see :mod:`eventsource.claims`).
    Only :meth:`Processor.run` claims; ``run_until_caught_up`` refuses."""
    lease: float = DEFAULT_LEASE
    """With ``claim``: seconds a worker's lease lasts without renewal (renewed every
    third of it). A worker that stops renewing loses its partitions after this long."""
    blocked_warning_after: float | None = DEFAULT_BLOCKED_WARNING_AFTER
    """PostgreSQL: after this many seconds with committed events it cannot read yet,
    behind the same open transaction (DESIGN invariant 2), log a WARNING naming it
    (pid, database, application, age; see :func:`eventsource.status.blockers`), and
    again every as many seconds while it lasts. None: never. Costs no query until then."""
    wake_ups: bool = True
    """``run`` wakes as soon as an append that its scope and partition could read commits
    (:mod:`eventsource.wakeups`): at once from writers in this process, and on
    PostgreSQL from other processes through one LISTEN connection per process. Off
    where LISTEN does not work (PgBouncer in transaction mode): it then only polls."""
    max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL
    """With wake-ups listening (PostgreSQL), idle polls back off, doubling from
    ``poll_interval`` up to this (or ``poll_interval`` when that is longer): the
    fallback for a missed hint or a writer with ``EventStore(notify=False)``. Polls
    stay at ``poll_interval`` while events wait behind an open transaction, while a
    rebuild or reshard holds the partition, and on SQLite (other processes' appends
    send no hint there)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "partition_key", "total_partitions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise errors.ConfigurationError(f"{name} must be an int, got {value!r}")
        if self.batch_size < 1:
            raise errors.ConfigurationError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.total_partitions < 1:
            raise errors.ConfigurationError(
                f"total_partitions must be >= 1, got {self.total_partitions}"
            )
        if not 0 <= self.partition_key < self.total_partitions:
            raise errors.ConfigurationError(
                f"partition_key must be in 0..{self.total_partitions - 1} "
                f"(total_partitions={self.total_partitions}), got {self.partition_key}"
            )
        if not isinstance(self.partition_strategy, PartitionStrategy):
            raise errors.ConfigurationError(
                "partition_strategy must have should_process(aggregate_id, partition_key, "
                f"total_partitions), got {self.partition_strategy!r}"
            )
        interval = self.poll_interval
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval < 0:
            raise errors.ConfigurationError(
                f"poll_interval must be a number of seconds >= 0, got {interval!r}"
            )
        ceiling = self.max_poll_interval
        if isinstance(ceiling, bool) or not isinstance(ceiling, int | float) or ceiling <= 0:
            raise errors.ConfigurationError(
                f"max_poll_interval must be a number of seconds > 0, got {ceiling!r}"
            )
        if not isinstance(self.wake_ups, bool):
            raise errors.ConfigurationError(f"wake_ups must be a bool, got {self.wake_ups!r}")
        if not isinstance(self.retry, RetryPolicy):
            raise errors.ConfigurationError(
                f"retry must be an eventsource.RetryPolicy, got {self.retry!r}"
            )
        timeout = self.batch_timeout
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            raise errors.ConfigurationError(
                f"batch_timeout must be seconds > 0 or None, got {timeout!r}"
            )
        if self.horizon not in HORIZON_RULES:
            raise errors.ConfigurationError(
                f"horizon must be one of {', '.join(map(repr, HORIZON_RULES))}, "
                f"got {self.horizon!r}"
            )
        if not isinstance(self.claim, bool):
            raise errors.ConfigurationError(f"claim must be a bool, got {self.claim!r}")
        if self.claim and self.partition_key != 0:
            raise errors.ConfigurationError(
                "claim=True shares every partition among the workers: leave partition_key "
                f"unset (got {self.partition_key}), or drop claim to run that one partition"
            )
        lease = self.lease
        if isinstance(lease, bool) or not isinstance(lease, int | float) or not lease > 0:
            raise errors.ConfigurationError(f"lease must be seconds > 0, got {lease!r}")
        after = self.blocked_warning_after
        if after is not None and (
            isinstance(after, bool) or not isinstance(after, int | float) or after <= 0
        ):
            raise errors.ConfigurationError(
                f"blocked_warning_after must be seconds > 0 or None, got {after!r}"
            )


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What one batch did."""

    handled: int
    """Events passed to ``handle``."""
    skipped: int
    """Events read but left to another partition by a Python-side strategy."""
    read: int
    """Rows the batch query returned (a full batch means more may be waiting)."""
    transaction_id: int
    global_position: int
    """The checkpoint after the batch."""
    duration: float
    full: bool
    """The batch was full: more events may be waiting."""
    rebuilding: bool = False
    """Nothing was done: an online rebuild holds the projection (PostgreSQL; see
    :mod:`eventsource.rebuild`). The batch returned like an idle poll."""
    held_back_by: int | None = None
    """PostgreSQL: committed events wait behind open transactions; this is the oldest
    one's id (the horizon), which they wait for. None: nothing waits."""


class ProcessorMetrics(Protocol):
    """Receives what each batch did (see ``eventsource.metrics`` for Prometheus)."""

    def batch_completed(self, projection: str, partition: int, result: BatchResult) -> None: ...

    def batch_failed(self, projection: str, partition: int) -> None: ...

    # Optional (called when present): ``batch_retried(projection, partition, cause)``
    # after each transient failure the processor retries, and
    # ``events_quarantined(projection, partition, count)`` after a batch that committed
    # dead letters (see eventsource.deadletters).


class Processor:
    """Runs one projection partition: ``run`` until stopped, or ``run_until_caught_up``.

    ``engine`` is an Engine, or a ``sessionmaker`` (e.g. bound to a test's connection,
    so the projection runs inside the test's transaction).
    """

    def __init__(
        self,
        engine: sa.Engine | sessionmaker[Session],
        store: EventStore | None = None,
        config: ProcessorConfig | None = None,
        *,
        metrics: ProcessorMetrics | None = None,
    ) -> None:
        #: What the processor was given (claims makes its partitions' processors from it).
        self._given: sa.Engine | sessionmaker[Session] = engine
        if isinstance(engine, sa.Engine):
            self._sessions: sessionmaker[Session] = sessionmaker(
                read_committed(engine), expire_on_commit=False
            )
            self.engine: sa.Engine | None = engine
        elif isinstance(engine, sessionmaker):
            bind = engine.kw.get("bind")
            self.engine = bind if isinstance(bind, sa.Engine) else None
            # A sessionmaker on an Engine gets its own READ COMMITTED copy; one bound to a
            # Connection runs inside the caller's transaction, whose isolation is theirs.
            self._sessions = (
                engine
                if self.engine is None
                else sessionmaker(
                    class_=engine.class_, **{**engine.kw, "bind": read_committed(self.engine)}
                )
            )
        elif isinstance(engine, scoped_session):
            # Its Session belongs to one request or thread (Flask-SQLAlchemy's to an app
            # context); batches open and commit their own, in the processor's thread.
            raise errors.ConfigurationError(
                "Processor needs an Engine or a sessionmaker, got a scoped_session, whose "
                "Session belongs to one request or thread; batches commit their own "
                "transactions, often in another thread: pass the Engine (Flask-SQLAlchemy: "
                "db.engine) or a sessionmaker"
            )
        else:
            raise errors.ConfigurationError(
                f"Processor needs an Engine or a sessionmaker, got {type(engine).__name__}"
            )
        if self.engine is not None:  # a Connection is the caller's; the store checks it
            database.require_configured(self.engine, what="Processor")
        self.store = store if store is not None else EventStore()
        if config is None:
            config = ProcessorConfig()
        elif not isinstance(config, ProcessorConfig):
            raise errors.ConfigurationError(
                f"config must be a ProcessorConfig, got {type(config).__name__}"
            )
        self.config = config
        self.metrics = metrics
        #: Warn when reading the caller's own uncommitted events (off in the test plugin,
        #: whose transactions always roll back).
        self.warn_on_own_transaction = True
        #: Inside a caller's transaction, read the rows it wrote itself (tests append and
        #: project in one transaction). A rebuild, which commits, turns it off: its own
        #: rows could sort after events of older transactions still open.
        self.read_own_transaction = True
        #: Step aside while an online rebuild of the projection runs elsewhere (PostgreSQL:
        #: a batch that finds its rebuild lock taken returns like an idle poll). The
        #: rebuild's own processors turn it off.
        self.yields_to_rebuild = True
        self._waiting_for_rebuild = False
        #: Sessions join a caller's transaction (a sessionmaker bound to a Connection):
        #: a failure there is the caller's to handle, never retried or rolled back here.
        self._in_callers_transaction = self.engine is None
        self._stop = threading.Event()
        #: The wait behind an open transaction in progress (see _watch_horizon).
        self._held_back: _HeldBack | None = None
        self._queries: dict[tuple[str, tuple[str, ...], tuple[str, ...]], _Queries] = {}
        #: Projections whose batches mark themselves as writers before they take an id:
        #: their handlers append after other writes (learnt from an AppendOrderError).
        self._marks_first: set[str] = set()
        #: How old a store horizon a batch accepts (seconds): 0 (computed after the batch
        #: began) outside run(), whose polls accept one a poll interval old.
        self._horizon_max_age = 0.0
        #: Set by eventsource.claims on the processor of one claimed partition: the owner
        #: and epoch its lease was claimed with. A batch that finds either changed (the
        #: lease passed to another worker) rolls back with PartitionLostError.
        self.fence: tuple[str, int] | None = None
        #: run() starts with check_partitions(), under the projection's exclusive lock.
        #: A claimed partition's processor skips it: its coordinator made every
        #: checkpoint already, and the exclusive lock would wait for (and hold up every
        #: batch behind) a batch of a paused worker. A missing checkpoint (a reset)
        #: still takes it.
        self.checks_partitions_at_start = True
        #: Since when batches stand on a reshard's boundary (see _watch_boundary).
        self._on_boundary_since: float | None = None
        self._next_boundary_warning = 0.0
        #: With ``config.claim``: the id this processor claims partitions under (default:
        #: the process's, :func:`eventsource.claims.worker_id`). Two processors of one
        #: projection in one process are two workers only with ids of their own.
        self.worker_id: str | None = None
        #: Called by stop() (eventsource.claims wakes its coordinator with it).
        self._stop_listeners: list[Callable[[], None]] = []
        #: Set by wake() and stop(): run() waits on it between polls.
        self._wake = threading.Event()
        #: When run() was last woken (monotonic): its next batch accepts only a store
        #: horizon computed since, which includes the append that woke it.
        self._woken_at: float | None = None

    # -- public API -------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run`` to return after the batch in hand (thread-safe)."""
        self._stop.set()
        self._wake.set()
        for listener in self._stop_listeners:
            listener()

    def wake(self) -> None:
        """Make ``run`` read now instead of at its next poll (thread-safe). Wake-ups
        (``config.wake_ups``) call it; an application may too, after appending events
        through a path that sends no hint."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self, projection: Projection, *, handle_signals: bool = True) -> None:
        """Process batches until :meth:`stop`; raises the first error (nothing half-done).

        In the main thread, SIGINT (Ctrl+C) and SIGTERM stop it too, as :meth:`stop`
        does: the batch in hand commits and ``run`` returns; a second signal raises
        ``KeyboardInterrupt`` and the batch in hand rolls back (see
        :mod:`eventsource.signals`). ``handle_signals=False`` leaves signals alone.

        With ``config.claim`` it runs the partitions this worker claims, each in a
        thread of its own, and shares them with the other workers until stopped
        (:mod:`eventsource.claims`).
        """
        _check_projection(projection)
        if self.config.claim:
            from eventsource import claims  # it imports this module

            with signals.graceful_stop(self.stop, enabled=handle_signals, log=logger):
                claims.run_claimed(self, projection)
            return
        self._log_start(projection, "run")
        retrier = Retrier(self.config.retry, self._describe(projection))
        # While it polls, the store horizon it reads below may be a poll interval old:
        # one computation then serves every processor of the process (horizon.py).
        self._horizon_max_age = self.config.poll_interval
        subscription = self._subscribe(projection)
        idle_polls = 0
        try:
            with signals.graceful_stop(self.stop, enabled=handle_signals, log=logger):
                if self.checks_partitions_at_start:
                    self._retrying(projection, retrier, lambda: self.check_partitions(projection))
                while not self._stop.is_set():
                    self._wake.clear()  # a hint from now on calls for another batch
                    result = self._retrying(
                        projection, retrier, lambda: self.process_batch(projection)
                    )
                    self._watch_horizon(projection, result)
                    if result.full:
                        idle_polls = 0
                        continue
                    idle_polls = idle_polls + 1 if self._may_back_off(result) else 0
                    interval = self._idle_interval(subscription, idle_polls)
                    if self._wake.wait(interval) and not self._stop.is_set():
                        self._woken_at = time.monotonic()
                        idle_polls = 0
        except _Stopped:
            pass
        finally:
            if subscription is not None:
                subscription.close()
            self._stop.clear()
            self._wake.clear()
            self._horizon_max_age = 0.0
            logger.info(
                "projection %s partition %d stopped",
                projection.checkpoint_name,
                self.config.partition_key,
                extra=self._fields(projection),
            )

    def _subscribe(self, projection: Projection) -> wakeups.Subscription | None:
        """Wake-ups for ``run``: hints about appends this partition could read."""
        if not self.config.wake_ups or self.engine is None:
            return None
        return wakeups.subscribe(
            self.engine,
            self.store.tables.names.events,
            _wake_filter(projection, self.config),
            self.wake,
        )

    def _may_back_off(self, result: BatchResult) -> bool:
        """An idle poll after which only a hint (or the fallback) can bring news: nothing
        read, nothing waiting behind an open transaction (its end sends no hint), no
        rebuild or reshard boundary (their end sends none either)."""
        return (
            result.read == 0
            and not result.rebuilding
            and result.held_back_by is None
            and self._on_boundary_since is None
        )

    def _idle_interval(self, subscription: wakeups.Subscription | None, idle_polls: int) -> float:
        """Seconds to the next poll: ``poll_interval``, doubling per idle poll up to
        ``max_poll_interval`` while hints from every process arrive."""
        interval = self.config.poll_interval
        if idle_polls <= 1 or subscription is None or not subscription.active:
            return interval
        ceiling = max(interval, self.config.max_poll_interval)
        grown: float = max(interval, 0.001) * 2.0 ** min(idle_polls - 1, 32)
        return min(ceiling, grown)

    def run_until_caught_up(
        self,
        projection: Projection,
        *,
        on_batch: Callable[[BatchResult], None] | None = None,
    ) -> int:
        """Handle every event committed before the call, then return how many were handled.

        On PostgreSQL, events committed after a transaction that is still open become
        readable only when it ends (see the module docstring): this waits for that,
        logging while it waits. ``on_batch`` is called after each committed batch.
        """
        _check_projection(projection)
        if self.config.claim:
            raise errors.ConfigurationError(
                "run_until_caught_up does not claim partitions: catch up with one "
                "processor per partition_key (claim=False), or run() to share them"
            )
        self._log_start(projection, "catch-up")
        handled = 0
        retrier = Retrier(self.config.retry, self._describe(projection))

        def attempt(work: Callable[[], T]) -> T:
            return self._retrying(projection, retrier, work)

        try:
            attempt(lambda: self.check_partitions(projection))
            target = attempt(self._head_position)
            waiting_since: float | None = None
            while not self._stop.is_set():
                result = attempt(lambda: self.process_batch(projection))
                handled += result.handled
                if on_batch is not None:
                    on_batch(result)
                self._watch_horizon(projection, result)
                if result.full and result.global_position < target:
                    continue
                # A full batch past the target may already be enough: writers that keep
                # appending must not keep a catch-up from ever returning.
                if not attempt(lambda: self._blocked_before(projection, target)):
                    break
                if result.full:
                    continue
                now = time.monotonic()
                if waiting_since is None or now - waiting_since >= WAIT_LOG_INTERVAL:
                    waiting_since = now
                    logger.info(
                        "projection %s waits for an open transaction older than events "
                        "already committed (up to position %d)",
                        projection.checkpoint_name,
                        target,
                        extra=self._fields(projection),
                    )
                self._stop.wait(self.config.poll_interval)
        except _Stopped:
            pass
        finally:
            self._stop.clear()
        return handled

    def check_partitions(self, projection: Projection) -> None:
        """Refuse to start when this projection's checkpoints use another partition count,
        and create this partition's first checkpoint in the same locked transaction.

        The check and the creation are atomic (DESIGN invariant 6): two processes that
        start a new projection at the same instant with different ``total_partitions``
        take turns on the projection's lock, and the second one is refused. With
        ``config.claim`` every partition's first checkpoint is created; and when the
        checkpoints all use one other count (a reshard set it), that is no refusal: the
        claiming worker follows them (eventsource.claims).
        """
        try:
            with self._sessions() as session, session.begin():
                queries = self._queries_for(session, projection)
                if self.config.claim and _followed_count(
                    session, self.store.tables, projection, self.config.total_partitions
                ):
                    return
                if self.config.claim and self._all_in_place(session, projection):
                    # Nothing to create: a claiming worker that joins does not queue for
                    # the exclusive lock (behind a long or paused batch, holding up
                    # every batch of the projection meanwhile).
                    cluster.check(session.connection(), self.store.tables)
                    return
                self._ensure_checkpoint(session, queries, projection)
        except sa.exc.DBAPIError as exc:  # a database never migrated fails fast, clearly
            database.raise_if_schema_missing(exc, self.store.tables.names, own_statement=True)
            raise

    def _all_in_place(self, session: Session, projection: Projection) -> bool:
        """Every partition has its checkpoint, all with this processor's count."""
        table = self.store.tables.projection_checkpoints
        rows = session.execute(
            sa.select(table.c.partition_key, table.c.total_partitions).where(
                table.c.projection_name == projection.checkpoint_name
            )
        ).all()
        total = self.config.total_partitions
        return {(int(k), int(t)) for k, t in rows} == {(k, total) for k in range(total)}

    def _ensure_checkpoint(
        self, session: Session, queries: _Queries, projection: Projection
    ) -> None:
        queries.lock_projection(session, projection.checkpoint_name)
        # Stored transaction ids ahead of the server's (a restore into another
        # cluster) would make every read come back empty: refuse (invariant 7).
        cluster.check(session.connection(), self.store.tables)
        # A version that readers have left (eventsource.versions.switch) had its
        # checkpoints deleted: refuse to start it again from scratch.
        from eventsource import versions  # it imports this module

        versions.refuse_retired(session.connection(), self.store.tables, projection)
        totals = partition_counts(session, self.store.tables, projection.checkpoint_name)
        other = totals - {self.config.total_partitions}
        if other:
            raise errors.PartitionCountChangedError(
                f"projection {projection.checkpoint_name!r} has checkpoints written with "
                f"total_partitions={sorted(other)}, but this processor uses "
                f"total_partitions={self.config.total_partitions}. Changing the count "
                "would skip or repeat events. Start it with the old count, reshard it to "
                "the new one while its workers run (eventsource reshard "
                f"{projection.checkpoint_name} --total-partitions "
                f"{self.config.total_partitions}), rebuild it with the new one (eventsource "
                f"rebuild {projection.name} --app MODULE:ATTR --total-partitions "
                f"{self.config.total_partitions}), or "
                f"reset it (eventsource reset {projection.name} --app MODULE:ATTR) and "
                "replay from the start."
            )
        if self.config.claim:  # every partition, for the workers that will claim them
            for key in range(self.config.total_partitions):
                queries.create_checkpoint(
                    session,
                    projection.checkpoint_name,
                    dataclasses.replace(self.config, claim=False, partition_key=key),
                )
        else:
            queries.create_checkpoint(session, projection.checkpoint_name, self.config)

    def process_batch(self, projection: Projection) -> BatchResult:
        """Run one batch in one transaction and return what it did."""
        if self.metrics is None:
            return self._process_batch(projection)
        try:
            result = self._process_batch(projection)
        except Exception:
            self.metrics.batch_failed(projection.checkpoint_name, self.config.partition_key)
            raise
        self.metrics.batch_completed(projection.checkpoint_name, self.config.partition_key, result)
        return result

    def _process_batch(self, projection: Projection) -> BatchResult:
        started = time.perf_counter()
        while True:
            try:
                return self._batch(projection, started)
            except _NoCheckpoint:
                # First batch, or a reset since the last one: create the checkpoint
                # under the projection's exclusive lock, with the partition check.
                self.check_partitions(projection)
            except _Rebuilding as rebuilding:
                return self._rebuilding(projection, rebuilding, started)
            except errors.ProjectionError as exc:
                name = projection.checkpoint_name
                if retry.append_order_error(exc) is not None and name not in self._marks_first:
                    # Its handler writes, then appends: from now on its batches mark
                    # themselves first, so their appends are never refused this way.
                    self._marks_first.add(name)
                    logger.info(
                        "projection %r appends events after other writes: its batches now "
                        "mark themselves as writers from their start (see docs/horizon.md)",
                        name,
                    )
                raise
            except sa.exc.DBAPIError as exc:
                # Handlers' errors arrive as ProjectionError; one of their read-model
                # tables missing (flushed by our statement) names no table of ours.
                database.raise_if_schema_missing(exc, self.store.tables.names, own_statement=False)
                raise

    def _batch(self, projection: Projection, started: float) -> BatchResult:
        config = self.config
        with self._sessions() as session, session.begin():
            queries = self._queries_for(session, projection)
            if queries.dialect == "postgresql" and projection.checkpoint_name in self._marks_first:
                session.execute(horizon.mark_statement(self.store.tables.names.events))
            checkpoint = queries.lock_checkpoint(
                session,
                projection.checkpoint_name,
                config,
                yield_to_rebuild=self.yields_to_rebuild,
                fence=self.fence,
            )
            if checkpoint is None:
                if not self._in_callers_transaction:
                    raise _NoCheckpoint  # roll back, create it under the exclusive lock
                # Rolling back here would roll back the caller's whole transaction; it
                # already serialises with everything else, so create the row in it.
                self._ensure_checkpoint(session, queries, projection)
                checkpoint = queries.lock_checkpoint(
                    session, projection.checkpoint_name, config, fence=self.fence
                )
                assert checkpoint is not None
            checkpoint = self._with_store_horizon(session, checkpoint)
            if config.batch_timeout is not None and queries.dialect == "postgresql":
                # After the lock: waiting for a reset or rebuild is not a stuck batch.
                session.execute(
                    _SET_LOCAL, {"name": "statement_timeout", "value": _ms(config.batch_timeout)}
                )
            own = checkpoint.reads_own_rows and self.read_own_transaction
            batch = queries.batch_with_own if own else queries.batch
            rows = session.execute(batch, checkpoint.params(config.batch_size)).all()
            full = len(rows) >= config.batch_size
            newest_readable: Any = None
            if not full and queries.horizon is not None:
                # Filtered-out events still move the checkpoint, so a projection that wants
                # 1% of the log does not rescan the other 99% on every poll. Read before the
                # handlers run: rows they append carry this transaction's id, and moving
                # the checkpoint onto it would pass transactions that commit later.
                query = queries.horizon_with_own if own else queries.horizon
                assert query is not None  # both exist when the projection is scoped
                newest_readable = session.execute(query, checkpoint.params(1)).first()
            handled = skipped = 0
            filter_in_python = queries.python_partition_filter
            tx, pos = checkpoint.transaction_id, checkpoint.global_position
            whole_batches = type(projection).handle_batch is not Projection.handle_batch
            # Quarantining projections collect the batch and apply it event by event in
            # savepoints (_handle_quarantining); the default STOP keeps this plain loop.
            quarantining = _quarantines(projection)
            wanted: list[PersistedEvent] = []
            last_handled: PersistedEvent | None = None
            for row in rows:
                event = event_from_row(row)
                if filter_in_python and not config.partition_strategy.should_process(
                    event.aggregate_id, config.partition_key, config.total_partitions
                ):
                    skipped += 1
                elif whole_batches or quarantining:
                    wanted.append(event)
                else:
                    try:
                        projection.handle(event, session)
                    except Exception as exc:
                        raise self._handler_error(projection, event, exc) from exc
                    handled += 1
                    last_handled = event
                tx, pos = row[-1], event.global_position
            if wanted and quarantining:
                handled = self._handle_quarantining(projection, wanted, session)
            elif wanted:
                try:
                    projection.handle_batch(wanted, session)
                except Exception as exc:
                    raise self._handler_error(projection, wanted, exc) from exc
                handled = len(wanted)
            failed_on = wanted if wanted and not quarantining else last_handled
            if failed_on and (session.new or session.dirty or session.deleted):
                # The handlers' pending ORM writes are part of their work: flushed here, a
                # failure (a missing read-model table, a constraint) is theirs, not a raw
                # error from our checkpoint statement.
                try:
                    session.flush()
                except Exception as exc:
                    raise self._handler_error(projection, failed_on, exc) from exc
            if (
                checkpoint.own_transaction is not None
                and tx == checkpoint.own_transaction
                and self.warn_on_own_transaction
            ):
                self._warn_own_transaction(projection, checkpoint)
            if newest_readable is not None and (
                (int(newest_readable[0]), int(newest_readable[1])) > (tx, pos)
            ):
                tx, pos = int(newest_readable[0]), int(newest_readable[1])
            if not full and checkpoint.reaches_stop():
                # Everything of this partition up to the reshard's boundary is handled:
                # stand on the boundary itself, where the new partitions will start.
                assert checkpoint.stop is not None
                tx, pos = max((tx, pos), checkpoint.stop)
            moved = (tx, pos) != (checkpoint.transaction_id, checkpoint.global_position)
            if moved:
                updated = session.execute(
                    queries.update_checkpoint,
                    {
                        "name": projection.checkpoint_name,
                        "key": config.partition_key,
                        "tx": tx,
                        "pos": pos,
                        "handled": handled,
                        "now": datetime.now(UTC),
                    },
                )
                if updated.rowcount != 1:  # type: ignore[attr-defined]
                    # Deleted behind the lock (by hand, or by a tool that does not take
                    # it): committing would move no checkpoint but keep the handlers'
                    # writes, and the next batch would apply the same events again.
                    raise errors.CheckpointLostError(
                        f"the checkpoint of projection {projection.checkpoint_name!r} partition "
                        f"{config.partition_key} was deleted while a batch ran; the batch was "
                        "rolled back. Reset projections with `eventsource reset` or "
                        "eventsource.rebuild.reset(), which wait for batches in hand."
                    )
        self._watch_boundary(projection, checkpoint.stop, (tx, pos))
        if moved and self.store.notify and self.engine is not None:
            wakeups.publish_checkpoint(
                self.engine, self.store.tables.names.events, projection.checkpoint_name
            )
        result = BatchResult(
            handled,
            skipped,
            len(rows),
            tx,
            pos,
            time.perf_counter() - started,
            full,
            held_back_by=checkpoint.held_back_by,
        )
        if moved:
            logger.info(
                "projection %s partition %d: handled %d, skipped %d, checkpoint %d in %.1f ms",
                projection.checkpoint_name,
                config.partition_key,
                handled,
                skipped,
                pos,
                result.duration * 1000,
                extra={
                    **self._fields(projection),
                    "handled": handled,
                    "skipped": skipped,
                    "checkpoint": pos,
                    "checkpoint_transaction_id": tx,
                    "batch_size": config.batch_size,
                    "duration_ms": round(result.duration * 1000, 3),
                },
            )
        else:
            logger.debug(
                "projection %s partition %d: idle", projection.checkpoint_name, config.partition_key
            )
        if self._waiting_for_rebuild:
            self._waiting_for_rebuild = False
            logger.info(
                "projection %s partition %d: the rebuild is over, carrying on from its checkpoint",
                projection.checkpoint_name,
                config.partition_key,
                extra=self._fields(projection),
            )
        return result

    def _rebuilding(
        self, projection: Projection, rebuilding: _Rebuilding, started: float
    ) -> BatchResult:
        """The result of a batch that found the projection being rebuilt: an idle poll
        (no error, no retry), said once at INFO while the rebuild lasts."""
        level = logging.DEBUG if self._waiting_for_rebuild else logging.INFO
        self._waiting_for_rebuild = True
        logger.log(
            level,
            "projection %s partition %d waits: an online rebuild holds it (eventsource "
            "rebuild); its batches replay every event, this worker carries on afterwards",
            projection.checkpoint_name,
            self.config.partition_key,
            extra={**self._fields(projection), "rebuilding": True},
        )
        return BatchResult(
            0,
            0,
            0,
            rebuilding.transaction_id,
            rebuilding.global_position,
            time.perf_counter() - started,
            False,
            rebuilding=True,
        )

    # -- internals --------------------------------------------------------------

    def _retrying(self, projection: Projection, retrier: Retrier, work: Callable[[], T]) -> T:
        """``work()``, retried after transient failures as the policy allows.

        Each attempt is a whole transaction (a batch is all-or-nothing), so a retry
        starts afresh on a new connection. Raises ``_Stopped`` when :meth:`stop` is
        called during a wait, and DatabaseUnavailableError when the policy gives up.
        """
        while True:
            try:
                result = work()
            except Exception as exc:
                if self._in_callers_transaction or not retry.is_transient(exc):
                    raise
                delay = retrier.failed(exc)
                cause = retry.describe(exc)
                logger.warning(
                    "projection %s partition %d: transient failure %d (%s: %s); retrying "
                    "the batch in %.0f ms",
                    projection.checkpoint_name,
                    self.config.partition_key,
                    retrier.failures,
                    cause,
                    _first_line(exc),
                    delay * 1000,
                    extra={
                        **self._fields(projection),
                        "cause": cause,
                        "attempt": retrier.failures,
                        "retry_in_ms": round(delay * 1000, 1),
                    },
                )
                retried = getattr(self.metrics, "batch_retried", None)
                if retried is not None:
                    retried(projection.checkpoint_name, self.config.partition_key, cause)
                if self._stop.wait(delay):
                    raise _Stopped from None
                continue
            if retrier.failures:
                logger.info(
                    "projection %s partition %d: recovered after %d transient failure(s)",
                    projection.checkpoint_name,
                    self.config.partition_key,
                    retrier.failures,
                    extra=self._fields(projection),
                )
            retrier.succeeded()
            return result

    def _with_store_horizon(self, session: Session, checkpoint: _Checkpoint) -> _Checkpoint:
        """The checkpoint with the store rule's horizon, when committed events wait above
        the server rule's bound (read for free with the checkpoint) and the rule is on."""
        if self.config.horizon != "store" or not checkpoint.waits_above_server_bound:
            return checkpoint
        if not checkpoint.read_committed:
            # A caller's REPEATABLE READ or SERIALIZABLE transaction reads with a snapshot
            # taken before the horizon was computed: a writer that ended in between has
            # rows it cannot see, below the horizon. The server rule's bound is safe.
            return checkpoint
        engine = self.engine if self.engine is not None else session.connection().engine
        assert checkpoint.store_identity is not None
        assert checkpoint.next_id is not None
        max_age = self._horizon_max_age
        if self._woken_at is not None:  # the append that woke it is below a fresh one
            max_age = min(max_age, max(0.0, time.monotonic() - self._woken_at))
        found = horizon.for_store(engine, self.store.tables.names, checkpoint.store_identity).get(
            engine, max_age=max_age, next_id=checkpoint.next_id
        )
        assert checkpoint.xmin is not None
        bound = horizon.combine(checkpoint.xmin, found, checkpoint.own_transaction)
        return dataclasses.replace(checkpoint, xmin=bound)

    def _watch_horizon(self, projection: Projection, result: BatchResult) -> None:
        """Warn when committed events have waited ``blocked_warning_after`` seconds behind
        the same open transaction (the horizon did not move), naming it; again every as
        many seconds while it lasts; say so at INFO when it is over. No query until then:
        the batch's own checkpoint query says whether anything waits."""
        if result.rebuilding:  # an idle poll that read nothing: it tells nothing either
            return
        after = self.config.blocked_warning_after
        horizon = result.held_back_by if after is not None else None
        episode = self._held_back
        if episode is not None and horizon != episode.horizon:
            self._held_back = None
            if episode.warned:
                logger.info(
                    "projection %s partition %d: transaction %d ended after holding its "
                    "events back for %.0f s",
                    projection.checkpoint_name,
                    self.config.partition_key,
                    episode.horizon,
                    time.monotonic() - episode.since,
                    extra={
                        **self._fields(projection),
                        "held_back": False,
                        "horizon_transaction_id": episode.horizon,
                    },
                )
        if horizon is None or after is None:
            return
        now = time.monotonic()
        if self._held_back is None:
            self._held_back = _HeldBack(horizon, now, now + after)
        episode = self._held_back
        if now < episode.next_warning:
            return
        episode.next_warning = now + after
        episode.warned = True
        from eventsource import status  # it imports modules this one imports

        found: list[status.Blocker] = []
        try:
            with self._sessions() as session:
                found = status.blockers(
                    session, store=self.store, limit=1, horizon=self.config.horizon
                )
        except sa.exc.DBAPIError as exc:  # naming it is a courtesy: never fatal
            logger.debug("could not list open transactions: %s", _first_line(exc))
        fields: dict[str, Any] = {
            **self._fields(projection),
            "held_back": True,
            "held_back_seconds": round(now - episode.since, 1),
            "horizon_transaction_id": horizon,
        }
        if found:
            blocker = found[0]
            named = blocker.describe()
            fields.update(
                blocker_pid=blocker.pid,
                blocker_database=blocker.database,
                blocker_user=blocker.user,
                blocker_application_name=blocker.application_name,
                blocker_age_seconds=blocker.age_seconds,
                blocker_gid=blocker.gid,
            )
        else:
            named = f"transaction {horizon} (it has just ended, or this role cannot see it)"
        logger.warning(
            "projection %s partition %d: committed events have waited %.0f s for an open "
            "transaction that started before them: %s. %s",
            projection.checkpoint_name,
            self.config.partition_key,
            now - episode.since,
            named,
            HELD_BACK_BY[self.config.horizon],
            extra=fields,
        )

    def _watch_boundary(
        self, projection: Projection, stop: tuple[int, int] | None, at: tuple[int, int]
    ) -> None:
        """Warn when the partition has stood on a reshard's boundary for a while: a
        reshard killed before its switch leaves it there until it is run again."""
        if stop is None or at != stop:
            self._on_boundary_since = None
            return
        now = time.monotonic()
        if self._on_boundary_since is None:
            self._on_boundary_since = now
            self._next_boundary_warning = now + BOUNDARY_WARNING_AFTER
            return
        if now < self._next_boundary_warning:
            return
        self._next_boundary_warning = now + BOUNDARY_WARNING_AFTER
        name = projection.checkpoint_name
        logger.warning(
            "projection %s partition %d has stood for %.0f s on a reshard's boundary "
            "(position %d) and reads nothing further until the reshard switches. If no "
            "`eventsource reshard %s` runs any more, run it again to finish, or "
            "`eventsource reshard %s --cancel`.",
            name,
            self.config.partition_key,
            now - self._on_boundary_since,
            stop[1],
            name,
            name,
            extra={**self._fields(projection), "reshard_boundary": stop[1]},
        )

    def _describe(self, projection: Projection) -> str:
        return f"projection {projection.checkpoint_name!r} (partition {self.config.partition_key})"

    def _queries_for(self, session: Session, projection: Projection) -> _Queries:
        dialect = session.get_bind().dialect.name
        # Scope may be set per instance, so it is part of the key, not only the class.
        key = (dialect, projection.aggregate_types, projection.bounded_contexts)
        queries = self._queries.get(key)
        if queries is None:
            claims = has_claims_schema(session.connection(), self.store.tables)
            if not claims and (self.config.claim or self.fence is not None):
                raise errors.SchemaMissingError(
                    "claimed partitions need the library's migration es0006, which this "
                    f"database lacks ({self.store.tables.names.partition_claims} is "
                    "missing): run `eventsource db upgrade` (or `alembic upgrade head`, "
                    "or eventsource.upgrade(engine)) first"
                )
            queries = _Queries(self.store.tables, dialect, projection, self.config, claims)
            self._queries[key] = queries
        return queries

    def _head_position(self) -> int:
        events = self.store.tables.events
        try:
            with self._sessions() as session:
                top = session.execute(sa.select(sa.func.max(events.c.global_position))).scalar()
        except sa.exc.DBAPIError as exc:
            database.raise_if_schema_missing(exc, self.store.tables.names, own_statement=True)
            raise
        return int(top or 0)

    def _blocked_before(self, projection: Projection, target: int) -> bool:
        """Whether committed events up to ``target`` are still after the checkpoint.

        After a batch that was not full they waited behind an open transaction, which
        may have ended since: either way the caller polls again.
        """
        with self._sessions() as session, session.begin():
            queries = self._queries_for(session, projection)
            if queries.blocked is None:
                return False
            checkpoint = queries.lock_checkpoint(
                session, projection.checkpoint_name, self.config, lock=False
            )
            if checkpoint is None:  # reset meanwhile: everything is ahead of it
                return True
            params = checkpoint.params(1)
            params["target"] = target
            return bool(session.execute(queries.blocked, params).scalar())

    def _handler_error(
        self,
        projection: Projection,
        failed: PersistedEvent | list[PersistedEvent],
        exc: Exception,
    ) -> errors.ProjectionError:
        # A transient cause (a deadlock in the handler's statement, its append losing a
        # race) is retried with the batch and logged there, not as a handler failure.
        level = logging.DEBUG if retry.is_transient(exc) else logging.ERROR
        if isinstance(failed, list):  # handle_batch: the batch failed as a whole
            first, last = failed[0], failed[-1]
            logger.log(
                level,
                "projection %s partition %d failed on the batch of events %d..%d: %r",
                projection.checkpoint_name,
                self.config.partition_key,
                first.global_position,
                last.global_position,
                exc,
                extra={**self._fields(projection), "global_position": first.global_position},
            )
            return errors.ProjectionError(
                f"projection {projection.checkpoint_name!r} "
                f"(partition {self.config.partition_key}) handle_batch failed on the "
                f"{len(failed)} events at positions "
                f"{first.global_position}..{last.global_position}: {exc!r}; "
                "the batch was rolled back",
                projection=projection.checkpoint_name,
                partition_key=self.config.partition_key,
                global_position=first.global_position,
            )
        event = failed
        fields = {
            **self._fields(projection),
            "global_position": event.global_position,
            "aggregate_id": event.aggregate_id,
            "event_type": event.event_type,
        }
        logger.log(
            level,
            "projection %s partition %d failed on event %d (%s %s): %r",
            projection.checkpoint_name,
            self.config.partition_key,
            event.global_position,
            event.event_type,
            event.aggregate_id,
            exc,
            extra=fields,
        )
        return errors.ProjectionError(
            f"projection {projection.checkpoint_name!r} (partition {self.config.partition_key}) "
            f"failed on event at position {event.global_position} ({event.event_type} of "
            f"{event.aggregate_type} {event.aggregate_id}): {exc!r}; the batch was rolled back",
            projection=projection.checkpoint_name,
            partition_key=self.config.partition_key,
            global_position=event.global_position,
            aggregate_id=event.aggregate_id,
            event_type=event.event_type,
        )

    def _warn_own_transaction(self, projection: Projection, checkpoint: _Checkpoint) -> None:
        if checkpoint.xmin is not None and checkpoint.xmin < checkpoint.own_transaction_or_0:
            logger.warning(
                "projection %s read events written by its own, still open transaction while "
                "older transactions are in flight: if this transaction commits, their events "
                "would sort before its checkpoint and be skipped. Project inside the "
                "appending transaction only in tests that roll back.",
                projection.checkpoint_name,
                extra=self._fields(projection),
            )

    def _fields(self, projection: Projection) -> dict[str, Any]:
        return {
            "projection": projection.checkpoint_name,
            "partition": self.config.partition_key,
            "total_partitions": self.config.total_partitions,
        }

    def _log_start(self, projection: Projection, mode: str) -> None:
        logger.info(
            "projection %s partition %d/%d started (%s, batch size %d)",
            projection.checkpoint_name,
            self.config.partition_key,
            self.config.total_partitions,
            mode,
            self.config.batch_size,
            extra={**self._fields(projection), "batch_size": self.config.batch_size},
        )

    def _handle_quarantining(
        self, projection: Projection, events: list[PersistedEvent], session: Session
    ) -> int:
        """Apply ``events`` for a projection whose ``on_error`` quarantines failing events,
        each in a savepoint (see :mod:`eventsource.deadletters`); how many were applied."""
        from eventsource import deadletters  # it imports this module

        return deadletters.apply_quarantining(
            session,
            projection,
            events,
            tables=self.store.tables,
            config=self.config,
            handler_error=lambda failed, exc: self._handler_error(projection, failed, exc),
            metrics=self.metrics,
            fields=self._fields(projection),
        )


class _Stopped(Exception):
    """:meth:`Processor.stop` was called while waiting to retry."""


_SET_LOCAL = sa.text("SELECT set_config(:name, :value, true)")


def _ms(seconds: float) -> str:
    # 0 would mean "no limit": never round a short bound down to it.
    return f"{max(1, round(seconds * 1000))}ms"


def _first_line(exc: BaseException) -> str:
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    text = str(orig).strip()
    return text.splitlines()[0][:200] if text else type(orig).__name__


@dataclass(slots=True)
class _HeldBack:
    """A wait behind one open transaction: since when, when to warn next."""

    horizon: int
    since: float
    next_warning: float
    warned: bool = False


class _NoCheckpoint(Exception):
    """The partition has no checkpoint row yet: roll back and create it first."""


class _Rebuilding(Exception):
    """An online rebuild holds the projection: roll back, the batch is an idle poll."""

    def __init__(self, transaction_id: int, global_position: int) -> None:
        super().__init__(transaction_id, global_position)
        self.transaction_id = transaction_id
        self.global_position = global_position


def _check_projection(projection: object) -> None:
    if not isinstance(projection, Projection):
        raise errors.ConfigurationError(
            f"expected a Projection instance, got {projection!r} "
            "(subclass eventsource.Projection and pass an instance)"
        )


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    transaction_id: int
    global_position: int
    xmin: int | None
    own_transaction: int | None = None
    newest_transaction_id: int | None = None
    """The highest transaction id of the events this transaction sees."""
    next_id: int | None = None
    """The snapshot's ``xmax`` (at least the caller's own id + 1)."""
    store_identity: str | None = None
    """The events table and the server's lifetime (see horizon.store_identity)."""
    read_committed: bool = False
    """The batch's statements each take a fresh snapshot (see _with_store_horizon)."""
    stop: tuple[int, int] | None = None
    """The boundary a reshard stops the partition at (see eventsource.reshard)."""

    @property
    def held_back_by(self) -> int | None:
        """The horizon, when committed events wait behind it (their id is at or above
        it); None when nothing waits, or inside a caller's transaction that has written
        (its own rows are read)."""
        newest = self.newest_transaction_id
        if newest is None or self.xmin is None or self.own_transaction is not None:
            return None
        return self.xmin if newest >= self.xmin else None

    @property
    def waits_above_server_bound(self) -> bool:
        """Committed events (or the caller's own) are at or above the horizon."""
        newest = self.newest_transaction_id
        return newest is not None and self.xmin is not None and newest >= self.xmin

    @property
    def own_transaction_or_0(self) -> int:
        return self.own_transaction or 0

    @property
    def reads_own_rows(self) -> bool:
        """The transaction has written and is not below the horizon: its own rows need a
        second range (only inside a caller's transaction: tests, rebuilds)."""
        return (
            self.own_transaction is not None
            and self.xmin is not None
            and self.own_transaction >= self.xmin
        )

    def params(self, limit: int) -> dict[str, Any]:
        stop_tx, stop_pos = self.stop if self.stop is not None else (_NO_STOP, _NO_STOP)
        return {
            "ck_tx": self.transaction_id,
            "ck_pos": self.global_position,
            "xmin": self.xmin,
            "own": self.own_transaction,
            "stop_tx": stop_tx,
            "stop_pos": stop_pos,
            "limit": limit,
        }

    def reaches_stop(self) -> bool:
        """A reshard's boundary is set and every event up to it can be read now: a batch
        that read less than it asked for has then read all of its own up to it."""
        if self.stop is None:
            return False
        return self.xmin is None or self.stop[0] < self.xmin


#: The reading bound when no reshard boundary is set: above every id and position.
_NO_STOP = 2**63 - 1
#: Second key of a projection's own advisory lock; partition keys are >= 0.
_PROJECTION_LOCK_KEY = -1
#: Second key of its rebuild lock, held by an online rebuild for its whole duration
#: (a session-level lock on a connection of its own; see lock_rebuild()).
_REBUILD_LOCK_KEY = -2


def _advisory_lock_space(table: str) -> Callable[[str], int]:
    """Maps a projection name to the first key of its advisory locks (a signed int4).

    Two names that happen to share a hash only take turns needlessly; never wrongly.
    """

    def space(name: str) -> int:
        return fnv1a_32(f"eventsource:{table}:{name}") - 2**31

    return space


def read_committed(engine: sa.Engine) -> sa.Engine:
    """``engine`` with READ COMMITTED transactions on PostgreSQL (unchanged elsewhere).

    Batches, resets and rebuilds take their lock first and then read the checkpoint
    and the read model. At REPEATABLE READ or SERIALIZABLE the snapshot would be taken
    by the lock statement itself, before the lock is granted, so a second worker would
    read the checkpoint as it was before the first one's batch and handle the same
    events again (DESIGN invariant 6). Whatever the engine or the database defaults
    to, these transactions therefore run at READ COMMITTED.
    """
    if engine.dialect.name != "postgresql":
        return engine
    return engine.execution_options(isolation_level="READ COMMITTED")


def lock_projection(
    connection: sa.Connection | Session,
    name: str,
    *,
    store: EventStore | None = None,
    timeout: float | None = None,
) -> None:
    """Take projection ``name``'s exclusive lock for the rest of the transaction.

    Every batch holds the shared side of this lock, so this waits for the batches in
    hand of every partition to commit or roll back, and new batches wait until the
    caller's transaction ends: resets and rebuilds never interleave with a batch
    (DESIGN invariant 6). ``timeout`` (seconds) bounds the wait; past it
    :class:`~eventsource.errors.ProjectionBusyError` is raised and the transaction
    must be rolled back. On SQLite, ``BEGIN IMMEDIATE`` already serialises them.
    """
    conn = connection.connection() if isinstance(connection, Session) else connection
    if conn.dialect.name != "postgresql":
        return
    busy = (
        f"projection {name!r} still had a batch in hand after {timeout} s: its "
        "workers hold the projection's lock (a long batch, or a transaction left "
        "open). Nothing was changed; try again, wait longer, or stop the workers."
    )
    _take_lock(conn, _EXCLUSIVE_LOCK, name, store, timeout, busy)


def _followed_count(
    session: Session, tables: models.Tables, projection: Projection, total: int
) -> bool:
    """Whether every checkpoint of ``projection`` uses one count other than ``total``."""
    totals = partition_counts(session, tables, projection.checkpoint_name)
    return len(totals) == 1 and totals != {total}


def partition_counts(session: Session, tables: models.Tables, name: str) -> set[int]:
    """The partition counts projection ``name``'s checkpoints were written with (one,
    normally; none before its first run)."""
    ck = tables.projection_checkpoints
    return {
        int(total)
        for total in session.execute(
            sa.select(ck.c.total_partitions).where(ck.c.projection_name == name).distinct()
        ).scalars()
    }


def has_claims_schema(connection: sa.Connection, tables: models.Tables) -> bool:
    """Whether the store has migration es0006 (claims, and the reshard boundary)."""
    return sa.inspect(connection).has_table(tables.names.partition_claims)


def lock_projection_shared(
    connection: sa.Connection | Session, name: str, *, store: EventStore | None = None
) -> None:
    """Take the shared side of projection ``name``'s lock (the side batches hold) for the
    rest of the transaction: what the exclusive side guards (the partition count, the
    checkpoints' existence) cannot change before it ends. Nothing on SQLite."""
    conn = connection.connection() if isinstance(connection, Session) else connection
    if conn.dialect.name != "postgresql":
        return
    tables = (store or EventStore()).tables
    space = _advisory_lock_space(tables.names.projection_checkpoints)(name)
    conn.execute(_SHARED_LOCK, {"lock_space": space})


def try_lock_partition(
    connection: sa.Connection | Session,
    name: str,
    partition_key: int,
    *,
    store: EventStore | None = None,
) -> bool:
    """Take partition ``partition_key``'s lock of projection ``name`` for the rest of the
    transaction if no batch of it is in hand (whether it was taken). Every batch holds
    this lock from its start to its end. Always true on SQLite (BEGIN IMMEDIATE already
    serialises the transaction with every batch)."""
    conn = connection.connection() if isinstance(connection, Session) else connection
    if conn.dialect.name != "postgresql":
        return True
    tables = (store or EventStore()).tables
    space = _advisory_lock_space(tables.names.projection_checkpoints)(name)
    return bool(
        conn.execute(_TRY_PARTITION_LOCK, {"lock_space": space, "key": partition_key}).scalar()
    )


def rebuild_running(
    connection: sa.Connection | Session, name: str, *, store: EventStore | None = None
) -> bool:
    """Whether an online rebuild of projection ``name`` holds its rebuild lock now
    (PostgreSQL; False elsewhere). When not, a rebuild cannot start before the
    transaction ends (it holds the lock's shared side until then)."""
    conn = connection.connection() if isinstance(connection, Session) else connection
    if conn.dialect.name != "postgresql":
        return False
    tables = (store or EventStore()).tables
    space = _advisory_lock_space(tables.names.projection_checkpoints)(name)
    return not conn.execute(_TRY_REBUILD_SHARED, {"lock_space": space}).scalar()


def lock_rebuild(
    connection: sa.Connection,
    name: str,
    *,
    store: EventStore | None = None,
    timeout: float | None = None,
) -> None:
    """Take projection ``name``'s rebuild lock for the connection's whole session
    (PostgreSQL; nothing elsewhere): until :func:`unlock_rebuild`, or until the
    connection ends, a killed process's included.

    Call it inside a transaction of its own (it commits; the lock outlives it). Every
    batch of the projection first tries the shared side of this lock without waiting,
    so this waits for the batches in hand, and from then on batches of processors with
    ``yields_to_rebuild`` set return at once like an idle poll. It keeps workers out
    of an online rebuild's way; their exactly-once effects never depend on it (batches
    and checkpoints are locked per partition as always). ``timeout`` bounds the wait,
    then :class:`~eventsource.errors.ProjectionBusyError`.
    """
    if connection.dialect.name != "postgresql":
        return
    busy = (
        f"projection {name!r} still had a batch in hand, or another rebuild of it was "
        f"running, after {timeout} s. Nothing was changed; try again, wait longer, or "
        "stop the workers."
    )
    _take_lock(connection, _REBUILD_LOCK, name, store, timeout, busy)


def unlock_rebuild(
    connection: sa.Connection, name: str, *, store: EventStore | None = None
) -> None:
    """Release the rebuild lock :func:`lock_rebuild` took on this connection."""
    if connection.dialect.name != "postgresql":
        return
    tables = (store or EventStore()).tables
    space = _advisory_lock_space(tables.names.projection_checkpoints)(name)
    connection.execute(_REBUILD_UNLOCK, {"lock_space": space})


def _take_lock(
    conn: sa.Connection,
    statement: sa.TextClause,
    name: str,
    store: EventStore | None,
    timeout: float | None,
    busy: str,
) -> None:
    """Run a lock ``statement`` of projection ``name``, waiting at most ``timeout``."""
    tables = (store or EventStore()).tables
    space = _advisory_lock_space(tables.names.projection_checkpoints)(name)
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise errors.ConfigurationError(f"timeout must be seconds > 0, got {timeout!r}")
        previous = conn.execute(sa.text("SELECT current_setting('lock_timeout')")).scalar()
        # lock_timeout 0 means "no limit": never round a short wait down to it.
        wait_ms = max(1, round(timeout * 1000))
        conn.execute(sa.text("SELECT set_config('lock_timeout', :v, true)"), {"v": f"{wait_ms}ms"})
    try:
        conn.execute(statement, {"lock_space": space})
    except sa.exc.OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
            raise errors.ProjectionBusyError(busy) from exc
        raise
    if timeout is not None:
        conn.execute(sa.text("SELECT set_config('lock_timeout', :v, true)"), {"v": previous})


_EXCLUSIVE_LOCK = sa.text("SELECT pg_advisory_xact_lock(:lock_space, :key)").bindparams(
    sa.bindparam("lock_space", type_=sa.Integer),
    sa.bindparam("key", value=_PROJECTION_LOCK_KEY, type_=sa.Integer),
)
_SHARED_LOCK = sa.text("SELECT pg_advisory_xact_lock_shared(:lock_space, :key)").bindparams(
    sa.bindparam("lock_space", type_=sa.Integer),
    sa.bindparam("key", value=_PROJECTION_LOCK_KEY, type_=sa.Integer),
)
_TRY_REBUILD_SHARED = sa.text(
    "SELECT pg_try_advisory_xact_lock_shared(:lock_space, :key)"
).bindparams(
    sa.bindparam("lock_space", type_=sa.Integer),
    sa.bindparam("key", value=_REBUILD_LOCK_KEY, type_=sa.Integer),
)
_TRY_PARTITION_LOCK = sa.text("SELECT pg_try_advisory_xact_lock(:lock_space, :key)").bindparams(
    sa.bindparam("lock_space", type_=sa.Integer), sa.bindparam("key", type_=sa.Integer)
)
# Shared side of the projection's lock first, then the partition's own: always in this
# order (the subquery with OFFSET 0 is evaluated first and is never flattened), so a
# reset queued on the projection's lock cannot close a cycle with two batches.
_BATCH_LOCK = sa.text(
    "SELECT pg_advisory_xact_lock(:lock_space, :key) FROM "
    "(SELECT pg_advisory_xact_lock_shared(:lock_space, :projection_key) OFFSET 0) AS projection"
).bindparams(
    sa.bindparam("lock_space", type_=sa.Integer),
    sa.bindparam("key", type_=sa.Integer),
    sa.bindparam("projection_key", value=_PROJECTION_LOCK_KEY, type_=sa.Integer),
)
# The same, for workers that step aside during an online rebuild: first the shared side
# of the rebuild lock, tried without waiting (a rebuild holds it for many transactions:
# waiting would hold a connection and fail batch timeouts). When it is taken the query
# returns no row and takes nothing else (the one-time filter stops it before the outer
# levels run). Never waiting on it, a batch closes no cycle with a rebuild, which takes
# it before anything else and waits only for the batches that hold its shared side.
_BATCH_LOCK_UNLESS_REBUILDING = sa.text(
    "SELECT pg_advisory_xact_lock(:lock_space, :key) FROM "
    "(SELECT pg_advisory_xact_lock_shared(:lock_space, :projection_key) FROM "
    "(SELECT 1 WHERE pg_try_advisory_xact_lock_shared(:lock_space, :rebuild_key) OFFSET 0) "
    "AS rebuild OFFSET 0) AS projection"
).bindparams(
    sa.bindparam("lock_space", type_=sa.Integer),
    sa.bindparam("key", type_=sa.Integer),
    sa.bindparam("projection_key", value=_PROJECTION_LOCK_KEY, type_=sa.Integer),
    sa.bindparam("rebuild_key", value=_REBUILD_LOCK_KEY, type_=sa.Integer),
)
_REBUILD_LOCK = sa.text("SELECT pg_advisory_lock(:lock_space, :key)").bindparams(
    sa.bindparam("lock_space", type_=sa.Integer),
    sa.bindparam("key", value=_REBUILD_LOCK_KEY, type_=sa.Integer),
)
_REBUILD_UNLOCK = sa.text("SELECT pg_advisory_unlock(:lock_space, :key)").bindparams(
    sa.bindparam("lock_space", type_=sa.Integer),
    sa.bindparam("key", value=_REBUILD_LOCK_KEY, type_=sa.Integer),
)


def _xid8(name: str) -> sa.ColumnElement[Any]:
    """A bound integer cast to xid8 (no cast from bigint exists, text does)."""
    return sa.cast(sa.cast(sa.bindparam(name, type_=sa.BigInteger), sa.Text), models._PGXid8())


class _Queries:
    """The statements one processor runs for one projection, built once."""

    def __init__(
        self,
        tables: models.Tables,
        dialect: str,
        projection: Projection,
        config: ProcessorConfig,
        claims_schema: bool = True,
    ) -> None:
        self.dialect = dialect
        ev = tables.events
        ck = tables.projection_checkpoints
        self._checkpoints = ck
        self._tables = tables
        self._is_pg = dialect == "postgresql"

        scope: list[sa.ColumnElement[bool]] = []
        if projection.aggregate_types:
            scope.append(ev.c.aggregate_type.in_(projection.aggregate_types))
        if projection.bounded_contexts:
            scope.append(ev.c.bounded_context.in_(projection.bounded_contexts))
        strategy = config.partition_strategy
        sql_partition = None
        sql_filter = getattr(strategy, "sql_filter", None)
        if sql_filter is not None:
            sql_partition = sql_filter(
                ev.c.partition_hash, config.partition_key, config.total_partitions
            )
        self.python_partition_filter = sql_filter is None and config.total_partitions > 1
        if sql_partition is not None:
            scope.append(sql_partition)

        columns = [ev.c[name] for name in EVENT_COLUMNS]
        if self._is_pg:
            after: sa.ColumnElement[bool] = sa.tuple_(
                ev.c.transaction_id, ev.c.global_position
            ) > sa.tuple_(_xid8("ck_tx"), sa.bindparam("ck_pos"))
            # Two index ranges instead of one range and a filter: with `tx < xmin OR
            # tx = own`, the scan could not stop at the horizon and every poll behind
            # an open transaction read all the rows committed after it. Rows below the
            # horizon, then (inside a caller's transaction that has written) its own
            # rows, which sort after them since own >= xmin there.
            # While the projection is resharded (eventsource.reshard), no further than
            # its boundary; otherwise the bound is the largest (transaction, position).
            # Scalar bounds on the transaction id, not a row comparison: the index scan
            # then starts at the tighter of it and the horizon (a backward scan given
            # both as bounds it cannot compare would walk the rows waiting above it).
            until = sa.and_(
                ev.c.transaction_id <= _xid8("stop_tx"),
                sa.or_(
                    ev.c.transaction_id < _xid8("stop_tx"),
                    ev.c.global_position <= sa.bindparam("stop_pos"),
                ),
            )
            readable = sa.and_(ev.c.transaction_id < _xid8("xmin"), until)
            own = sa.and_(ev.c.transaction_id == _xid8("own"), until)
            order = [ev.c.transaction_id, ev.c.global_position]
            newest = [column.desc() for column in order]
            self.batch = self._range(columns, ev.c.transaction_id, [after, readable], scope, order)
            self.batch_with_own: sa.Select[Any] | sa.CompoundSelect[Any] = _union(
                self._range(columns, ev.c.transaction_id, [after, readable], scope, order),
                self._range(columns, ev.c.transaction_id, [after, own], scope, order),
                ascending=True,
            )
            self.horizon: sa.Select[Any] | sa.CompoundSelect[Any] | None = None
            self.horizon_with_own: sa.Select[Any] | sa.CompoundSelect[Any] | None = None
            if scope:
                # The newest readable row, found from the horizon downwards. Split at
                # the checkpoint's transaction: a backward scan does not stop at a row
                # comparison's second column, so one range would walk every row of a
                # large transaction (a bulk import) on each idle poll.
                tx_pos = [ev.c.transaction_id, ev.c.global_position]
                later = ev.c.transaction_id > _xid8("ck_tx")
                same = (ev.c.transaction_id == _xid8("ck_tx")) & (
                    ev.c.global_position > sa.bindparam("ck_pos")
                )
                self.horizon = _union(
                    self._range(tx_pos, None, [later, readable], [], newest, 1),
                    self._range(tx_pos, None, [same, readable], [], newest, 1),
                    ascending=False,
                )
                self.horizon_with_own = _union(
                    self._range(tx_pos, None, [later, readable], [], newest, 1),
                    self._range(tx_pos, None, [same, readable], [], newest, 1),
                    self._range(tx_pos, None, [after, own], [], newest, 1),
                    ascending=False,
                )
        else:
            after = sa.and_(
                ev.c.global_position > sa.bindparam("ck_pos"),
                ev.c.global_position <= sa.bindparam("stop_pos"),
            )
            zero = sa.literal(0, sa.BigInteger)
            order = [ev.c.global_position]
            self.batch = self._range(columns, zero, [after], scope, order)
            self.batch_with_own = self.batch
            self.horizon = None
            if scope:
                self.horizon = self._range(
                    [zero, ev.c.global_position], None, [after], [], [order[0].desc()], 1
                )
            self.horizon_with_own = self.horizon

        self.blocked = None
        if self._is_pg:
            # Any committed row still after the checkpoint, not only those behind the
            # current horizon: the horizon may have moved since the batch took its own
            # (the blocking transaction ended in between), and those rows, readable now,
            # still need the next batch.
            self.blocked = sa.select(
                sa.exists().where(
                    after,
                    until,
                    ev.c.global_position <= sa.bindparam("target"),
                    # Inside a caller's transaction (tests, rebuilds), rows of its own and
                    # of newer transactions cannot become readable before it ends: they are
                    # left to later runs, which read them after it (nothing is skipped).
                    sa.func.coalesce(
                        ev.c.transaction_id < sa.func.pg_current_xact_id_if_assigned(), True
                    ),
                )
            )

        key = (ck.c.projection_name == sa.bindparam("name")) & (
            ck.c.partition_key == sa.bindparam("key")
        )
        claims = tables.partition_claims
        # A store not yet at es0006 has no boundary and no claims: unclaimed processors
        # run on it as before (upgrades need no particular order).
        none = [sa.null()] * 5
        checkpoint_columns: list[sa.ColumnElement[Any]] = [
            ck.c.total_partitions,
            ck.c.transaction_id,
            ck.c.global_position,
            *(
                [
                    ck.c.stop_transaction_id,
                    ck.c.stop_global_position,
                    # The partition's claim (eventsource.claims), for a claimed
                    # partition's fence.
                    claims.c.owner,
                    claims.c.epoch,
                    claims.c.total_partitions,
                ]
                if claims_schema
                else none
            ),
        ]
        if self._is_pg:
            snapshot = sa.func.pg_snapshot_xmin(sa.func.pg_current_snapshot())
            checkpoint_columns.append(sa.cast(snapshot, sa.Text))
            # Set only when the caller's transaction had already written (tests, rebuilds).
            checkpoint_columns.append(sa.cast(sa.func.pg_current_xact_id_if_assigned(), sa.Text))
            # A checkpoint ahead of the server's counter: restored into another cluster
            # while this worker ran (checked fully at start-up; here for free).
            next_id = sa.func.pg_snapshot_xmax(sa.func.pg_current_snapshot())
            checkpoint_columns.append(sa.cast(next_id, sa.Text))
            # The newest event id (one index lookup): restored rows ahead of the server
            # stop a worker that kept running through a restore at once, before its
            # checkpoint moves onto rows written after it.
            newest_id = sa.select(sa.func.max(ev.c.transaction_id)).scalar_subquery()
            checkpoint_columns.append(sa.cast(newest_id, sa.Text))
            # The 32-bit id of the transaction that last wrote the checkpoint row: a
            # checkpoint id above it was restored from another cluster, even once this
            # server's counter has passed it (see eventsource.cluster).
            written_by = sa.column("xmin", sa.Text, _selectable=ck)
            checkpoint_columns.append(sa.cast(written_by, sa.Text))
            # For the store's horizon (horizon.py): which store this is (the events
            # table this connection's search_path finds), which server lifetime (a
            # horizon cached across a crash or a failover is thrown away), and whether
            # the batch's statements each take a fresh snapshot (READ COMMITTED).
            checkpoint_columns.append(horizon.store_identity(tables.names))
            checkpoint_columns.append(
                sa.func.current_setting("transaction_isolation") == "read committed"
            )
        joined = ck.outerjoin(
            claims,
            (claims.c.projection_name == ck.c.projection_name)
            & (claims.c.partition_key == ck.c.partition_key),
        )
        self._read_checkpoint = (
            sa.select(*checkpoint_columns).select_from(joined if claims_schema else ck).where(key)
        )
        # Where a worker stepping aside for a rebuild stands (an idle poll's result).
        self._peek_checkpoint = sa.select(ck.c.transaction_id, ck.c.global_position).where(key)
        # Two processes on the same projection partition queue on this lock instead of
        # both advancing it (SQLite: BEGIN IMMEDIATE already serialises the batch). An
        # advisory lock, not SELECT ... FOR UPDATE: a row lock gives the transaction an
        # id, so every idle poll would be a write transaction (WAL, fsync at commit) and
        # every batch would hold the reading horizon of all projections from its start.
        # Its own statement: the checkpoint must be read by a snapshot taken after the
        # lock is granted, or it could miss the previous holder's update (hence also
        # READ COMMITTED, see read_committed()).
        self._lock_space = _advisory_lock_space(tables.names.projection_checkpoints)
        insert = postgresql.insert(ck) if self._is_pg else sqlite.insert(ck)
        self._create_checkpoint = insert.values(
            projection_name=sa.bindparam("name"),
            partition_key=sa.bindparam("key"),
            total_partitions=sa.bindparam("total"),
            updated_at=sa.bindparam("now"),
        ).on_conflict_do_nothing()
        self.update_checkpoint = (
            ck.update()
            .where(key)
            .values(
                transaction_id=sa.bindparam("tx"),
                global_position=sa.bindparam("pos"),
                events_handled=ck.c.events_handled + sa.bindparam("handled"),
                updated_at=sa.bindparam("now"),
            )
        )

    @staticmethod
    def _range(
        columns: list[Any],
        extra: sa.ColumnElement[Any] | None,
        bounds: list[sa.ColumnElement[bool]],
        scope: list[sa.ColumnElement[bool]],
        order: list[Any],
        limit: int | None = None,
    ) -> sa.Select[Any]:
        selected = [*columns, extra] if extra is not None else columns
        query = sa.select(*selected).where(*bounds, *scope).order_by(*order)
        return query.limit(limit if limit is not None else sa.bindparam("limit"))

    def lock_projection(self, session: Session, name: str) -> None:
        """The projection's exclusive lock (see :func:`lock_projection`)."""
        if self._is_pg:
            session.execute(_EXCLUSIVE_LOCK, {"lock_space": self._lock_space(name)})

    def create_checkpoint(self, session: Session, name: str, config: ProcessorConfig) -> None:
        session.execute(
            self._create_checkpoint,
            {
                "name": name,
                "key": config.partition_key,
                "total": config.total_partitions,
                "now": datetime.now(UTC),
            },
        )

    def lock_checkpoint(
        self,
        session: Session,
        name: str,
        config: ProcessorConfig,
        *,
        lock: bool = True,
        yield_to_rebuild: bool = False,
        fence: tuple[str, int] | None = None,
    ) -> _Checkpoint | None:
        """Lock the partition (shared lock on the projection first) and read its
        checkpoint; None when it has no checkpoint row. With ``yield_to_rebuild``,
        raises ``_Rebuilding`` (having locked nothing) while an online rebuild runs.
        With ``fence`` (a claimed partition's owner and epoch), raises
        PartitionLostError when the partition's claim has changed hands: claims change
        only under the partition's lock, so it cannot change before the batch ends."""
        params = {"name": name, "key": config.partition_key}
        if lock and self._is_pg and yield_to_rebuild:
            space = {"lock_space": self._lock_space(name)}
            if session.execute(_BATCH_LOCK_UNLESS_REBUILDING, {**space, **params}).first() is None:
                at = session.execute(self._peek_checkpoint, params).first()
                raise _Rebuilding(*((int(at[0]), int(at[1])) if at is not None else (0, 0)))
        elif lock and self._is_pg:
            session.execute(_BATCH_LOCK, {"lock_space": self._lock_space(name), **params})
        found = session.execute(self._read_checkpoint, params).first()
        if found is None:
            return None
        if found[0] != config.total_partitions:
            raise errors.PartitionCountChangedError(
                f"projection {name!r} partition {config.partition_key} was checkpointed with "
                f"total_partitions={found[0]}, this processor uses {config.total_partitions}: "
                f"it was resharded or rebuilt meanwhile. Restart its workers with "
                f"total_partitions={found[0]} (--total-partitions {found[0]}); claiming "
                "workers follow it by themselves"
            )
        stop = None if found[3] is None else (int(found[3]), int(found[4]))
        if fence is not None and (
            (found[5], found[6], found[7]) != (fence[0], fence[1], config.total_partitions)
        ):
            raise errors.PartitionLostError(
                f"projection {name!r} partition {config.partition_key}: this worker's lease "
                f"(epoch {fence[1]}) passed to "
                f"{'another worker' if found[5] else 'no one'} while it was paused, cut "
                "off or late to renew it; nothing was committed, the new owner carries on"
            )
        row = (found[0], found[1], found[2], *found[8:])
        if not self._is_pg:
            return _Checkpoint(int(row[1]), int(row[2]), None, stop=stop)
        own = int(row[4]) if row[4] is not None else None
        # The snapshot's xmax follows the last completed transaction; the caller's own
        # (tests, rebuilds) may be at or above it.
        next_id = max(int(row[5]), (own or 0) + 1)
        if (
            int(row[1]) >= next_id
            or (row[6] is not None and int(row[6]) >= next_id)
            or int(row[1]) > _full_transaction_id(int(row[7]), next_id)
        ):
            cluster.check(session.connection(), self._tables, record=False)
            raise errors.TransactionIdsAheadError(
                cluster.ahead_message(f"the stored ids read by projection {name!r}", next_id)
            )
        newest = int(row[6]) if row[6] is not None else None
        return _Checkpoint(
            int(row[1]),
            int(row[2]),
            int(row[3]),
            own,
            newest,
            next_id=next_id,
            store_identity=str(row[8]),
            read_committed=bool(row[9]),
            stop=stop,
        )


def _full_transaction_id(xid32: int, next_id: int) -> int:
    """The 64-bit id of a row's 32-bit ``xmin``: the one within 2**31 below ``next_id``."""
    back = (next_id - xid32) % 2**32
    return next_id - back + (2**32 if back >= 2**31 else 0)


def _union(*selects: sa.Select[Any], ascending: bool) -> sa.CompoundSelect[Any]:
    union = sa.union_all(*selects)
    tx, pos = union.selected_columns.transaction_id, union.selected_columns.global_position
    order = [tx, pos] if ascending else [tx.desc(), pos.desc()]
    limit: Any = sa.bindparam("limit") if ascending else 1
    return union.order_by(*order).limit(limit)


def _wake_filter(projection: Projection, config: ProcessorConfig) -> Callable[[wakeups.Hint], bool]:
    """Whether a hint names an append this partition could read: its bounded contexts,
    aggregate types and (with the hash strategy, whose hash the hint carries) partition.
    Other strategies are woken by every append of their scope."""
    contexts = frozenset(projection.bounded_contexts)
    types = frozenset(projection.aggregate_types)
    total, key = config.total_partitions, config.partition_key
    by_hash = type(config.partition_strategy) is HashPartitionStrategy and total > 1

    def matches(hint: wakeups.Hint) -> bool:
        return any(
            (not contexts or context in contexts)
            and (not types or aggregate_type in types)
            and (not by_hash or partition_hash % total == key)
            for context, aggregate_type, partition_hash in hint.appended
        )

    return matches


def _quarantines(projection: Projection) -> bool:
    """Whether ``projection.on_error`` quarantines (it may be set per instance: checked)."""
    quarantines = getattr(projection.on_error, "quarantines", None)
    if not isinstance(quarantines, bool):
        raise errors.ConfigurationError(
            f"{type(projection).__qualname__}.on_error must be an eventsource.OnError "
            f"(STOP, QUARANTINE or QUARANTINE_AGGREGATE), got {projection.on_error!r}"
        )
    return quarantines
