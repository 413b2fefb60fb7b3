"""A handler's rate_limit holds across the consumer processes of a Redis Streams group.

Three processes running tests/support/rate_consumer.py share one group on a redis-server of
the test's own, each with 4 workers and one handler limited to 50 calls per second; each call
prints its wall-clock start time. The test publishes 200 events at once and checks the starts
of all processes together: the shared bucket allows a burst of up to 50, then 50 per second.
This test measures time by design: it waits for the processes' lines, which come at the
limited rate.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import pytest

from eventbus import Event
from eventbus.transports import RedisStreamsTransport
from tests.support.children import ChildProcess, Children
from tests.support.redis import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess]

CONSUMERS = 3
WORKERS = 4
LIMIT = 50  # per second, the handler's rate_limit="50/s"
EVENTS = 200
#: Relative tolerance of the measured rate.
TOLERANCE = 0.10
#: Bound on waiting for every call: 200 calls at 50/s take 3 s after the burst.
CALLS_WAIT = 30.0


class Starts:
    """The ``call <time> <event id>`` lines of every consumer, gathered as they are read."""

    def __init__(self, expected: int) -> None:
        self._expected = expected
        self._lock = threading.Lock()
        self.calls: list[tuple[float, str, str]] = []  # (start time, event id, consumer)
        self.done = threading.Event()

    def reader(self, consumer: str) -> Callable[[str], None]:
        def on_line(line: str) -> None:
            if not line.startswith("call "):
                return
            _call, started, event_id = line.split()
            with self._lock:
                self.calls.append((float(started), event_id, consumer))
                if len(self.calls) >= self._expected:
                    self.done.set()

        return on_line

    def snapshot(self) -> list[tuple[float, str, str]]:
        with self._lock:
            return sorted(self.calls)


@pytest.fixture
def names() -> tuple[str, str]:
    suffix = uuid.uuid4().hex
    return f"jobs:{suffix}", f"rated:{suffix}"


@pytest.fixture
def producer(own_redis: RedisServer, names: tuple[str, str]) -> Iterator[RedisStreamsTransport]:
    stream, group = names
    transport = RedisStreamsTransport(own_redis.url, stream=stream, group=group)
    yield transport
    transport.close()


def most_in_a_window(times: list[float], width: float) -> int:
    """The most of the sorted *times* that fall in any half-open window ``[t, t + width)``
    starting at one of them."""
    most, end = 0, 0
    for start, first in enumerate(times):
        while end < len(times) and times[end] < first + width:
            end += 1
        most = max(most, end - start)
    return most


@pytest.mark.timeout(120)
def test_rate_limit_holds_across_three_consumer_processes(
    own_redis: RedisServer,
    children: Children,
    names: tuple[str, str],
    producer: RedisStreamsTransport,
) -> None:
    """200 events through 3 consumers of one group, handler rate_limit="50/s": after the
    burst of up to 50, any 1-second window holds at most 55 starts (50 + 10%) and the rest
    run at 50/s within 10%; no stretch of time, burst included, holds more than 50 + 50/s
    (+10%) starts; whichever processes they ran in."""
    stream, group = names
    starts = Starts(EVENTS)
    consumers: list[ChildProcess] = []
    for n in range(CONSUMERS):
        name = f"consumer-{n}"
        consumers.append(
            children.script(
                "rate_consumer",
                *("--url", own_redis.url, "--stream", stream, "--group", group),
                *("--consumer", name, "--workers", str(WORKERS), "--rate", f"{LIMIT}/s"),
                name=name,
                on_line=starts.reader(name),
            )
        )
    for consumer in consumers:
        consumer.expect("ready")

    published = [Event(id=f"job-{n}", name="job", payload={"n": n}) for n in range(EVENTS)]
    for event in published:
        producer.publish(event)
    assert starts.done.wait(CALLS_WAIT), (
        f"{len(starts.snapshot())} of {EVENTS} calls within {CALLS_WAIT} s: "
        + "; ".join(f"{c.name}: {c.output()}" for c in consumers)
    )
    for consumer in consumers:
        consumer.stop()

    calls = starts.snapshot()
    times = [started for started, _id, _who in calls]
    per_consumer = {c.name: sum(who == c.name for *_rest, who in calls) for c in consumers}
    assert sorted(event_id for _t, event_id, _who in calls) == sorted(e.id for e in published)

    burst = sum(t < times[0] + 0.1 for t in times)  # the bucket's 50, and 5 more at 50/s
    after_burst = times[LIMIT:]
    window_most = most_in_a_window(after_burst, 1.0)
    rest_duration = times[-1] - times[LIMIT - 1]
    rest_rate = (EVENTS - LIMIT) / rest_duration
    print(  # shown with -s or on failure
        f"\nstarts per consumer {per_consumer}; {burst} in the first 0.1 s; at most "
        f"{window_most} starts in 1 s after the first {LIMIT}; the other {EVENTS - LIMIT} in "
        f"{rest_duration:.3f} s: {rest_rate:.1f}/s; all {EVENTS} in {times[-1] - times[0]:.3f} s"
    )

    assert window_most <= LIMIT * (1 + TOLERANCE), (
        f"{window_most} starts in one second after the burst, more than "
        f"{LIMIT * (1 + TOLERANCE):.0f}"
    )
    assert LIMIT * (1 - TOLERANCE) <= rest_rate <= LIMIT * (1 + TOLERANCE), (
        f"after the burst {rest_rate:.1f} starts/s, not {LIMIT}/s within {TOLERANCE:.0%}"
    )
    # The bucket's bound over every stretch of time: at most LIMIT + LIMIT * seconds starts.
    for width in (0.5, 1.0, 2.0):
        most = most_in_a_window(times, width)
        assert most <= LIMIT + LIMIT * width * (1 + TOLERANCE), (
            f"{most} starts within {width} s, more than the bucket allows"
        )
    assert sum(1 for count in per_consumer.values() if count) >= 2, (
        f"the calls did not spread over the processes: {per_consumer}"
    )
