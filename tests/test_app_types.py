"""Sessions and ids as applications have them (issue 12, point 3).

A ``scoped_session`` (Flask-SQLAlchemy's ``db.session``) wherever a Session goes; UUIDs
for the text ids; one type per id on the way back, whatever the database and whatever
the source (append result, read, projection); payloads holding Decimal, datetime, UUID,
Enum or models through the store's ``json_default`` hook, refused without it. Every
test runs on a real SQLite file and a real PostgreSQL database.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import eventsource as es
from eventsource import deadletters, models, rebuild, status
from eventsource import events as events_module

BC = "shop"
AT = "Order"


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


def count_rows(engine: sa.Engine) -> tuple[int, int]:
    """(events, aggregate heads) committed, read from outside any writer's transaction."""
    tables = models.tables_for(models.TableNames())
    with plain(engine).connect() as conn:
        events = conn.execute(sa.select(sa.func.count()).select_from(tables.events)).scalar()
        heads = conn.execute(
            sa.select(sa.func.count()).select_from(tables.aggregate_heads)
        ).scalar()
    return int(events or 0), int(heads or 0)


_plain: dict[str, sa.Engine] = {}


def plain(engine: sa.Engine) -> sa.Engine:
    """On SQLite, an engine that reads without queueing for the write lock (no BEGIN
    IMMEDIATE); on PostgreSQL the engine itself."""
    if engine.dialect.name != "sqlite":
        return engine
    key = engine.url.render_as_string(hide_password=False)
    if key not in _plain:
        _plain[key] = sa.create_engine(engine.url, poolclass=sa.NullPool)
    return _plain[key]


@pytest.fixture
def scoped(engine: sa.Engine) -> Iterator[scoped_session[Session]]:
    """A thread-scoped session registry, as Flask-SQLAlchemy's ``db.session`` is."""
    registry = scoped_session(sessionmaker(engine))
    yield registry
    registry.remove()


class Recorder(es.Projection):
    """Keeps what ``handle`` is given, to compare with appends and reads."""

    name = "app-types-recorder"

    def __init__(self) -> None:
        self.seen: list[es.PersistedEvent] = []

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        self.seen.append(event)


def projected(engine: sa.Engine, store: es.EventStore) -> list[es.PersistedEvent]:
    recorder = Recorder()
    es.Processor(engine, store).run_until_caught_up(recorder)
    return recorder.seen


# -- scoped_session ---------------------------------------------------------------------


def test_store_takes_a_scoped_session(
    engine: sa.Engine, store: es.EventStore, scoped: scoped_session[Session]
) -> None:
    with scoped.begin():
        result = store.append(scoped, [make_event(), make_event()])
        assert store.stream_version(scoped, BC, AT, "order-1") == 2
        # In the scoped session's own transaction: not committed yet.
        assert count_rows(engine) == (0, 0)
    assert count_rows(engine) == (2, 1)
    assert store.read_stream(scoped, BC, AT, "order-1").events == result.events
    assert store.read_all(scoped) == list(result.events)
    scoped.rollback()

    # The registry's current Session is the one used: rolling it back undoes the append.
    store.append(scoped, [make_event()], es.ExpectedVersion.exact(2))
    assert scoped().in_transaction()
    scoped.rollback()
    assert count_rows(engine) == (2, 1)
    with scoped.begin():
        assert store.stream_version(scoped, BC, AT, "order-1") == 2


def test_run_in_transaction_runs_in_the_scoped_session(
    engine: sa.Engine, store: es.EventStore, scoped: scoped_session[Session]
) -> None:
    """Every attempt runs in the registry's Session, so work that uses the scoped
    session directly (as Flask code does) commits, and rolls back, with the rest."""
    attempts: list[Session] = []
    with Session(engine) as other, other.begin():
        store.append(other, [make_event("order-2"), make_event("order-2")])

    def work(session: Session) -> int:
        attempts.append(session)
        assert session is scoped()
        store.append(scoped, [make_event("audit-1", event_type="Noted")])  # via the registry
        version = store.stream_version(session, BC, AT, "order-2")
        if len(attempts) == 1:
            version -= 1  # as if another writer had got there first: a conflict, once
        return store.append(
            session, [make_event("order-2")], es.ExpectedVersion.exact(version)
        ).to_version

    assert es.run_in_transaction(scoped, work, attempts=3) == 3
    assert len(attempts) == 2
    assert not scoped().in_transaction()  # committed
    with Session(engine) as session:
        # The first attempt's "Noted" event was rolled back with its conflict.
        assert len(store.read_stream(session, BC, AT, "audit-1")) == 1
        assert store.stream_version(session, BC, AT, "order-2") == 3


def test_run_in_transaction_refuses_a_scoped_session_in_a_transaction(
    engine: sa.Engine, store: es.EventStore, scoped: scoped_session[Session]
) -> None:
    store.append(scoped, [make_event()])  # the caller's own unfinished work
    calls: list[Session] = []
    with pytest.raises(es.ConfigurationError, match="already has one in progress"):
        es.run_in_transaction(scoped, calls.append)
    assert calls == []
    assert scoped().in_transaction()  # left alone: neither committed nor rolled back
    assert count_rows(engine) == (0, 0)
    scoped.commit()
    assert count_rows(engine) == (1, 1)


def test_processor_refuses_a_scoped_session(
    engine: sa.Engine, scoped: scoped_session[Session]
) -> None:
    with pytest.raises(es.ConfigurationError, match=r"scoped_session.*pass the Engine"):
        es.Processor(scoped)  # type: ignore[arg-type]


# -- ids: accepted as UUIDs, one type each on the way back -------------------------------


def test_text_ids_accept_uuids() -> None:
    parent = make_event(uuid.UUID(int=1))
    trace = uuid.uuid4()
    child = make_event(
        parent.aggregate_id,
        causation_id=parent.event_id,
        correlation_id=parent.event_id,
        trace_id=trace,
    )
    assert parent.aggregate_id == "00000000-0000-0000-0000-000000000001"
    assert child.causation_id == child.correlation_id == str(parent.event_id)
    assert child.trace_id == str(trace)
    assert all(type(getattr(child, name)) is str for name in events_module._TEXT_IDS)
    # replace() goes through the same constructor (type checkers only know the fields).
    changes: dict[str, Any] = {"causation_id": trace}
    assert dataclasses.replace(child, **changes).causation_id == str(trace)
    # Anything else is left for the store to refuse, not converted.
    not_an_id: Any = 5
    assert make_event(causation_id=not_an_id).causation_id == not_an_id


def test_event_constructor_stub_matches_the_fields() -> None:
    """Event declares its constructor for type checkers (UUIDs for text ids) under
    TYPE_CHECKING; the runtime one is the dataclass's. Keep the two in step."""
    tree = ast.parse(inspect.getsource(events_module))
    event_class = next(
        node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Event"
    )
    stub = next(
        item
        for node in event_class.body
        if isinstance(node, ast.If)
        for item in node.body
        if isinstance(item, ast.FunctionDef) and item.name == "__init__"
    )
    declared = [
        (arg.arg, default is not None)
        for arg, default in zip(stub.args.kwonlyargs, stub.args.kw_defaults, strict=True)
    ]
    fields = [
        (
            f.name,
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING,
        )
        for f in dataclasses.fields(es.Event)
    ]
    assert declared == fields
    runtime = inspect.signature(es.Event)
    assert list(runtime.parameters) == [name for name, _ in fields]


ID_TYPES = {
    "event_id": uuid.UUID,
    "aggregate_id": str,
    "causation_id": str,
    "correlation_id": str,
    "trace_id": str,
}


def id_types(event: es.PersistedEvent) -> dict[str, type]:
    return {name: type(getattr(event, name)) for name in ID_TYPES}


def test_ids_come_back_with_one_type_everywhere(engine: sa.Engine, store: es.EventStore) -> None:
    order = uuid.uuid4()
    trace = uuid.uuid4()
    placed = make_event(order, correlation_id=uuid.uuid4(), trace_id=trace, causation_id="cmd-9")
    with Session(engine) as session, session.begin():
        first = store.append(session, [placed])
    previous = first.events[0]
    paid = make_event(
        order,
        event_type="OrderPaid",
        causation_id=previous.event_id,
        correlation_id=previous.correlation_id,
        trace_id=trace,
    )
    shipped = make_event(
        order,
        event_type="OrderShipped",
        causation_id=paid.event_id,
        correlation_id=previous.correlation_id,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",  # W3C trace ids are hex text
    )
    with Session(engine) as session, session.begin():
        second = store.append(session, [paid, shipped])  # PostgreSQL: the many-event path
    appended = [*first.events, *second.events]

    with Session(engine) as session:
        stream = store.read_stream(session, BC, AT, order)
        log = store.read_all(session)
    handled = projected(engine, store)

    for source in (stream.events, log, handled):
        assert list(source) == appended  # every field equal, ids included
    for event in [*appended, *stream, *log, *handled]:
        assert id_types(event) == ID_TYPES
    got_paid = stream.events[1]
    assert got_paid.causation_id == str(placed.event_id)
    assert uuid.UUID(got_paid.causation_id) == previous.event_id
    assert got_paid.correlation_id == previous.correlation_id
    assert got_paid.trace_id == str(trace)
    assert stream.events[2].causation_id == str(paid.event_id)
    assert stream.events[2].trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert stream.aggregate_id == str(order)


# -- payloads: a json_default hook, or a refusal before anything is written ---------------


class Status(enum.Enum):
    PAID = "paid"
    PRICE = Decimal("9.99")


@dataclasses.dataclass
class Line:
    sku: str
    price: Decimal


class FakeModel:
    """Duck-types a pydantic v2 model (pydantic is not a dependency)."""

    def __init__(self, amount: Decimal) -> None:
        self.amount = amount

    def model_dump(self, *, mode: str) -> dict[str, Any]:
        assert mode == "json"
        return {"amount": str(self.amount), "kind": "model"}


ORDER_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")
PLACED_AT = datetime(2024, 3, 1, 12, 30, 15, 120000, tzinfo=timezone(timedelta(hours=2)))

RICH_PAYLOAD: dict[str, Any] = {
    "price": Decimal("0.10"),
    "total": Decimal("12345678901234567890.123456789012345678"),
    "zero": Decimal("0.00"),
    "negative": Decimal("-1E+3"),
    "placed_at": PLACED_AT,
    "due": date(2024, 3, 31),
    "cutoff": time(17, 30),
    "order": ORDER_ID,
    "status": Status.PAID,
    "price_point": Status.PRICE,
    "lines": [Line("A-1", Decimal("19.90"))],
    "model": FakeModel(Decimal("3.30")),
    "plain": {"n": 1, "f": 0.5, "s": "x", "none": None},
}
#: What RICH_PAYLOAD reads back as, with eventsource.json_default: exact strings.
RICH_JSON: dict[str, Any] = {
    "price": "0.10",
    "total": "12345678901234567890.123456789012345678",
    "zero": "0.00",
    "negative": "-1E+3",
    "placed_at": "2024-03-01T12:30:15.120000+02:00",
    "due": "2024-03-31",
    "cutoff": "17:30:00",
    "order": "12345678-1234-5678-1234-567812345678",
    "status": "paid",
    "price_point": "9.99",
    "lines": [{"sku": "A-1", "price": "19.90"}],
    "model": {"amount": "3.30", "kind": "model"},
    "plain": {"n": 1, "f": 0.5, "s": "x", "none": None},
}


@pytest.mark.parametrize("count", [1, 3], ids=["one-event", "many-events"])
def test_json_default_round_trips_exactly(engine: sa.Engine, count: int) -> None:
    store = es.EventStore(json_default=es.json_default)
    events = [
        make_event(
            ORDER_ID,
            payload=RICH_PAYLOAD,
            metadata={"fee": Decimal("0.01"), "user": ORDER_ID, "at": PLACED_AT},
        )
        for _ in range(count)
    ]
    with Session(engine) as session, session.begin():
        result = store.append(session, events)
    with Session(engine) as session:
        stream = store.read_stream(session, BC, AT, ORDER_ID)
    handled = projected(engine, store)
    metadata_json = {
        "fee": "0.01",
        "user": "12345678-1234-5678-1234-567812345678",
        "at": "2024-03-01T12:30:15.120000+02:00",
    }
    for source in (result.events, stream.events, handled):
        assert [e.payload for e in source] == [RICH_JSON] * count
        assert [e.metadata for e in source] == [metadata_json] * count
    # The append result carries the payload as it reads back, not the Decimals given.
    assert list(stream) == list(result.events) == handled
    assert Decimal(stream.events[0].payload["price"]) == Decimal("0.10")


def test_hook_is_used_for_nested_and_scalar_payloads(engine: sa.Engine) -> None:
    store = es.EventStore(json_default=es.json_default)
    values: list[Any] = [Decimal("0.10"), [Decimal("1.5"), {"d": date(2024, 1, 2)}], None]
    with Session(engine) as session, session.begin():
        for i, value in enumerate(values):
            store.append(session, [make_event(f"o-{i}", payload=value, metadata=None)])
    with Session(engine) as session:
        got = [e.payload for e in store.read_all(session)]
        assert [e.metadata for e in store.read_all(session)] == [None, None, None]
    assert got == ["0.10", ["1.5", {"d": "2024-01-02"}], None]


def test_a_custom_hook_wraps_the_ready_made_one(engine: sa.Engine) -> None:
    class Money:
        def __init__(self, amount: str, currency: str) -> None:
            self.amount, self.currency = Decimal(amount), currency

    def default(value: object) -> Any:
        if isinstance(value, Money):
            return {"amount": value.amount, "currency": value.currency}  # Decimal: nested
        return es.json_default(value)

    store = es.EventStore(json_default=default)
    with Session(engine) as session, session.begin():
        result = store.append(session, [make_event(payload={"m": Money("0.10", "EUR")})])
    with Session(engine) as session:
        stream = store.read_stream(session, BC, AT, "order-1")
    assert stream.events[0].payload == {"m": {"amount": "0.10", "currency": "EUR"}}
    assert list(stream) == list(result.events)


UNSERIALISABLE: list[tuple[str, dict[str, Any]]] = [
    ("Decimal", {"payload": {"price": Decimal("0.10")}}),
    ("datetime", {"payload": {"at": PLACED_AT}}),
    ("UUID", {"payload": [ORDER_ID]}),
    ("Status", {"payload": {"s": Status.PAID}}),
    ("FakeModel", {"payload": FakeModel(Decimal(1))}),
    ("Decimal", {"metadata": {"fee": Decimal("0.01")}}),
]


@pytest.mark.parametrize(
    ("type_name", "fields"), UNSERIALISABLE, ids=[f"{t}-{next(iter(f))}" for t, f in UNSERIALISABLE]
)
def test_without_the_hook_such_values_are_refused(
    engine: sa.Engine, store: es.EventStore, type_name: str, fields: dict[str, Any]
) -> None:
    good = make_event("order-1")
    bad = make_event("order-1", **fields)
    with Session(engine) as session, session.begin():
        with pytest.raises(es.ValidationError) as caught:
            store.append(session, [good, bad])
        # The transaction stays usable: the refusal came before any statement.
        assert store.stream_version(session, BC, AT, "order-1") == 0
    message = str(caught.value)
    field = next(iter(fields))
    assert f"events[1].{field} is not JSON-serialisable" in message
    assert f"Object of type {type_name} is not JSON serializable" in message
    assert "EventStore(json_default=eventsource.json_default)" in message
    assert count_rows(engine) == (0, 0)


def test_the_hook_leaves_other_types_refused(engine: sa.Engine) -> None:
    store = es.EventStore(json_default=es.json_default)
    # A hook that returns something no better is refused too (never stored as null).
    looping = es.EventStore(json_default=lambda value: value)
    refused: list[tuple[es.EventStore, Any, str]] = [
        (store, {"raw": b"\x00"}, "Object of type bytes is not JSON serializable"),
        (store, {"set": {1, 2}}, "Object of type set is not JSON serializable"),
        (store, {"type": Decimal}, "Object of type type is not JSON serializable"),
        (store, {"x": object()}, "Object of type object is not JSON serializable"),
        (store, {"x": float("nan")}, "Out of range float values"),  # NaN is not JSON
        (looping, {"d": Decimal(1)}, "Circular reference"),
    ]
    with Session(engine) as session, session.begin():
        for which, payload, reason in refused:
            with pytest.raises(es.ValidationError, match=reason):
                which.append(session, [make_event(payload=payload)])
    assert count_rows(engine) == (0, 0)


def test_json_default_hook_must_be_callable() -> None:
    with pytest.raises(es.ConfigurationError, match="json_default must be a function"):
        es.EventStore(json_default="iso")  # type: ignore[arg-type]


def test_json_default_converts_exactly() -> None:
    assert es.json_default(Decimal("0.10")) == "0.10"
    assert es.json_default(Decimal("1E-30")) == "1E-30"
    assert es.json_default(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2024-01-02T03:04:05+00:00"
    assert es.json_default(date(2024, 1, 2)) == "2024-01-02"
    assert es.json_default(ORDER_ID) == str(ORDER_ID)
    assert es.json_default(Status.PRICE) == Decimal("9.99")  # encoded again by the encoder
    assert es.json_default(Line("A", Decimal(1))) == {"sku": "A", "price": Decimal(1)}
    assert es.json_default(FakeModel(Decimal("2.50"))) == {"amount": "2.50", "kind": "model"}
    for value in (b"x", {1}, FakeModel, Line, 1j):
        with pytest.raises(TypeError, match="is not JSON serializable"):
            es.json_default(value)


def test_null_metadata_is_sql_null_on_every_database(engine: sa.Engine) -> None:
    """Both databases store the same: the text the encoder made, or SQL NULL."""
    store = es.EventStore()
    with Session(engine) as session, session.begin():
        store.append(session, [make_event(metadata=None), make_event(metadata={"a": 1})])
    events = store.tables.events
    with plain(engine).connect() as conn:
        nulls = conn.execute(
            sa.select(sa.func.count()).select_from(events).where(events.c.metadata.is_(None))
        ).scalar()
    assert nulls == 1


@pytest.mark.postgres
def test_sqlite_and_postgresql_read_back_the_same(sqlite_url: sa.URL, pg_url: sa.URL) -> None:
    """The same append reads back identically on both databases, value and type of
    every field, hook-made strings included."""
    urls = [sqlite_url, pg_url]
    store = es.EventStore(json_default=es.json_default)
    parent = make_event(ORDER_ID, payload=RICH_PAYLOAD, created_at=PLACED_AT)
    child = make_event(
        ORDER_ID,
        event_type="OrderPaid",
        causation_id=parent.event_id,
        correlation_id=parent.event_id,
        trace_id=uuid.UUID(int=7),
        metadata={"fee": Decimal("0.01")},
        created_at=PLACED_AT,
    )
    seen: list[list[list[tuple[type, str]]]] = []
    for url in urls:
        engine = es.create_engine(url)
        try:
            with Session(engine) as session, session.begin():
                store.append(session, [parent, child])
            with Session(engine) as session:
                stream = store.read_stream(session, BC, AT, ORDER_ID)
        finally:
            engine.dispose()
        seen.append([comparable(e) for e in stream])
    assert seen[0] == seen[1]
    assert seen[0][1][9] == (dict, '{"fee":"0.01"}')


def comparable(event: es.PersistedEvent) -> list[tuple[type, str]]:
    """Each field's type and value, as JSON with sorted keys (jsonb reorders keys)."""
    return [
        (type(value), json.dumps(value, sort_keys=True, default=repr, separators=(",", ":")))
        for value in (getattr(event, f.name) for f in dataclasses.fields(event))
    ]


class Seen(es.Projection):
    name = "seen"

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        pass


def test_operations_take_a_scoped_session(
    engine: sa.Engine, store: es.EventStore, scoped: scoped_session[Session]
) -> None:
    """status, dead letters and reset take a scoped_session as they take a Session."""
    with scoped.begin():
        store.append(scoped, [make_event()])
    es.Processor(engine, store).run_until_caught_up(Seen())
    with scoped.begin():
        [row] = status.status(scoped, store=store)
        assert (row.projection, row.lag) == ("seen", 0)
        assert deadletters.list_dead_letters(scoped, store=store) == []
        assert rebuild.reset(scoped, "seen", store=store, keep_read_model=True) == 1
    assert status.status(engine, store=store) == []  # the reset committed with the Session
