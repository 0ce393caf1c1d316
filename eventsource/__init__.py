"""eventsource: event sourcing on SQLAlchemy 2, with exactly-once projections.

Append events with :class:`EventStore` in your own transaction; keep read models in
step with projections run by a :class:`Processor` or :class:`Runner`.
"""

from __future__ import annotations

from eventsource.async_store import AsyncEventStore, create_async_engine
from eventsource.bulk import BulkAppendResult
from eventsource.database import (
    configure_engine,
    create_engine,
    database_url,
    downgrade,
    upgrade,
)
from eventsource.errors import (
    AppendOrderError,
    CheckpointLostError,
    ConfigurationError,
    DatabaseUnavailableError,
    DeadLetterError,
    DuplicateEventError,
    EventSourceError,
    OptimisticConcurrencyError,
    PartitionCountChangedError,
    PartitionLostError,
    ProjectionBusyError,
    ProjectionError,
    ProjectionRetiredError,
    ReshardError,
    SchemaMissingError,
    TransactionIdsAheadError,
    ValidationError,
    VersionNotCaughtUpError,
    WaitTimeoutError,
)
from eventsource.events import (
    AppendResult,
    Event,
    ExpectedVersion,
    PersistedEvent,
    Stream,
    json_default,
)
from eventsource.handled import is_handled, wait_until_handled
from eventsource.models import TableNames
from eventsource.partition import HashPartitionStrategy, PartitionStrategy
from eventsource.processor import BatchResult, Processor, ProcessorConfig
from eventsource.projection import OnError, Projection
from eventsource.reshard import ReshardResult, cancel_reshard, reshard
from eventsource.retry import RetryPolicy, run_in_transaction
from eventsource.runner import ProjectionRunner, Runner
from eventsource.store import EventStore

__all__ = [
    "AppendOrderError",
    "AppendResult",
    "AsyncEventStore",
    "BatchResult",
    "BulkAppendResult",
    "CheckpointLostError",
    "ConfigurationError",
    "DatabaseUnavailableError",
    "DeadLetterError",
    "DuplicateEventError",
    "Event",
    "EventSourceError",
    "EventStore",
    "ExpectedVersion",
    "HashPartitionStrategy",
    "OnError",
    "OptimisticConcurrencyError",
    "PartitionCountChangedError",
    "PartitionLostError",
    "PartitionStrategy",
    "PersistedEvent",
    "Processor",
    "ProcessorConfig",
    "Projection",
    "ProjectionBusyError",
    "ProjectionError",
    "ProjectionRetiredError",
    "ProjectionRunner",
    "ReshardError",
    "ReshardResult",
    "RetryPolicy",
    "Runner",
    "SchemaMissingError",
    "Stream",
    "TableNames",
    "TransactionIdsAheadError",
    "ValidationError",
    "VersionNotCaughtUpError",
    "WaitTimeoutError",
    "cancel_reshard",
    "configure_engine",
    "create_async_engine",
    "create_engine",
    "database_url",
    "downgrade",
    "is_handled",
    "json_default",
    "reshard",
    "run_in_transaction",
    "upgrade",
    "wait_until_handled",
]
