"""RedisStreamsTransport against a real redis-server (the ``redis_url`` and ``own_redis``
fixtures of tests/conftest.py, started by tests/support/redis.py):
publishing, consuming in groups, acknowledgement, take-over, dead-lettering (undecodable
entries included), keeping entries fresh, trimming, connection loss, a Redis that stops
answering (paused with SIGSTOP), ``ping()``, closing, and the ``once`` helper.

Every test gets its own stream and group names. Synchronisation is by ``threading.Event``s
set by handlers, ``drain()``, and bounded polls of Redis state (XPENDING, XLEN) and of
captured log records: nothing here sleeps to wait for work.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from eventbus import (
    DuplicateInFlightError,
    Event,
    EventBus,
    RetryPolicy,
    TransportError,
    signals,
)
from eventbus.stores import MemoryStore
from eventbus.testing import FakeClock, InlineExecutor
from eventbus.transports import RedisStreamsTransport
from tests.support import waiting as support
from tests.support.redis import RedisServer
from tests.support.waiting import poll_until

pytestmark = pytest.mark.integration

#: Upper bound for waits that normally end at once; only a broken transport waits this long.
WAIT = 10.0

#: A reader's XREADGROUP wait: short, so that close() and test teardown are quick.
BLOCK = 0.05

#: Makes a raw-claimed entry look idle far longer than any claim_idle used here.
LONG_IDLE_MS = 600_000


@dataclass(frozen=True)
class OrderPlaced:
    order_id: int
    email: str


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    poll_until(predicate, what, timeout, every=0.01)


class Tally(support.Tally):
    timeout = WAIT


class Streams:
    """One test's stream, groups and buses on a Redis server; closes what it made."""

    def __init__(self, url: str) -> None:
        self.url = url
        suffix = uuid.uuid4().hex
        self.stream = f"test:{suffix}"
        self.group = f"group:{suffix}"
        self.dead = f"{self.stream}:dead"
        # Any, as in the transport: redis-py's return types are unions shared with asyncio.
        self.redis: Any = redis.Redis.from_url(url, decode_responses=True)
        self._buses: list[EventBus] = []
        self._transports: list[RedisStreamsTransport] = []

    def transport(self, group: str | None = None, **options: Any) -> RedisStreamsTransport:
        """A transport on this test's stream (and group, unless *group* is given)."""
        options.setdefault("block", BLOCK)
        made = RedisStreamsTransport(
            self.url, stream=self.stream, group=group or self.group, **options
        )
        self._transports.append(made)
        return made

    def bus(
        self,
        group: str | None = None,
        *,
        bus_options: dict[str, Any] | None = None,
        **transport_options: Any,
    ) -> EventBus:
        """A bus on a new transport; handlers run inline on its reader thread by default."""
        options = dict(bus_options or {})
        if "max_workers" not in options:
            options.setdefault("executor", InlineExecutor())
        made = EventBus(transport=self.transport(group, **transport_options), **options)
        self._buses.append(made)
        return made

    # -- reading Redis state ---------------------------------------------------------------

    def pending(self, group: str | None = None) -> int:
        """How many entries are pending (read, not acknowledged) in the group."""
        return int(self.redis.xpending(self.stream, group or self.group)["pending"])

    def pending_entries(self, group: str | None = None) -> list[dict[str, Any]]:
        return list(self.redis.xpending_range(self.stream, group or self.group, "-", "+", 100))

    def length(self) -> int:
        return int(self.redis.xlen(self.stream))

    def dead_entries(self) -> list[tuple[str, dict[str, str]]]:
        return list(self.redis.xrange(self.dead))

    def read_as(self, consumer: str, group: str | None = None) -> str:
        """Read one new entry under another consumer name that never acknowledges it (a
        consumer that died); return the entry id."""
        reply = self.redis.xreadgroup(group or self.group, consumer, {self.stream: ">"}, count=1)
        [(_stream, [(entry_id, _fields)])] = reply
        return str(entry_id)

    def age(self, consumer: str, entry_id: str, **options: Any) -> None:
        """Make a pending entry look idle for a long time, keeping its owner (raw XCLAIM)."""
        self.redis.xclaim(
            self.stream,
            self.group,
            consumer,
            0,
            [entry_id],
            idle=LONG_IDLE_MS,
            justid=True,
            **options,
        )

    def close(self) -> None:
        for made in self._buses:
            made.close(timeout=WAIT)
        for transport in self._transports:
            transport.close()
        self.redis.close()


@pytest.fixture
def streams(redis_url: str) -> Iterator[Streams]:
    """Fresh stream and group names on the session server, and cleanup of the test's buses."""
    made = Streams(redis_url)
    yield made
    made.close()


@pytest.fixture
def own_streams(own_redis: RedisServer) -> Iterator[Streams]:
    """Stream and group names on the test's own server."""
    made = Streams(own_redis.url)
    yield made
    made.close()


# -- publishing ------------------------------------------------------------------------------


def test_emit_appends_an_entry_and_returns_the_event(streams: Streams) -> None:
    """emit() appends one entry (event id, name, JSON payload) and returns the Event."""
    producer = streams.bus()
    event = producer.emit("order:placed", {"order_id": 7, "items": ["a", "b"]})
    assert isinstance(event, Event)
    assert streams.length() == 1
    [(_entry_id, fields)] = streams.redis.xrange(streams.stream)
    assert fields["id"] == event.id
    assert fields["name"] == "order:placed"
    assert json.loads(fields["payload"]) == {"order_id": 7, "items": ["a", "b"]}


def test_producer_without_recover_consumes_nothing(streams: Streams) -> None:
    """A bus that only emits (no recover()) never reads the stream, even with a handler."""
    producer = streams.bus()
    calls = Tally()
    producer.subscribe("order:placed", calls)
    producer.emit("order:placed", {"order_id": 1})
    [group] = streams.redis.xinfo_groups(streams.stream)
    assert group["last-delivered-id"] == "0-0"
    assert group["pending"] == 0
    assert calls.events == []


# -- consuming -------------------------------------------------------------------------------


def test_consumer_after_recover_delivers_to_its_handler(streams: Streams) -> None:
    """A bus that called recover() delivers another bus's event to its handler."""
    consumer = streams.bus()
    received = Tally()
    consumer.subscribe("order:placed", received)
    consumer.recover()
    sent = streams.bus().emit("order:placed", {"order_id": 3}, metadata={"request_id": "r1"})
    received.wait("the consumer got the event")
    [got] = received.events
    assert (got.id, got.name, got.payload) == (sent.id, "order:placed", {"order_id": 3})
    assert got.metadata == {"request_id": "r1"}
    assert got.occurred_at == sent.occurred_at


def test_typed_event_arrives_as_an_equal_instance(streams: Streams) -> None:
    """A dataclass event reaches a handler subscribed with its class as an equal instance."""
    consumer = streams.bus()
    received = Tally()
    consumer.subscribe(OrderPlaced, received)
    consumer.recover()
    sent = streams.bus().emit(OrderPlaced(order_id=5, email="a@example.com"))
    wait_until(
        lambda: received.done.is_set() or bool(streams.dead_entries()),
        "the event was delivered or dead-lettered",
    )
    dead = [fields["reason"] for _entry, fields in streams.dead_entries()]
    assert dead == [], f"dead-lettered instead of delivered: {dead}"
    [got] = received.events
    assert got.payload == OrderPlaced(order_id=5, email="a@example.com")
    assert got.id == sent.id


# -- acknowledgement -------------------------------------------------------------------------


def test_entry_is_acknowledged_only_after_every_delivery_settled(streams: Streams) -> None:
    """The entry stays pending while one of its handlers runs, though another has finished."""
    consumer = streams.bus(bus_options={"max_workers": 2})
    started, release = threading.Event(), threading.Event()
    fast = Tally()

    def slow(event: Event) -> None:
        started.set()
        release.wait(WAIT)

    consumer.subscribe("order:placed", fast, name="fast")
    consumer.subscribe("order:placed", slow, name="slow")
    consumer.recover()
    event = streams.bus().emit("order:placed", {"order_id": 1})
    assert started.wait(WAIT), "the slow handler never started"
    wait_until(
        lambda: consumer.status(event.id)["fast"].state == "succeeded", "the fast one settled"
    )
    try:
        assert streams.pending() == 1
    finally:
        release.set()
    assert consumer.drain(WAIT)
    wait_until(lambda: streams.pending() == 0, "the entry was acknowledged")


def test_delivery_ending_as_dead_letter_gets_the_entry_acknowledged(streams: Streams) -> None:
    """An entry whose only delivery became a dead letter is acknowledged."""
    consumer = streams.bus(bus_options={"retry": RetryPolicy(max_attempts=1)})
    called = threading.Event()

    def broken(event: Event) -> None:
        called.set()
        raise RuntimeError("boom")

    consumer.subscribe("order:placed", broken)
    consumer.recover()
    streams.bus().emit("order:placed", {"order_id": 1})
    assert called.wait(WAIT), "the handler never ran"
    wait_until(lambda: streams.pending() == 0, "the entry was acknowledged")
    [letter] = consumer.dead_letters()
    assert letter.handler.endswith("broken")


# -- groups ----------------------------------------------------------------------------------


def test_competing_consumers_handle_each_event_once_in_total(streams: Streams) -> None:
    """Two buses in one group share 200 events: each event is handled exactly once."""
    total = 200
    lock = threading.Lock()
    handled: Counter[str] = Counter()
    all_in = threading.Event()

    def count(event: Event) -> None:
        with lock:
            handled[event.id] += 1
            if sum(handled.values()) >= total:
                all_in.set()

    consumers = [streams.bus(batch=10), streams.bus(batch=10)]
    for consumer in consumers:
        consumer.subscribe("tick", count)
        consumer.recover()
    producer = streams.bus()
    sent = {producer.emit("tick", {"n": n}).id for n in range(total)}
    assert all_in.wait(WAIT), f"only {sum(handled.values())} of {total} handled"
    for consumer in consumers:
        assert consumer.drain(WAIT)
    wait_until(lambda: streams.pending() == 0, "every entry was acknowledged")
    assert set(handled) == sent
    assert max(handled.values()) == 1


def test_every_group_gets_every_event(streams: Streams) -> None:
    """Two groups on one stream each receive all of the events (fan-out)."""
    other_group = f"{streams.group}:other"
    tallies = [Tally(expected=10), Tally(expected=10)]
    for group, tally in zip([streams.group, other_group], tallies, strict=True):
        consumer = streams.bus(group)
        consumer.subscribe("tick", tally)
        consumer.recover()
    producer = streams.bus()
    sent = [producer.emit("tick", {"n": n}).id for n in range(10)]
    for tally in tallies:
        tally.wait("a group got all 10 events")
    assert [sorted(t.ids) for t in tallies] == [sorted(sent), sorted(sent)]


# -- taking over, dead-lettering -------------------------------------------------------------


def test_recover_takes_over_an_idle_entry_of_a_dead_consumer(streams: Streams) -> None:
    """An entry a dead consumer read and never acknowledged is delivered by recover() once it
    has been idle for claim_idle, under the event's original id."""
    sent = streams.bus().emit("order:placed", {"order_id": 9})
    entry_id = streams.read_as("dead-consumer")
    streams.age("dead-consumer", entry_id)
    consumer = streams.bus(claim_idle=30)
    received = Tally()
    consumer.subscribe("order:placed", received)
    assert consumer.recover() == 1
    received.wait("the taken-over event was delivered")
    [got] = received.events
    assert (got.id, got.payload) == (sent.id, {"order_id": 9})
    wait_until(lambda: streams.pending() == 0, "the taken-over entry was acknowledged")


def test_taking_over_entries_is_logged(streams: Streams) -> None:
    """A consumer that takes over a stopped consumer's entries says how many, at warning."""
    streams.bus().emit("order:placed", {"order_id": 9})
    entry_id = streams.read_as("dead-consumer")
    streams.age("dead-consumer", entry_id)
    consumer = streams.bus(claim_idle=30)
    consumer.subscribe("order:placed", Tally())
    with capture_logs() as logs:
        assert consumer.recover() == 1
    taken = [r for r in logs if r["event"] == "stream.taken_over"]
    assert taken == [{"event": "stream.taken_over", "events": 1, "log_level": "warning"}]


def test_recover_leaves_an_entry_not_yet_idle_for_claim_idle(streams: Streams) -> None:
    """An entry another consumer read moments ago is not taken over (claim_idle not reached)."""
    streams.bus().emit("order:placed", {"order_id": 9})
    streams.read_as("busy-consumer")
    consumer = streams.bus(claim_idle=30)
    consumer.subscribe("order:placed", Tally())
    assert consumer.recover() == 0
    [entry] = streams.pending_entries()
    assert entry["consumer"] == "busy-consumer"


def test_entry_delivered_more_than_max_deliveries_goes_to_the_dead_stream(
    streams: Streams,
) -> None:
    """An entry already delivered max_deliveries times is dead-lettered to <stream>:dead and
    acknowledged when taken over, instead of reaching the handler again."""
    streams.bus().emit("order:placed", {"order_id": 1})
    entry_id = streams.read_as("dead-consumer")
    streams.age("dead-consumer", entry_id, retrycount=5)  # the take-over makes it the 6th
    consumer = streams.bus(claim_idle=30, max_deliveries=5)
    received = Tally()
    consumer.subscribe("order:placed", received)
    assert consumer.recover() == 0
    [(_dead_id, fields)] = streams.dead_entries()
    assert fields["entry_id"] == entry_id
    assert fields["deliveries"] == "6"
    assert fields["reason"] == "delivered 6 times"
    assert streams.pending() == 0
    later = streams.bus().emit("order:placed", {"order_id": 2})
    received.wait("a later event was delivered")
    assert received.ids == [later.id]


def test_over_delivered_entries_are_dead_lettered_among_many_held_by_the_consumer(
    streams: Streams,
) -> None:
    """Every taken-over entry past max_deliveries is dead-lettered, even when the consumer
    already holds many pending entries between them."""
    producer = streams.bus()
    producer.emit("order:placed", {"order_id": 1})
    first = streams.read_as("dead-consumer")
    for n in range(30):  # read (and held) by the consumer below under its own name
        producer.emit("order:placed", {"order_id": 100 + n})
        streams.read_as("me")
    producer.emit("order:placed", {"order_id": 2})
    last = streams.read_as("dead-consumer")
    for entry_id in (first, last):
        streams.age("dead-consumer", entry_id, retrycount=5)
    consumer = streams.bus(claim_idle=30, max_deliveries=5, consumer="me")
    received = Tally()
    consumer.subscribe("order:placed", received)
    assert consumer.recover() == 0
    assert sorted(fields["entry_id"] for _id, fields in streams.dead_entries()) == [first, last]
    assert received.events == []


def test_entry_delivered_exactly_max_deliveries_times_is_still_delivered(
    streams: Streams,
) -> None:
    """A take-over that is the max_deliveries-th delivery still reaches the handler."""
    sent = streams.bus().emit("order:placed", {"order_id": 1})
    entry_id = streams.read_as("dead-consumer")
    streams.age("dead-consumer", entry_id, retrycount=4)  # the take-over makes it the 5th
    consumer = streams.bus(claim_idle=30, max_deliveries=5)
    received = Tally()
    consumer.subscribe("order:placed", received)
    assert consumer.recover() == 1
    received.wait("the taken-over event was delivered")
    assert received.ids == [sent.id]
    assert streams.dead_entries() == []


def test_undecodable_entry_goes_to_the_dead_stream_and_the_bus_goes_on(
    streams: Streams,
) -> None:
    """An entry with a bad JSON payload is dead-lettered and acknowledged; the next is
    delivered."""
    consumer = streams.bus()
    received = Tally()
    consumer.subscribe("order:placed", received)
    consumer.recover()
    bad_id = streams.redis.xadd(
        streams.stream,
        {
            "id": "bad-1",
            "name": "order:placed",
            "payload": "{not json",
            "occurred_at": datetime.now(UTC).isoformat(),
        },
    )
    good = streams.bus().emit("order:placed", {"order_id": 2})
    received.wait("the good event after the bad entry was delivered")
    assert received.ids == [good.id]
    [(_dead_id, fields)] = streams.dead_entries()
    assert fields["entry_id"] == bad_id
    assert fields["reason"].startswith("cannot decode")
    wait_until(lambda: streams.pending() == 0, "both entries were acknowledged")


def _raw_entry(**fields: str | bytes | None) -> dict[str, str | bytes]:
    """A stream entry as the transport writes it, for an event ``order:placed``, with
    *fields* replacing or adding fields, or removing those given as ``None``."""
    entry: dict[str, str | bytes | None] = {
        "id": f"raw-{uuid.uuid4().hex}",
        "name": "order:placed",
        "payload_type": "",
        "payload": '{"order_id": 1}',
        "metadata": "{}",
        "occurred_at": datetime.now(UTC).isoformat(),
        **fields,
    }
    return {key: value for key, value in entry.items() if value is not None}


def test_non_utf8_entry_is_dead_lettered_and_the_rest_of_its_batch_delivered(
    streams: Streams,
) -> None:
    """An entry whose bytes are not UTF-8, read in one batch with good entries, goes to the
    dead stream with its fields backslash-escaped and a reason naming the field, and the good
    entries are delivered and every entry acknowledged."""
    bad_id = streams.redis.xadd(streams.stream, _raw_entry(payload=b'{"order_id": "\xff"}'))
    producer = streams.bus()
    good = [producer.emit("order:placed", {"order_id": n}).id for n in range(2)]
    consumer = streams.bus()
    received = Tally(expected=2)
    consumer.subscribe("order:placed", received)
    consumer.recover()  # reads the three entries in one XREADGROUP batch
    received.wait("the good entries of the batch were delivered")
    assert sorted(received.ids) == sorted(good)
    [(_dead_id, fields)] = streams.dead_entries()
    assert fields["entry_id"] == bad_id
    assert fields["payload"] == '{"order_id": "\\xff"}'
    assert fields["reason"].startswith("cannot decode: CodecError: field 'payload' is not UTF-8")
    wait_until(lambda: streams.pending() == 0, "every entry of the batch was acknowledged")


def test_non_utf8_entry_taken_over_is_dead_lettered_and_the_others_delivered(
    streams: Streams,
) -> None:
    """recover() taking over a stopped consumer's entries dead-letters one that is not UTF-8
    and delivers the others."""
    raw = redis.Redis.from_url(streams.url)  # bytes: the bad entry cannot be read as text
    try:
        bad_id = streams.redis.xadd(streams.stream, _raw_entry(name=b"order:\xfe"))
        good = streams.bus().emit("order:placed", {"order_id": 2})
        reply = raw.xreadgroup(streams.group, "dead-consumer", {streams.stream: ">"}, count=10)
    finally:
        raw.close()
    [(_stream, entries)] = reply
    assert len(entries) == 2
    for entry_id, _fields in entries:
        streams.age("dead-consumer", entry_id.decode())
    consumer = streams.bus(claim_idle=30)
    received = Tally()
    consumer.subscribe("order:placed", received)
    assert consumer.recover() == 1
    received.wait("the good taken-over entry was delivered")
    assert received.ids == [good.id]
    [(_dead_id, fields)] = streams.dead_entries()
    assert fields["entry_id"] == bad_id
    assert fields["name"] == "order:\\xfe"
    assert fields["reason"].startswith("cannot decode: CodecError: field 'name' is not UTF-8")
    wait_until(lambda: streams.pending() == 0, "both entries were acknowledged")


MALICIOUS_NAME = "a:b\n[critical] FAKE\x1b[2J"


def test_entry_with_a_malformed_name_is_dead_lettered_without_the_raw_name_in_the_log(
    streams: Streams,
) -> None:
    """An entry whose name is not a valid event name goes to the dead stream (raw name kept
    there), is logged with the name escaped, and the next entry is delivered."""
    bad_id = streams.redis.xadd(streams.stream, _raw_entry(name=MALICIOUS_NAME))
    good = streams.bus().emit("order:placed", {"order_id": 2})
    consumer = streams.bus()
    received = Tally()
    consumer.subscribe("**", received)
    with capture_logs() as logs:
        consumer.recover()
        received.wait("the good entry after the malformed one was delivered")
        wait_until(lambda: streams.pending() == 0, "both entries were acknowledged")
        assert consumer.drain(WAIT)
    assert received.ids == [good.id]
    [(_dead_id, fields)] = streams.dead_entries()
    assert fields["entry_id"] == bad_id
    assert fields["name"] == MALICIOUS_NAME
    assert "invalid event name" in fields["reason"]
    [dead] = [log for log in logs if log["event"] == "stream.dead_lettered"]
    assert dead["entry_id"] == bad_id
    assert dead["event_name"] == repr(MALICIOUS_NAME)
    assert "invalid event name" in dead["reason"]
    logged = [v for log in logs for v in log.values() if isinstance(v, str)]
    assert [v for v in logged if "\n" in v or "\x1b" in v] == []
    assert "event.unhandled" not in [log["event"] for log in logs]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"payload": None}, "entry has no 'payload' field"),
        ({"id": ""}, "event id is empty"),
        ({"name": ""}, "invalid event name"),
        ({"metadata": "[1, 2]"}, "metadata must be a JSON object"),
        ({"metadata": '{"a": 1}'}, "metadata 'a' is not a string"),
        ({"occurred_at": "yesterday"}, "occurred_at is not an ISO 8601 timestamp"),
        ({"occurred_at": "2024-01-01T00:00:00"}, "occurred_at has no time zone"),
        ({"payload_type": "no.such.Type"}, "unknown type name"),
    ],
    ids=[
        "missing-field",
        "empty-id",
        "empty-name",
        "metadata-not-object",
        "metadata-not-text",
        "bad-timestamp",
        "naive-timestamp",
        "unknown-type",
    ],
)
def test_undecodable_entry_is_dead_lettered_with_the_reason(
    streams: Streams, fields: dict[str, str | None], reason: str
) -> None:
    """An entry the envelope refuses goes to the dead stream at once with a reason naming the
    error, and the next entry is delivered."""
    bad_id = streams.redis.xadd(streams.stream, _raw_entry(**fields))
    good = streams.bus().emit("order:placed", {"order_id": 2})
    consumer = streams.bus()
    received = Tally()
    consumer.subscribe("order:placed", received)
    consumer.recover()
    received.wait("the good entry after the undecodable one was delivered")
    assert received.ids == [good.id]
    [(_dead_id, dead)] = streams.dead_entries()
    assert dead["entry_id"] == bad_id
    assert dead["reason"].startswith("cannot decode: CodecError: ")
    assert reason in dead["reason"]
    wait_until(lambda: streams.pending() == 0, "both entries were acknowledged")


def test_entry_whose_hand_over_fails_is_released_and_the_rest_of_its_batch_delivered(
    streams: Streams,
) -> None:
    """When handing one entry of a batch over raises, the reader reports the error, delivers
    the rest of the batch, and takes the failed entry over again after claim_idle."""
    producer = streams.bus()
    first, second = (producer.emit("tick", {"n": n}).id for n in range(2))
    transport = streams.transport(claim_idle=0.3)
    errors: list[BaseException] = []
    transport.on_error = errors.append
    lock = threading.Lock()
    calls: Counter[str] = Counter()
    done = threading.Event()

    def deliver(event: Event, entry_id: str) -> None:
        with lock:
            calls[event.id] += 1
            if event.id == first and calls[first] == 1:
                raise RuntimeError("cannot take this one now")
            if calls[first] == 2 and calls[second] == 1:
                done.set()
        transport.settled(entry_id)

    transport.start(deliver)
    assert done.wait(WAIT), f"deliveries so far: {dict(calls)}, errors: {errors}"
    wait_until(lambda: streams.pending() == 0, "both entries were acknowledged")
    assert [str(e) for e in errors] == ["cannot take this one now"]
    assert calls == {first: 2, second: 1}


# -- delayed entries: not_before -------------------------------------------------------------


class Handed:
    """A ``deliver`` callback given straight to a transport: records each call's arguments
    after the event and settles the entry; signals once *expected* calls arrived."""

    def __init__(self, transport: RedisStreamsTransport, expected: int = 1) -> None:
        self._transport = transport
        self._expected = expected
        self._lock = threading.Lock()
        self.calls: list[tuple[Event, tuple[Any, ...]]] = []
        self.done = threading.Event()

    def __call__(self, event: Event, entry_id: str, *rest: Any) -> None:
        with self._lock:
            self.calls.append((event, rest))
            if len(self.calls) >= self._expected:
                self.done.set()
        self._transport.settled(entry_id)

    def by_id(self) -> dict[str, tuple[Any, ...]]:
        with self._lock:
            return {event.id: rest for event, rest in self.calls}

    def wait(self, what: str) -> None:
        assert self.done.wait(WAIT), f"timed out after {WAIT}s waiting until {what}"


def _event(n: int) -> Event:
    return Event(id=f"ev-{uuid.uuid4().hex}", name="order:placed", payload={"order_id": n})


def test_not_before_reaches_deliver_as_a_third_argument(streams: Streams) -> None:
    """An entry published with not_before is handed over as deliver(event, entry_id,
    not_before), the value as published; one without it as deliver(event, entry_id)."""
    producer = streams.transport()
    due = time.time() + 3600.123456
    delayed, plain, whole = _event(1), _event(2), _event(3)
    producer.publish(delayed, not_before=due)
    producer.publish(plain)
    producer.publish(whole, not_before=1_900_000_000)  # an int is seconds too
    fields = {f["id"]: f for _entry, f in streams.redis.xrange(streams.stream)}
    assert fields[delayed.id]["not_before"] == repr(due)
    assert "not_before" not in fields[plain.id]
    consumer = streams.transport()
    handed = Handed(consumer, expected=3)
    consumer.start(handed)
    handed.wait("the three entries were handed over")
    calls = handed.by_id()
    assert calls == {delayed.id: (due,), plain.id: (), whole.id: (1_900_000_000.0,)}
    assert type(calls[whole.id][0]) is float
    wait_until(lambda: streams.pending() == 0, "the entries were acknowledged")


def test_two_argument_deliver_still_gets_entries_without_not_before(streams: Streams) -> None:
    """A deliver callback written for two arguments keeps working for plain entries."""
    producer = streams.transport()
    sent = _event(1)
    producer.publish(sent)
    consumer = streams.transport()
    got: list[str] = []
    done = threading.Event()

    def deliver(event: Event, entry_id: str) -> None:
        got.append(event.id)
        consumer.settled(entry_id)
        done.set()

    consumer.start(deliver)
    assert done.wait(WAIT), "the entry was never handed over"
    assert got == [sent.id]


@pytest.mark.parametrize(
    "value", [float("nan"), float("inf"), -float("inf"), 10**400, True, "1.5", [1.5]]
)
def test_publish_refuses_a_not_before_that_is_not_a_finite_number(
    streams: Streams, value: Any
) -> None:
    """publish() raises ValueError for a not_before that is not a finite number of seconds,
    and appends nothing."""
    with pytest.raises(ValueError, match="not_before must be a"):
        streams.transport().publish(_event(1), not_before=value)
    assert streams.length() == 0


@pytest.mark.parametrize("value", ["soon", "", "nan", "inf", "-Infinity", "1e999"])
def test_entry_with_a_bad_not_before_is_dead_lettered_and_the_rest_of_its_batch_delivered(
    streams: Streams, value: str
) -> None:
    """An entry whose not_before is not a finite number cannot be decoded: it goes to the dead
    stream with the reason, and the entries around it (one batch) are delivered."""
    producer = streams.transport()
    before = _event(1)
    producer.publish(before, not_before=1_800_000_000.5)
    bad_id = streams.redis.xadd(streams.stream, _raw_entry(not_before=value))
    after = _event(2)
    producer.publish(after)
    consumer = streams.transport()
    handed = Handed(consumer, expected=2)
    consumer.start(handed)  # reads the three entries in one XREADGROUP batch
    handed.wait("the good entries around the bad one were handed over")
    assert handed.by_id() == {before.id: (1_800_000_000.5,), after.id: ()}
    [(_dead_id, dead)] = streams.dead_entries()
    assert dead["entry_id"] == bad_id
    assert dead["not_before"] == value
    assert dead["reason"].startswith(
        "cannot decode: CodecError: not_before is not a finite number of seconds"
    )
    wait_until(lambda: streams.pending() == 0, "every entry of the batch was acknowledged")


def test_not_before_survives_the_death_of_the_consumer_that_read_it(streams: Streams) -> None:
    """An entry with not_before read by a consumer that died is taken over by another, which
    gets the same not_before: the delay is not lost with the consumer."""
    due = time.time() + 600.5
    sent = _event(1)
    streams.transport().publish(sent, not_before=due)
    entry_id = streams.read_as("dead-consumer")
    streams.age("dead-consumer", entry_id)
    consumer = streams.transport(claim_idle=30)
    handed = Handed(consumer)
    assert consumer.start(handed) == 1
    handed.wait("the taken-over entry was handed over")
    assert handed.by_id() == {sent.id: (due,)}


#: The delay of the end-to-end tests below: long enough to see the entry held before it.
DELAY = 1.0
#: Slack for comparing wall-clock times taken in different places (the due time is converted
#: to the consumer's monotonic clock).
CLOCK_SLACK = 0.05


class Stamps:
    """A handler that records the wall-clock time of each call and signals the first."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.called = threading.Event()

    def __call__(self, event: Event) -> None:
        self.times.append(time.time())
        self.called.set()


def test_emit_with_delay_is_held_unacknowledged_and_delivered_once_due(
    streams: Streams,
) -> None:
    """emit(delay=...) through Redis: the consumer reads the entry at once, holds it pending
    without running the handler, and runs it no earlier than the delay."""
    consumer = streams.bus(bus_options={"max_workers": 2})
    stamps = Stamps()
    consumer.subscribe("report:requested", stamps)
    consumer.start()
    emitted_at = time.time()
    streams.bus().emit("report:requested", {"id": 1}, delay=DELAY)
    [(_entry, fields)] = streams.redis.xrange(streams.stream)
    assert float(fields["not_before"]) == pytest.approx(emitted_at + DELAY, abs=CLOCK_SLACK)
    wait_until(lambda: streams.pending() == 1, "the consumer read the delayed entry")
    assert stamps.called.wait(WAIT), "the delayed event was never delivered"
    assert stamps.times[0] >= emitted_at + DELAY - CLOCK_SLACK
    wait_until(lambda: streams.pending() == 0, "the entry was acknowledged after its delivery")


def test_delay_survives_the_consumer_that_held_the_entry(streams: Streams) -> None:
    """A delayed entry read by a consumer that died is taken over by a bus that starts
    later, which still runs the handler no earlier than the entry's not_before."""
    due = time.time() + DELAY
    streams.transport().publish(_event(1), not_before=due)
    entry_id = streams.read_as("dead-consumer")
    streams.age("dead-consumer", entry_id)
    consumer = streams.bus(claim_idle=30, bus_options={"max_workers": 2})
    stamps = Stamps()
    consumer.subscribe("order:placed", stamps)
    assert consumer.start() == 1
    assert stamps.called.wait(WAIT), "the taken-over delayed event was never delivered"
    assert stamps.times[0] >= due - CLOCK_SLACK
    wait_until(lambda: streams.pending() == 0, "the entry was acknowledged")


# -- keeping in-flight entries fresh ---------------------------------------------------------


def test_live_consumer_keeps_its_slow_entry_from_being_taken_over(streams: Streams) -> None:
    """A consumer's upkeep resets the idle time of the entry its slow handler is running, so
    another consumer's recover() does not take it over."""
    started, release = threading.Event(), threading.Event()

    def slow(event: Event) -> None:
        started.set()
        release.wait(WAIT)

    worker = streams.bus(claim_idle=30)
    worker.subscribe("order:placed", slow)
    worker.recover()
    streams.bus().emit("order:placed", {"order_id": 1})
    assert started.wait(WAIT), "the slow handler never started"
    try:
        worker_transport = worker._transport
        assert isinstance(worker_transport, RedisStreamsTransport)
        [entry] = streams.pending_entries()
        streams.age(worker_transport.consumer, entry["message_id"])  # as if long in flight
        worker_transport._keep_fresh()  # what the reader's upkeep does every claim_idle / 3
        other = streams.bus(claim_idle=30)
        other.subscribe("order:placed", Tally())
        assert other.recover() == 0
        [entry] = streams.pending_entries()
        assert entry["consumer"] == worker_transport.consumer
        assert entry["time_since_delivered"] < LONG_IDLE_MS
    finally:
        release.set()
    assert worker.drain(WAIT)
    wait_until(lambda: streams.pending() == 0, "the worker acknowledged its entry")


def test_full_consumer_keeps_every_entry_it_read_fresh(streams: Streams) -> None:
    """While a full bus (max_pending reached) holds up its reader, the entries it has read,
    running or waiting for room, are still kept fresh."""
    started, release = threading.Event(), threading.Event()

    def slow(event: Event) -> None:
        started.set()
        release.wait(2 * WAIT)  # outlasts the wait below: only refreshing can pass the test

    worker = streams.bus(claim_idle=0.3, bus_options={"max_workers": 1, "max_pending": 1})
    worker.subscribe("order:placed", slow)
    worker.recover()
    producer = streams.bus()
    for n in range(2):
        producer.emit("order:placed", {"order_id": n})
    assert started.wait(WAIT), "the slow handler never started"
    try:
        wait_until(lambda: streams.pending() == 2, "the worker read both entries")
        worker_transport = worker._transport
        assert isinstance(worker_transport, RedisStreamsTransport)
        for entry in streams.pending_entries():
            streams.age(worker_transport.consumer, entry["message_id"])
        wait_until(
            lambda: all(
                e["time_since_delivered"] < LONG_IDLE_MS for e in streams.pending_entries()
            ),
            "both entries were refreshed",
        )
    finally:
        release.set()
    assert worker.drain(WAIT)
    wait_until(lambda: streams.pending() == 0, "the worker acknowledged both entries")


# -- trimming --------------------------------------------------------------------------------


def _consume_all(streams: Streams, group: str, count: int) -> RedisStreamsTransport:
    """Start a consumer in *group*, wait until it handled and acknowledged *count* events."""
    consumer = streams.bus(group)
    tally = Tally(expected=count)
    consumer.subscribe("tick", tally)
    consumer.recover()
    tally.wait(f"group {group} handled {count} events")
    wait_until(lambda: streams.pending(group) == 0, f"group {group} acknowledged them")
    transport = consumer._transport
    assert isinstance(transport, RedisStreamsTransport)
    return transport


def test_trim_keeps_entries_another_group_has_not_read(streams: Streams) -> None:
    """trim() deletes nothing while a second group has not read the entries yet, though the
    first has acknowledged them all."""
    other_group = f"{streams.group}:other"
    streams.redis.xgroup_create(streams.stream, other_group, id="0", mkstream=True)
    producer = streams.bus()
    for n in range(5):
        producer.emit("tick", {"n": n})
    transport = _consume_all(streams, streams.group, 5)
    assert transport.trim() == 0
    assert streams.length() == 5


def test_trim_deletes_entries_every_group_acknowledged(streams: Streams) -> None:
    """Once both groups have acknowledged every entry, trim() leaves at most one."""
    other_group = f"{streams.group}:other"
    streams.redis.xgroup_create(streams.stream, other_group, id="0", mkstream=True)
    producer = streams.bus()
    for n in range(5):
        producer.emit("tick", {"n": n})
    _consume_all(streams, streams.group, 5)
    transport = _consume_all(streams, other_group, 5)
    assert transport.trim() >= 4
    assert streams.length() <= 1


def test_trim_keeps_entries_pending_in_a_group(streams: Streams) -> None:
    """trim() does not delete entries a group has read but not acknowledged."""
    started, release = threading.Event(), threading.Event()

    def slow(event: Event) -> None:
        started.set()
        release.wait(WAIT)

    producer = streams.bus()
    for n in range(3):
        producer.emit("tick", {"n": n})
    consumer = streams.bus()
    consumer.subscribe("tick", slow)
    consumer.recover()
    assert started.wait(WAIT), "the handler never started"
    try:
        wait_until(lambda: streams.pending() == 3, "the consumer read all three entries")
        transport = consumer._transport
        assert isinstance(transport, RedisStreamsTransport)
        assert transport.trim() == 0
        assert streams.length() == 3
    finally:
        release.set()
    assert consumer.drain(WAIT)


# -- connection loss -------------------------------------------------------------------------


def test_emit_raises_transport_error_while_redis_is_down(
    own_redis: RedisServer, own_streams: Streams
) -> None:
    """emit() raises TransportError (a RuntimeError) when Redis is down, and the event is not
    published later: after a restart the stream holds only the events emitted while up."""
    producer = own_streams.bus()
    before = producer.emit("tick", {"n": 1})
    own_streams.redis.save()  # the restarted server loads this snapshot: the stream survives
    own_redis.stop()
    with pytest.raises(TransportError) as caught:
        producer.emit("tick", {"n": 2})
    assert isinstance(caught.value, RuntimeError)
    own_redis.start()
    assert own_streams.length() == 1
    after = producer.emit("tick", {"n": 3})
    ids = [fields["id"] for _entry, fields in own_streams.redis.xrange(own_streams.stream)]
    assert ids == [before.id, after.id]


def test_running_consumer_resumes_after_redis_restarts(
    own_redis: RedisServer, own_streams: Streams
) -> None:
    """A consumer running while Redis restarts logs the lost connection and then delivers
    events published after the restart."""
    consumer = own_streams.bus()
    received = Tally(expected=2)
    consumer.subscribe("tick", received)
    consumer.recover()
    producer = own_streams.bus()
    first = producer.emit("tick", {"n": 1})
    wait_until(lambda: received.ids == [first.id], "the first event was delivered")
    wait_until(lambda: own_streams.pending() == 0, "the first entry was acknowledged")
    own_streams.redis.save()  # a Redis that keeps its data (stream, group) across restarts
    with capture_logs() as logs:
        own_redis.stop()
        wait_until(
            lambda: any(log["event"] == "eventbus.internal_error" for log in logs),
            "the reader reported the lost connection",
        )
        own_redis.start()
        second = producer.emit("tick", {"n": 2})
        assert received.done.wait(WAIT), "no delivery after the restart"
    assert received.ids == [first.id, second.id]
    errors = [log for log in logs if log["event"] == "eventbus.internal_error"]
    assert {log["where"] for log in errors} == {"transport"}
    assert any("Connection" in log["error"] for log in errors)


def test_running_consumer_resumes_after_redis_restarts_without_its_data(
    own_redis: RedisServer, own_streams: Streams
) -> None:
    """A consumer running while Redis restarts empty (no persistence, a failover) recreates its
    group and delivers events published after the restart."""
    consumer = own_streams.bus()
    received = Tally(expected=2)
    consumer.subscribe("tick", received)
    consumer.recover()
    producer = own_streams.bus()
    first = producer.emit("tick", {"n": 1})
    wait_until(lambda: received.ids == [first.id], "the first event was delivered")
    own_redis.stop()
    own_redis.start()  # nothing was saved: the stream and its group are gone
    second = producer.emit("tick", {"n": 2})
    assert received.done.wait(WAIT), (
        f"not delivered within {WAIT}s of the restart; groups now: "
        f"{own_streams.redis.xinfo_groups(own_streams.stream)}"
    )
    assert received.ids == [first.id, second.id]


# -- a Redis that does not answer ------------------------------------------------------------

#: socket_timeout of the tests below: short, so that they are quick.
SOCKET_TIMEOUT = 0.5
#: The documented bound on a producer command against a Redis that does not answer (connect,
#: then the reply, each at most socket_timeout), plus slack for a loaded machine.
PRODUCER_BOUND = 2 * SOCKET_TIMEOUT + 1.0


@pytest.fixture
def paused_later(own_redis: RedisServer) -> Iterator[RedisServer]:
    """The test's own server, which the test may pause; resumed afterwards in any case, so that
    closing the test's buses and stopping the server do not wait on it."""
    try:
        yield own_redis
    finally:
        own_redis.resume()


def test_emit_raises_transport_error_within_the_bound_while_redis_does_not_answer(
    paused_later: RedisServer, own_streams: Streams
) -> None:
    """emit() against a Redis that stopped answering raises TransportError within twice
    socket_timeout, on the connection it had and on a new one."""
    producer = own_streams.bus(socket_timeout=SOCKET_TIMEOUT)
    producer.emit("tick", {"n": 0})  # connected, group created
    paused_later.pause()
    durations = []
    for n in (1, 2):  # the first times out on its open connection, the second connecting anew
        started = time.monotonic()
        with pytest.raises(TransportError, match="could not publish 'tick'"):
            producer.emit("tick", {"n": n})
        durations.append(time.monotonic() - started)
    paused_later.resume()
    assert max(durations) < PRODUCER_BOUND, durations
    producer.emit("tick", {"n": 3})  # answering again: emit works again


def test_ping_raises_transport_error_while_redis_does_not_answer(
    paused_later: RedisServer, own_streams: Streams
) -> None:
    """ping() returns None while Redis answers and raises TransportError within twice
    socket_timeout once it stops answering."""
    transport = own_streams.transport(socket_timeout=SOCKET_TIMEOUT)
    assert transport.ping() is None
    paused_later.pause()
    started = time.monotonic()
    with pytest.raises(TransportError, match="did not answer PING"):
        transport.ping()
    assert time.monotonic() - started < PRODUCER_BOUND
    paused_later.resume()
    assert transport.ping() is None


def test_ping_raises_transport_error_while_redis_is_down(
    own_redis: RedisServer, own_streams: Streams
) -> None:
    """ping() raises TransportError when nothing listens on Redis's port."""
    transport = own_streams.transport(socket_timeout=SOCKET_TIMEOUT)
    own_redis.stop()
    with pytest.raises(TransportError, match="did not answer PING"):
        transport.ping()


def test_reader_times_out_on_a_stalled_redis_and_resumes_afterwards(
    paused_later: RedisServer, own_streams: Streams
) -> None:
    """A consumer's reader whose Redis stops answering reports a timeout within block +
    socket_timeout (and some slack), and delivers again once Redis answers."""
    # A short claim_idle: an XREADGROUP that timed out may still be run by Redis once it
    # answers again, and hand the next entry to that closed connection; the entry is then
    # pending for this consumer, which takes it over after claim_idle.
    consumer = own_streams.bus(socket_timeout=SOCKET_TIMEOUT, claim_idle=1.0)
    received = Tally(expected=2)
    consumer.subscribe("tick", received)
    consumer.recover()
    producer = own_streams.bus(socket_timeout=SOCKET_TIMEOUT)
    first = producer.emit("tick", {"n": 1})
    wait_until(lambda: received.ids == [first.id], "the first event was delivered")
    wait_until(lambda: own_streams.pending() == 0, "the first entry was acknowledged")
    with capture_logs() as logs:
        paused_at = time.monotonic()
        paused_later.pause()
        wait_until(
            lambda: any(
                log["event"] == "eventbus.internal_error" and "Timeout" in log["error"]
                for log in logs
            ),
            "the reader reported the stalled connection",
        )
        reported_after = time.monotonic() - paused_at
        paused_later.resume()
        second = producer.emit("tick", {"n": 2})
        received.wait("the second event was delivered after Redis answered again")
    assert received.ids == [first.id, second.id]
    assert reported_after < BLOCK + SOCKET_TIMEOUT + 1.0
    errors = [log for log in logs if log["event"] == "eventbus.internal_error"]
    assert {log["where"] for log in errors} == {"transport"}


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
def test_socket_timeout_must_be_a_positive_number_of_seconds(value: float) -> None:
    """RedisStreamsTransport refuses a socket_timeout that is not a finite number > 0."""
    with pytest.raises(ValueError, match="socket_timeout must be a finite number of seconds > 0"):
        RedisStreamsTransport("redis://127.0.0.1:1/0", socket_timeout=value)


# -- closing ---------------------------------------------------------------------------------


def test_close_leaves_an_entry_waiting_for_a_retry_unacknowledged(streams: Streams) -> None:
    """close() while a delivery waits for its retry backoff leaves the entry pending and logs
    handler.left_in_stream."""
    clock = FakeClock()  # never advanced: the retry never comes due
    consumer = streams.bus(bus_options={"clock": clock, "retry": RetryPolicy(max_attempts=3)})
    scheduled = threading.Event()

    def failing(event: Event) -> None:
        raise RuntimeError("try again later")

    def on_retry_scheduled(sender: object, **details: Any) -> None:
        scheduled.set()

    consumer.subscribe("order:placed", failing)
    signals.retry_scheduled.connect(on_retry_scheduled, sender=consumer)
    try:
        consumer.recover()
        event = streams.bus().emit("order:placed", {"order_id": 1})
        assert scheduled.wait(WAIT), "the failed delivery was never scheduled for a retry"
    finally:
        signals.retry_scheduled.disconnect(on_retry_scheduled, sender=consumer)
    with capture_logs() as logs:
        consumer.close(timeout=WAIT)
    left = [log for log in logs if log["event"] == "handler.left_in_stream"]
    assert [(log["event_id"], log["handler"].endswith("failing")) for log in left] == [
        (event.id, True)
    ]
    assert streams.pending() == 1


# -- API misuse ------------------------------------------------------------------------------


def test_emit_with_key_is_refused_with_a_transport(streams: Streams) -> None:
    """emit(..., key=...) raises ValueError on a bus with a transport, publishing nothing."""
    producer = streams.bus()
    with pytest.raises(ValueError, match="key= needs a store"):
        producer.emit("order:placed", {"order_id": 1}, key="order-1")
    assert not streams.redis.exists(streams.stream)


def test_store_and_transport_together_make_the_store_an_outbox(streams: Streams) -> None:
    """EventBus(store=..., transport=...) commits each emit to the store and relays it to the
    stream: the event is in the stream once drain() returns, and the store marks it relayed."""
    store = MemoryStore()
    producer = EventBus(store=store, transport=streams.transport())
    try:
        event = producer.emit("order:placed", {"order_id": 1})
        assert producer.drain(10)
        assert streams.redis.xlen(streams.stream) == 1
        assert {h: d.state for h, d in store.status(event.id).items()} == {
            "eventbus.relay": "succeeded"
        }
    finally:
        producer.close()


# -- once ------------------------------------------------------------------------------------


def test_once_runs_a_handler_once_per_event_id(streams: Streams) -> None:
    """A handler wrapped with once() runs once for an event delivered twice."""
    calls: list[str] = []

    def effect(event: Event) -> None:
        calls.append(event.id)

    wrapped = streams.transport().once(effect)
    event = Event(name="order:placed", payload={"order_id": 1})
    wrapped(event)
    wrapped(event)
    assert calls == [event.id]


def test_once_runs_the_handler_again_for_another_event(streams: Streams) -> None:
    """A handler wrapped with once() runs for each distinct event id."""
    calls: list[str] = []

    def effect(event: Event) -> None:
        calls.append(event.id)

    wrapped = streams.transport().once(effect)
    first = Event(name="order:placed", payload={"order_id": 1})
    second = Event(name="order:placed", payload={"order_id": 2})
    wrapped(first)
    wrapped(second)
    assert calls == [first.id, second.id]


def test_once_is_shared_by_consumers_of_one_stream(streams: Streams) -> None:
    """A success recorded by one consumer's once() wrapper is seen by another consumer's."""
    calls: list[str] = []

    def effect(event: Event) -> None:
        calls.append(event.id)

    event = Event(name="order:placed", payload={"order_id": 1})
    streams.transport().once(effect)(event)
    streams.transport().once(effect)(event)
    assert calls == [event.id]


def test_once_refuses_an_event_another_consumer_is_running(streams: Streams) -> None:
    """While one consumer runs the event, another consumer's call raises
    DuplicateInFlightError."""
    started, release = threading.Event(), threading.Event()

    def slow(event: Event) -> None:
        started.set()
        release.wait(WAIT)

    event = Event(name="order:placed", payload={"order_id": 1})
    first = threading.Thread(target=streams.transport().once(slow), args=(event,))
    first.start()
    try:
        assert started.wait(WAIT), "the first call never started"
        with pytest.raises(DuplicateInFlightError):
            streams.transport().once(slow)(event)
    finally:
        release.set()
        first.join(WAIT)
    assert not first.is_alive()


def test_once_failure_records_nothing_so_a_redelivery_runs_again(streams: Streams) -> None:
    """A wrapped handler that raised runs again when the event is delivered again."""
    calls: list[str] = []

    def flaky(event: Event) -> None:
        calls.append(event.id)
        if len(calls) == 1:
            raise RuntimeError("first attempt fails")

    wrapped = streams.transport().once(flaky)
    event = Event(name="order:placed", payload={"order_id": 1})
    with pytest.raises(RuntimeError, match="first attempt fails"):
        wrapped(event)
    wrapped(event)
    wrapped(event)
    assert calls == [event.id, event.id]


def test_once_keeps_the_handler_name(streams: Streams) -> None:
    """The once() wrapper keeps the handler's __name__ and __qualname__."""

    def send_confirmation(event: Event) -> None:
        pass

    wrapped = streams.transport().once(send_confirmation)
    assert wrapped.__name__ == "send_confirmation"
    assert wrapped.__qualname__ == send_confirmation.__qualname__
