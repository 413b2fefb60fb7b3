"""Admission: the max_pending bound, lock-free settle tallies, and waiting for nothing pending."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from eventbus import _admission
from eventbus._admission import Admission, remaining
from eventbus.exceptions import BusClosedError, QueueFullError

THREADS = 8
SETTLES_PER_THREAD = 10_000


class _AnnouncingCondition(threading.Condition):
    """A condition that sets *entered* when a thread starts waiting on it.

    The flag is set while the waiter still holds the lock, so whatever the test does next
    under that lock (a settle, a close) happens once the waiter really waits.
    """

    def __init__(self, lock: Any, entered: threading.Event) -> None:
        super().__init__(lock)
        self.entered = entered

    def wait(self, timeout: float | None = None) -> bool:
        self.entered.set()
        return super().wait(timeout)


def _announce_waits(admission: Admission) -> threading.Event:
    """An event set as soon as a thread waits on *admission*."""
    entered = threading.Event()
    admission._changed = _AnnouncingCondition(admission._lock, entered)
    return entered


def _waiting_on(admission: Admission, call: Callable[[], object]) -> _Background:
    """Run *call* on its own thread and return once it waits on *admission*."""
    entered = _announce_waits(admission)
    background = _Background(call)
    assert entered.wait(10)
    return background


class _Background:
    """Runs *call* on its own thread, keeping what it returned or raised."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,))
        self._thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            self.result = call()
        except BaseException as exc:  # noqa: BLE001 - kept for the test to inspect
            self.error = exc

    def join(self) -> None:
        self._thread.join(30)
        assert not self._thread.is_alive()


def _settle_on_threads(admission: Admission, threads: int, each: int) -> None:
    def work() -> None:
        for _ in range(each):
            admission.settled()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


# -- the bound -----------------------------------------------------------------------------


def test_bound_admits_exactly_up_to_max_pending() -> None:
    """Emits fill the bus up to max_pending exactly; one more delivery is refused."""
    admission = Admission(max_pending=3, block_timeout=0)
    admission.admit(2, wait=True)
    admission.admit(1, wait=True)
    with pytest.raises(QueueFullError):
        admission.admit(1, wait=True)
    assert admission.active == 3


def test_emit_that_would_pass_the_bound_admits_none_of_its_deliveries() -> None:
    """An event whose deliveries do not all fit is refused whole, not admitted in part."""
    admission = Admission(max_pending=3, block_timeout=0)
    admission.admit(2, wait=True)
    with pytest.raises(QueueFullError, match="max_pending=3"):
        admission.admit(2, wait=True)
    assert admission.active == 2


def test_full_bus_waits_for_block_timeout_before_refusing() -> None:
    """With a small block_timeout the emit waits that long, then raises QueueFullError."""
    admission = Admission(max_pending=1, block_timeout=0.05)
    admission.admit(1, wait=True)
    started = time.monotonic()
    with pytest.raises(QueueFullError):
        admission.admit(1, wait=True)
    assert time.monotonic() - started >= 0.05
    assert admission.active == 1


def test_waiting_emit_is_admitted_once_a_delivery_settles() -> None:
    """An emit waiting for room goes through when a settle makes room."""
    admission = Admission(max_pending=1, block_timeout=30)
    admission.admit(1, wait=True)
    emit = _waiting_on(admission, lambda: admission.admit(1, wait=True))
    admission.settled()
    emit.join()
    assert emit.error is None
    assert admission.active == 1


def test_waiting_emit_is_admitted_once_deliveries_are_released() -> None:
    """release() makes room for an emit waiting on a full bus."""
    admission = Admission(max_pending=2, block_timeout=30)
    admission.admit(2, wait=True)
    emit = _waiting_on(admission, lambda: admission.admit(1, wait=True))
    admission.release(2)
    emit.join()
    assert emit.error is None
    assert admission.active == 1


def test_emit_that_must_not_wait_may_pass_the_bound() -> None:
    """wait=False (an emit from a handler) is admitted on a full bus."""
    admission = Admission(max_pending=1, block_timeout=0)
    admission.admit(1, wait=True)
    admission.admit(2, wait=False)
    assert admission.active == 3


def test_event_with_more_handlers_than_the_bound_fits_an_empty_bus() -> None:
    """An event with more deliveries than max_pending is admitted when nothing is active."""
    admission = Admission(max_pending=2, block_timeout=0)
    admission.admit(5, wait=True)
    assert admission.active == 5


def test_event_without_deliveries_is_never_refused() -> None:
    """An emit that adds no delivery cannot pass the bound, so it is admitted at once."""
    admission = Admission(max_pending=1, block_timeout=0)
    admission.admit(2, wait=False)  # a handler's emits went past the bound
    admission.admit(0, wait=True)
    assert admission.active == 2


# -- check -------------------------------------------------------------------------------


def test_check_that_raises_admits_nothing() -> None:
    """When check raises, its error reaches the caller and nothing is counted."""
    admission = Admission(max_pending=None, block_timeout=None)

    def taken() -> None:
        raise LookupError("key already used")

    with pytest.raises(LookupError):
        admission.admit(3, wait=True, check=taken)
    assert admission.active == 0
    assert admission.wait_idle(0)


def test_check_runs_after_the_wait_for_room() -> None:
    """check is called only once the waiting emit has room."""
    admission = Admission(max_pending=1, block_timeout=30)
    admission.admit(1, wait=True)
    checks: list[int] = []
    emit = _waiting_on(
        admission, lambda: admission.admit(1, wait=True, check=lambda: checks.append(1))
    )
    assert checks == []
    admission.settled()
    emit.join()
    assert checks == [1]


def test_check_is_not_run_when_the_wait_times_out() -> None:
    """A refused emit never runs its check."""
    admission = Admission(max_pending=1, block_timeout=0)
    admission.admit(1, wait=True)
    checks: list[int] = []
    with pytest.raises(QueueFullError):
        admission.admit(1, wait=True, check=lambda: checks.append(1))
    assert checks == []


# -- closing -------------------------------------------------------------------------------


def test_admit_after_close_raises_bus_closed() -> None:
    """A closed admission refuses every emit and counts nothing."""
    admission = Admission(max_pending=None, block_timeout=None)
    admission.close()
    with pytest.raises(BusClosedError):
        admission.admit(1, wait=True)
    assert admission.active == 0


def test_close_wakes_a_waiting_emit_with_bus_closed() -> None:
    """An emit waiting for room raises BusClosedError as soon as the bus closes."""
    admission = Admission(max_pending=1, block_timeout=30)
    admission.admit(1, wait=True)
    emit = _waiting_on(admission, lambda: admission.admit(1, wait=True))
    admission.close()
    emit.join()
    assert isinstance(emit.error, BusClosedError)
    assert admission.active == 1


def test_close_reports_whether_it_closed() -> None:
    """close() is True the first time and False after."""
    admission = Admission(max_pending=None, block_timeout=None)
    assert admission.close()
    assert admission.closed
    assert not admission.close()


def test_admit_unbounded_ignores_the_bound_and_refuses_after_close() -> None:
    """Recovered work is counted past the bound, and not at all once closed."""
    admission = Admission(max_pending=1, block_timeout=0)
    admission.admit(1, wait=True)
    assert admission.admit_unbounded(2)
    assert admission.active == 3
    admission.close()
    assert not admission.admit_unbounded(1)
    assert admission.active == 3


def test_wait_for_room_blocks_until_a_settle_then_counts() -> None:
    """A reader waiting for room is admitted when a delivery settles."""
    admission = Admission(max_pending=1, block_timeout=0)
    admission.admit(1, wait=True)
    reader = _waiting_on(admission, lambda: admission.wait_for_room(1))
    admission.settled()
    reader.join()
    assert reader.result is True
    assert admission.active == 1


def test_wait_for_room_gives_up_when_closed() -> None:
    """A reader waiting for room returns False on close, having counted nothing."""
    admission = Admission(max_pending=1, block_timeout=0)
    admission.admit(1, wait=True)
    reader = _waiting_on(admission, lambda: admission.wait_for_room(1))
    admission.close()
    reader.join()
    assert reader.result is False
    assert admission.active == 1


# -- settling ------------------------------------------------------------------------------


def test_settles_from_many_threads_are_counted_exactly() -> None:
    """8 threads x 10,000 lock-free settles leave exactly nothing pending."""
    admission = Admission(max_pending=None, block_timeout=None)
    admission.admit(THREADS * SETTLES_PER_THREAD + 1, wait=False)
    _settle_on_threads(admission, THREADS, SETTLES_PER_THREAD)
    assert not admission.wait_idle(0)
    admission.settled()
    assert admission.wait_idle(0)


def test_waiter_is_woken_by_concurrent_settles() -> None:
    """A thread in wait_idle wakes once settles on other threads bring pending to zero."""
    admission = Admission(max_pending=None, block_timeout=None)
    admission.admit(THREADS * 1_000, wait=False)
    waiter = _waiting_on(admission, lambda: admission.wait_idle(30))
    _settle_on_threads(admission, THREADS, 1_000)
    waiter.join()
    assert waiter.result is True


def test_settle_counts_several_deliveries_at_once() -> None:
    """settled(n) settles n deliveries."""
    admission = Admission(max_pending=None, block_timeout=None)
    admission.admit(3, wait=False)
    admission.settled(3)
    assert admission.wait_idle(0)


def test_tallies_of_ended_threads_are_folded() -> None:
    """Many short-lived settling threads do not grow the tally list, and no settle is lost."""
    admission = Admission(max_pending=None, block_timeout=None)
    admission.admit(100, wait=False)
    for _ in range(50):
        _settle_on_threads(admission, threads=1, each=2)
        assert len(admission._tallies) == 1
    assert admission.wait_idle(0)


def test_without_lock_free_settles_still_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """With LOCK_FREE off, settles from many threads are counted under the lock."""
    monkeypatch.setattr(_admission, "LOCK_FREE", False)
    admission = Admission(max_pending=None, block_timeout=None)
    admission.admit(THREADS * 1_000, wait=False)
    _settle_on_threads(admission, THREADS, 1_000)
    assert admission.wait_idle(0)
    assert admission._tallies == []


def test_without_lock_free_a_settle_wakes_waiters(monkeypatch: pytest.MonkeyPatch) -> None:
    """With LOCK_FREE off, a settle wakes a thread in wait_idle."""
    monkeypatch.setattr(_admission, "LOCK_FREE", False)
    admission = Admission(max_pending=None, block_timeout=None)
    admission.admit(1, wait=False)
    waiter = _waiting_on(admission, lambda: admission.wait_idle(30))
    admission.settled()
    waiter.join()
    assert waiter.result is True


# -- retries and waiting -------------------------------------------------------------------


def test_to_retry_and_from_retry_move_a_delivery_between_active_and_waiting() -> None:
    """A delivery waiting for its backoff is pending but not active, and active again after."""
    admission = Admission(max_pending=None, block_timeout=None)
    admission.admit(2, wait=False)
    admission.to_retry()
    assert (admission.active, admission.waiting) == (1, 1)
    admission.from_retry()
    assert (admission.active, admission.waiting) == (2, 0)


def test_deliveries_waiting_for_a_retry_leave_room_under_the_bound() -> None:
    """A retry waiting for its backoff does not count against max_pending."""
    admission = Admission(max_pending=1, block_timeout=0)
    admission.admit(1, wait=True)
    admission.to_retry()
    admission.admit(1, wait=True)
    assert (admission.active, admission.waiting) == (1, 1)


def test_wait_inactive_ignores_waiting_retries_and_wait_idle_does_not() -> None:
    """With only a retry waiting, the bus is inactive but not idle."""
    admission = Admission(max_pending=None, block_timeout=None)
    admission.admit(1, wait=False)
    admission.to_retry()
    assert admission.wait_inactive(0)
    assert not admission.wait_idle(0)


def test_to_retry_wakes_a_thread_waiting_for_inactive() -> None:
    """A delivery starting its backoff wakes wait_inactive."""
    admission = Admission(max_pending=None, block_timeout=None)
    admission.admit(1, wait=False)
    waiter = _waiting_on(admission, lambda: admission.wait_inactive(30))
    admission.to_retry()
    waiter.join()
    assert waiter.result is True


def test_wait_idle_times_out_with_false() -> None:
    """wait_idle returns False when deliveries are still pending at its timeout."""
    admission = Admission(max_pending=None, block_timeout=None)
    admission.admit(1, wait=False)
    assert not admission.wait_idle(0.01)


def test_remaining_is_none_without_a_deadline_and_never_negative() -> None:
    """remaining() passes None through and floors a past deadline at zero."""
    assert remaining(None) is None
    assert remaining(time.monotonic() - 5) == 0.0
    left = remaining(time.monotonic() + 60)
    assert left is not None
    assert 0 < left <= 60


def test_a_waiter_for_quiet_is_not_stranded_by_a_backlog_that_never_empties() -> None:
    """Settles skip waking quiet-waiters while the executor reports a backlog; the waiter's
    own periodic look still sees the bus go quiet."""
    admission = Admission(None, None)
    admission.backlog = lambda: True  # a wrong answer: the safety net must still hold
    admission.admit(1, wait=False)
    waiter = _waiting_on(admission, lambda: admission.wait_idle(5))
    admission.settled()  # wakes nobody: the (wrong) backlog says the bus cannot be quiet
    waiter.join()
    assert waiter.result is True
