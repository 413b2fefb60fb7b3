"""Waiting for what the code under test does in another thread or process, with a deadline:
a handler that records what it got and signals once enough arrived, and a bounded poll of
state that only a query can read (a queue's length, a stream, captured logs)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from eventbus import Event

__all__ = ["Tally", "poll_until"]


def poll_until(
    predicate: Callable[[], bool], what: str, timeout: float, *, every: float = 0.01
) -> None:
    """Poll *predicate* every *every* seconds until it holds; fail naming *what* if *timeout*
    seconds pass first."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting until {what}")
        pause.wait(every)


class Tally:
    """A thread-safe handler that records its events (and when each arrived, wall clock) and
    signals once *expected* have arrived. :meth:`wait` waits at most ``timeout`` seconds (a
    test module sets its own in a subclass)."""

    timeout = 10.0

    def __init__(self, expected: int = 1) -> None:
        self._lock = threading.Lock()
        self._expected = expected
        self.events: list[Event] = []
        self.times: list[float] = []
        self.done = threading.Event()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)
            self.times.append(time.time())
            if len(self.events) >= self._expected:
                self.done.set()

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return [e.id for e in self.events]

    @property
    def names(self) -> list[str]:
        with self._lock:
            return [e.name for e in self.events]

    def wait(self, what: str, timeout: float | None = None) -> None:
        limit = self.timeout if timeout is None else timeout
        assert self.done.wait(limit), f"timed out after {limit}s waiting until {what}"
