"""Value types: what applications append and what they read back.

These carry no database code, so they can be built, compared and pickled anywhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from eventsource import errors


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """A domain event to append. The store assigns its version and position.

    ``payload`` is any JSON value (usually a dict); ``created_at`` defaults to the
    time of the append. ``aggregate_id`` may be given as a UUID; it is stored as text.
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

    def __post_init__(self) -> None:
        if isinstance(self.aggregate_id, uuid.UUID):
            object.__setattr__(self, "aggregate_id", str(self.aggregate_id))


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistedEvent:
    """An event as stored: immutable, with its global position and aggregate version."""

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
