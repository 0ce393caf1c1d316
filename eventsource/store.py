"""The event store: append with optimistic concurrency, read streams and the global log.

The caller owns the transaction: every method takes a Session (or Connection) and
never commits or rolls back the caller's transaction.

Appending is one statement on PostgreSQL: a CTE that checks and advances the
aggregate's row in ``aggregate_heads`` (which row-locks the aggregate, so concurrent
appends to it queue instead of racing) and inserts all events from arrays. The head
also remembers the transaction id of its last writer; an append from an older
transaction is refused (DESIGN invariant 3), because processors read in
transaction-id order and would otherwise see that aggregate's versions out of order.
On SQLite writers are serialised by ``BEGIN IMMEDIATE`` and the few statements run
inside a savepoint, so a failed append leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session

from eventsource import cluster, database, direct, errors, horizon, models, partition, wakeups
from eventsource.events import AppendResult, Event, ExpectedVersion, PersistedEvent, Stream

if TYPE_CHECKING:
    from eventsource.bulk import BulkAppendResult

logger = logging.getLogger("eventsource.store")

#: Where the store reads and writes: a Session, a ``scoped_session`` (its current
#: Session, e.g. Flask-SQLAlchemy's ``db.session``), or a Connection.
SessionOrConnection = Session | scoped_session[Any] | sa.Connection

DEFAULT_READ_LIMIT = 1000

#: The columns read for a PersistedEvent, in this order (see ``event_from_row``).
EVENT_COLUMNS = (
    "global_position",
    "bounded_context",
    "aggregate_type",
    "aggregate_id",
    "aggregate_version",
    "event_id",
    "event_type",
    "event_version",
    "payload",
    "metadata",
    "causation_id",
    "correlation_id",
    "trace_id",
    "created_at",
)


def connection_of(session: SessionOrConnection) -> sa.Connection:
    """The Connection under a Session (joining its transaction), or the Connection itself.

    A ``scoped_session`` stands for its registry's current Session (the one the rest
    of the request or thread uses), so events join the application's transaction.
    """
    if isinstance(session, scoped_session):
        session = session()
    if isinstance(session, Session):
        return session.connection()
    if isinstance(session, sa.Connection):
        return session
    database.refuse_async(session, "EventStore (and status)")
    raise errors.ValidationError(
        "expected a SQLAlchemy Session or Connection (or a scoped_session), got "
        f"{type(session).__name__}"
    )


def event_from_row(row: Sequence[Any]) -> PersistedEvent:
    """Build a PersistedEvent from a row whose first columns are ``EVENT_COLUMNS``."""
    return PersistedEvent(
        global_position=row[0],
        bounded_context=row[1],
        aggregate_type=row[2],
        aggregate_id=row[3],
        aggregate_version=row[4],
        event_id=row[5],
        event_type=row[6],
        event_version=row[7],
        payload=row[8],
        metadata=row[9],
        causation_id=row[10],
        correlation_id=row[11],
        trace_id=row[12],
        created_at=row[13],
    )


@dataclass(frozen=True, slots=True)
class _Batch:
    """Validated events of one append, column by column, ready for the database."""

    bounded_context: str
    aggregate_type: str
    aggregate_id: str
    partition_hash: int
    events: Sequence[Event]
    event_ids: list[uuid.UUID]
    event_types: list[str]
    event_versions: list[int]
    payloads_json: list[str]
    metadatas_json: list[str | None]
    payloads: list[Any]  # as an AppendResult gives them back (see EventStore)
    metadatas: list[Mapping[str, Any] | None]
    causation_ids: list[str | None]
    correlation_ids: list[str | None]
    trace_ids: list[str | None]
    created_ats: list[datetime]


class EventStore:
    """Appends and reads events; the caller owns (begins and commits) the transaction.

    ``json_default`` converts what JSON has no type for in payloads and metadata
    (called as ``json.dumps(default=...)`` calls it: return a JSON-able value, or
    raise ``TypeError``); :func:`eventsource.json_default` handles Decimal (as exact
    text, never a float), datetime, date, UUID, Enum, dataclasses and pydantic models.
    Without it such values are refused with a ValidationError, before anything is
    written. Every database stores the same JSON text, and reads give back the JSON
    (``"0.10"``, not ``Decimal("0.10")``): converting back is the application's. With
    a hook, an :class:`~eventsource.AppendResult` carries the payloads as they read
    back too.

    ``notify`` (default on): once an append's transaction commits, wake the processors
    it concerns, in this process at once and, on PostgreSQL, in others through
    LISTEN/NOTIFY (:mod:`eventsource.wakeups`). Nothing is sent inside the caller's
    transaction, and nothing at all for one that rolls back.
    """

    def __init__(
        self,
        *,
        table_names: models.TableNames | None = None,
        json_default: Callable[[Any], Any] | None = None,
        notify: bool = True,
    ) -> None:
        if not isinstance(notify, bool):
            raise errors.ConfigurationError(f"notify must be a bool, got {notify!r}")
        self.notify = notify
        if json_default is not None and not callable(json_default):
            raise errors.ConfigurationError(
                f"json_default must be a function, got {type(json_default).__name__}"
            )
        self.tables = models.tables_for(table_names or models.TableNames())
        self.json_default = json_default
        self._encode = _encode if json_default is None else _encoder(json_default)
        self._pg = _PostgresStatements(self.tables)
        ev = self.tables.events
        self._columns = [ev.c[name] for name in EVENT_COLUMNS]
        # Payloads go in as the JSON text _validate made (as on PostgreSQL), not through
        # the JSON type's own json.dumps: one encoding, with the same hook, everywhere.
        self._insert_generic = ev.insert().values(
            payload=sa.bindparam("payload", type_=sa.Text()),
            metadata=sa.bindparam("metadata", type_=sa.Text()),
        )

    # -- append ---------------------------------------------------------------

    def append(
        self,
        session: SessionOrConnection,
        events: Sequence[Event],
        expected_version: ExpectedVersion | None = None,
    ) -> AppendResult:
        """Append events of one aggregate, checking its current version first.

        Raises :class:`~eventsource.errors.OptimisticConcurrencyError` when the
        aggregate is not at ``expected_version`` (default: any version), and
        :class:`~eventsource.errors.ValidationError` for bad input before anything
        is written.
        """
        if expected_version is None:
            expected_version = ExpectedVersion.any()
        elif not isinstance(expected_version, ExpectedVersion):
            raise errors.ValidationError(
                "expected_version must be an ExpectedVersion (ExpectedVersion.any(), "
                f".no_stream() or .exact(n)), got {type(expected_version).__name__}"
            )
        else:
            expected_version = _checked_expectation(expected_version)
        batch = _validate(events, self._encode, decoded=self.json_default is not None)
        conn = connection_of(session)
        try:
            if conn.dialect.name == "postgresql":
                stored = self._append_postgres(conn, batch, expected_version)
            else:
                stored = self._append_generic(conn, batch, expected_version)
        except sa.exc.DBAPIError as exc:  # not on the way of a successful append
            refused = horizon.refusal(
                exc,
                batch.bounded_context,
                batch.aggregate_type,
                batch.aggregate_id,
                self.tables.names.events,
            )
            if refused is not None:
                raise refused from exc
            database.raise_if_schema_missing(exc, self.tables.names, own_statement=True)
            raise
        if self.notify:
            wakeups.note_append(
                conn,
                self.tables.names.events,
                batch.bounded_context,
                batch.aggregate_type,
                batch.partition_hash,
            )
        return AppendResult(tuple(_persisted(batch, stored)))

    def bulk_append(
        self,
        session: SessionOrConnection,
        events: Iterable[Event | tuple[Event, int]],
        *,
        chunk_size: int = 5000,
        progress: Callable[[int], None] | None = None,
    ) -> BulkAppendResult:
        """Append a history of many aggregates at close to ``COPY`` speed, with the
        guarantees of :meth:`append` (see :func:`eventsource.bulk.bulk_append`).

        An item is an Event (it gets its aggregate's next version) or ``(event,
        aggregate_version)`` (the version it must get). All or nothing: after an error
        nothing of the import remains, and the caller's transaction is usable.
        """
        from eventsource import bulk  # bulk builds on this module

        return bulk.bulk_append(self, session, events, chunk_size=chunk_size, progress=progress)

    def mark_writer(self, session: SessionOrConnection) -> None:
        """Mark the caller's transaction as one that will append, before it writes
        anything else (PostgreSQL; nothing elsewhere).

        Every append marks its transaction itself, so this is only needed in a
        transaction that writes other tables *before* its first append: such a
        transaction already has an id when it appends, and a projection may have read
        past that id meanwhile (it waits only for marked transactions, see
        docs/horizon.md), in which case the append is refused with
        :class:`~eventsource.errors.AppendOrderError`. Marked from the start, it is
        never refused; projections then wait for it as they wait for any writer. The
        mark is the lock an append takes anyway: ROW EXCLUSIVE on the events table.
        """
        conn = connection_of(session)
        if conn.dialect.name != "postgresql":
            return
        own, marked = conn.execute(horizon.own_state(self.tables.names.events)).one()
        conn.execute(horizon.mark_statement(self.tables.names.events))
        if own is not None and not marked:
            logger.warning(
                "EventStore.mark_writer: the transaction had already written (it has a "
                "transaction id), so the mark comes too late to spare its appends an "
                "AppendOrderError: call it first, before any other write (docs/horizon.md)"
            )

    def _append_postgres(
        self, conn: sa.Connection, batch: _Batch, expected: ExpectedVersion
    ) -> list[tuple[int, int]]:
        statement = self._pg.append[(expected.kind, len(batch.events) == 1)]
        try:
            rows = direct.fetch_all(conn, statement, self._pg.params(batch, expected))
        except sa.exc.IntegrityError as exc:
            raise self._translate_integrity_error(exc, batch, expected) from exc
        if not rows:
            raise self._conflict(conn, batch, expected)
        return sorted((version, position) for position, version in rows)

    def _append_generic(
        self, conn: sa.Connection, batch: _Batch, expected: ExpectedVersion
    ) -> list[tuple[int, int]]:
        # SQLite: writers hold the database lock from BEGIN IMMEDIATE, so read-check-write
        # cannot race; the savepoint undoes a partial write if a statement fails.
        heads, events = self.tables.aggregate_heads, self.tables.events
        key = (
            (heads.c.bounded_context == batch.bounded_context)
            & (heads.c.aggregate_type == batch.aggregate_type)
            & (heads.c.aggregate_id == batch.aggregate_id)
        )
        # With the stdlib driver managing transactions, our SAVEPOINT would open the
        # outermost transaction and its RELEASE commit it, behind the caller's back; a
        # plain deferred BEGIN (SQLAlchemy's recipe) fails concurrent writers.
        database.require_configured(conn, what="EventStore.append")
        with conn.begin_nested():
            current = conn.execute(sa.select(heads.c.version).where(key)).scalar()
            if not _satisfies(expected, current):
                raise _conflict_error(batch, expected, current or 0)
            taken = (
                conn.execute(
                    sa.select(events.c.event_id).where(events.c.event_id.in_(batch.event_ids))
                )
                .scalars()
                .first()
            )
            if taken is not None:
                raise errors.DuplicateEventError(f"event id {taken} is already in the store")
            n = len(batch.events)
            new_version = (current or 0) + n
            if current is None:
                conn.execute(
                    heads.insert().values(
                        bounded_context=batch.bounded_context,
                        aggregate_type=batch.aggregate_type,
                        aggregate_id=batch.aggregate_id,
                        version=new_version,
                    )
                )
            else:
                conn.execute(heads.update().where(key).values(version=new_version))
            first = new_version - n + 1
            rows = [
                {
                    "bounded_context": batch.bounded_context,
                    "aggregate_type": batch.aggregate_type,
                    "aggregate_id": batch.aggregate_id,
                    "aggregate_version": first + i,
                    "partition_hash": batch.partition_hash,
                    "event_id": batch.event_ids[i],
                    "event_type": batch.event_types[i],
                    "event_version": batch.event_versions[i],
                    "payload": batch.payloads_json[i],
                    "metadata": batch.metadatas_json[i],
                    "causation_id": event.causation_id,
                    "correlation_id": event.correlation_id,
                    "trace_id": event.trace_id,
                    "created_at": batch.created_ats[i],
                }
                for i, event in enumerate(batch.events)
            ]
            try:
                positions = (
                    conn.execute(
                        self._insert_generic.returning(
                            events.c.global_position, sort_by_parameter_order=True
                        ),
                        rows,
                    )
                    .scalars()
                    .all()
                )
            except sa.exc.IntegrityError as exc:
                # Only reachable if rows were written around the heads table.
                raise _conflict_error(batch, expected, None) from exc
        return [(first + i, pos) for i, pos in enumerate(positions)]

    def _conflict(
        self, conn: sa.Connection, batch: _Batch, expected: ExpectedVersion
    ) -> errors.EventSourceError:
        row = conn.execute(
            self._pg.head_state,
            {"bc": batch.bounded_context, "at": batch.aggregate_type, "aid": batch.aggregate_id},
        ).first()
        actual = 0 if row is None else int(row.version)
        if row is not None and row.ahead and row.newer_writer and _satisfies(expected, actual):
            # Written by another cluster's transaction (a restore): retrying never helps.
            return errors.TransactionIdsAheadError(
                cluster.ahead_message(
                    f"{_describe(batch)}: the transaction id of this aggregate's last writer "
                    f"({row.head_transaction_id}) and likely others",
                    int(row.next_transaction_id),
                )
            )
        if row is not None and row.newer_writer and _satisfies(expected, actual):
            return errors.OptimisticConcurrencyError(
                f"{_describe(batch)}: a newer transaction appended to this aggregate "
                f"(now at version {actual}) after this transaction started writing; "
                "roll back and retry in a new transaction so readers see versions in order",
                bounded_context=batch.bounded_context,
                aggregate_type=batch.aggregate_type,
                aggregate_id=batch.aggregate_id,
                expected=expected,
                actual=actual,
            )
        return _conflict_error(batch, expected, actual)

    def _translate_integrity_error(
        self, exc: sa.exc.IntegrityError, batch: _Batch, expected: ExpectedVersion
    ) -> errors.EventSourceError:
        diag = getattr(exc.orig, "diag", None)
        constraint = getattr(diag, "constraint_name", None)
        if constraint == f"uq_{self.tables.names.events}_event_id":
            return errors.DuplicateEventError(
                f"{_describe(batch)}: an event id is already in the store "
                "(the transaction is aborted; roll it back)"
            )
        return _conflict_error(batch, expected, None)

    # -- read -----------------------------------------------------------------

    def read_stream(
        self,
        session: SessionOrConnection,
        bounded_context: str,
        aggregate_type: str,
        aggregate_id: str | uuid.UUID,
        from_version: int | None = None,
        to_version: int | None = None,
    ) -> Stream:
        """One aggregate's events in version order, optionally from/to a version (inclusive)."""
        aggregate_id = str(aggregate_id)
        ev = self.tables.events
        query = (
            sa.select(*self._columns)
            .where(
                ev.c.bounded_context == bounded_context,
                ev.c.aggregate_type == aggregate_type,
                ev.c.aggregate_id == aggregate_id,
            )
            .order_by(ev.c.aggregate_version)
        )
        if from_version is not None:
            low = _non_negative("from_version", from_version)
            query = query.where(ev.c.aggregate_version >= low)
        if to_version is not None:
            high = _non_negative("to_version", to_version)
            query = query.where(ev.c.aggregate_version <= high)
        try:
            rows = connection_of(session).execute(query)
        except sa.exc.DBAPIError as exc:
            database.raise_if_schema_missing(exc, self.tables.names, own_statement=True)
            raise
        return Stream(
            bounded_context,
            aggregate_type,
            aggregate_id,
            tuple(event_from_row(row) for row in rows),
        )

    def read_all(
        self,
        session: SessionOrConnection,
        after: int = 0,
        limit: int = DEFAULT_READ_LIMIT,
    ) -> list[PersistedEvent]:
        """Events with ``global_position > after``, in position order, at most ``limit``.

        For feeding projections use a Processor instead: on PostgreSQL positions can
        become visible out of order, which the processor handles and this does not.
        """
        _non_negative("after", after)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise errors.ValidationError(f"limit must be a positive int, got {limit!r}")
        ev = self.tables.events
        query = (
            sa.select(*self._columns)
            .where(ev.c.global_position > after)
            .order_by(ev.c.global_position)
            .limit(limit)
        )
        try:
            rows = connection_of(session).execute(query)
        except sa.exc.DBAPIError as exc:
            database.raise_if_schema_missing(exc, self.tables.names, own_statement=True)
            raise
        return [event_from_row(row) for row in rows]

    def stream_version(
        self,
        session: SessionOrConnection,
        bounded_context: str,
        aggregate_type: str,
        aggregate_id: str | uuid.UUID,
    ) -> int:
        """The aggregate's current version (0 when it has no events), in one lookup."""
        heads = self.tables.aggregate_heads
        query = sa.select(heads.c.version).where(
            heads.c.bounded_context == bounded_context,
            heads.c.aggregate_type == aggregate_type,
            heads.c.aggregate_id == str(aggregate_id),
        )
        try:
            version = connection_of(session).execute(query).scalar()
        except sa.exc.DBAPIError as exc:
            database.raise_if_schema_missing(exc, self.tables.names, own_statement=True)
            raise
        return int(version or 0)


class _PostgresStatements:
    """The PostgreSQL append statements, built once, in the driver's own placeholder style.

    They run through :func:`eventsource.direct.fetch_all` (psycopg itself, or
    ``exec_driver_sql`` when statement events are listened to): a hand-written statement
    gains nothing from SQLAlchemy's parameter processing, which cost as much as the
    insert itself. One
    event binds plain values; several travel as one JSON array decoded by the server
    (cheaper for the driver than nine typed arrays).
    """

    def __init__(self, tables: models.Tables) -> None:
        prep = _IdentifierQuoter()
        heads = prep(tables.names.aggregate_heads)
        events = prep(tables.names.events)
        # Invariant 3: a transaction older than the aggregate's last writer may not append.
        not_older = "h.transaction_id <= pg_current_xact_id()"
        head_sql = {
            "any": f"""
                INSERT INTO {heads} AS h
                    (bounded_context, aggregate_type, aggregate_id, version, transaction_id)
                VALUES (%(bc)s, %(at)s, %(aid)s, %(n)s, pg_current_xact_id())
                ON CONFLICT (bounded_context, aggregate_type, aggregate_id) DO UPDATE
                    SET version = h.version + %(n)s, transaction_id = pg_current_xact_id()
                    WHERE {not_older}
                RETURNING h.version""",
            "no_stream": f"""
                INSERT INTO {heads}
                    (bounded_context, aggregate_type, aggregate_id, version, transaction_id)
                VALUES (%(bc)s, %(at)s, %(aid)s, %(n)s, pg_current_xact_id())
                ON CONFLICT (bounded_context, aggregate_type, aggregate_id) DO NOTHING
                RETURNING version""",
            "exact": f"""
                UPDATE {heads} AS h
                SET version = h.version + %(n)s, transaction_id = pg_current_xact_id()
                WHERE h.bounded_context = %(bc)s AND h.aggregate_type = %(at)s
                    AND h.aggregate_id = %(aid)s AND h.version = %(expected)s AND {not_older}
                RETURNING h.version""",
        }
        insert = f"""
            INSERT INTO {events} (
                bounded_context, aggregate_type, aggregate_id, aggregate_version,
                partition_hash, event_id, event_type, event_version, payload, metadata,
                causation_id, correlation_id, trace_id, created_at)"""
        one = f"""{insert}
            SELECT %(bc)s, %(at)s, %(aid)s, head.version, %(hash)s, %(event_id)s,
                %(event_type)s, %(event_version)s, CAST(%(payload)s AS jsonb),
                CAST(%(metadata)s AS jsonb), %(causation_id)s, %(correlation_id)s,
                %(trace_id)s, %(created_at)s
            FROM head
            RETURNING global_position, aggregate_version"""
        many = f"""{insert}
            SELECT %(bc)s, %(at)s, %(aid)s, head.version - %(n)s + e.ord, %(hash)s, e.i, e.t,
                e.v, COALESCE(e.p, 'null'::jsonb), e.m, e.c, e.r, e.x, e.a
            FROM head, ROWS FROM (jsonb_to_recordset(CAST(%(events)s AS jsonb)) AS (
                i uuid, t text, v integer, p jsonb, m jsonb, c text, r text, x text,
                a timestamptz)) WITH ORDINALITY AS e(i, t, v, p, m, c, r, x, a, ord)
            ORDER BY e.ord
            RETURNING global_position, aggregate_version"""
        self.append = {
            (kind, single): f"WITH head AS ({sql}) {one if single else many}"
            for kind, sql in head_sql.items()
            for single in (True, False)
        }
        self.head_state = sa.text(
            f"""SELECT version, transaction_id > pg_current_xact_id() AS newer_writer,
                    transaction_id >= pg_snapshot_xmax(pg_current_snapshot()) AS ahead,
                    transaction_id::text AS head_transaction_id,
                    pg_snapshot_xmax(pg_current_snapshot())::text AS next_transaction_id
                FROM {heads.replace("%%", "%")}
                WHERE bounded_context = :bc AND aggregate_type = :at AND aggregate_id = :aid"""
        )

    @staticmethod
    def params(batch: _Batch, expected: ExpectedVersion) -> dict[str, Any]:
        params: dict[str, Any] = {
            "bc": batch.bounded_context,
            "at": batch.aggregate_type,
            "aid": batch.aggregate_id,
            "n": len(batch.events),
            "expected": expected.version,
            "hash": batch.partition_hash,
        }
        if len(batch.events) == 1:
            event = batch.events[0]
            params.update(
                event_id=batch.event_ids[0],
                event_type=event.event_type,
                event_version=event.event_version,
                payload=batch.payloads_json[0],
                metadata=batch.metadatas_json[0],
                causation_id=event.causation_id,
                correlation_id=event.correlation_id,
                trace_id=event.trace_id,
                created_at=batch.created_ats[0],
            )
        else:
            params["events"] = (
                "[" + ",".join(_event_json(batch, i) for i in range(len(batch.events))) + "]"
            )
        return params


def _event_json(batch: _Batch, i: int) -> str:
    """One event's row for jsonb_to_recordset, splicing in the already-encoded payload."""
    return (
        f'{{"i":"{batch.event_ids[i]}","t":{_quote(batch.event_types[i])},'
        f'"v":{batch.event_versions[i]},"p":{batch.payloads_json[i]},'
        f'"m":{batch.metadatas_json[i] or "null"},"c":{_json_text(batch.causation_ids[i])},'
        f'"r":{_json_text(batch.correlation_ids[i])},"x":{_json_text(batch.trace_ids[i])},'
        f'"a":"{batch.created_ats[i].isoformat()}"}}'
    )


#: A str as a JSON string, as ``_encode`` writes it (the json module's C function;
#: the text was validated, so it holds no lone surrogates), without its per-call setup.
_quote: Callable[[str], str] = json.encoder.encode_basestring


def _json_text(value: str | None) -> str:
    return "null" if value is None else _quote(value)


class _IdentifierQuoter:
    """Quotes configurable table names for raw SQL the way PostgreSQL needs."""

    def __init__(self) -> None:
        from sqlalchemy.dialects import postgresql

        self._preparer = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]

    def __call__(self, name: str) -> str:
        # Escaped for the driver's %-style placeholders: this (pyformat) preparer
        # already doubles "%", so doubling again would name another table.
        return str(self._preparer.quote(name))


# -- validation ------------------------------------------------------------------


def _validate(
    events: Sequence[Event], encode: Callable[[object], str] | None = None, *, decoded: bool = False
) -> _Batch:
    """Check ``events`` and encode their JSON with ``encode`` (default: no hook).

    ``decoded``: the batch's ``payloads``/``metadatas`` are the JSON read back (a hook
    may have turned a Decimal into text), not the objects given.
    """
    encode = encode or _encode
    if isinstance(events, Event):
        events = [events]
    if not isinstance(events, Sequence) or isinstance(events, str | bytes):
        raise errors.ValidationError(f"events must be a list of Event, got {type(events).__name__}")
    if not events:
        raise errors.ValidationError("cannot append an empty list of events")
    first = events[0]
    if not isinstance(first, Event):
        raise errors.ValidationError(f"events[0] is a {type(first).__name__}, not an Event")
    key = (first.bounded_context, first.aggregate_type, first.aggregate_id)
    _check_key(key, "events[0]")
    now = datetime.now(UTC)
    seen: set[uuid.UUID] = set()
    batch = _Batch(
        bounded_context=key[0],
        aggregate_type=key[1],
        aggregate_id=key[2],
        partition_hash=partition.fnv1a_32(key[2]),
        events=events,
        event_ids=[],
        event_types=[],
        event_versions=[],
        payloads_json=[],
        metadatas_json=[],
        payloads=[],
        metadatas=[],
        causation_ids=[],
        correlation_ids=[],
        trace_ids=[],
        created_ats=[],
    )
    checked_type = None  # the event type last checked: batches usually repeat one
    for i, event in enumerate(events):
        if not isinstance(event, Event):
            raise errors.ValidationError(f"events[{i}] is a {type(event).__name__}, not an Event")
        if (event.bounded_context, event.aggregate_type, event.aggregate_id) != key:
            raise errors.ValidationError(
                f"events[{i}] belongs to {event.bounded_context}/{event.aggregate_type}/"
                f"{event.aggregate_id}, but one append takes events of one aggregate "
                f"({key[0]}/{key[1]}/{key[2]})"
            )
        if event.event_id in seen:
            raise errors.DuplicateEventError(f"events[{i}].event_id {event.event_id} appears twice")
        payload_json, metadata_json, created = check_event(
            event, encode, now, f"events[{i}]", check_type=event.event_type != checked_type
        )
        checked_type = event.event_type
        seen.add(event.event_id)
        batch.event_ids.append(event.event_id)
        batch.event_types.append(event.event_type)
        batch.event_versions.append(event.event_version)
        batch.payloads_json.append(payload_json)
        batch.metadatas_json.append(metadata_json)
        if decoded:
            batch.payloads.append(json.loads(payload_json))
            batch.metadatas.append(None if metadata_json is None else json.loads(metadata_json))
        else:
            batch.payloads.append(event.payload)
            batch.metadatas.append(event.metadata)
        batch.causation_ids.append(event.causation_id)
        batch.correlation_ids.append(event.correlation_id)
        batch.trace_ids.append(event.trace_id)
        batch.created_ats.append(created)
    return batch


def _check_key(key: tuple[str, str, str], where: str) -> None:
    """Refuse an aggregate key the database could not store or index."""
    for name, value in zip(("bounded_context", "aggregate_type", "aggregate_id"), key, strict=True):
        _require_text(f"{where}.{name}", value)
        _require_max_bytes(f"{where}.{name}", value, _KEY_MAX_BYTES[name])


def check_event(
    event: Event,
    encode: Callable[[object], str],
    now: datetime,
    where: str,
    *,
    check_type: bool = True,
) -> tuple[str, str | None, datetime]:
    """Check one event's own fields (not its aggregate key, which ``_check_key`` checks
    once per aggregate) and return its payload and metadata as JSON text and its
    ``created_at`` (``now`` when it has none). ``where`` names it in errors.

    The one place the rules for an event live: an append and a bulk import refuse the
    same input with the same errors. ``check_type=False`` skips the event type when the
    caller has just checked the same value.
    """
    if check_type or type(event.event_type) is not str:
        _require_text(f"{where}.event_type", event.event_type)
    if not isinstance(event.event_id, uuid.UUID):
        raise errors.ValidationError(f"{where}.event_id must be a uuid.UUID")
    ev_version = event.event_version
    if (
        isinstance(ev_version, bool)
        or not isinstance(ev_version, int)
        or not 1 <= ev_version <= _MAX_INT32
    ):
        raise errors.ValidationError(
            f"{where}.event_version must be an int in 1..{_MAX_INT32}, got {ev_version!r}"
        )
    metadata = event.metadata
    if metadata is not None and not isinstance(metadata, Mapping):
        raise errors.ValidationError(f"{where}.metadata must be a mapping or None")
    if not (event.causation_id is None and event.correlation_id is None and event.trace_id is None):
        for name in ("causation_id", "correlation_id", "trace_id"):
            value = getattr(event, name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise errors.ValidationError(f"{where}.{name} must be a str, a uuid.UUID or None")
            if "\x00" in value:
                raise errors.ValidationError(f"{where}.{name} contains a NUL character")
            _require_utf8(f"{where}.{name}", value)
    created = event.created_at
    if created is None:
        created = now
    elif not isinstance(created, datetime) or created.tzinfo is None:
        raise errors.ValidationError(f"{where}.created_at must be a timezone-aware datetime")
    payload_json = _to_json(f"{where}.payload", event.payload, encode)
    metadata_json = (
        None if metadata is None else _to_json(f"{where}.metadata", dict(metadata), encode)
    )
    return payload_json, metadata_json, created


_MAX_INT32 = 2**31 - 1

# Longest accepted keys, in UTF-8 bytes (what the database stores, not characters).
# Together they form one row of a PostgreSQL btree index twice: the unique
# (bounded_context, aggregate_type, aggregate_id, aggregate_version) index of events and
# the (bounded_context, aggregate_type, aggregate_id) key of aggregate_heads. A btree
# row holds at most 2,704 bytes with the default 8 kB pages, and PostgreSQL raises
# ProgramLimitExceeded beyond that (compressible text may squeeze under it, random ids
# do not). 255 + 255 + 2,000 bytes plus the version and per-row overhead (under 50
# bytes) leave some 150 bytes spare. SQLite, which indexes any length, is held to the
# same limits, so an application never meets them for the first time in production.

#: Longest ``aggregate_id`` accepted by :meth:`EventStore.append`, in UTF-8 bytes.
MAX_AGGREGATE_ID_BYTES = 2000
#: Longest ``bounded_context`` accepted by :meth:`EventStore.append`, in UTF-8 bytes.
MAX_BOUNDED_CONTEXT_BYTES = 255
#: Longest ``aggregate_type`` accepted by :meth:`EventStore.append`, in UTF-8 bytes.
MAX_AGGREGATE_TYPE_BYTES = 255

_KEY_MAX_BYTES = {
    "bounded_context": MAX_BOUNDED_CONTEXT_BYTES,
    "aggregate_type": MAX_AGGREGATE_TYPE_BYTES,
    "aggregate_id": MAX_AGGREGATE_ID_BYTES,
}

#: Deepest nesting of arrays and objects accepted in a payload or in metadata
#: (``{"a": [1]}`` is 2 deep, a scalar 0). Python's json encoder and decoder recurse
#: once per level against the interpreter's recursion limit (1,000 frames by default,
#: shared with the caller's own frames), on append and again on every read (psycopg
#: and SQLAlchemy decode JSON with ``json.loads``), so without a limit a value could
#: be stored that some readers cannot decode. 100 is far beyond real payloads and
#: leaves any reader some 900 frames.
MAX_JSON_DEPTH = 100


def _require_max_bytes(what: str, value: str, limit: int) -> None:
    """Refuse text longer than ``limit`` bytes in UTF-8 (checked after ``_require_text``)."""
    if len(value) <= limit // 4:  # no character takes more than 4 bytes
        return
    size = len(value) if value.isascii() else len(value.encode("utf-8"))
    if size > limit:
        raise errors.ValidationError(
            f"{what} is {size:,} bytes in UTF-8 ({value[:32]!r}...); at most {limit:,} "
            "bytes are allowed, because PostgreSQL cannot index longer keys "
            "(use a shorter id, such as a UUID or a hash of the long one)"
        )


def _require_text(what: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise errors.ValidationError(f"{what} must be a non-empty str, got {value!r}")
    if "\x00" in value:
        raise errors.ValidationError(f"{what} contains a NUL character")
    _require_utf8(what, value)


def _require_utf8(what: str, value: str) -> None:
    """Refuse lone surrogates, which no database can store as text."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise errors.ValidationError(f"{what} is not valid Unicode text: {exc}") from exc


#: An escaped U+0000 in JSON text: ``\u0000`` after an even number of backslashes
#: (``\\u0000`` is an escaped backslash followed by the text "u0000").
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _no_json_default(value: object) -> NoReturn:
    raise TypeError(
        f"Object of type {type(value).__name__} is not JSON serializable; give the store a "
        "hook that converts it: EventStore(json_default=eventsource.json_default) handles "
        "Decimal (as exact text, never a float), datetime, date, UUID, Enum, dataclasses "
        "and pydantic models"
    )


def _encoder(default: Callable[[Any], Any]) -> Callable[[object], str]:
    return json.JSONEncoder(
        separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=default
    ).encode


#: One encoder for every value (json.dumps with options builds a new one per call);
#: a store with a ``json_default`` has its own.
_encode = _encoder(_no_json_default)


def _to_json(what: str, value: object, encode: Callable[[object], str] = _encode) -> str:
    try:
        text = encode(value)
    except RecursionError as exc:
        # Deeper than the interpreter's recursion limit allows here: far beyond the limit.
        raise errors.ValidationError(
            f"{what} is nested too deeply to encode (past Python's recursion limit); at "
            f"most {MAX_JSON_DEPTH} levels of arrays and objects are allowed"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise errors.ValidationError(f"{what} is not JSON-serialisable: {exc}") from exc
    # Cheap bound first: nesting needs at least as many brackets as levels.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        depth = _json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise errors.ValidationError(
                f"{what} is nested {depth} levels deep; at most {MAX_JSON_DEPTH} levels of "
                "arrays and objects are allowed"
            )
    # PostgreSQL's jsonb cannot hold U+0000; refuse it on every database alike.
    if "\\u0000" in text and _JSON_NUL.search(text):
        raise errors.ValidationError(f"{what} contains a NUL character (\\u0000)")
    _require_utf8(what, text)
    return text


#: A JSON string as the encoder writes it (quotes and backslashes escaped).
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
#: Everything in JSON text (strings removed) but brackets.
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _json_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON text from ``_encode``."""
    depth = deepest = 0
    for char in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _checked_expectation(expected: ExpectedVersion) -> ExpectedVersion:
    """Refuse hand-built ExpectedVersions that ``any()``/``no_stream()``/``exact()`` never make."""
    if expected.kind == "exact":
        if isinstance(expected.version, bool) or not isinstance(expected.version, int):
            raise errors.ValidationError(
                f"ExpectedVersion.exact() needs an int, got {type(expected.version).__name__}"
            )
        return ExpectedVersion.exact(expected.version)  # refuses < 0; 0 means no_stream
    if expected.kind not in ("any", "no_stream"):
        raise errors.ValidationError(f"unknown ExpectedVersion kind {expected.kind!r}")
    return expected


def _non_negative(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise errors.ValidationError(f"{name} must be an int >= 0, got {value!r}")
    return value


def _satisfies(expected: ExpectedVersion, current: int | None) -> bool:
    if expected.kind == "any":
        return True
    if expected.kind == "no_stream":
        return not current
    return current == expected.version


def _describe(batch: _Batch) -> str:
    return f"{batch.bounded_context}/{batch.aggregate_type}/{batch.aggregate_id}"


def _conflict_error(
    batch: _Batch, expected: ExpectedVersion, actual: int | None
) -> errors.OptimisticConcurrencyError:
    now = "another writer got there first" if actual is None else f"it is at version {actual}"
    return errors.OptimisticConcurrencyError(
        f"{_describe(batch)}: expected {expected}, but {now}",
        bounded_context=batch.bounded_context,
        aggregate_type=batch.aggregate_type,
        aggregate_id=batch.aggregate_id,
        expected=expected,
        actual=actual,
    )


def _persisted(batch: _Batch, stored: list[tuple[int, int]]) -> list[PersistedEvent]:
    return [
        PersistedEvent(
            global_position=position,
            bounded_context=batch.bounded_context,
            aggregate_type=batch.aggregate_type,
            aggregate_id=batch.aggregate_id,
            aggregate_version=version,
            event_id=event.event_id,
            event_type=event.event_type,
            event_version=event.event_version,
            payload=payload,
            metadata=metadata,
            causation_id=event.causation_id,
            correlation_id=event.correlation_id,
            trace_id=event.trace_id,
            created_at=created,
        )
        for event, payload, metadata, created, (version, position) in zip(
            batch.events, batch.payloads, batch.metadatas, batch.created_ats, stored, strict=True
        )
    ]
