"""A token bucket in Redis, shared by every consumer of a group: one handler's ``rate_limit``.

:class:`RedisRateLimiter` is what :meth:`RedisStreamsTransport.rate_limiter` returns. The
bucket is one hash in Redis (``tokens``, ``ts``), read and updated by one Lua script that runs
atomically on the server and reads the server's clock (``TIME``): the processes' own clocks
never enter the arithmetic, so it holds however far apart they are. This module does not import
``redis`` (only the transport module does): it is handed the transport's client, and the error
types to turn into :class:`~eventbus.TransportError`.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from eventbus.exceptions import TransportError

__all__ = ["RedisRateLimiter", "validate_rate"]

#: KEYS[1]: the bucket. ARGV[1]: capacity (tokens, also the refill per period); ARGV[2]: the
#: period in seconds. Returns two strings: the wait (0 if a token was taken, else the seconds
#: until the next token), and the seconds until the bucket next holds a token (0 if it still
#: does after this call; the wait again if none was taken). A bucket that does not exist is
#: full; an idle one expires after a period (at most about 35 years), when it would be full
#: again anyway, so the expiry changes nothing but the memory used. If the server's clock went
#: back (a failover), that call refills nothing and the bucket counts on from the new time.
_TOKEN_BUCKET = """
if redis.replicate_commands then redis.replicate_commands() end
local capacity = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local rate = capacity / period
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
elseif now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate)
end
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
local next_token = 0
if tokens < 1 then
  next_token = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'ts', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.min(math.ceil(period * 1000), 1099511627776))
return {string.format('%.17g', wait), string.format('%.17g', next_token)}
"""


def validate_rate(name: object, limit: object, period: object) -> tuple[str, int, float]:
    """The arguments of ``rate_limiter`` checked: a non-empty handler name, a whole number of
    attempts ``>= 1``, a finite period in seconds ``> 0``. Raises ``TypeError`` or
    ``ValueError`` naming the argument."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str (the handler's name), got {name!r}")
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int (attempts per period), got {limit!r}")
    if limit < 1:
        raise ValueError(f"limit must be at least 1 attempt per period, got {limit}")
    if (
        isinstance(period, bool)
        or not isinstance(period, int | float)
        or not (math.isfinite(period) and period > 0)
    ):
        raise ValueError(f"period must be a finite number of seconds > 0, got {period!r}")
    return name, limit, float(period)


class RedisRateLimiter:
    """At most ``limit`` attempts per ``period`` seconds, across every process sharing *key*.

    A token bucket of capacity ``limit`` (a burst of up to ``limit`` attempts), refilled at
    ``limit`` tokens per ``period``, kept in Redis under *key*. :meth:`acquire` is one
    ``EVALSHA`` (``EVAL`` once after Redis lost its script cache); the bucket's time is the
    Redis server's. Thread-safe.

    When the bucket was left empty (this call took its last token, or found none), the next
    token cannot appear before the time the script named (nobody adds tokens, others only
    take them), so until then :meth:`acquire` answers from that without asking Redis; and at
    that time one call of this process asks while the others meanwhile get the interval
    between two tokens (``period / limit``). So a process with many deliveries waiting sends
    Redis about one call per token, not one per waiting delivery, and its waiting deliveries
    do not all wake at once to race for one token. While the bucket holds tokens (a burst),
    every call asks Redis.
    """

    def __init__(
        self,
        client: Any,
        key: str,
        limit: int,
        period: float,
        *,
        errors: tuple[type[BaseException], ...],
        where: str = "Redis",
    ) -> None:
        self.key = key
        self.limit = limit
        self.period = period
        self._errors = errors
        self._where = where
        # redis-py's Script: EVALSHA, and on NOSCRIPT loads the script and runs it again.
        self._script: Any = client.register_script(_TOKEN_BUCKET)
        self._period_arg = repr(float(period))
        self._interval = period / limit
        self._lock = threading.Lock()
        # When the bucket was last seen empty: the time.monotonic() of its next token; 0.0
        # when it was last seen holding tokens (or never seen).
        self._empty_until = 0.0
        self._asking = False  # one call is asking Redis for an empty bucket's next token

    def acquire(self) -> float:
        """Take one token and return ``0.0``; or take nothing and return the seconds (> 0)
        until the next token. Blocks for one round trip to Redis at most (bounded by the
        client's timeouts). Raises :class:`~eventbus.TransportError` when Redis cannot be
        reached or answers with an error."""
        now = time.monotonic()
        with self._lock:
            if now < self._empty_until:
                return self._empty_until - now
            if self._empty_until and self._asking:
                return self._interval
            self._asking = asking = bool(self._empty_until)
        try:
            reply = self._script(keys=[self.key], args=[self.limit, self._period_arg])
            wait, next_token = (float(_text(value)) for value in reply)
        except self._errors as exc:
            raise TransportError(
                f"rate limiter {self.key!r} could not take a token from {self._where}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        finally:
            if asking:
                with self._lock:
                    self._asking = False
        with self._lock:
            # Measured from before the call: an estimate a little early, never late (Redis
            # answers for the bucket anyway; early only means asking again).
            self._empty_until = now + next_token if next_token > 0 else 0.0
        return wait if wait > 0 else 0.0

    def __repr__(self) -> str:
        return f"<RedisRateLimiter {self.key!r} {self.limit}/{self.period:g}s>"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
