"""The real clock: ``time.monotonic`` and one timer thread per clock for retry backoff."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable

__all__ = ["SystemClock", "TimerHandle"]


class TimerHandle:
    """A callback scheduled on a clock; :meth:`cancel` calls it off."""

    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class SystemClock:
    """Wall-clock timers on one daemon thread, started on first use. Thread-safe.

    Callbacks run on the timer thread, one at a time, so they must be quick (the retry queue's
    callback only puts a job on the worker queue). A callback that raises is reported to
    ``on_error`` and does not stop the timer.
    """

    def __init__(self, name: str = "eventbus-timer") -> None:
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.on_error: Callable[[BaseException], None] = lambda exc: None

    #: The builtin itself, not a method wrapping it: it is read twice per delivery.
    monotonic = staticmethod(time.monotonic)
    #: Wall-clock time, for due times another process reads.
    time = staticmethod(time.time)

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        handle = TimerHandle(callback)
        with self._cond:
            if self._closed:
                return handle  # never fires: see close()
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return handle

    def close(self) -> None:
        """Stop the timer thread, waiting for a callback in progress to return. Callbacks not
        yet run, and any scheduled afterwards, never fire: their owner collects them (the
        retry queue's ``take_due``/``take_all``)."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._heap:
                        wait = self._heap[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                if self._closed:
                    return
                _, _, handle = heapq.heappop(self._heap)
            if not handle.cancelled:
                try:
                    handle.callback()
                except BaseException as exc:  # noqa: BLE001 - the timer must survive any callback
                    with contextlib.suppress(BaseException):  # nowhere left to report to
                        self.on_error(exc)
