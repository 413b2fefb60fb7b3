"""Where a failed attempt goes next: a pure decision from the error and the retry policy.

tenacity decides (``DoAttempt``/``DoSleep``) apart from doing; so does eventbus. Given the
policy, how many attempts ran, the error and the time since the first attempt, :func:`route`
says "retry after *d* seconds" or "dead letter, for this reason". It never sleeps, logs or
touches a delivery, so it is tested as a function of its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from eventbus._event import DeadLetterReason
from eventbus._outcomes import format_error
from eventbus.retry import RetryPolicy

__all__ = ["GiveUp", "RetryAfter", "Route", "route"]


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """Try again *delay* seconds from now."""

    delay: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No more attempts: the delivery becomes a dead letter for *reason*. *policy_error* is
    ``"Type: message"`` of an error the policy itself raised, else ``None``."""

    reason: DeadLetterReason
    policy_error: str | None = None


Route = RetryAfter | GiveUp


def route(policy: RetryPolicy, attempts: int, error: BaseException, elapsed: float) -> Route:
    """The next step after attempt number *attempts* failed with *error*, *elapsed* seconds
    after the first attempt started.

    A policy that raises (a wait strategy reading an attribute the error lacks) gives up with
    ``"not_retryable"``: it cannot say when to try again, and a delivery must never be left
    without a next step. Any ``BaseException`` of the policy's code counts. Never raises.
    """
    try:
        delay = policy.next_delay(attempts, error, elapsed=elapsed)
        if delay is not None:
            return RetryAfter(delay)
        return GiveUp("exhausted" if policy.is_retryable(error) else "not_retryable")
    except BaseException as policy_error:  # noqa: BLE001 - any error of the policy's code
        return GiveUp("not_retryable", format_error(policy_error))
