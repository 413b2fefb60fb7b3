"""Protocols and aliases shared by eventbus's parts (a leaf module: it imports nothing of ours)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias, TypeVar

if TYPE_CHECKING:
    from eventbus._event import Event

__all__ = ["Cancellable", "Clock", "DeliveryState", "Executor", "Handler", "HandlerT", "Job"]

#: A handler takes the :class:`~eventbus.Event` and returns nothing useful.
Handler: TypeAlias = "Callable[[Event], object]"
#: The type a decorator hands back unchanged.
HandlerT = TypeVar("HandlerT", bound="Callable[[Event], object]")

#: Where a delivery (one event to one handler) stands.
DeliveryState: TypeAlias = Literal["pending", "running", "retrying", "succeeded", "dead"]

#: One unit of work handed to an executor.
Job: TypeAlias = Callable[[], None]


class Executor(Protocol):
    """Runs jobs. ``submit`` must never run a job that raises into the caller's frame."""

    def submit(self, job: Job) -> None:
        """Queue *job* (or run it now, for an inline executor). Thread-safe; never blocks long."""

    def shutdown(self, timeout: float | None) -> list[Job]:
        """Stop taking jobs; return those never started; wait up to *timeout* for running ones."""


class Cancellable(Protocol):
    """A scheduled callback that may still be called off."""

    def cancel(self) -> None:
        """Call off the callback; a no-op if it already ran."""


class Clock(Protocol):
    """The time source and timer behind retry backoff (swap in a fake one in tests)."""

    def monotonic(self) -> float:
        """Seconds on a monotonic scale."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        """Call *callback* once, *delay* seconds from now, on a thread of the clock's choosing."""

    def close(self) -> None:
        """Stop the clock's timer: once this returns, no callback runs or ever will (callbacks
        scheduled afterwards are accepted and never called; their owner collects them)."""
