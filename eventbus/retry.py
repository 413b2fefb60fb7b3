"""Retry policies (built on tenacity's wait and stop strategies) and the retry queue.

This is the only module that imports tenacity. A policy never sleeps: it only answers "how long
until the next attempt, or stop?", as a pure function of the attempt number, the error and the
elapsed time. The :class:`RetryQueue` then holds the delivery on a :class:`~eventbus.typing.Clock`
timer, so no worker thread waits through a backoff.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import tenacity
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from eventbus.typing import Cancellable, Clock

__all__ = ["DEFAULT_WAIT", "RetryPolicy", "RetryQueue"]

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
    state.outcome = tenacity.Future.construct(attempt, error, True)
    return state


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
