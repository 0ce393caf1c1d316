"""Which PostgreSQL cluster wrote the store, and rebasing transaction ids it stored.

On PostgreSQL the store keeps transaction ids (events, aggregate heads, checkpoints;
see DESIGN invariants 2 and 3). They are only meaningful on the cluster that wrote
them (invariant 7): after ``pg_dump`` + ``pg_restore`` into a cluster whose counter is
behind, stored ids are ahead of every new transaction, so appends to existing
aggregates are refused forever and projections read nothing new while ``status``
shows no lag. :func:`check` detects that and refuses with the command that repairs
it; :func:`rebase` rewrites the stored ids so every projection keeps its exact place.

The store also records the cluster's ``system_identifier`` in a one-row table, to
say so when the data moved to a cluster whose counter happened to be ahead (nothing
to repair then). Reading it needs EXECUTE on ``pg_control_system()``, which PUBLIC
has by default (PostgreSQL 15 included); where a provider revokes it, the record is
simply not kept and only the id check runs. SQLite has no transaction ids: both
functions do nothing there.
"""

from __future__ import annotations

import bisect
import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from eventsource import errors, models

if TYPE_CHECKING:
    from eventsource.store import EventStore

logger = logging.getLogger("eventsource.cluster")

#: The command that repairs a store whose ids are ahead (named in every such error).
REBASE_COMMAND = "eventsource db rebase"
#: The smallest id rebased rows get (PostgreSQL's FirstNormalTransactionId).
BASE_ID = 3


@dataclass(frozen=True, slots=True)
class RebaseResult:
    """What :func:`rebase` rewrote (all zero when nothing was ahead: nothing written)."""

    events: int
    """Event rows given new transaction ids."""
    aggregate_heads: int
    """Heads whose last writer's id was ahead."""
    projection_checkpoints: int
    """Checkpoints moved onto the new ids (same place in the log)."""
    kept_events: int
    """Events appended on this cluster after the restore: they keep their ids."""
    highest_before: int | None
    """The highest stored transaction id before (None on SQLite)."""
    next_transaction_id: int | None
    """The server's next transaction id when the rebase ran (None on SQLite)."""

    @property
    def rebased(self) -> bool:
        """Whether anything was rewritten."""
        return bool(self.events or self.aggregate_heads or self.projection_checkpoints)

    def summary(self) -> str:
        """One line for people: what was done, or why nothing was."""
        if self.next_transaction_id is None:
            return "nothing to rebase: SQLite stores no transaction ids"
        if not self.rebased:
            return (
                f"nothing to rebase: every stored transaction id (highest "
                f"{self.highest_before or 0}) is below this server's next one "
                f"({self.next_transaction_id})"
            )
        return (
            f"rebased the transaction ids of {self.events} event(s), "
            f"{self.aggregate_heads} aggregate head(s) and {self.projection_checkpoints} "
            f"checkpoint(s) (highest was {self.highest_before}, this server's next is "
            f"{self.next_transaction_id}); kept {self.kept_events} event(s) appended since "
            "the restore; every projection keeps its place"
        )


def check(connection: sa.Connection, tables: models.Tables, *, record: bool = True) -> None:
    """Refuse a store whose transaction ids come from another cluster's counter.

    Raises :class:`~eventsource.errors.TransactionIdsAheadError` naming
    ``eventsource db rebase`` when a stored id is at or above the server's next one
    (``pg_snapshot_xmax``, which assigns no id). Cheap enough for every processor
    start: one statement (an index lookup, a scan of the small checkpoint table),
    plus one reading the record unless ``record=False``. Heads are not
    scanned (they have no index on it): each head's id is that of its aggregate's last
    event, which the events index covers; the store's append path reports a head
    that is ahead by itself.

    With ``record`` (default) it also keeps the cluster record: a first call stores
    this cluster's identifier, and a store that moved here with consistent ids is
    logged as a warning and re-recorded. Those rare calls write one row in the
    connection's transaction, which the caller commits. ``record=False`` only reads.
    No-op on SQLite.
    """
    if connection.dialect.name != "postgresql":
        return
    statements = _statements(tables.names)
    state = connection.execute(statements.state, statements.state_params).one()
    next_id = int(state.next_id)
    events_max = _int(state.events_max)
    checkpoints_max = _int(state.checkpoints_max)
    ahead = [
        (what, stored)
        for what, stored in (
            (tables.names.events, events_max),
            (tables.names.projection_checkpoints, checkpoints_max),
        )
        if stored >= next_id
    ]
    here = recorded = None
    if state.can_identify and state.has_record_table and (ahead or record):
        here, recorded = _identities(connection, statements)
    if ahead:
        where = " and ".join(f"{what} (up to {stored})" for what, stored in ahead)
        moved = ""
        if recorded is not None and here is not None and recorded != here:
            moved = f" (recorded cluster {recorded}, this one {here})"
        raise errors.TransactionIdsAheadError(
            ahead_message(f"transaction ids stored in {where}{moved}", next_id)
        )
    if not record or here is None or not state.has_record_table or recorded == here:
        return
    if recorded is not None:
        logger.warning(
            "the event store was restored or moved from PostgreSQL cluster %s to %s; "
            "its transaction ids are consistent with this server (nothing to rebase)",
            recorded,
            here,
            extra={"recorded_cluster": recorded, "cluster": here},
        )
    connection.execute(statements.record, {"system_identifier": here})


def rebase(target: sa.Engine | sa.Connection, *, store: EventStore | None = None) -> RebaseResult:
    """Rewrite transaction ids stored by another cluster, keeping every projection's place.

    Runs in one transaction (an Engine's own; with a Connection, the caller's, which
    the caller commits). It first locks the checkpoints (ACCESS EXCLUSIVE: batches in
    hand finish first, new ones wait) and the events and heads (EXCLUSIVE: appends
    wait, reads go on), so nothing runs beside it. When no stored id is ahead it writes
    nothing and says so; a second run is such a no-op.

    Which rows came with the restore: every event whose id is ahead, or whose ``xmin``
    (the inserting transaction on this cluster: the restore's COPY) is that of such an
    event, and every event positioned before one of those. Events after them were
    appended here since (the restored identity sequence numbers them after every
    restored event): they keep their ids, which this server gave out.

    Restored ids are mapped, order-preserving, onto small ids: with the distinct
    non-zero checkpoint ids ``c1 < ... < cK``, id ``t`` becomes
    ``3 + 2 * #(c <= t) - (1 if t is some c else 0)`` (checkpoints at 0 stay). Every
    comparison between an event and a checkpoint is unchanged, so each checkpoint
    covers exactly the events it covered; between two checkpoint ids, position order
    replaces id order, which is safe because every such event is committed and
    positions follow versions within an aggregate. Heads that were ahead get their
    aggregate's last event's new id. Rows appended since the restore sort after all
    of them. Raises :class:`~eventsource.errors.TransactionIdsAheadError`, having
    written nothing, when the mapped ids would not fit below the ids of those rows
    and of transactions still running, or when checkpoints are ahead but no event is.
    SQLite: nothing to do.
    """
    tables = store.tables if store is not None else models.tables_for(models.TableNames())
    if target.dialect.name != "postgresql":
        return RebaseResult(0, 0, 0, 0, None, None)
    if isinstance(target, sa.Connection):
        return _rebase(target, tables)
    with target.begin() as connection:
        return _rebase(connection, tables)


def ahead_message(what: str, next_id: int) -> str:
    """The one-line error for ids ahead of the server, naming the repair."""
    return (
        f"{what} are ahead of this PostgreSQL server's transaction ids (next {next_id}): the "
        "database was restored or moved from another cluster, whose ids mean nothing here; "
        "until they are rebased, appends to existing aggregates fail and projections would "
        f"read nothing new. Stop the projections and run `{REBASE_COMMAND}` "
        "(eventsource.cluster.rebase(engine) in Python): it rewrites them in one transaction "
        "and every projection keeps its place"
    )


def mapped_id(transaction_id: int, checkpoint_ids: list[int]) -> int:
    """The id :func:`rebase` gives ``transaction_id`` (``checkpoint_ids``: sorted, distinct).

    The same formula as the SQL, for the refusal check and for tests.
    """
    n = bisect.bisect_right(checkpoint_ids, transaction_id)
    return BASE_ID + 2 * n - (1 if n and checkpoint_ids[n - 1] == transaction_id else 0)


# -- internals ----------------------------------------------------------------------


def _rebase(conn: sa.Connection, tables: models.Tables) -> RebaseResult:
    s = _statements(tables.names)
    conn.execute(s.lock_checkpoints)
    conn.execute(s.lock_writes)
    state = conn.execute(s.rebase_state, s.state_params).one()
    next_id = int(state.next_id)
    events_max = _int(state.events_max)
    heads_max = _int(state.heads_max)
    checkpoints_max = _int(state.checkpoints_max)
    highest = max(events_max, heads_max, checkpoints_max)
    nothing = RebaseResult(0, 0, 0, 0, highest, next_id)
    if highest < next_id:
        return nothing
    checkpoint_ids = [int(c) for c in conn.execute(s.checkpoint_ids).scalars()]
    params: dict[str, Any] = {"next": str(next_id), "cs": checkpoint_ids}
    last_restored = 0
    kept = 0
    if events_max >= next_id:
        last_restored = int(conn.execute(s.last_restored, params).scalar_one())
        kept_row = conn.execute(s.kept, {"last": last_restored}).one()
        kept = int(kept_row.n)
        limits = [("transactions still running", int(state.oldest_running))]
        if kept:
            limits.append(("events appended since the restore", int(kept_row.lowest)))
        highest_mapped = mapped_id(max(events_max, checkpoints_max), checkpoint_ids)
        for what, lowest in limits:
            if highest_mapped >= lowest:
                raise errors.TransactionIdsAheadError(
                    f"cannot rebase: the {len(checkpoint_ids)} distinct checkpoint ids need "
                    f"new ids up to {highest_mapped}, but {what} already use ids from "
                    f"{lowest}; nothing was written. "
                    + (
                        "Let those transactions end and this server's counter pass that "
                        "(every write transaction advances it), then run it again"
                        if what.startswith("transactions")
                        else "Each distinct checkpoint id needs two new ids below theirs: "
                        "delete the checkpoint rows of projections you can replay from "
                        f"{tables.names.projection_checkpoints}, run it again, then "
                        "rebuild those projections"
                    )
                )
    elif checkpoints_max >= next_id:
        raise errors.TransactionIdsAheadError(
            f"cannot rebase: checkpoint ids (up to {checkpoints_max}) are ahead of this "
            f"server's (next {next_id}) but no event's is, so which events came with the "
            "restore is unknown (were events deleted?); nothing was written. Reset or "
            "rebuild the projections instead"
        )
    events = checkpoints = 0
    if events_max >= next_id:
        params = {"cs": checkpoint_ids, "last": last_restored}
        events = conn.execute(s.rebase_events, params).rowcount
        checkpoints = conn.execute(s.rebase_checkpoints, params).rowcount
    heads = conn.execute(s.rebase_heads, {"next": str(next_id)}).rowcount
    after = conn.execute(s.rebase_state, s.state_params).one()
    left = max(_int(after.events_max), _int(after.heads_max), _int(after.checkpoints_max))
    if left >= next_id:  # never expected: refuse rather than commit a half rebase
        raise errors.TransactionIdsAheadError(
            ahead_message(f"after rebasing, ids up to {left}", next_id)
        )
    if state.can_identify and state.has_record_table:
        here, _ = _identities(conn, s)
        conn.execute(s.record, {"system_identifier": here})
    result = RebaseResult(
        events=events,
        aggregate_heads=heads,
        projection_checkpoints=checkpoints,
        kept_events=kept,
        highest_before=highest,
        next_transaction_id=next_id,
    )
    logger.info(
        "%s",
        result.summary(),
        extra={
            "rebased_events": result.events,
            "rebased_heads": result.aggregate_heads,
            "rebased_checkpoints": result.projection_checkpoints,
            "kept_events": result.kept_events,
        },
    )
    return result


def _int(value: object) -> int:
    return 0 if value is None else int(str(value))


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(str(value))


def _identities(connection: sa.Connection, statements: _Statements) -> tuple[int, int | None]:
    """This cluster's system identifier, and the recorded one (None: none yet)."""
    row = connection.execute(statements.identities).one()
    return int(row.here), _int_or_none(row.recorded)


class _Statements:
    """The SQL for one set of table names, built once (names quoted, ``%``/``:`` safe)."""

    def __init__(self, names: models.TableNames) -> None:

        def quote(name: str) -> str:
            # sa.text() doubles "%" for the driver itself; a ":" would start a bind.
            return _quoted(name).replace(":", "\\:")

        events = quote(names.events)
        heads = quote(names.aggregate_heads)
        checkpoints = quote(names.projection_checkpoints)
        record = quote(names.cluster)
        self.state_params = {"record_table": _quoted(names.cluster)}
        # Privileges are checked for every function a statement names, even in a CASE
        # branch never taken: pg_control_system() gets a statement of its own.
        common = f"""
            -- The snapshot's xmax follows the last completed transaction: the caller's
            -- own, still open one (tests, rebuilds) may be at or above it.
            GREATEST(
                pg_snapshot_xmax(pg_current_snapshot())::text::bigint,
                pg_current_xact_id_if_assigned()::text::bigint + 1
            )::text AS next_id,
            (SELECT max(transaction_id) FROM {events})::text AS events_max,
            (SELECT max(transaction_id) FROM {checkpoints}) AS checkpoints_max,
            has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE')
                AS can_identify,
            to_regclass(:record_table) IS NOT NULL AS has_record_table"""
        self.state = sa.text(f"SELECT {common}")
        self.rebase_state = sa.text(
            f"""SELECT {common},
                pg_snapshot_xmin(pg_current_snapshot())::text AS oldest_running,
                (SELECT max(transaction_id) FROM {heads})::text AS heads_max"""
        )
        self.identities = sa.text(
            f"""SELECT (SELECT system_identifier FROM pg_control_system()) AS here,
                (SELECT system_identifier FROM {record} WHERE id = 1) AS recorded"""
        )
        self.record = sa.text(
            f"""INSERT INTO {record} AS r (id, system_identifier, recorded_at)
                VALUES (1, :system_identifier, now())
                ON CONFLICT (id) DO UPDATE
                    SET system_identifier = EXCLUDED.system_identifier, recorded_at = now()
                    WHERE r.system_identifier <> EXCLUDED.system_identifier"""
        )
        # Checkpoints first, in the order batches take them, so no batch deadlocks us.
        self.lock_checkpoints = sa.text(f"LOCK TABLE {checkpoints} IN ACCESS EXCLUSIVE MODE")
        self.lock_writes = sa.text(f"LOCK TABLE {heads}, {events} IN EXCLUSIVE MODE")
        self.checkpoint_ids = sa.text(
            f"""SELECT DISTINCT transaction_id FROM {checkpoints}
                WHERE transaction_id <> 0 ORDER BY transaction_id"""
        )
        ahead = "transaction_id >= CAST(:next AS xid8)"
        self.last_restored = sa.text(
            f"""WITH restore AS (
                    SELECT DISTINCT xmin::text::bigint AS x FROM {events} WHERE {ahead})
                SELECT max(global_position) FROM {events}
                WHERE {ahead} OR xmin::text::bigint IN (SELECT x FROM restore)"""
        )
        self.kept = sa.text(
            f"""SELECT count(*) AS n, min(transaction_id)::text AS lowest
                FROM {events} WHERE global_position > :last"""
        )
        self.rebase_events = sa.text(
            f"""WITH m AS (SELECT CAST(:cs AS bigint[]) AS cs)
                UPDATE {events} AS e
                SET transaction_id = CAST(CAST({_mapped_sql("e.transaction_id")} AS text) AS xid8)
                FROM m WHERE e.global_position <= :last"""
        )
        self.rebase_checkpoints = sa.text(
            f"""WITH m AS (SELECT CAST(:cs AS bigint[]) AS cs)
                UPDATE {checkpoints} AS c
                SET transaction_id = {_mapped_sql("c.transaction_id")}
                FROM m WHERE c.transaction_id <> 0"""
        )
        # A head's id is its last writer's: that of its aggregate's last event.
        self.rebase_heads = sa.text(
            f"""UPDATE {heads} AS h
                SET transaction_id = COALESCE(
                    (SELECT e.transaction_id FROM {events} AS e
                     WHERE e.bounded_context = h.bounded_context
                        AND e.aggregate_type = h.aggregate_type
                        AND e.aggregate_id = h.aggregate_id
                     ORDER BY e.aggregate_version DESC LIMIT 1),
                    CAST('{BASE_ID}' AS xid8))
                WHERE h.{ahead}"""
        )


def _quoted(name: str) -> str:
    """A PostgreSQL quoted identifier (as SQLAlchemy creates these names: quoting a
    lowercase name changes nothing), with no escaping for any driver."""
    return '"' + name.replace('"', '""') + '"'


def _mapped_sql(column: str) -> str:
    """SQL for :func:`mapped_id` of ``column`` (an id), with the sorted ids in ``m.cs``."""
    t = f"CAST(CAST({column} AS text) AS bigint)"
    n = f"width_bucket({t}, m.cs)"  # how many checkpoint ids are <= t
    return f"({BASE_ID} + 2 * {n} - CASE WHEN {n} > 0 AND m.cs[{n}] = {t} THEN 1 ELSE 0 END)"


@functools.cache
def _statements(names: models.TableNames) -> _Statements:
    return _Statements(names)
