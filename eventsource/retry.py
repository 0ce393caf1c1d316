"""Transient failures: which errors are worth retrying, how long to back off, and a
helper that retries an application's own transaction.

A batch is all-or-nothing (DESIGN invariant 1), so retrying it after a transient
failure is always safe: the failed attempt left nothing behind, and the retry runs in
a new transaction on a fresh connection (SQLAlchemy invalidates a connection, and
every older one in its pool, when the driver reports a disconnect). What counts as
transient (DESIGN invariant 8): a lost connection, a server shutting down or
restarting, a deadlock, a serialization failure, a lock or statement timeout, SQLite's
"database is locked", and the store's own retryable conflicts
(:class:`~eventsource.errors.OptimisticConcurrencyError`) raised inside a handler that
appends. Everything else (a handler's own bug, bad input, a configuration error) is
permanent and retrying would only repeat it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from eventsource import errors, horizon

logger = logging.getLogger("eventsource.retry")

T = TypeVar("T")

#: SQLSTATEs worth a new attempt: a new transaction (and connection) may succeed.
TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available (lock_timeout)
        "57014",  # query_canceled (statement_timeout, a batch over its bound)
        "57P01",  # admin_shutdown (pg_terminate_backend, fast shutdown)
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, recovering)
        "53300",  # too_many_connections
        "53400",  # configuration_limit_exceeded
    }
)
#: SQLSTATE classes worth a new attempt: 08 is "connection exception".
TRANSIENT_SQLSTATE_CLASSES = frozenset({"08"})


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or the error it wraps) may succeed in a new transaction."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, errors.OptimisticConcurrencyError | errors.AppendOrderError):
            return True
        if isinstance(current, errors.EventSourceError) and not isinstance(
            current, errors.ProjectionError
        ):
            # The library's own verdicts (a give-up, a refusal) are final; only a
            # handler's failure is looked through, to the error it wraps.
            return False
        if isinstance(current, sa.exc.TimeoutError):  # the pool had no connection free
            return True
        if isinstance(current, sa.exc.DBAPIError):
            if current.connection_invalidated:
                return True
            if _transient_driver_error(current.orig):
                return True
        elif _transient_driver_error(current):
            return True
        # Explicit chains only (``raise ... from``): an error a handler raised while
        # handling a transient one is its own decision, not a transient failure.
        current = current.__cause__
    return False


def _transient_driver_error(orig: BaseException | None) -> bool:
    if orig is None:
        return False
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate in TRANSIENT_SQLSTATES or sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES
    module = type(orig).__module__
    name = type(orig).__name__
    if module.startswith("psycopg") and name == "OperationalError":
        # No SQLSTATE: the client could not talk to the server at all (refused,
        # reset, closed unexpectedly, timed out).
        return True
    if module == "sqlite3" and name == "OperationalError":
        text = str(orig)
        return "database is locked" in text or "database table is locked" in text
    return False


def append_order_error(exc: BaseException) -> errors.AppendOrderError | None:
    """The AppendOrderError ``exc`` is or wraps (through explicit causes), if any."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, errors.AppendOrderError):
            return current
        current = current.__cause__
    return None


def is_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is (or wraps) the store's OptimisticConcurrencyError: retryable,
    but also what a handler's deterministic mistake looks like (``no_stream()`` on a
    stream that exists), so the processor retries it only a few times."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, errors.OptimisticConcurrencyError | errors.AppendOrderError):
            return True
        current = current.__cause__
    return False


def is_lock_wait(exc: BaseException) -> bool:
    """SQLite's busy timeout ran out: another writer (a rebuild, say) holds the
    database. Waiting on is right, so such failures do not use up a retry budget."""
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    while isinstance(orig, errors.ProjectionError) and orig.__cause__ is not None:
        cause = orig.__cause__
        orig = cause.orig if isinstance(cause, sa.exc.DBAPIError) else cause
    return (
        orig is not None
        and type(orig).__module__ == "sqlite3"
        and type(orig).__name__ == "OperationalError"
        and "locked" in str(orig)
    )


def describe(exc: BaseException) -> str:
    """A short cause for logs and metric labels: the SQLSTATE condition, or the type."""
    current: BaseException | None = exc
    while current is not None:
        orig = current.orig if isinstance(current, sa.exc.DBAPIError) else current
        sqlstate = getattr(orig, "sqlstate", None)
        if isinstance(sqlstate, str) and orig is not None:
            return f"{type(orig).__name__} ({sqlstate})"
        if isinstance(current, errors.OptimisticConcurrencyError | errors.AppendOrderError):
            return type(current).__name__
        if current.__cause__ is None:
            return type(orig if orig is not None else current).__name__
        current = current.__cause__
    return type(exc).__name__


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How long and how often to retry transient failures.

    Waits grow from ``initial_backoff`` by ``multiplier`` up to ``max_backoff``, each
    shortened by up to ``jitter`` (a fraction) at random so that many workers do not
    retry in step. It gives up after ``max_attempts`` attempts in a row, or once the
    failures have lasted ``budget`` seconds (whichever comes first; None: no limit).
    The default keeps a worker alive through a server restart or a failover of a few
    minutes and retries at most a second after the server is back.
    """

    max_attempts: int | None = None
    budget: float | None = 300.0
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.5
    conflict_attempts: int = 10
    """Attempts in a row for a batch whose handler's append keeps failing with
    OptimisticConcurrencyError; then it is the handler's error (a ProjectionError)."""

    def __post_init__(self) -> None:
        if self.max_attempts is not None and (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise errors.ConfigurationError(
                f"max_attempts must be an int >= 1 or None, got {self.max_attempts!r}"
            )
        for name in ("initial_backoff", "max_backoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise errors.ConfigurationError(f"{name} must be seconds >= 0, got {value!r}")
        if self.budget is not None and (
            isinstance(self.budget, bool)
            or not isinstance(self.budget, int | float)
            or self.budget < 0
        ):
            raise errors.ConfigurationError(
                f"budget must be seconds >= 0 or None, got {self.budget!r}"
            )
        if not isinstance(self.multiplier, int | float) or self.multiplier < 1:
            raise errors.ConfigurationError(f"multiplier must be >= 1, got {self.multiplier!r}")
        if not isinstance(self.jitter, int | float) or not 0 <= self.jitter <= 1:
            raise errors.ConfigurationError(f"jitter must be in 0..1, got {self.jitter!r}")
        conflicts = self.conflict_attempts
        if isinstance(conflicts, bool) or not isinstance(conflicts, int) or conflicts < 1:
            raise errors.ConfigurationError(
                f"conflict_attempts must be an int >= 1, got {conflicts!r}"
            )

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (1-based)."""
        # The exponent is capped: a float power overflows after ~1,000 failures in a row.
        growth = self.multiplier ** min(failures - 1, 64)
        base = min(self.max_backoff, self.initial_backoff * growth)
        return base * (1 - self.jitter * random.random())

    def exhausted(self, failures: int, since: float, now: float) -> bool:
        """Whether to give up after ``failures`` in a row, the first at ``since``."""
        if self.max_attempts is not None and failures >= self.max_attempts:
            return True
        return self.budget is not None and now - since >= self.budget


#: Give up at the first failure (the behaviour before retries existed).
NO_RETRY = RetryPolicy(max_attempts=1, budget=None)


class Retrier:
    """Counts consecutive transient failures against a policy; one per worker loop."""

    def __init__(self, policy: RetryPolicy, what: str) -> None:
        self.policy = policy
        self.what = what
        self.failures = 0
        self.conflicts = 0
        self.since = 0.0

    def succeeded(self) -> None:
        self.failures = self.conflicts = 0

    def failed(self, exc: Exception) -> float:
        """Record a transient failure; the seconds to wait. Raises ``exc`` itself once
        an append conflict has repeated ``conflict_attempts`` times, and
        DatabaseUnavailableError once the policy is exhausted."""
        now = time.monotonic()
        if self.failures == 0 or is_lock_wait(exc):
            self.since = now  # waiting for another writer's lock is not an outage
        self.failures += 1
        self.conflicts = self.conflicts + 1 if is_conflict(exc) else 0
        if self.conflicts >= self.policy.conflict_attempts:
            raise exc
        if self.policy.exhausted(self.failures, self.since, now) and not is_lock_wait(exc):
            raise errors.DatabaseUnavailableError(
                f"{self.what}: gave up after {self.failures} attempt(s) over "
                f"{now - self.since:.1f} s of transient failures; last: {describe(exc)}: "
                f"{_one_line(exc)}",
                attempts=self.failures,
            ) from exc
        return self.policy.backoff(self.failures)


def _one_line(exc: BaseException) -> str:
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    return " ".join(str(orig).split())[:300]


def run_in_transaction(
    sessions: sessionmaker[Session] | scoped_session[Any] | sa.Engine,
    work: Callable[[Session], T],
    *,
    attempts: int = 5,
    policy: RetryPolicy | None = None,
) -> T:
    """Run ``work(session)`` in a new transaction and commit; on a version conflict or
    another transient failure roll back and run it again, from the start.

    The usual command-handler loop: ``work`` loads the aggregate, decides, and appends
    with ``ExpectedVersion.exact(version)``; when another writer got there first, the
    next attempt reloads and decides again. ``work`` must do all its reads inside the
    session it is given (and have no effects outside the database), since it may run
    several times. After ``attempts`` attempts the last error is raised as it is.

    A ``scoped_session`` (Flask-SQLAlchemy's ``db.session``) runs every attempt in its
    current Session, so code in ``work`` that uses the scoped session directly is in
    the same transaction; that Session must have no transaction in progress (this
    commits or rolls back all of it), else :class:`~eventsource.errors.ConfigurationError`.
    """
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise errors.ConfigurationError(f"attempts must be an int >= 1, got {attempts!r}")
    new_session: Callable[[], AbstractContextManager[Session]]
    if isinstance(sessions, scoped_session):
        scoped: Session = sessions()
        if scoped.in_transaction():
            raise errors.ConfigurationError(
                "run_in_transaction commits or rolls back the whole transaction of the "
                "scoped_session's current Session, which already has one in progress; "
                "commit or roll it back first (or pass an Engine or sessionmaker for a "
                "Session of its own)"
            )

        def same_session() -> AbstractContextManager[Session]:
            # Every attempt in that one Session: its begin() block commits or rolls back.
            return nullcontext(scoped)

        new_session = same_session
    elif isinstance(sessions, sa.Engine):
        new_session = sessionmaker(sessions, expire_on_commit=False)
    elif isinstance(sessions, sessionmaker):
        new_session = sessions
    else:
        raise errors.ConfigurationError(
            "run_in_transaction needs a sessionmaker, a scoped_session or an Engine, got "
            f"{type(sessions).__name__}"
        )
    policy = policy or RetryPolicy(initial_backoff=0.01, max_backoff=0.5, budget=None)
    # Stores whose append was refused because the transaction wrote before it appended
    # (AppendOrderError): the next attempts mark themselves as their writers first.
    marks: set[str] = set()
    for attempt in range(1, attempts + 1):
        try:
            with new_session() as session, session.begin():
                if marks and session.get_bind().dialect.name == "postgresql":
                    for events_table in sorted(marks):
                        session.execute(horizon.mark_statement(events_table))
                return work(session)
        except Exception as exc:
            order = append_order_error(exc)
            if order is not None:
                marks.add(order.events_table)
            if attempt == attempts or not is_transient(exc):
                raise
            delay = policy.backoff(attempt)
            logger.info(
                "transaction attempt %d of %d failed (%s); retrying in %.0f ms",
                attempt,
                attempts,
                describe(exc),
                delay * 1000,
                extra={"attempt": attempt, "cause": describe(exc)},
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
