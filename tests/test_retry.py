"""RetryPolicy as a pure function of its inputs, and the retry queue on a fake clock."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import tenacity

from eventbus._clock import TimerHandle
from eventbus._retry_queue import RetryQueue
from eventbus.retry import DEFAULT_WAIT, RetryPolicy
from eventbus.testing import FakeClock

# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_attempts", [0, -1, -100])
def test_max_attempts_below_one_is_a_value_error(max_attempts: int) -> None:
    """max_attempts below 1 raises ValueError."""
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(max_attempts=max_attempts)


@pytest.mark.parametrize("max_attempts", [True, False, "3", 3.0, None])
def test_non_int_max_attempts_is_a_type_error(max_attempts: object) -> None:
    """A max_attempts that is not an int (booleans included) raises TypeError."""
    with pytest.raises(TypeError, match="max_attempts must be an int"):
        RetryPolicy(max_attempts=max_attempts)  # type: ignore[arg-type]


@pytest.mark.parametrize("wait", [None, 2, "fixed"])
def test_non_callable_wait_is_a_type_error(wait: object) -> None:
    """A wait that is not callable raises TypeError."""
    with pytest.raises(TypeError, match="wait must be a tenacity wait strategy"):
        RetryPolicy(wait=wait)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "retry_on", [(ValueError, "KeyError"), ("ValueError",), (int,), int, ValueError()]
)
def test_retry_on_must_be_exception_types(retry_on: object) -> None:
    """A retry_on holding anything but exception classes raises TypeError."""
    with pytest.raises(TypeError, match="retry_on must be exception classes"):
        RetryPolicy(retry_on=retry_on)  # type: ignore[arg-type]


def test_single_exception_class_is_normalised_to_a_tuple() -> None:
    """retry_on given as one exception class is stored as a one-item tuple."""
    assert RetryPolicy(retry_on=ValueError).retry_on == (ValueError,)  # type: ignore[arg-type]


def test_defaults() -> None:
    """The default policy makes 3 attempts, retries any Exception and waits with DEFAULT_WAIT."""
    policy = RetryPolicy()
    assert policy.max_attempts == 3
    assert policy.retry_on == (Exception,)
    assert policy.wait is DEFAULT_WAIT
    assert policy.stop is None


def test_policy_is_immutable() -> None:
    """A policy's fields cannot be reassigned."""
    policy = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 10  # type: ignore[misc]


def test_equal_settings_make_equal_policies() -> None:
    """Two policies built from the same settings compare equal."""
    wait = tenacity.wait_fixed(1)
    assert RetryPolicy(max_attempts=4, wait=wait) == RetryPolicy(max_attempts=4, wait=wait)


# -- next_delay ---------------------------------------------------------------------------


def test_wait_fixed_gives_a_fixed_delay() -> None:
    """With wait_fixed(2), every retry waits 2 seconds."""
    policy = RetryPolicy(max_attempts=5, wait=tenacity.wait_fixed(2))
    assert [policy.next_delay(a, ValueError()) for a in range(1, 5)] == [2.0] * 4


def test_delay_is_a_float() -> None:
    """next_delay returns a float even when the strategy returns an int."""
    delay = RetryPolicy(wait=tenacity.wait_fixed(2)).next_delay(1, ValueError())
    assert type(delay) is float


def test_last_attempt_stops() -> None:
    """When attempt equals max_attempts, next_delay returns None."""
    policy = RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(1))
    assert policy.next_delay(2, ValueError()) == 1.0
    assert policy.next_delay(3, ValueError()) is None


def test_max_attempts_one_never_retries() -> None:
    """RetryPolicy(max_attempts=1) means no retry after the first failure."""
    assert RetryPolicy(max_attempts=1).next_delay(1, ValueError()) is None


def test_error_not_in_retry_on_stops() -> None:
    """An error that does not match retry_on gets no retry, whatever the attempt."""
    policy = RetryPolicy(max_attempts=5, retry_on=(ConnectionError,))
    assert policy.next_delay(1, ValueError("bad input")) is None


def test_subclass_of_retry_on_is_retried() -> None:
    """An error that subclasses a retry_on type is retried."""
    policy = RetryPolicy(max_attempts=5, wait=tenacity.wait_fixed(1), retry_on=(OSError,))
    assert policy.next_delay(1, ConnectionResetError()) == 1.0


def test_base_exception_is_not_retried_by_default() -> None:
    """The default retry_on=(Exception,) does not retry a BaseException such as SystemExit."""
    assert RetryPolicy(max_attempts=5).next_delay(1, SystemExit(1)) is None


def test_is_retryable_follows_retry_on() -> None:
    """is_retryable is True exactly for errors matching retry_on."""
    policy = RetryPolicy(retry_on=(KeyError, TimeoutError))
    assert policy.is_retryable(KeyError("x"))
    assert policy.is_retryable(TimeoutError())
    assert not policy.is_retryable(ValueError())


def test_stop_after_delay_stops_once_elapsed_exceeds_it() -> None:
    """With stop=stop_after_delay(10), an elapsed time of 10 s or more stops the retries."""
    policy = RetryPolicy(
        max_attempts=100, wait=tenacity.wait_fixed(1), stop=tenacity.stop_after_delay(10)
    )
    assert policy.next_delay(2, ValueError(), elapsed=9.5) == 1.0
    assert policy.next_delay(2, ValueError(), elapsed=10.5) is None


def test_stop_and_max_attempts_whichever_comes_first() -> None:
    """max_attempts still stops the retries when the extra stop has not fired."""
    policy = RetryPolicy(
        max_attempts=2, wait=tenacity.wait_fixed(1), stop=tenacity.stop_after_delay(10)
    )
    assert policy.next_delay(2, ValueError(), elapsed=0.0) is None


def test_wait_exponential_sequence() -> None:
    """wait_exponential(multiplier=1, max=8) gives 1, 2, 4, 8, 8 for attempts 1 to 5."""
    policy = RetryPolicy(max_attempts=10, wait=tenacity.wait_exponential(multiplier=1, max=8))
    assert [policy.next_delay(a, ValueError()) for a in range(1, 6)] == [1, 2, 4, 8, 8]


def test_next_delay_agrees_with_tenacity() -> None:
    """next_delay gives what tenacity's own strategy gives for the same attempt number."""
    wait = tenacity.wait_exponential(multiplier=0.5, max=30)
    policy = RetryPolicy(max_attempts=20, wait=wait)
    for attempt in range(1, 15):
        state = tenacity.RetryCallState(None, None, (), {})
        state.attempt_number = attempt
        assert policy.next_delay(attempt, ValueError()) == wait(state)


def test_wait_strategies_compose() -> None:
    """A sum of tenacity wait strategies is a valid wait."""
    policy = RetryPolicy(wait=tenacity.wait_fixed(1) + tenacity.wait_fixed(2))
    assert policy.next_delay(1, ValueError()) == 3.0


def test_wait_sees_the_error_and_attempt() -> None:
    """The wait strategy is called with the failed attempt number and its error."""
    seen: list[tuple[int, BaseException | None]] = []
    error = ValueError("boom")

    def wait(state: tenacity.RetryCallState) -> float:
        assert state.outcome is not None
        seen.append((state.attempt_number, state.outcome.exception()))
        return 0.25

    assert RetryPolicy(max_attempts=5, wait=wait).next_delay(3, error) == 0.25
    assert seen == [(3, error)]


def test_negative_wait_is_clamped_to_zero() -> None:
    """A wait strategy returning a negative number yields a delay of 0."""
    assert RetryPolicy(wait=lambda state: -5).next_delay(1, ValueError()) == 0.0


def test_default_wait_first_delay_bounds() -> None:
    """DEFAULT_WAIT waits between 0.5 s and 1.0 s after the first attempt."""
    policy = RetryPolicy(max_attempts=2)
    for _ in range(200):
        delay = policy.next_delay(1, ValueError())
        assert delay is not None
        assert 0.5 <= delay <= 1.0


def test_default_wait_is_capped() -> None:
    """DEFAULT_WAIT never waits more than 30.5 s, however many attempts failed."""
    policy = RetryPolicy(max_attempts=1000)
    for attempt in range(1, 200):
        delay = policy.next_delay(attempt, ValueError())
        assert delay is not None
        assert delay <= 30.5


def test_default_wait_reaches_the_cap() -> None:
    """After enough failures DEFAULT_WAIT waits at least its 30 s cap."""
    delay = RetryPolicy(max_attempts=100).next_delay(50, ValueError())
    assert delay is not None
    assert 30.0 <= delay <= 30.5


# -- RetryQueue ---------------------------------------------------------------------------


@pytest.fixture
def fired() -> list[str]:
    """Items the queue under test has handed to on_due, in order."""
    return []


@pytest.fixture
def queue(clock: FakeClock, fired: list[str]) -> RetryQueue[str]:
    """A retry queue on the fake clock that records what comes due."""
    return RetryQueue(clock, fired.append)


def test_items_fire_in_due_order(
    queue: RetryQueue[str], clock: FakeClock, fired: list[str]
) -> None:
    """Scheduled items reach on_due in order of their due time, not of scheduling."""
    queue.schedule("c", 3)
    queue.schedule("a", 1)
    queue.schedule("b", 2)
    clock.advance(10)
    assert fired == ["a", "b", "c"]


def test_items_fire_only_when_due(
    queue: RetryQueue[str], clock: FakeClock, fired: list[str]
) -> None:
    """An item does not fire before its delay has passed on the clock."""
    queue.schedule("a", 5)
    clock.advance(4.999)
    assert fired == []
    clock.advance(0.001)
    assert fired == ["a"]


def test_len_counts_waiting_items(
    queue: RetryQueue[str], clock: FakeClock, fired: list[str]
) -> None:
    """len() is the number of items still waiting."""
    assert len(queue) == 0
    queue.schedule("a", 1)
    queue.schedule("b", 2)
    assert len(queue) == 2
    clock.advance(1)
    assert len(queue) == 1
    clock.advance(1)
    assert len(queue) == 0


def test_zero_delay_fires_on_the_next_advance(
    queue: RetryQueue[str], clock: FakeClock, fired: list[str]
) -> None:
    """An item scheduled with no delay fires on advance(0), not inside schedule()."""
    queue.schedule("a", 0)
    assert fired == []
    clock.advance(0)
    assert fired == ["a"]


def test_take_due_takes_only_due_items(
    queue: RetryQueue[str], clock: FakeClock, fired: list[str]
) -> None:
    """take_due(now) returns the items due at now and leaves the others waiting."""
    queue.schedule("soon", 1)
    queue.schedule("sooner", 0.5)
    queue.schedule("later", 5)
    assert sorted(queue.take_due(1.0)) == ["soon", "sooner"]
    assert len(queue) == 1


def test_take_due_cancels_the_taken_timers(
    queue: RetryQueue[str], clock: FakeClock, fired: list[str]
) -> None:
    """Items taken by take_due never reach on_due; the others still do."""
    queue.schedule("soon", 1)
    queue.schedule("later", 5)
    queue.take_due(1.0)
    clock.advance(10)
    assert fired == ["later"]
    assert clock.pending == 0


def test_take_all_empties_the_queue(
    queue: RetryQueue[str], clock: FakeClock, fired: list[str]
) -> None:
    """take_all returns every waiting item, and none of them fires afterwards."""
    queue.schedule("a", 1)
    queue.schedule("b", 100)
    assert sorted(queue.take_all()) == ["a", "b"]
    assert len(queue) == 0
    assert clock.pending == 0
    clock.advance(1000)
    assert fired == []


def test_take_all_of_an_empty_queue_is_empty(queue: RetryQueue[str]) -> None:
    """take_all on an empty queue returns an empty list."""
    assert queue.take_all() == []


def test_fired_item_is_not_taken_again(
    queue: RetryQueue[str], clock: FakeClock, fired: list[str]
) -> None:
    """An item that already fired is not returned by take_due or take_all."""
    queue.schedule("a", 1)
    clock.advance(1)
    assert queue.take_due(100) == []
    assert queue.take_all() == []
    assert fired == ["a"]


def test_due_time_is_measured_from_scheduling(
    queue: RetryQueue[str], clock: FakeClock, fired: list[str]
) -> None:
    """An item scheduled after the clock moved is due relative to the clock's reading then."""
    clock.advance(100)
    queue.schedule("a", 2)
    assert queue.take_due(101.5) == []
    assert queue.take_due(102.0) == ["a"]


class _ImmediateClock:
    """A clock whose timers fire inside call_later, before it returns."""

    def monotonic(self) -> float:
        return 0.0

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        callback()
        return TimerHandle(callback)

    def close(self) -> None:
        pass


class _IgnoredCancel:
    """A timer handle whose cancel() comes too late to stop the timer."""

    def cancel(self) -> None:
        pass


class _DeafClock(FakeClock):
    """A fake clock whose timers fire even when cancelled, like a cancel that lost a race."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> _IgnoredCancel:  # type: ignore[override]
        super().call_later(delay, callback)
        return _IgnoredCancel()


def test_timer_firing_inside_schedule_still_delivers(fired: list[str]) -> None:
    """An item whose timer fires before schedule() returns is handed to on_due once."""
    queue: RetryQueue[str] = RetryQueue(_ImmediateClock(), fired.append)
    queue.schedule("a", 0)
    assert fired == ["a"]
    assert len(queue) == 0


def test_taken_item_is_not_delivered_by_a_late_timer(fired: list[str]) -> None:
    """An item taken by take_all is not handed to on_due even if its timer fires anyway."""
    clock = _DeafClock()
    queue: RetryQueue[str] = RetryQueue(clock, fired.append)
    queue.schedule("a", 1)
    assert queue.take_all() == ["a"]
    clock.advance(1)
    assert fired == []


def test_item_taken_while_its_timer_is_created_is_not_delivered(fired: list[str]) -> None:
    """An item taken between its registration and its timer's creation never fires."""
    clock = FakeClock()
    taken: list[list[str]] = []

    class _RacingClock:
        def monotonic(self) -> float:
            return clock.monotonic()

        def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
            taken.append(queue.take_all())  # another thread closes the queue right now
            return clock.call_later(delay, callback)

        def close(self) -> None:
            pass

    queue: RetryQueue[str] = RetryQueue(_RacingClock(), fired.append)
    queue.schedule("a", 1)
    clock.advance(1)
    assert taken == [["a"]]
    assert fired == []
    assert len(queue) == 0


def test_retry_queue_keeps_its_old_public_name() -> None:
    """eventbus.retry.RetryQueue still resolves (to the private class), outside __all__."""
    import eventbus.retry

    assert eventbus.retry.RetryQueue is RetryQueue
    assert "RetryQueue" not in eventbus.retry.__all__
