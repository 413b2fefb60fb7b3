"""The event envelope and the records that say where each delivery of it stands."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

__all__ = [
    "DeadLetter",
    "DeadLetterReason",
    "Delivery",
    "DeliveryState",
    "Event",
    "make_event",
    "new_id",
]

#: Where a delivery (one event to one handler) stands.
DeliveryState: TypeAlias = Literal[
    "pending", "scheduled", "running", "retrying", "succeeded", "dead"
]

_EMPTY_METADATA: Mapping[str, str] = MappingProxyType({})


class _IdSource:
    """Unique ids without a syscall per event: a random per-process prefix and a counter.

    ``uuid4()`` reads the OS's random source on every call, which would be the single most
    expensive step of ``emit()``. The prefix is drawn again in a forked child so two processes
    never share it.
    """

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._prefix = os.urandom(10).hex()
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


new_id = _IdSource()
os.register_at_fork(after_in_child=new_id.reseed)


def _now() -> datetime:
    return datetime.now(UTC)


def _no_metadata() -> Mapping[str, str]:
    return _EMPTY_METADATA


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Event:
    """One occurrence of something that happened, as handlers receive it. Immutable.

    ``id`` is unique (also across processes), ``occurred_at`` is timezone-aware UTC, and
    ``metadata`` is a read-only mapping of strings (correlation ids and the like). ``payload``
    is shared by every handler of the event: treat it as read-only. Build one by hand to call
    a handler directly in a test: ``handler(Event(name="order:created", payload={...}))``.
    """

    name: str
    payload: Any = None
    metadata: Mapping[str, str] = field(default_factory=_no_metadata)
    id: str = field(default_factory=new_id)
    occurred_at: datetime = field(default_factory=_now)

    def __repr__(self) -> str:
        # Names the payload's type only: reprs reach tracebacks, debuggers and log lines,
        # and payloads and metadata may hold secrets.
        return (
            f"Event(name={self.name!r}, id={self.id!r}, "
            f"occurred_at={self.occurred_at.isoformat()!r}, "
            f"payload=<{type(self.payload).__name__}>)"
        )


_set = object.__setattr__
_new = object.__new__


def make_event(name: str, payload: Any, metadata: Mapping[str, str]) -> Event:
    """A new :class:`Event` with a fresh id and the current time, for ``emit()``: the same
    object the constructor makes, without its keyword parsing and default factories (about
    half the cost of an emit on the hot path). *name* and *metadata* are already checked."""
    event: Event = _new(Event)
    _set(event, "name", name)
    _set(event, "payload", payload)
    _set(event, "metadata", metadata)
    _set(event, "id", new_id())
    _set(event, "occurred_at", datetime.now(UTC))
    return event


def freeze_metadata(metadata: Mapping[str, str] | None) -> Mapping[str, str]:
    """Copy *metadata* into a read-only mapping; raise ``TypeError`` for non-string items."""
    if not metadata:
        return _EMPTY_METADATA
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping of str to str, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {type(value).__name__}")
    return MappingProxyType(dict(metadata))


@dataclass(frozen=True, slots=True)
class Delivery:
    """A snapshot of one event's delivery to one handler, as :meth:`EventBus.status` returns it.

    ``state`` is one of ``"pending"`` (queued), ``"running"``, ``"retrying"`` (waiting for its
    backoff), ``"succeeded"`` or ``"dead"`` (in the dead letters). ``attempts`` counts the
    attempts started so far; ``error`` is the last failure as ``"Type: message"``.
    """

    handler: str
    state: DeliveryState
    attempts: int
    error: str | None = None


#: Why a delivery became a dead letter.
DeadLetterReason = Literal["exhausted", "not_retryable", "abandoned"]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery that will not be tried again unless someone replays it.

    ``reason`` is ``"exhausted"`` (every attempt of its retry policy failed), ``"not_retryable"``
    (the error did not match the policy's ``retry_on``) or ``"abandoned"`` (a retry was still
    waiting for its backoff when the bus closed, or it never started before a close timed out).
    """

    id: str
    event: Event
    handler: str
    attempts: int
    error: str
    reason: DeadLetterReason
    traceback: str | None = field(default=None, repr=False)  # long, and may quote source
    failed_at: datetime = field(default_factory=_now)

    @property
    def abandoned(self) -> bool:
        """True if this delivery was cut short by the bus closing rather than by its own errors."""
        return self.reason == "abandoned"
