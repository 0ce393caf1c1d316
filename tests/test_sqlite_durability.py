"""SQLite durability: ``PRAGMA synchronous`` is FULL unless the caller opts into NORMAL.

In WAL mode, NORMAL lets a power loss or an OS crash roll back transactions that
already committed; an event store is a system of record, so FULL is the default and
NORMAL an explicit ``create_engine(url, sqlite_synchronous="NORMAL")``.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource as es
from eventsource import database

#: ``PRAGMA synchronous`` answers with a number.
LEVEL_NUMBERS = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}


def pragmas_of_pooled_connections(engine: sa.Engine, count: int = 3) -> list[tuple[int, str]]:
    """(synchronous, journal_mode) of ``count`` pool connections held open at once.

    Asked on the driver connections, outside any transaction: ``engine.connect()``
    would start each with ``BEGIN IMMEDIATE``, and the second would wait for the first.
    """
    with ExitStack() as stack:
        connections = [engine.raw_connection() for _ in range(count)]
        for connection in connections:
            stack.callback(connection.close)  # back to the pool
        assert len({id(c.dbapi_connection) for c in connections}) == count
        answers = []
        for connection in connections:
            cursor = connection.cursor()
            try:
                synchronous = cursor.execute("PRAGMA synchronous").fetchone()[0]
                journal_mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
            finally:
                cursor.close()
            answers.append((int(synchronous), str(journal_mode)))
        return answers


def test_synchronous_is_full_by_default(tmp_path: Path) -> None:
    engine = es.create_engine(f"sqlite:///{tmp_path / 'events.db'}")
    try:
        assert pragmas_of_pooled_connections(engine) == [(LEVEL_NUMBERS["FULL"], "wal")] * 3
        engine.dispose()  # connections made again later are set up the same way
        assert pragmas_of_pooled_connections(engine) == [(LEVEL_NUMBERS["FULL"], "wal")] * 3
    finally:
        engine.dispose()
    assert database.SQLITE_SYNCHRONOUS_DEFAULT == "FULL"


@pytest.mark.parametrize("level", ["FULL", "NORMAL"])
def test_synchronous_is_the_level_asked_for(tmp_path: Path, level: Any) -> None:
    engine = es.create_engine(
        f"sqlite:///{tmp_path / 'events.db'}", sqlite_synchronous=level, pool_size=3
    )
    try:
        assert pragmas_of_pooled_connections(engine) == [(LEVEL_NUMBERS[level], "wal")] * 3
        # The store works the same at either level.
        es.upgrade(engine)
        store = es.EventStore()
        event = es.Event(
            bounded_context="shop", aggregate_type="Cart", aggregate_id="c-1", event_type="Made"
        )
        with Session(engine) as session, session.begin():
            store.append(session, [event], es.ExpectedVersion.no_stream())
        with Session(engine) as session:
            assert store.stream_version(session, "shop", "Cart", "c-1") == 1
        assert pragmas_of_pooled_connections(engine) == [(LEVEL_NUMBERS[level], "wal")] * 3
    finally:
        engine.dispose()


@pytest.mark.parametrize("level", ["OFF", "EXTRA", "normal", "", 1, None])
@pytest.mark.parametrize(
    "url", ["sqlite:///never.db", "sqlite://", "postgresql://postgres@127.0.0.1/never"]
)
def test_other_levels_are_refused_on_every_url(url: str, level: Any) -> None:
    with pytest.raises(es.ConfigurationError, match=r"sqlite_synchronous must be one of 'FULL'"):
        es.create_engine(url, sqlite_synchronous=level)


def test_the_level_must_be_passed_by_keyword(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        es.create_engine(f"sqlite:///{tmp_path / 'x.db'}", "NORMAL")  # type: ignore[call-arg]


@pytest.mark.postgres
def test_sqlite_synchronous_is_ignored_on_postgresql(pg_url: sa.URL) -> None:
    engine = es.create_engine(pg_url, sqlite_synchronous="NORMAL")
    try:
        store = es.EventStore()
        event = es.Event(
            bounded_context="shop", aggregate_type="Cart", aggregate_id="c-1", event_type="Made"
        )
        with Session(engine) as session, session.begin():
            store.append(session, [event])
            # Durability on PostgreSQL stays the server's: synchronous_commit untouched.
            setting = session.execute(sa.text("SHOW synchronous_commit")).scalar_one()
        assert setting == "on"
        with Session(engine) as session:
            assert store.stream_version(session, "shop", "Cart", "c-1") == 1
    finally:
        engine.dispose()
