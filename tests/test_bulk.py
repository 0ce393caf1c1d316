"""bulk_append and ``eventsource import``: a stream of events of many aggregates, written
chunk by chunk with the guarantees of EventStore.append, on SQLite and PostgreSQL.

Everything runs on real databases (the ``engine`` fixture: a migrated SQLite file and a
migrated PostgreSQL database); tests marked ``postgres`` run on PostgreSQL only.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy.orm import Session

import eventsource as es
from eventsource import bulk, cli, wakeups
from eventsource.partition import fnv1a_32
from tests.projection_support import (
    LogA,
    all_events,
    applied,
    assert_versions_in_order,
    create_applied_table,
    processor,
    reader,
    wait_readable,
)

BC = "sales"
AT = "Order"


def make_event(aggregate_id: str, i: int = 0, **overrides: Any) -> es.Event:
    fields: dict[str, Any] = {
        "bounded_context": BC,
        "aggregate_type": AT,
        "aggregate_id": aggregate_id,
        "event_type": "OrderLinePriced",
        "payload": {"i": i},
    }
    fields.update(overrides)
    return es.Event(**fields)


def interleaved(count: int, aggregates: int, prefix: str = "order") -> list[es.Event]:
    """``count`` events round robin over ``aggregates`` aggregates."""
    return [make_event(f"{prefix}-{i % aggregates}", i) for i in range(count)]


def import_committed(
    engine: sa.Engine, store: es.EventStore, events: Any, **options: Any
) -> es.BulkAppendResult:
    with engine.begin() as conn:
        return store.bulk_append(conn, events, **options)


def event_rows(engine: sa.Engine) -> list[dict[str, Any]]:
    """Every committed event row, in position order (read beside a writer on SQLite)."""
    events = es.EventStore().tables.events
    with reader(engine).connect() as conn:
        rows = conn.execute(sa.select(events).order_by(events.c.global_position))
        return [dict(row._mapping) for row in rows]


def head_versions(engine: sa.Engine) -> dict[str, int]:
    heads = es.EventStore().tables.aggregate_heads
    with reader(engine).connect() as conn:
        rows = conn.execute(sa.select(heads.c.aggregate_id, heads.c.version))
        return {aggregate_id: int(version) for aggregate_id, version in rows}


def assert_empty(engine: sa.Engine) -> None:
    assert event_rows(engine) == []
    assert head_versions(engine) == {}


def assert_heads_match_events(engine: sa.Engine) -> None:
    """Every head is its aggregate's last version: nothing half-written was committed."""
    last: dict[str, int] = {}
    for row in event_rows(engine):
        last[row["aggregate_id"]] = max(last.get(row["aggregate_id"], 0), row["aggregate_version"])
    assert head_versions(engine) == last


# -- round trips -------------------------------------------------------------------------


def test_round_trip_interleaved_aggregates(engine: sa.Engine, store: es.EventStore) -> None:
    created = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    events = interleaved(47, 5)
    events[3] = make_event(
        "order-3",
        3,
        event_version=2,
        metadata={"user": "u1", "nested": [1, {"a": None}]},
        causation_id="cause-1",
        correlation_id=uuid.UUID(int=7),
        trace_id="trace-1",
        created_at=created,
    )
    calls: list[int] = []
    result = import_committed(engine, store, events, chunk_size=10, progress=calls.append)

    assert calls == [10, 10, 10, 10, 7]
    assert result == es.BulkAppendResult(
        events=47, aggregates=5, first_position=1, last_position=47
    )
    with Session(engine) as session:
        for a in range(5):
            stream = store.read_stream(session, BC, AT, f"order-{a}")
            given = [e for e in events if e.aggregate_id == f"order-{a}"]
            assert [e.aggregate_version for e in stream] == list(range(1, len(given) + 1))
            assert [e.event_id for e in stream] == [e.event_id for e in given]
            assert [e.payload for e in stream] == [e.payload for e in given]
        read = store.read_all(session, limit=100)
    # Positions follow the input, across aggregates and chunks.
    assert [e.event_id for e in read] == [e.event_id for e in events]
    special = read[3]
    assert (special.event_type, special.event_version) == ("OrderLinePriced", 2)
    assert special.metadata == {"user": "u1", "nested": [1, {"a": None}]}
    assert (special.causation_id, special.correlation_id, special.trace_id) == (
        "cause-1",
        str(uuid.UUID(int=7)),
        "trace-1",
    )
    assert special.created_at == created
    assert head_versions(engine) == {f"order-{a}": 10 if a < 2 else 9 for a in range(5)}


def test_continues_after_existing_appends(engine: sa.Engine, store: es.EventStore) -> None:
    with Session(engine) as session, session.begin():
        store.append(session, [make_event("old", i) for i in range(3)])
    events = [make_event("old" if i % 2 else "new", i) for i in range(10)]
    result = import_committed(engine, store, events, chunk_size=3)
    assert (result.events, result.aggregates) == (10, 2)
    assert (result.first_position, result.last_position) == (4, 13)
    with Session(engine) as session:
        old = store.read_stream(session, BC, AT, "old")
        new = store.read_stream(session, BC, AT, "new")
    assert [e.aggregate_version for e in old] == list(range(1, 9))
    assert [e.event_id for e in old.events[3:]] == [e.event_id for e in events[1::2]]
    assert [e.aggregate_version for e in new] == [1, 2, 3, 4, 5]
    assert head_versions(engine) == {"old": 8, "new": 5}


def test_heads_follow_so_appends_check_against_them(
    engine: sa.Engine, store: es.EventStore
) -> None:
    import_committed(engine, store, interleaved(30, 3), chunk_size=7)
    with Session(engine) as session, session.begin():
        with pytest.raises(es.OptimisticConcurrencyError) as caught:
            store.append(session, [make_event("order-1")], es.ExpectedVersion.exact(9))
        assert caught.value.actual == 10
        result = store.append(session, [make_event("order-1")], es.ExpectedVersion.exact(10))
    assert result.to_version == 11
    assert store_version(engine, store, "order-1") == 11


def store_version(engine: sa.Engine, store: es.EventStore, aggregate_id: str) -> int:
    with Session(engine) as session:
        return store.stream_version(session, BC, AT, aggregate_id)


def test_partition_hash_is_fnv1a_of_the_aggregate_id(
    engine: sa.Engine, store: es.EventStore
) -> None:
    ids = ["order-1", "ünïcode-ß", str(uuid.UUID(int=42)), "x" * 300]
    import_committed(engine, store, [make_event(a) for a in ids * 2])
    rows = event_rows(engine)
    assert len(rows) == 8
    for row in rows:
        assert row["partition_hash"] == fnv1a_32(row["aggregate_id"])


def test_a_generator_is_read_chunk_by_chunk(engine: sa.Engine, store: es.EventStore) -> None:
    pulled = 0

    def produce() -> Iterator[es.Event]:
        nonlocal pulled
        for i in range(2500):
            pulled += 1
            yield make_event(f"order-{i // 10}", i)

    seen: list[tuple[int, int]] = []
    result = import_committed(
        engine, store, produce(), chunk_size=500, progress=lambda n: seen.append((n, pulled))
    )
    assert result.events == 2500
    assert result.aggregates == 250
    # At most the chunk written and the one validated meanwhile were read.
    assert seen == [(500, 1000), (500, 1500), (500, 2000), (500, 2500), (500, 2500)]
    assert head_versions(engine) == {f"order-{a}": 10 for a in range(250)}


def test_nothing_to_import(engine: sa.Engine, store: es.EventStore) -> None:
    calls: list[int] = []
    result = import_committed(engine, store, iter(()), progress=calls.append)
    assert result == es.BulkAppendResult(0, 0, None, None)
    assert calls == []
    assert_empty(engine)


# -- explicit versions -------------------------------------------------------------------


def test_explicit_versions_are_accepted(engine: sa.Engine, store: es.EventStore) -> None:
    with Session(engine) as session, session.begin():
        store.append(session, [make_event("old"), make_event("old")])
    items: list[es.Event | tuple[es.Event, int]] = [
        (make_event("new", 0), 1),
        make_event("old", 1),  # 3
        (make_event("new", 2), 2),
        (make_event("old", 3), 4),
        make_event("new", 4),  # 3
        (make_event("old", 5), 5),
        (make_event("new", 6), 4),
    ]
    result = import_committed(engine, store, items, chunk_size=3)
    assert result.events == 7
    assert head_versions(engine) == {"old": 5, "new": 4}
    with Session(engine) as session:
        new = store.read_stream(session, BC, AT, "new")
    assert [e.payload["i"] for e in new] == [0, 2, 4, 6]


@pytest.mark.parametrize(
    ("items", "index", "expected", "actual"),
    [
        # A new aggregate's first event claims version 2.
        (lambda: [make_event("a"), (make_event("fresh"), 2)], 1, 1, 0),
        # The stored aggregate is at 2: its next event is 3, not 2.
        (lambda: [make_event("a"), (make_event("old"), 2)], 1, 1, 2),
        # Versions of one aggregate in one chunk that cannot all be right.
        (lambda: [(make_event("fresh"), 1), (make_event("fresh"), 3)], 1, 2, 1),
        # Right in the first chunk, wrong in the second (chunk_size 2).
        (
            lambda: [(make_event("fresh"), 1), (make_event("fresh"), 2), (make_event("fresh"), 4)],
            2,
            3,
            2,
        ),
    ],
    ids=["new-aggregate", "existing-aggregate", "within-a-chunk", "next-chunk"],
)
def test_a_wrong_version_is_refused_naming_the_item(
    engine: sa.Engine,
    store: es.EventStore,
    items: Any,
    index: int,
    expected: int,
    actual: int,
) -> None:
    with Session(engine) as session, session.begin():
        store.append(session, [make_event("old"), make_event("old")])
    before = event_rows(engine)
    with engine.connect() as conn:
        conn.begin()
        with pytest.raises(es.OptimisticConcurrencyError) as caught:
            store.bulk_append(conn, items(), chunk_size=2)
        conn.commit()  # refused: whatever is committed stays consistent
    error = caught.value
    assert getattr(error, "item_index", None) == index
    assert str(error).startswith(f"item {index}: {BC}/{AT}/")
    assert error.expected == es.ExpectedVersion.exact(expected)
    assert error.actual == actual
    assert_heads_match_events(engine)
    assert event_rows(engine) == before  # the import is undone, all of it


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"not": "an event"}, "item 2: a dict, not an Event"),
        ((make_event("a"), 0), r"item 2: aggregate_version must be an int >= 1, got 0"),
        ((make_event("a"), True), "item 2: aggregate_version must be an int >= 1, got True"),
        ((make_event("a"), "3"), "item 2: aggregate_version must be an int >= 1, got '3'"),
        (make_event(""), "item 2: aggregate_id must be a non-empty str"),
        (make_event("a", payload={"x": {1, 2}}), "item 2: payload is not JSON-serialisable"),
        (make_event("a", created_at=datetime(2024, 1, 1)), "item 2: created_at must be"),
    ],
    ids=["dict", "version-0", "version-bool", "version-str", "empty-id", "set", "naive"],
)
def test_bad_items_are_refused_before_anything_is_written(
    engine: sa.Engine, store: es.EventStore, item: Any, message: str
) -> None:
    with engine.connect() as conn, conn.begin():
        with pytest.raises(es.ValidationError, match=message) as caught:
            store.bulk_append(conn, [make_event("a"), make_event("b"), item])
        assert getattr(caught.value, "item_index", None) == 2
        # The first chunk is the bad one: it wrote nothing, even in this transaction.
        assert conn.execute(sa.text("SELECT count(*) FROM aggregate_heads")).scalar() == 0
    assert_empty(engine)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"events": make_event("a")}, "events must be an iterable"),
        ({"events": "abc"}, "events must be an iterable"),
        ({"events": [], "chunk_size": 0}, "chunk_size must be an int >= 1"),
        ({"events": [], "chunk_size": 2.0}, "chunk_size must be an int >= 1"),
        ({"events": [], "progress": 5}, "progress must be a function"),
    ],
)
def test_bad_arguments_are_refused(
    engine: sa.Engine, store: es.EventStore, arguments: dict[str, Any], message: str
) -> None:
    with engine.connect() as conn, pytest.raises(es.ValidationError, match=message):
        store.bulk_append(conn, **arguments)


def test_bad_input_at_item_7001_of_10000_undoes_the_whole_import(
    engine: sa.Engine, store: es.EventStore
) -> None:
    events = interleaved(10_000, 700)
    events[7000] = make_event("order-0", payload=float("nan"))
    calls: list[int] = []
    with engine.connect() as conn:
        conn.begin()
        with pytest.raises(es.ValidationError, match="item 7000: payload") as caught:
            store.bulk_append(conn, events, chunk_size=1000, progress=calls.append)
        assert getattr(caught.value, "item_index", None) == 7000
        # Chunks 0-6 were written, then undone with the rest; the bad one wrote nothing.
        assert calls == [1000] * 7
        assert conn.execute(sa.text("SELECT count(*) FROM events")).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM aggregate_heads")).scalar() == 0
        # The caller's transaction is usable, and commits only what it did itself.
        store.append(conn, [make_event("order-0")])
        conn.commit()
    assert head_versions(engine) == {"order-0": 1}
    assert_heads_match_events(engine)


def test_the_callers_transaction_is_never_committed(
    engine: sa.Engine, store: es.EventStore
) -> None:
    with Session(engine) as session:
        session.begin()
        result = store.bulk_append(session, interleaved(120, 7), chunk_size=25)
        assert result.events == 120
        assert session.in_transaction()
        assert store.stream_version(session, BC, AT, "order-0") == 18  # seen inside it
        assert event_rows(engine) == []  # ... and nowhere else (SQLite: WAL readers)
        session.rollback()
    assert_empty(engine)


# -- duplicate ids -----------------------------------------------------------------------


def test_a_duplicate_id_in_the_input_is_refused(engine: sa.Engine, store: es.EventStore) -> None:
    events = interleaved(20, 4)
    events[13] = make_event("order-2", event_id=events[6].event_id)
    with engine.connect() as conn:
        conn.begin()
        with pytest.raises(es.DuplicateEventError, match="appears twice") as caught:
            store.bulk_append(conn, events)
        assert getattr(caught.value, "item_index", None) == 13
        assert "also item 6" in str(caught.value)
        conn.rollback()
    assert_empty(engine)


@pytest.mark.parametrize("chunk_size", [5, 5000], ids=["other-chunk", "same-run"])
def test_a_duplicate_id_in_another_chunk_or_run_is_refused(
    engine: sa.Engine, store: es.EventStore, chunk_size: int
) -> None:
    events = [make_event("order-1", i) for i in range(12)]
    events[11] = make_event("order-1", event_id=events[2].event_id)
    with engine.connect() as conn:
        conn.begin()
        with pytest.raises(es.DuplicateEventError, match=str(events[2].event_id)) as caught:
            store.bulk_append(conn, events, chunk_size=chunk_size)
        assert getattr(caught.value, "item_index", None) == 11
        conn.rollback()
    assert_empty(engine)


def test_an_id_already_stored_is_refused(engine: sa.Engine, store: es.EventStore) -> None:
    stored = make_event("old")
    with Session(engine) as session, session.begin():
        store.append(session, [stored])
    events = interleaved(30, 3)
    events[17] = make_event("order-2", event_id=stored.event_id)
    with engine.connect() as conn:
        conn.begin()
        with pytest.raises(es.DuplicateEventError, match="already in the store") as caught:
            store.bulk_append(conn, events, chunk_size=10)
        assert getattr(caught.value, "item_index", None) == 17
        assert str(caught.value).startswith(f"item 17: {BC}/{AT}/order-2: event id ")
        assert str(stored.event_id) in str(caught.value)
        # The import is undone and the transaction usable, after a failed COPY too.
        assert conn.execute(sa.text("SELECT count(*) FROM events")).scalar() == 1
        store.append(conn, [make_event("new")])
        conn.commit()
    assert [row["aggregate_id"] for row in event_rows(engine)] == ["old", "new"]
    assert head_versions(engine) == {"old": 1, "new": 1}


@pytest.mark.parametrize("cache_size", [1, 3, 100_000])
def test_heads_held_in_memory_between_chunks_are_written_right(
    engine: sa.Engine, store: es.EventStore, monkeypatch: pytest.MonkeyPatch, cache_size: int
) -> None:
    """Input in global order: every chunk has every aggregate. Heads advance in memory
    after their first chunk and are written when the cache is full (sizes 1 and 3:
    after every chunk, relocking their rows the next time) or at the end."""
    monkeypatch.setattr(bulk, "HEAD_CACHE_SIZE", cache_size)
    with Session(engine) as session, session.begin():
        store.append(session, [make_event("order-1"), make_event("order-1")])
    items: list[Any] = interleaved(60, 6)
    items[13] = (items[13], 5)  # order-1's third in the import: after its 2 stored, 5th
    result = import_committed(engine, store, items, chunk_size=7)
    assert result.events == 60
    assert result.aggregates == 6
    assert_heads_match_events(engine)
    assert head_versions(engine) == {f"order-{i}": 12 if i == 1 else 10 for i in range(6)}
    versions: dict[str, list[int]] = {}
    for row in event_rows(engine):
        versions.setdefault(row["aggregate_id"], []).append(row["aggregate_version"])
    assert all(v == list(range(1, len(v) + 1)) for v in versions.values())
    # A later append continues from the written heads.
    with Session(engine) as session, session.begin():
        store.append(session, [make_event("order-2")], es.ExpectedVersion.exact(10))


def test_a_wrong_version_in_a_later_chunk_is_checked_against_the_heads_in_memory(
    engine: sa.Engine, store: es.EventStore
) -> None:
    items: list[Any] = interleaved(30, 3)
    items[25] = (items[25], 8)  # order-1's 9th event, said to be its 8th
    with engine.connect() as conn:
        conn.begin()
        with pytest.raises(es.OptimisticConcurrencyError) as caught:
            store.bulk_append(conn, items, chunk_size=4)
        conn.commit()
    assert getattr(caught.value, "item_index", None) == 25
    assert caught.value.actual == 8
    assert caught.value.expected == es.ExpectedVersion.exact(7)
    assert_empty(engine)


# -- PostgreSQL: transaction ids (invariants 2 and 3) ------------------------------------


@pytest.mark.postgres
def test_transaction_ids_are_the_importing_transactions(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    with Session(pg_engine) as session, session.begin():
        store.append(session, [make_event("before")])
    with pg_engine.begin() as conn:
        store.bulk_append(conn, [*interleaved(40, 4), make_event("before")], chunk_size=15)
        xid = conn.execute(sa.text("SELECT pg_current_xact_id()::text::bigint")).scalar()
    rows = event_rows(pg_engine)
    assert [row["transaction_id"] for row in rows[1:]] == [xid] * 41
    assert rows[0]["transaction_id"] != xid
    heads = es.EventStore().tables.aggregate_heads
    with pg_engine.connect() as conn:
        transaction_ids = conn.execute(sa.select(heads.c.transaction_id)).scalars().all()
    assert transaction_ids == [xid] * 5


@pytest.mark.postgres
def test_an_import_older_than_the_last_writer_is_refused(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """T1 takes its id; T2 appends to an aggregate and commits; T1's import of that
    aggregate is refused (its events would be read before T2's), and nothing of the
    chunk can be committed, not even the head of the other aggregate it moved."""
    with Session(pg_engine) as session, session.begin():
        store.append(session, [make_event("shared")])
    with pg_engine.connect() as older:
        older.begin()
        older.execute(sa.text("SELECT pg_current_xact_id()"))  # T1 has its id
        with Session(pg_engine) as newer, newer.begin():
            store.append(newer, [make_event("shared")], es.ExpectedVersion.exact(1))
        with pytest.raises(es.OptimisticConcurrencyError, match="newer transaction") as caught:
            store.bulk_append(older, [make_event("other"), make_event("shared")])
        assert getattr(caught.value, "item_index", None) == 1
        assert caught.value.actual == 2
        assert str(caught.value).startswith(f"item 1: {BC}/{AT}/shared: ")
        older.commit()  # the import was undone: commits nothing
    assert head_versions(pg_engine) == {"shared": 2}
    assert [row["aggregate_version"] for row in event_rows(pg_engine)] == [1, 2]
    # Retried in a new transaction, it goes in.
    import_committed(pg_engine, store, [make_event("other"), make_event("shared")])
    assert head_versions(pg_engine) == {"shared": 3, "other": 1}


@pytest.mark.postgres
def test_the_import_marks_its_transaction_as_a_writer_before_it_takes_an_id(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """Projections then wait for the import (docs/horizon.md), and its COPY is never
    refused for an id taken before the mark (AppendOrderError)."""
    state = sa.text(
        "SELECT pg_current_xact_id_if_assigned() IS NULL, EXISTS (SELECT 1 FROM pg_locks "
        "WHERE pid = pg_backend_pid() AND relation = 'events'::regclass "
        "AND mode = 'RowExclusiveLock')"
    )
    seen: list[tuple[bool, bool]] = []
    with pg_engine.connect() as conn:
        conn.begin()

        def produce() -> Iterator[es.Event]:
            seen.append(tuple(conn.execute(state).one()))  # before the first write
            yield from interleaved(10, 2)

        store.bulk_append(conn, produce())
        seen.append(tuple(conn.execute(state).one()))
        conn.rollback()
    assert seen == [(True, True), (False, True)]


# -- projections -------------------------------------------------------------------------


def test_a_processor_sees_every_imported_event_once_in_version_order(
    engine: sa.Engine, store: es.EventStore
) -> None:
    create_applied_table(engine)
    with Session(engine) as session, session.begin():
        store.append(session, [make_event("order-3", -1)])
    events = interleaved(600, 13)
    import_committed(engine, store, events, chunk_size=64)
    wait_readable(engine)
    handled = processor(engine, store, batch_size=50).run_until_caught_up(LogA())
    assert handled == 601
    rows = applied(engine, "log_a")
    assert [(r.global_position, r.aggregate_id, r.aggregate_version) for r in rows] == (
        all_events(engine)
    )
    assert_versions_in_order(rows)
    versions: dict[str, list[int]] = {}
    for row in sorted(rows, key=lambda r: r.seq):
        versions.setdefault(row.aggregate_id, []).append(row.aggregate_version)
    assert versions["order-3"] == list(range(1, 48))
    assert versions["order-0"] == list(range(1, 48))


# -- wake-ups ----------------------------------------------------------------------------


class Woken:
    """A subscriber that records the hints it is asked about and its wake-ups."""

    def __init__(self) -> None:
        self.hints: list[wakeups.Hint] = []
        self.wakes = 0

    def matches(self, hint: wakeups.Hint) -> bool:
        self.hints.append(hint)
        return True

    def wake(self) -> None:
        self.wakes += 1


def test_a_committed_import_wakes_once_with_its_scopes_or_everything(
    sqlite_url: sa.URL, store: es.EventStore
) -> None:
    """In this process (the same on PostgreSQL, whose listener also wakes subscribers
    whenever it starts listening, which would blur the count here)."""
    engine = es.create_engine(sqlite_url)
    woken = Woken()
    with wakeups.subscribe(engine, store.tables.names.events, woken.matches, woken.wake):
        with engine.connect() as conn:
            conn.begin()
            store.bulk_append(conn, interleaved(50, 5))
            conn.rollback()
        assert (woken.wakes, woken.hints) == (0, [])  # rolled back: nobody is woken

        import_committed(engine, store, interleaved(50, 5), chunk_size=20)
        assert woken.wakes == 1
        expected = {(BC, AT, fnv1a_32(f"order-{a}")) for a in range(5)}
        assert [hint.appended for hint in woken.hints] == [frozenset(expected)]

        many = bulk.MAX_LISTED_SCOPES + 50
        import_committed(engine, store, interleaved(many, many, prefix="wide"))
        assert woken.wakes == 2  # one broad hint: no list to match
        assert len(woken.hints) == 1
    engine.dispose()


# -- configuration -----------------------------------------------------------------------


def test_an_unconfigured_sqlite_engine_is_refused(sqlite_url: sa.URL, store: es.EventStore) -> None:
    plain = sa.create_engine(sqlite_url)
    try:
        with plain.connect() as conn, pytest.raises(es.ConfigurationError, match="configure"):
            store.bulk_append(conn, [make_event("a")])
    finally:
        plain.dispose()


def test_a_missing_schema_is_named(empty_engine: sa.Engine, store: es.EventStore) -> None:
    with empty_engine.connect() as conn, pytest.raises(es.SchemaMissingError):
        store.bulk_append(conn, [make_event("a")])


# -- eventsource import ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """The CLI's main() sets logger levels for its process; in-process runs must not
    leave them to the tests that follow (as in tests/test_cli_errors.py)."""
    names = ["", "eventsource.processor", "alembic.runtime.migration"]
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    root_handlers = list(logging.root.handlers)
    yield
    for logger, level in saved:
        logger.setLevel(level)
    logging.root.handlers[:] = root_handlers


def cli_runner() -> CliRunner:
    """A runner that keeps stderr apart (click 8.1 needs asking; 8.2 always does)."""
    options: dict[str, Any] = {"mix_stderr": False}
    try:
        return CliRunner(**options)
    except TypeError:
        return CliRunner()


def run_import(db_url: sa.URL, *args: str, stdin: bytes | None = None) -> Result:
    url = db_url.render_as_string(hide_password=False)
    return cli_runner().invoke(cli.main, ["--database-url", url, "import", *args], input=stdin)


def jsonl(records: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def record(aggregate_id: str, i: int, **extra: Any) -> dict[str, Any]:
    return {
        "bounded_context": BC,
        "aggregate_type": AT,
        "aggregate_id": aggregate_id,
        "event_type": "OrderLinePriced",
        "payload": {"i": i},
        **extra,
    }


def records(count: int = 30, aggregates: int = 4) -> list[dict[str, Any]]:
    return [record(f"order-{i % aggregates}", i) for i in range(count)]


def test_import_a_file(engine: sa.Engine, db_url: sa.URL, tmp_path: Path) -> None:
    given = records()
    given[5].update(
        event_id=str(uuid.UUID(int=5)),
        created_at="2024-02-03T04:05:06.5+02:00",
        metadata={"source": "legacy"},
        event_version=3,
        causation_id="c",
        correlation_id=None,
    )
    given[6]["aggregate_version"] = 2  # order-2's second event
    path = tmp_path / "events.jsonl"
    path.write_text(jsonl(given[:15]) + "\n" + jsonl(given[15:]), encoding="utf-8")

    result = run_import(db_url, str(path), "--chunk-size", "7")

    assert result.exit_code == 0, result.output
    assert "imported 30 events of 4 aggregates, at positions 1..30" in result.stdout
    assert "events/s" in result.stdout
    # The bar knows the file's size: it ends at 100%, with the events written.
    assert "import events.jsonl" in result.stderr
    assert "100%" in result.stderr
    assert "30 events" in result.stderr
    rows = event_rows(engine)
    assert [row["payload"] for row in rows] == [r["payload"] for r in given]
    assert [row["aggregate_version"] for row in rows[:8]] == [1, 1, 1, 1, 2, 2, 2, 2]
    special = rows[5]
    assert special["event_id"] == uuid.UUID(int=5)
    assert special["created_at"] == datetime(2024, 2, 3, 2, 5, 6, 500000, tzinfo=UTC)
    assert (special["event_version"], special["causation_id"]) == (3, "c")
    assert special["metadata"] == {"source": "legacy"}
    assert head_versions(engine) == {f"order-{a}": 8 if a < 2 else 7 for a in range(4)}


def test_import_stdin(engine: sa.Engine, db_url: sa.URL) -> None:
    result = run_import(db_url, "-", stdin=jsonl(records(12, 3)).encode())
    assert result.exit_code == 0, result.output
    assert "imported 12 events of 3 aggregates" in result.stdout
    assert "import stdin" in result.stderr
    assert "100%" in result.stderr
    assert len(event_rows(engine)) == 12

    quiet = run_import(db_url, "-", "--no-progress", stdin=jsonl(records(4, 1)).encode())
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""
    assert "at positions 13..16" in quiet.stdout


def test_import_of_an_empty_file(engine: sa.Engine, db_url: sa.URL, tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    result = run_import(db_url, str(path), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "imported no events" in result.stdout
    assert_empty(engine)


def bad_json(lines: list[str]) -> None:
    lines[40] = '{"bounded_context": "sales", '


def not_an_object(lines: list[str]) -> None:
    lines[40] = "[1, 2]"


def missing_field(lines: list[str]) -> None:
    lines[40] = json.dumps({k: v for k, v in record("order-1", 40).items() if k != "payload"})


def unknown_field(lines: list[str]) -> None:
    lines[40] = json.dumps(record("order-1", 40, evnt_type="typo"))


def wrong_type(lines: list[str]) -> None:
    lines[40] = json.dumps(record("order-1", 40, event_version="2"))


def naive_time(lines: list[str]) -> None:
    lines[40] = json.dumps(record("order-1", 40, created_at="2024-01-01T00:00:00"))


def bad_uuid(lines: list[str]) -> None:
    lines[40] = json.dumps(record("order-1", 40, event_id="not-a-uuid"))


def version_conflict(lines: list[str]) -> None:
    lines[40] = json.dumps(record("order-1", 40, aggregate_version=5))


def duplicate_in_file(lines: list[str]) -> None:  # in one chunk
    lines[41] = json.dumps(record("order-1", 41, event_id=str(uuid.UUID(int=1))))
    lines[45] = json.dumps(record("order-1", 45, event_id=str(uuid.UUID(int=1))))


def duplicate_far_apart(lines: list[str]) -> None:  # in different chunks
    lines[40] = json.dumps(record("order-1", 40, event_id=str(uuid.UUID(int=1))))
    lines[0] = json.dumps(record("order-0", 0, event_id=str(uuid.UUID(int=1))))


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (bad_json, "line 41: not valid JSON"),
        (not_an_object, "line 41: expected a JSON object, got list"),
        (missing_field, "line 41: missing field(s) 'payload'"),
        (unknown_field, "line 41: unknown field(s) 'evnt_type'"),
        (wrong_type, "line 41: event_version must be an int"),
        (naive_time, "line 41: created_at '2024-01-01T00:00:00' has no UTC offset"),
        (bad_uuid, "line 41: event_id must be a UUID string"),
        (version_conflict, "line 41: sales/Order/order-1: expected version 5, but the event "),
        (duplicate_in_file, "line 46: event_id 00000000-0000-0000-0000-000000000001 appears "),
        (duplicate_far_apart, "line 41: sales/Order/order-1: event id 00000000-0000-0000-"),
    ],
    ids=lambda value: getattr(value, "__name__", "message"),
)
def test_import_errors_name_the_line_and_write_nothing(
    engine: sa.Engine, db_url: sa.URL, tmp_path: Path, spoil: Any, message: str
) -> None:
    lines = jsonl(records(60)).splitlines()
    spoil(lines)
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    result = run_import(db_url, str(path), "--chunk-size", "10", "--no-progress")

    assert result.exit_code == 1, result.output
    assert f"Error: {message}" in result.stderr, result.stderr
    assert result.stderr.rstrip().endswith("nothing was imported"), result.stderr
    assert result.stdout == ""
    assert_empty(engine)


def test_an_error_in_the_file_names_the_other_line_too(
    engine: sa.Engine, db_url: sa.URL, tmp_path: Path
) -> None:
    lines = jsonl(records(60)).splitlines()
    duplicate_in_file(lines)
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run_import(db_url, str(path), "--no-progress")
    assert result.exit_code == 1
    assert "line 46: event_id" in result.stderr, result.stderr
    assert "appears twice in the input (also line 42)" in result.stderr, result.stderr
    assert_empty(engine)


def test_import_refuses_an_id_already_stored(
    engine: sa.Engine, db_url: sa.URL, store: es.EventStore
) -> None:
    stored = make_event("order-9", event_id=uuid.UUID(int=9))
    with Session(engine) as session, session.begin():
        store.append(session, [stored])
    given = records(20)
    given[12]["event_id"] = str(uuid.UUID(int=9))
    result = run_import(db_url, "-", "--no-progress", stdin=jsonl(given).encode())
    assert result.exit_code == 1
    assert "line 13: " in result.stderr
    assert "already in the store" in result.stderr
    assert [row["event_id"] for row in event_rows(engine)] == [stored.event_id]


def test_created_at_keeps_its_instant(engine: sa.Engine, db_url: sa.URL) -> None:
    given = [
        record("a", 0, created_at="2024-03-04T05:06:07Z"),
        record("a", 1, created_at="2024-03-04T05:06:07-05:30"),
    ]
    result = run_import(db_url, "-", "--no-progress", stdin=jsonl(given).encode())
    assert result.exit_code == 0, result.output
    times = [row["created_at"] for row in event_rows(engine)]
    assert times[0] == datetime(2024, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert times[1] - times[0] == timedelta(hours=5, minutes=30)
