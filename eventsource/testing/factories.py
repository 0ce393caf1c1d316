"""factory-boy factories for events (needs the ``test`` extra: ``factory-boy``).

``EventFactory.build()`` makes an :class:`~eventsource.Event`; ``create()`` appends it
through the store in the bound session and returns the
:class:`~eventsource.PersistedEvent`; ``create_batch(n)`` appends a whole aggregate
history in one call, so versions and the aggregate's head are right. Subclass per
event type::

    class UserPayloadFactory(factory.DictFactory):
        name = factory.Faker("name")

    class UserCreatedFactory(EventFactory):
        aggregate_type = "User"
        event_type = "UserCreated"
        payload = factory.SubFactory(UserPayloadFactory)

The plugin's ``eventsource_session`` fixture binds its session for the test; outside
it use ``bound_session(session)`` or pass ``session=...`` to ``create``.
"""

from __future__ import annotations

import contextlib
import contextvars
import uuid
from collections.abc import Iterator
from typing import Any

import factory

from eventsource import errors
from eventsource.events import Event, ExpectedVersion, PersistedEvent
from eventsource.store import EventStore, SessionOrConnection

_session: contextvars.ContextVar[SessionOrConnection | None] = contextvars.ContextVar(
    "eventsource_factory_session", default=None
)
_store = EventStore()


@contextlib.contextmanager
def bound_session(session: SessionOrConnection) -> Iterator[None]:
    """Make ``create``/``create_batch`` append through ``session`` inside the block."""
    token = _session.set(session)
    try:
        yield
    finally:
        _session.reset(token)


def _take_session(kwargs: dict[str, Any]) -> SessionOrConnection:
    session = kwargs.pop("session", None) or _session.get()
    if session is None:
        raise errors.ConfigurationError(
            "EventFactory.create() needs a session: use the eventsource_session fixture, "
            "wrap the call in eventsource.testing.factories.bound_session(session), or "
            "pass session=..."
        )
    return session


class EventFactory(factory.Factory):
    """Valid events with unique ids; each ``create`` gets a fresh aggregate unless given one."""

    class Meta:
        model = Event

    bounded_context = "test"
    aggregate_type = "Aggregate"
    aggregate_id = factory.LazyFunction(lambda: str(uuid.uuid4()))
    event_type = factory.Sequence(lambda n: f"Event{n}")
    event_version = 1
    payload = factory.Dict({"sequence": factory.Sequence(int)})
    metadata = None
    event_id = factory.LazyFunction(uuid.uuid4)
    causation_id = None
    correlation_id = None
    trace_id = None
    created_at = None

    @classmethod
    def _create(cls, model_class: type[Event], *args: Any, **kwargs: Any) -> PersistedEvent:
        session = _take_session(kwargs)
        expected = kwargs.pop("expected_version", ExpectedVersion.any())
        event = model_class(*args, **kwargs)
        return _store.append(session, [event], expected).events[0]

    @classmethod
    def create_batch(cls, size: int, **kwargs: Any) -> list[PersistedEvent]:
        """Append ``size`` events of one aggregate (a whole history) in one append."""
        session = _take_session(kwargs)
        expected = kwargs.pop("expected_version", ExpectedVersion.any())
        kwargs.setdefault("aggregate_id", str(uuid.uuid4()))
        events: list[Event] = cls.build_batch(size, **kwargs)
        return list(_store.append(session, events, expected).events)


__all__ = ["EventFactory", "bound_session"]
