"""The contract every transport keeps, run against each of them: RedisStreamsTransport and
RabbitMQTransport, on real servers (the ``redis_url`` and ``rabbitmq_url`` fixtures of
tests/conftest.py).

One suite, parametrised by kind: the ``kind`` fixture makes transports of one kind that share
a stream (Redis) or exchange (RabbitMQ) of the test's own, and the buses on them. What the
suite checks goes through :class:`~eventbus.EventBus` as an application uses it: producer
buses that only emit, consumer buses that ``start()``. The kind-specific part is kept to a
few helpers: publishing a message no transport could have written, and counting what a group
has left unacknowledged or dead-lettered.

Synchronisation is by ``threading.Event``s set by handlers, ``drain()``, signals, and bounded
polls of the server's state: nothing here sleeps to wait for work.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
import pytest
import redis
import tenacity
from structlog.testing import capture_logs

from eventbus import Event, EventBus, RetryPolicy, TransportError, signals
from eventbus.transports import RabbitMQTransport, RedisStreamsTransport
from eventbus.transports.rabbitmq import routing_key
from eventbus.typing import Transport
from tests.support import waiting as support
from tests.support.net import free_port
from tests.support.waiting import poll_until

pytestmark = pytest.mark.integration

#: Upper bound for waits that normally end at once; only a broken transport waits this long.
WAIT = 15.0

#: Seconds a Redis consumer waits before taking over a stopped consumer's entries: short, so
#: that an event left unsettled at close reaches the next consumer soon.
CLAIM_IDLE = 1.0

#: Seconds within which a transport whose server is unreachable must give up (its timeout is
#: 1 s; publishing may try twice).
UNREACHABLE_BOUND = 5.0


@dataclass(frozen=True)
class OrderPlaced:
    order_id: int
    email: str


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    poll_until(predicate, what, timeout, every=0.02)


class Tally(support.Tally):
    timeout = WAIT


# -- the kinds -------------------------------------------------------------------------------


class Kind:
    """Transports of one kind on one stream/exchange of the test's own, buses on them, and
    the few kind-specific looks at the server; closes all it made."""

    name: str

    def __init__(self, url: str) -> None:
        self.url = url
        self.suffix = uuid.uuid4().hex[:12]
        self.group = f"group-{self.suffix}"
        self._buses: list[EventBus] = []

    def transport(self, group: str | None = None) -> Transport:
        """A transport on the test's stream/exchange, in *group* (default: the test's)."""
        raise NotImplementedError

    def unreachable(self) -> Transport:
        """A transport whose server is not there: a free local port, a 1 s timeout."""
        raise NotImplementedError

    def publish_garbage(self, name: str) -> None:
        """Put a message no transport wrote on the stream/exchange, routed as *name* would be."""
        raise NotImplementedError

    def dead(self, group: str | None = None) -> int:
        """How many messages the group has dead-lettered."""
        raise NotImplementedError

    def left(self, group: str | None = None) -> int:
        """How many messages the group has not acknowledged (read or not); asked while no
        consumer of the group runs."""
        raise NotImplementedError

    def bus(self, group: str | None = None, **options: Any) -> EventBus:
        """A bus on a new transport; closed at the end of the test."""
        options.setdefault("max_workers", 4)
        made = EventBus(transport=self.transport(group), **options)
        self._buses.append(made)
        return made

    def consumer(
        self, handler: Callable[[Event], object], *targets: str | type[Any], **options: Any
    ) -> EventBus:
        """A started bus whose *handler* is subscribed to each of *targets* (default
        ``"tick"``)."""
        group = options.pop("group", None)
        made = self.bus(group, **options)
        for target in targets or ("tick",):
            made.subscribe(target, handler)
        made.start()
        return made

    def close(self) -> None:
        for made in self._buses:
            made.close(timeout=WAIT)


class RedisKind(Kind):
    name = "redis"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.stream = f"contract:{self.suffix}"
        self.redis: Any = redis.Redis.from_url(url)

    def transport(self, group: str | None = None) -> Transport:
        return RedisStreamsTransport(
            self.url,
            stream=self.stream,
            group=group or self.group,
            claim_idle=CLAIM_IDLE,
            block=0.05,
        )

    def unreachable(self) -> Transport:
        return RedisStreamsTransport(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1.0)

    def publish_garbage(self, name: str) -> None:
        self.redis.xadd(self.stream, {"garbage": b"\xff\xfe not an event", "name": name})

    def dead(self, group: str | None = None) -> int:
        dead_stream = f"{self.stream}:dead"
        entries = self.redis.xrange(dead_stream)
        return sum(
            1 for _id, fields in entries if fields[b"group"] == (group or self.group).encode()
        )

    def left(self, group: str | None = None) -> int:
        [info] = [
            g
            for g in self.redis.xinfo_groups(self.stream)
            if g["name"] == (group or self.group).encode()
        ]
        return int(info["pending"]) + int(info["lag"] or 0)

    def close(self) -> None:
        super().close()
        self.redis.close()


class RabbitMQKind(Kind):
    name = "rabbitmq"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.exchange = f"contract-{self.suffix}"

    def transport(self, group: str | None = None) -> Transport:
        return RabbitMQTransport(self.url, exchange=self.exchange, group=group or self.group)

    def unreachable(self) -> Transport:
        return RabbitMQTransport(f"amqp://guest:guest@127.0.0.1:{free_port()}/", timeout=1.0)

    def publish_garbage(self, name: str) -> None:
        with pika.BlockingConnection(pika.URLParameters(self.url)) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(self.exchange, routing_key(name), b"not json")

    def _count(self, queue: str) -> int:
        with pika.BlockingConnection(pika.URLParameters(self.url)) as connection:
            try:
                declared = connection.channel().queue_declare(queue, passive=True)
            except pika.exceptions.ChannelClosedByBroker as error:
                if error.reply_code != 404:
                    raise
                return 0
        return int(declared.method.message_count)

    def dead(self, group: str | None = None) -> int:
        return self._count(f"{self.exchange}.{group or self.group}.dead")

    def left(self, group: str | None = None) -> int:
        return self._count(f"{self.exchange}.{group or self.group}")


@pytest.fixture(params=["redis", "rabbitmq"])
def kind(request: pytest.FixtureRequest) -> Iterator[Kind]:
    """Each test runs once per transport kind (a kind's server missing skips only its half)."""
    made: Kind
    if request.param == "redis":
        made = RedisKind(request.getfixturevalue("redis_url"))
    else:
        made = RabbitMQKind(request.getfixturevalue("rabbitmq_url"))
    try:
        yield made
    finally:
        made.close()


# -- publishing and receiving ----------------------------------------------------------------


def test_event_arrives_with_its_id_name_payload_and_metadata(kind: Kind) -> None:
    """emit() returns the published event; a consumer receives it with the same id, name,
    payload, metadata and time."""
    received = Tally()
    kind.consumer(received)
    sent = kind.bus().emit("tick", {"n": 7, "tags": ["a", "b"]}, metadata={"request_id": "r1"})
    assert isinstance(sent, Event)
    received.wait("the consumer got the event")
    [got] = received.events
    assert (got.id, got.name, got.payload) == (sent.id, "tick", {"n": 7, "tags": ["a", "b"]})
    assert got.metadata == {"request_id": "r1"}
    assert got.occurred_at == sent.occurred_at


def test_dataclass_event_arrives_as_an_equal_instance(kind: Kind) -> None:
    """A dataclass payload, its class subscribed (so registered with the consumer's codec),
    reaches the handler as an equal instance under the event's id."""
    received = Tally()
    kind.consumer(received, OrderPlaced)
    sent = kind.bus().emit(OrderPlaced(order_id=5, email="a@example.com"))
    received.wait("the typed event was delivered")
    [got] = received.events
    assert got.payload == OrderPlaced(order_id=5, email="a@example.com")
    assert got.id == sent.id
    assert kind.dead() == 0


# -- groups ----------------------------------------------------------------------------------


def test_competing_consumers_handle_each_event_once_in_total(kind: Kind) -> None:
    """Two consumers of one group share 200 events: each is handled exactly once."""
    total = 200
    lock = threading.Lock()
    handled: Counter[str] = Counter()
    all_in = threading.Event()

    def count(event: Event) -> None:
        with lock:
            handled[event.id] += 1
            if sum(handled.values()) >= total:
                all_in.set()

    consumers = [kind.consumer(count), kind.consumer(count)]
    producer = kind.bus()
    sent = {producer.emit("tick", {"n": n}).id for n in range(total)}
    assert all_in.wait(WAIT), f"only {sum(handled.values())} of {total} handled"
    for consumer in consumers:
        assert consumer.drain(WAIT)
        consumer.close(timeout=WAIT)
    assert set(handled) == sent
    assert max(handled.values()) == 1
    wait_until(lambda: kind.left() == 0, "every event was acknowledged")


def test_every_group_gets_every_event(kind: Kind) -> None:
    """Two groups each receive all of the events (fan-out)."""
    tallies = [Tally(expected=10), Tally(expected=10)]
    for group, tally in zip([kind.group, f"{kind.group}-other"], tallies, strict=True):
        kind.consumer(tally, group=group)
    producer = kind.bus()
    sent = [producer.emit("tick", {"n": n}).id for n in range(10)]
    for tally in tallies:
        tally.wait("a group got all 10 events")
    assert [sorted(t.ids) for t in tallies] == [sorted(sent), sorted(sent)]


# -- acknowledgement -------------------------------------------------------------------------


def test_settled_events_are_not_delivered_again_to_the_next_consumer(kind: Kind) -> None:
    """Events a consumer handled before it closed are acknowledged: the group has nothing
    left, and the next consumer of the group gets only what is published afterwards."""
    first = Tally(expected=20)
    consumer = kind.consumer(first)
    producer = kind.bus()
    for n in range(20):
        producer.emit("tick", {"n": n})
    first.wait("the first consumer handled all 20")
    assert consumer.drain(WAIT)
    consumer.close(timeout=WAIT)
    assert kind.left() == 0
    second = Tally()
    later = kind.consumer(second)
    marker = producer.emit("tick", {"n": "marker"})
    second.wait("the next consumer got the marker")
    assert later.drain(WAIT)
    assert second.ids == [marker.id]


def test_event_not_settled_at_close_goes_to_the_next_consumer(kind: Kind) -> None:
    """A delivery still waiting for its retry (an hour's backoff) when its consumer closes is
    not acknowledged: the next consumer of the group receives the event."""
    scheduled = threading.Event()

    def failing(event: Event) -> None:
        raise RuntimeError("try again in an hour")

    def on_retry_scheduled(sender: object, **details: Any) -> None:
        scheduled.set()

    hourly = RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(3600))
    quitter = kind.bus(retry=hourly)
    quitter.subscribe("tick", failing)
    signals.retry_scheduled.connect(on_retry_scheduled, sender=quitter)
    try:
        quitter.start()
        sent = kind.bus().emit("tick", {"n": 1})
        assert scheduled.wait(WAIT), "the failed delivery was never scheduled for a retry"
    finally:
        signals.retry_scheduled.disconnect(on_retry_scheduled, sender=quitter)
    with capture_logs() as logs:
        quitter.close(timeout=WAIT)
    assert [log["event_id"] for log in logs if log["event"] == "handler.left_in_stream"] == [
        sent.id
    ]
    received = Tally()
    kind.consumer(received)
    received.wait("the next consumer got the event left unsettled")
    [got] = received.events
    assert (got.id, got.payload) == (sent.id, {"n": 1})


# -- delayed events --------------------------------------------------------------------------


def test_delayed_event_reaches_the_handler_no_earlier_than_the_delay(kind: Kind) -> None:
    """emit(..., delay=0.3) is handled 0.3 s after the emit at the earliest."""
    received = Tally()
    kind.consumer(received)
    emitted_at = time.time()
    sent = kind.bus().emit("tick", {"n": 1}, delay=0.3)
    received.wait("the delayed event was delivered")
    assert received.ids == [sent.id]
    # Wall-clock readings of one machine; 10 ms of slack for the clock's resolution.
    assert received.times[0] - emitted_at >= 0.3 - 0.01


# -- refused and damaged messages ------------------------------------------------------------


def test_unencodable_payload_raises_type_error_and_publishes_nothing(kind: Kind) -> None:
    """emit() of a payload the codec cannot encode raises TypeError before anything is
    published: the consumer gets only the event emitted next."""
    received = Tally()
    consumer = kind.consumer(received)
    producer = kind.bus()
    with pytest.raises(TypeError):
        producer.emit("tick", {"n": object()})
    good = producer.emit("tick", {"n": 2})
    received.wait("the good event was delivered")
    assert consumer.drain(WAIT)
    assert received.ids == [good.id]
    assert kind.dead() == 0


def test_undecodable_message_is_dead_lettered_reported_and_skipped(kind: Kind) -> None:
    """A message no transport wrote is dead-lettered and logged (stream.dead_lettered), and
    the consumer goes on to the next good event."""
    received = Tally()
    with capture_logs() as logs:
        consumer = kind.consumer(received)
        kind.publish_garbage("tick")
        good = kind.bus().emit("tick", {"n": 2})
        received.wait("the good event after the bad message was delivered")
        assert consumer.drain(WAIT)
        wait_until(
            lambda: any(log["event"] == "stream.dead_lettered" for log in logs),
            "the dead-lettered message was logged",
        )
    assert received.ids == [good.id]
    [dead] = [log for log in logs if log["event"] == "stream.dead_lettered"]
    assert dead["reason"].startswith("cannot decode")
    assert dead["log_level"] == "error"
    wait_until(lambda: kind.dead() == 1, "the bad message was in the dead letters")
    consumer.close(timeout=WAIT)
    assert kind.left() == 0


# -- an unreachable server -------------------------------------------------------------------


def test_unreachable_server_makes_emit_and_start_raise_transport_error(kind: Kind) -> None:
    """With nothing listening where the transport points, emit() and start() raise
    TransportError, each within a bounded time."""
    producer = EventBus(transport=kind.unreachable(), max_workers=1)
    consumer = EventBus(transport=kind.unreachable(), max_workers=1)
    try:
        began = time.monotonic()
        with pytest.raises(TransportError):
            producer.emit("tick", {"n": 1})
        assert time.monotonic() - began < UNREACHABLE_BOUND
        consumer.subscribe("tick", Tally())
        began = time.monotonic()
        with pytest.raises(TransportError):
            consumer.start()
        assert time.monotonic() - began < UNREACHABLE_BOUND
    finally:
        producer.close(timeout=WAIT)
        consumer.close(timeout=WAIT)
