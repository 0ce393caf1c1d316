"""Dead letters: events a projection quarantined instead of stopping on them.

A projection opts in with ``on_error`` (:class:`~eventsource.projection.OnError`).
When its handler raises a permanent error (not :func:`eventsource.retry.is_transient`),
the processor rolls back that event's savepoint, stores the event here with the error,
and moves the checkpoint past it in the batch's own transaction: the rest of the batch
commits once (DESIGN invariant 1), and the dead letter exists exactly when the event
was not applied. With ``QUARANTINE_AGGREGATE`` every later event of the same
aggregate is stored too, *parked* behind the failed one (``parked_behind``), and not
applied until that one is resolved, so each aggregate's events still reach the read
model in version order (invariant 3).

Operators resolve them with :func:`retry` (after fixing the handler: re-applies the
event, then its parked followers in version order, exactly once, and deletes the
entries) or :func:`discard` (the projection never applies the event). Both take the
projection's exclusive lock first, the one whose shared side every batch holds, so
they never run beside a batch of that projection (invariant 6). A reset or rebuild
deletes the projection's dead letters with its checkpoints: the replay quarantines
again whatever still fails.
"""

from __future__ import annotations

import logging
import traceback as tb
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from eventsource import database, errors, models
from eventsource.events import PersistedEvent
from eventsource.processor import ProcessorConfig, lock_projection, read_committed
from eventsource.projection import OnError, Projection
from eventsource.rebuild import DEFAULT_WAIT
from eventsource.retry import is_transient
from eventsource.store import (
    EVENT_COLUMNS,
    EventStore,
    SessionOrConnection,
    connection_of,
    event_from_row,
)

logger = logging.getLogger("eventsource.deadletters")

#: Longest error message stored (characters); longer ones are cut.
MAX_ERROR_MESSAGE = 2_000
#: Longest traceback stored (characters): its end is kept, where the error was raised.
MAX_TRACEBACK = 8_000

_AggregateKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event a projection did not apply: it failed, or is parked behind one that did."""

    id: int
    projection: str
    partition_key: int
    total_partitions: int
    global_position: int
    event_id: uuid.UUID
    bounded_context: str
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int
    event_type: str
    parked_behind: int | None
    """The dead letter (of the same aggregate) this event waits for; None: it failed itself."""
    attempts: int
    """Handler failures on this event (0: parked, never attempted)."""
    error_type: str | None
    error_message: str | None
    traceback: str | None
    """The end of the last failure's traceback."""
    created_at: datetime
    last_failed_at: datetime | None

    @property
    def parked(self) -> bool:
        return self.parked_behind is not None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (ids as text, times in ISO 8601)."""
        data = asdict(self)
        data["event_id"] = str(self.event_id)
        data["created_at"] = self.created_at.isoformat()
        data["last_failed_at"] = self.last_failed_at.isoformat() if self.last_failed_at else None
        return data


@dataclass(frozen=True, slots=True)
class RetryResult:
    """What retrying one dead letter did.

    ``status``: ``applied`` (the event and its parked followers were applied, their
    entries deleted); ``failed`` (the event failed again: only its attempts and error
    changed); ``stopped`` (the event applied, then parked follower ``blocked_by``
    failed and now heads the aggregate; the events before it were applied); ``gone``
    (resolved meanwhile by someone else: nothing done).
    """

    id: int
    projection: str
    global_position: int
    status: Literal["applied", "failed", "stopped", "gone"]
    applied: tuple[int, ...] = ()
    """Global positions applied, in order."""
    blocked_by: int | None = None
    """The dead letter that failed (this one when ``failed``)."""
    error: str | None = None
    attempts: int = 0
    """Attempts of the entry that failed, this one included."""

    @property
    def ok(self) -> bool:
        return self.status in ("applied", "gone")


@dataclass(frozen=True, slots=True)
class DiscardResult:
    """What :func:`discard` removed, and which parked events now head their aggregate."""

    discarded: tuple[DeadLetter, ...]
    new_heads: tuple[int, ...] = ()
    """Parked events promoted when the head they waited for was discarded: their
    aggregate stays parked until they are retried or discarded in turn."""


def list_dead_letters(
    target: sa.Engine | SessionOrConnection,
    *,
    projection: str | None = None,
    store: EventStore | None = None,
) -> list[DeadLetter]:
    """Every dead letter (of ``projection`` only, if given), by projection, then in the
    order they were stored (a failed event before the events parked behind it)."""
    store = store or EventStore()
    table = store.tables.dead_letters
    query = sa.select(table).order_by(table.c.projection_name, table.c.id)
    if projection is not None:
        query = query.where(table.c.projection_name == projection)
    if isinstance(target, sa.Engine):
        with target.connect() as connection:
            # Only reads: on SQLite do not queue behind writers for the write lock.
            connection.execution_options(**{database.READ_ONLY_OPTION: True})
            return _read(connection, store, query)
    return _read(connection_of(target), store, query)


def retry(
    engine: sa.Engine,
    ids: Iterable[int],
    projections: Projection | Iterable[Projection],
    *,
    store: EventStore | None = None,
    wait: float | None = DEFAULT_WAIT,
) -> list[RetryResult]:
    """Re-apply dead letters through their projection's handler, exactly once each.

    Fix the handler first. Each id runs in its own transaction, under its projection's
    exclusive lock (waiting up to ``wait`` seconds for the batches in hand, then
    :class:`~eventsource.errors.ProjectionBusyError`): the event is applied with
    ``handle_batch([event], session)`` in a savepoint and its entry deleted, then
    likewise each event parked behind it, in version order. A permanent failure
    changes nothing but the failing entry's attempts and error (see
    :class:`RetryResult`); a transient one is raised with everything rolled back.

    ``projections`` must include each entry's projection. A parked event is retried
    through its head, so it is refused alone (:class:`~eventsource.errors.DeadLetterError`,
    nothing retried) unless its head is among ``ids``.
    """
    store = store or EventStore()
    by_name = _projections_by_name(projections)
    wanted = _ids(ids)
    table = store.tables.dead_letters
    sessions = _sessions(engine)
    with sessions() as session:
        entries = {entry.id: entry for entry in _load(session, store, wanted)}
    _refuse_unknown(wanted, entries, "retried")
    heads: list[DeadLetter] = []
    for entry_id in wanted:
        entry = entries[entry_id]
        if entry.parked_behind is not None and entry.parked_behind not in entries:
            raise errors.DeadLetterError(
                f"dead letter {entry.id} (event {entry.global_position}) is parked behind "
                f"dead letter {entry.parked_behind} of the same aggregate: retry "
                f"{entry.parked_behind}, which applies it afterwards in version order, or "
                "discard it; nothing was retried"
            )
        if entry.projection not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            raise errors.DeadLetterError(
                f"dead letter {entry.id} belongs to projection {entry.projection!r}, which is "
                f"not among the projections given ({known}): pass the application that "
                "defines it; nothing was retried"
            )
        if entry.parked_behind is None:
            heads.append(entry)
    results: list[RetryResult] = []
    for head in heads:
        projection = by_name[head.projection]
        with sessions() as session, session.begin():
            lock_projection(session, head.projection, store=store, timeout=wait)
            results.append(_retry_one(session, store, table, projection, head.id))
    return results


def discard(
    engine: sa.Engine,
    ids: Iterable[int],
    *,
    store: EventStore | None = None,
    wait: float | None = DEFAULT_WAIT,
) -> DiscardResult:
    """Delete dead letters for good: their projection never applies those events.

    Runs in one transaction under the exclusive lock of each projection concerned
    (``wait`` as in :func:`retry`). Discarding the head of a parked aggregate releases
    nothing by itself: the earliest event parked behind it becomes the new head (never
    attempted) and the aggregate stays parked until that one is retried or discarded
    too; pass every id of the aggregate to drop them all. Unknown ids are refused
    (:class:`~eventsource.errors.DeadLetterError`) before anything is deleted.
    """
    store = store or EventStore()
    wanted = _ids(ids)
    table = store.tables.dead_letters
    with _sessions(engine)() as session, session.begin():
        names = {entry.projection for entry in _load(session, store, wanted)}
        for name in sorted(names):  # one order for every caller: no deadlock between two
            lock_projection(session, name, store=store, timeout=wait)
        entries = {entry.id: entry for entry in _load(session, store, wanted)}
        _refuse_unknown(wanted, entries, "discarded")
        new_heads: list[int] = []
        for entry in entries.values():
            if entry.parked_behind is not None:
                continue
            followers = [
                row_id
                for row_id in session.execute(
                    sa.select(table.c.id)
                    .where(table.c.parked_behind == entry.id)
                    .order_by(table.c.aggregate_version)
                ).scalars()
                if row_id not in entries
            ]
            if followers:
                _promote(session, table, followers[0], followers[1:])
                new_heads.append(followers[0])
        session.execute(table.delete().where(table.c.id.in_(list(entries))))
    for entry in entries.values():
        logger.info(
            "discarded dead letter %d: projection %s will not apply event %d (%s of %s %s)",
            entry.id,
            entry.projection,
            entry.global_position,
            entry.event_type,
            entry.aggregate_type,
            entry.aggregate_id,
            extra={"dead_letter_id": entry.id, **_event_fields(entry)},
        )
    return DiscardResult(tuple(entries[i] for i in wanted if i in entries), tuple(new_heads))


# -- the batch side (called by the processor) -------------------------------------------


def apply_quarantining(
    session: Session,
    projection: Projection,
    events: Sequence[PersistedEvent],
    *,
    tables: models.Tables,
    config: ProcessorConfig,
    handler_error: Callable[[PersistedEvent | list[PersistedEvent], Exception], Exception],
    metrics: object | None,
    fields: dict[str, Any],
) -> int:
    """Apply a batch's events for a projection that quarantines; return how many applied.

    Each event runs in its own savepoint; one whose handler raises a permanent error is
    rolled back to it and stored as a dead letter in the batch's transaction. A
    projection overriding ``handle_batch`` first gets the whole batch in one
    savepoint, and only if that fails one event at a time. Transient errors are raised
    (as :meth:`Processor._handler_error <eventsource.processor.Processor>` makes them),
    so the whole batch is retried and nothing is quarantined. The log lines and the
    metric follow the commit, so a batch rolled back afterwards reports nothing.
    """
    sequenced = projection.on_error is OnError.QUARANTINE_AGGREGATE
    table = tables.dead_letters
    name = projection.checkpoint_name  # each version of a projection has its own
    parked = _parked_heads(session, table, name, config) if sequenced else {}
    whole = type(projection).handle_batch is not Projection.handle_batch
    stored: list[tuple[PersistedEvent, int, int | None, BaseException | None]] = []

    def attempt(failed: PersistedEvent | list[PersistedEvent]) -> Exception | None:
        """Apply ``failed`` in a savepoint: its permanent error, or None."""
        try:
            with session.begin_nested():
                if isinstance(failed, list):
                    projection.handle_batch(failed, session)
                elif whole:
                    projection.handle_batch([failed], session)
                else:
                    projection.handle(failed, session)
        except Exception as exc:
            if is_transient(exc):
                raise handler_error(failed, exc) from exc
            return exc
        return None

    def park(event: PersistedEvent, head: int) -> None:
        row_id = _store(session, table, name, config, event, parked_behind=head)
        stored.append((event, row_id, head, None))

    free = [event for event in events if _key(event) not in parked]
    if whole and free and attempt(free) is None:
        for event in events:
            head = parked.get(_key(event))
            if head is not None:
                park(event, head)
        _report(session, stored, projection, config, metrics, fields)
        return len(free)
    handled = 0
    for event in events:
        key = _key(event)
        head = parked.get(key)
        if head is not None:
            park(event, head)
            continue
        failure = attempt(event)
        if failure is None:
            handled += 1
            continue
        row_id = _store(session, table, name, config, event, error=failure)
        stored.append((event, row_id, None, failure))
        if sequenced:
            parked[key] = row_id
    _report(session, stored, projection, config, metrics, fields)
    return handled


# -- internals ----------------------------------------------------------------------------


def _sessions(engine: sa.Engine) -> Callable[[], Session]:
    if not isinstance(engine, sa.Engine):
        raise errors.ConfigurationError(
            f"dead-letter operations need an Engine, got {type(engine).__name__}"
        )
    bind = read_committed(engine)  # as batches: see processor.read_committed

    def make() -> Session:
        return Session(bind, expire_on_commit=False)

    return make


def _ids(ids: Iterable[int]) -> list[int]:
    if isinstance(ids, int | str):
        raise errors.ConfigurationError(f"ids must be a list of dead-letter ids, got {ids!r}")
    wanted: list[int] = []
    for value in ids:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise errors.ConfigurationError(f"dead-letter ids are ints >= 1, got {value!r}")
        if value not in wanted:
            wanted.append(value)
    return wanted


def _projections_by_name(projections: Projection | Iterable[Projection]) -> dict[str, Projection]:
    items = [projections] if isinstance(projections, Projection) else list(projections)
    by_name: dict[str, Projection] = {}
    for item in items:
        if not isinstance(item, Projection):
            raise errors.ConfigurationError(f"expected Projection instances, got {item!r}")
        if by_name.setdefault(item.checkpoint_name, item) is not item:
            raise errors.ConfigurationError(f"two projections are named {item.checkpoint_name!r}")
    return by_name


def _refuse_unknown(wanted: list[int], entries: dict[int, DeadLetter], what: str) -> None:
    unknown = [entry_id for entry_id in wanted if entry_id not in entries]
    if unknown:
        listed = ", ".join(str(entry_id) for entry_id in unknown)
        raise errors.DeadLetterError(
            f"no dead letter with id {listed} (already retried or discarded? see "
            f"`eventsource dead-letters list`); nothing was {what}"
        )


def _read(conn: sa.Connection, store: EventStore, query: sa.Select[Any]) -> list[DeadLetter]:
    try:
        rows = conn.execute(query).mappings().all()
    except sa.exc.DBAPIError as exc:
        raise _missing_table(exc, store.tables.dead_letters) from exc
    return [_dead_letter(row) for row in rows]


def _load(session: Session, store: EventStore, ids: list[int]) -> list[DeadLetter]:
    table = store.tables.dead_letters
    return _read(session.connection(), store, sa.select(table).where(table.c.id.in_(ids)))


def _dead_letter(row: sa.RowMapping) -> DeadLetter:
    return DeadLetter(
        id=int(row["id"]),
        projection=row["projection_name"],
        partition_key=row["partition_key"],
        total_partitions=row["total_partitions"],
        global_position=int(row["global_position"]),
        event_id=row["event_id"],
        bounded_context=row["bounded_context"],
        aggregate_type=row["aggregate_type"],
        aggregate_id=row["aggregate_id"],
        aggregate_version=int(row["aggregate_version"]),
        event_type=row["event_type"],
        parked_behind=None if row["parked_behind"] is None else int(row["parked_behind"]),
        attempts=row["attempts"],
        error_type=row["error_type"],
        error_message=row["error_message"],
        traceback=row["traceback"],
        created_at=row["created_at"],
        last_failed_at=row["last_failed_at"],
    )


def _missing_table(exc: sa.exc.DBAPIError, table: sa.Table) -> Exception:
    """SchemaMissingError when ``exc`` says the dead-letter table does not exist."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == "42P01" or "no such table" in str(orig):
        return errors.SchemaMissingError(
            f"the database has no {table.name} table (added by the library's migration "
            "es0003, for projections with on_error=OnError.QUARANTINE*): run `eventsource db "
            "upgrade` (or `alembic upgrade head`, or eventsource.upgrade(engine))"
        )
    return exc


def _key(event: PersistedEvent | DeadLetter) -> _AggregateKey:
    return (event.bounded_context, event.aggregate_type, event.aggregate_id)


def _parked_heads(
    session: Session, table: sa.Table, name: str, config: ProcessorConfig
) -> dict[_AggregateKey, int]:
    """The parked aggregates of this projection partition: key -> id of their head.

    One index range per batch (empty unless something is parked). Several heads of one
    aggregate exist only after a switch from QUARANTINE: the earliest one wins.
    """
    query = (
        sa.select(table.c.id, table.c.bounded_context, table.c.aggregate_type, table.c.aggregate_id)
        .where(
            table.c.projection_name == name,
            table.c.partition_key == config.partition_key,
            table.c.parked_behind.is_(None),
        )
        .order_by(table.c.aggregate_version.desc())
    )
    try:
        rows = session.execute(query).all()
    except sa.exc.DBAPIError as exc:
        raise _missing_table(exc, table) from exc
    return {(bc, at, ai): int(row_id) for row_id, bc, at, ai in rows}


def _store(
    session: Session,
    table: sa.Table,
    name: str,
    config: ProcessorConfig,
    event: PersistedEvent,
    *,
    parked_behind: int | None = None,
    error: BaseException | None = None,
) -> int:
    """Insert the dead letter for ``event`` in the batch's transaction; its id.

    An event already stored for this projection (only after its checkpoint was moved
    back by hand) is updated in place, its attempts added up, rather than failing.
    """
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "projection_name": name,
        "partition_key": config.partition_key,
        "total_partitions": config.total_partitions,
        "global_position": event.global_position,
        "event_id": event.event_id,
        "bounded_context": event.bounded_context,
        "aggregate_type": event.aggregate_type,
        "aggregate_id": event.aggregate_id,
        "aggregate_version": event.aggregate_version,
        "event_type": event.event_type,
        "parked_behind": parked_behind,
        "created_at": now,
        **_failure(error, now),
    }
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    upsert = insert.values(values)
    statement = upsert.on_conflict_do_update(
        index_elements=[table.c.projection_name, table.c.global_position],
        set_={
            "partition_key": upsert.excluded.partition_key,
            "total_partitions": upsert.excluded.total_partitions,
            "parked_behind": upsert.excluded.parked_behind,
            "attempts": table.c.attempts + upsert.excluded.attempts,
            "error_type": upsert.excluded.error_type,
            "error_message": upsert.excluded.error_message,
            "traceback": upsert.excluded.traceback,
            "last_failed_at": upsert.excluded.last_failed_at,
        },
    ).returning(table.c.id)
    try:
        return int(session.execute(statement).scalar_one())
    except sa.exc.DBAPIError as exc:
        raise _missing_table(exc, table) from exc


def _failure(error: BaseException | None, now: datetime) -> dict[str, Any]:
    if error is None:
        return {
            "attempts": 0,
            "error_type": None,
            "error_message": None,
            "traceback": None,
            "last_failed_at": None,
        }
    trace = "".join(tb.format_exception(error))
    if len(trace) > MAX_TRACEBACK:
        trace = "...\n" + trace[-MAX_TRACEBACK:]
    return {
        "attempts": 1,
        "error_type": _type_name(error),
        "error_message": str(error)[:MAX_ERROR_MESSAGE],
        "traceback": trace,
        "last_failed_at": now,
    }


def _type_name(error: BaseException) -> str:
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _event_fields(event: PersistedEvent | DeadLetter) -> dict[str, Any]:
    return {
        "global_position": event.global_position,
        "bounded_context": event.bounded_context,
        "aggregate_type": event.aggregate_type,
        "aggregate_id": event.aggregate_id,
        "aggregate_version": event.aggregate_version,
        "event_type": event.event_type,
    }


def _report(
    session: Session,
    stored: list[tuple[PersistedEvent, int, int | None, BaseException | None]],
    projection: Projection,
    config: ProcessorConfig,
    metrics: object | None,
    fields: dict[str, Any],
) -> None:
    """After the batch commits: a WARNING per stored event, and the metric."""
    if not stored:
        return
    name = projection.checkpoint_name

    def committed(_session: Session) -> None:
        try:
            for event, row_id, head, error in stored:
                extra = {
                    **fields,
                    **_event_fields(event),
                    "dead_letter_id": row_id,
                    "parked_behind": head,
                    "error_type": None if error is None else _type_name(error),
                }
                if error is not None:
                    logger.warning(
                        "projection %s partition %d quarantined event %d (%s of %s %s) as "
                        "dead letter %d: %s: %s",
                        name,
                        config.partition_key,
                        event.global_position,
                        event.event_type,
                        event.aggregate_type,
                        event.aggregate_id,
                        row_id,
                        _type_name(error),
                        str(error)[:200],
                        extra=extra,
                    )
                else:
                    logger.warning(
                        "projection %s partition %d parked event %d (%s of %s %s) as dead "
                        "letter %d behind dead letter %d of the same aggregate",
                        name,
                        config.partition_key,
                        event.global_position,
                        event.event_type,
                        event.aggregate_type,
                        event.aggregate_id,
                        row_id,
                        head,
                        extra=extra,
                    )
            count = getattr(metrics, "events_quarantined", None)
            if count is not None:
                count(name, config.partition_key, len(stored))
        except Exception:  # the batch is committed: never report it as failed
            logger.exception("reporting the events projection %s quarantined failed", name)

    sa.event.listen(session, "after_commit", committed, once=True)


def _promote(session: Session, table: sa.Table, head: int, rest: list[int]) -> None:
    """Make parked event ``head`` the head of its aggregate, the ``rest`` behind it."""
    session.execute(table.update().where(table.c.id == head).values(parked_behind=None))
    if rest:
        session.execute(table.update().where(table.c.id.in_(rest)).values(parked_behind=head))


def _retry_one(
    session: Session, store: EventStore, table: sa.Table, projection: Projection, head_id: int
) -> RetryResult:
    """Retry dead letter ``head_id`` and its parked followers (the lock is held)."""
    found = _load(session, store, [head_id])
    if not found:
        return RetryResult(head_id, projection.checkpoint_name, 0, "gone")
    entry = found[0]
    if entry.parked_behind is not None:
        raise errors.DeadLetterError(
            f"dead letter {entry.id} was parked behind {entry.parked_behind} meanwhile: "
            f"retry {entry.parked_behind}"
        )
    followers = _read(
        session.connection(),
        store,
        sa.select(table)
        .where(table.c.parked_behind == entry.id)
        .order_by(table.c.aggregate_version),
    )
    chain = [entry, *followers]
    events = _events(session, store, [item.global_position for item in chain])
    applied: list[DeadLetter] = []
    failed: DeadLetter | None = None
    failure: Exception | None = None
    for item in chain:
        event = events.get(item.global_position)
        if event is None:
            raise errors.DeadLetterError(
                f"event {item.global_position} of dead letter {item.id} is not in the "
                f"{store.tables.events.name} table (events are never deleted: was the table "
                "restored from another database?); discard it"
            )
        try:
            with session.begin_nested():
                projection.handle_batch([event], session)
        except Exception as exc:
            if is_transient(exc):
                raise
            failed, failure = item, exc
            break
        applied.append(item)
    if applied:
        session.execute(table.delete().where(table.c.id.in_([item.id for item in applied])))
        ck = store.tables.projection_checkpoints
        session.execute(
            ck.update()
            .where(
                ck.c.projection_name == entry.projection,
                ck.c.partition_key == entry.partition_key,
            )
            .values(events_handled=ck.c.events_handled + len(applied))
        )
    positions = tuple(item.global_position for item in applied)
    for item in applied:
        logger.info(
            "dead letter %d: projection %s applied event %d (%s of %s %s)",
            item.id,
            item.projection,
            item.global_position,
            item.event_type,
            item.aggregate_type,
            item.aggregate_id,
            extra={"dead_letter_id": item.id, "projection": item.projection, **_event_fields(item)},
        )
    if failed is None or failure is None:
        return RetryResult(entry.id, entry.projection, entry.global_position, "applied", positions)
    now = datetime.now(UTC)
    values = _failure(failure, now)
    values["attempts"] = table.c.attempts + 1
    values["parked_behind"] = None
    session.execute(table.update().where(table.c.id == failed.id).values(values))
    if failed is not entry:
        rest = [item.id for item in chain[chain.index(failed) + 1 :]]
        if rest:
            session.execute(
                table.update().where(table.c.id.in_(rest)).values(parked_behind=failed.id)
            )
    error = f"{_type_name(failure)}: {str(failure)[:MAX_ERROR_MESSAGE]}"
    logger.warning(
        "dead letter %d: projection %s failed again on event %d (attempt %d): %s",
        failed.id,
        failed.projection,
        failed.global_position,
        failed.attempts + 1,
        error,
        extra={
            "dead_letter_id": failed.id,
            "projection": failed.projection,
            "attempt": failed.attempts + 1,
            "error_type": _type_name(failure),
            **_event_fields(failed),
        },
    )
    return RetryResult(
        entry.id,
        entry.projection,
        entry.global_position,
        "failed" if failed is entry else "stopped",
        positions,
        blocked_by=failed.id,
        error=error,
        attempts=failed.attempts + 1,
    )


def _events(session: Session, store: EventStore, positions: list[int]) -> dict[int, PersistedEvent]:
    ev = store.tables.events
    rows = session.execute(
        sa.select(*(ev.c[name] for name in EVENT_COLUMNS)).where(
            ev.c.global_position.in_(positions)
        )
    ).all()
    return {event.global_position: event for event in map(event_from_row, rows)}
