"""Which PostgreSQL cluster wrote the store, and rebasing transaction ids it stored.

On PostgreSQL the store keeps transaction ids (events, aggregate heads, checkpoints;
see DESIGN invariants 2 and 3). They are only meaningful on the cluster that wrote
them (invariant 7). After ``pg_dump`` + ``pg_restore`` into a cluster whose counter is
behind, stored ids are ahead of every new transaction: appends to existing
aggregates are refused forever and projections read nothing new while ``status``
shows no lag. :func:`check` detects that and refuses with the command that repairs
it; :func:`rebase` rewrites the stored ids so every projection keeps its exact place.

**Ids written elsewhere.** Being ahead does not last: appends to new aggregates go on
(they have no head to be ahead of) and every transaction advances this server's
counter, which in time passes every restored id. From then on nothing is ahead, yet
the events appended since the restore carry ids below those of the restored
checkpoints, so the projections would never read them (a silent skip, with no lag
shown). The cluster record cannot tell that state from a harmless move (a logical
dump restored into a physical clone keeps the identifier; a store may never have
been recorded), so :func:`check` decides from the rows themselves. Every row this
library writes carries an id no greater than that of the transaction that wrote the
row, which PostgreSQL keeps as its ``xmin``: an event's id is its own inserting
transaction's; a checkpoint's is that of the last event its batch read, committed
before the batch's own transaction took an id; a rebase writes ids below its own. A
checkpoint row whose id is greater than its ``xmin`` therefore came from another
cluster's counter: restored, with an id beyond the restore's own transaction. Events
appended after the restore (by transactions begun after it) have ids above the
restore's, so with no such checkpoint
every restored checkpoint sorts before every one of them, and with nothing ahead
every future one too: that proves the ids consistent, whichever cluster is recorded.
With one, :func:`check` refuses (:class:`~eventsource.errors.TransactionIdsAheadError`,
naming ``eventsource db rebase``) even once nothing is ahead, and the rebase clears
it. The proof costs nothing on the normal path: the scan of the small checkpoint
table that finding its highest id already needed (events: one index lookup). A row's
``xmin`` has 32 bits; it is placed in the epoch of the server's next id, within 2**31
either way (a checkpoint restored and left unrebased for longer would no longer be
recognised; an older row of this cluster only ever looks more recent, never foreign).

**Which rows came with the restore.** The restore inserts the events table in one
transaction (the COPY that ``pg_dump`` writes by default, restored by ``pg_restore``
or ``psql``; or ``--single-transaction``), so every restored event carries that
transaction's ``xmin``, and the restored identity sequence numbers every event
appended since after them. :func:`rebase` finds that ``xmin`` on the events written
elsewhere (and on those the checkpoints written elsewhere point at), and takes every
event up to the last one carrying it as restored. A restore that inserted the events
row by row (``pg_dump --inserts`` or ``--rows-per-insert`` without
``--single-transaction``) leaves several ``xmin`` values among them: the events after
the last one written elsewhere could then be restored ones as well as ones appended
since, so when there are any the rebase refuses, nothing written (restore again in
one transaction); when there are none, every event came with the restore.

**Rebasing.** Restored events get small ids, in the same order, below every other
id; events appended since keep theirs, after them; checkpoints on restored events
get the matching small ids, so each covers exactly the events it covered. A
checkpoint already on an event appended since (its worker kept running through the
restore) keeps its id and position: that is exact when it already covered every
restored event. When it did not, or when a checkpoint written here on a restored
event already covers events appended since, that checkpoint cannot keep its place
once the restored events come first (and often no order at all would keep every
place: another checkpoint covers the restored events it does not, but none of the
new ones): the rebase refuses, nothing written, and names those projections to reset.

The store also records the cluster's ``system_identifier`` in a one-row table, to
name both clusters in errors and to log a move whose ids are consistent (nothing to
repair then). Reading it needs EXECUTE on ``pg_control_system()``, which PUBLIC has
by default (PostgreSQL 15 included); where a provider revokes it, the record is
simply not kept and the id checks run alone. SQLite has no transaction ids: both
functions do nothing there.
"""

from __future__ import annotations

import bisect
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from eventsource import errors, horizon, models

if TYPE_CHECKING:
    from eventsource.store import EventStore

logger = logging.getLogger("eventsource.cluster")

#: The command that repairs a store whose ids are ahead (named in every such error).
REBASE_COMMAND = "eventsource db rebase"
#: The smallest id rebased rows get (PostgreSQL's FirstNormalTransactionId).
BASE_ID = 3
#: How many projections an error names before it says "and N more".
_NAMED = 5


@dataclass(frozen=True, slots=True)
class RebaseResult:
    """What :func:`rebase` rewrote (all zero when nothing needed it: nothing written)."""

    events: int
    """Event rows given new transaction ids."""
    aggregate_heads: int
    """Heads whose last writer's id came from another cluster."""
    projection_checkpoints: int
    """Checkpoints moved onto the new ids (same place in the log)."""
    kept_events: int
    """Events appended on this cluster after the restore: they keep their ids."""
    highest_before: int | None
    """The highest stored transaction id before (None on SQLite)."""
    next_transaction_id: int | None
    """The server's next transaction id when the rebase ran (None on SQLite)."""
    kept_checkpoints: int = 0
    """Checkpoints already on events appended since the restore: left as they are."""

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
                f"({self.next_transaction_id}) and no checkpoint carries another cluster's"
            )
        kept = f"kept {self.kept_events} event(s) appended since the restore"
        if self.kept_checkpoints:
            kept += f" and kept {self.kept_checkpoints} checkpoint(s) already on them"
        return (
            f"rebased the transaction ids of {self.events} event(s), "
            f"{self.aggregate_heads} aggregate head(s) and {self.projection_checkpoints} "
            f"checkpoint(s) (highest was {self.highest_before}, this server's next is "
            f"{self.next_transaction_id}); {kept}; every projection keeps its place"
        )


def check(connection: sa.Connection, tables: models.Tables, *, record: bool = True) -> None:
    """Refuse a store whose transaction ids come from another cluster's counter.

    Raises :class:`~eventsource.errors.TransactionIdsAheadError` naming
    ``eventsource db rebase`` when a stored id is at or above the server's next one
    (``pg_snapshot_xmax``, which assigns no id), or when a checkpoint row carries an
    id greater than that of the transaction that wrote it (restored from a cluster
    whose counter this one has since passed: see the module's documentation), whatever
    the cluster record says. Cheap enough for every processor start: one statement
    (an index lookup, a scan of the small checkpoint table), plus one reading the
    record unless ``record=False``. Heads are not scanned (they have no index on it):
    each head's id is that of its aggregate's last event, which the events index
    covers; the store's append path reports a head that is ahead by itself.

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
    elsewhere = state.elsewhere_max is not None
    here = recorded = None
    if state.can_identify and state.has_record_table and (ahead or elsewhere or record):
        here, recorded = _identities(connection, statements)
    moved = ""
    if recorded is not None and here is not None and recorded != here:
        moved = f" (recorded cluster {recorded}, this one {here})"
    if ahead:
        where = " and ".join(f"{what} (up to {stored})" for what, stored in ahead)
        raise errors.TransactionIdsAheadError(
            ahead_message(f"transaction ids stored in {where}{moved}", next_id)
        )
    if elsewhere:
        raise errors.TransactionIdsAheadError(
            overtaken_message(
                _names(state.elsewhere_names), int(state.elsewhere_max), next_id, moved
            )
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
    wait, reads go on), so nothing runs beside it. When no stored id is ahead and no
    checkpoint carries another cluster's id it writes nothing and says so; a second run
    is such a no-op. Whether the restored ids are still ahead or this server's counter
    has passed them since makes no difference.

    Which rows came with the restore: the events up to the last one inserted by the
    restore's transaction, whose ``xmin`` the rows written elsewhere carry (see the
    module's documentation). Events after them were appended here since: they keep
    their ids, which this server gave out.

    Restored ids are mapped, order-preserving, onto small ids: with the distinct
    non-zero ids ``c1 < ... < cK`` of the checkpoints on restored events, id ``t``
    becomes ``3 + 2 * #(c <= t) - (1 if t is some c else 0)`` (checkpoints at 0 stay).
    Every comparison between a restored event and such a checkpoint is unchanged, so
    each covers exactly the events it covered, and none of those appended since;
    between two checkpoint ids, position order replaces id order, which is safe
    because every such event is committed and positions follow versions within an
    aggregate. Checkpoints on events appended since (workers that kept running) keep
    their id and position. Heads whose id came from elsewhere get their aggregate's
    last event's id.

    Raises :class:`~eventsource.errors.TransactionIdsAheadError`, having written
    nothing, when: the restored events were inserted by more than one transaction and
    events follow them; a checkpoint carrying another cluster's id points at no stored
    event; a checkpoint already covers events appended since but not every restored
    one, or one on a restored event already covers events appended since (both name
    the projections to reset); or the mapped ids would not fit below the ids of events
    appended since and of transactions still running. SQLite: nothing to do.
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
        f"read nothing new. {_REPAIR}"
    )


def overtaken_message(names: str, highest: int, next_id: int, moved: str = "") -> str:
    """The one-line error for checkpoints whose ids another cluster gave out, though
    this server's counter has passed them since, naming the repair."""
    return (
        f"the checkpoints of projection(s) {names} carry transaction ids (up to {highest}) "
        f"that another PostgreSQL cluster gave out{moved}: the database was restored from "
        f"it, and this server's counter (next {next_id}) has passed them since, so events "
        "appended here after the restore sort before those checkpoints and the projections "
        f"would never read them. {_REPAIR}"
    )


def mapped_id(transaction_id: int, checkpoint_ids: list[int]) -> int:
    """The id :func:`rebase` gives ``transaction_id`` (``checkpoint_ids``: sorted, distinct).

    The same formula as the SQL, for the refusal check and for tests.
    """
    n = bisect.bisect_right(checkpoint_ids, transaction_id)
    return BASE_ID + 2 * n - (1 if n and checkpoint_ids[n - 1] == transaction_id else 0)


# -- internals ----------------------------------------------------------------------

_REPAIR = (
    f"Stop the projections and run `{REBASE_COMMAND}` "
    "(eventsource.cluster.rebase(engine) in Python): it rewrites them in one transaction "
    "and every projection keeps its place"
)
_ROW_BY_ROW = (
    "Restore the events table in one transaction: the COPY that pg_dump writes by "
    "default (pg_restore, or psql for a plain dump), or with --single-transaction; not "
    "row by row (pg_dump --inserts or --rows-per-insert without --single-transaction). "
    "Then run it again"
)


def _rebase_published_horizon(conn: sa.Connection, names: models.TableNames, next_id: int) -> None:
    """Bring a published reading horizon that came with the restore (ahead of this
    server's ids, so every append would be refused) down to this server's next id:
    no lower, so a transaction here that took its id before is still refused (see
    eventsource.horizon)."""
    params = {"seq": horizon.sequence_identifier(names), "next": next_id}
    conn.execute(
        sa.text(
            "SELECT setval(to_regclass(CAST(:seq AS text)), :next) "
            "WHERE :next < pg_sequence_last_value(to_regclass(CAST(:seq AS text)))"
        ),
        params,
    )


def _cancel_reshards(conn: sa.Connection, tables: models.Tables) -> None:
    """A reshard's boundary holds ids of the cluster that set it: rebased, they would no
    longer mean that point. Its reshard is cancelled (run it again afterwards)."""
    if not sa.inspect(conn).has_table(tables.names.partition_claims):  # before es0006
        return
    ck = tables.projection_checkpoints
    conn.execute(
        ck.update()
        .where(ck.c.stop_global_position.is_not(None))
        .values(stop_transaction_id=None, stop_global_position=None)
    )


def _rebase(conn: sa.Connection, tables: models.Tables) -> RebaseResult:
    s = _statements(tables.names)
    conn.execute(s.lock_checkpoints)
    conn.execute(s.lock_writes)
    state = conn.execute(s.rebase_state, s.state_params).one()
    next_id = int(state.next_id)
    # Also when nothing else is ahead: a restore can bring only the horizon ahead.
    _rebase_published_horizon(conn, tables.names, next_id)
    events_max = _int(state.events_max)
    heads_max = _int(state.heads_max)
    checkpoints_max = _int(state.checkpoints_max)
    highest = max(events_max, heads_max, checkpoints_max)
    elsewhere = state.elsewhere_max is not None
    if highest < next_id and not elsewhere and not state.heads_elsewhere:
        return RebaseResult(0, 0, 0, 0, highest, next_id)
    events = checkpoints = kept = kept_checkpoints = 0
    if events_max >= next_id or elsewhere:
        plan = _plan(conn, s, tables.names, next_id, int(state.oldest_running))
        kept, kept_checkpoints = plan.kept, plan.kept_checkpoints
        params = {"cs": plan.checkpoint_ids, "last": plan.last}
        events = conn.execute(s.rebase_events, params).rowcount
        checkpoints = conn.execute(s.rebase_checkpoints, params).rowcount
        _cancel_reshards(conn, tables)
    heads = conn.execute(s.rebase_heads, {"next": next_id}).rowcount
    after = conn.execute(s.rebase_state, s.state_params).one()
    left = max(_int(after.events_max), _int(after.heads_max), _int(after.checkpoints_max))
    if left >= next_id or after.elsewhere_max is not None:
        # Never expected: refuse rather than commit a half rebase.
        raise errors.TransactionIdsAheadError(
            ahead_message(
                f"after rebasing, ids up to {max(left, _int(after.elsewhere_max))}", next_id
            )
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
        kept_checkpoints=kept_checkpoints,
    )
    logger.info(
        "%s",
        result.summary(),
        extra={
            "rebased_events": result.events,
            "rebased_heads": result.aggregate_heads,
            "rebased_checkpoints": result.projection_checkpoints,
            "kept_events": result.kept_events,
            "kept_checkpoints": result.kept_checkpoints,
        },
    )
    return result


@dataclass(frozen=True, slots=True)
class _Plan:
    last: int
    """Position of the last restored event."""
    checkpoint_ids: list[int]
    """Distinct non-zero ids of the checkpoints on restored events, sorted."""
    kept: int
    kept_checkpoints: int


def _plan(
    conn: sa.Connection, s: _Statements, names: models.TableNames, next_id: int, oldest: int
) -> _Plan:
    """Which events were restored and which ids they get; refuses (nothing written yet)
    when the places of the checkpoints cannot all be kept."""
    ids = {"next": next_id}
    stray = conn.execute(s.stray_checkpoints, ids).all()
    if stray:
        raise errors.TransactionIdsAheadError(
            f"cannot rebase: the checkpoints of {_partitions(stray)} carry transaction ids "
            f"from another cluster (up to {max(int(row[2]) for row in stray)}) but point at "
            "no stored event (were events deleted?), so where they belong is unknown; "
            f"nothing was written. Reset those projections ({_resets(stray)}: they replay "
            "from the start) and run it again"
        )
    last = _int_or_none(conn.execute(s.last_restored, ids).scalar_one())
    if last is None:  # never expected: an id ahead is one written elsewhere
        raise errors.TransactionIdsAheadError(
            ahead_message("transaction ids of no stored event", next_id)
        )
    restored = conn.execute(s.restored, {"last": last}).one()
    kept_row = conn.execute(s.kept, {"last": last}).one()
    kept = int(kept_row.n)
    if restored.first_xmin != restored.last_xmin and kept:
        raise errors.TransactionIdsAheadError(
            f"cannot rebase: the {restored.n} restored events (up to position {last}) were "
            "inserted by more than one transaction, so the events after them cannot be told "
            "apart: restored ones, or appended on this cluster since; nothing was written. "
            + _ROW_BY_ROW
        )
    highest_restored = int(restored.highest)
    # Checkpoints on events appended since keep their place: exact only when they
    # already cover every restored event. Checkpoints written here on restored events
    # get small ids: exact only when they cover no event appended since.
    behind = conn.execute(s.behind, {"last": last, "highest": highest_restored}).all()
    past = (
        conn.execute(s.past_new, {**ids, "last": last, "lowest": int(kept_row.lowest)}).all()
        if kept
        else []
    )
    if behind or past:
        why = []
        if behind:
            why.append(
                f"the checkpoints of {_partitions(behind)} already cover events appended on "
                "this cluster since the restore but not every restored event"
            )
        if past:
            why.append(
                f"the checkpoints of {_partitions(past)} sit on restored events but already "
                "cover events appended on this cluster since the restore"
            )
        rows = [*behind, *past]
        raise errors.TransactionIdsAheadError(
            f"cannot rebase: {'; '.join(why)} (their workers kept running through the "
            "restore). Rebasing gives restored events ids below those of every event "
            "appended since, so those checkpoints cannot keep their place: their projections "
            f"would skip or repeat events. Stop their workers, reset them ({_resets(rows)}: "
            "they replay from the start) and run it again; nothing was written"
        )
    checkpoint_ids = [int(c) for c in conn.execute(s.checkpoint_ids, {"last": last}).scalars()]
    highest_mapped = mapped_id(max([highest_restored, *checkpoint_ids]), checkpoint_ids)
    limits = [("transactions still running", oldest)]
    if kept:
        limits.append(("events appended since the restore", int(kept_row.lowest)))
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
                    f"{names.projection_checkpoints}, run it again, then "
                    "rebuild those projections"
                )
            )
    kept_checkpoints = int(conn.execute(s.kept_checkpoints, {"last": last}).scalar_one())
    return _Plan(last, checkpoint_ids, kept, kept_checkpoints)


def _int(value: object) -> int:
    return 0 if value is None else int(str(value))


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(str(value))


def _names(names: Sequence[str] | None) -> str:
    listed = list(names or [])
    shown = ", ".join(repr(name) for name in listed[:_NAMED])
    return shown + (f" and {len(listed) - _NAMED} more" if len(listed) > _NAMED else "")


def _partitions(rows: Sequence[Any]) -> str:
    """``'name' partition 0, ...`` for rows of (projection_name, partition_key, ...)."""
    listed = [f"{row[0]!r} partition {row[1]}" for row in rows]
    shown = ", ".join(listed[:_NAMED])
    return shown + (f" and {len(listed) - _NAMED} more" if len(listed) > _NAMED else "")


def _resets(rows: Sequence[Any]) -> str:
    names = list(dict.fromkeys(str(row[0]) for row in rows))
    return ", ".join(f"`eventsource reset {name}`" for name in names)


def _identities(connection: sa.Connection, statements: _Statements) -> tuple[int, int | None]:
    """This cluster's system identifier, and the recorded one (None: none yet)."""
    row = connection.execute(statements.identities).one()
    return int(row.here), _int_or_none(row.recorded)


def _written_by(ref: str, alias: str) -> str:
    """SQL: the 64-bit id of the transaction that wrote row ``alias`` (its 32-bit
    ``xmin``, placed in the epoch of ``ref``, this server's next id, within 2**31)."""
    wrap, half = 1 << 32, 1 << 31
    back = f"((({ref}) - {alias}.xmin::text::bigint) % {wrap} + {wrap}) % {wrap}"
    return f"(({ref}) - {back} + CASE WHEN {back} >= {half} THEN {wrap} ELSE 0 END)"


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
        # A checkpoint whose id is above that of the transaction that wrote it: restored
        # from another cluster's counter (see the module's documentation).
        elsewhere = f"c.transaction_id > {_written_by('n.next_id', 'c')}"
        # Privileges are checked for every function a statement names, even in a CASE
        # branch never taken: pg_control_system() gets a statement of its own.
        state = f"""
            SELECT n.next_id::text AS next_id,
                (SELECT max(transaction_id) FROM {events})::text AS events_max,
                ck.checkpoints_max, ck.elsewhere_max, ck.elsewhere_names,
                has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE')
                    AS can_identify,
                to_regclass(:record_table) IS NOT NULL AS has_record_table
                {{extra}}
            FROM (
                -- The snapshot's xmax follows the last completed transaction: the
                -- caller's own, still open one (tests, rebuilds) may be at or above it.
                SELECT GREATEST(
                    pg_snapshot_xmax(pg_current_snapshot())::text::bigint,
                    pg_current_xact_id_if_assigned()::text::bigint + 1
                ) AS next_id
            ) AS n
            CROSS JOIN LATERAL (
                SELECT max(c.transaction_id) AS checkpoints_max,
                    max(c.transaction_id) FILTER (WHERE {elsewhere}) AS elsewhere_max,
                    array_agg(DISTINCT c.projection_name ORDER BY c.projection_name)
                        FILTER (WHERE {elsewhere}) AS elsewhere_names
                FROM {checkpoints} AS c
            ) AS ck
            {{join}}"""
        self.state = sa.text(state.format(extra="", join=""))
        self.rebase_state = sa.text(
            state.format(
                extra=""",
                pg_snapshot_xmin(pg_current_snapshot())::text AS oldest_running,
                hd.heads_max, hd.heads_elsewhere""",
                join=f"""
            CROSS JOIN LATERAL (
                SELECT max(h.transaction_id)::text AS heads_max,
                    count(*) FILTER (WHERE h.transaction_id::text::bigint
                        > {_written_by("n.next_id", "h")}) AS heads_elsewhere
                FROM {heads} AS h
            ) AS hd""",
            )
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
        # The rebase's statements: `:next` is the server's next id, read once.
        ref = "CAST(:next AS bigint)"
        on_its_event = """e.global_position = c.global_position
                    AND e.transaction_id = CAST(CAST(c.transaction_id AS text) AS xid8)"""
        self.stray_checkpoints = sa.text(
            f"""SELECT c.projection_name, c.partition_key, c.transaction_id
                FROM {checkpoints} AS c
                WHERE c.transaction_id > {_written_by(ref, "c")}
                    AND NOT EXISTS (SELECT 1 FROM {events} AS e WHERE {on_its_event})
                ORDER BY 1, 2"""
        )
        # The last event inserted by a transaction that inserted events written elsewhere,
        # or one that such a checkpoint is on: the restore's (see the module's docs).
        self.last_restored = sa.text(
            f"""WITH restore AS (
                    SELECT e.xmin::text::bigint AS x FROM {events} AS e
                    WHERE e.transaction_id::text::bigint > {_written_by(ref, "e")}
                    UNION
                    SELECT e.xmin::text::bigint FROM {checkpoints} AS c
                    JOIN {events} AS e ON {on_its_event}
                    WHERE c.transaction_id > {_written_by(ref, "c")})
                SELECT max(global_position) FROM {events}
                WHERE xmin::text::bigint IN (SELECT x FROM restore)"""
        )
        self.restored = sa.text(
            f"""SELECT count(*) AS n, max(transaction_id)::text AS highest,
                    min(xmin::text::bigint) AS first_xmin, max(xmin::text::bigint) AS last_xmin
                FROM {events} WHERE global_position <= :last"""
        )
        self.kept = sa.text(
            f"""SELECT count(*) AS n, min(transaction_id)::text AS lowest
                FROM {events} WHERE global_position > :last"""
        )
        self.kept_checkpoints = sa.text(
            f"SELECT count(*) FROM {checkpoints} WHERE global_position > :last"
        )
        # On an event appended since, but below some restored event.
        self.behind = sa.text(
            f"""SELECT projection_name, partition_key FROM {checkpoints}
                WHERE global_position > :last AND transaction_id < :highest
                ORDER BY 1, 2"""
        )
        # Written here on a restored event, past an event appended since.
        self.past_new = sa.text(
            f"""SELECT c.projection_name, c.partition_key FROM {checkpoints} AS c
                WHERE c.global_position <= :last AND c.transaction_id <> 0
                    AND c.transaction_id <= {_written_by(ref, "c")}
                    AND c.transaction_id > :lowest
                ORDER BY 1, 2"""
        )
        self.checkpoint_ids = sa.text(
            f"""SELECT DISTINCT transaction_id FROM {checkpoints}
                WHERE transaction_id <> 0 AND global_position <= :last
                ORDER BY transaction_id"""
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
                FROM m WHERE c.transaction_id <> 0 AND c.global_position <= :last"""
        )
        # A head's id is its last writer's: that of its aggregate's last event. Those
        # written elsewhere (ahead or not) get it again.
        self.rebase_heads = sa.text(
            f"""UPDATE {heads} AS h
                SET transaction_id = COALESCE(
                    (SELECT e.transaction_id FROM {events} AS e
                     WHERE e.bounded_context = h.bounded_context
                        AND e.aggregate_type = h.aggregate_type
                        AND e.aggregate_id = h.aggregate_id
                     ORDER BY e.aggregate_version DESC LIMIT 1),
                    CAST('{BASE_ID}' AS xid8))
                WHERE h.transaction_id::text::bigint > {_written_by(ref, "h")}"""
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
