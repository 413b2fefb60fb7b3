"""RabbitMQTransport: what is particular to it (tests/test_transport_contract.py holds what
every transport does). Routing and binding keys and option checks are pure and need no
server; the rest runs against real RabbitMQ nodes (the ``rabbitmq_url`` and ``own_rabbitmq``
fixtures of tests/conftest.py, started by tests/support/rabbitmq.py): routing by
subscription, the ``<exchange>.unrouted`` queue, the delivery limit and the dead-letter
queue, credentials kept out of reprs and errors, a broker restart, and publishing while the
broker is down.

Every test gets its own exchange and group names. Synchronisation is by
``threading.Event``s set by handlers, ``drain()``, and bounded polls of queue lengths and
of captured log records: nothing here sleeps to wait for work.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions
import pytest
from structlog.testing import capture_logs

from eventbus import Event, EventBus, TransportError
from eventbus.transports import RabbitMQTransport
from eventbus.transports.rabbitmq import binding_key, routing_key
from tests.support import waiting as support
from tests.support.net import free_port
from tests.support.rabbitmq import RabbitMQServer
from tests.support.waiting import poll_until

#: Upper bound for waits that normally end at once; only a broken transport waits this long.
WAIT = 15.0

#: A password that must never show in a repr or an error message.
SECRET = "s3cret-Pa55"


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    poll_until(predicate, what, timeout, every=0.02)


class Tally(support.Tally):
    timeout = WAIT


class Broker:
    """One test's exchange and group on a RabbitMQ node, buses on it, and direct looks at
    its queues (pika); closes what it made."""

    def __init__(self, url: str) -> None:
        self.url = url
        suffix = uuid.uuid4().hex[:12]
        self.exchange = f"test-{suffix}"
        self.group = f"group-{suffix}"
        self.queue = f"{self.exchange}.{self.group}"
        self.dead_queue = f"{self.queue}.dead"
        self.unrouted = f"{self.exchange}.unrouted"
        self._buses: list[EventBus] = []

    def bus(self, **options: Any) -> EventBus:
        """A bus (two workers) on a new transport of this exchange and group, with transport
        *options*; closed at the end."""
        options.setdefault("group", self.group)
        transport = RabbitMQTransport(self.url, exchange=self.exchange, **options)
        made = EventBus(transport=transport, max_workers=2)
        self._buses.append(made)
        return made

    def consumer(
        self, handler: Callable[[Event], object], *targets: str, **options: Any
    ) -> EventBus:
        """A started bus whose *handler* is subscribed to each of *targets*."""
        made = self.bus(**options)
        for target in targets:
            made.subscribe(target, handler)
        made.start()
        return made

    def connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.URLParameters(self.url))

    def count(self, queue: str) -> int:
        """Messages ready in *queue* (not those a consumer holds unacknowledged)."""
        with self.connect() as connection:
            declared = connection.channel().queue_declare(queue, passive=True)
        return int(declared.method.message_count)

    def take_all(self, queue: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Every message of *queue*, taken off it: (JSON body, headers) each."""
        taken: list[tuple[dict[str, Any], dict[str, Any]]] = []
        with self.connect() as connection:
            channel = connection.channel()
            while True:
                _method, properties, body = channel.basic_get(queue, auto_ack=True)
                if body is None:
                    return taken
                taken.append((json.loads(body), properties.headers or {}))

    def close(self) -> None:
        for made in self._buses:
            made.close(timeout=WAIT)


@pytest.fixture
def broker(rabbitmq_url: str) -> Iterator[Broker]:
    """Fresh exchange and group names on the session's node."""
    made = Broker(rabbitmq_url)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def own_broker(own_rabbitmq: RabbitMQServer) -> Iterator[Broker]:
    """Exchange and group names on the test's own node, which it may stop or kill."""
    made = Broker(own_rabbitmq.url)
    try:
        yield made
    finally:
        made.close()


# -- routing and binding keys (no server) ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("tick", "tick"),
        ("order:placed", "order.placed"),
        ("billing:invoice.paid", "billing.invoice%paid"),
        ("a.b:c.d:e", "a%b.c%d.e"),
        ("order-v2:placed_now", "order-v2.placed_now"),
    ],
)
def test_routing_key_makes_segments_words(name: str, key: str) -> None:
    """Each ":" separated segment becomes one word; a "." inside a segment is written "%"."""
    assert routing_key(name) == key


@pytest.mark.parametrize(
    ("pattern", "key"),
    [
        ("order:placed", "order.placed"),
        ("order:*", "order.*"),
        ("*:placed", "*.placed"),
        ("order:**", "order.#"),
        ("**", "#"),
        ("a:*:**", "a.*.#"),
        ("billing:invoice.paid", "billing.invoice%paid"),
        ("billing.v2:*", "billing%v2.*"),
    ],
)
def test_binding_key_maps_wildcards_to_amqp(pattern: str, key: str) -> None:
    """``*`` stays AMQP's one-word ``*``, ``**`` becomes ``#``, "." in a segment "%"."""
    assert binding_key(pattern) == key


def test_a_dot_in_a_segment_keeps_names_apart() -> None:
    """'a:b.c' and 'a:b:c' are different events, so their routing keys differ too."""
    assert routing_key("billing:invoice.paid") != routing_key("billing:invoice:paid")


# -- options (no server) ---------------------------------------------------------------------


URL = f"amqp://app:{SECRET}@127.0.0.1:5672/%2F"


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"exchange": ""}, ValueError, "exchange must be a non-empty str"),
        ({"exchange": 3}, ValueError, "exchange must be a non-empty str"),
        ({"exchange": "x" * 250}, ValueError, "longer than AMQP's 255 bytes"),
        ({"group": ""}, ValueError, "group must be a non-empty str"),
        ({"group": None}, ValueError, "group must be a non-empty str"),
        ({"prefetch": 0}, ValueError, "prefetch must be an int of at least 1"),
        ({"prefetch": True}, ValueError, "prefetch must be an int of at least 1"),
        ({"prefetch": 1.0}, ValueError, "prefetch must be an int of at least 1"),
        ({"max_deliveries": 0}, ValueError, "max_deliveries must be an int of at least 1"),
        ({"max_deliveries": "5"}, ValueError, "max_deliveries must be an int of at least 1"),
        ({"timeout": 0}, ValueError, "timeout must be a finite number of seconds > 0"),
        ({"timeout": -1.0}, ValueError, "timeout must be a finite number of seconds > 0"),
        ({"timeout": math.inf}, ValueError, "timeout must be a finite number of seconds > 0"),
        ({"timeout": math.nan}, ValueError, "timeout must be a finite number of seconds > 0"),
        ({"timeout": True}, ValueError, "timeout must be a finite number of seconds > 0"),
        ({"timeout": "10"}, ValueError, "timeout must be a finite number of seconds > 0"),
        ({"heartbeat": -1}, ValueError, "heartbeat"),
        ({"heartbeat": "30"}, TypeError, "heartbeat"),
    ],
)
def test_invalid_options_are_refused(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Each invalid option is refused when the transport is made, naming the option, never
    showing the password."""
    with pytest.raises(error, match=match) as caught:
        RabbitMQTransport(URL, **options)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "options",
    [{"exchange": "e" * 200, "group": "g" * 200}, {"exchange": "\u00e9" * 150}],
    ids=["long-together", "non-ascii"],
)
def test_names_too_long_for_amqp_are_refused_when_made(options: dict[str, Any]) -> None:
    """Each queue and exchange name the transport derives must fit in 255 bytes."""
    with pytest.raises(ValueError, match=r"(?i)too long|255|bytes"):
        RabbitMQTransport(URL, **options)


def test_url_that_is_not_a_str_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="url must be a str"):
        RabbitMQTransport(b"amqp://localhost/")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        f"amqp://app:{SECRET}@127.0.0.1/?bogus=1",
        f"amqp://app:{SECRET}@127.0.0.1/?heartbeat=often",
        f"amqp://app:{SECRET}@127.0.0.1/?socket_timeout=-1",
        f"amqp://app:{SECRET}@127.0.0.1:notaport/",
    ],
)
def test_bad_url_is_a_value_error_without_the_password(url: str) -> None:
    with pytest.raises(ValueError, match=r"not an AMQP URL|Port") as caught:
        RabbitMQTransport(url)
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value.__context__)
    assert SECRET not in repr(caught.value.__cause__)


def test_repr_shows_where_without_the_password() -> None:
    transport = RabbitMQTransport(URL, exchange="orders", group="email")
    shown = repr(transport)
    assert SECRET not in shown
    assert "app:***@127.0.0.1:5672" in shown
    assert "exchange='orders'" in shown
    assert "group='email'" in shown


def test_repr_of_an_ipv6_url_keeps_the_brackets() -> None:
    transport = RabbitMQTransport(f"amqp://app:{SECRET}@[::1]:5672/")
    assert "app:***@[::1]:5672" in repr(transport)


def test_names_of_the_queues_follow_exchange_and_group() -> None:
    transport = RabbitMQTransport(URL, exchange="orders", group="email")
    assert transport.queue == "orders.email"
    assert transport.dead_exchange == "orders.email.dlx"
    assert transport.dead_queue == "orders.email.dead"
    assert transport.unrouted == "orders.unrouted"


# -- errors keep the password out (real servers) ---------------------------------------------


@pytest.mark.integration
def test_errors_of_an_unreachable_broker_do_not_show_the_password() -> None:
    """Publishing to, consuming from and pinging a broker that is not there raise
    TransportError naming where, without the password."""
    url = f"amqp://app:{SECRET}@127.0.0.1:{free_port()}/%2F"
    producer = EventBus(transport=RabbitMQTransport(url, timeout=1.0), max_workers=1)
    consumer = EventBus(transport=RabbitMQTransport(url, timeout=1.0), max_workers=1)
    try:
        errors = []
        with pytest.raises(TransportError) as caught:
            producer.emit("tick", {"n": 1})
        errors.append(caught.value)
        consumer.subscribe("tick", Tally())
        with pytest.raises(TransportError) as caught:
            consumer.start()
        errors.append(caught.value)
        with pytest.raises(TransportError) as caught:
            RabbitMQTransport(url, timeout=1.0).ping()
        errors.append(caught.value)
    finally:
        producer.close(timeout=WAIT)
        consumer.close(timeout=WAIT)
    for error in errors:
        assert SECRET not in str(error)
        assert "app:***@127.0.0.1" in str(error)


@pytest.mark.integration
def test_a_wrong_password_is_a_transport_error_that_does_not_show_it(rabbitmq_url: str) -> None:
    """A broker that refuses the login: TransportError, without the password tried."""
    url = rabbitmq_url.replace("guest:guest@", f"guest:{SECRET}@")
    assert SECRET in url
    transport = RabbitMQTransport(url, exchange=f"test-{uuid.uuid4().hex[:12]}", timeout=5.0)
    producer = EventBus(transport=transport, max_workers=1)
    try:
        with pytest.raises(TransportError) as caught:
            producer.emit("tick", {"n": 1})
        assert SECRET not in str(caught.value)
        with pytest.raises(TransportError) as pinged:
            transport.ping()
        assert SECRET not in str(pinged.value)
    finally:
        producer.close(timeout=WAIT)


# -- routing by subscription -----------------------------------------------------------------


@pytest.mark.integration
def test_group_queue_is_bound_only_for_what_its_bus_subscribes_to(broker: Broker) -> None:
    """The group's queue gets the names and patterns its handlers subscribe to; an event no
    group is bound for is kept in <exchange>.unrouted, not lost and not in the group's queue."""
    received = Tally(expected=3)
    consumer = broker.consumer(received, "order:*", "billing:invoice.paid")
    producer = broker.bus()
    wanted = [
        producer.emit("order:placed", {"n": 1}),
        producer.emit("billing:invoice.paid", {"n": 2}),
        producer.emit("order:shipped", {"n": 3}),
    ]
    unwanted = [
        producer.emit("order:placed:late", {"n": 4}),  # "*" is one segment only
        producer.emit("billing:invoice:paid", {"n": 5}),  # not "billing:invoice.paid"
        producer.emit("invoice:paid", {"n": 6}),
    ]
    received.wait("the subscribed events were delivered")
    assert consumer.drain(WAIT)
    consumer.close(timeout=WAIT)
    assert sorted(received.ids) == sorted(e.id for e in wanted)
    assert broker.count(broker.queue) == 0
    kept = broker.take_all(broker.unrouted)
    assert sorted((body["id"], body["name"]) for body, _headers in kept) == sorted(
        (e.id, e.name) for e in unwanted
    )


@pytest.mark.integration
def test_event_of_another_name_is_not_delivered_to_the_group(broker: Broker) -> None:
    """A group bound for one name receives nothing of another, which another group bound for
    it receives; the unrouted queue stays empty."""
    orders, invoices = Tally(), Tally()
    broker.consumer(orders, "order:placed")
    broker.consumer(invoices, "invoice:paid", group=f"{broker.group}-billing")
    producer = broker.bus()
    paid = producer.emit("invoice:paid", {"n": 1})
    invoices.wait("the billing group got its event")
    placed = producer.emit("order:placed", {"n": 2})
    orders.wait("the orders group got its event")
    assert orders.ids == [placed.id]
    assert invoices.ids == [paid.id]
    assert broker.count(broker.unrouted) == 0


# -- the delivery limit ----------------------------------------------------------------------


def _die_holding(broker: Broker) -> tuple[dict[str, Any], dict[str, Any]]:
    """A consumer of the group's queue that receives one message and dies (its connection
    closes) without acknowledging it: (JSON body, headers) of what it held."""
    connection = broker.connect()
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        for _method, properties, body in channel.consume(broker.queue, inactivity_timeout=WAIT):
            assert body is not None, f"nothing delivered within {WAIT}s"
            return json.loads(body), properties.headers or {}
        raise AssertionError("the consumer generator ended")
    finally:
        connection.close()


@pytest.mark.integration
def test_message_whose_consumers_die_max_deliveries_times_is_dead_lettered(broker: Broker) -> None:
    """A message delivered max_deliveries times, each consumer dying with it unacknowledged,
    goes to <exchange>.<group>.dead (the broker's reason: delivery_limit), not to a fourth."""
    max_deliveries = 3
    declaring = broker.consumer(Tally(), "tick", max_deliveries=max_deliveries)
    declaring.close(timeout=WAIT)  # the queue, its limit and its dead-letter queue: declared
    sent = broker.bus().emit("tick", {"n": 1})
    for delivery in range(1, max_deliveries + 1):
        body, _headers = _die_holding(broker)
        assert body["id"] == sent.id, f"delivery {delivery} was of another message"
    wait_until(lambda: broker.count(broker.dead_queue) == 1, "the message was dead-lettered")
    assert broker.count(broker.queue) == 0
    [(body, headers)] = broker.take_all(broker.dead_queue)
    assert body["id"] == sent.id
    deaths = headers.get("x-death")
    if deaths is not None:
        assert deaths[0]["reason"] == "delivery_limit"
        assert deaths[0]["queue"] == broker.queue


@pytest.mark.integration
def test_consumer_bus_skips_a_message_dead_lettered_for_its_deliveries(broker: Broker) -> None:
    """After a poison message was dead-lettered by the delivery limit, a consumer bus of the
    group gets only the events after it."""
    declaring = broker.consumer(Tally(), "tick", max_deliveries=1)
    declaring.close(timeout=WAIT)
    producer = broker.bus()
    producer.emit("tick", {"n": "poison"})
    _die_holding(broker)
    wait_until(lambda: broker.count(broker.dead_queue) == 1, "the message was dead-lettered")
    received = Tally()
    consumer = broker.consumer(received, "tick", max_deliveries=1)
    later = producer.emit("tick", {"n": 2})
    received.wait("the later event was delivered")
    assert consumer.drain(WAIT)
    assert received.ids == [later.id]


# -- losing the broker -----------------------------------------------------------------------


@pytest.mark.integration
def test_broker_restart_emit_fails_while_down_and_the_consumer_resumes(
    own_rabbitmq: RabbitMQServer, own_broker: Broker
) -> None:
    """The broker stops and comes back (same port, same data). Meanwhile emit() raises
    TransportError within ``timeout``, and that event is never published; the consumer logs
    the lost connection (eventbus.internal_error), reconnects, and delivers what is
    published after the restart. One test: each restart of a node costs about 5 s.

    (A clean stop: after kill(), RabbitMQ 3.10 may never restart a quorum queue declared
    moments before the crash, and then serves nothing of it.)"""
    timeout = 2.0
    received = Tally(expected=2)
    own_broker.consumer(received, "tick", timeout=timeout)
    producer = own_broker.bus(timeout=timeout)
    first = producer.emit("tick", {"n": 1})
    wait_until(lambda: received.ids == [first.id], "the first event was delivered")
    with capture_logs() as logs:
        own_rabbitmq.stop()
        began = time.monotonic()
        with pytest.raises(TransportError) as caught:
            producer.emit("tick", {"n": "lost"})
        elapsed = time.monotonic() - began
        wait_until(
            lambda: any(log["event"] == "eventbus.internal_error" for log in logs),
            "the consumer reported the lost connection",
        )
        own_rabbitmq.start()
        second = producer.emit("tick", {"n": 2})
        # The consumer retries with a backoff growing to 5 s: it is back within about that.
        received.wait("the event published after the restart was delivered")
        consumer_errors = [log for log in logs if log["event"] == "eventbus.internal_error"]
    assert elapsed < timeout, f"emit() took {elapsed:.2f}s to give up on a stopped broker"
    assert isinstance(caught.value, RuntimeError)
    assert "guest:***@" in str(caught.value)
    assert {log["where"] for log in consumer_errors} == {"transport"}
    own_broker.close()  # the consumer acknowledged all it got; nothing else is queued
    assert received.ids == [first.id, second.id]
    assert own_broker.count(own_broker.queue) == 0
    assert own_broker.count(own_broker.unrouted) == 0


@pytest.mark.integration
def test_publish_to_a_broker_that_does_not_answer_gives_up_within_the_timeout(
    own_rabbitmq: RabbitMQServer, own_broker: Broker
) -> None:
    """emit() to a broker that accepts the bytes but never answers (the node paused with
    SIGSTOP) raises TransportError within ``2 * timeout`` (the publish, then one try on a new
    connection) instead of waiting for the confirm for as long as the broker is silent."""
    timeout = 1.0
    bound = 2 * timeout + 1.0
    producer = own_broker.bus(timeout=timeout)
    producer.emit("tick", {"n": 1})  # connected, with publisher confirms
    node = own_rabbitmq.pid
    assert node is not None
    outcome: dict[str, Any] = {}
    returned = threading.Event()

    def publish() -> None:
        began = time.monotonic()
        try:
            producer.emit("tick", {"n": 2})
            outcome["result"] = "published"
        except TransportError as error:
            outcome["result"] = error
        outcome["elapsed"] = time.monotonic() - began
        returned.set()

    publisher = threading.Thread(target=publish, name="test-publisher")
    os.kill(node, signal.SIGSTOP)
    try:
        publisher.start()
        gave_up = returned.wait(bound)
    finally:
        os.kill(node, signal.SIGCONT)  # (a publisher still waiting would get its confirm)
        publisher.join(WAIT)
    assert gave_up, f"emit() still waiting {bound}s into the broker's silence; then {outcome}"
    assert isinstance(outcome["result"], TransportError), outcome
    assert outcome["elapsed"] >= timeout  # it did wait for the confirm first


@pytest.mark.integration
def test_close_while_the_broker_does_not_answer_returns_within_a_bound(
    own_rabbitmq: RabbitMQServer, own_broker: Broker
) -> None:
    """A producer bus closes within a bound while its broker is paused (SIGSTOP): closing a
    connection nobody answers must not wait for the broker."""
    timeout = 1.0
    bound = 2 * timeout + 1.0
    producer = own_broker.bus(timeout=timeout)
    producer.emit("tick", {"n": 1})  # the publisher's connection is open
    node = own_rabbitmq.pid
    assert node is not None
    closed = threading.Event()

    def close() -> None:
        producer.close(timeout=timeout)
        closed.set()

    closer = threading.Thread(target=close, name="test-closer")
    os.kill(node, signal.SIGSTOP)
    try:
        closer.start()
        in_time = closed.wait(bound)
    finally:
        os.kill(node, signal.SIGCONT)  # the Close-Ok comes now, and close() returns
        closer.join(WAIT)
    assert in_time, f"close() still waiting for the broker {bound}s into its silence"
