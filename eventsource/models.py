"""The library's tables, as SQLAlchemy models, on PostgreSQL and SQLite.

Events, aggregate heads and projection checkpoints, plus a one-row record of the
PostgreSQL cluster that wrote them (see :mod:`eventsource.cluster`), the events
projections quarantined (see :mod:`eventsource.deadletters`) and the version of each
versioned projection that readers use (see :mod:`eventsource.versions`). Table names are
configurable (:class:`TableNames`); :func:`define_tables` builds Core tables for any
names, and the declarative models below map the default ones. The Alembic migrations
in ``eventsource/migrations`` create the same schema; a test proves the two agree.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator, UserDefinedType

from eventsource import errors

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class _PGXid8(UserDefinedType[int]):
    """PostgreSQL's 64-bit transaction id type, which SQLAlchemy does not know."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "XID8"


# Let reflection (Alembic's autogenerate) recognise the column instead of warning.
postgresql.base.ischema_names["xid8"] = _PGXid8


class Xid8(TypeDecorator[int]):
    """A transaction id: ``xid8`` on PostgreSQL, a plain integer elsewhere."""

    impl = sa.BigInteger
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(_PGXid8())
        return dialect.type_descriptor(sa.BigInteger())

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> int | None:
        return None if value is None else int(value)


def as_xid8(value: int) -> sa.ColumnElement[Any]:
    """A stored transaction id (an int) as a PostgreSQL ``xid8``, to compare with the
    events' column in SQL (no cast from bigint exists; one from text does)."""
    return sa.cast(sa.cast(sa.literal(value, sa.BigInteger), sa.Text), _PGXid8())


class current_transaction_id(FunctionElement[int]):
    """The writing transaction's id on PostgreSQL; 0 on SQLite, where writers serialise."""

    type = sa.BigInteger()
    inherit_cache = True


@compiles(current_transaction_id)
def _current_transaction_id_default(element: Any, compiler: Any, **kw: Any) -> str:
    return "0"


@compiles(current_transaction_id, "postgresql")
def _current_transaction_id_pg(element: Any, compiler: Any, **kw: Any) -> str:
    return "pg_current_xact_id()"


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp, returned in UTC on every database.

    SQLite has no time zone type: values are stored as UTC and given back their
    ``tzinfo``, so what is read equals what was written.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValueError(f"expected a timezone-aware datetime, got {value!r}")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        stored: datetime = value
        if stored.tzinfo is None:
            return stored.replace(tzinfo=UTC)
        return stored.astimezone(UTC)


#: JSON on SQLite, JSONB on PostgreSQL.
JsonValue = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
#: 64-bit integer primary key: an identity on PostgreSQL, the rowid on SQLite.
BigIntPk = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


#: The library's own Alembic version table; other sets of table names append
#: ``_<events>`` to it (see :func:`eventsource.database.version_table`).
VERSION_TABLE = "eventsource_alembic_version"
#: PostgreSQL keeps the first 63 bytes of a longer identifier (NAMEDATALEN - 1) and
#: only says so in a NOTICE: two derived names could then silently become one.
MAX_IDENTIFIER_BYTES = 63


@dataclass(frozen=True, slots=True)
class TableNames:
    """Names of the library's tables; change them to share a schema with other tables.

    ``cluster`` defaults to ``<events>_cluster``, ``dead_letters`` to
    ``<events>_dead_letters``, ``projection_versions`` to
    ``<events>_projection_versions``, ``partition_claims`` to
    ``<events>_partition_claims`` and ``partition_workers`` to
    ``<events>_partition_workers``, so two sets of names in one database never share
    them.
    Names are checked here, before any SQL: each must be a non-empty
    str, and every identifier derived from them (constraints, indexes, the version
    table) must fit PostgreSQL's 63 bytes, which it would otherwise truncate.
    """

    events: str = "events"
    aggregate_heads: str = "aggregate_heads"
    projection_checkpoints: str = "projection_checkpoints"
    cluster: str = ""
    """The one-row record of the PostgreSQL cluster that wrote the store."""
    dead_letters: str = ""
    """Events that projections quarantined (``OnError.QUARANTINE*``)."""
    projection_versions: str = ""
    """Which version of each versioned projection readers use (see eventsource.versions)."""
    partition_claims: str = ""
    """Which worker holds a lease on which partition (see eventsource.claims)."""
    partition_workers: str = ""
    """The live workers that share each claimed projection (see eventsource.claims)."""

    def __post_init__(self) -> None:
        fields = (
            "events",
            "aggregate_heads",
            "projection_checkpoints",
            "cluster",
            "dead_letters",
            "projection_versions",
            "partition_claims",
            "partition_workers",
        )
        derived = (
            "cluster",
            "dead_letters",
            "projection_versions",
            "partition_claims",
            "partition_workers",
        )
        for field in fields:
            value = getattr(self, field)
            if field in derived and value == "":
                continue  # derived below
            if not isinstance(value, str) or not value.strip() or "\x00" in value:
                raise errors.ConfigurationError(
                    f"TableNames.{field} must be a non-empty str without NUL characters, "
                    f"got {value!r}"
                )
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise errors.ConfigurationError(
                    f"TableNames.{field} is not valid Unicode text: {exc}"
                ) from exc
        if not self.cluster:
            object.__setattr__(self, "cluster", f"{self.events}_cluster")
        if not self.dead_letters:
            object.__setattr__(self, "dead_letters", f"{self.events}_dead_letters")
        if not self.projection_versions:
            object.__setattr__(self, "projection_versions", f"{self.events}_projection_versions")
        if not self.partition_claims:
            object.__setattr__(self, "partition_claims", f"{self.events}_partition_claims")
        if not self.partition_workers:
            object.__setattr__(self, "partition_workers", f"{self.events}_partition_workers")
        names = [getattr(self, field) for field in fields]
        if len(set(names)) < len(names):
            raise errors.ConfigurationError(
                f"TableNames must name {len(fields)} different tables: {self}"
            )
        for field, identifier in self.identifiers():
            size = len(identifier.encode("utf-8"))
            if size > MAX_IDENTIFIER_BYTES:
                raise errors.ConfigurationError(
                    f"TableNames.{field} {getattr(self, field)!r} is too long: it makes the "
                    f"identifier {identifier!r} ({size} bytes), over PostgreSQL's limit of "
                    f"{MAX_IDENTIFIER_BYTES} bytes per identifier; choose a shorter name"
                )

    def identifiers(self) -> list[tuple[str, str]]:
        """Every database identifier made from these names, with the field it comes from."""
        events = self.events
        return [
            ("events", events),
            ("events", f"pk_{events}"),
            ("events", f"uq_{events}_event_id"),
            ("events", f"uq_{events}_stream_version"),
            ("events", f"ix_{events}_read_order"),
            ("events", f"{VERSION_TABLE}_{events}"),
            ("events", f"{events}_horizon"),
            ("events", f"{events}_horizon_check"),
            ("events", f"{events}_horizon_publish"),
            ("aggregate_heads", self.aggregate_heads),
            ("aggregate_heads", f"pk_{self.aggregate_heads}"),
            ("projection_checkpoints", self.projection_checkpoints),
            ("projection_checkpoints", f"pk_{self.projection_checkpoints}"),
            ("cluster", self.cluster),
            ("cluster", f"pk_{self.cluster}"),
            ("dead_letters", self.dead_letters),
            ("dead_letters", f"pk_{self.dead_letters}"),
            ("dead_letters", f"uq_{self.dead_letters}_event"),
            ("dead_letters", f"ix_{self.dead_letters}_aggregate"),
            ("projection_versions", self.projection_versions),
            ("projection_versions", f"pk_{self.projection_versions}"),
            ("partition_claims", self.partition_claims),
            ("partition_claims", f"pk_{self.partition_claims}"),
            ("partition_workers", self.partition_workers),
            ("partition_workers", f"pk_{self.partition_workers}"),
        ]


@dataclass(frozen=True, slots=True)
class Tables:
    """The Core tables for one set of :class:`TableNames`."""

    names: TableNames
    metadata: sa.MetaData
    events: sa.Table
    aggregate_heads: sa.Table
    projection_checkpoints: sa.Table
    cluster: sa.Table
    dead_letters: sa.Table
    projection_versions: sa.Table
    partition_claims: sa.Table
    partition_workers: sa.Table


def define_tables(names: TableNames, metadata: sa.MetaData) -> Tables:
    """Add the library's tables to ``metadata`` under ``names``."""
    events = sa.Table(
        names.events,
        metadata,
        sa.Column("global_position", BigIntPk, sa.Identity(), primary_key=True),
        sa.Column("bounded_context", sa.Text, nullable=False),
        sa.Column("aggregate_type", sa.Text, nullable=False),
        sa.Column("aggregate_id", sa.Text, nullable=False),
        sa.Column("aggregate_version", sa.BigInteger, nullable=False),
        # FNV-1a 32 of aggregate_id, computed at append so partition filters run in SQL.
        sa.Column("partition_hash", sa.BigInteger, nullable=False),
        sa.Column("event_id", sa.Uuid, nullable=False, unique=True),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("event_version", sa.Integer, nullable=False),
        sa.Column("payload", JsonValue, nullable=False),
        sa.Column("metadata", JsonValue, nullable=True),
        sa.Column("causation_id", sa.Text, nullable=True),
        sa.Column("correlation_id", sa.Text, nullable=True),
        sa.Column("trace_id", sa.Text, nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column(
            "transaction_id",
            Xid8,
            nullable=False,
            server_default=current_transaction_id(),
        ),
        sa.UniqueConstraint(
            "bounded_context",
            "aggregate_type",
            "aggregate_id",
            "aggregate_version",
            name=f"uq_{names.events}_stream_version",
        ),
        # Processors read in (transaction id, position) order: see processor.py.
        sa.Index(f"ix_{names.events}_read_order", "transaction_id", "global_position"),
        sqlite_autoincrement=True,
    )
    heads = sa.Table(
        names.aggregate_heads,
        metadata,
        sa.Column("bounded_context", sa.Text, primary_key=True),
        sa.Column("aggregate_type", sa.Text, primary_key=True),
        sa.Column("aggregate_id", sa.Text, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column(
            "transaction_id",
            Xid8,
            nullable=False,
            server_default=current_transaction_id(),
        ),
    )
    checkpoints = sa.Table(
        names.projection_checkpoints,
        metadata,
        sa.Column("projection_name", sa.Text, primary_key=True),
        sa.Column("partition_key", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("total_partitions", sa.Integer, nullable=False),
        sa.Column("transaction_id", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("global_position", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("events_handled", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        # Set while the projection is resharded (eventsource.reshard): the partition's
        # batches read no further than this (transaction id, position) boundary.
        sa.Column("stop_transaction_id", sa.BigInteger, nullable=True),
        sa.Column("stop_global_position", sa.BigInteger, nullable=True),
    )
    # One row (id 1): the system identifier of the PostgreSQL cluster whose transaction
    # ids the other tables hold (see eventsource.cluster). Unused on SQLite.
    cluster = sa.Table(
        names.cluster,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("system_identifier", sa.BigInteger, nullable=False),
        sa.Column("recorded_at", UtcDateTime, nullable=False),
    )
    # Events a projection quarantined (OnError.QUARANTINE*), with the handler's error;
    # see eventsource.deadletters. A parked event (QUARANTINE_AGGREGATE) waits behind
    # the failed event of its aggregate: parked_behind is that entry's id.
    dead_letters = sa.Table(
        names.dead_letters,
        metadata,
        sa.Column("id", BigIntPk, sa.Identity(), primary_key=True),
        sa.Column("projection_name", sa.Text, nullable=False),
        sa.Column("partition_key", sa.Integer, nullable=False),
        sa.Column("total_partitions", sa.Integer, nullable=False),
        sa.Column("global_position", sa.BigInteger, nullable=False),
        sa.Column("event_id", sa.Uuid, nullable=False),
        sa.Column("bounded_context", sa.Text, nullable=False),
        sa.Column("aggregate_type", sa.Text, nullable=False),
        sa.Column("aggregate_id", sa.Text, nullable=False),
        sa.Column("aggregate_version", sa.BigInteger, nullable=False),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("parked_behind", sa.BigInteger, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error_type", sa.Text, nullable=True),
        sa.Column("error_message", sa.Text, nullable=True),
        sa.Column("traceback", sa.Text, nullable=True),
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("last_failed_at", UtcDateTime, nullable=True),
        # An event is quarantined at most once per projection.
        sa.UniqueConstraint(
            "projection_name", "global_position", name=f"uq_{names.dead_letters}_event"
        ),
        # Batches look up the parked aggregates of their projection partition.
        sa.Index(
            f"ix_{names.dead_letters}_aggregate",
            "projection_name",
            "partition_key",
            "bounded_context",
            "aggregate_type",
            "aggregate_id",
            "aggregate_version",
        ),
        sqlite_autoincrement=True,
    )
    # The version of each versioned projection that readers use, set by
    # eventsource.versions.switch (no row: the projection was never switched).
    projection_versions = sa.Table(
        names.projection_versions,
        metadata,
        sa.Column("projection_name", sa.Text, primary_key=True),
        sa.Column("active_version", sa.Integer, nullable=False),
        sa.Column("previous_version", sa.Integer, nullable=True),
        sa.Column("switched_at", UtcDateTime, nullable=False),
    )
    # Claimed partitions (eventsource.claims): one row per partition of a projection
    # whose workers share its partitions, naming the worker that holds its lease. The
    # epoch grows with every change of owner; a batch commits only under the owner and
    # epoch its worker claimed with (fencing).
    partition_claims = sa.Table(
        names.partition_claims,
        metadata,
        sa.Column("projection_name", sa.Text, primary_key=True),
        sa.Column("partition_key", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("total_partitions", sa.Integer, nullable=False),
        sa.Column("owner", sa.Text, nullable=True),
        sa.Column("epoch", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("claimed_at", UtcDateTime, nullable=True),
        sa.Column("renewed_at", UtcDateTime, nullable=True),
        sa.Column("lease_expires_at", UtcDateTime, nullable=True),
    )
    # The workers sharing each claimed projection, each with a lease of its own: the
    # fair share of a worker is the partition count divided by the live ones.
    partition_workers = sa.Table(
        names.partition_workers,
        metadata,
        sa.Column("projection_name", sa.Text, primary_key=True),
        sa.Column("worker_id", sa.Text, primary_key=True),
        sa.Column("started_at", UtcDateTime, nullable=False),
        sa.Column("renewed_at", UtcDateTime, nullable=False),
        sa.Column("lease_expires_at", UtcDateTime, nullable=False),
    )
    return Tables(
        names,
        metadata,
        events,
        heads,
        checkpoints,
        cluster,
        dead_letters,
        projection_versions,
        partition_claims,
        partition_workers,
    )


@functools.cache
def tables_for(names: TableNames) -> Tables:
    """The tables for ``names``, each set built once on its own MetaData."""
    if names == DEFAULT_TABLES.names:
        return DEFAULT_TABLES
    return define_tables(names, sa.MetaData(naming_convention=NAMING_CONVENTION))


#: The library's MetaData with the default table names: add it to an application's
#: Alembic ``target_metadata`` so autogenerate knows these tables.
metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
DEFAULT_TABLES = define_tables(TableNames(), metadata)


class Base(DeclarativeBase):
    metadata = metadata


class EventRecord(Base):
    """A stored event (ORM view of the default ``events`` table, for ad-hoc queries)."""

    __table__ = DEFAULT_TABLES.events

    global_position: Mapped[int]
    bounded_context: Mapped[str]
    aggregate_type: Mapped[str]
    aggregate_id: Mapped[str]
    aggregate_version: Mapped[int]
    partition_hash: Mapped[int]
    event_id: Mapped[uuid.UUID]
    event_type: Mapped[str]
    event_version: Mapped[int]
    payload: Mapped[Any]
    metadata_: Mapped[Any | None]
    causation_id: Mapped[str | None]
    correlation_id: Mapped[str | None]
    trace_id: Mapped[str | None]
    created_at: Mapped[datetime]
    transaction_id: Mapped[int]

    __mapper_args__ = {"properties": {"metadata_": DEFAULT_TABLES.events.c.metadata}}


class AggregateHead(Base):
    """An aggregate's current version and the transaction that last wrote it."""

    __table__ = DEFAULT_TABLES.aggregate_heads

    bounded_context: Mapped[str]
    aggregate_type: Mapped[str]
    aggregate_id: Mapped[str]
    version: Mapped[int]
    transaction_id: Mapped[int]


class ProjectionCheckpoint(Base):
    """How far one partition of one projection has committed."""

    __table__ = DEFAULT_TABLES.projection_checkpoints

    projection_name: Mapped[str]
    partition_key: Mapped[int]
    total_partitions: Mapped[int]
    transaction_id: Mapped[int]
    global_position: Mapped[int]
    events_handled: Mapped[int]
    updated_at: Mapped[datetime]
    stop_transaction_id: Mapped[int | None]
    stop_global_position: Mapped[int | None]


class ClusterRecord(Base):
    """Which PostgreSQL cluster wrote the store's transaction ids (one row, id 1)."""

    __table__ = DEFAULT_TABLES.cluster

    id: Mapped[int]
    system_identifier: Mapped[int]
    recorded_at: Mapped[datetime]


class DeadLetterRecord(Base):
    """An event a projection quarantined, or parked behind one (see eventsource.deadletters)."""

    __table__ = DEFAULT_TABLES.dead_letters

    id: Mapped[int]
    projection_name: Mapped[str]
    partition_key: Mapped[int]
    total_partitions: Mapped[int]
    global_position: Mapped[int]
    event_id: Mapped[uuid.UUID]
    bounded_context: Mapped[str]
    aggregate_type: Mapped[str]
    aggregate_id: Mapped[str]
    aggregate_version: Mapped[int]
    event_type: Mapped[str]
    parked_behind: Mapped[int | None]
    attempts: Mapped[int]
    error_type: Mapped[str | None]
    error_message: Mapped[str | None]
    traceback: Mapped[str | None]
    created_at: Mapped[datetime]
    last_failed_at: Mapped[datetime | None]


class ProjectionVersionRecord(Base):
    """Which version of a projection readers use (see eventsource.versions)."""

    __table__ = DEFAULT_TABLES.projection_versions

    projection_name: Mapped[str]
    active_version: Mapped[int]
    previous_version: Mapped[int | None]
    switched_at: Mapped[datetime]


class PartitionClaimRecord(Base):
    """Which worker holds a lease on a partition of a claimed projection (eventsource.claims)."""

    __table__ = DEFAULT_TABLES.partition_claims

    projection_name: Mapped[str]
    partition_key: Mapped[int]
    total_partitions: Mapped[int]
    owner: Mapped[str | None]
    epoch: Mapped[int]
    claimed_at: Mapped[datetime | None]
    renewed_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]


class PartitionWorkerRecord(Base):
    """A live worker sharing a claimed projection's partitions (eventsource.claims)."""

    __table__ = DEFAULT_TABLES.partition_workers

    projection_name: Mapped[str]
    worker_id: Mapped[str]
    started_at: Mapped[datetime]
    renewed_at: Mapped[datetime]
    lease_expires_at: Mapped[datetime]
