"""The system clock: real timers on one daemon thread, with tiny delays and no sleeping."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from eventbus import _clock
from eventbus._clock import SystemClock

TIMEOUT = 5.0
_names = itertools.count()

ClockFactory = Callable[..., SystemClock]


def _threads_named(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


@pytest.fixture
def make_clock() -> Iterator[ClockFactory]:
    """Build clocks with unique timer thread names; every clock is closed after the test."""
    clocks: list[SystemClock] = []

    def make(name: str | None = None) -> SystemClock:
        clock = SystemClock(name=name or f"test-timer-{next(_names)}")
        clocks.append(clock)
        return clock

    yield make
    for clock in clocks:
        clock.close()


class _SteppedTime:
    """Stands in for the time module inside eventbus._clock: time moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def test_monotonic_follows_time_monotonic(make_clock: ClockFactory) -> None:
    """monotonic() reads the same scale as time.monotonic()."""
    clock = make_clock()
    before = time.monotonic()
    reading = clock.monotonic()
    after = time.monotonic()
    assert before <= reading <= after


def test_callback_fires(make_clock: ClockFactory) -> None:
    """A callback scheduled with call_later is called once its delay passes."""
    clock = make_clock()
    fired = threading.Event()
    clock.call_later(0.001, fired.set)
    assert fired.wait(TIMEOUT)


def test_callback_runs_on_the_timer_thread(make_clock: ClockFactory) -> None:
    """Callbacks run on the clock's own named daemon thread."""
    clock = make_clock()
    fired = threading.Event()
    threads: list[threading.Thread] = []

    def callback() -> None:
        threads.append(threading.current_thread())
        fired.set()

    clock.call_later(0.001, callback)
    assert fired.wait(TIMEOUT)
    assert threads[0].name.startswith("test-timer-")
    assert threads[0].daemon


def test_callbacks_fire_in_due_order(
    make_clock: ClockFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Callbacks run in order of due time, not of scheduling."""
    stepped = _SteppedTime()
    monkeypatch.setattr(_clock, "time", stepped)
    clock = make_clock()
    order: list[str] = []
    done = threading.Event()

    def last() -> None:
        order.append("late")
        done.set()

    clock.call_later(0.01, last)
    clock.call_later(0.005, lambda: order.append("middle"))
    clock.call_later(0.001, lambda: order.append("early"))
    stepped.now = 1.0  # all three are due at once; the timer wakes within 0.01 s
    assert done.wait(TIMEOUT)
    assert order == ["early", "middle", "late"]


def test_cancelled_callback_does_not_fire(make_clock: ClockFactory) -> None:
    """A cancelled callback is skipped; one due after it still fires."""
    clock = make_clock()
    calls: list[str] = []
    fired = threading.Event()
    handle = clock.call_later(0.001, lambda: calls.append("cancelled"))
    handle.cancel()
    clock.call_later(0.001, fired.set)  # due no earlier than the cancelled one
    assert fired.wait(TIMEOUT)
    assert calls == []


def test_raising_callback_is_reported_and_the_timer_continues(make_clock: ClockFactory) -> None:
    """A callback's exception goes to on_error and later callbacks still fire."""
    clock = make_clock()
    errors: list[BaseException] = []
    clock.on_error = errors.append
    error = RuntimeError("bug")
    fired = threading.Event()

    def failing() -> None:
        raise error

    clock.call_later(0.001, failing)
    clock.call_later(0.002, fired.set)
    assert fired.wait(TIMEOUT)
    assert errors == [error]


def test_close_stops_the_timer_thread(make_clock: ClockFactory) -> None:
    """close() returns once the timer thread has stopped."""
    name = f"test-timer-{next(_names)}"
    clock = make_clock(name)
    fired = threading.Event()
    clock.call_later(0.001, fired.set)
    assert fired.wait(TIMEOUT)
    assert len(_threads_named(name)) == 1
    clock.close()
    assert _threads_named(name) == []


def test_close_drops_callbacks_not_yet_due(make_clock: ClockFactory) -> None:
    """A callback far in the future does not delay close() and never fires."""
    name = f"test-timer-{next(_names)}"
    clock = make_clock(name)
    calls: list[str] = []
    clock.call_later(60, lambda: calls.append("late"))
    assert len(_threads_named(name)) == 1
    started = time.monotonic()
    clock.close()
    assert time.monotonic() - started < TIMEOUT
    assert _threads_named(name) == []
    assert calls == []


def test_call_later_after_close_never_fires(make_clock: ClockFactory) -> None:
    """call_later() on a closed clock accepts the callback, starts no thread and never calls it."""
    name = f"test-timer-{next(_names)}"
    clock = make_clock(name)
    clock.close()
    fired = threading.Event()
    clock.call_later(0, fired.set)
    assert _threads_named(name) == []
    assert not fired.is_set()


def test_close_without_use_starts_no_thread(make_clock: ClockFactory) -> None:
    """A clock that never scheduled anything starts no thread, and closes at once."""
    name = f"test-timer-{next(_names)}"
    clock = make_clock(name)
    assert _threads_named(name) == []
    clock.close()
    assert _threads_named(name) == []


def test_close_is_idempotent(make_clock: ClockFactory) -> None:
    """Closing a clock twice is harmless, and it stays closed."""
    name = f"test-timer-{next(_names)}"
    clock = make_clock(name)
    clock.call_later(0.001, lambda: None)
    clock.close()
    clock.close()
    fired = threading.Event()
    clock.call_later(0, fired.set)
    assert _threads_named(name) == []
    assert not fired.is_set()


def test_system_clock_wall_time_is_time_time() -> None:
    """SystemClock.time is the wall clock, so stored due times mean the same in any process."""
    assert SystemClock.time is time.time
