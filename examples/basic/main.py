"""The event store on its own: append, read a stream, and handle a concurrency conflict.

A bank account is an aggregate: its state is whatever its events say. To change it you
load its stream, decide, and append new events *expecting the version you loaded*. If
someone else appended in between, the store raises ``OptimisticConcurrencyError``
instead of silently interleaving the two decisions; you reload and decide again.

    python examples/basic/main.py

The database is ``$DATABASE_URL`` (default: ``eventsource.db`` in the current directory).
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy.orm import Session

import eventsource
from eventsource import (
    Event,
    EventStore,
    ExpectedVersion,
    OptimisticConcurrencyError,
    PersistedEvent,
    Stream,
)

BOUNDED_CONTEXT = "banking"
AGGREGATE_TYPE = "BankAccount"


def balance_of(events: Sequence[PersistedEvent] | Stream) -> int:
    """Fold the account's events into its current balance (in cents)."""
    balance = 0
    for event in events:
        if event.event_type == "MoneyDeposited":
            balance += event.payload["amount_cents"]
        elif event.event_type == "MoneyWithdrawn":
            balance -= event.payload["amount_cents"]
    return balance


def account_event(account_id: str, event_type: str, **payload: object) -> Event:
    return Event(
        bounded_context=BOUNDED_CONTEXT,
        aggregate_type=AGGREGATE_TYPE,
        aggregate_id=account_id,
        event_type=event_type,
        payload=payload,
    )


def load(session: Session, store: EventStore, account_id: str) -> Stream:
    return store.read_stream(session, BOUNDED_CONTEXT, AGGREGATE_TYPE, account_id)


def withdraw(stream: Stream, amount_cents: int, who: str) -> Event:
    """The decision: refuse to overdraw, given the state the caller loaded."""
    balance = balance_of(stream)
    if amount_cents > balance:
        raise ValueError(f"{who}: cannot withdraw {amount_cents} from a balance of {balance}")
    return account_event(stream.aggregate_id, "MoneyWithdrawn", amount_cents=amount_cents, by=who)


def with_retry(
    engine: sa.Engine,
    store: EventStore,
    account_id: str,
    decide: Callable[[Stream], Event],
    attempts: int = 3,
) -> int:
    """Load, decide, append expecting the loaded version; on a conflict start over.

    The decision is made outside the write transaction (as in a web request that
    loaded the account earlier), so another writer can get in between: the
    expected version is what turns that race into a clean, retryable error.
    """
    for attempt in range(1, attempts + 1):
        with Session(engine) as session:
            stream = load(session, store, account_id)
        event = decide(stream)
        try:
            with Session(engine) as session, session.begin():
                result = store.append(session, [event], ExpectedVersion.exact(stream.version))
        except OptimisticConcurrencyError as exc:
            print(f"   attempt {attempt}: conflict ({exc}); reloading and retrying")
            continue
        print(f"   attempt {attempt}: appended at version {result.to_version}")
        return result.to_version
    raise RuntimeError(f"gave up after {attempts} conflicts")


def deposit(engine: sa.Engine, store: EventStore, account_id: str, amount_cents: int) -> None:
    """Another writer: a deposit that does not care about the version (ExpectedVersion.any())."""
    with Session(engine) as session, session.begin():
        store.append(
            session,
            [account_event(account_id, "MoneyDeposited", amount_cents=amount_cents)],
            ExpectedVersion.any(),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        help="database URL (default: $DATABASE_URL, else sqlite:///eventsource.db)",
    )
    args = parser.parse_args(argv)

    engine = eventsource.create_engine(args.database_url)
    print(f"Database: {engine.url.render_as_string(hide_password=True)}")
    eventsource.upgrade(engine)  # the library's tables, through its Alembic migrations
    store = EventStore()
    account_id = str(uuid.uuid4())
    print(f"Account {account_id}")

    # 1. Open the account: no_stream() means "this aggregate must not exist yet".
    #    The store never commits: the `with session.begin()` block does.
    with Session(engine) as session, session.begin():
        result = store.append(
            session,
            [
                account_event(account_id, "AccountOpened", owner="Alice"),
                account_event(account_id, "MoneyDeposited", amount_cents=10_000),
            ],
            ExpectedVersion.no_stream(),
        )
    print(
        f"1. Opened with a deposit of $100.00: version {result.to_version}, "
        f"global positions {list(result.global_positions)}"
    )

    # 2. Opening it again is refused: the stream exists.
    with Session(engine) as session, session.begin():
        try:
            store.append(
                session,
                [account_event(account_id, "AccountOpened", owner="Mallory")],
                ExpectedVersion.no_stream(),
            )
        except OptimisticConcurrencyError as exc:
            print(f"2. Opening it twice fails: OptimisticConcurrencyError: {exc}")

    # 3. Two clerks load the account at the same version...
    with Session(engine) as session:
        seen_by_bob = load(session, store, account_id)
        seen_by_carol = load(session, store, account_id)
    print(
        f"3. Bob and Carol both load version {seen_by_bob.version} "
        f"(balance ${balance_of(seen_by_bob) / 100:.2f})"
    )

    # ...Bob withdraws $70 first, expecting the version he loaded: it works.
    with Session(engine) as session, session.begin():
        store.append(
            session,
            [withdraw(seen_by_bob, 7_000, "Bob")],
            ExpectedVersion.exact(seen_by_bob.version),
        )
    print("   Bob withdraws $70.00: ok")

    # ...Carol's $50 decision was made on a stale balance ($100): the store refuses it.
    with Session(engine) as session, session.begin():
        try:
            store.append(
                session,
                [withdraw(seen_by_carol, 5_000, "Carol")],
                ExpectedVersion.exact(seen_by_carol.version),
            )
        except OptimisticConcurrencyError as exc:
            print(f"   Carol withdraws $50.00: OptimisticConcurrencyError: {exc}")
            print(f"   (expected: {exc.expected}; actual version: {exc.actual})")

    # 4. The fix is to reload and decide again. With the fresh balance ($30.00) the $50
    #    withdrawal is refused by the account's own rule, so Carol asks for $25. While she
    #    decides, Dave deposits $20: her first attempt conflicts, the retry goes through.
    with Session(engine) as session:
        stream = load(session, store, account_id)
    try:
        withdraw(stream, 5_000, "Carol")
    except ValueError as exc:
        print(f"4. Carol reloads: {exc}; she asks for $25.00 instead")
    dave_deposited = False

    def carol_decides(stream: Stream) -> Event:
        nonlocal dave_deposited
        if not dave_deposited:  # meanwhile, in another request...
            deposit(engine, store, account_id, 2_000)
            dave_deposited = True
            print("   (meanwhile Dave deposits $20.00)")
        return withdraw(stream, 2_500, "Carol")

    with_retry(engine, store, account_id, carol_decides)

    # 5. Read the whole stream back (from_version / to_version select a slice).
    with Session(engine) as session:
        stream = load(session, store, account_id)
        recent = store.read_stream(
            session, BOUNDED_CONTEXT, AGGREGATE_TYPE, account_id, from_version=3
        )
    print(f"5. The stream, version {stream.version}:")
    for event in stream:
        print(
            f"   v{event.aggregate_version} #{event.global_position} {event.event_type} "
            f"{event.payload}"
        )
    print(f"   events from version 3 on: {[e.event_type for e in recent]}")
    print(f"Balance: ${balance_of(stream) / 100:.2f}")
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
