"""Wake-ups: a committed append wakes the processors (and waiters) it concerns at once.

Hints, never facts: a processor that is woken runs a batch, and correctness still rests
on its gap-free read (DESIGN invariant 2). A hint that is lost costs latency only; the
poll interval stays as the fallback.

How a hint travels:

- :meth:`EventStore.append` (with ``notify=True``, the default) notes what it wrote
  (events table, bounded context, aggregate type, partition hash) on its connection.
  Nothing is sent inside the caller's transaction.
- Engine events (listened on every engine): ``commit`` keeps the notes, ``rollback``
  drops them, and the next ``begin`` or the return to the pool (whichever comes first) publishes
  them. A rolled-back append therefore never wakes anyone, and a hint leaves only
  after its commit has returned.
- Publishing wakes the subscribers of this process directly (SQLite and PostgreSQL)
  and, on PostgreSQL, hands the hint to the process's notifier thread, which coalesces
  what arrives meanwhile and sends one ``pg_notify`` per channel on a connection of its
  own (autocommit, ``synchronous_commit`` off: a hint needs no durability), closed
  after ``NOTIFIER_IDLE`` seconds without a hint.

Why not NOTIFY inside the append transaction: PostgreSQL takes one lock for the
server's notification queue (shared by every database) at commit and holds it until the
commit is flushed, so concurrent writers that NOTIFY commit one at a time and lose group
commit (measured by ``bench/notify_lock.py``).

- On PostgreSQL each process has one listener per database: a thread with a
  connection of its own (outside the pool) that LISTENs on the channels its subscribers
  need and wakes those whose scope matches. It skips what this process sent (already
  delivered directly), re-LISTENs after a lost connection (with backoff), and wakes
  every subscriber whenever it (re)starts listening, since hints may have been missed
  meanwhile. Subscriptions are ``active`` only while their channel is listened to:
  processors back off their idle polls only then.

The channel is ``eventsource.<events table>`` (hashed when longer than PostgreSQL's
63-byte identifiers), so several stores in one database wake only their own workers.
Poolers that do not carry LISTEN (PgBouncer in transaction mode) need wake-ups off:
``ProcessorConfig(wake_ups=False)`` or ``eventsource run --no-wake-ups``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from eventsource import database

logger = logging.getLogger("eventsource.wakeups")

#: Keys of our notes in a DBAPI connection's ``info`` (SQLAlchemy's per-connection dict).
_HUB = "eventsource.wakeups.hub"
_PENDING = "eventsource.wakeups.pending"
_COMMITTED = "eventsource.wakeups.committed"

#: PostgreSQL refuses NOTIFY payloads of 8000 bytes or more; past this a hint says
#: "everything" instead of listing what was appended.
MAX_PAYLOAD = 7000
#: The notifier sends at most once per this many seconds (per process and database): the
#: first hint after a quiet spell at once, a stream of them coalesced. Each send is a
#: small transaction on the server; one per append would cost writers a fifth or more
#: of their throughput on a small machine (bench/notify_lock.py).
NOTIFY_MIN_INTERVAL = 0.005
#: At exit, how long the process waits for its hints to be sent.
EXIT_DRAIN = 2.0
#: The notifier closes its connection (and ends) after this long without a hint.
NOTIFIER_IDLE = 10.0
#: How long the listener waits for notifications before it looks at its subscriptions.
LISTEN_TICK = 0.2
#: How often an idle listener checks its connection with a query (a dead socket would
#: otherwise look like silence).
LISTEN_HEALTH_CHECK = 30.0
#: The listener's reconnection backoff.
RECONNECT_BACKOFF = (0.1, 5.0)
#: After the last waiter (not processor) leaves, the listener stays this long: waits
#: come and go with requests, and reconnecting for each would cost more than it saves.
WAITER_LINGER = 60.0


@dataclass(frozen=True, slots=True)
class Hint:
    """What one published hint says: appended scopes, moved checkpoints, or everything."""

    appended: frozenset[tuple[str, str, int]] = frozenset()
    """(bounded context, aggregate type, partition hash) of appended events."""
    checkpoints: frozenset[str] = frozenset()
    """Checkpoint names of projections whose checkpoint moved."""
    everything: bool = False
    """Wake every subscriber (a reconnect, or too much to list)."""


EVERYTHING = Hint(everything=True)


def channel_for(events_table: str) -> str:
    """The LISTEN/NOTIFY channel of a store's events table."""
    name = f"eventsource.{events_table}"
    if len(name.encode()) <= 63:
        return name
    return "eventsource." + hashlib.sha256(events_table.encode()).hexdigest()[:40]


class Subscription:
    """One subscriber's interest in one store: ``wake`` is called (in whatever thread
    publishes or listens) when ``matches`` accepts a hint. Close it when done."""

    def __init__(
        self,
        hub: _Hub,
        channel: str,
        matches: Callable[[Hint], bool],
        wake: Callable[[], None],
        *,
        waiter: bool,
    ) -> None:
        self.hub = hub
        self.channel = channel
        self.matches = matches
        self.wake = wake
        self.waiter = waiter

    @property
    def active(self) -> bool:
        """Hints from other processes arrive (PostgreSQL, while the listener listens):
        only then may idle polling back off."""
        return self.hub.listening(self.channel)

    def close(self) -> None:
        self.hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def subscribe(
    engine: sa.Engine,
    events_table: str,
    matches: Callable[[Hint], bool],
    wake: Callable[[], None],
    *,
    waiter: bool = False,
) -> Subscription:
    """Call ``wake()`` on hints about ``events_table`` that ``matches`` accepts, from this
    process's writers at once and, on PostgreSQL, from other processes' through the
    listener (started on the first subscription, stopped after the last)."""
    hub = _hub_for(engine)
    subscription = Subscription(hub, channel_for(events_table), matches, wake, waiter=waiter)
    hub.subscribe(subscription)
    return subscription


def note_append(
    connection: sa.Connection,
    events_table: str,
    bounded_context: str,
    aggregate_type: str,
    partition_hash: int,
) -> None:
    """Remember an append on ``connection``: published once its transaction commits."""
    info = connection.info
    hub = info.get(_HUB)
    if hub is None or hub.pid != os.getpid():  # a connection a forked child inherited
        info[_HUB] = _hub_for(connection.engine)
    pending = info.get(_PENDING)
    if pending is None:
        pending = info[_PENDING] = []
    pending.append((events_table, bounded_context, aggregate_type, partition_hash))


def note_broad_append(connection: sa.Connection, events_table: str) -> None:
    """Remember appends too many to list (a bulk import of many aggregates): once the
    transaction commits, every subscriber of ``events_table`` is woken by one hint,
    instead of a hint listing (and every processor matching) each scope."""
    # An empty bounded context, which no append has, stands for every scope.
    note_append(connection, events_table, "", "", 0)


def publish_checkpoint(engine: sa.Engine, events_table: str, checkpoint_name: str) -> None:
    """Say that a projection's checkpoint moved (after the batch committed): waiters
    (:func:`eventsource.wait_until_handled`) look again."""
    _hub_for(engine).publish(
        {channel_for(events_table): Hint(checkpoints=frozenset([checkpoint_name]))}
    )


# -- engine events ----------------------------------------------------------------


def _info(connection: sa.Connection) -> dict[Any, Any] | None:
    """The connection's ``info``, or None when it has none to give: an invalidated
    connection (its DBAPI connection lost, the notes with it) refuses to reconnect
    inside its transaction, and these hooks run during its rollback."""
    if connection.invalidated or connection.closed:
        return None
    try:
        return connection.info
    except sa.exc.SQLAlchemyError:
        return None


def _on_commit(connection: sa.Connection) -> None:
    info = _info(connection)
    if info is None:
        return
    pending = info.pop(_PENDING, None)
    if pending:
        committed = info.get(_COMMITTED)
        if committed is None:
            info[_COMMITTED] = pending
        else:
            committed.extend(pending)


def _on_rollback(connection: sa.Connection) -> None:
    info = _info(connection)
    if info is not None:
        info.pop(_PENDING, None)


def _on_begin(connection: sa.Connection) -> None:
    info = _info(connection)
    if info is not None:
        _flush(info)


def _on_checkin(dbapi_connection: Any, record: Any) -> None:
    if record is not None:
        info = record.info
        info.pop(_PENDING, None)  # returned to the pool uncommitted: rolled back
        _flush(info)


def _flush(info: dict[Any, Any]) -> None:
    committed = info.pop(_COMMITTED, None)
    if not committed:
        return
    hub = info.get(_HUB)
    if hub is None or hub.pid != os.getpid():
        return
    by_channel: dict[str, set[tuple[str, str, int]]] = {}
    broad: set[str] = set()
    for events_table, bounded_context, aggregate_type, partition_hash in committed:
        if not bounded_context:  # note_broad_append
            broad.add(channel_for(events_table))
            continue
        by_channel.setdefault(channel_for(events_table), set()).add(
            (bounded_context, aggregate_type, partition_hash)
        )
    hints = {channel: Hint(appended=frozenset(s)) for channel, s in by_channel.items()}
    hints.update(dict.fromkeys(broad, EVERYTHING))
    hub.publish(hints)


# Listened on the classes, once, when this module is imported: they then apply to every
# engine and pool, made before or after. Adding listeners to an engine lazily, at its
# first append, would race with other threads dispatching its events (SQLAlchemy's
# listener collections are not safe to change while iterated). Each costs a dict
# lookup on connections that never appended.
sa.event.listen(sa.Engine, "commit", _on_commit)
sa.event.listen(sa.Engine, "rollback", _on_rollback)
sa.event.listen(sa.Engine, "begin", _on_begin)
sa.event.listen(sa.pool.Pool, "checkin", _on_checkin)


@atexit.register
def _drain_at_exit() -> None:
    """A process that exits right after its commit (a script, a job, a CLI command) still
    sends its hints: the notifier is a daemon thread, ended with the interpreter."""
    if _hubs_pid != os.getpid():
        return
    deadline = time.monotonic() + EXIT_DRAIN
    for hub in list(_hubs.values()):
        notifier = hub._notifier
        if notifier is not None:
            notifier.drain(max(0.0, deadline - time.monotonic()))


# -- hubs: one per database per process --------------------------------------------


_hubs: dict[tuple[Any, ...], _Hub] = {}
_hubs_lock = threading.Lock()
_hubs_pid = os.getpid()
_by_engine: weakref.WeakKeyDictionary[sa.Engine, _Hub] = weakref.WeakKeyDictionary()


def _database_key(engine: sa.Engine) -> tuple[Any, ...]:
    url = engine.url
    backend = url.get_backend_name()
    if backend == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or url.query.get("mode") == "memory":
            return (backend, "memory", id(engine.pool))
        return (backend, os.path.realpath(database))
    return (backend, url.host, url.port, url.database)


def _root(engine: sa.Engine) -> sa.Engine:
    """The engine that ``execution_options()`` copies were made from (they share its
    pool: one hub, holding the root, serves them all)."""
    while True:
        proxied = getattr(engine, "_proxied", None)
        if not isinstance(proxied, sa.Engine):
            return engine
        engine = proxied


def _hub_for(engine: sa.Engine) -> _Hub:
    # Processors publish after every batch that moved: the lookup by engine spares
    # them the key (a realpath on SQLite) and the lock.
    known = _by_engine.get(engine)
    if known is not None and known.pid == os.getpid():
        return known
    hub = _find_hub(engine)
    _by_engine[engine] = hub
    return hub


def _find_hub(engine: sa.Engine) -> _Hub:
    global _hubs_pid
    root = _root(engine)
    key = _database_key(root)
    with _hubs_lock:
        if _hubs_pid != os.getpid():  # a forked child: its parent's threads are not here
            _hubs.clear()
            _hubs_pid = os.getpid()
        hub = _hubs.get(key)
        if hub is None:
            hub = _hubs[key] = _Hub(key, root)
        hub.engine = root
    return hub


class _Hub:
    """Publishing and subscribing for one database in this process."""

    def __init__(self, key: tuple[Any, ...], engine: sa.Engine) -> None:
        self.key = key
        self.engine = engine
        self.pid = os.getpid()
        self.postgresql = engine.dialect.name == "postgresql"
        #: Says "this process sent it" in a notification's payload.
        self.token = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._subscriptions: dict[str, list[Subscription]] = {}
        self._notifier: _Notifier | None = None
        self._listener: _Listener | None = None
        self._listening: frozenset[str] = frozenset()
        self._linger_until = 0.0
        self._pool: sa.pool.Pool | None = None

    def connect(self) -> Any:
        """A connection for the notifier or the listener, from a pool of the hub's own made
        like the engine's (same creator and connect events), so that they never take,
        add to or disturb the connections of the application's pool."""
        with self._lock:
            if self._pool is None:
                self._pool = self._own_pool()
            pool = self._pool
        return pool.connect()

    def _own_pool(self) -> sa.pool.Pool:
        if not self.engine.dialect.is_async:
            return self.engine.pool.recreate()
        # An async engine's pool connects only inside its event loop, and the notifier
        # and listener are threads: they connect synchronously to the same URL, with
        # create_engine's timeouts (the async engine's connect_args are not visible).
        return database.create_engine(self.engine.url, poolclass=sa.pool.NullPool).pool

    # -- publishing

    def publish(self, hints: dict[str, Hint]) -> None:
        for channel, hint in hints.items():
            self.deliver(channel, hint)
        if self.postgresql:
            with self._lock:
                if self._notifier is None or not self._notifier.add(hints):
                    self._notifier = _Notifier(self)
                    self._notifier.add(hints)
                    self._notifier.start()

    def deliver(self, channel: str, hint: Hint) -> None:
        for subscription in self._subscriptions.get(channel, ()):
            try:
                if hint.everything or subscription.matches(hint):
                    subscription.wake()
            except Exception:  # a subscriber's bug must not fail the writer's commit
                logger.exception("a wake-up subscriber failed")

    # -- subscribing

    def subscribe(self, subscription: Subscription) -> None:
        with self._lock:
            current = self._subscriptions.get(subscription.channel, [])
            # Copy on write: deliver() iterates without the lock.
            self._subscriptions[subscription.channel] = [*current, subscription]
            if subscription.waiter:
                self._linger_until = time.monotonic() + WAITER_LINGER
            if self.postgresql and (self._listener is None or not self._listener.is_alive()):
                self._listener = _Listener(self)
                self._listener.start()

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            current = self._subscriptions.get(subscription.channel, [])
            left = [s for s in current if s is not subscription]
            if left:
                self._subscriptions[subscription.channel] = left
            else:
                self._subscriptions.pop(subscription.channel, None)
            if subscription.waiter:
                self._linger_until = time.monotonic() + WAITER_LINGER
            listener = self._listener
        if listener is not None:
            listener.poke()

    def channels(self) -> frozenset[str]:
        """The channels to listen on now (with a waiter's linger, the last ones)."""
        with self._lock:
            wanted = frozenset(self._subscriptions)
            if not wanted and time.monotonic() < self._linger_until:
                return self._listening
            return wanted

    def listening(self, channel: str) -> bool:
        return channel in self._listening

    def set_listening(self, channels: frozenset[str]) -> None:
        self._listening = channels

    def listener_stopped(self, listener: _Listener) -> None:
        """Nothing is listened to any more, unless another listener took over meanwhile."""
        with self._lock:
            if self._listener is listener or self._listener is None:
                self._listening = frozenset()

    def retire_listener(self, listener: _Listener, *, lingering: bool = True) -> bool:
        """The listener asks to stop (nothing to listen to): yes unless a subscriber came
        (or, with ``lingering``, a waiter left less than ``WAITER_LINGER`` ago)."""
        with self._lock:
            if self._subscriptions or (lingering and time.monotonic() < self._linger_until):
                return False
            if self._listener is listener:
                self._listener = None
            self._listening = frozenset()
            return True


class _Notifier(threading.Thread):
    """Sends this process's hints to other processes: coalesced, one NOTIFY per channel,
    on a connection of its own (autocommit, ``synchronous_commit`` off: one round trip
    per send), closed when no hint came for ``NOTIFIER_IDLE`` seconds."""

    def __init__(self, hub: _Hub) -> None:
        super().__init__(name="eventsource-notifier", daemon=True)
        self.hub = hub
        self._cond = threading.Condition()
        self._queued: dict[str, list[Hint]] = {}
        self._sending = False
        self._done = False
        self._raw: Any = None
        self._conn: Any = None

    def add(self, hints: dict[str, Hint]) -> bool:
        """Queue hints; False when the thread has ended (the caller starts another)."""
        with self._cond:
            if self._done:
                return False
            was_empty = not self._queued
            for channel, hint in hints.items():
                self._queued.setdefault(channel, []).append(hint)
            if was_empty:  # else it is already awake, or waiting out NOTIFY_MIN_INTERVAL
                self._cond.notify()
            return True

    def run(self) -> None:
        failures = 0
        last_sent = -math.inf
        try:
            while True:
                with self._cond:
                    if not self._queued:
                        self._cond.wait(timeout=NOTIFIER_IDLE)
                    if not self._queued:
                        self._done = True
                        self._cond.notify_all()
                        return
                    # At most one send per NOTIFY_MIN_INTERVAL: the first hint after a
                    # quiet spell leaves at once, a stream of them in coalesced sends.
                    while (left := last_sent + NOTIFY_MIN_INTERVAL - time.monotonic()) > 0:
                        self._cond.wait(left)
                    queued, self._queued = self._queued, {}
                    self._sending = True
                try:
                    try:
                        self._send(queued)
                    except Exception:  # a connection the server closed: once more, anew
                        self._close()
                        self._send(queued)
                    failures = 0
                    last_sent = time.monotonic()
                except Exception as exc:  # a hint lost costs latency only: polls remain
                    self._close()
                    failures += 1
                    if failures == 1:
                        logger.warning("could not send wake-up notifications: %s", _first_line(exc))
                    time.sleep(min(RECONNECT_BACKOFF[1], RECONNECT_BACKOFF[0] * 2**failures))
                finally:
                    with self._cond:
                        self._sending = False
                        self._cond.notify_all()
        finally:
            self._close()

    def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until what was queued has been sent."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._queued or self._sending) and not self._done and self.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def _send(self, queued: dict[str, list[Hint]]) -> None:
        if self._conn is None:
            raw = self.hub.connect()
            conn: Any = raw.driver_connection
            raw.detach()  # its own connection: never handed to anyone else
            self._raw, self._conn = raw, conn
            conn.autocommit = True
            conn.execute("SET synchronous_commit TO off")  # a hint needs no durability
        for channel, hints in queued.items():
            self._conn.execute("SELECT pg_notify(%s, %s)", (channel, encode(self.hub.token, hints)))

    def _close(self) -> None:
        raw, conn, self._raw, self._conn = self._raw, self._conn, None, None
        if raw is not None:
            _close_detached(raw, conn)


def encode(token: str, hints: Iterable[Hint]) -> str:
    """A notification payload: the sender's token and the union of ``hints``."""
    appended: set[tuple[str, str, int]] = set()
    checkpoints: set[str] = set()
    for hint in hints:
        if hint.everything:
            return json.dumps({"t": token, "*": 1})
        appended |= hint.appended
        checkpoints |= hint.checkpoints
    payload = json.dumps(
        {"t": token, "a": sorted(appended), "c": sorted(checkpoints)}, separators=(",", ":")
    )
    if len(payload.encode()) > MAX_PAYLOAD:
        return json.dumps({"t": token, "*": 1})
    return payload


def decode(payload: str) -> tuple[str | None, Hint]:
    """The sender's token and the hint of a payload (anything unreadable: everything)."""
    try:
        data = json.loads(payload)
        if data.get("*"):
            return data.get("t"), EVERYTHING
        return data.get("t"), Hint(
            appended=frozenset((str(b), str(a), int(h)) for b, a, h in data.get("a", ())),
            checkpoints=frozenset(str(c) for c in data.get("c", ())),
        )
    except (ValueError, TypeError, AttributeError):
        return None, EVERYTHING


class _Listener(threading.Thread):
    """This process's LISTEN connection to one database."""

    def __init__(self, hub: _Hub) -> None:
        super().__init__(name="eventsource-listener", daemon=True)
        self.hub = hub
        self._poked = threading.Event()
        self.connects = 0
        """How many times it connected (for tests)."""

    def poke(self) -> None:
        self._poked.set()

    def run(self) -> None:
        delay = RECONNECT_BACKOFF[0]
        while True:
            if not self.hub.channels() and self.hub.retire_listener(self):
                return
            self._listened = False
            try:
                self._serve()
                return  # nothing left to listen to
            except Exception as exc:
                self.hub.listener_stopped(self)
                if self.hub.retire_listener(self, lingering=False):
                    return  # only lingering: no one to reconnect for
                if self._listened or not self._failing:
                    delay = RECONNECT_BACKOFF[0]
                    logger.warning(
                        "wake-up listener lost its connection (%s): processors poll at "
                        "their poll_interval until it is back",
                        _first_line(exc),
                    )
                self._failing = True
            self._poked.wait(delay)
            self._poked.clear()
            delay = min(delay * 2, RECONNECT_BACKOFF[1])

    _listened = False
    _failing = False

    def _serve(self) -> None:
        raw = self.hub.connect()
        conn = raw.driver_connection
        raw.detach()  # its own connection: never handed to anyone else
        try:
            assert conn is not None
            conn.autocommit = True
            self.connects += 1
            listening: frozenset[str] = frozenset()
            last_checked = time.monotonic()
            while True:
                wanted = self.hub.channels()
                if not wanted and self.hub.retire_listener(self):
                    return
                if wanted != listening:
                    for channel in sorted(wanted - listening):
                        conn.execute(f"LISTEN {_identifier(channel)}")
                    for channel in sorted(listening - wanted):
                        conn.execute(f"UNLISTEN {_identifier(channel)}")
                    added = wanted - listening
                    listening = wanted
                    self.hub.set_listening(listening)
                    if not self._listened and self._failing:
                        logger.info(
                            "wake-up listener is back: listening on %s", ", ".join(sorted(wanted))
                        )
                    self._listened, self._failing = True, False
                    for channel in added:  # hints may have been missed until now
                        self.hub.deliver(channel, EVERYTHING)
                for notification in conn.notifies(timeout=LISTEN_TICK):
                    token, hint = decode(notification.payload)
                    if token != self.hub.token:
                        self.hub.deliver(notification.channel, hint)
                    last_checked = time.monotonic()
                if self._poked.is_set():
                    self._poked.clear()
                elif time.monotonic() - last_checked > LISTEN_HEALTH_CHECK:
                    conn.execute("SELECT 1")
                    last_checked = time.monotonic()
        finally:
            self.hub.listener_stopped(self)
            _close_detached(raw, conn)


def _close_detached(raw: Any, conn: Any) -> None:
    """Close a connection detached from its pool: the driver's connection ``conn`` (taken
    before ``detach()``, which forgets it) first, then the pool's wrapper, invalidated so
    that it does not try to roll back a dead connection (SQLAlchemy would log an error)."""
    with contextlib.suppress(Exception):  # closing a broken one may fail too
        conn.close()
    with contextlib.suppress(Exception):
        raw.invalidate()


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
