"""Every error the library raises derives from :class:`EventSourceError`.

::

    EventSourceError
    ├── ValidationError (also ValueError)      bad input; nothing was written
    │   └── DuplicateEventError                an event id is already stored or repeated
    ├── OptimisticConcurrencyError             the stream moved; reload and retry
    ├── ConfigurationError (also ValueError)   a projection or processor is set up wrongly
    │   └── PartitionCountChangedError         checkpoints were written with another total
    ├── SchemaMissingError                     the database has not been migrated
    ├── TransactionIdsAheadError               restored from another cluster: db rebase
    ├── ProjectionBusyError                    a reset/rebuild waited too long for batches
    ├── CheckpointLostError                    a checkpoint row vanished mid-batch; rolled back
    ├── PartitionLostError                     a claimed partition's lease passed to another worker
    ├── ReshardError                           a reshard was refused or timed out; nothing changed
    ├── DatabaseUnavailableError               transient failures outlasted the retry policy
    ├── DeadLetterError                        a dead-letter retry/discard was refused
    ├── VersionNotCaughtUpError                a switch to a version that still lags
    ├── WaitTimeoutError (also TimeoutError)   projections had not handled an event in time
    ├── ProjectionRetiredError                 a version readers have left; stop its workers
    └── ProjectionError                        a projection's handler raised (see __cause__)
"""

from __future__ import annotations


class EventSourceError(Exception):
    """Base class of every error raised by eventsource."""

    #: For an error about one item of :meth:`EventStore.bulk_append`'s input: its index
    #: (also named in the message, as ``item N``). None otherwise.
    item_index: int | None = None


class ValidationError(EventSourceError, ValueError):
    """Input was rejected before anything was written."""


class DuplicateEventError(ValidationError):
    """An event id appears twice in one append, or is already in the store."""


class OptimisticConcurrencyError(EventSourceError):
    """The aggregate's stream is not at the expected version: reload it and retry.

    Also raised when a newer transaction has already appended to the aggregate
    (see DESIGN invariant 3); retrying in a new transaction succeeds.
    """

    def __init__(
        self,
        message: str,
        *,
        bounded_context: str,
        aggregate_type: str,
        aggregate_id: str,
        expected: object,
        actual: int | None,
    ) -> None:
        super().__init__(message)
        self.bounded_context = bounded_context
        self.aggregate_type = aggregate_type
        self.aggregate_id = aggregate_id
        self.expected = expected
        self.actual = actual


class AppendOrderError(EventSourceError):
    """PostgreSQL: the transaction took its id before its first append (it wrote another
    table first), and a projection reader may already have read past that id; its
    events would be skipped, so nothing was written. Roll back and retry in a new
    transaction, and call :meth:`eventsource.EventStore.mark_writer` first in
    transactions that write before they append (``run_in_transaction`` retries it and
    marks its next attempts itself). See docs/horizon.md.

    Not an :class:`OptimisticConcurrencyError`: code that takes that error to mean "the
    stream already exists" and commits the rest of its work would lose the events.
    """

    def __init__(
        self,
        message: str,
        *,
        events_table: str,
        bounded_context: str,
        aggregate_type: str,
        aggregate_id: str,
    ) -> None:
        super().__init__(message)
        self.events_table = events_table
        self.bounded_context = bounded_context
        self.aggregate_type = aggregate_type
        self.aggregate_id = aggregate_id


class ConfigurationError(EventSourceError, ValueError):
    """A projection, processor or runner is configured wrongly."""


class PartitionCountChangedError(ConfigurationError):
    """A projection's checkpoints were written with a different partition count."""


class SchemaMissingError(EventSourceError):
    """The eventsource tables are missing: run ``eventsource db upgrade`` (or Alembic)."""


class TransactionIdsAheadError(EventSourceError):
    """Stored PostgreSQL transaction ids are ahead of the server's (DESIGN invariant 7).

    The database was restored or moved from another cluster: appends to existing
    aggregates and projections cannot proceed until ``eventsource db rebase``
    (:func:`eventsource.cluster.rebase`) rewrites them. Not an
    OptimisticConcurrencyError on purpose: retrying can never succeed.
    """


class ProjectionBusyError(EventSourceError):
    """A reset or rebuild gave up waiting for the batches in hand; nothing was changed."""


class CheckpointLostError(EventSourceError):
    """A batch's checkpoint row was deleted while it ran; the batch was rolled back.

    Only a deletion that bypasses the projection's lock can cause it (by hand, or an
    old tool): ``eventsource reset`` and ``eventsource.rebuild.reset`` wait for batches.
    """


class PartitionLostError(EventSourceError):
    """A worker's lease on a claimed partition passed to another worker (it expired while
    the worker was paused, cut off or too slow to renew it): the batch was rolled back
    and the worker stops that partition; the new owner carries on from its checkpoint."""


class ReshardError(EventSourceError):
    """A reshard was refused or could not finish; nothing was changed.

    The projection runs on with its old partition count. The message says why: the
    projection has no checkpoints yet, an online rebuild is running, a partition did not
    reach the boundary in time (are its workers running?), or the projection was reset
    or rebuilt meanwhile.
    """


class DatabaseUnavailableError(EventSourceError):
    """The database kept failing transiently (connection lost, server down, deadlocks)
    for longer than the retry policy allows; no handler is at fault. The cause is chained.
    """

    def __init__(self, message: str, *, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class DeadLetterError(EventSourceError):
    """A dead-letter retry or discard was refused (an unknown id, a parked event without
    the event it waits for, a projection not given); nothing was changed.

    See :mod:`eventsource.deadletters`.
    """


class VersionNotCaughtUpError(EventSourceError):
    """A switch to a projection version that has not caught up (lag > 0, or some of its
    partitions never ran) was refused; nothing was changed. See :mod:`eventsource.versions`.
    """

    def __init__(self, message: str, *, projection: str, version: int, lag: int) -> None:
        super().__init__(message)
        self.projection = projection
        self.version = version
        self.lag = lag


class ProjectionRetiredError(EventSourceError):
    """A projection version that readers have left (:func:`eventsource.versions.switch`
    retired it) was asked to run or to become active again; nothing was changed.
    Versions only move forward: deploy older code as a new version.
    """


class WaitTimeoutError(EventSourceError, TimeoutError):
    """:func:`eventsource.wait_until_handled` gave up: some projection partitions had not
    handled the event within the timeout. The message names each one and where it
    stands (``behind``: one line each); nothing was changed, and the event is still
    handled once they get to it."""

    def __init__(
        self, message: str, *, position: int, timeout: float, behind: tuple[str, ...]
    ) -> None:
        super().__init__(message)
        self.position = position
        self.timeout = timeout
        self.behind = behind


class ProjectionError(EventSourceError):
    """A projection's handler raised; the batch was rolled back. The cause is chained."""

    def __init__(
        self,
        message: str,
        *,
        projection: str,
        partition_key: int,
        global_position: int | None,
        aggregate_id: str | None = None,
        event_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.projection = projection
        self.partition_key = partition_key
        self.global_position = global_position
        self.aggregate_id = aggregate_id
        self.event_type = event_type
