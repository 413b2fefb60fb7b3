"""Deliveries waiting for their backoff, each on a clock timer (the bus's own machinery).

The queue computes nothing and never sleeps: :mod:`eventbus._routing` decides the delay, and a
:class:`~eventbus.typing.Clock` fires it. ``take_due``/``take_all`` let a closing bus run what
is due and collect what is not, so nothing scheduled is ever dropped silently.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from eventbus.typing import Cancellable, Clock

__all__ = ["RetryQueue"]

T = TypeVar("T")


class RetryQueue(Generic[T]):
    """Items waiting for their backoff. Thread-safe.

    Each scheduled item sits on a clock timer; when it is due the queue hands it to ``on_due``
    (outside the queue's lock). :meth:`take_due` and :meth:`close` let a closing bus run what is
    due and collect what is not, so nothing scheduled is ever dropped silently.
    """

    def __init__(self, clock: Clock, on_due: Callable[[T], None]) -> None:
        self._clock = clock
        self._on_due = on_due
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[float, T, Cancellable]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def schedule(self, item: T, delay: float) -> None:
        """Hand *item* to ``on_due`` after *delay* seconds of the clock. Never blocks."""
        with self._lock:
            self._seq += 1
            key = self._seq
            due = self._clock.monotonic() + delay
            # Registered before the timer exists so that a timer firing at once finds it.
            self._waiting[key] = (due, item, _NOT_YET)
        handle = self._clock.call_later(delay, lambda: self._fire(key))
        with self._lock:
            entry = self._waiting.get(key)
            if entry is not None:
                self._waiting[key] = (entry[0], entry[1], handle)

    def _fire(self, key: int) -> None:
        with self._lock:
            entry = self._waiting.pop(key, None)
        if entry is not None:
            self._on_due(entry[1])

    def take_due(self, now: float) -> list[T]:
        """Remove and return the items due at *now*, cancelling their timers."""
        with self._lock:
            due = [k for k, (when, _, _) in self._waiting.items() if when <= now]
            entries = [self._waiting.pop(k) for k in due]
        for _, _, handle in entries:
            handle.cancel()
        return [item for _, item, _ in entries]

    def take_all(self) -> list[T]:
        """Remove and return every waiting item, cancelling their timers."""
        with self._lock:
            entries = list(self._waiting.values())
            self._waiting.clear()
        for _, _, handle in entries:
            handle.cancel()
        return [item for _, item, _ in entries]


class _NotYet:
    def cancel(self) -> None:
        pass


_NOT_YET = _NotYet()
