"""Delivery policies of one handler: when its deliveries may start, and how long they may run.

A :class:`Gate` stands between the pipeline and the executor for a handler subscribed with
``ordered_by``, ``concurrency`` or ``rate_limit``. A delivery passes three stages in turn, and
waits in the first that is closed to it, as a queued job: never on a worker thread.

1. **Key** (``ordered_by``): one delivery per key at a time, in the order they were offered,
   held from its first attempt until it settles (retries included), so a retry never lets a
   later event of the same key overtake it.
2. **Slot** (``concurrency``): at most N attempts running at once; a slot is given back when
   an attempt ends, so a delivery waiting for its backoff holds none.
3. **Token** (``rate_limit``): a token bucket, local or shared by a transport's consumers;
   a denied delivery is looked at again when the next token is due.

Each stage has its own lock, held for bookkeeping only: jobs are handed on after it is
released, since handing on may run the job at once (an inline executor) and that job may
offer the next one.
"""

from __future__ import annotations

import math
import re
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from eventbus._event import Event

if TYPE_CHECKING:
    from eventbus.typing import Cancellable, Clock, RateLimiter

__all__ = [
    "AttemptWatch",
    "Gate",
    "Policy",
    "Rate",
    "TokenBucket",
    "check_delay",
    "check_seconds",
    "key_function",
    "parse_rate",
]

_RATE = re.compile(r"\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*", re.IGNORECASE)
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


class RetryJob(Protocol):
    """What a gate holds: one delivery (``eventbus._records.RetryJob``, named structurally so
    that the records, which know subscriptions and so gates, are not imported here)."""

    dispatch: Any
    index: int
    not_before: float | None


_NO_KEY = object()

#: Seconds before a limiter that raised is asked again.
LIMITER_RETRY = 1.0


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` attempts per ``period`` seconds."""

    limit: int
    period: float


def parse_rate(text: object) -> Rate:
    """``"10/s"``, ``"100/m"``, ``"5/h"`` (Celery's syntax) as a :class:`Rate`. Raises
    ``TypeError`` for a non-string and ``ValueError`` for anything else malformed."""
    if not isinstance(text, str):
        raise TypeError(f"rate_limit must be a str such as '10/s', got {type(text).__name__}")
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError(f"rate_limit must look like '10/s', '100/m' or '5/h', got {text!r}")
    limit = int(match.group(1))
    if limit < 1:
        raise ValueError(f"rate_limit must allow at least 1 attempt per period, got {text!r}")
    return Rate(limit, _PERIODS[match.group(2)[0].lower()])


def check_seconds(value: object, what: str) -> float | None:
    """A positive number of seconds (or ``None``), else ``TypeError``/``ValueError``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


def check_delay(value: object) -> float:
    """``emit(delay=)``: seconds (an int, a float or a ``timedelta``), zero or more."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"delay must be seconds or a timedelta, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"delay must be zero or more seconds, got {value!r}")
    return float(value)


def key_function(ordered_by: object) -> Callable[[Event], Hashable]:
    """``ordered_by`` as a function of the event: a callable as it is, or a name looked up
    in the payload (a mapping's key, else an attribute)."""
    if callable(ordered_by):
        return ordered_by
    if not isinstance(ordered_by, str) or not ordered_by:
        raise TypeError(
            "ordered_by must be a payload key or attribute name, or a function of the event, "
            f"got {ordered_by!r}"
        )
    name = ordered_by

    def key_of(event: Event) -> Hashable:
        payload = event.payload
        if type(payload) is dict and name in payload:  # the common case, without the ABC check
            return payload[name]  # type: ignore[no-any-return]
        if isinstance(payload, Mapping):
            if name not in payload:
                raise KeyError(f"ordered_by={name!r}: the payload has no key {name!r}")
            return payload[name]  # type: ignore[no-any-return]
        try:
            return getattr(payload, name)  # type: ignore[no-any-return]
        except AttributeError:
            raise KeyError(
                f"ordered_by={name!r}: the {type(payload).__name__} payload has no key or "
                f"attribute {name!r}"
            ) from None

    return key_of


@dataclass(frozen=True, slots=True)
class Policy:
    """The delivery options of one subscription (validated)."""

    ordered_by: Callable[[Event], Hashable] | None = None
    concurrency: int | None = None
    rate: Rate | None = None
    timeout: float | None = None
    stall_warning: float | None = None

    @property
    def watched(self) -> bool:
        """Whether each attempt is timed (a timeout or a stall warning)."""
        return self.timeout is not None or self.stall_warning is not None

    @property
    def gated(self) -> bool:
        """Whether deliveries pass a :class:`Gate` before they start."""
        return self.ordered_by is not None or self.concurrency is not None or self.rate is not None


def order_keys(subs: Iterable[tuple[str, Policy | None]], event: Event) -> dict[str, str]:
    """The ``ordered_by`` key of *event* for each subscription that has one, as text for a
    store shared by processes (which runs the deliveries of one key one process at a time).
    A key that cannot be computed is left out: its delivery fails in the gate all the same."""
    keys: dict[str, str] = {}
    for name, policy in subs:
        if policy is None or policy.ordered_by is None:
            continue
        try:
            value = policy.ordered_by(event)
        except Exception:  # noqa: BLE001 - the gate reports it when the delivery runs
            continue
        keys[name] = f"{type(value).__name__}:{value}"
    return keys


def make_policy(
    *,
    ordered_by: object,
    concurrency: object,
    rate_limit: object,
    timeout: object,
    stall_warning: object,
) -> Policy | None:
    """Validate ``on()``'s policy options; ``None`` when none is set."""
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int)
    ):
        raise TypeError(f"concurrency must be an int, got {type(concurrency).__name__}")
    if isinstance(concurrency, int) and concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency!r}")
    policy = Policy(
        ordered_by=None if ordered_by is None else key_function(ordered_by),
        concurrency=concurrency,
        rate=None if rate_limit is None else parse_rate(rate_limit),
        timeout=check_seconds(timeout, "timeout"),
        stall_warning=check_seconds(stall_warning, "stall_warning"),
    )
    return None if policy == Policy() else policy


class TokenBucket:
    """A bus-local :class:`~eventbus.typing.RateLimiter` on the bus's clock: up to ``limit``
    tokens, refilled at ``limit`` per ``period``. Thread-safe."""

    def __init__(self, rate: Rate, monotonic: Callable[[], float]) -> None:
        self._rate = rate
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._tokens = float(rate.limit)
        self._at = monotonic()

    def acquire(self) -> float:
        rate = self._rate
        per_token = rate.period / rate.limit
        with self._lock:
            now = self._monotonic()
            self._tokens = min(float(rate.limit), self._tokens + (now - self._at) / per_token)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) * per_token


Hold = Callable[[RetryJob], bool]


class Gate:
    """Decides when the deliveries of one handler may start (see the module docstring).
    Thread-safe.

    *pass_on* starts a job (the executor or the event loop); *hold* is asked, once a job has
    its key, whether it must first wait for a ``not_before`` time (it then comes back through
    :meth:`offer` when due); *key_failed* settles a delivery whose key cannot be computed.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        clock: Clock,
        limiter: RateLimiter | None,
        pass_on: Callable[[RetryJob], None],
        hold: Hold,
        key_failed: Callable[[RetryJob, BaseException], None],
        limiter_failed: Callable[[BaseException], None],
        parked: Callable[[int], None],
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._limiter = limiter
        self._pass_on = pass_on
        self._hold = hold
        self._key_failed = key_failed
        self._limiter_failed = limiter_failed
        # Told of deliveries that wait for a key or a token (+n) and stop waiting (-n): they
        # count as waiting, like a retry's backoff, not as active (they cannot progress
        # until another delivery settles or time passes).
        self._parked = parked
        self._closed = False
        # Key stage: the delivery holding each key, and those waiting for it, in order.
        self._keys_lock = threading.Lock()
        self._holders: dict[Hashable, tuple[object, int]] = {}
        self._key_waiting: dict[Hashable, deque[RetryJob]] = {}
        self._key_of_delivery: dict[tuple[object, int], Hashable] = {}
        self._keys_only = policy.concurrency is None and limiter is None
        # Slot stage.
        self._slots_lock = threading.Lock()
        self._running = 0
        self._slot_waiting: deque[RetryJob] = deque()
        # Token stage.
        self._tokens_lock = threading.Lock()
        self._token_waiting: deque[RetryJob] = deque()
        self._timer: Cancellable | None = None

    @property
    def keyed(self) -> bool:
        return self.policy.ordered_by is not None

    # -- the way in ------------------------------------------------------------------------

    def offer(self, job: RetryJob) -> bool:
        """A delivery wants to start (first attempt, retry, replay or take-over). True if it
        may start now: the caller starts it (so that it can start an event's deliveries
        together); False if it waits here (it is handed on when its turn comes) or was
        settled or scheduled instead."""
        key_of = self.policy.ordered_by
        if key_of is not None and not self._take_key(job, key_of):
            return False
        if job.not_before is not None and self._hold(job):
            return False
        if self._keys_only:  # no slot or token to wait for
            return True
        return self._to_slot(job)

    def _take_key(self, job: RetryJob, key_of: Callable[[Event], Hashable]) -> bool:
        delivery: tuple[object, int] = (job.dispatch, job.index)
        key = self._key_of_delivery.get(delivery, _NO_KEY)
        if key is _NO_KEY:
            # The user's function runs outside the lock: it may take its own.
            try:
                key = key_of(job.dispatch.event)
                hash(key)
            except BaseException as error:  # noqa: BLE001 - a dead letter, never a stuck key
                self._key_failed(job, error)
                return False
        with self._keys_lock:
            if self._closed:
                return True  # the pipeline abandons what it is handed after close
            self._key_of_delivery[delivery] = key
            holder = self._holders.get(key)
            if holder is None:
                self._holders[key] = delivery
                return True
            if holder == delivery:
                return True
            self._key_waiting.setdefault(key, deque()).append(job)
        self._parked(1)
        return False

    def _to_slot(self, job: RetryJob) -> bool:
        limit = self.policy.concurrency
        if limit is not None:
            with self._slots_lock:
                if self._running >= limit or self._slot_waiting:
                    self._slot_waiting.append(job)
                    return False
                self._running += 1
        return self._to_token(job)

    def _to_token(self, job: RetryJob) -> bool:
        limiter = self._limiter
        if limiter is None:
            return True
        with self._tokens_lock:
            if self._token_waiting:
                wait = 1.0
            else:
                wait = self._acquire(limiter)
                if wait > 0:
                    self._arm(wait)
            if wait > 0:
                self._token_waiting.append(job)
        if wait > 0:
            self._parked(1)
            return False
        return True

    def _acquire(self, limiter: RateLimiter) -> float:
        try:
            return limiter.acquire()
        except BaseException as error:  # noqa: BLE001 - a shared limiter's server may be down
            self._limiter_failed(error)
            return LIMITER_RETRY

    def _arm(self, wait: float) -> None:
        # Under the token lock. One timer at a time: it hands on what the tokens allow.
        if self._timer is None and not self._closed:
            self._timer = self._clock.call_later(wait, self._tokens_due)

    def _tokens_due(self) -> None:
        ready: list[RetryJob] = []
        limiter = self._limiter
        assert limiter is not None
        with self._tokens_lock:
            self._timer = None
            while self._token_waiting and not self._closed:
                wait = self._acquire(limiter)
                if wait > 0:
                    self._arm(wait)
                    break
                ready.append(self._token_waiting.popleft())
        if ready:
            self._parked(-len(ready))
        for job in ready:
            self._pass_on(job)

    # -- the way out -----------------------------------------------------------------------

    def attempt_ended(self) -> None:
        """An attempt that passed the slot stage ended (or never ran): its slot is free."""
        if self.policy.concurrency is None:
            return
        with self._slots_lock:
            self._running -= 1
            if not self._slot_waiting or self._closed:
                return
            self._running += 1
            job = self._slot_waiting.popleft()
        if self._to_token(job):
            self._pass_on(job)

    def settled(self, job_dispatch: object, index: int) -> None:
        """A delivery reached its end (or left this process): its key goes to the next."""
        if self.policy.ordered_by is None:
            return
        delivery: tuple[object, int] = (job_dispatch, index)
        with self._keys_lock:
            key = self._key_of_delivery.pop(delivery, _NO_KEY)
            if key is _NO_KEY or self._holders.get(key) != delivery:
                return
            waiting = self._key_waiting.get(key)
            if not waiting or self._closed:
                del self._holders[key]
                self._key_waiting.pop(key, None)
                return
            following = waiting.popleft()
            if not waiting:
                del self._key_waiting[key]
            self._holders[key] = (following.dispatch, following.index)
        self._parked(-1)
        if following.not_before is not None and self._hold(following):
            return
        if self._to_slot(following):
            self._pass_on(following)

    def close(self) -> list[RetryJob]:
        """Stop handing on; return every job still waiting at a stage."""
        with self._keys_lock, self._slots_lock, self._tokens_lock:
            self._closed = True
            waiting = [job for line in self._key_waiting.values() for job in line]
            waiting += self._token_waiting
            parked = len(waiting)
            waiting += self._slot_waiting
            self._key_waiting.clear()
            self._slot_waiting.clear()
            self._token_waiting.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if parked:
            self._parked(-parked)
        return waiting


class AttemptWatch:
    """One watched attempt (a ``timeout`` or ``stall_warning``): whichever of its end and its
    timeout comes first wins, once. Thread-safe."""

    __slots__ = ("_lock", "state")

    RUNNING, FINISHED, TIMED_OUT = 0, 1, 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = self.RUNNING

    def _move(self, state: int) -> bool:
        with self._lock:
            if self.state != self.RUNNING:
                return False
            self.state = state
            return True

    def finish(self) -> bool:
        """The attempt ended; False if its timeout came first (the result is late)."""
        return self._move(self.FINISHED)

    def time_out(self) -> bool:
        """The timeout came; False if the attempt ended first."""
        return self._move(self.TIMED_OUT)

    @property
    def running(self) -> bool:
        return self.state == self.RUNNING

    @property
    def timed_out(self) -> bool:
        return self.state == self.TIMED_OUT
