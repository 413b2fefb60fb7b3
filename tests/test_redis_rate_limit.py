"""RedisStreamsTransport.rate_limiter against the session's real redis-server: the token
bucket every consumer of a group shares (one Lua script on the server's clock).

Every test uses stream, group and handler names of its own. Refilling is tested by moving the
bucket's stored time back in Redis, not by waiting: nothing here sleeps.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from eventbus import TransportError
from eventbus.transports import RedisStreamsTransport
from tests.support.net import free_port

pytestmark = pytest.mark.integration


class Buckets:
    """Transports on one test's stream and group (others on request), closed at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        suffix = uuid.uuid4().hex
        self.stream = f"rate:{suffix}"
        self.group = f"group:{suffix}"
        self.redis: Any = redis.Redis.from_url(url, decode_responses=True)
        self._made: list[RedisStreamsTransport] = []

    def transport(self, **options: Any) -> RedisStreamsTransport:
        options.setdefault("stream", self.stream)
        options.setdefault("group", self.group)
        made = RedisStreamsTransport(self.url, **options)
        self._made.append(made)
        return made

    def key(self, name: str, group: str | None = None) -> str:
        return f"{self.stream}:rate:{group or self.group}:{name}"

    def close(self) -> None:
        for made in self._made:
            made.close()
        self.redis.close()


@pytest.fixture
def buckets(redis_url: str) -> Iterator[Buckets]:
    made = Buckets(redis_url)
    yield made
    made.close()


def takes(limiter: Any, count: int) -> list[float]:
    return [limiter.acquire() for _ in range(count)]


# -- the bucket ------------------------------------------------------------------------------


def test_fresh_bucket_allows_a_burst_of_limit_then_names_the_wait(buckets: Buckets) -> None:
    """A new bucket is full: `limit` acquires take a token (0.0) at once, the next one takes
    nothing and returns the time until the next token, about period / limit."""
    limiter = buckets.transport().rate_limiter("send", 3, 60.0)
    assert takes(limiter, 3) == [0.0, 0.0, 0.0]
    wait = limiter.acquire()
    assert 19.0 < wait <= 20.0


def test_bucket_lives_in_redis_under_its_key_with_an_expiry(buckets: Buckets) -> None:
    """The bucket is the hash <stream>:rate:<group>:<name>, expiring within one period (when
    it would be full again)."""
    buckets.transport().rate_limiter("send", 5, 30.0).acquire()
    key = buckets.key("send")
    state = buckets.redis.hgetall(key)
    assert float(state["tokens"]) == pytest.approx(4.0, abs=0.01)
    assert float(state["ts"]) == pytest.approx(float(buckets.redis.time()[0]), abs=5)
    assert 0 < buckets.redis.pttl(key) <= 30_000


def test_tokens_refill_at_limit_per_period_up_to_limit(buckets: Buckets) -> None:
    """Half a period after the bucket was emptied, half of `limit` tokens are back; after many
    periods no more than `limit` (its stored time is moved back instead of waiting)."""
    transport = buckets.transport()
    key = buckets.key("send")
    assert takes(transport.rate_limiter("send", 4, 100.0), 4) == [0.0] * 4
    buckets.redis.hincrbyfloat(key, "ts", -50.0)  # as if 50 s had passed
    # A new limiter: the first one remembers the bucket was empty and would not ask Redis.
    refilled = takes(transport.rate_limiter("send", 4, 100.0), 3)
    assert refilled[:2] == [0.0, 0.0]
    assert refilled[2] > 0
    buckets.redis.hincrbyfloat(key, "ts", -10_000.0)
    assert takes(transport.rate_limiter("send", 4, 100.0), 5)[4] > 0  # 4 tokens, not 100


def test_limiters_of_one_handler_share_a_bucket_across_transports(buckets: Buckets) -> None:
    """Two transports of the same stream and group (two processes) drain one bucket for a
    handler name."""
    first = buckets.transport().rate_limiter("send", 4, 60.0)
    second = buckets.transport().rate_limiter("send", 4, 60.0)
    assert takes(first, 2) == [0.0, 0.0]
    assert takes(second, 2) == [0.0, 0.0]
    assert first.acquire() > 0
    assert second.acquire() > 0


@pytest.mark.parametrize("other", ["handler", "group", "stream"])
def test_another_handler_group_or_stream_has_its_own_bucket(buckets: Buckets, other: str) -> None:
    """A bucket belongs to one (stream, group, handler): emptying it leaves the others full."""
    drained = buckets.transport().rate_limiter("send", 2, 60.0)
    assert takes(drained, 2) == [0.0, 0.0]
    assert drained.acquire() > 0
    fresh = uuid.uuid4().hex
    if other == "handler":
        limiter = buckets.transport().rate_limiter(f"send-{fresh}", 2, 60.0)
    else:
        limiter = buckets.transport(**{other: fresh}).rate_limiter("send", 2, 60.0)
    assert takes(limiter, 2) == [0.0, 0.0]


def test_limiter_that_found_the_bucket_empty_answers_without_redis_until_the_next_token(
    buckets: Buckets,
) -> None:
    """Once Redis said the next token is t seconds away, the limiter returns the rest of that
    wait itself (no token can appear sooner), so waiting deliveries do not each ask Redis."""
    transport = buckets.transport()
    limiter = transport.rate_limiter("send", 1, 60.0)
    assert limiter.acquire() == 0.0
    first = limiter.acquire()
    buckets.redis.delete(buckets.key("send"))  # a full bucket now; this limiter does not ask
    second = limiter.acquire()
    assert 0 < second <= first
    assert transport.rate_limiter("send", 1, 60.0).acquire() == 0.0


def test_concurrent_acquires_never_take_more_than_limit(buckets: Buckets) -> None:
    """Threads of several transports acquiring at once take exactly `limit` tokens in all: the
    script reads and updates the bucket atomically."""
    limiters = [buckets.transport().rate_limiter("send", 25, 600.0) for _ in range(4)]
    results: list[float] = []
    lock = threading.Lock()
    go = threading.Barrier(8)

    def run(limiter: Any) -> None:
        go.wait()
        got = takes(limiter, 10)
        with lock:
            results.extend(got)

    threads = [threading.Thread(target=run, args=(limiters[n % 4],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 80
    assert results.count(0.0) == 25
    assert all(wait > 0 for wait in results if wait != 0.0)


def test_limiter_works_after_redis_lost_its_scripts(buckets: Buckets) -> None:
    """After SCRIPT FLUSH (a restart, a failover) EVALSHA fails with NOSCRIPT and the limiter
    loads the script again."""
    limiter = buckets.transport().rate_limiter("send", 3, 60.0)
    assert limiter.acquire() == 0.0
    buckets.redis.script_flush()
    assert takes(limiter, 2) == [0.0, 0.0]
    assert limiter.acquire() > 0


# -- arguments and errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "limit", "period", "error", "message"),
    [
        ("send", 0, 1.0, ValueError, "limit must be at least 1"),
        ("send", -5, 1.0, ValueError, "limit must be at least 1"),
        ("send", 2.5, 1.0, TypeError, "limit must be an int"),
        ("send", True, 1.0, TypeError, "limit must be an int"),
        ("send", "5", 1.0, TypeError, "limit must be an int"),
        ("send", 5, 0, ValueError, "period must be a finite number of seconds > 0"),
        ("send", 5, -1.0, ValueError, "period must be a finite number of seconds > 0"),
        ("send", 5, float("nan"), ValueError, "period must be a finite number"),
        ("send", 5, float("inf"), ValueError, "period must be a finite number"),
        ("send", 5, True, ValueError, "period must be a finite number"),
        ("send", 5, "1", ValueError, "period must be a finite number"),
        ("", 5, 1.0, ValueError, "name must be a non-empty str"),
        (None, 5, 1.0, ValueError, "name must be a non-empty str"),
    ],
)
def test_bad_arguments_are_refused(
    buckets: Buckets, name: Any, limit: Any, period: Any, error: type[Exception], message: str
) -> None:
    """rate_limiter() refuses a limit that is not an int >= 1, a period that is not a finite
    number > 0, and an empty handler name, before touching Redis."""
    with pytest.raises(error, match=message):
        buckets.transport().rate_limiter(name, limit, period)
    assert buckets.redis.keys(f"{buckets.stream}:*") == []


def test_acquire_raises_transport_error_when_redis_is_unreachable() -> None:
    """acquire() against a port nobody listens on raises TransportError naming the bucket,
    and the URL's password is not in the message."""
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    transport = RedisStreamsTransport(url, stream="s", group="g", socket_timeout=0.5)
    try:
        limiter = transport.rate_limiter("send", 5, 1.0)
        with pytest.raises(TransportError, match="rate limiter 's:rate:g:send'") as caught:
            limiter.acquire()
    finally:
        transport.close()
    assert "hunter2" not in str(caught.value)
    assert "ConnectionError" in str(caught.value)


def test_acquire_raises_transport_error_when_redis_answers_with_an_error(
    buckets: Buckets,
) -> None:
    """A key of another type under the bucket's name makes the script fail (WRONGTYPE):
    TransportError, not redis-py's own exception."""
    buckets.redis.set(buckets.key("send"), "not a hash")
    limiter = buckets.transport().rate_limiter("send", 5, 1.0)
    with pytest.raises(TransportError, match="WRONGTYPE"):
        limiter.acquire()
