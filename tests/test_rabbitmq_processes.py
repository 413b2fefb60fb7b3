"""RabbitMQTransport across real processes: consumers SIGKILLed, the broker killed and
restarted, messages that cannot be decoded or that crash their handler.

Consumers run tests/support/rabbitmq_worker.py on a real RabbitMQ node; the test reads the
lines they print (``got <id>``, ``handled <id> <n>``, ``poison <id>``, ``dead <id> <reason>``)
as they come, on its reader threads, into a :class:`Ledger`, so that lost events and duplicates
are counted from what each process did. The events are published from this process by an
EventBus producer. Waiting is on those lines (a condition, bounded), or, for what only the
broker knows (a dead-letter queue's depth), a bounded poll of the broker.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions
import pytest

from eventbus import Event, EventBus, TransportError
from eventbus.transports.rabbitmq import RabbitMQTransport, routing_key
from tests.support.children import ChildProcess, Children
from tests.support.rabbitmq import RabbitMQServer
from tests.support.waiting import poll_until

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess]

GROUP = "g"
#: Bound on any one wait for the consumers' progress; only a broken transport waits this long.
WAIT = 30.0


# -- what the consumers did --------------------------------------------------------------------


class Ledger:
    """The progress lines of every consumer, by event id, fed by their reader threads."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        #: event id -> the consumers that handled it, once per call, in order.
        self.handled: dict[str, list[str]] = {}
        #: (event id, consumer) -> when that consumer's first call was read.
        self.handled_at: dict[tuple[str, str], float] = {}
        #: event id -> its payload's n.
        self.numbers: dict[str, int] = {}
        #: consumer -> the event ids its transport handed to its bus.
        self.got: dict[str, set[str]] = {}
        #: consumer -> the event ids it handled.
        self.handled_by: dict[str, set[str]] = {}
        self.poisoned: list[tuple[str, str]] = []  # (consumer, event id)
        self.dead: list[tuple[str, str]] = []  # (consumer, "<message id> <reason>")
        self.calls = 0

    def listener(self, consumer: str) -> Callable[[str], None]:
        """The ``on_line`` of *consumer*'s ChildProcess."""
        self.got.setdefault(consumer, set())
        self.handled_by.setdefault(consumer, set())

        def on_line(line: str) -> None:
            kind, _, rest = line.partition(" ")
            with self._changed:
                if kind == "handled":
                    event_id, n = rest.split()
                    self.numbers[event_id] = int(n)
                    self.handled.setdefault(event_id, []).append(consumer)
                    self.handled_at.setdefault((event_id, consumer), time.monotonic())
                    self.handled_by[consumer].add(event_id)
                    self.calls += 1
                elif kind == "got":
                    self.got[consumer].add(rest)
                elif kind == "poison":
                    self.poisoned.append((consumer, rest))
                elif kind == "dead":
                    self.dead.append((consumer, rest))
                else:
                    return
                self._changed.notify_all()

        return on_line

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        """Wait (bounded) until *predicate* holds; it is called under the ledger's lock."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def missing(self, ids: set[str]) -> set[str]:
        with self._changed:
            return ids - self.handled.keys()

    def duplicated(self) -> dict[str, list[str]]:
        with self._changed:
            return {i: list(who) for i, who in self.handled.items() if len(who) > 1}


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def exchange() -> str:
    """An exchange (and so queue) name of the test's own on a shared server."""
    return f"procs-{uuid.uuid4().hex[:10]}"


def spawn(
    children: Children, ledger: Ledger, url: str, exchange: str, name: str, *options: str
) -> ChildProcess:
    """A rabbitmq_worker.py consumer of the group, its lines fed to *ledger*; killed and
    reaped by the ``children`` fixture when the test ends, whatever happened."""
    return children.script(
        "rabbitmq_worker",
        *("--url", url, "--exchange", exchange, "--group", GROUP, "--name", name, *options),
        name=name,
        on_line=ledger.listener(name),
    )


@contextlib.contextmanager
def producer(url: str, exchange: str, *, timeout: float = 10.0) -> Iterator[EventBus]:
    """A bus that only emits (never started), closed at the end."""
    bus = EventBus(
        transport=RabbitMQTransport(url, exchange=exchange, group=GROUP, timeout=timeout),
        max_workers=1,
        name="producer",
    )
    try:
        yield bus
    finally:
        bus.close(timeout=10)


class Broker:
    """A plain pika connection for what only the broker knows: queue depths, dead letters."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()

    def ready(self, queue: str) -> int:
        """Messages ready in *queue* (not those delivered and unacknowledged)."""
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)

    def wait_ready(self, queue: str, count: int, timeout: float = WAIT) -> float | None:
        """Seconds until *queue* holds at least *count* ready messages, or None after
        *timeout*. Polling, acceptable only because it observes the broker."""
        started = time.monotonic()
        pause = threading.Event()
        while self.ready(queue) < count:
            if time.monotonic() - started > timeout:
                return None
            pause.wait(0.02)
        return time.monotonic() - started

    def take_all(self, queue: str) -> list[tuple[Any, bytes]]:
        """Every message of *queue*, taken off it: (properties, body)."""
        taken: list[tuple[Any, bytes]] = []
        while True:
            _method, properties, body = self.channel.basic_get(queue, auto_ack=True)
            if body is None:
                return taken
            taken.append((properties, body))

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            self.connection.close()


@pytest.fixture
def broker(rabbitmq_url: str) -> Iterator[Broker]:
    b = Broker(rabbitmq_url)
    yield b
    b.close()


# -- 1. two consumers of one group, one SIGKILLed mid-run ----------------------------------------

EVENTS = 2_000
KILL_AFTER = 500
WORKERS = 4
PREFETCH = 100
#: Seconds of simulated work per call: at most WORKERS / WORK = 200 events/s per consumer, so
#: each holds a backlog of delivered, unacknowledged messages when one is killed.
WORK = 0.02


@pytest.mark.timeout(90)
def test_two_consumers_one_killed_midway_lose_no_event(
    rabbitmq_url: str, children: Children, ledger: Ledger, exchange: str, broker: Broker
) -> None:
    """2,000 events through 2 consumers of one group, one SIGKILLed after ~500 calls in all:
    the broker redelivers what it held to the survivor, every event is handled, and only
    events the victim handled without acknowledging are handled twice."""
    options = ("--workers", str(WORKERS), "--prefetch", str(PREFETCH), "--work", str(WORK))
    victim = spawn(children, ledger, rabbitmq_url, exchange, "victim", *options)
    survivor = spawn(children, ledger, rabbitmq_url, exchange, "survivor", *options)
    for consumer in (victim, survivor):
        consumer.expect("ready")

    published: list[str] = []
    failed: list[BaseException] = []

    def publish(bus: EventBus) -> None:
        try:
            for i in range(EVENTS):
                published.append(bus.emit("job", {"n": i}).id)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failed.append(exc)

    with producer(rabbitmq_url, exchange) as bus:
        started = time.monotonic()
        publisher = threading.Thread(target=publish, args=(bus,), name="test-publisher")
        publisher.start()
        try:
            assert ledger.wait_for(lambda: ledger.calls >= KILL_AFTER), (
                f"{ledger.calls} calls in {WAIT} s; {victim.output()}"
            )
            victim.kill()
            killed_at = time.monotonic()
            calls_at_kill, published_at_kill = ledger.calls, len(published)
        finally:
            publisher.join(60)
        assert not publisher.is_alive(), "publishing 2,000 events took over 60 s"
        published_in = time.monotonic() - started
    assert not failed, f"emit raised: {failed[0]!r}"
    assert len(published) == EVENTS

    victim.wait()  # every line it printed before its death is in the ledger now
    ids = set(published)
    ledger.wait_for(lambda: not (ids - ledger.handled.keys()), timeout=60)
    finished = time.monotonic()
    # Redeliveries of what the victim handled but never acknowledged may still be on their
    # way to the survivor: wait until none is ready in the queue and the survivor handled
    # all it got, so that stopping it leaves nothing it received unacknowledged.
    # (The ledger's sets are read under its condition, through wait_for.)
    queue = f"{exchange}.{GROUP}"
    poll_until(lambda: broker.ready(queue) == 0, "no message is ready in the queue", 60)
    assert ledger.wait_for(
        lambda: ledger.got["survivor"] <= ledger.handled_by["survivor"], timeout=60
    ), "the survivor did not handle every message delivered to it"
    survivor.stop()  # closing lets its last deliveries settle and be acknowledged

    lost = ledger.missing(ids)
    duplicated = ledger.duplicated()
    victim_got, victim_handled = ledger.got["victim"], ledger.handled_by["victim"]
    # Handed to the victim's bus and never handled: unacknowledged for sure at the kill.
    held = victim_got - victim_handled
    taken_over = [
        ledger.handled_at[(i, "survivor")] - killed_at
        for i in held
        if (i, "survivor") in ledger.handled_at
    ]
    left = broker.ready(queue)
    print(  # shown with -s or on failure
        f"\npublished {EVENTS} in {published_in:.1f} s; kill after {calls_at_kill} calls, "
        f"{published_at_kill} published; victim got {len(victim_got)}, handled "
        f"{len(victim_handled)}, held {len(held)} unhandled; survivor took them over in "
        f"{max(taken_over, default=0.0):.2f} s (first {min(taken_over, default=0.0):.2f} s); "
        f"all handled {finished - killed_at:.1f} s after the kill; duplicates "
        f"{len(duplicated)}; lost {len(lost)}"
    )

    assert not lost, f"{len(lost)} of {EVENTS} events never handled"
    assert 0 < len(victim_handled) < EVENTS, "the kill did not land mid-run"
    assert held, "the victim held nothing unhandled at the kill: nothing was taken over"
    assert held <= ledger.handled_by["survivor"], "a message the victim held was not redelivered"
    # Only a message the victim handled and had not acknowledged when it died runs twice;
    # the victim held at most PREFETCH unacknowledged.
    assert all(who.count("victim") == 1 and "survivor" in who for who in duplicated.values()), (
        f"a duplicate without the victim (or twice in one process): {list(duplicated.items())[:5]}"
    )
    assert len(duplicated) <= PREFETCH, f"{len(duplicated)} duplicates, prefetch is {PREFETCH}"
    assert left == 0, f"{left} messages still ready in the group's queue"


# -- 2. the broker killed and restarted mid-burst ------------------------------------------------

BURST = 600
KILL_BROKER_AFTER = 200


@pytest.mark.timeout(90)
def test_every_confirmed_event_is_delivered_after_a_broker_restart(
    own_rabbitmq: RabbitMQServer, children: Children, ledger: Ledger, exchange: str
) -> None:
    """The broker is SIGKILLed while the producer publishes and started again on the same
    data: every emit that returned (confirmed) is handled by the same consumer process,
    which reconnected by itself; the emits that raised TransportError meanwhile are counted
    apart and published again after the restart."""
    url = own_rabbitmq.url
    consumer = spawn(children, ledger, url, exchange, "consumer", "--workers", "4")
    consumer.expect("ready")
    # RabbitMQ (3.10.8 here) records a new quorum queue's Raft member lazily: killed within
    # a second or so of the declare, the node comes back with the queue listed but without a
    # leader, for minutes (publishes unconfirmed, then nacked; consumes refused). A clean
    # restart first makes it durable, as a queue that has existed for a while is; the
    # consumer reconnects by itself, which the probe event shows.
    own_rabbitmq.stop()
    own_rabbitmq.start()

    confirmed: dict[str, int] = {}  # event id -> n
    refused: list[int] = []  # n of the emits that raised TransportError
    unexpected: list[BaseException] = []
    progress = threading.Condition()
    restarted = threading.Event()

    def publish(bus: EventBus) -> None:
        try:
            for n in range(BURST):
                try:
                    event = bus.emit("job", {"n": n})
                except TransportError:
                    with progress:
                        refused.append(n)
                    restarted.wait(60)  # the outage: go on once the broker is back
                    continue
                with progress:
                    confirmed[event.id] = n
                    progress.notify_all()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            unexpected.append(exc)

    with producer(url, exchange, timeout=5.0) as bus:
        probe = emit_retrying(bus, -1)
        assert ledger.wait_for(lambda: probe.id in ledger.handled), (
            f"the consumer did not come back after a clean restart; {consumer.output()}"
        )
        publisher = threading.Thread(target=publish, args=(bus,), name="test-publisher")
        publisher.start()
        try:
            with progress:
                assert progress.wait_for(lambda: len(confirmed) >= KILL_BROKER_AFTER, WAIT)
            own_rabbitmq.kill()
            killed_at = time.monotonic()
            with progress:
                confirmed_at_kill = len(confirmed)
            own_rabbitmq.start()
            back_at = time.monotonic()
        finally:
            restarted.set()
            publisher.join(60)
        assert not publisher.is_alive(), "the publisher did not finish within 60 s"
        assert not unexpected, f"emit raised: {unexpected[0]!r}"
        before_retry = dict(confirmed)
        # What raised is not confirmed: the broker may or may not have it. Publish it again.
        retried = {emit_retrying(bus, n).id: n for n in refused}

    everything = {**before_retry, **retried}
    ids = set(everything)
    ledger.wait_for(lambda: not (ids - ledger.handled.keys()), timeout=60)
    handled_at = time.monotonic()
    alive = consumer.proc.poll() is None
    consumer.stop()  # its every line is in the ledger now
    lost = ledger.missing(ids)
    confirmed_after = len(confirmed) - confirmed_at_kill
    refused_but_delivered = len(
        {n for i, n in ledger.numbers.items() if i not in ids and n in set(refused)}
    )
    duplicated = ledger.duplicated()
    print(  # shown with -s or on failure
        f"\n{confirmed_at_kill} confirmed at the kill; {len(refused)} emits raised "
        f"TransportError ({refused_but_delivered} of them delivered anyway), retried after the "
        f"restart; {len(before_retry)} confirmed in the burst; broker down "
        f"{back_at - killed_at:.1f} s; all {len(ids)} handled {handled_at - back_at:.1f} s "
        f"after the restart; duplicates {len(duplicated)}; lost {len(lost)}"
    )

    assert refused, "no emit failed: the broker did not go down mid-burst"
    assert len(before_retry) + len(refused) == BURST
    assert confirmed_after, "nothing was confirmed after the restart"
    assert alive, "the consumer process died with the broker"
    assert not lost, (
        f"{len(lost)} of {len(ids)} confirmed events never handled: n = "
        f"{sorted(everything[i] for i in lost)[:20]}"
    )


def emit_retrying(bus: EventBus, n: int, attempts: int = 3) -> Event:
    """Emit ``job`` {n}, again on TransportError (a broker just restarted may not confirm
    within the transport's timeout while its queues elect their leaders)."""
    for attempt in itertools.count(1):
        try:
            return bus.emit("job", {"n": n})
        except TransportError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


# -- 3. poison: a message that cannot be decoded, a message that kills its consumer ---------------


def test_an_undecodable_message_goes_to_the_dead_letter_queue_at_once(
    rabbitmq_url: str, children: Children, ledger: Ledger, exchange: str, broker: Broker
) -> None:
    """Bytes that are not an event, published with the routing key of a subscribed name, are
    moved to ``<exchange>.g.dead`` on their first delivery, with the reason; the consumer
    goes on handling events."""
    consumer = spawn(children, ledger, rabbitmq_url, exchange, "consumer")
    consumer.expect("ready")
    dead_queue = f"{exchange}.{GROUP}.dead"

    raw = b"\xff not json"
    publishing = broker.connection.channel()
    publishing.confirm_delivery()
    publishing.basic_publish(
        exchange,
        routing_key("job"),
        raw,
        pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, message_id="raw-1"),
    )
    took = broker.wait_ready(dead_queue, 1)
    assert took is not None, f"nothing in {dead_queue} after {WAIT} s; {consumer.output()}"
    consumer.expect("dead raw-1 cannot decode")

    with producer(rabbitmq_url, exchange) as bus:
        good = bus.emit("job", {"n": 1})
    assert ledger.wait_for(lambda: good.id in ledger.handled), (
        f"the event after the undecodable one was not handled; {consumer.output()}"
    )
    consumer.stop()
    dead = broker.take_all(dead_queue)
    left = broker.ready(f"{exchange}.{GROUP}")
    print(f"\ndead-lettered {took:.2f} s after the publish")  # shown with -s or on failure

    assert [body for _, body in dead] == [raw]
    reason = dead[0][0].headers["x-eventbus-reason"]
    assert reason.startswith("cannot decode: "), reason
    assert ledger.handled == {good.id: ["consumer"]}
    assert left == 0, f"{left} messages left in the group's queue"


MAX_DELIVERIES = 3


@pytest.mark.timeout(90)
def test_a_message_that_kills_its_consumer_is_dead_lettered_after_max_deliveries(
    rabbitmq_url: str, children: Children, ledger: Ledger, exchange: str, broker: Broker
) -> None:
    """A handler that SIGKILLs its own process on one event: consumers restarted one after
    the other (a supervisor's loop) each get it and die, until the broker has delivered it
    max_deliveries times and moves it to ``<exchange>.g.dead`` (reason ``delivery_limit``);
    the event published after it is then handled, once."""
    # prefetch 1: a consumer holds the poison alone, so that no other message dies with it.
    options = ("--max-deliveries", str(MAX_DELIVERIES), "--prefetch", "1", "--workers", "2")
    dead_queue = f"{exchange}.{GROUP}.dead"
    consumer = spawn(children, ledger, rabbitmq_url, exchange, "consumer-0", *options)
    consumer.expect("ready")  # the group's queue exists: publish
    with producer(rabbitmq_url, exchange) as bus:
        poison = bus.emit("job", {"n": 0, "poison": True})
        good = bus.emit("job", {"n": 1})
    published_at = time.monotonic()

    deaths = 0
    pause = threading.Event()
    for number in itertools.count(1):
        # Until this consumer dies or the poison is in the dead-letter queue. Polling,
        # acceptable only because it observes another process and the broker.
        deadline = time.monotonic() + WAIT
        while consumer.proc.poll() is None and broker.ready(dead_queue) == 0:
            assert time.monotonic() < deadline, f"neither death nor dead letter in {WAIT} s"
            pause.wait(0.02)
        if consumer.proc.poll() is None:
            dead_after = time.monotonic() - published_at
            break
        deaths += 1
        assert number <= MAX_DELIVERIES + 2, f"{deaths} consumers died, the poison lives on"
        # Not waiting for its "ready": it may get the poison and die before printing it.
        consumer = spawn(children, ledger, rabbitmq_url, exchange, f"consumer-{number}", *options)

    assert ledger.wait_for(lambda: good.id in ledger.handled), (
        f"the event after the poison was not handled; {consumer.output()}"
    )
    consumer.stop()
    dead = broker.take_all(dead_queue)
    left = broker.ready(f"{exchange}.{GROUP}")
    x_death = dead[0][0].headers.get("x-death") if dead else None
    print(f"\n{deaths} consumers died; dead-lettered within {dead_after:.1f} s: {x_death}")

    assert deaths == MAX_DELIVERIES, f"{deaths} consumers died, max_deliveries={MAX_DELIVERIES}"
    assert [event_id for _, event_id in ledger.poisoned] == [poison.id] * MAX_DELIVERIES
    assert [props.message_id for props, _ in dead] == [poison.id]
    assert [entry["reason"] for entry in x_death or []] == ["delivery_limit"], x_death
    assert ledger.handled == {good.id: [consumer.name]}
    assert left == 0, f"{left} messages left in the group's queue"
