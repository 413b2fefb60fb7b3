"""One fan-out of every outcome: a structlog record (through :mod:`eventbus._outcomes`) and a
blinker signal (through :mod:`eventbus.signals`).

Both halves are guarded here, once: the recorder never raises, and receivers are isolated by
:func:`eventbus.signals.send`. While receivers run, the bus's in-handler flag is set on this
thread, because a receiver runs while the delivery it reports on still counts as pending: a
``close()`` or ``drain()`` from it would wait for itself, and an ``emit()`` from it must not
block on a full bus. Signal arguments are built only when a signal has receivers.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any

from eventbus import signals
from eventbus._event import DeadLetter, Delivery, Event
from eventbus._outcomes import OutcomeRecorder

__all__ = ["InDelivery", "Observer"]


class InDelivery(threading.local):
    """Per thread: whether it is running one of this bus's deliveries or a receiver of one.
    A class attribute for the default, so reading it on a new thread costs no exception.

    An async delivery cannot use a per-thread flag (other tasks run on the loop's thread
    between its awaits), so it marks its own task's context instead (:meth:`enter_task`);
    :meth:`inside` asks both.
    """

    active: bool = False

    def inside(self) -> bool:
        """Whether the caller is one of this bus's deliveries (thread or task) or receivers."""
        return self.active or _ASYNC_DELIVERY.get() is self

    def enter_task(self) -> None:
        """Mark the running task (its own context) as one of this bus's deliveries."""
        _ASYNC_DELIVERY.set(self)


#: The bus (its guard) whose async delivery the current task runs, if any.
_ASYNC_DELIVERY: contextvars.ContextVar[InDelivery | None] = contextvars.ContextVar(
    "eventbus_async_delivery", default=None
)


class Observer:
    """Reports outcomes of one bus (the *sender* of its signals). Thread-safe; never raises."""

    def __init__(self, outcomes: OutcomeRecorder, sender: object, guard: InDelivery) -> None:
        self.log = outcomes
        self._sender = sender
        self._guard = guard

    def _send(self, signal: Any, **kwargs: Any) -> None:
        guard = self._guard
        outer = guard.active
        guard.active = True
        try:
            signals.send(signal, self._sender, self.log.receiver_failed, **kwargs)
        finally:
            guard.active = outer

    def verbose(self) -> bool:
        """Whether debug-level outcomes (emitted, succeeded) are kept: asked once per event."""
        return self.log.debug_enabled()

    def emitted(self, event: Event, handlers: int, *, verbose: bool) -> None:
        if not handlers:
            self.log.unhandled(event)
        elif verbose:
            self.log.emitted(event, handlers)
        if signals.event_emitted.receivers:
            self._send(signals.event_emitted, event=event)

    def published(self, event: Event) -> None:
        if self.log.debug_enabled():
            self.log.published(event)
        if signals.event_emitted.receivers:
            self._send(signals.event_emitted, event=event)

    def succeeded(
        self, event: Event, handler: str, attempts: int, error: str | None, duration: float | None
    ) -> None:
        """*duration* is ``None`` when debug records are filtered out (nothing is logged)."""
        if duration is not None:
            self.log.succeeded(event, handler, attempts, duration)
        if signals.handler_succeeded.receivers:
            done = Delivery(handler, "succeeded", attempts, error)
            self._send(signals.handler_succeeded, event=event, delivery=done)

    def failed(
        self, event: Event, delivery: Delivery, error: BaseException, *, will_retry: bool
    ) -> None:
        self.log.failed(event, delivery.handler, delivery.attempts, error, will_retry)
        if signals.handler_failed.receivers:
            self._send(signals.handler_failed, event=event, delivery=delivery, error=error)

    def retry_scheduled(self, event: Event, delivery: Delivery, delay: float) -> None:
        self.log.retry_scheduled(event, delivery.handler, delivery.attempts, delay)
        if signals.retry_scheduled.receivers:
            self._send(signals.retry_scheduled, event=event, delivery=delivery, delay=delay)

    def stalled(
        self, event: Event, delivery: Delivery, elapsed: float, *, where: str, stack: str
    ) -> None:
        self.log.stalled(
            event, delivery.handler, delivery.attempts, elapsed, where=where, stack=stack
        )
        if signals.handler_stalled.receivers:
            self._send(
                signals.handler_stalled,
                event=event,
                delivery=delivery,
                elapsed=elapsed,
                stack=stack,
            )

    def late_result(
        self, event: Event, handler: str, attempts: int, error: BaseException | None
    ) -> None:
        self.log.late_result(event, handler, attempts, error)

    def dead_lettered(self, dead_letter: DeadLetter) -> None:
        self.log.dead_lettered(dead_letter)
        if signals.dead_lettered.receivers:
            self._send(signals.dead_lettered, event=dead_letter.event, dead_letter=dead_letter)

    def closed(self, abandoned: int, still_running: int, left_behind: int | None) -> None:
        self.log.closed(abandoned, still_running, left_behind)
        if signals.bus_closed.receivers:
            self._send(signals.bus_closed, abandoned=abandoned)
