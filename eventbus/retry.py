"""Retry policies, built on tenacity's wait and stop strategies.

This is the only module that imports tenacity. A policy never sleeps: it only answers "how long
until the next attempt, or stop?", as a pure function of the attempt number, the error and the
elapsed time. The bus's retry queue then holds the delivery on a
:class:`~eventbus.typing.Clock` timer, so no worker thread waits through a backoff.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import tenacity
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from eventbus._retry_queue import RetryQueue as _RetryQueue

__all__ = ["DEFAULT_WAIT", "RetryPolicy"]

#: The default backoff: 0.5 s, 1 s, 2 s, 4 s ... doubling, capped at 30 s, plus up to 0.5 s of
#: random jitter so that many deliveries failing together do not retry in lockstep.
DEFAULT_WAIT: wait_base = tenacity.wait_exponential(multiplier=0.5, max=30) + tenacity.wait_random(
    0, 0.5
)


def _exception_types(value: object) -> tuple[type[BaseException], ...]:
    types = value if isinstance(value, tuple) else (value,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, BaseException)):
            raise TypeError(f"retry_on must be exception classes, got {t!r}")
    return cast(tuple[type[BaseException], ...], types)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often, and how far apart, a failing delivery is attempted. Immutable and thread-safe.

    * ``max_attempts`` counts every attempt, the first included: ``1`` means no retry.
    * ``wait`` is any tenacity wait strategy (``tenacity.wait_fixed(2)``,
      ``wait_exponential(multiplier=0.5, max=30)``, ``wait_a + wait_b`` ...); the default is
      :data:`DEFAULT_WAIT`.
    * ``retry_on``: only these exception types are retried; anything else goes straight to the
      dead letters (reason ``"not_retryable"``). ``BaseException``\\ s such as ``SystemExit``
      are not retried by the default ``(Exception,)``.
    * ``stop``: an optional extra tenacity stop strategy (e.g. ``stop_after_delay(60)``),
      combined with ``max_attempts`` by "whichever comes first".

    Raises ``ValueError`` for ``max_attempts < 1`` and ``TypeError`` for a non-callable
    ``wait`` or non-exception ``retry_on``.
    """

    max_attempts: int = 3
    wait: Callable[[tenacity.RetryCallState], float] = DEFAULT_WAIT
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    stop: stop_base | None = None
    _stop: stop_base = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError(f"max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if not callable(self.wait):
            raise TypeError(f"wait must be a tenacity wait strategy, got {self.wait!r}")
        object.__setattr__(self, "retry_on", _exception_types(self.retry_on))
        stop: stop_base = tenacity.stop_after_attempt(self.max_attempts)
        if self.stop is not None:
            stop = stop | self.stop
        object.__setattr__(self, "_stop", stop)

    def next_delay(
        self, attempt: int, error: BaseException, *, elapsed: float = 0.0
    ) -> float | None:
        """Seconds until the next attempt after *attempt* failed with *error*, or ``None`` if
        the delivery should stop here. *elapsed* is the time since the first attempt started.

        A pure function of its arguments (and of the wait strategy's own randomness).
        """
        if not isinstance(error, self.retry_on):
            return None
        state = _retry_state(attempt, error, elapsed)
        if self._stop(state):
            return None
        return max(0.0, float(self.wait(state)))

    def is_retryable(self, error: BaseException) -> bool:
        """True if *error* matches ``retry_on``."""
        return isinstance(error, self.retry_on)


def _retry_state(attempt: int, error: BaseException, elapsed: float) -> tenacity.RetryCallState:
    # tenacity's strategies read a RetryCallState; we build one by hand instead of running a
    # Retrying loop, because the wait happens on the retry queue, not in a sleeping thread.
    state = tenacity.RetryCallState(cast(Any, None), None, (), {})
    state.attempt_number = attempt
    state.start_time = 0.0
    state.outcome_timestamp = elapsed
    state.outcome = cast(Any, _Failure(attempt, error))
    return state


class _Failure:
    """The failed attempt's outcome, as tenacity's strategies read it (``failed``,
    ``exception()``, ``result()``, ``attempt_number``). tenacity's own ``Future`` is a
    ``concurrent.futures.Future``, whose condition variable was the largest single cost of a
    failed attempt; strategies only ever read these four members."""

    __slots__ = ("_error", "attempt_number")

    failed = True

    def __init__(self, attempt: int, error: BaseException) -> None:
        self.attempt_number = attempt
        self._error = error

    def exception(self, timeout: float | None = None) -> BaseException:
        return self._error

    def result(self, timeout: float | None = None) -> Any:
        raise self._error


def __getattr__(name: str) -> Any:
    # RetryQueue is the bus's own machinery, now private (eventbus._retry_queue); the old
    # name still resolves so that code written against it keeps working.
    if name == "RetryQueue":
        return _RetryQueue
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
