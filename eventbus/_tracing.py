"""What a tracer (:mod:`eventbus.otel`) gives the bus: a span around each emit and each
attempt. The core knows only these Protocols; the bus holds one only when instrumented, so an
uninstrumented bus pays nothing for them."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from eventbus._event import Event

__all__ = ["AttemptSpan", "ProduceSpan", "Tracing"]


class ProduceSpan(Protocol):
    """One emit's span, current while the event is made and sent."""

    def inject(self, metadata: Mapping[str, str] | None) -> Mapping[str, str]:
        """*metadata* with the span's context added, to travel with the event."""

    def sent(self, event: Event) -> None:
        """The event was emitted (its id is known now)."""


class AttemptSpan(Protocol):
    """One attempt's span, current while the handler runs."""

    def ended(self, state: str) -> None:
        """The attempt is over; its delivery is now *state* (``"succeeded"``, ``"retrying"``,
        ``"dead"``, ...)."""


class Tracing(Protocol):
    """Spans around emits and attempts. Thread-safe; never raises into the bus."""

    def produce(self, event: object) -> AbstractContextManager[ProduceSpan]:
        """Around one ``emit()`` of *event* (a name or an event instance)."""

    def attempt(
        self, event: Event, handler: str, attempt: int, waited: float | None
    ) -> AbstractContextManager[AttemptSpan]:
        """Around attempt number *attempt* of *handler*; *waited* is the time since the
        emit for a first attempt, else ``None``."""
