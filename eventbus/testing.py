"""Helpers for testing code that uses eventbus: no threads, no sleeping, no real time.

* :class:`InlineExecutor` runs handlers on the emitting thread before ``emit()`` returns.
* :class:`FakeClock` holds retry backoffs until the test calls :meth:`FakeClock.advance`.
* :func:`inline_bus` builds a bus with both.
* :class:`EventRecorder` records every event a bus accepts.

Example::

    from eventbus.testing import inline_bus

    bus, clock = inline_bus()
    bus.subscribe("order:created", flaky_handler)
    event = bus.emit("order:created", {"id": 1})     # the handler already ran (and failed)
    assert bus.status(event.id)[...].state == "retrying"
    clock.advance(60)                                 # the retry runs now, inline
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from eventbus import signals
from eventbus._bus import EventBus
from eventbus._clock import TimerHandle
from eventbus._dispatch import InlineExecutor
from eventbus._event import Event
from eventbus.retry import RetryPolicy

__all__ = ["EventRecorder", "FakeClock", "InlineExecutor", "inline_bus"]


class FakeClock:
    """A clock that moves only when told to. Thread-safe.

    Callbacks scheduled with :meth:`call_later` run inside :meth:`advance`, on the thread that
    calls it, in due-time order, with :meth:`monotonic` reading each one's due time.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._epoch = time.time() - start
        self._lock = threading.Lock()
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        """Wall-clock time that moves with the fake clock: the real time when the clock was
        made, plus every :meth:`advance` since."""
        return self._epoch + self._now

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(callback)
        with self._lock:
            heapq.heappush(self._heap, (self._now + delay, next(self._seq), handle))
        return handle

    def advance(self, seconds: float) -> None:
        """Move time forward by *seconds*, running every callback that comes due."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        with self._lock:
            target = self._now + seconds
        while True:
            with self._lock:
                if not self._heap or self._heap[0][0] > target:
                    self._now = target
                    return
                due, _, handle = heapq.heappop(self._heap)
                self._now = max(self._now, due)
            if not handle.cancelled:
                handle.callback()

    @property
    def pending(self) -> int:
        """How many callbacks are scheduled and not cancelled."""
        with self._lock:
            return sum(1 for _, _, h in self._heap if not h.cancelled)

    def close(self) -> None:
        with self._lock:
            self._heap.clear()


def inline_bus(**options: Any) -> tuple[EventBus, FakeClock]:
    """A bus that runs handlers inline and backs off on a fake clock; returns both.

    Retries default to ``RetryPolicy()`` (3 attempts, the default backoff); keyword
    *options* go to :class:`~eventbus.EventBus`.
    """
    clock = options.pop("clock", None) or FakeClock()
    options.setdefault("retry", RetryPolicy())
    return EventBus(executor=InlineExecutor(), clock=clock, **options), clock


class EventRecorder:
    """Records every event a bus accepts (through the ``event_emitted`` signal).

    Use as a context manager, or call :meth:`close` to stop recording.
    """

    def __init__(self, bus: EventBus) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._bus = bus
        signals.event_emitted.connect(self._record, sender=bus, weak=False)

    def _record(self, sender: object, *, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    @property
    def names(self) -> list[str]:
        """The names of the recorded events, in emit order."""
        with self._lock:
            return [e.name for e in self.events]

    def close(self) -> None:
        signals.event_emitted.disconnect(self._record, sender=self._bus)

    def __enter__(self) -> EventRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
