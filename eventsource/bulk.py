"""Bulk import: load a history (a migration from another store, test data) at close to
COPY speed, with the guarantees of :meth:`EventStore.append`.

Appending in a loop costs a statement per aggregate, so an import of millions of events
spends its time in round trips. Here the input is streamed in chunks, and a chunk costs
two statements on PostgreSQL, whatever the number of its aggregates:

1. one upsert of its aggregates into ``aggregate_heads``, from arrays, that checks and
   advances their versions, records the writing transaction and refuses an aggregate
   whose last writer is a newer transaction, as an append does (DESIGN invariant 3);
2. one binary COPY of its events, with the versions the upsert returned.

The transaction is marked as a writer of the store before anything else
(``EventStore.mark_writer``, docs/horizon.md): the COPY cannot then be refused for an id
taken early, and projections wait for the import until it commits. Every event goes
through the store's own validation before its chunk writes anything. On SQLite (and
any other database) the same checks run before the writes, in a savepoint per chunk,
and the rows go in with executemany.

The caller owns the transaction: nothing here commits or rolls back it. The import
runs in a savepoint of its own, so an error undoes all of it and leaves the caller's
transaction as it was: an import is all or nothing, whatever the caller does next.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Any, TypeVar

import sqlalchemy as sa

from eventsource import database, errors, horizon, partition, wakeups
from eventsource.events import Event, ExpectedVersion
from eventsource.store import (
    EventStore,
    SessionOrConnection,
    _Batch,
    _check_key,
    _validate,
    check_event,
    connection_of,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "HEAD_CACHE_SIZE",
    "MAX_LISTED_SCOPES",
    "BulkAppendResult",
    "bulk_append",
]

#: Events per chunk: each chunk is validated, then written with two statements.
DEFAULT_CHUNK_SIZE = 5000
#: Past this many distinct (bounded context, aggregate type, partition hash) scopes, an
#: import wakes every processor of the store once instead of listing them: the hint's
#: cost stays small for 100k aggregates (a NOTIFY payload could not list them anyway).
MAX_LISTED_SCOPES = 256

#: Keys per lookup on the generic path, within SQLite's limit of bound parameters.
_LOOKUP_GROUP = 300

_T = TypeVar("_T")
_Key = tuple[str, str, str]

#: What ``_validate`` names an event by (its index in the events it was given).
_EVENT_INDEX = re.compile(r"^events\[(\d+)\]\.?")
_UUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


@dataclass(frozen=True, slots=True)
class BulkAppendResult:
    """What :func:`bulk_append` wrote: how many events, of how many distinct aggregates,
    and the global positions of the first and last (None when nothing was written)."""

    events: int
    aggregates: int
    first_position: int | None
    last_position: int | None


def bulk_append(
    store: EventStore,
    session: SessionOrConnection,
    events: Iterable[Event | tuple[Event, int]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Callable[[int], None] | None = None,
) -> BulkAppendResult:
    """Append a stream of events of any number of aggregates, ``chunk_size`` at a time.

    An item is an :class:`Event`, which gets the next version of its aggregate (after
    what it already has, in the order given), or ``(event, aggregate_version)``, which
    must get exactly that version: otherwise
    :class:`~eventsource.errors.OptimisticConcurrencyError`. Events of many aggregates
    may be interleaved; ``events`` is read once, chunk by chunk (a generator of
    millions is never held in memory). ``progress(n)`` is called after each chunk with
    the number of events it wrote.

    Errors about one item (bad input: :class:`~eventsource.errors.ValidationError`,
    raised before its chunk writes anything; a duplicate event id:
    :class:`~eventsource.errors.DuplicateEventError`; a version conflict) name it as
    ``item N`` (its index in ``events``) and carry that index as ``item_index``.
    After an error nothing of the import remains (it runs in a savepoint) and the
    caller's transaction is usable.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise errors.ValidationError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if progress is not None and not callable(progress):
        raise errors.ValidationError(f"progress must be a function or None, got {progress!r}")
    if isinstance(events, Event | str | bytes) or not isinstance(events, Iterable):
        raise errors.ValidationError(
            "events must be an iterable of Event or (Event, aggregate_version), got "
            f"{type(events).__name__}"
        )
    conn = connection_of(session)
    writer: _Writer
    if conn.dialect.name == "postgresql":
        writer = _PostgresWriter(store, conn)
    else:
        writer = _GenericWriter(store, conn)
    writer.begin()

    written = 0
    aggregates: set[int] = set()  # hashes of keys: 64 bits, a few dozen bytes each
    scopes: set[tuple[str, str, int]] | None = set()  # None: too many to list
    first_id: uuid.UUID | None = None
    last_id: uuid.UUID | None = None
    read = _chunks(iter(events), chunk_size)
    keys: dict[_Key, int] = {}  # keys checked by this import, with their partition hash
    chunk = _Lookahead(store, next(read, None), keys).result()
    if chunk is None:
        return BulkAppendResult(0, 0, None, None)
    # All or nothing: an error undoes everything the import wrote (the savepoint), so
    # the caller's transaction stays usable and can never commit half an import.
    with conn.begin_nested():
        while chunk is not None:
            # The caller's iterator runs here, while the connection is idle (it may use
            # it); validating what it gave waits for the server's side of this chunk.
            ahead = _Lookahead(store, next(read, None), keys)
            writer.write(chunk, ahead)
            written += chunk.size
            if first_id is None:
                first_id = chunk.rows[0][0]
            last_id = chunk.rows[-1][0]
            for key, head in chunk.heads.items():
                aggregates.add(hash(key))
                if scopes is not None:
                    scopes.add((key[0], key[1], head.partition_hash))
                    if len(scopes) > MAX_LISTED_SCOPES:
                        scopes = None
            if progress is not None:
                progress(chunk.size)
            chunk = ahead.result()
        writer.finish()
    if written and store.notify:  # published once the caller commits, as append's
        _note_wake_ups(conn, store.tables.names.events, scopes)
    if first_id is None or last_id is None:
        return BulkAppendResult(0, 0, None, None)
    first, last = _positions(conn, store, first_id, last_id)
    return BulkAppendResult(written, len(aggregates), first, last)


# -- preparing a chunk -------------------------------------------------------------------


@dataclass(slots=True)
class _Head:
    """One aggregate of a chunk: how many events it gets, and what the input requires."""

    event: Event
    """Its first event in the chunk (it names the aggregate)."""
    partition_hash: int
    first_item: int
    count: int = 0
    base: int | None = None
    """The version it must be at before the chunk, when an item gives its version."""
    inconsistent: bool = False
    """Items give versions that no single base satisfies (at least one is wrong)."""
    explicit: list[tuple[int, int, int]] | None = None
    """(item index, position among the aggregate's events of the chunk from 1, version)."""
    next_version: int = 0

    def describe(self) -> str:
        event = self.event
        return f"{event.bounded_context}/{event.aggregate_type}/{event.aggregate_id}"

    def batch(self, store: EventStore) -> _Batch:
        """A batch naming the aggregate, for the store's error helpers (error paths only)."""
        return _validate([self.event], store._encode)


#: One validated event as the writers need it: event id, event type, event version,
#: payload and metadata (JSON text), causation, correlation and trace ids, created_at.
_Row = tuple[uuid.UUID, str, int, str, str | None, str | None, str | None, str | None, datetime]


@dataclass(slots=True)
class _Chunk:
    """Validated events in input order (a tuple each, and the aggregate each belongs
    to) and their aggregates.

    A tuple per event rather than a list per column: interleaved input costs a Python
    call per event at best, and ten ``list.append`` calls per event were a quarter of
    its client time.
    """

    start: int
    heads: dict[_Key, _Head] = field(default_factory=dict)
    owners: list[_Head] = field(default_factory=list)
    rows: list[_Row] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.rows)

    def event_id(self, index: int) -> uuid.UUID:
        """The event id of item ``index`` (of the whole input)."""
        return self.rows[index - self.start][0]

    def item_of(self, event_id: uuid.UUID) -> int | None:
        """The index of the item with this event id (error paths only)."""
        for offset, row in enumerate(self.rows):
            if row[0] == event_id:
                return self.start + offset
        return None

    def versions(self) -> Iterator[tuple[_Head, int]]:
        """(aggregate, aggregate_version) of each event, in input order."""
        for head in self.owners:
            version = head.next_version
            head.next_version = version + 1
            yield head, version


class _Lookahead:
    """The next chunk, validated a run at a time as the writer advances it: while the
    server still inserts the current chunk, interleaved with streaming its rows (so the
    client's work and the server's overlap), or else at the end.

    A validation error is kept until the current chunk is written, so it surfaces where
    it would without the overlap: before its own chunk writes anything.
    """

    def __init__(
        self,
        store: EventStore,
        items: tuple[int, Sequence[object]] | None,
        keys: dict[_Key, int],
    ) -> None:
        self.size = 0 if items is None else len(items[1])
        self.steps = None if items is None else _prepare(store, items[1], items[0], keys)
        self.done = 0
        self.chunk: _Chunk | None = None
        self.error: errors.EventSourceError | None = None

    def advance(self, target: int) -> None:
        """Validate until ``target`` events of the chunk are (or all of them)."""
        while self.steps is not None and self.done < target:
            try:
                self.done = next(self.steps)
            except StopIteration as finished:
                self.chunk, self.steps = finished.value, None
            except errors.EventSourceError as exc:
                self.error, self.steps = exc, None

    def __call__(self) -> None:
        self.advance(self.size + 1)

    def result(self) -> _Chunk | None:
        self()
        if self.error is not None:
            raise self.error
        return self.chunk


def _chunks(items: Iterator[_T], size: int) -> Iterator[tuple[int, list[_T]]]:
    start = 0
    while chunk := list(islice(items, size)):
        yield start, chunk
        start += len(chunk)


def _prepare(
    store: EventStore, items: Sequence[object], start: int, keys: dict[_Key, int]
) -> Generator[int, None, _Chunk]:
    """Validate a chunk (raising for the first bad item) and group it by aggregate,
    yielding the number of events validated after each slice of them.

    Event by event, with the store's own rules (``check_event``; keys once per aggregate
    and import, remembered in ``keys`` with their partition hash): an import's events
    seldom come in runs of one aggregate (an export in global order interleaves them),
    and a call per event costs a third of a batch's.
    """
    if len(keys) >= HEAD_CACHE_SIZE:
        keys.clear()
    encode = store._encode
    now = datetime.now(UTC)
    chunk = _Chunk(start)
    heads = chunk.heads
    seen: set[int] = set()  # event ids as ints: UUID's own hash is a Python call
    checked_type: object = None
    owners, rows = chunk.owners, chunk.rows
    for offset, item in enumerate(items):
        if isinstance(item, Event):
            event, version = item, None
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Event):
            event, version = item
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise _at(
                    errors.ValidationError(
                        f"aggregate_version must be an int >= 1, got {version!r}"
                    ),
                    start + offset,
                )
        else:
            raise _at(
                errors.ValidationError(
                    f"a {type(item).__name__}, not an Event or an (Event, aggregate_version) pair"
                ),
                start + offset,
            )
        key = (event.bounded_context, event.aggregate_type, event.aggregate_id)
        try:
            partition_hash = keys.get(key)
        except TypeError:  # an unhashable key: let the key check name it
            partition_hash = None
        try:
            if partition_hash is None:
                _check_key(key, f"events[{offset}]")
                partition_hash = keys[key] = partition.fnv1a_32(key[2])
            payload, metadata, created = check_event(
                event,
                encode,
                now,
                f"events[{offset}]",
                check_type=event.event_type != checked_type,
            )
        except errors.ValidationError as exc:
            raise _renumbered(exc, start) from None
        checked_type = event.event_type
        event_id = event.event_id
        if event_id.int in seen:
            index = start + offset
            first = chunk.item_of(event_id)
            raise _at(
                errors.DuplicateEventError(
                    f"event_id {event_id} appears twice in the input (also item {first})"
                ),
                index,
            )
        seen.add(event_id.int)
        head = heads.get(key)
        if head is None:
            head = heads[key] = _Head(event, partition_hash, start + offset)
        head.count += 1
        if version is not None:
            _require(head, start + offset, version)
        owners.append(head)
        rows.append(
            (
                event_id,
                event.event_type,
                event.event_version,
                payload,
                metadata,
                event.causation_id,
                event.correlation_id,
                event.trace_id,
                created,
            )
        )
        if not (offset + 1) % _SLICE:
            yield offset + 1
    yield len(items)
    return chunk


def _require(head: _Head, index: int, version: int) -> None:
    """Record that the head's latest event (item ``index``) must get ``version``."""
    if head.explicit is None:
        head.explicit = []
    head.explicit.append((index, head.count, version))
    base = version - head.count
    if base < 0 or (head.base is not None and base != head.base):
        head.inconsistent = True
    head.base = base


def _at(exc: errors.EventSourceError, index: int) -> errors.EventSourceError:
    """Name the item an error is about, in its message and as ``item_index``."""
    exc.args = (f"item {index}: {exc.args[0] if exc.args else ''}", *exc.args[1:])
    exc.item_index = index
    return exc


def _renumbered(exc: errors.ValidationError, start: int) -> errors.EventSourceError:
    """``_validate``'s ``events[i].field ...`` as ``item N: field ...``."""
    message = str(exc)
    found = _EVENT_INDEX.match(message)
    if found is None:
        return _at(exc, start)
    exc.args = (message[found.end() :].lstrip(),)
    return _at(exc, start + int(found.group(1)))


def _expected(head: _Head) -> ExpectedVersion:
    """The expectation an append of the head's events would carry."""
    if head.base is None or head.inconsistent:
        return ExpectedVersion.any()
    return ExpectedVersion.exact(head.base)  # exact(0) is no_stream()


def _version_error(head: _Head, actual: int) -> errors.EventSourceError | None:
    """The first item whose version is not the one it would get after ``actual``."""
    event = head.event
    for index, position, version in head.explicit or ():
        gets = actual + position
        if version != gets:
            return _at(
                errors.OptimisticConcurrencyError(
                    f"{head.describe()}: expected version {version}, but the event would be "
                    f"version {gets} (the aggregate is at version {gets - 1} before it)",
                    bounded_context=event.bounded_context,
                    aggregate_type=event.aggregate_type,
                    aggregate_id=event.aggregate_id,
                    expected=ExpectedVersion.exact(version - 1),
                    actual=gets - 1,
                ),
                index,
            )
    return None


# -- writing -----------------------------------------------------------------------------


class _Writer:
    def __init__(self, store: EventStore, conn: sa.Connection) -> None:
        self.store = store
        self.conn = conn

    def begin(self) -> None:
        raise NotImplementedError

    def write(self, chunk: _Chunk, ahead: _Lookahead) -> None:
        """Write the chunk, advancing ``ahead`` while the database works on it if it can."""
        raise NotImplementedError

    def finish(self) -> None:
        """Write what was held back until the end of the import (nothing by default)."""


#: The columns the COPY writes (``global_position`` and ``transaction_id`` come from
#: their defaults) and the types it sends them as, in binary. JSON goes as the jsonb
#: binary format (a version byte, then the text ``_validate`` made), declared as bytea so
#: psycopg passes the bytes through instead of encoding them again.
_COPY_COLUMNS = (
    ("bounded_context", "text"),
    ("aggregate_type", "text"),
    ("aggregate_id", "text"),
    ("aggregate_version", "int8"),
    ("partition_hash", "int8"),
    ("event_id", "uuid"),
    ("event_type", "text"),
    ("event_version", "int4"),
    ("payload", "bytea"),
    ("metadata", "bytea"),
    ("causation_id", "text"),
    ("correlation_id", "text"),
    ("trace_id", "text"),
    ("created_at", "timestamptz"),
)
_JSONB_VERSION = b"\x01"
#: Aggregates whose versions an import keeps in memory between chunks (about 200
#: bytes each) before writing them to ``aggregate_heads`` and starting afresh. An
#: aggregate's head is then written once per this many aggregates imported, not once
#: per chunk it appears in: what makes input in global order (interleaved
#: aggregates) as fast as input grouped by aggregate.
HEAD_CACHE_SIZE = 100_000
#: Rows of a COPY between two steps of validating the next chunk.
_SLICE = 256

#: Where an event id already in the store came from (the in-input check is per chunk).
_STORED_OR_IMPORTED = "stored before, or earlier in this import"


def _quote(name: str) -> str:
    """An identifier for ``exec_driver_sql`` (this pyformat preparer doubles ``%``)."""
    from sqlalchemy.dialects import postgresql

    preparer = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]
    return str(preparer.quote(name))


class _PostgresWriter(_Writer):
    """Heads from arrays in one statement, events by binary COPY, per chunk.

    A head is locked (and checked, and advanced) by the first chunk that has its
    aggregate; later chunks advance it in memory, and ``finish`` writes the versions.
    Nobody else can move a head this transaction holds locked, so the versions in
    memory are the truth until then.
    """

    def __init__(self, store: EventStore, conn: sa.Connection) -> None:
        super().__init__(store, conn)
        if conn.dialect.driver != "psycopg":
            raise errors.ConfigurationError(
                f"bulk_append on PostgreSQL needs psycopg 3 (postgresql+psycopg://), not "
                f"{conn.dialect.driver!r}"
            )
        if conn.dialect.is_async:
            raise errors.ConfigurationError(
                "bulk_append needs a synchronous engine (its COPY runs on the driver "
                "connection); import from a script or `eventsource import`, not through "
                "an async engine's run_sync"
            )
        from psycopg import sql

        names = store.tables.names
        heads = _quote(names.aggregate_heads)
        columns = "bounded_context, aggregate_type, aggregate_id, version, transaction_id"
        key = "bounded_context, aggregate_type, aggregate_id"
        # Invariant 3: a transaction older than the aggregate's last writer may not write
        # to it. The three writes take disjoint rows (by what the item versions say),
        # as append's three statements do: any version, a new stream, an exact version.
        # Binary parameters (%b): psycopg dumps text arrays several times faster so.
        not_older = "h.transaction_id <= pg_current_xact_id()"
        self.heads_sql = f"""
            WITH input AS (
                SELECT * FROM unnest(
                    %(bc)b::text[], %(at)b::text[], %(aid)b::text[], %(n)b::int8[],
                    %(base)b::int8[]) AS i(bc, at, aid, n, base)
            ), any_version AS (
                INSERT INTO {heads} AS h ({columns})
                SELECT bc, at, aid, n, pg_current_xact_id() FROM input WHERE base IS NULL
                ON CONFLICT ({key}) DO UPDATE
                    SET version = h.version + EXCLUDED.version,
                        transaction_id = pg_current_xact_id()
                    WHERE {not_older}
                RETURNING h.bounded_context, h.aggregate_type, h.aggregate_id, h.version
            ), new_stream AS (
                INSERT INTO {heads} ({columns})
                SELECT bc, at, aid, n, pg_current_xact_id() FROM input WHERE base = 0
                ON CONFLICT ({key}) DO NOTHING
                RETURNING bounded_context, aggregate_type, aggregate_id, version
            ), exact_version AS (
                UPDATE {heads} AS h
                SET version = h.version + i.n, transaction_id = pg_current_xact_id()
                FROM input AS i
                WHERE i.base > 0 AND h.bounded_context = i.bc AND h.aggregate_type = i.at
                    AND h.aggregate_id = i.aid AND h.version = i.base AND {not_older}
                RETURNING h.bounded_context, h.aggregate_type, h.aggregate_id, h.version
            )
            SELECT * FROM any_version
            UNION ALL SELECT * FROM new_stream
            UNION ALL SELECT * FROM exact_version"""
        self.copy_sql = (
            sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)")
            .format(
                sql.Identifier(names.events),
                sql.SQL(", ").join(sql.Identifier(name) for name, _ in _COPY_COLUMNS),
            )
            .as_string(conn.connection.driver_connection)
        )
        self.copy_types = [kind for _, kind in _COPY_COLUMNS]
        # Heads locked by this import, by version after what it wrote (see write()).
        self.versions: dict[_Key, int] = {}
        self.dirty: set[_Key] = set()
        self.flush_sql = f"""
            UPDATE {heads} AS h SET version = i.v
            FROM unnest(%(bc)b::text[], %(at)b::text[], %(aid)b::text[], %(v)b::int8[])
                AS i(bc, at, aid, v)
            WHERE h.bounded_context = i.bc AND h.aggregate_type = i.at
                AND h.aggregate_id = i.aid"""

    def begin(self) -> None:
        try:
            self.store.mark_writer(self.conn)  # before the transaction takes an id
        except sa.exc.DBAPIError as exc:
            database.raise_if_schema_missing(exc, self.store.tables.names, own_statement=True)
            raise

    def write(self, chunk: _Chunk, ahead: _Lookahead) -> None:
        versions, dirty = self.versions, self.dirty
        fresh: dict[_Key, _Head] = {}  # aggregates this import has not touched yet
        for key, head in chunk.heads.items():
            known = versions.get(key)
            if known is None:
                if head.inconsistent:
                    raise self.conflict(head)
                fresh[key] = head
                continue
            # Locked by this transaction since the import first touched it: the version
            # here is the truth, checked and advanced without a statement.
            if head.inconsistent or (head.base is not None and head.base != known):
                error = _version_error(head, known)
                assert error is not None  # some item's version is not the next one
                raise error
            head.next_version = known + 1
            versions[key] = known + head.count
            dirty.add(key)
        if fresh:
            self.lock_heads(fresh)
        self.copy(chunk, ahead)
        if len(versions) >= HEAD_CACHE_SIZE:
            self.finish()

    def lock_heads(self, fresh: dict[_Key, _Head]) -> None:
        """Check, advance and lock the heads of aggregates new to the import, in one
        statement, as append would (invariant 3 included), and remember their versions."""
        params: dict[str, list[Any]] = {"bc": [], "at": [], "aid": [], "n": [], "base": []}
        bcs, ats, aids, ns, bases = params.values()
        for (bc, at, aid), head in fresh.items():
            bcs.append(bc)
            ats.append(at)
            aids.append(aid)
            ns.append(head.count)
            bases.append(head.base)
        try:
            rows = self.conn.exec_driver_sql(self.heads_sql, params).all()
        except sa.exc.DBAPIError as exc:
            database.raise_if_schema_missing(exc, self.store.tables.names, own_statement=True)
            raise
        for bc, at, aid, version in rows:
            key = (bc, at, aid)
            head = fresh[key]
            head.next_version = version - head.count + 1
            self.versions[key] = version
        if len(rows) != len(fresh):
            # Heads of this chunk may have moved already: the caller's savepoint around
            # the import undoes them with everything else.
            raise self.conflict(next(h for h in fresh.values() if not h.next_version))

    def finish(self) -> None:
        """Write the versions of heads advanced since they were locked, and forget them
        all (the cache holds at most ``HEAD_CACHE_SIZE`` aggregates)."""
        if self.dirty:
            params: dict[str, list[Any]] = {"bc": [], "at": [], "aid": [], "v": []}
            bcs, ats, aids, vs = params.values()
            for key in self.dirty:
                bcs.append(key[0])
                ats.append(key[1])
                aids.append(key[2])
                vs.append(self.versions[key])
            self.conn.exec_driver_sql(self.flush_sql, params)
        self.versions.clear()
        self.dirty.clear()

    def conflict(self, head: _Head) -> errors.EventSourceError:
        """What append would raise for this aggregate, naming the item to blame."""
        error = self.store._conflict(self.conn, head.batch(self.store), _expected(head))
        if isinstance(error, errors.OptimisticConcurrencyError) and error.actual is not None:
            by_version = _version_error(head, error.actual)
            if by_version is not None:
                return by_version
        return _at(error, head.first_item)

    def copy(self, chunk: _Chunk, ahead: _Lookahead) -> None:
        import psycopg

        raw: Any = self.conn.connection.driver_connection  # joins the caller's transaction
        version_byte = _JSONB_VERSION
        try:
            with raw.cursor() as cursor, cursor.copy(self.copy_sql) as copy:
                copy.set_types(self.copy_types)
                write = copy.write_row
                columns = zip(chunk.versions(), chunk.rows, strict=True)
                size, share = chunk.size, ahead.size
                for n, (
                    (head, version),
                    (
                        event_id,
                        event_type,
                        event_version,
                        payload,
                        metadata,
                        causation_id,
                        correlation_id,
                        trace_id,
                        created_at,
                    ),
                ) in enumerate(columns, 1):
                    event = head.event
                    write(
                        (
                            event.bounded_context,
                            event.aggregate_type,
                            event.aggregate_id,
                            version,
                            head.partition_hash,
                            event_id,
                            event_type,
                            event_version,
                            version_byte + payload.encode(),
                            None if metadata is None else version_byte + metadata.encode(),
                            causation_id,
                            correlation_id,
                            trace_id,
                            created_at,
                        )
                    )
                    if not n % _SLICE:
                        # The server inserts what was sent while the client validates
                        # the next chunk's share of it: neither waits for the other.
                        ahead.advance(n * share // size)
                ahead()
        except psycopg.Error as exc:
            # SQLAlchemy did not run the COPY: its own error path wraps the error in its
            # DBAPIError subclass, invalidates a lost connection, runs handle_error hooks.
            try:
                self.conn._handle_dbapi_exception(exc, self.copy_sql, {}, None, None)
            except sa.exc.DBAPIError as wrapped:
                raise self.copy_error(wrapped, chunk) from exc
            raise  # pragma: no cover - the handler always raises

    def copy_error(self, wrapped: sa.exc.DBAPIError, chunk: _Chunk) -> BaseException:
        """A COPY failure as append reports its insert's."""
        exc = wrapped.orig
        first = chunk.owners[0].event
        refused = horizon.refusal(
            wrapped,
            first.bounded_context,
            first.aggregate_type,
            first.aggregate_id,
            self.store.tables.names.events,
        )
        if refused is not None:
            return refused
        if isinstance(wrapped, sa.exc.IntegrityError):
            index, head = self.culprit(exc, chunk)
            error = self.store._translate_integrity_error(
                wrapped, head.batch(self.store), _expected(head)
            )
            if index is None:
                return error
            if isinstance(error, errors.DuplicateEventError):
                error.args = (
                    f"{head.describe()}: event id {chunk.event_id(index)} is already in the "
                    f"store ({_STORED_OR_IMPORTED}; the import is undone)",
                )
            return _at(error, index)
        database.raise_if_schema_missing(wrapped, self.store.tables.names, own_statement=True)
        return wrapped

    @staticmethod
    def culprit(exc: BaseException | None, chunk: _Chunk) -> tuple[int | None, _Head]:
        """The item (when the server's detail names its event id) or the aggregate (when
        it names its key) a unique violation is about."""
        detail = str(getattr(getattr(exc, "diag", None), "message_detail", None) or "")
        for found in _UUID.findall(detail):
            index = chunk.item_of(uuid.UUID(found))
            if index is not None:
                return index, chunk.owners[index - chunk.start]
        for head in chunk.heads.values():
            event = head.event
            if f"({event.bounded_context}, {event.aggregate_type}, {event.aggregate_id}, " in (
                detail
            ):
                return head.first_item, head
        return None, chunk.owners[0]


class _GenericWriter(_Writer):
    """SQLite (and any other database): read, check, then write, in a savepoint per chunk.

    Writers are serialised by ``BEGIN IMMEDIATE``, so nothing can move between the check
    and the write; the savepoint undoes a chunk that fails halfway.
    """

    def __init__(self, store: EventStore, conn: sa.Connection) -> None:
        super().__init__(store, conn)
        tables = store.tables
        heads, events = tables.aggregate_heads, tables.events
        key = sa.tuple_(heads.c.bounded_context, heads.c.aggregate_type, heads.c.aggregate_id)
        self.current = sa.select(
            heads.c.bounded_context, heads.c.aggregate_type, heads.c.aggregate_id, heads.c.version
        ).where(key.in_(sa.bindparam("keys", expanding=True)))
        self.stored = sa.select(events.c.event_id).where(
            events.c.event_id.in_(sa.bindparam("ids", expanding=True))
        )
        self.insert_heads = heads.insert()
        self.update_heads = (
            heads.update()
            .where(
                heads.c.bounded_context == sa.bindparam("b_bc"),
                heads.c.aggregate_type == sa.bindparam("b_at"),
                heads.c.aggregate_id == sa.bindparam("b_aid"),
            )
            .values(version=sa.bindparam("b_version"))
        )
        # The JSON text _validate made, as append writes it (one encoding everywhere).
        self.insert_events = events.insert().values(
            payload=sa.bindparam("payload", type_=sa.Text()),
            metadata=sa.bindparam("metadata", type_=sa.Text()),
        )

    def begin(self) -> None:
        # The stdlib driver's own transaction handling would let the savepoints' RELEASE
        # commit the caller's transaction (see EventStore._append_generic).
        database.require_configured(self.conn, what="bulk_append")

    def write(self, chunk: _Chunk, ahead: _Lookahead) -> None:
        self.insert(chunk)
        ahead()  # SQLite works in this process: nothing to overlap

    def insert(self, chunk: _Chunk) -> None:
        conn = self.conn
        try:
            with conn.begin_nested():
                current: dict[_Key, int] = {}
                for keys in _groups(list(chunk.heads), _LOOKUP_GROUP):
                    for bc, at, aid, version in conn.execute(self.current, {"keys": keys}):
                        current[(bc, at, aid)] = int(version)
                for key, head in chunk.heads.items():
                    actual = current.get(key, 0)
                    if head.inconsistent or (head.base is not None and head.base != actual):
                        error = _version_error(head, actual)
                        assert error is not None  # some item's version differs from actual's
                        raise error
                    head.next_version = actual + 1
                for ids in _groups([row[0] for row in chunk.rows], _LOOKUP_GROUP * 3):
                    taken = conn.execute(self.stored, {"ids": ids}).scalars().first()
                    if taken is not None:
                        index = chunk.item_of(taken)
                        assert index is not None  # looked up among the chunk's ids
                        raise _at(
                            errors.DuplicateEventError(
                                f"{chunk.owners[index - chunk.start].describe()}: event id "
                                f"{taken} is already in the store ({_STORED_OR_IMPORTED})"
                            ),
                            index,
                        )
                created: list[dict[str, Any]] = []
                moved: list[dict[str, Any]] = []
                for (bc, at, aid), head in chunk.heads.items():
                    if (bc, at, aid) in current:
                        version = current[(bc, at, aid)] + head.count
                        moved.append({"b_bc": bc, "b_at": at, "b_aid": aid, "b_version": version})
                    else:
                        created.append(
                            {
                                "bounded_context": bc,
                                "aggregate_type": at,
                                "aggregate_id": aid,
                                "version": head.count,
                            }
                        )
                if created:
                    conn.execute(self.insert_heads, created)
                if moved:
                    conn.execute(self.update_heads, moved)
                conn.execute(self.insert_events, list(self.rows(chunk)))
        except sa.exc.IntegrityError as exc:
            # Only reachable if rows were written around the heads table.
            head = chunk.owners[0]
            raise _at(
                self.store._translate_integrity_error(exc, head.batch(self.store), _expected(head)),
                chunk.start,
            ) from exc
        except sa.exc.DBAPIError as exc:
            database.raise_if_schema_missing(exc, self.store.tables.names, own_statement=True)
            raise

    @staticmethod
    def rows(chunk: _Chunk) -> Iterator[dict[str, Any]]:
        for (head, version), row in zip(chunk.versions(), chunk.rows, strict=True):
            event = head.event
            yield {
                "bounded_context": event.bounded_context,
                "aggregate_type": event.aggregate_type,
                "aggregate_id": event.aggregate_id,
                "aggregate_version": version,
                "partition_hash": head.partition_hash,
                "event_id": row[0],
                "event_type": row[1],
                "event_version": row[2],
                "payload": row[3],
                "metadata": row[4],
                "causation_id": row[5],
                "correlation_id": row[6],
                "trace_id": row[7],
                "created_at": row[8],
            }


def _groups(values: list[_T], size: int) -> Iterator[list[_T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


# -- after writing -----------------------------------------------------------------------


def _positions(
    conn: sa.Connection, store: EventStore, first_id: uuid.UUID, last_id: uuid.UUID
) -> tuple[int, int]:
    """The positions of the first and last events: the lowest and highest written, as
    positions follow the input (one session, chunk after chunk, row after row)."""
    events = store.tables.events
    position = events.c.global_position
    query = sa.select(sa.func.min(position), sa.func.max(position)).where(
        events.c.event_id.in_([first_id, last_id])
    )
    first, last = conn.execute(query).one()
    return int(first), int(last)


def _note_wake_ups(
    conn: sa.Connection, events_table: str, scopes: set[tuple[str, str, int]] | None
) -> None:
    if scopes is None:
        wakeups.note_broad_append(conn, events_table)
        return
    for bounded_context, aggregate_type, partition_hash in scopes:
        wakeups.note_append(conn, events_table, bounded_context, aggregate_type, partition_hash)
