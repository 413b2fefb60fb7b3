"""route(): the next step after a failed attempt, as a pure function of policy and error."""

from __future__ import annotations

import pytest
import tenacity

from eventbus._routing import GiveUp, RetryAfter, route
from eventbus.retry import RetryPolicy


class Transient(Exception):
    """An error worth retrying."""


class Permanent(Exception):
    """An error not worth retrying."""


def test_first_failure_with_attempts_left_retries_after_the_wait() -> None:
    """With attempts left, the policy's wait is the delay."""
    policy = RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(2))
    assert route(policy, 1, Transient(), 0.0) == RetryAfter(2.0)


def test_last_allowed_attempt_gives_up_exhausted() -> None:
    """The attempt that reaches max_attempts gives up as exhausted."""
    policy = RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(2))
    assert route(policy, 3, Transient(), 0.0) == GiveUp("exhausted")


def test_error_outside_retry_on_gives_up_not_retryable() -> None:
    """An error that retry_on does not match gives up at once as not_retryable."""
    policy = RetryPolicy(max_attempts=5, retry_on=(Transient,))
    assert route(policy, 1, Permanent(), 0.0) == GiveUp("not_retryable")


def test_stop_strategy_on_elapsed_time_gives_up() -> None:
    """A stop_after_delay strategy reads elapsed and gives up once it has passed."""
    policy = RetryPolicy(max_attempts=10, stop=tenacity.stop_after_delay(30))
    assert isinstance(route(policy, 1, Transient(), 29.0), RetryAfter)
    assert route(policy, 2, Transient(), 31.0) == GiveUp("exhausted")


def test_exponential_wait_grows_with_the_attempt_number() -> None:
    """Delays follow the wait strategy for each attempt number."""
    policy = RetryPolicy(max_attempts=5, wait=tenacity.wait_exponential(multiplier=1, max=60))
    delays = [route(policy, n, Transient(), 0.0) for n in (1, 2, 3)]
    assert delays == [RetryAfter(1.0), RetryAfter(2.0), RetryAfter(4.0)]


def _reads_retry_after(state: tenacity.RetryCallState) -> float:
    assert state.outcome is not None
    return float(state.outcome.exception().retry_after)  # type: ignore[union-attr]


def test_wait_strategy_that_raises_gives_up_naming_its_error() -> None:
    """A wait strategy that raises gives up as not_retryable and names the policy's error."""
    policy = RetryPolicy(max_attempts=3, wait=_reads_retry_after)
    step = route(policy, 1, Transient("down"), 0.0)
    assert isinstance(step, GiveUp)
    assert step.reason == "not_retryable"
    assert step.policy_error is not None
    assert step.policy_error.startswith("AttributeError: ")


def interrupting(retry_state: tenacity.RetryCallState) -> bool:
    """A stop strategy that raises a BaseException."""
    raise KeyboardInterrupt


def test_base_exception_from_the_policy_still_gives_up() -> None:
    """Even a BaseException raised by the policy's code becomes a decision, not an escape."""
    policy = RetryPolicy(max_attempts=3, stop=interrupting)
    assert route(policy, 1, Transient(), 0.0) == GiveUp("not_retryable", "KeyboardInterrupt")


@pytest.mark.parametrize("attempts", [1, 2])
def test_route_is_a_pure_function_of_its_arguments(attempts: int) -> None:
    """The same arguments give the same decision (no jitter in this policy)."""
    policy = RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(1))
    assert route(policy, attempts, Transient(), 0.0) == route(policy, attempts, Transient(), 0.0)
