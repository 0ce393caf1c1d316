"""EventStore: append, read, optimistic concurrency and input validation.

Every test runs on real databases: the ``engine`` fixture gives a freshly migrated
SQLite file and a freshly migrated PostgreSQL database; tests marked ``postgres`` run
on PostgreSQL only.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource import models
from eventsource.partition import fnv1a_32

BC = "sales"
AT = "Order"
DEFAULT_NAMES = models.TableNames()


def make_event(aggregate_id: str | uuid.UUID = "order-1", **overrides: Any) -> es.Event:
    fields: dict[str, Any] = {
        "bounded_context": BC,
        "aggregate_type": AT,
        "aggregate_id": aggregate_id,
        "event_type": "OrderPlaced",
        "payload": {"n": 1},
    }
    fields.update(overrides)
    return es.Event(**fields)


def make_events(n: int, aggregate_id: str = "order-1", **overrides: Any) -> list[es.Event]:
    return [make_event(aggregate_id, payload={"i": i}, **overrides) for i in range(n)]


def append_committed(
    engine: sa.Engine,
    store: es.EventStore,
    events: Sequence[es.Event],
    expected: es.ExpectedVersion | None = None,
) -> es.AppendResult:
    with Session(engine) as session, session.begin():
        return store.append(session, events, expected)


def read_stream(
    engine: sa.Engine, store: es.EventStore, aggregate_id: str = "order-1", **kw: Any
) -> es.Stream:
    with Session(engine) as session:
        return store.read_stream(session, BC, AT, aggregate_id, **kw)


def stored_rows(
    engine: sa.Engine, table: str = "events", names: models.TableNames = DEFAULT_NAMES
) -> list[dict[str, Any]]:
    """Every row of a table in key order, read in a fresh transaction (so: only committed)."""
    tables = models.tables_for(names)
    selected = {"events": tables.events, "aggregate_heads": tables.aggregate_heads}[table]
    query = sa.select(selected).order_by(*selected.primary_key.columns)
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def heads(engine: sa.Engine) -> dict[str, int]:
    return {row["aggregate_id"]: row["version"] for row in stored_rows(engine, "aggregate_heads")}


def event_ids(events: Sequence[es.PersistedEvent] | es.Stream) -> list[uuid.UUID]:
    return [e.event_id for e in events]


# -- append and read back ----------------------------------------------------------


def test_append_then_read_back_every_field(engine: sa.Engine, store: es.EventStore) -> None:
    ist = timezone(timedelta(hours=5, minutes=30))
    created = datetime(2024, 3, 1, 12, 30, 15, 123456, tzinfo=ist)
    payload = {
        "customer": {"name": "Zoë Ångström", "tags": ["vip", "東京"], "address": None},
        "lines": [{"sku": "A-1", "qty": 2, "price": 9.5}, {"sku": "B-2", "qty": 1, "price": 0}],
        "paid": True,
        "big": 2**53 + 1,
        "emoji": "🧾",
    }
    metadata = {"user": {"id": 7, "roles": ["admin"]}, "source": "ünïcode-api"}
    first = make_event(
        "order-ü-1",
        event_type="OrderPlaced",
        event_version=3,
        payload=payload,
        metadata=metadata,
        causation_id="cmd-1",
        correlation_id="corr-ß",
        trace_id="trace-00f",
        created_at=created,
    )
    second = make_event("order-ü-1", event_type="OrderPaid", payload=[1, "two", 3.25])

    result = append_committed(engine, store, [first, second])

    assert [e.aggregate_version for e in result.events] == [1, 2]
    assert result.from_version == 1
    assert result.to_version == 2
    positions = result.global_positions
    assert len(positions) == 2
    assert positions[0] < positions[1]
    assert result.events[0].created_at == created
    assert result.events[1].created_at.tzinfo is not None

    stream = read_stream(engine, store, "order-ü-1")
    assert stream.version == 2
    assert (stream.bounded_context, stream.aggregate_type, stream.aggregate_id) == (
        BC,
        AT,
        "order-ü-1",
    )
    assert stream.events == result.events  # PersistedEvent is a dataclass: every field equal
    got = stream.events[0]
    assert got.global_position == positions[0]
    assert got.bounded_context == BC
    assert got.aggregate_type == AT
    assert got.aggregate_id == "order-ü-1"
    assert got.aggregate_version == 1
    assert isinstance(got.event_id, uuid.UUID)
    assert got.event_id == first.event_id
    assert got.event_type == "OrderPlaced"
    assert got.event_version == 3
    assert got.payload == payload
    assert got.payload["big"] == 2**53 + 1
    assert got.metadata == metadata
    assert got.causation_id == "cmd-1"
    assert got.correlation_id == "corr-ß"
    assert got.trace_id == "trace-00f"
    assert got.created_at == created
    assert got.created_at.utcoffset() == timedelta(0)  # read back in UTC
    assert got.created_at == datetime(2024, 3, 1, 7, 0, 15, 123456, tzinfo=UTC)

    other = stream.events[1]
    assert other.payload == [1, "two", 3.25]
    assert other.event_version == 1
    assert other.metadata is None
    assert (other.causation_id, other.correlation_id, other.trace_id) == (None, None, None)


def test_default_created_at_partition_hash_and_transaction_id(
    engine: sa.Engine, store: es.EventStore
) -> None:
    before = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        result = store.append(session, make_events(2, "order-42"))
        if engine.dialect.name == "postgresql":
            xid = session.execute(sa.text("SELECT pg_current_xact_id()::text::bigint")).scalar()
        else:
            xid = 0  # SQLite serialises writers: no transaction ids needed
    after = datetime.now(UTC)

    stored = read_stream(engine, store, "order-42").events
    assert [e.created_at for e in stored] == [e.created_at for e in result.events]
    for event in stored:
        assert before <= event.created_at <= after
    rows = stored_rows(engine)
    assert [r["partition_hash"] for r in rows] == [fnv1a_32("order-42")] * 2
    assert [r["transaction_id"] for r in rows] == [xid, xid]
    (head,) = stored_rows(engine, "aggregate_heads")
    assert (head["aggregate_id"], head["version"], head["transaction_id"]) == ("order-42", 2, xid)


def test_payload_may_be_any_json_value(engine: sa.Engine, store: es.EventStore) -> None:
    payloads: list[object] = [
        {},
        [],
        "text",
        42,
        -1.5,
        True,
        None,
        {"nested": {"deeper": [[], {}, [None]]}},
        # "\\u0000" is a backslash, then "u0000": ordinary text, not the character U+0000.
        {"path": "C:\\u0000\\dir", "\\u0000key": "\\\\u0000"},
    ]
    result = append_committed(engine, store, [make_event(payload=p) for p in payloads])
    assert [e.payload for e in result.events] == payloads
    assert [e.payload for e in read_stream(engine, store)] == payloads


def test_versions_and_positions(engine: sa.Engine, store: es.EventStore) -> None:
    with Session(engine) as session:
        assert store.stream_version(session, BC, AT, "order-1") == 0

    big = append_committed(engine, store, make_events(10))
    assert [e.aggregate_version for e in big.events] == list(range(1, 11))
    positions = list(big.global_positions)
    assert positions == sorted(positions)
    assert len(set(positions)) == 10
    # The payload says which input event each stored one is: input order is kept.
    assert [e.payload["i"] for e in read_stream(engine, store)] == list(range(10))

    ranges = []
    for n in (2, 3, 1):
        result = append_committed(engine, store, make_events(n))
        ranges.append((result.from_version, result.to_version))
    assert ranges == [(11, 12), (13, 15), (16, 16)]
    with Session(engine) as session:
        assert store.stream_version(session, BC, AT, "order-1") == 16
    stream = read_stream(engine, store)
    assert [e.aggregate_version for e in stream] == list(range(1, 17))
    positions = [e.global_position for e in stream]
    assert positions == sorted(positions)


def test_streams_are_keyed_by_context_type_and_id(engine: sa.Engine, store: es.EventStore) -> None:
    append_committed(engine, store, make_events(2, "x"))
    append_committed(engine, store, [make_event("x", aggregate_type="Invoice")])
    append_committed(engine, store, [make_event("x", bounded_context="billing")])
    append_committed(engine, store, [make_event("y")])
    with Session(engine) as session:
        assert store.stream_version(session, BC, AT, "x") == 2
        assert store.stream_version(session, BC, "Invoice", "x") == 1
        assert store.stream_version(session, "billing", AT, "x") == 1
        assert store.stream_version(session, BC, AT, "y") == 1
        assert len(store.read_stream(session, BC, "Invoice", "x")) == 1

    aggregate = uuid.uuid4()  # given as a UUID, stored as its str
    result = append_committed(engine, store, [make_event(aggregate)])
    assert result.events[0].aggregate_id == str(aggregate)
    assert str(aggregate) in [r["aggregate_id"] for r in stored_rows(engine)]
    assert heads(engine)[str(aggregate)] == 1
    with Session(engine) as session:
        by_uuid = store.read_stream(session, BC, AT, aggregate)
        by_str = store.read_stream(session, BC, AT, str(aggregate))
        assert store.stream_version(session, BC, AT, aggregate) == 1
    assert by_uuid.aggregate_id == str(aggregate)
    assert by_uuid.events == by_str.events == result.events


# -- expected versions ---------------------------------------------------------------


def test_expected_any_and_no_stream(engine: sa.Engine, store: es.EventStore) -> None:
    any_version = es.ExpectedVersion.any()
    assert append_committed(engine, store, make_events(1, "a"), any_version).to_version == 1
    assert append_committed(engine, store, make_events(2, "a"), any_version).to_version == 3
    assert append_committed(engine, store, make_events(1, "a"), None).to_version == 4

    no_stream = es.ExpectedVersion.no_stream()
    assert append_committed(engine, store, make_events(2, "b"), no_stream).to_version == 2
    with pytest.raises(es.OptimisticConcurrencyError) as caught:
        append_committed(engine, store, make_events(1, "b"), no_stream)
    error = caught.value
    assert str(error) == "sales/Order/b: expected no stream, but it is at version 2"
    assert error.expected == no_stream
    assert error.actual == 2
    assert (error.bounded_context, error.aggregate_type, error.aggregate_id) == (BC, AT, "b")

    # exact(0) is no_stream: fine on a new aggregate, a conflict on an existing one.
    assert es.ExpectedVersion.exact(0) == no_stream
    exact_zero = es.ExpectedVersion.exact(0)
    assert append_committed(engine, store, make_events(1, "c"), exact_zero).to_version == 1
    with pytest.raises(es.OptimisticConcurrencyError) as caught:
        append_committed(engine, store, make_events(1, "c"), exact_zero)
    assert caught.value.actual == 1

    assert heads(engine) == {"a": 4, "b": 2, "c": 1}
    assert len(stored_rows(engine)) == 7


def test_expected_exact(engine: sa.Engine, store: es.EventStore) -> None:
    append_committed(engine, store, make_events(3))
    result = append_committed(engine, store, make_events(2), es.ExpectedVersion.exact(3))
    assert (result.from_version, result.to_version) == (4, 5)

    for stale in (3, 1, 6):
        with pytest.raises(es.OptimisticConcurrencyError) as caught:
            append_committed(engine, store, make_events(1), es.ExpectedVersion.exact(stale))
        error = caught.value
        assert (
            str(error) == f"sales/Order/order-1: expected version {stale}, but it is at version 5"
        )
        assert error.expected == es.ExpectedVersion.exact(stale)
        assert error.actual == 5

    with pytest.raises(es.OptimisticConcurrencyError) as caught:
        append_committed(engine, store, make_events(1, "new"), es.ExpectedVersion.exact(1))
    assert caught.value.actual == 0

    assert heads(engine) == {"order-1": 5}
    assert len(stored_rows(engine)) == 5


def test_conflict_leaves_the_transaction_usable(engine: sa.Engine, store: es.EventStore) -> None:
    append_committed(engine, store, make_events(2))
    with Session(engine) as session, session.begin():
        with pytest.raises(es.OptimisticConcurrencyError):
            store.append(session, make_events(1), es.ExpectedVersion.exact(1))
        with pytest.raises(es.OptimisticConcurrencyError):
            store.append(session, make_events(1), es.ExpectedVersion.no_stream())
        store.append(session, make_events(1), es.ExpectedVersion.exact(2))
    assert [e.aggregate_version for e in read_stream(engine, store)] == [1, 2, 3]
    assert heads(engine) == {"order-1": 3}


@pytest.mark.parametrize("bad", [-1, "1", 1.0, True, None])
def test_expected_exact_rejects_bad_versions(bad: Any) -> None:
    with pytest.raises(es.ValidationError, match=r"ExpectedVersion\.exact\(\)"):
        es.ExpectedVersion.exact(bad)


# -- races between real concurrent transactions -------------------------------------


def race(
    engine: sa.Engine,
    store: es.EventStore,
    attempts: Sequence[tuple[Sequence[es.Event], es.ExpectedVersion]],
) -> list[es.AppendResult | BaseException]:
    """Run each append in its own thread, Session and transaction, released together."""
    barrier = threading.Barrier(len(attempts))
    outcomes: list[es.AppendResult | BaseException | None] = [None] * len(attempts)

    def attempt(i: int) -> None:
        events, expected = attempts[i]
        try:
            with Session(engine) as session:
                with session.begin():
                    barrier.wait(timeout=10)
                    result = store.append(session, events, expected)
                    # Hold the transaction open a little: the other writer must wait on it.
                    time.sleep(0.05)
                outcomes[i] = result
        except BaseException as exc:  # reported to the test below
            outcomes[i] = exc

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(attempts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "an append never returned"
    assert all(outcome is not None for outcome in outcomes)
    return [outcome for outcome in outcomes if outcome is not None]


def split_race(
    outcomes: list[es.AppendResult | BaseException],
) -> tuple[es.AppendResult, es.OptimisticConcurrencyError]:
    winners = [o for o in outcomes if isinstance(o, es.AppendResult)]
    losers = [o for o in outcomes if isinstance(o, es.OptimisticConcurrencyError)]
    assert len(winners) == 1, outcomes
    assert len(losers) == 1, outcomes
    return winners[0], losers[0]


def test_race_on_exact_version_has_exactly_one_winner(
    engine: sa.Engine, store: es.EventStore
) -> None:
    append_committed(engine, store, make_events(1))
    for _ in range(5):
        with Session(engine) as session:
            current = store.stream_version(session, BC, AT, "order-1")
        expected = es.ExpectedVersion.exact(current)
        attempts = [(make_events(2), expected), (make_events(3), expected)]
        winner, loser = split_race(race(engine, store, attempts))

        assert winner.from_version == current + 1
        assert loser.expected == expected
        assert loser.actual == winner.to_version
        stream = read_stream(engine, store, from_version=current + 1)
        assert event_ids(stream) == event_ids(winner.events)
        assert heads(engine) == {"order-1": winner.to_version}
    assert len(stored_rows(engine)) == read_stream(engine, store).version


def test_races_on_no_stream_and_on_any(engine: sa.Engine, store: es.EventStore) -> None:
    for round_ in range(3):
        aggregate = f"order-new-{round_}"
        attempts = [
            (make_events(2, aggregate), es.ExpectedVersion.no_stream()),
            (make_events(1, aggregate), es.ExpectedVersion.no_stream()),
        ]
        winner, loser = split_race(race(engine, store, attempts))
        assert winner.from_version == 1
        assert loser.actual == winner.to_version
        assert event_ids(read_stream(engine, store, aggregate)) == event_ids(winner.events)

    # With no expectation both appends succeed, one after the other, without gaps. On
    # PostgreSQL the writer whose transaction id is older may still be refused when it
    # ran second (invariant 3); run again in a new transaction, as run_in_transaction
    # would, it succeeds.
    attempts = [
        (make_events(2, "shared"), es.ExpectedVersion.any()),
        (make_events(3, "shared"), es.ExpectedVersion.any()),
    ]
    outcomes = race(engine, store, attempts)
    results: list[es.AppendResult] = []
    for (events, expected), outcome in zip(attempts, outcomes, strict=True):
        if isinstance(outcome, es.OptimisticConcurrencyError):
            assert engine.dialect.name == "postgresql", outcome
            assert "newer transaction" in str(outcome), outcome
            outcome = append_committed(engine, store, events, expected)
        assert isinstance(outcome, es.AppendResult), outcomes
        results.append(outcome)
    ranges = sorted((r.from_version, r.to_version) for r in results)
    assert ranges in ([(1, 2), (3, 5)], [(1, 3), (4, 5)])
    assert [e.aggregate_version for e in read_stream(engine, store, "shared")] == [1, 2, 3, 4, 5]


# -- PostgreSQL: an older transaction may not append after a newer one (invariant 3) ---


XID_TAKERS: dict[str, Callable[[Session, es.EventStore], object]] = {
    "select-xid": lambda s, store: s.execute(sa.text("SELECT pg_current_xact_id()")).one(),
    "append-other-aggregate": lambda s, store: store.append(s, [make_event("other")]),
}


@pytest.mark.postgres
@pytest.mark.parametrize("take_xid", XID_TAKERS.values(), ids=XID_TAKERS.keys())
def test_older_transaction_cannot_append_after_newer_one(
    pg_engine: sa.Engine, store: es.EventStore, take_xid: Callable[[Session, es.EventStore], object]
) -> None:
    initial = append_committed(pg_engine, store, make_events(1))  # order-1 at version 1

    with Session(pg_engine) as older:
        older.begin()
        take_xid(older, store)  # T1 now has a transaction id

        newer = append_committed(pg_engine, store, make_events(1))  # T2 commits version 2
        assert newer.to_version == 2

        with pytest.raises(es.OptimisticConcurrencyError, match="newer transaction") as caught:
            store.append(older, make_events(1), es.ExpectedVersion.any())
        assert caught.value.actual == 2
        assert caught.value.expected == es.ExpectedVersion.any()

        # Even with the right version in hand the old transaction is refused.
        current = store.stream_version(older, BC, AT, "order-1")
        assert current == 2  # read committed: T1 sees T2's commit
        with pytest.raises(es.OptimisticConcurrencyError, match="newer transaction") as caught:
            store.append(older, make_events(1), es.ExpectedVersion.exact(current))
        assert caught.value.actual == 2
        older.rollback()

    assert heads(pg_engine) == {"order-1": 2}
    assert event_ids(read_stream(pg_engine, store)) == event_ids(initial.events + newer.events)

    retry = append_committed(pg_engine, store, make_events(1), es.ExpectedVersion.exact(2))
    assert retry.to_version == 3
    assert heads(pg_engine) == {"order-1": 3}


@pytest.mark.postgres
def test_older_transaction_cannot_create_an_aggregate_a_newer_one_created(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    with Session(pg_engine) as older:
        older.begin()
        XID_TAKERS["select-xid"](older, store)
        append_committed(pg_engine, store, make_events(1, "fresh"))
        with pytest.raises(es.OptimisticConcurrencyError, match="newer transaction"):
            store.append(older, make_events(1, "fresh"), es.ExpectedVersion.any())
        older.rollback()
    assert append_committed(pg_engine, store, make_events(1, "fresh")).to_version == 2


@pytest.mark.postgres
def test_older_transaction_waiting_on_a_newer_one_is_refused(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    """T1 (older id) blocks on T2's uncommitted append; when T2 commits, T1 is refused."""
    append_committed(pg_engine, store, make_events(1))
    outcome: list[BaseException | es.AppendResult] = []
    older_has_xid = threading.Event()
    newer_appended = threading.Event()

    def older_transaction() -> None:
        with Session(pg_engine) as older:
            try:
                with older.begin():
                    XID_TAKERS["select-xid"](older, store)
                    older_has_xid.set()
                    assert newer_appended.wait(timeout=10)
                    outcome.append(store.append(older, make_events(1), es.ExpectedVersion.any()))
            except BaseException as exc:
                outcome.append(exc)

    thread = threading.Thread(target=older_transaction)
    thread.start()
    try:
        assert older_has_xid.wait(timeout=10)
        with Session(pg_engine) as newer, newer.begin():
            store.append(newer, make_events(1), es.ExpectedVersion.exact(1))
            newer_appended.set()
            wait_for_lock_waiter(pg_engine)
    finally:
        newer_appended.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], es.OptimisticConcurrencyError), outcome
    assert "newer transaction" in str(outcome[0])
    assert heads(pg_engine) == {"order-1": 2}


def wait_for_lock_waiter(engine: sa.Engine, timeout: float = 10) -> None:
    """Return once another session of this database waits on a lock."""
    deadline = time.monotonic() + timeout
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    with engine.connect() as conn:
        while conn.execute(query).scalar() == 0:
            assert time.monotonic() < deadline, "the older transaction never waited on the lock"
            conn.rollback()
            time.sleep(0.01)


@pytest.mark.postgres
def test_transactions_taking_their_id_after_the_newer_commit_may_append(
    pg_engine: sa.Engine, store: es.EventStore
) -> None:
    append_committed(pg_engine, store, make_events(1))
    with Session(pg_engine) as began_earlier:
        began_earlier.begin()
        # Reading does not assign a transaction id: this one is not "older".
        assert store.stream_version(began_earlier, BC, AT, "order-1") == 1
        append_committed(pg_engine, store, make_events(1))  # T2 commits version 2
        # A fresh transaction after T2 appends with no trouble...
        assert append_committed(pg_engine, store, make_events(1)).to_version == 3
        # ...and so does one that began earlier but took its id only now.
        result = store.append(began_earlier, make_events(1), es.ExpectedVersion.exact(3))
        began_earlier.commit()
    assert result.to_version == 4
    assert heads(pg_engine) == {"order-1": 4}


# -- bad input: rejected before anything is written -------------------------------------


class Unserialisable:
    pass


BadAppend = tuple[str, Any, Any, type[es.ValidationError]]


def bad_appends() -> Iterator[BadAppend]:
    """(description, events, expected_version, error) for appends the store must refuse."""
    invalid = es.ValidationError

    def one(**overrides: Any) -> list[es.Event]:
        return [make_event("bad", **overrides)]

    value: Any

    yield "empty list", [], None, invalid
    yield "empty tuple", (), None, invalid
    yield "two aggregate ids", [make_event("bad"), make_event("bad-2")], None, invalid
    for field, value in (("aggregate_type", "Invoice"), ("bounded_context", "billing")):
        yield f"two {field}s", [make_event("bad"), *one(**{field: value})], None, invalid
    yield (
        "an event of another (valid) aggregate",
        [make_event("bad"), make_event("good")],
        None,
        invalid,
    )
    for field in ("bounded_context", "aggregate_type", "event_type"):
        for value in (None, "", "   ", "a\x00b", 5):
            yield f"{field}={value!r}", one(**{field: value}), None, invalid
    for value in (None, "", " ", "bad\x00", 17):
        yield f"aggregate_id={value!r}", [make_event(value)], None, invalid
    for value in (object(), {"x": math.nan}, {"x": math.inf}, {1, 2}, {"x": b"raw"}):
        yield f"payload={value!r}", one(payload=value), None, invalid
    for value in ({"x": "a\x00b"}, {"a\x00": 1}, "\\\x00"):
        yield f"payload={value!r} (NUL)", one(payload=value), None, invalid
    for value in ({"x": Unserialisable()}, {"x": "\x00"}, ["not", "a", "mapping"]):
        yield f"metadata={value!r}", one(metadata=value), None, invalid
    for field in ("causation_id", "correlation_id", "trace_id"):
        for value in (5, "a\x00b"):
            yield f"{field}={value!r}", one(**{field: value}), None, invalid
    for value in (0, "2", True):
        yield f"event_version={value!r}", one(event_version=value), None, invalid
    yield "event_id as str", one(event_id=str(uuid.uuid4())), None, invalid
    naive = datetime(2024, 1, 1, 12, 0)
    yield "naive created_at", one(created_at=naive), None, invalid
    yield "created_at as str", one(created_at="2024-01-01T00:00:00+00:00"), None, invalid
    event = make_event("bad")
    twice = [event, make_event("bad", event_id=event.event_id)]
    yield "one event id twice", twice, None, es.DuplicateEventError
    # ExpectedVersion's constructor is public: the store must not trust its fields.
    for expected in (
        es.ExpectedVersion("exact", -1),
        es.ExpectedVersion("exact", None),
        es.ExpectedVersion("bogus"),  # type: ignore[arg-type]
        3,
        "any",
        es.ExpectedVersion,
    ):
        yield f"expected_version={expected!r}", one(), expected, invalid
    yield "a dict item", [make_event("bad"), {"event_type": "X"}], None, invalid
    yield "a None item", [make_event("bad"), None], None, invalid
    yield "only None", [None], None, invalid
    yield "a str item", ["OrderPlaced"], None, invalid
    yield "a str", "OrderPlaced", None, invalid
    yield "a generator", (e for e in one()), None, invalid
    yield "a dict", {"bad": make_event("bad")}, None, invalid
    yield "None", None, None, invalid


def test_bad_input_is_rejected_and_nothing_written(engine: sa.Engine, store: es.EventStore) -> None:
    good_version = 0
    cases = list(bad_appends())
    assert len(cases) > 60
    for description, events, expected, error in cases:
        with Session(engine) as session, session.begin():
            store.append(session, make_events(1, "good"))  # the transaction is writing
            try:
                store.append(session, events, expected)
            except error:
                pass
            except Exception as exc:
                pytest.fail(f"{description}: raised {exc!r}, not {error.__name__}")
            else:
                pytest.fail(f"{description}: the store accepted it")
            # The caller's transaction is still usable, on both databases.
            store.append(
                session, make_events(1, "good"), es.ExpectedVersion.exact(good_version + 1)
            )
        good_version += 2
        rows = [(r["aggregate_id"], r["aggregate_version"]) for r in stored_rows(engine)]
        assert rows == [("good", v) for v in range(1, good_version + 1)], description
        assert heads(engine) == {"good": good_version}, description


def test_duplicate_of_a_stored_event_id(engine: sa.Engine, store: es.EventStore) -> None:
    original = make_event("order-1")
    append_committed(engine, store, [original])
    pg = engine.dialect.name == "postgresql"

    for aggregate in ("order-1", "order-2"):  # the same aggregate, then another one
        fresh = make_event(aggregate)
        copy = make_event(aggregate, event_id=original.event_id, event_type="Copy")
        with Session(engine) as session:
            session.begin()
            store.append(session, [make_event("order-3")])
            with pytest.raises(es.DuplicateEventError) as caught:
                store.append(session, [fresh, copy])
            if pg:
                # The failed INSERT aborted the transaction: the caller must roll back.
                assert "roll it back" in str(caught.value)
                session.rollback()
            else:
                # SQLite checks first, inside a savepoint: the transaction goes on.
                assert str(caught.value) == f"event id {original.event_id} is already in the store"
                session.commit()

        rows = stored_rows(engine)
        assert [r["event_id"] for r in rows if r["aggregate_id"] != "order-3"] == [
            original.event_id
        ]
        assert "Copy" not in {r["event_type"] for r in rows}
        assert heads(engine) == ({"order-1": 1} if pg else {"order-1": 1, "order-3": len(rows) - 1})

    retry = append_committed(engine, store, [make_event("order-1"), make_event("order-1")])
    assert retry.to_version == 3


# -- reading ---------------------------------------------------------------------------


def test_read_stream(engine: sa.Engine, store: es.EventStore) -> None:
    five = event_ids(append_committed(engine, store, make_events(5)).events)
    append_committed(engine, store, make_events(2, "other"))  # must never show up
    cases: list[tuple[dict[str, int], list[int]]] = [
        ({}, [1, 2, 3, 4, 5]),
        ({"from_version": 0}, [1, 2, 3, 4, 5]),
        ({"from_version": 1}, [1, 2, 3, 4, 5]),
        ({"from_version": 3}, [3, 4, 5]),
        ({"to_version": 2}, [1, 2]),
        ({"to_version": 5}, [1, 2, 3, 4, 5]),
        ({"to_version": 99}, [1, 2, 3, 4, 5]),
        ({"from_version": 2, "to_version": 4}, [2, 3, 4]),
        ({"from_version": 3, "to_version": 3}, [3]),
        ({"from_version": 6}, []),
        ({"from_version": 4, "to_version": 2}, []),
        ({"to_version": 0}, []),
    ]
    with Session(engine) as session:
        for bounds, versions in cases:
            stream = store.read_stream(session, BC, AT, "order-1", **bounds)
            assert [e.aggregate_version for e in stream] == versions, bounds
            assert event_ids(stream) == [five[v - 1] for v in versions], bounds
            assert stream.version == (versions[-1] if versions else 0), bounds
            assert bool(stream) is bool(versions), bounds

        unknown = store.read_stream(session, BC, AT, "no-such-order")
        assert unknown == es.Stream(BC, AT, "no-such-order", ())
        assert (unknown.version, len(unknown), bool(unknown)) == (0, 0, False)

        for bad in ({"from_version": -1}, {"to_version": -2}, {"from_version": "1"}):
            with pytest.raises(es.ValidationError):
                store.read_stream(session, BC, AT, "order-1", **bad)


def test_read_all(engine: sa.Engine, store: es.EventStore) -> None:
    with Session(engine) as session:
        assert store.read_all(session) == []
    interleaved: list[es.PersistedEvent] = []
    for aggregate, n in (("a", 2), ("b", 1), ("a", 1), ("c", 3)):
        interleaved.extend(append_committed(engine, store, make_events(n, aggregate)).events)
    positions = [e.global_position for e in interleaved]
    assert positions == sorted(positions)
    assert len(set(positions)) == 7

    with Session(engine) as session:
        everything = store.read_all(session)
        assert everything == interleaved
        assert [(e.aggregate_id, e.aggregate_version) for e in everything] == [
            ("a", 1),
            ("a", 2),
            ("b", 1),
            ("a", 3),
            ("c", 1),
            ("c", 2),
            ("c", 3),
        ]
        assert store.read_all(session, after=positions[2]) == interleaved[3:]
        assert store.read_all(session, limit=2) == interleaved[:2]
        assert store.read_all(session, after=positions[1], limit=3) == interleaved[2:5]
        assert store.read_all(session, after=positions[-1]) == []
        assert store.read_all(session, after=0, limit=100) == interleaved
        # Paging with `after` = the last position seen visits every event once.
        paged: list[es.PersistedEvent] = []
        after = 0
        while page := store.read_all(session, after=after, limit=3):
            paged.extend(page)
            after = page[-1].global_position
        assert paged == interleaved

        bad_arguments: list[dict[str, Any]] = [
            {"limit": 0},
            {"limit": -1},
            {"limit": True},
            {"limit": 2.5},
            {"limit": "10"},
            {"limit": None},
            {"after": -1},
            {"after": "0"},
            {"after": None},
        ]
        for kwargs in bad_arguments:
            with pytest.raises(es.ValidationError):
                store.read_all(session, **kwargs)


def test_store_takes_a_connection_too(engine: sa.Engine, store: es.EventStore) -> None:
    with engine.begin() as conn:
        result = store.append(conn, make_events(2))
    with engine.connect() as conn:
        assert store.read_stream(conn, BC, AT, "order-1").events == result.events
        assert store.read_all(conn) == list(result.events)
        assert store.stream_version(conn, BC, AT, "order-1") == 2
    with pytest.raises(es.ValidationError, match="Session or Connection"):
        store.append(engine, make_events(1))  # type: ignore[arg-type]
    assert len(stored_rows(engine)) == 2


# -- the caller owns the transaction ----------------------------------------------------


@pytest.fixture
def observer(engine: sa.Engine) -> Iterator[sa.Engine]:
    """A second engine on the same database, to look from outside the writer's transaction.

    On SQLite it is a plain engine: eventsource's engine starts every transaction with
    BEGIN IMMEDIATE, so a reader on it would queue behind the open writer.
    """
    if engine.dialect.name == "sqlite":
        other = sa.create_engine(engine.url, poolclass=sa.NullPool)
    else:
        other = es.create_engine(engine.url, poolclass=sa.NullPool)
    yield other
    other.dispose()


def test_store_never_commits(engine: sa.Engine, store: es.EventStore, observer: sa.Engine) -> None:
    commits: list[sa.Connection] = []

    def on_commit(conn: sa.Connection) -> None:
        commits.append(conn)

    sa.event.listen(engine, "commit", on_commit)
    try:
        # Appended, then rolled back: neither the events nor the head row survive.
        append_committed(engine, store, make_events(1, "kept"))
        with Session(engine) as session:
            session.begin()
            store.append(session, make_events(2, "order-1"))
            store.append(session, make_events(1, "kept"))
            assert store.stream_version(session, BC, AT, "order-1") == 2  # visible inside
            assert store.stream_version(session, BC, AT, "kept") == 2
            session.rollback()
        assert heads(observer) == {"kept": 1}
        assert [(r["aggregate_id"], r["aggregate_version"]) for r in stored_rows(observer)] == [
            ("kept", 1)
        ]
        assert len(commits) == 1  # append_committed's own commit

        # Appended, not yet committed: nothing is visible from another connection.
        with Session(engine) as session:
            session.begin()
            result = store.append(session, make_events(2))
            assert session.in_transaction()
            assert len(commits) == 1
            assert heads(observer) == {"kept": 1}
            assert len(stored_rows(observer)) == 1
            session.commit()
        assert len(commits) == 2
    finally:
        sa.event.remove(engine, "commit", on_commit)
    assert heads(observer) == {"kept": 1, "order-1": 2}
    assert set(event_ids(result.events)) <= {r["event_id"] for r in stored_rows(observer)}


# -- configurable table names -----------------------------------------------------------


CUSTOM_NAMES = models.TableNames(
    events="x_events",
    aggregate_heads="x_aggregate_heads",
    projection_checkpoints="x_projection_checkpoints",
)


def test_custom_table_names(empty_engine: sa.Engine) -> None:
    es.upgrade(empty_engine, table_names=CUSTOM_NAMES)
    assert set(sa.inspect(empty_engine).get_table_names()) == {
        "x_events",
        "x_aggregate_heads",
        "x_projection_checkpoints",
        "x_events_cluster",
        "x_events_dead_letters",
        "x_events_projection_versions",
        "x_events_partition_claims",
        "x_events_partition_workers",
        "eventsource_alembic_version_x_events",  # its own revision
    }
    store = es.EventStore(table_names=CUSTOM_NAMES)
    first = append_committed(empty_engine, store, make_events(2), es.ExpectedVersion.no_stream())
    second = append_committed(empty_engine, store, make_events(1), es.ExpectedVersion.exact(2))
    with pytest.raises(es.OptimisticConcurrencyError):
        append_committed(empty_engine, store, make_events(1), es.ExpectedVersion.exact(2))
    with pytest.raises(es.DuplicateEventError):
        append_committed(empty_engine, store, [make_event(event_id=first.events[0].event_id)])

    with Session(empty_engine) as session:
        stream = store.read_stream(session, BC, AT, "order-1")
        assert stream.events == first.events + second.events
        assert store.read_all(session) == list(stream.events)
        assert store.stream_version(session, BC, AT, "order-1") == 3
    assert len(stored_rows(empty_engine, "events", CUSTOM_NAMES)) == 3
    assert [r["version"] for r in stored_rows(empty_engine, "aggregate_heads", CUSTOM_NAMES)] == [3]


def test_sqlite_engine_without_the_recipe_is_refused(tmp_path: Path) -> None:
    """With the stdlib driver managing transactions, a savepoint would commit behind the
    caller's back: the store refuses instead of silently breaking the caller's rollback."""
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    es.upgrade(url)
    plain = sa.create_engine(url)
    try:
        with (
            Session(plain) as session,
            session.begin(),
            pytest.raises(es.ConfigurationError, match=r"eventsource\.create_engine"),
        ):
            es.EventStore().append(
                session,
                [
                    es.Event(
                        bounded_context="b",
                        aggregate_type="A",
                        aggregate_id="1",
                        event_type="E",
                    )
                ],
            )
        with plain.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM events").scalar() == 0
    finally:
        plain.dispose()
