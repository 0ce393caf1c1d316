"""Input limits of ``EventStore.append``: key sizes in UTF-8 bytes, JSON nesting depth.

PostgreSQL cannot index a key row over 2,704 bytes (it raises ProgramLimitExceeded),
and Python's json encoder and decoder recurse once per nesting level on append and on
every read. Both limits are refused up front with a ``ValidationError``, alike on
SQLite and PostgreSQL, before anything is written; the largest accepted values append
and read back on both.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource import store as store_module
from eventsource.store import (
    MAX_AGGREGATE_ID_BYTES,
    MAX_AGGREGATE_TYPE_BYTES,
    MAX_BOUNDED_CONTEXT_BYTES,
    MAX_JSON_DEPTH,
)

T = TypeVar("T")
BC = "limits"
AT = "Thing"

#: Code point ranges whose characters take 1, 2, 3 and 4 bytes in UTF-8.
_UTF8_WIDTH_RANGES = ((0x30, 0x7A), (0x0400, 0x04FF), (0x4E00, 0x9FFF), (0x1F300, 0x1F5FF))


def random_text(n_bytes: int, seed: int) -> str:
    """Random text of exactly ``n_bytes`` UTF-8 bytes, mixing 1- to 4-byte characters.

    Random, so PostgreSQL cannot compress it into a smaller index row (a repeated
    character would pass any limit); multi-byte, so characters and bytes differ.
    """
    rng = random.Random(seed)
    chars: list[str] = []
    size = 0
    while size < n_bytes:
        width = rng.randint(1, min(4, n_bytes - size))
        low, high = _UTF8_WIDTH_RANGES[width - 1]
        chars.append(chr(rng.randint(low, high)))
        size += width
    text = "".join(chars)
    assert len(text.encode("utf-8")) == n_bytes
    return text


def event(
    *,
    bounded_context: str = BC,
    aggregate_type: str = AT,
    aggregate_id: str = "thing-1",
    payload: Any = None,
    metadata: dict[str, Any] | None = None,
) -> es.Event:
    return es.Event(
        bounded_context=bounded_context,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        event_type="ThingHappened",
        payload={"n": 1} if payload is None else payload,
        metadata=metadata,
    )


def count_rows(engine: sa.Engine) -> tuple[int, int]:
    """(events, aggregate_heads) rows committed."""
    with engine.connect() as conn:
        events = conn.execute(sa.text("SELECT count(*) FROM events")).scalar_one()
        heads = conn.execute(sa.text("SELECT count(*) FROM aggregate_heads")).scalar_one()
    return int(events), int(heads)


def refused_then_usable(
    engine: sa.Engine, store: es.EventStore, bad: es.Event, match: str
) -> es.ValidationError:
    """Append ``bad`` (must be refused), then a good event in the same transaction.

    On PostgreSQL a statement that failed would have aborted the transaction, so the
    good append succeeding shows that nothing reached the database; afterwards only
    the good event is stored.
    """
    with Session(engine) as session, session.begin():
        with pytest.raises(es.ValidationError, match=match) as caught:
            store.append(session, [bad])
        store.append(session, [event(aggregate_id="good")])
    assert count_rows(engine) == (1, 1)
    return caught.value


# -- key sizes --------------------------------------------------------------------------


def test_limits_are_the_documented_ones() -> None:
    assert (MAX_BOUNDED_CONTEXT_BYTES, MAX_AGGREGATE_TYPE_BYTES, MAX_AGGREGATE_ID_BYTES) == (
        255,
        255,
        2000,
    )


def test_largest_keys_append_and_read_back(engine: sa.Engine, store: es.EventStore) -> None:
    bc = random_text(MAX_BOUNDED_CONTEXT_BYTES, seed=1)
    at = random_text(MAX_AGGREGATE_TYPE_BYTES, seed=2)
    aid = random_text(MAX_AGGREGATE_ID_BYTES, seed=3)
    assert len(aid) < MAX_AGGREGATE_ID_BYTES  # multi-byte: fewer characters than bytes
    keys: dict[str, Any] = {"bounded_context": bc, "aggregate_type": at, "aggregate_id": aid}

    # Every append statement: several events (PostgreSQL: the array form) creating the
    # head, then one event with exact(), then one with any() (updating the head).
    with Session(engine) as session, session.begin():
        store.append(session, [event(**keys), event(**keys)], es.ExpectedVersion.no_stream())
    with Session(engine) as session, session.begin():
        store.append(session, [event(**keys)], es.ExpectedVersion.exact(2))
    with Session(engine) as session, session.begin():
        result = store.append(session, [event(**keys)])
    assert result.to_version == 4

    with Session(engine) as session:
        stream = store.read_stream(session, bc, at, aid)
        assert store.stream_version(session, bc, at, aid) == 4
        everything = store.read_all(session)
    assert [e.aggregate_version for e in stream] == [1, 2, 3, 4]
    for persisted in [*stream, *everything]:
        assert (persisted.bounded_context, persisted.aggregate_type, persisted.aggregate_id) == (
            bc,
            at,
            aid,
        )

    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            for table in ("events", "aggregate_heads"):
                rows = conn.execute(
                    sa.text(
                        f"SELECT octet_length(aggregate_id) AS size,"
                        f" pg_column_compression(aggregate_id) AS compression FROM {table}"
                    )
                ).all()
                # Stored uncompressed: the index rows really carried all 2,000 bytes.
                assert {(row.size, row.compression) for row in rows} == {
                    (MAX_AGGREGATE_ID_BYTES, None)
                }, table


@pytest.mark.parametrize(
    ("field", "limit"),
    [
        ("bounded_context", MAX_BOUNDED_CONTEXT_BYTES),
        ("aggregate_type", MAX_AGGREGATE_TYPE_BYTES),
        ("aggregate_id", MAX_AGGREGATE_ID_BYTES),
    ],
)
def test_one_byte_over_a_key_limit_is_refused(
    engine: sa.Engine, store: es.EventStore, field: str, limit: int
) -> None:
    too_long = random_text(limit + 1, seed=limit)
    assert len(too_long) <= limit  # refused for its bytes, not its characters
    overrides: dict[str, Any] = {field: too_long}
    error = refused_then_usable(
        engine,
        store,
        event(**overrides),
        match=rf"events\[0\]\.{field} is {limit + 1:,} bytes in UTF-8 .* at most {limit:,} bytes",
    )
    assert too_long not in str(error)


def test_a_megabyte_id_is_refused_on_every_database(
    engine: sa.Engine, store: es.EventStore
) -> None:
    huge = "x" * 1_000_000
    error = refused_then_usable(
        engine, store, event(aggregate_id=huge), match="1,000,000 bytes in UTF-8"
    )
    assert len(str(error)) < 500  # the message quotes the start of the id, not all of it


def test_reads_with_oversized_keys_still_work(engine: sa.Engine, store: es.EventStore) -> None:
    long_id = random_text(20_000, seed=7)
    big_name = random_text(5_000, seed=8)
    with Session(engine) as session, session.begin():
        store.append(session, [event()])
    with Session(engine) as session:
        assert len(store.read_stream(session, BC, AT, long_id)) == 0
        assert len(store.read_stream(session, big_name, big_name, long_id, 1, 5)) == 0
        assert store.stream_version(session, BC, AT, long_id) == 0
        assert store.stream_version(session, big_name, AT, "thing-1") == 0
        assert store.stream_version(session, BC, AT, "thing-1") == 1


# -- JSON nesting depth -----------------------------------------------------------------


def nested(depth: int, leaf: Any = "bottom") -> Any:
    """A JSON value ``depth`` levels deep, alternating objects and arrays (built in a loop)."""
    value = leaf
    for level in range(depth):
        value = {"k": value, "level": level} if level % 2 else [level, value]
    return value


def nested_metadata(depth: int) -> dict[str, Any]:
    """Metadata (a mapping) ``depth`` levels deep, counting the mapping itself."""
    return {"trace": nested(depth - 1)}


def depth_of(value: Any) -> int:
    """Nesting depth of a decoded JSON value, without recursion."""
    deepest = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def with_frames(frames: int, call: Callable[[], T]) -> T:
    """``call()`` with ``frames`` more Python frames on the stack."""
    if frames == 0:
        return call()
    return with_frames(frames - 1, call)


class CollectPayloads(es.Projection):
    name = "collect_payloads"

    def __init__(self) -> None:
        self.seen: list[tuple[Any, Any]] = []

    def handle(self, event: es.PersistedEvent, session: Session) -> None:
        self.seen.append((event.payload, event.metadata))


def test_deepest_accepted_json_round_trips(engine: sa.Engine, store: es.EventStore) -> None:
    payload = nested(MAX_JSON_DEPTH)
    metadata = nested_metadata(MAX_JSON_DEPTH)
    assert depth_of(payload) == depth_of(metadata) == MAX_JSON_DEPTH
    with Session(engine) as session, session.begin():
        # One event, then two (PostgreSQL nests a batch two levels deeper in one array).
        store.append(session, [event(payload=payload, metadata=metadata)])
        store.append(
            session,
            [event(payload=payload, metadata=metadata), event(payload=payload)],
        )

    with Session(engine) as session:
        stream = store.read_stream(session, BC, AT, "thing-1")
        everything = store.read_all(session)
        # A reader already deep in its own call stack decodes it too (the margin).
        deep_reader = with_frames(500, lambda: store.read_all(session))
    expected = [(payload, metadata), (payload, metadata), (payload, None)]
    assert [(e.payload, e.metadata) for e in stream] == expected
    assert [(e.payload, e.metadata) for e in everything] == expected
    assert [(e.payload, e.metadata) for e in deep_reader] == expected

    projection = CollectPayloads()
    config = es.ProcessorConfig(batch_size=2, poll_interval=0.01)
    # Decoded in a worker thread too, as a Runner would.
    outcome: list[int] = []
    worker = threading.Thread(
        target=lambda: outcome.append(
            es.Processor(engine, store, config).run_until_caught_up(projection)
        )
    )
    worker.start()
    worker.join(30)
    assert outcome == [3]
    assert projection.seen == expected


@pytest.mark.parametrize("where", ["payload", "metadata"])
def test_one_level_deeper_is_refused(engine: sa.Engine, store: es.EventStore, where: str) -> None:
    deeper = MAX_JSON_DEPTH + 1
    bad = (
        event(payload=nested(deeper))
        if where == "payload"
        else event(metadata=nested_metadata(deeper))
    )
    refused_then_usable(
        engine,
        store,
        bad,
        match=rf"events\[0\]\.{where} is nested {deeper} levels deep; "
        rf"at most {MAX_JSON_DEPTH} levels",
    )


@pytest.mark.parametrize("where", ["payload", "metadata"])
def test_far_too_deep_json_is_refused_with_a_readable_error(
    engine: sa.Engine, store: es.EventStore, where: str
) -> None:
    # Deep enough for the JSON encoder to hit the recursion limit.
    bad = (
        event(payload=nested(100_000))
        if where == "payload"
        else event(metadata=nested_metadata(100_000))
    )
    error = refused_then_usable(
        engine, store, bad, match=rf"events\[0\]\.{where} is nested too deeply to encode"
    )
    assert f"at most {MAX_JSON_DEPTH} levels" in str(error)


def test_brackets_in_strings_and_wide_values_are_not_depth(
    engine: sa.Engine, store: es.EventStore
) -> None:
    payload = {
        "text": "[{" * 5_000,
        'key "[" with \\ quotes': '\\[\\{"]',
        "rows": [{"i": i, "tags": ["a", "b"]} for i in range(2_000)],
        "deep": nested(MAX_JSON_DEPTH - 1),
    }
    assert depth_of(payload) == MAX_JSON_DEPTH
    with Session(engine) as session, session.begin():
        store.append(session, [event(payload=payload)])
    with Session(engine) as session:
        assert [e.payload for e in store.read_stream(session, BC, AT, "thing-1")] == [payload]


def test_json_depth_counts_arrays_and_objects_outside_strings() -> None:
    depth = store_module._json_depth
    encode = store_module._encode
    assert depth(encode(1)) == 0
    assert depth(encode({})) == depth(encode([])) == 1
    assert depth(encode({"a": [1, {"b": "]]]"}]})) == 3
    assert depth(encode({'x"[': ["\\", '\\"]{']})) == 2
    assert depth(encode([[[]], [[[]]]])) == 4
    value = nested(250, leaf=str(uuid.uuid4()))
    assert depth(encode(value)) == depth_of(value) == 250
