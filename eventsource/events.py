"""Value types: what applications append and what they read back.

These carry no database code, so they can be built, compared and pickled anywhere.

Ids on the way in and on the way back, the same on SQLite and PostgreSQL, in an
:class:`AppendResult` and in everything read (``read_stream``, ``read_all``, a
projection's ``handle``):

==================  ==========================  ==============================
field               accepted on :class:`Event`  on :class:`PersistedEvent`
==================  ==========================  ==============================
``event_id``        ``uuid.UUID``               ``uuid.UUID``
``aggregate_id``    ``str`` or ``uuid.UUID``    ``str`` (``str(uuid)``)
``causation_id``    ``str``, ``uuid.UUID``      ``str`` (``str(uuid)``) or None
``correlation_id``  ``str``, ``uuid.UUID``      ``str`` (``str(uuid)``) or None
``trace_id``        ``str``, ``uuid.UUID``      ``str`` (``str(uuid)``) or None
==================  ==========================  ==============================

A UUID given as a text id becomes its canonical text (lower case, with hyphens) when
the Event is built, so ``causation_id=previous.event_id`` reads back as
``str(previous.event_id)``.

Payloads and metadata are stored as JSON. Values JSON has no type for (Decimal,
datetime, UUID, Enum, pydantic models...) are refused unless the store is given a
``json_default`` hook; :func:`json_default` is a ready-made one. They read back as
what the hook made of them (strings, for :func:`json_default`): the application
converts them back.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

from eventsource import errors

#: The id fields of :class:`Event` given as text that also accept a ``uuid.UUID``.
_TEXT_IDS = ("aggregate_id", "causation_id", "correlation_id", "trace_id")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """A domain event to append. The store assigns its version and position.

    ``payload`` is any JSON value (usually a dict); values JSON has no type for need
    the store's ``json_default`` hook (see :func:`json_default`). ``created_at``
    defaults to the time of the append. ``aggregate_id``, ``causation_id``,
    ``correlation_id`` and ``trace_id`` may be given as a ``uuid.UUID``: it becomes
    ``str(uuid)`` here, which is what is stored and read back (``causation_id=
    previous.event_id`` reads back as ``str(previous.event_id)``).
    """

    bounded_context: str
    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: Any = field(default_factory=dict)
    event_version: int = 1
    metadata: Mapping[str, Any] | None = None
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)
    causation_id: str | None = None
    correlation_id: str | None = None
    trace_id: str | None = None
    created_at: datetime | None = None

    if TYPE_CHECKING:
        # What the constructor accepts: the text ids also take a UUID, converted by
        # __post_init__, so the attributes stay ``str`` (tests/test_app_types.py keeps
        # this in step with the fields).
        def __init__(
            self,
            *,
            bounded_context: str,
            aggregate_type: str,
            aggregate_id: str | uuid.UUID,
            event_type: str,
            payload: Any = ...,
            event_version: int = ...,
            metadata: Mapping[str, Any] | None = ...,
            event_id: uuid.UUID = ...,
            causation_id: str | uuid.UUID | None = ...,
            correlation_id: str | uuid.UUID | None = ...,
            trace_id: str | uuid.UUID | None = ...,
            created_at: datetime | None = ...,
        ) -> None: ...

    def __post_init__(self) -> None:
        for name in _TEXT_IDS:
            value = getattr(self, name)
            if isinstance(value, uuid.UUID):
                object.__setattr__(self, name, str(value))


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistedEvent:
    """An event as stored: immutable, with its global position and aggregate version.

    The same types on every database and from every source (an append's result, a
    read, a projection): ``event_id`` is a ``uuid.UUID``; ``aggregate_id``,
    ``causation_id``, ``correlation_id`` and ``trace_id`` are ``str`` (or None).
    ``payload`` and ``metadata`` are JSON values: what the store's ``json_default``
    made of a Decimal or a datetime (a string, with :func:`json_default`) comes back
    as that, in an :class:`AppendResult` too.
    """

    global_position: int
    bounded_context: str
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int
    event_id: uuid.UUID
    event_type: str
    event_version: int
    payload: Any
    metadata: Mapping[str, Any] | None
    causation_id: str | None
    correlation_id: str | None
    trace_id: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ExpectedVersion:
    """What the caller believes the aggregate's current version is.

    ``any()`` skips the check, ``no_stream()`` requires a new aggregate and
    ``exact(n)`` requires version ``n`` (``exact(0)`` is the same as ``no_stream()``).
    """

    kind: Literal["any", "no_stream", "exact"]
    version: int | None = None

    @classmethod
    def any(cls) -> ExpectedVersion:
        return _ANY

    @classmethod
    def no_stream(cls) -> ExpectedVersion:
        return _NO_STREAM

    @classmethod
    def exact(cls, version: int) -> ExpectedVersion:
        if isinstance(version, bool) or not isinstance(version, int):
            raise errors.ValidationError(
                f"ExpectedVersion.exact() needs an int, got {type(version).__name__}"
            )
        if version < 0:
            raise errors.ValidationError(
                f"ExpectedVersion.exact() needs a version >= 0, got {version}"
            )
        if version == 0:
            return _NO_STREAM
        return cls("exact", version)

    def __str__(self) -> str:
        return {"any": "any version", "no_stream": "no stream"}.get(
            self.kind, f"version {self.version}"
        )


_ANY = ExpectedVersion("any")
_NO_STREAM = ExpectedVersion("no_stream")


@dataclass(frozen=True, slots=True)
class Stream:
    """One aggregate's events, in version order."""

    bounded_context: str
    aggregate_type: str
    aggregate_id: str
    events: tuple[PersistedEvent, ...]

    @property
    def version(self) -> int:
        """Version of the last event read (0 when the stream is empty)."""
        return self.events[-1].aggregate_version if self.events else 0

    def __iter__(self) -> Iterator[PersistedEvent]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    def __bool__(self) -> bool:
        return bool(self.events)


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What one append stored: the events with their positions and versions."""

    events: tuple[PersistedEvent, ...]

    @property
    def global_positions(self) -> tuple[int, ...]:
        return tuple(e.global_position for e in self.events)

    @property
    def from_version(self) -> int:
        return self.events[0].aggregate_version

    @property
    def to_version(self) -> int:
        """The aggregate's version after the append: pass it to ``ExpectedVersion.exact``."""
        return self.events[-1].aggregate_version


def json_default(value: Any) -> Any:
    """A ``json_default`` hook for :class:`~eventsource.EventStore`: JSON for the values
    applications put in payloads and metadata, exactly, never through a float.

    - ``Decimal`` -> its exact text: ``Decimal("0.10")`` -> ``"0.10"``;
    - ``datetime``, ``date``, ``time`` -> ISO 8601 text (``isoformat()``);
    - ``uuid.UUID`` -> ``str(uuid)``;
    - ``Enum`` -> its ``value`` (itself encoded, so a Decimal value becomes text);
    - a pydantic model (anything with ``model_dump``) -> ``model_dump(mode="json")``;
    - a dataclass instance -> ``dataclasses.asdict`` (its fields encoded the same way).

    Anything else (bytes, sets...) raises ``TypeError``, which the store reports as a
    :class:`~eventsource.errors.ValidationError`. What is read back is the JSON: the
    application turns ``"0.10"`` back into ``Decimal("0.10")``. Wrap it to add types::

        def my_default(value):
            if isinstance(value, Money):
                return {"amount": str(value.amount), "currency": value.currency}
            return eventsource.json_default(value)
    """
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    dump = None if isinstance(value, type) else getattr(value, "model_dump", None)
    if callable(dump):  # pydantic v2 (not a dependency: duck-typed)
        return dump(mode="json")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
