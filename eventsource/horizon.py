"""The reading horizon of one store: wait only for transactions that can still append.

Projections read, on PostgreSQL, only events whose transaction id is below a horizon
that no transaction still able to add such rows is below (DESIGN invariant 2). The
server rule takes ``pg_snapshot_xmin(pg_current_snapshot())``: every transaction that
holds an id anywhere on the server counts, in any database, whether it appends or not.
The store rule (this module, the default) counts only this store's writers:

- Every append marks its transaction first: the append statement holds the events
  table's ``ROW EXCLUSIVE`` lock from its start, as every INSERT does (a fast-path
  lock: no cost of its own), to the end of the transaction. ``mark_statement`` takes
  the same lock up front; processors do that before their batch takes an id when their
  projection appends events (learnt from the first refusal).
- A reader takes a snapshot's ``xmax`` X, finds the marked transactions and their ids
  in ``pg_locks``, publishes that candidate H in the store's horizon sequence (a
  non-transactional max), then looks at the marks again: the horizon is the smallest
  id among marked transactions, or H.
- A transaction that took its id before its first mark (it wrote another table first)
  reads the published value after marking and is refused
  (:class:`~eventsource.errors.AppendOrderError`, retryable) when a reader may have
  read past its id. :meth:`EventStore.mark_writer` at the start of such a transaction
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

from eventsource import models
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


def append_prefix(names: models.TableNames) -> str:
    """The CTEs an append statement starts with, in driver (``%``) placeholder style.

    The statement holds the events table's ROW EXCLUSIVE lock (the mark) before it runs
    at all: PostgreSQL takes the locks of every table a statement names before it
    executes it. Then, in this order, which the data dependency between the CTEs
    enforces: take the transaction id (assigning one if needed), then read the
    published horizon. ``ok`` yields the id, or no row when a reader may already have
    read past it (the transaction took its id before it marked itself); the head
    statement then writes nothing.
    """
    # Through to_regclass, not the sequence's name: a store migrated only up to es0004
    # appends as before (nothing was published, P is 0) and its readers use the server
    # rule (StoreHorizon.get), so nothing depends on the order of upgrade and deploy.
    # NULL (refused, then explained) only where the role may not read the sequence: a
    # sequence never set (new, or reset by a crash) reads as 0.
    seq = f"'{_literal(_quote(sequence_name(names)))}'"
    published = (
        f"CASE WHEN to_regclass({seq}) IS NULL THEN 0 ELSE COALESCE("
        f"pg_sequence_last_value(to_regclass({seq})), "
        f"CASE WHEN has_sequence_privilege({seq}, 'SELECT') THEN 0 END) END"
    )
    return f"""WITH me AS MATERIALIZED (SELECT pg_current_xact_id() AS xid),
        ok AS MATERIALIZED (
            SELECT me.xid FROM me
            WHERE (SELECT {published} WHERE me.xid IS NOT NULL) <= me.xid::text::bigint)"""


def order_state(names: models.TableNames) -> sa.TextClause:
    """After a refused append: the published horizon against this transaction's id, and
    whether it is ahead of the server's ids (it came with a restore). Readers publish a
    snapshot's ``xmax``, which never exceeds a later snapshot's: a fresh one is taken
    per statement at READ COMMITTED only, so ``ahead`` is NULL at other levels."""
    return sa.text(
        """SELECT p.published, pg_current_xact_id()::text::bigint AS own,
                CASE WHEN current_setting('transaction_isolation') = 'read committed'
                    THEN p.published > pg_snapshot_xmax(pg_current_snapshot())::text::bigint
                END AS ahead,
                pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS next_id
            FROM (
                SELECT CASE WHEN to_regclass(:seq) IS NULL THEN 0 ELSE COALESCE(
                    pg_sequence_last_value(to_regclass(:seq)),
                    CASE WHEN has_sequence_privilege(:seq, 'SELECT') THEN 0 END) END
                    AS published
            ) AS p"""
    ).bindparams(seq=sequence_identifier(names))


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
        space = publish_space(names.events)
        seq = _quote_text(sequence_name(names))
        regclass = seq.replace("'", "''")
        # R1: X is read by the statement's snapshot, taken before pg_locks is read.
        self._first = sa.text(
            f"""SELECT x, least(x, ({_marked_sql(names.events, "s.x")})) AS h
                FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS x) AS s"""
        )
        # The lock makes read-then-setval a maximum; the lateral read follows the lock.
        self._publish = sa.text(
            f"""SELECT CASE WHEN s.last_value < :h THEN setval('{regclass}', :h)
                    ELSE s.last_value END
                FROM (SELECT pg_advisory_xact_lock({space}, {PUBLISH_LOCK_KEY})::text AS l) AS g,
                    LATERAL (SELECT last_value FROM {seq} WHERE g.l IS NOT NULL) AS s"""
        )
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


def _marked_sql(events_table: str, ref: str) -> str:
    """SQL: the smallest id among the store's marked transactions (NULL: none), widened
    to 64 bits against ``ref``.

    Each holder's own ids (a transaction holds ExclusiveLock on its id and on its
    subtransactions'; a prepared one keeps them, with no pid) grouped by the virtual
    transaction that holds the mark: one call of pg_lock_status(), which lists
    fast-path locks too. Prepared transactions of this database count whatever locks
    they show: PREPARE moves a transaction's locks one partition at a time, so a
    reader could see its mark and its id under different virtual transactions.
    """
    xid = "transactionid::text::bigint"
    prepared = "transaction::text::bigint"
    return f"""
            SELECT min(x8) FROM (
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
