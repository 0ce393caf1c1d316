"""The reading horizon of one store: wait only for transactions that can still append.

Projections read, on PostgreSQL, only events whose transaction id is below a horizon
that no transaction still able to add such rows is below (DESIGN invariant 2). The
server rule takes ``pg_snapshot_xmin(pg_current_snapshot())``: every transaction that
holds an id anywhere on the server counts, in any database, whether it appends or not.
The store rule (this module, the default) counts only this store's writers:

- Every writer marks itself: an insert holds the events table's ``ROW EXCLUSIVE``
  lock from the start of its statement (a fast-path lock: no cost of its own) to the end
  of the transaction. ``mark_statement`` takes the same lock up front; processors do
  that before their batch takes an id when their projection appends events (learnt
  from the first refusal).
- A reader takes a snapshot's ``xmax`` X, finds the marked transactions and their ids
  in ``pg_locks``, publishes that candidate in the store's horizon sequence (a
  non-transactional maximum), then looks at the marks again: the horizon is the
  smallest id among marked transactions, or the candidate.
- The trigger ``<events>_horizon_check`` (migration es0005) runs for every insert
  statement into the events table: after the statement's lock, it takes the
  transaction's id, then reads the published value, and refuses the insert when that
  is above the id (the transaction took its id before it marked itself: it wrote
  another table first): :class:`~eventsource.errors.AppendOrderError`, retryable.
  :meth:`EventStore.mark_writer` at the start of such a transaction
  (``run_in_transaction`` does it on a retry) avoids the refusal.

``docs/horizon.md`` gives the argument and each case: subtransactions, prepared
transactions, a late id, an early id, the processor's own appends. The horizon is
computed once per process per poll for all processors of a store
(:func:`for_store`), and only when committed events wait above the server rule's
bound, which costs nothing to read.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import OID

from eventsource import errors, models
from eventsource.partition import fnv1a_32

logger = logging.getLogger("eventsource.horizon")

#: Which transactions hold projections back: ``"store"`` (this store's writers) or
#: ``"server"`` (every transaction on the server that holds an id).
HorizonRule = Literal["store", "server"]
HORIZON_RULES: tuple[HorizonRule, ...] = ("store", "server")

#: The lock modes on the events table that mark a writer: ROW EXCLUSIVE (every
#: INSERT, UPDATE, DELETE, COPY FROM) and the stronger ones that also allow writing.
WRITER_LOCK_MODES = (
    "RowExclusiveLock",
    "ShareRowExclusiveLock",
    "ExclusiveLock",
    "AccessExclusiveLock",
)
#: Second key of the advisory lock that makes publishing a maximum (read, then setval)
#: atomic (projection locks use >= -2, in another first key; see processor).
PUBLISH_LOCK_KEY = -4
#: Seconds before a store whose horizon could not be computed (no sequence yet, a role
#: without the right) is tried again.
RETRY_UNAVAILABLE_AFTER = 60.0

_WRAP = 1 << 32
_HALF = 1 << 31


def publish_space(events_table: str) -> int:
    """The first key (a signed int4) of the store's publish lock."""
    return fnv1a_32(f"eventsource:writers:{events_table}") - _HALF


def sequence_name(names: models.TableNames) -> str:
    """The sequence that holds the highest horizon any reader published."""
    return f"{names.events}_horizon"


def sequence_identifier(names: models.TableNames) -> str:
    """The sequence's name as a quoted identifier (for ``to_regclass(:name)``)."""
    return sequence_identifier_of(sequence_name(names))


def sequence_identifier_of(name: str) -> str:
    """A table's or sequence's name as a quoted identifier, as a bound value."""
    return _quote(name).replace("%%", "%")


def _quote(name: str) -> str:
    """Quoted for ``exec_driver_sql`` (this pyformat preparer doubles ``%``)."""
    from sqlalchemy.dialects import postgresql

    preparer = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]
    return str(preparer.quote(name))


def _literal(text: str) -> str:
    return text.replace("'", "''")


def _quote_text(name: str) -> str:
    """Quoted for ``sa.text``, which doubles ``%`` itself and reads ``:x`` as a parameter."""
    return _quote(name).replace("%%", "%").replace(":", "\\:")


def mark_statement(events_table: str) -> sa.TextClause:
    """Mark the transaction as a writer of the store for the rest of it: the lock every
    append takes (it never waits for other writers: ROW EXCLUSIVE does not conflict
    with itself)."""
    return sa.text(f"LOCK TABLE {_quote_text(events_table)} IN ROW EXCLUSIVE MODE")


#: SQLSTATEs the store's insert trigger raises (``<events>_horizon_check``).
REFUSED_SQLSTATE = "ES001"
"""The inserting transaction took its id before it marked itself, and a reader may
have read past that id (see :class:`~eventsource.errors.AppendOrderError`)."""
AHEAD_SQLSTATE = "ES002"
"""The published horizon is ahead of this server's ids: it came with a restore."""


def check_function_name(names: models.TableNames) -> str:
    return f"{names.events}_horizon_check"


def publish_function_name(names: models.TableNames) -> str:
    return f"{names.events}_horizon_publish"


def own_state(events_table: str) -> sa.TextClause:
    """SQL: (this transaction's id or NULL, whether it already holds the writer mark)."""
    return sa.text(
        f"""SELECT pg_current_xact_id_if_assigned(), EXISTS (
                SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid()
                    AND {_writer_lock("", events_table)})"""
    )


def schema_ddl(names: models.TableNames, unlogged: bool) -> list[str]:
    """The statements of migration es0005, for ``sa.text``, online or offline (``--sql``).

    The check is a statement-level trigger, so every insert into the events table is
    checked, whatever wrote it (an older version of this library, COPY, a hand-written
    INSERT). Both functions run as their owner (SECURITY DEFINER, with a fixed
    search_path), so application roles need no right on the sequence; they name the
    sequence with its schema, which a DO block reads when the script runs (the schema
    the other tables were created in: the first of the search_path).
    """
    q = _quote_text
    table = _text_literal(names.events).replace("%", "%%")  # inside format()
    check = f"""RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
        DECLARE
            own bigint;
            published bigint;
        BEGIN
            -- In this order: the insert already holds the table's lock (the mark),
            -- then the transaction's id (assigned here if need be), then P.
            own := pg_current_xact_id()::text::bigint;
            SELECT last_value INTO published FROM %1$s;
            IF published > own THEN
                IF current_setting('transaction_isolation') = 'read committed' AND
                    published > pg_snapshot_xmax(pg_current_snapshot())::text::bigint
                THEN
                    RAISE EXCEPTION USING ERRCODE = '{AHEAD_SQLSTATE}', MESSAGE = format(
                        'the published reading horizon of %%s (%%s) is ahead of this '
                        'server''s transaction ids', '{table}', published);
                END IF;
                RAISE EXCEPTION USING ERRCODE = '{REFUSED_SQLSTATE}', MESSAGE = format(
                    'transaction %%s wrote before it appended to %%s, and a projection '
                    'may already read past it (up to %%s)', own, '{table}', published);
            END IF;
            RETURN NULL;
        END $fn$"""
    publish = f"""RETURNS bigint LANGUAGE plpgsql
        SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
        DECLARE
            current_value bigint;
        BEGIN
            -- Never above this server's ids (a reader's candidate never is): whoever
            -- may call this cannot make every append look restored.
            candidate := least(
                candidate, pg_snapshot_xmax(pg_current_snapshot())::text::bigint);
            -- The lock makes read-then-setval a maximum among concurrent readers.
            PERFORM pg_advisory_xact_lock({publish_space(names.events)}, {PUBLISH_LOCK_KEY});
            SELECT last_value INTO current_value FROM %1$s;
            IF current_value >= candidate THEN
                RETURN current_value;
            END IF;
            PERFORM setval(%2$s::regclass, candidate);
            RETURN candidate;
        END $fn$"""
    return [
        f"CREATE {'UNLOGGED ' if unlogged else ''}SEQUENCE {q(sequence_name(names))} "
        "AS bigint MINVALUE 0 START WITH 0",
        _create_function(names, check_function_name(names), "()", check),
        f"""CREATE TRIGGER {q(check_function_name(names))} BEFORE INSERT ON {q(names.events)}
            FOR EACH STATEMENT EXECUTE FUNCTION {q(check_function_name(names))}()""",
        _create_function(names, publish_function_name(names), "(candidate bigint)", publish),
    ]


def _create_function(names: models.TableNames, name: str, arguments: str, body: str) -> str:
    """A DO block creating function ``name`` in the current schema, ``body`` (a format()
    template: %1$s the sequence's qualified name, %2$s the same as a literal)."""
    seq = _text_literal(sequence_name(names))
    return f"""DO $do$ BEGIN EXECUTE format(
            $f$CREATE FUNCTION %3$s{arguments} {body}$f$,
            format('%I.%I', current_schema(), '{seq}'),
            quote_literal(format('%I.%I', current_schema(), '{seq}')),
            format('%I.%I', current_schema(), '{_text_literal(name)}'));
        END $do$"""


def drop_ddl(names: models.TableNames) -> list[str]:
    q = _quote_text
    return [
        f"DROP TRIGGER {q(check_function_name(names))} ON {q(names.events)}",
        f"DROP FUNCTION {q(check_function_name(names))}()",
        f"DROP FUNCTION {q(publish_function_name(names))}(bigint)",
        f"DROP SEQUENCE {q(sequence_name(names))}",
    ]


def _text_literal(text: str) -> str:
    """``text`` inside a SQL string literal in ``sa.text`` (quotes doubled, ``:`` kept)."""
    return _literal(text).replace(":", "\\:")


def refusal(
    exc: sa.exc.DBAPIError,
    bounded_context: str,
    aggregate_type: str,
    aggregate_id: str,
    events_table: str,
) -> errors.EventSourceError | None:
    """The typed error for an insert the store's trigger refused, else None."""
    sqlstate = getattr(exc.orig, "sqlstate", None)
    described = f"{bounded_context}/{aggregate_type}/{aggregate_id}"
    reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else ""
    if sqlstate == AHEAD_SQLSTATE:
        return errors.TransactionIdsAheadError(
            f"{described}: {reason}: the database was restored or moved from another "
            "cluster; stop the projections and run `eventsource db rebase` "
            "(eventsource.cluster.rebase(engine) in Python)"
        )
    if sqlstate != REFUSED_SQLSTATE:
        return None
    return errors.AppendOrderError(
        f"{described}: {reason}: its events would be skipped, so nothing was written (the "
        "transaction is aborted). Roll back and retry in a new transaction; call "
        "EventStore.mark_writer(session) first in transactions that write before they "
        "append (run_in_transaction does so when it retries). See docs/horizon.md",
        events_table=events_table,
        bounded_context=bounded_context,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
    )


def _full(xid32: str, ref: str) -> str:
    """SQL: the 64-bit id of a 32-bit one, within 2**31 of ``ref`` either way."""
    back = f"((({ref}) - {xid32}) % {_WRAP} + {_WRAP}) % {_WRAP}"
    return f"(({ref}) - {back} + CASE WHEN {back} >= {_HALF} THEN {_WRAP} ELSE 0 END)"


def _writer_lock(alias: str, events_table: str) -> str:
    """SQL: pg_locks row ``alias`` is a granted writer's lock on the events table."""
    modes = ", ".join(f"'{mode}'" for mode in WRITER_LOCK_MODES)
    events = _literal(_quote_text(events_table))
    return f"""{alias}locktype = 'relation' AND {alias}granted
            AND {alias}database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND {alias}relation = to_regclass('{events}') AND {alias}mode IN ({modes})"""


class StoreHorizon:
    """The store rule's horizon for one store, shared by the processors of a process.

    :meth:`get` computes it at most once per ``max_age`` seconds (running processors
    pass their poll interval; a direct ``process_batch`` passes 0); callers that arrive
    while a computation runs wait for it and share its result. A horizon stays safe
    once computed (it only grows stale), so a cached one is as safe as a fresh one.
    """

    def __init__(self, names: models.TableNames) -> None:
        self.names = names
        # R1: X is read by the statement's snapshot, taken before pg_locks is read. A
        # writer is given its id a moment before it locks it (AssignTransactionId): one
        # marked without a visible id may hold an id below X already, running in the
        # snapshot, so not below the snapshot's xmin, which bounds it then.
        marked = _marked_sql(names.events, "s.x", unassigned="s.xmin")
        self._first = sa.text(
            f"""SELECT x, least(x, ({marked})) AS h
                FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS x,
                             pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin
                     ) AS s"""
        )
        # R2, through the migration's function (it holds the rights on the sequence).
        self._publish = sa.text(f"SELECT {_quote_text(publish_function_name(names))}(:h)")
        self._again = sa.text(f"SELECT ({_marked_sql(names.events, 'CAST(:ref AS bigint)')})")
        self._lock = threading.Lock()
        self._value: int | None = None
        self._at = 0.0
        self._unavailable_until = 0.0
        self.unavailable_reason: str | None = None
        self.computations = 0
        """How many times the horizon was computed (for tests and benchmarks)."""

    def get(self, engine: sa.Engine, max_age: float, next_id: int | None = None) -> int | None:
        """The horizon, at most ``max_age`` seconds old; None where the store rule
        cannot be used (logged once, with the reason: the server rule applies).

        ``next_id``: the caller's snapshot ``xmax``; a cached horizon above it was not
        computed on this server's current ids (see :func:`store_identity`).
        """
        asked = time.monotonic()
        with self._lock:
            # A computation that started after this call (another thread's, while this
            # one waited for the lock) is as fresh as one of its own.
            if (
                self._value is not None
                and self._at >= asked - max_age
                and (next_id is None or self._value <= next_id)
            ):
                return self._value
            now = time.monotonic()
            if now < self._unavailable_until:
                return None
            try:
                value = self.compute(engine)
            except sa.exc.ProgrammingError as exc:  # no sequence yet, or no right to it
                reason = " ".join(str(exc.orig).split())[:300]
                if reason != self.unavailable_reason:
                    logger.warning(
                        "store %r: projections wait for every transaction on the server "
                        "(the server rule): the store's reading horizon cannot be computed "
                        "(%s); run `eventsource db upgrade` or grant the role USAGE and "
                        "UPDATE on sequence %s",
                        self.names.events,
                        reason,
                        sequence_name(self.names),
                        extra={"events_table": self.names.events, "reason": reason},
                    )
                self.unavailable_reason = reason
                self._unavailable_until = now + RETRY_UNAVAILABLE_AFTER
                return None
            if self.unavailable_reason is not None:
                logger.info("store %r: the store's reading horizon is in use", self.names.events)
                self.unavailable_reason = None
            self._value, self._at = value, now
            return value

    def available(self, connection: sa.Connection) -> bool:
        """Whether the schema has what the store rule needs (migration es0005)."""
        signature = f"{sequence_identifier_of(publish_function_name(self.names))}(bigint)"
        return bool(
            connection.execute(
                sa.text("SELECT to_regprocedure(:sig) IS NOT NULL"), {"sig": signature}
            ).scalar()
        )

    def peek(self, connection: sa.Connection) -> int:
        """The horizon a reader would compute now, without publishing it: for reports
        (status, blockers), never for reading (a writer could still pass it unseen)."""
        return int(connection.execute(self._first).one()[1])

    def compute(self, engine: sa.Engine) -> int:
        """Compute the horizon now (three autocommit statements, in this order)."""
        self.computations += 1
        with engine.connect() as connection:
            conn = connection.execution_options(isolation_level="AUTOCOMMIT")
            x, candidate = conn.execute(self._first).one()
            conn.execute(self._publish, {"h": int(candidate)})
            marked = conn.execute(self._again, {"ref": int(x)}).scalar()
        return int(candidate) if marked is None else min(int(candidate), int(marked))


def _marked_sql(events_table: str, ref: str, unassigned: str | None = None) -> str:
    """SQL: the smallest id among the store's marked transactions (NULL: none), widened
    to 64 bits against ``ref``. With ``unassigned``, a marked transaction whose id lock
    is not (yet) shown counts as that value instead of not at all.

    Each holder's own ids (a transaction holds ExclusiveLock on its id and on its
    subtransactions'; a prepared one keeps them, with no pid) grouped by the virtual
    transaction that holds the mark: one call of pg_lock_status(), which lists
    fast-path locks too. Prepared transactions of this database count whatever locks
    they show: PREPARE moves a transaction's locks one partition at a time, so a
    reader could see its mark and its id under different virtual transactions.
    """
    xid = "transactionid::text::bigint"
    prepared = "transaction::text::bigint"
    x8 = "x8" if unassigned is None else f"coalesce(x8, {unassigned})"
    return f"""
            SELECT min({x8}) FROM (
                SELECT min({_full(xid, ref)}) FILTER (
                        WHERE locktype = 'transactionid' AND mode = 'ExclusiveLock') AS x8,
                    bool_or({_writer_lock("", events_table)}) AS marked
                FROM pg_locks
                WHERE granted AND locktype IN ('relation', 'transactionid')
                GROUP BY virtualtransaction
                UNION ALL
                SELECT {_full(prepared, ref)}, true FROM pg_prepared_xacts
                WHERE database = current_database()
            ) AS holders WHERE marked"""


def writers_sql(events_table: str) -> str:
    """SQL: (pid, 32-bit id) of the transactions marked as writers of the store that
    have an id (pid NULL: prepared), for reports."""
    return f"""
        SELECT m.pid, t.transactionid FROM pg_locks AS m
        JOIN pg_locks AS t ON t.virtualtransaction = m.virtualtransaction
        WHERE {_writer_lock("m.", events_table)}
            AND t.locktype = 'transactionid' AND t.mode = 'ExclusiveLock' AND t.granted"""


def store_identity(names: models.TableNames) -> sa.ColumnElement[str]:
    """SQL: which store a connection reaches (the events table its search_path finds:
    two engines on one URL may reach two stores) in which server lifetime (a horizon
    computed before a crash or a failover may be above ids handed out again since)."""
    table = sa.cast(sa.func.to_regclass(sa.literal(sequence_identifier_of(names.events))), OID)
    return sa.func.concat(
        sa.cast(table, sa.Text), "@", sa.cast(sa.func.pg_postmaster_start_time(), sa.Text)
    )


def identity_of(connection: sa.Connection, names: models.TableNames) -> str:
    """:func:`store_identity` read on ``connection`` (for tests and tools)."""
    return str(connection.execute(sa.select(store_identity(names))).scalar_one())


_registry: dict[tuple[str, str, str | None], StoreHorizon] = {}
_registry_lock = threading.Lock()


def for_store(
    engine: sa.Engine, names: models.TableNames, identity: str | None = None
) -> StoreHorizon:
    """The process's one :class:`StoreHorizon` for this database, events table and
    ``identity`` (:func:`store_identity`, read with a batch's checkpoint)."""
    key = (engine.url.render_as_string(hide_password=False), names.events, identity)
    with _registry_lock:
        found = _registry.get(key)
        if found is None or found.names != names:
            found = _registry[key] = StoreHorizon(names)
        return found


def combine(server_bound: int, store_bound: int | None, own: int | None) -> int:
    """The bound a batch reads below: the higher of the two rules' bounds (both are
    safe), but never above the reading transaction's own id when it has one (a
    checkpoint then never carries an id above the transaction that wrote it, which
    eventsource.cluster relies on)."""
    bound = server_bound if store_bound is None else max(server_bound, store_bound)
    if own is not None:
        bound = max(server_bound, min(bound, own))
    return bound
