"""The Projection base class: what a read model subclasses.

A projection's ``handle`` runs inside the processor's batch transaction, with the
processor's session: read-model writes and the checkpoint commit together, so each
event's effect on the database happens exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.orm import Session

from eventsource import errors
from eventsource.events import PersistedEvent


class Projection:
    """Subclass it, set ``name`` and override ``handle``.

    ``aggregate_types`` and ``bounded_contexts`` scope the events the projection
    receives (empty: all of them); the filtering happens in SQL. Subclasses meant to
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

    def __init_subclass__(cls, *, abstract: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.aggregate_types = _names(cls, "aggregate_types")
        cls.bounded_contexts = _names(cls, "bounded_contexts")
        if abstract:
            return
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.strip():
            raise errors.ConfigurationError(
                f"{cls.__qualname__} needs a non-empty `name` class attribute: it keys the "
                "projection's checkpoints (pass abstract=True for a base class)"
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

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} name={self.name!r}>"


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
