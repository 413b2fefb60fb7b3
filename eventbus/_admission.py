"""Admission: how many deliveries are pending, the ``max_pending`` bound, and waiting for none.

Counting runs twice per delivery, so its hot half takes no shared lock. Emits admit under one
lock (so the bound is exact and nothing is admitted after :meth:`Admission.close`); each thread
counts the deliveries it settles in a tally of its own, and the tallies are summed only by a
thread that needs the total: a waiter (``drain``, ``close``, an emit on a full bus) or a
bounded emit. A settling thread wakes waiters only when there are some.

Why that is correct: under the GIL every bytecode sees the effects of the ones before it in
any thread. A settler raises its tally, then reads the waiter count; a waiter raises the waiter
count, then sums the tallies. Whichever runs second sees the other, so no wake-up is lost. A
free-threaded build (no GIL) gives no such ordering between threads, so there every settle
takes the lock (:data:`LOCK_FREE` is False).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from eventbus.exceptions import BusClosedError, QueueFullError

__all__ = ["LOCK_FREE", "Admission"]

#: Seconds between a quiet-waiter's own looks at the count (a safety net, see _wait).
RECHECK = 0.1

#: Whether settles count without a lock: only with the GIL (see the module docstring).
LOCK_FREE: bool = getattr(sys, "_is_gil_enabled", lambda: True)()


class _Tally:
    """Deliveries settled by one thread. Written only by that thread."""

    __slots__ = ("settled", "thread")

    def __init__(self, thread: threading.Thread) -> None:
        self.settled = 0
        self.thread = thread


class _Local(threading.local):
    tally: _Tally | None = None  # a class default: reading it costs no exception


class Admission:
    """Pending deliveries of one bus: admitted and not yet settled (queued, running, or waiting
    for a retry). Thread-safe.

    ``max_pending`` bounds the *active* ones (queued or running, not those waiting for their
    backoff); an emit that would pass it waits up to ``block_timeout`` seconds for room, then
    raises ``QueueFullError`` having admitted nothing. Emits from inside a handler never wait.
    """

    def __init__(self, max_pending: int | None, block_timeout: float | None) -> None:
        self.max_pending = max_pending
        self.block_timeout = block_timeout
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._waiters = 0
        self._room_waiters = 0  # those waiting for room (not for the bus to go quiet)
        #: Whether jobs are still queued on the executor, if it can tell (a worker pool): a
        #: settle then cannot have made the bus quiet, so it wakes only waiters for room.
        self.backlog: Callable[[], bool] | None = None
        self._admitted = 0  # under the lock
        self._waiting = 0  # deliveries in the retry queue, under the lock
        self._folded = 0  # settles of threads that ended, under the lock
        self._tallies: list[_Tally] = []
        self._local = _Local()
        self.closed = False

    # -- admitting (emit) ------------------------------------------------------------------

    def admit(
        self,
        count: int,
        *,
        wait: bool,
        block: bool = True,
        check: Callable[[], object] | None = None,
    ) -> None:
        """Count *count* more deliveries as pending. If the bus is bounded and *wait* is true,
        first make room: wait for it if *block* is true, else raise ``QueueFullError`` at once
        (a caller on an event loop must not block it). *check* runs under the lock after any
        wait, so a caller can look again at what the wait may have changed (an idempotency
        key); if it raises, nothing is admitted. Raises ``BusClosedError`` after
        :meth:`close` (also when it comes during the wait) and ``QueueFullError`` when
        ``block_timeout`` runs out.
        """
        with self._lock:
            if self.closed:
                raise BusClosedError("emit() after close(): this bus accepts no more events")
            limit = self.max_pending
            if wait and limit is not None and not self._has_room(count, limit):
                if not block:
                    raise QueueFullError(
                        f"{self._active()} deliveries pending (max_pending={limit}); not "
                        "waiting for room on an event loop's thread: `await bus.aemit(...)` "
                        "waits without blocking the loop"
                    )
                self._wait_for_room(count, limit)
            if check is not None:
                check()
            self._admitted += count

    def wait_room(self, count: int, timeout: float | None) -> bool:
        """Block until *count* more deliveries would fit, the bus closes, or *timeout* passes
        (False then); admits nothing. For ``aemit()``, which then admits on its loop."""
        with self._lock:
            limit = self.max_pending
            if limit is None:
                return True
            return self._wait(lambda: self.closed or self._has_room(count, limit), timeout,
                              room=True)  # fmt: skip

    def admit_unbounded(self, count: int) -> bool:
        """Count *count* deliveries that must not wait (recovered or replayed work); False if
        the bus is closed (nothing counted)."""
        with self._lock:
            if self.closed:
                return False
            self._admitted += count
            return True

    def wait_for_room(self, count: int) -> bool:
        """Block (no timeout) until *count* more deliveries fit or the bus closes; then count
        them unless it closed. Returns False if closed. For a transport's reader thread, whose
        blocking is the backpressure on the stream."""
        with self._lock:
            limit = self.max_pending
            if limit is not None:
                self._wait(lambda: self.closed or self._has_room(count, limit), None, room=True)
            if self.closed:
                return False
            self._admitted += count
            return True

    def release(self, count: int) -> None:
        """Give back *count* admitted deliveries that were never queued (a store refused the
        event, or held its key already)."""
        with self._lock:
            self._admitted -= count
            if self._waiters:
                self._changed.notify_all()

    def _wait_for_room(self, count: int, limit: int) -> None:
        if not self._wait(
            lambda: self.closed or self._has_room(count, limit), self.block_timeout, room=True
        ):
            raise QueueFullError(
                f"{self._active()} deliveries pending (max_pending={limit}); "
                f"waited {self.block_timeout} s for room"
            )
        if self.closed:
            raise BusClosedError("the bus closed while emit() waited for room")

    def _has_room(self, count: int, limit: int) -> bool:
        # An event with no handlers adds nothing, so it always fits (a handler's own emits
        # may have pushed the bus past its bound); one with more handlers than the limit
        # fits an empty bus.
        if count == 0:
            return True
        active = self._active()
        return active == 0 or active + count <= limit

    # -- settling (workers) ----------------------------------------------------------------

    def settled(self, count: int = 1) -> None:
        """*count* deliveries reached a final state (or left this process). Lock-free with the
        GIL; wakes waiters only when there are some."""
        if not LOCK_FREE:
            with self._lock:
                self._folded += count
                self._changed.notify_all()
            return
        tally = self._local.tally
        if tally is None:
            tally = self._new_tally()
        tally.settled += count
        if self._waiters:
            # A waiter for quiet (drain, close) cannot be satisfied while jobs are still
            # queued: waking it on every settle of a backlog would hand it the GIL once per
            # delivery only to sleep again. The settle that empties the bus runs with the queue
            # empty, so it always wakes them.
            backlog = self.backlog
            if self._room_waiters or backlog is None or not backlog():
                with self._lock:
                    self._changed.notify_all()

    def _new_tally(self) -> _Tally:
        current = threading.current_thread()
        tally = self._local.tally = _Tally(current)
        with self._lock:
            # Fold the tallies of threads that ended (a web server's per-request threads), so
            # the list, and every sum over it, stays as long as the live threads.
            ended = [t for t in self._tallies if not t.thread.is_alive()]
            for old in ended:
                self._folded += old.settled
                self._tallies.remove(old)
            self._tallies.append(tally)
        return tally

    def to_retry(self, count: int = 1) -> None:
        """*count* pending deliveries start waiting for their backoff (no longer active)."""
        with self._lock:
            self._waiting += count
            if self._waiters:
                self._changed.notify_all()

    def from_retry(self, count: int = 1) -> None:
        """*count* deliveries' backoff ended: active again (they may pass the bound)."""
        with self._lock:
            self._waiting -= count

    # -- totals and waiting ----------------------------------------------------------------

    def _pending(self) -> int:
        # Under the lock. A tally read mid-update is at worst one behind: waiters re-check
        # when its settle wakes them.
        return self._admitted - self._folded - sum(t.settled for t in self._tallies)

    def _active(self) -> int:
        return self._pending() - self._waiting

    @property
    def active(self) -> int:
        """Deliveries queued or running (a snapshot)."""
        with self._lock:
            return self._active()

    @property
    def waiting(self) -> int:
        """Deliveries waiting for their backoff (a snapshot)."""
        with self._lock:
            return self._waiting

    def wait_idle(self, timeout: float | None, stop: threading.Event | None = None) -> bool:
        """Block until nothing is pending (waiting retries included); False on timeout, or
        soon after *stop* is set (the ``adrain()`` that waits was cancelled)."""
        with self._lock:
            if stop is None:
                return self._wait(lambda: self._pending() == 0, timeout)
            self._wait(lambda: self._pending() == 0 or stop.is_set(), timeout)
            return self._pending() == 0

    def wait_inactive(self, timeout: float | None) -> bool:
        """Block until nothing is queued or running (retries may wait); False on timeout."""
        with self._lock:
            return self._wait(lambda: self._active() == 0, timeout)

    def close(self) -> bool:
        """Refuse further admissions and wake emits waiting for room; False if already closed."""
        with self._lock:
            if self.closed:
                return False
            self.closed = True
            self._changed.notify_all()
            return True

    def _wait(
        self, predicate: Callable[[], bool], timeout: float | None, *, room: bool = False
    ) -> bool:
        # Under the lock. Counted as a waiter so settlers know to notify.
        self._waiters += 1
        self._room_waiters += room
        try:
            if room:
                return self._changed.wait_for(predicate, timeout)
            # Waiters for quiet are woken only by the settle that may have made the bus quiet
            # (see settled()); they also look again every RECHECK seconds, so that a wake-up
            # that reasoning missed would cost a moment, never a hang.
            deadline = None if timeout is None else time.monotonic() + timeout
            while not predicate():
                left = RECHECK if deadline is None else min(RECHECK, deadline - time.monotonic())
                if left <= 0:
                    return predicate()
                self._changed.wait(left)
            return True
        finally:
            self._waiters -= 1
            self._room_waiters -= room


def remaining(deadline: float | None) -> float | None:
    """Seconds left until the monotonic *deadline* (``None``: no deadline)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())
