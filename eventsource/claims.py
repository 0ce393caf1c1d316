"""Claimed partitions: identical workers share a projection's partitions through the database.

A processor with ``ProcessorConfig(total_partitions=N, claim=True)`` (``eventsource run
--total-partitions N`` without ``--partition-key``) runs no fixed partition. Its
coordinator, in the thread that called :meth:`~eventsource.Processor.run`, keeps two
kinds of rows up to date every third of the lease (``ProcessorConfig.lease``):

- its own row in ``<events>_partition_workers``, with a lease: the live workers of the
  projection are those whose lease has not expired;
- the rows of ``<events>_partition_claims`` it owns (one per partition: owner, epoch,
  lease), renewed together.

Each worker aims at a fair share: N divided by the live workers, the first ``N % live``
of them (in worker-id order) taking one more. A worker above its share stops the
batches of its extra partitions (the batch in hand commits) and releases them; a
worker below it claims free partitions, or those whose lease expired because their
worker died, was paused or was cut off. Each claimed partition runs as an ordinary
:class:`~eventsource.Processor` in a thread of its own. A stopped worker releases its
partitions at once, so the others take them over at their next heartbeat; a killed one
loses them when its lease expires, and the others look again right then.

**Fencing.** A claim changes hands only in a transaction that holds the partition's
advisory lock, the one every batch of the partition holds from its first statement to
its commit; and every batch, once it holds that lock, reads the partition's claim and
rolls back with :class:`~eventsource.errors.PartitionLostError` unless the owner, the
epoch (it grows with every change of owner) and the partition count are still those
its worker claimed with. So a batch either commits before the new owner's claim does,
or sees that claim and commits nothing: a worker that lost its lease (paused past it by
SIGSTOP or a long GC, cut off from the database) never commits a batch for a partition
that now belongs to someone else. Exactly-once effects rest, as always, on the
partition's lock and checkpoint; the leases only decide who works.

**Time** is the database server's clock (``clock_timestamp()``) on PostgreSQL, so
workers on machines whose clocks disagree still agree on when a lease expires. SQLite
(workers on one machine) uses the local clock.

The claims follow the projection's checkpoints: when :func:`eventsource.reshard` (or a
rebuild with another count) changes the partition count, running workers adopt the new
count and share its partitions. A worker *started* with a count that differs from the
checkpoints' is refused, as ever (PartitionCountChangedError).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from eventsource import errors, retry
from eventsource.processor import (
    Processor,
    _ms,
    _Stopped,
    lock_projection_shared,
    partition_counts,
    try_lock_partition,
)
from eventsource.projection import Projection
from eventsource.retry import Retrier
from eventsource.store import EventStore, SessionOrConnection, connection_of

logger = logging.getLogger("eventsource.claims")

#: A partition whose lease expires this soon after the coordinator's wake-up is looked
#: at again right after it (seconds), not a whole heartbeat later.
_EXPIRY_SLACK = 0.05

_worker_ids: dict[int, str] = {}
_worker_ids_lock = threading.Lock()


def worker_id() -> str:
    """This process's worker id in the claims: host, pid and a random suffix.

    One per process (a forked child gets its own), shared by every claimed projection
    the process runs; shown by ``eventsource status``.
    """
    pid = os.getpid()
    with _worker_ids_lock:
        found = _worker_ids.get(pid)
        if found is None:
            found = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:6]}"
            _worker_ids[pid] = found
        return found


@dataclass(frozen=True, slots=True)
class PartitionClaim:
    """One partition of a claimed projection, and who holds its lease."""

    projection: str
    partition_key: int
    total_partitions: int
    owner: str | None
    """The worker holding the lease (None: free)."""
    epoch: int
    """Grows with every change of owner; batches commit only under their claim's epoch."""
    claimed_at: datetime | None
    renewed_at: datetime | None
    lease_expires_at: datetime | None
    lease_age_seconds: float | None
    """Seconds since the owner last renewed the lease (None: free)."""
    expired: bool
    """The lease ran out: any worker may take the partition over."""


def partition_claims(
    conn: SessionOrConnection, *, store: EventStore | None = None, projection: str | None = None
) -> list[PartitionClaim]:
    """Every claimed partition (of one projection, when named), with its lease's state."""
    connection = connection_of(conn)
    tables = (store or EventStore()).tables
    table = tables.partition_claims
    query = sa.select(table).order_by(table.c.projection_name, table.c.partition_key)
    if projection is not None:
        query = query.where(table.c.projection_name == projection)
    now = _db_now(connection)
    found = []
    for row in connection.execute(query).mappings():
        expires = row["lease_expires_at"]
        renewed = row["renewed_at"]
        owner = row["owner"]
        found.append(
            PartitionClaim(
                projection=row["projection_name"],
                partition_key=int(row["partition_key"]),
                total_partitions=int(row["total_partitions"]),
                owner=owner,
                epoch=int(row["epoch"]),
                claimed_at=row["claimed_at"],
                renewed_at=renewed,
                lease_expires_at=expires,
                lease_age_seconds=(
                    None
                    if owner is None or renewed is None
                    else max(0.0, (now - renewed).total_seconds())
                ),
                expired=owner is not None and (expires is None or expires <= now),
            )
        )
    return found


def run_claimed(processor: Processor, projection: Projection) -> None:
    """``processor.run(projection)`` for ``claim=True``: until ``processor.stop()``."""
    if processor.engine is None:
        raise errors.ConfigurationError(
            "claim=True needs a Processor on an Engine (or a sessionmaker bound to one): "
            "claimed partitions commit their own batches and leases"
        )
    from eventsource.runner import ProjectionRunner, _check_pool_sizes  # it imports processor

    _check_pool_sizes([ProjectionRunner(projection, processor)])
    _Coordinator(processor, projection).run()


@dataclass(slots=True)
class _Partition:
    """A claimed partition this worker runs: its processor and thread."""

    key: int
    epoch: int
    processor: Processor
    thread: threading.Thread | None = None
    ended: str | None = None
    """Why its thread returned early: "lost" or "recount" (None: running, or stopped)."""


class _Coordinator:
    """Keeps one worker's leases and runs the partitions it holds."""

    def __init__(self, parent: Processor, projection: Projection) -> None:
        self.parent = parent
        self.projection = projection
        self.name = projection.checkpoint_name
        self.tables = parent.store.tables
        self.worker = parent.worker_id or worker_id()
        self.total = parent.config.total_partitions
        self.lease = float(parent.config.lease)
        self.running: dict[int, _Partition] = {}
        self.failures: list[BaseException] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.fields = {
            "projection": self.name,
            "total_partitions": self.total,
            "worker_id": self.worker,
        }

    # -- the loop -----------------------------------------------------------------

    def run(self) -> None:
        parent = self.parent
        retrier = Retrier(parent.config.retry, f"projection {self.name!r} (claims)")
        parent._stop_listeners.append(self.wake.set)
        logger.info(
            "projection %s: worker %s shares its %d partitions with the other workers "
            "(lease %.1f s)",
            self.name,
            self.worker,
            self.total,
            self.lease,
            extra=self.fields,
        )
        try:
            parent._retrying(self.projection, retrier, self._check_start)
            while not parent.stopping:
                wait = parent._retrying(self.projection, retrier, self._heartbeat)
                self._raise_failure()
                self.wake.wait(wait)
                self.wake.clear()
                self._raise_failure()
        except _Stopped:
            pass
        finally:
            parent._stop_listeners.remove(self.wake.set)
            self._stop_partitions(list(self.running))
            try:
                self._leave()
            except sa.exc.DBAPIError as exc:  # the leases expire by themselves
                logger.warning(
                    "projection %s: could not release the partitions of worker %s (%s); "
                    "the others take them over when the lease expires",
                    self.name,
                    self.worker,
                    retry.describe(exc),
                    extra=self.fields,
                )
            parent._stop.clear()
            logger.info(
                "projection %s: worker %s stopped", self.name, self.worker, extra=self.fields
            )
        self._raise_failure()

    def _check_start(self) -> None:
        """Follow the count the checkpoints use when it is not this worker's (a reshard
        changed it: a restart must not change it back, nor be refused), then create the
        checkpoints that are missing."""
        with self._transaction() as session:
            counted = self._partition_count(session)
        if counted is not None and counted != self.total:
            logger.warning(
                "projection %s has %d partitions (resharded), not the %d this worker was "
                "started with: it shares those %d. Start workers with --total-partitions "
                "%d (total_partitions=%d) from now on.",
                self.name,
                counted,
                self.total,
                counted,
                counted,
                counted,
                extra=self.fields,
            )
            self.total = counted
            self.fields["total_partitions"] = counted
        config = dataclasses.replace(self.parent.config, total_partitions=self.total)
        Processor(self.parent._given, self.parent.store, config).check_partitions(self.projection)

    def _raise_failure(self) -> None:
        with self.lock:
            failure = self.failures[0] if self.failures else None
        if failure is not None:
            raise failure

    def _heartbeat(self) -> float:
        """Renew this worker's leases, then rebalance; seconds until the next heartbeat."""
        with self._transaction() as session:
            now = _db_now(session.connection())
            counted = self._partition_count(session)
            if counted is None or counted == self.total:
                rows = self._rows(session)
                if {row.total for row in rows} != {self.total} or len(rows) != self.total:
                    self._sync_rows(session)
                    rows = self._rows(session)
            self._renew_member(session, now)
            held = self._renew_claims(session, now)
            live, expiring = self._live_workers(session, now)
        if counted is not None and counted != self.total:
            self._adopt(counted)
            return _EXPIRY_SLACK  # and share the new partitions at once
        # Partitions whose lease passed to another worker, or whose thread ended.
        for key, partition in list(self.running.items()):
            alive = partition.thread is not None and partition.thread.is_alive()
            if held.get(key) != partition.epoch or not alive:
                self._stop_partitions([key])
        for key, epoch in held.items():
            if key not in self.running:  # held, but its thread ended: run it again
                self._start(key, epoch)
        share = fair_share(self.total, live, self.worker)
        mine = sorted(self.running)
        if len(mine) > share:
            extra = mine[share:]
            self._stop_partitions(extra, release=True)
            logger.info(
                "projection %s: worker %s released partitions %s (its share is %d of %d, "
                "%d worker(s))",
                self.name,
                self.worker,
                _keys(extra),
                share,
                self.total,
                len(live),
                extra=self.fields,
            )
        # Look again when the next lease of another worker runs out (a dead worker's:
        # live ones renew theirs long before), not a whole heartbeat later.
        wait = self.lease / 3
        if expiring is not None:
            wait = min(wait, expiring + _EXPIRY_SLACK)
        if len(mine) < share:
            free, claim_expiring = _free_partitions(rows, now, self.worker)
            # Workers start at different places, so they rarely race for one partition.
            start = live.index(self.worker) * self.total // max(1, len(live))
            free.sort(key=lambda key: (key - start) % self.total)
            taken = []
            for key in free:
                if len(self.running) >= share:
                    break
                claimed = self._claim(key)
                if claimed is not None:
                    self._start(key, claimed)
                    taken.append(key)
            if taken:
                logger.info(
                    "projection %s: worker %s claimed partitions %s (its share is %d of %d, "
                    "%d worker(s))",
                    self.name,
                    self.worker,
                    _keys(taken),
                    share,
                    self.total,
                    len(live),
                    extra=self.fields,
                )
            if len(self.running) < share and claim_expiring is not None:
                wait = min(wait, claim_expiring + _EXPIRY_SLACK)
            if len(self.running) < share:
                # Others release their extra partitions at their own heartbeats: look
                # again soon rather than a whole heartbeat later.
                wait = min(wait, self.lease / 10)
        return max(wait, _EXPIRY_SLACK)

    # -- partitions -----------------------------------------------------------------

    def _start(self, key: int, epoch: int) -> None:
        parent = self.parent
        config = dataclasses.replace(
            parent.config, claim=False, partition_key=key, total_partitions=self.total
        )
        processor = Processor(parent._given, parent.store, config, metrics=parent.metrics)
        processor.fence = (self.worker, epoch)
        processor.checks_partitions_at_start = False
        processor.warn_on_own_transaction = parent.warn_on_own_transaction
        processor.read_own_transaction = parent.read_own_transaction
        processor.yields_to_rebuild = parent.yields_to_rebuild
        partition = _Partition(key, epoch, processor)
        partition.thread = threading.Thread(
            target=self._run_partition,
            args=(partition,),
            name=f"eventsource:{self.projection.name}:{key}",
            daemon=True,
        )
        self.running[key] = partition
        partition.thread.start()

    def _run_partition(self, partition: _Partition) -> None:
        try:
            partition.processor.run(self.projection, handle_signals=False)
        except errors.PartitionLostError as exc:
            partition.ended = "lost"
            logger.warning("%s", exc, extra={**self.fields, "partition": partition.key})
            self.wake.set()
        except errors.PartitionCountChangedError:
            # Resharded or rebuilt with another count: the heartbeat adopts it.
            partition.ended = "recount"
            self.wake.set()
        except BaseException as exc:
            with self.lock:
                self.failures.append(exc)
            self.parent.stop()

    def _stop_partitions(self, keys: Iterable[int], *, release: bool = False) -> None:
        """Stop these partitions' processors; each commits its batch in hand first. With
        ``release``, each partition is released as soon as its processor has stopped.

        A batch may outlast the lease: meanwhile the leases are renewed, so the wait
        costs this worker none of its other partitions, and a partition stopped at once
        does not wait for a slow one to be released."""
        stopping = [self.running.pop(key) for key in keys if key in self.running]
        for partition in stopping:
            partition.processor.stop()
        while stopping:
            for partition in list(stopping):
                assert partition.thread is not None
                partition.thread.join(0.01)
                if not partition.thread.is_alive():
                    stopping.remove(partition)
                    if release:
                        self._release([partition.key])
            if not stopping:
                break
            stopping[0].thread.join(self.lease / 3)  # type: ignore[union-attr]
            if any(p.thread is not None and p.thread.is_alive() for p in stopping):
                try:
                    with self._transaction() as session:
                        now = _db_now(session.connection())
                        self._renew_member(session, now)
                        self._renew_claims(session, now)
                except sa.exc.DBAPIError as exc:  # the next heartbeat retries
                    logger.debug("could not renew while stopping: %s", exc)

    def _adopt(self, total: int) -> None:
        """The checkpoints now use ``total`` partitions (a reshard, or a rebuild)."""
        logger.info(
            "projection %s: its partition count changed from %d to %d (resharded or "
            "rebuilt); worker %s now shares the %d new partitions",
            self.name,
            self.total,
            total,
            self.worker,
            total,
            extra=self.fields,
        )
        self._stop_partitions(list(self.running))
        self._leave(member=False)
        self.total = total
        self.fields["total_partitions"] = total
        from eventsource.runner import ProjectionRunner, _check_pool_sizes

        try:
            _check_pool_sizes(
                [
                    ProjectionRunner(
                        self.projection,
                        Processor(
                            self.parent._given,
                            self.parent.store,
                            dataclasses.replace(self.parent.config, total_partitions=total),
                        ),
                    )
                ]
            )
        except errors.ConfigurationError as exc:
            logger.warning(
                "projection %s: %s. Until the engine is made larger, batches may wait for "
                "connections",
                self.name,
                exc,
                extra=self.fields,
            )

    # -- statements -----------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        """A coordinator transaction. On PostgreSQL it never waits long for a lock (a
        lock held by a paused worker's transaction fails it, and it is retried), and a
        pause of this worker inside it ends its session after a lease, releasing what
        it locked, instead of holding up the others until it resumes."""
        with self.parent._sessions() as session, session.begin():
            if session.get_bind().dialect.name == "postgresql":
                session.execute(
                    _COORDINATOR_TIMEOUTS,
                    {"lock": _ms(self.lease / 3), "idle": _ms(self.lease)},
                )
            yield session

    def _partition_count(self, session: Session) -> int | None:
        """The count the projection's checkpoints use (None: none, or several)."""
        totals = partition_counts(session, self.tables, self.name)
        return totals.pop() if len(totals) == 1 else None

    def _rows(self, session: Session) -> list[_Row]:
        table = self.tables.partition_claims
        query = sa.select(
            table.c.partition_key,
            table.c.total_partitions,
            table.c.owner,
            table.c.lease_expires_at,
        ).where(table.c.projection_name == self.name)
        return [_Row(int(r[0]), int(r[1]), r[2], r[3]) for r in session.execute(query)]

    def _sync_rows(self, session: Session) -> None:
        """Give the projection one claim row per partition of the current count.

        Under the shared side of the projection's lock, the one a reshard takes
        exclusively when it rewrites the rows: the count read here is then the one the
        rows must have. Nothing else is locked before it (no cycle with a reshard).
        """
        lock_projection_shared(session, self.name, store=self.parent.store)
        counted = self._partition_count(session)
        if counted is not None and counted != self.total:
            return  # resharded meanwhile: the next heartbeat adopts the new count
        table = self.tables.partition_claims
        session.execute(
            table.delete().where(
                table.c.projection_name == self.name,
                (table.c.total_partitions != self.total) | (table.c.partition_key >= self.total),
            )
        )
        session.execute(
            _insert(session, table)
            .values(
                [
                    {
                        "projection_name": self.name,
                        "partition_key": key,
                        "total_partitions": self.total,
                        "epoch": 0,
                    }
                    for key in range(self.total)
                ]
            )
            .on_conflict_do_nothing()
        )

    def _renew_member(self, session: Session, now: datetime) -> None:
        table = self.tables.partition_workers
        expires = now + timedelta(seconds=self.lease)
        expired = (
            sa.select(table.c.worker_id)
            .where(table.c.projection_name == self.name, table.c.lease_expires_at <= now)
            .with_for_update(skip_locked=True)  # a paused worker may hold its row
        )
        session.execute(
            table.delete().where(
                table.c.projection_name == self.name, table.c.worker_id.in_(expired)
            )
        )
        insert = _insert(session, table).values(
            projection_name=self.name,
            worker_id=self.worker,
            started_at=now,
            renewed_at=now,
            lease_expires_at=expires,
        )
        session.execute(
            insert.on_conflict_do_update(
                index_elements=[table.c.projection_name, table.c.worker_id],
                set_={"renewed_at": now, "lease_expires_at": expires},
            )
        )

    def _renew_claims(self, session: Session, now: datetime) -> dict[int, int]:
        """Renew every lease this worker holds; its partitions and their epochs.

        A lease that expired but was not taken over is renewed too: no other worker
        committed anything for it meanwhile.
        """
        table = self.tables.partition_claims
        renewed = session.execute(
            table.update()
            .where(
                table.c.projection_name == self.name,
                table.c.owner == self.worker,
                table.c.total_partitions == self.total,
            )
            .values(renewed_at=now, lease_expires_at=now + timedelta(seconds=self.lease))
            .returning(table.c.partition_key, table.c.epoch)
        )
        return {int(key): int(epoch) for key, epoch in renewed}

    def _live_workers(self, session: Session, now: datetime) -> tuple[list[str], float | None]:
        """The live workers (sorted), and seconds until the first other one's lease ends."""
        table = self.tables.partition_workers
        rows = session.execute(
            sa.select(table.c.worker_id, table.c.lease_expires_at)
            .where(table.c.projection_name == self.name, table.c.lease_expires_at > now)
            .order_by(table.c.worker_id)
        ).all()
        live = [str(row[0]) for row in rows]
        others = [(row[1] - now).total_seconds() for row in rows if row[0] != self.worker]
        if self.worker not in live:  # just renewed: only a clock jump could hide it
            live = sorted([*live, self.worker])
        return live, min(others, default=None)

    def _claim(self, key: int) -> int | None:
        """Take partition ``key`` if it is free or its lease expired; its new epoch.

        Under the partition's lock, tried without waiting: a batch of the previous owner
        still in hand (a paused worker inside a transaction) keeps it until it ends.
        """
        table = self.tables.partition_claims
        with self._transaction() as session:
            if not try_lock_partition(session, self.name, key, store=self.parent.store):
                return None
            now = _db_now(session.connection())
            claimable = (
                (table.c.projection_name == self.name)
                & (table.c.partition_key == key)
                & (table.c.total_partitions == self.total)
                & (
                    table.c.owner.is_(None)
                    | table.c.lease_expires_at.is_(None)
                    | (table.c.lease_expires_at <= now)
                )
            )
            # Its row may be locked by the owner's heartbeat, paused in it: try later.
            row = (
                sa.select(table.c.partition_key).where(claimable).with_for_update(skip_locked=True)
            )
            if session.execute(row).first() is None:
                return None
            claimed = session.execute(
                table.update()
                .where(claimable)
                .values(
                    owner=self.worker,
                    epoch=table.c.epoch + 1,
                    claimed_at=now,
                    renewed_at=now,
                    lease_expires_at=now + timedelta(seconds=self.lease),
                )
                .returning(table.c.epoch)
            ).scalar()
        return None if claimed is None else int(claimed)

    def _release(self, keys: list[int]) -> None:
        table = self.tables.partition_claims
        with self._transaction() as session:
            session.execute(
                table.update()
                .where(
                    table.c.projection_name == self.name,
                    table.c.partition_key.in_(keys),
                    table.c.owner == self.worker,
                )
                .values(owner=None, renewed_at=None, lease_expires_at=None)
            )

    def _leave(self, *, member: bool = True) -> None:
        """Release every partition this worker holds (and its membership)."""
        claims = self.tables.partition_claims
        workers = self.tables.partition_workers
        with self._transaction() as session:
            session.execute(
                claims.update()
                .where(claims.c.projection_name == self.name, claims.c.owner == self.worker)
                .values(owner=None, renewed_at=None, lease_expires_at=None)
            )
            if member:
                session.execute(
                    workers.delete().where(
                        workers.c.projection_name == self.name,
                        workers.c.worker_id == self.worker,
                    )
                )


@dataclass(frozen=True, slots=True)
class _Row:
    key: int
    total: int
    owner: str | None
    expires: datetime | None


def fair_share(total: int, live: list[str], worker: str) -> int:
    """How many of ``total`` partitions ``worker`` should hold among the ``live`` ones
    (sorted): an equal share, the first ``total % len(live)`` taking one more."""
    if worker not in live:
        return 0
    base, extra = divmod(total, len(live))
    return base + (1 if live.index(worker) < extra else 0)


def _free_partitions(
    rows: list[_Row], now: datetime, worker: str
) -> tuple[list[int], float | None]:
    """Partitions free to claim now, and seconds until the next lease of another
    worker expires (None: none held)."""
    free = []
    expiring: float | None = None
    for row in rows:
        if row.owner == worker:
            continue
        if row.owner is None or row.expires is None or row.expires <= now:
            free.append(row.key)
        else:
            left = (row.expires - now).total_seconds()
            expiring = left if expiring is None else min(expiring, left)
    return free, expiring


_COORDINATOR_TIMEOUTS = sa.text(
    "SELECT set_config('lock_timeout', :lock, true), "
    "set_config('idle_in_transaction_session_timeout', :idle, true)"
)


def _db_now(conn: sa.Connection) -> datetime:
    """The time leases are measured in: the PostgreSQL server's clock, which every
    worker shares whatever its own says; the local clock on SQLite."""
    if conn.dialect.name == "postgresql":
        found: datetime = conn.execute(sa.select(sa.func.clock_timestamp())).scalar_one()
        return found.astimezone(UTC)
    return datetime.now(UTC)


def _insert(session: Session, table: sa.Table) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _keys(keys: Iterable[int]) -> str:
    return ", ".join(str(key) for key in sorted(keys))
