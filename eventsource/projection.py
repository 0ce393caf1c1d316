"""The Projection base class: what a read model subclasses.

A projection's ``handle`` runs inside the processor's batch transaction, with the
processor's session: read-model writes and the checkpoint commit together, so each
event's effect on the database happens exactly once. ``on_error`` chooses what a
handler's own (permanent) error does: stop the projection, or quarantine the event
(see :mod:`eventsource.deadletters`).

A projection may declare a ``version`` to be rebuilt blue/green: each version keeps its
own checkpoints (:attr:`Projection.checkpoint_name`) and its own tables
(:meth:`Projection.table_name`), so a new version builds beside the one readers use
until :func:`eventsource.versions.switch` moves them over.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.orm import Session

from eventsource import errors
from eventsource.events import PersistedEvent


class OnError(enum.Enum):
    """What the processor does when a projection's handler raises a permanent error.

    Transient failures (a lost connection, a deadlock, an append losing a race: see
    :func:`eventsource.retry.is_transient`) are never quarantined: the whole batch is
    retried instead.
    """

    STOP = "stop"
    """Roll the batch back and raise ProjectionError: the projection stops on the event
    until the handler is fixed (the default, as in the Go original)."""
    QUARANTINE = "quarantine"
    """Store the event in the dead-letter table with its error and move on, in the
    batch's transaction. Later events of the same aggregate are still applied, so the
    read model may see them before the quarantined one is retried."""
    QUARANTINE_AGGREGATE = "quarantine_aggregate"
    """Quarantine the event and park every later event of its aggregate behind it
    (also stored, not applied) until it is retried or discarded: each aggregate's
    events still reach the read model in version order; other aggregates flow."""

    @property
    def quarantines(self) -> bool:
        """Whether a failing event is quarantined instead of stopping the projection."""
        return self is not OnError.STOP


class Projection:
    """Subclass it, set ``name`` and override ``handle``.

    ``aggregate_types`` and ``bounded_contexts`` scope the events the projection
    receives (empty: all of them); the filtering happens in SQL. ``on_error`` picks
    what a handler's error does (:class:`OnError`; default: stop). Subclasses meant to
    be subclassed again pass ``abstract=True``::

        class UserCounter(Projection):
            name = "user_counter"
            aggregate_types = ("User",)

            def handle(self, event: PersistedEvent, session: Session) -> None:
                ...
    """

    name: str
    aggregate_types: tuple[str, ...] = ()
    bounded_contexts: tuple[str, ...] = ()
    on_error: OnError = OnError.STOP
    version: int | None = None
    """The read model's version, for blue/green rebuilds (see :mod:`eventsource.versions`):
    each version has its own checkpoints and tables. None (the default): unversioned,
    checkpoints keyed by ``name`` alone, as before versions existed."""

    def __init_subclass__(cls, *, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.aggregate_types = _names(cls, "aggregate_types")
        cls.bounded_contexts = _names(cls, "bounded_contexts")
        check_on_error(cls.on_error, cls.__qualname__)
        check_version(cls.version, cls.__qualname__)
        if abstract:
            return
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.strip():
            raise errors.ConfigurationError(
                f"{cls.__qualname__} needs a non-empty `name` class attribute: it keys the "
                "projection's checkpoints (pass abstract=True for a base class)"
            )
        if VERSION_SEPARATOR in name:
            raise errors.ConfigurationError(
                f"{cls.__qualname__}.name {name!r} must not contain {VERSION_SEPARATOR!r}: "
                "it separates a projection's name from its version (set `version` instead)"
            )
        if cls.handle is Projection.handle and cls.handle_batch is Projection.handle_batch:
            raise errors.ConfigurationError(
                f"{cls.__qualname__} must override handle(self, event, session) "
                "(or handle_batch(self, events, session))"
            )

    def handle(self, event: PersistedEvent, session: Session) -> None:
        """Apply one event to the read model with ``session``; never commit it."""
        raise NotImplementedError

    def handle_batch(self, events: Sequence[PersistedEvent], session: Session) -> None:
        """Apply a batch's events at once; override for bulk writes.

        Each statement through a Session costs far more than the database's work for a
        small row, so one ``session.execute(statement, [params, ...])`` for the batch
        is much faster than one per event. The default calls :meth:`handle` per event.
        An error rolls back the whole batch, as with ``handle``.
        """
        for event in events:
            self.handle(event, session)

    def reset(self, session: Session) -> None:
        """Clear the read model before a rebuild (optional; the default does nothing)."""

    def retire(self, session: Session) -> None:
        """Drop this version's read model once readers have moved to another version.

        Optional (the default does nothing): :func:`eventsource.versions.switch` calls it
        on the projection given as ``retire=``, in the switch's transaction. Readers that
        resolved this version just before the switch may still be reading it, so a live
        application usually keeps the old tables until a later release drops them.
        """

    @property
    def checkpoint_name(self) -> str:
        """What keys this projection's checkpoints and dead letters, and its lock:
        ``name`` for an unversioned projection, ``"<name>@v<version>"`` for a versioned
        one, so two versions progress independently."""
        return versioned_name(self.name, self.version)

    def table_name(self, base: str) -> str:
        """The name of one of this version's read-model tables: ``base`` unversioned,
        ``"<base>_v<version>"`` otherwise (``table_name("user_stats")`` is
        ``"user_stats_v2"`` at version 2). Readers get the same name from
        :func:`eventsource.versions.table_name` and the active version."""
        return versioned_table(base, self.version)

    def __repr__(self) -> str:
        if self.version is not None:
            return f"<{type(self).__qualname__} name={self.name!r} version={self.version}>"
        return f"<{type(self).__qualname__} name={self.name!r}>"


#: Separates a projection's name from its version in :attr:`Projection.checkpoint_name`.
VERSION_SEPARATOR = "@v"


def versioned_name(name: str, version: int | None) -> str:
    """The checkpoint name of projection ``name`` at ``version`` (None: ``name``)."""
    return name if version is None else f"{name}{VERSION_SEPARATOR}{version}"


def versioned_table(base: str, version: int | None) -> str:
    """The read-model table ``base`` at ``version``: ``"<base>_v<version>"`` (None: ``base``)."""
    return base if version is None else f"{base}_v{version}"


def check_version(value: object, owner: str) -> int | None:
    """``value`` as a projection version (None or an int >= 1), or ConfigurationError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise errors.ConfigurationError(
            f"{owner}.version must be None (unversioned) or an int >= 1, got {value!r}"
        )
    return value


def check_on_error(value: object, owner: str) -> OnError:
    """``value`` as an :class:`OnError`, or ConfigurationError naming the choices."""
    if not isinstance(value, OnError):
        choices = ", ".join(f"OnError.{member.name}" for member in OnError)
        raise errors.ConfigurationError(
            f"{owner}.on_error must be one of {choices} (from eventsource import OnError), "
            f"got {value!r}"
        )
    return value


def _names(cls: type, attribute: str) -> tuple[str, ...]:
    value: object = getattr(cls, attribute, ())
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise errors.ConfigurationError(
            f"{cls.__qualname__}.{attribute} must be a tuple of names, "
            f"e.g. ({value!r},), got {value!r}"
        )
    names = tuple(value)
    for item in names:
        if not isinstance(item, str) or not item:
            raise errors.ConfigurationError(
                f"{cls.__qualname__}.{attribute} must hold non-empty strings, got {item!r}"
            )
    return names
