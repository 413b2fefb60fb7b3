"""The outbox relay (eventbus/_relay.py): ``EventBus(store=S, transport=T)`` commits each
``emit()`` to the store with one ``"eventbus.relay"`` delivery, and a relay thread publishes it to
the Redis stream afterwards, in order, marking it succeeded in the store; through a Redis outage,
a ``close()`` during one, and a new bus on the same store that takes over what was left.

Every test gets its own stream and group names (on the session server, or on a server of its
own when it stops Redis). Synchronisation is by ``drain()``, ``threading.Event``s and
conditions set by handlers (bounded waits), and bounded polls of the stream (XLEN, XRANGE) and
of the store: nothing sleeps to wait for work. The one deliberate wait is the 5 s outage of the
outage test: its length is the scenario.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from structlog.testing import capture_logs

from eventbus import Event, EventBus
from eventbus.stores import MemoryStore, PostgresStore, SQLiteStore
from eventbus.transports import RedisStreamsTransport
from eventbus.typing import Store
from tests.support.redis import RedisServer
from tests.support.waiting import poll_until

pytestmark = pytest.mark.integration

#: Upper bound for waits that normally end at once; only a broken relay waits this long.
WAIT = 10.0
#: A consumer's XREADGROUP wait: short, so that close() and test teardown are quick.
BLOCK = 0.05
#: The pseudo-handler of every outbox row.
RELAY = "eventbus.relay"

Connection = Any  # sqlite3.Connection or psycopg.Connection


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    poll_until(predicate, what, timeout, every=0.01)


def relay_state(store: Store, event_id: str) -> str | None:
    """The state the store shows for the event's relay row (``None``: no such event)."""
    status = store.status(event_id)
    return None if status is None else status[RELAY].state


class Received:
    """A thread-safe handler recording each event it gets, and when (wall clock)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.events: list[Event] = []
        self.times: list[float] = []

    def __call__(self, event: Event) -> None:
        with self._changed:
            self.events.append(event)
            self.times.append(time.time())
            self._changed.notify_all()

    def wait_count(self, count: int, timeout: float = WAIT) -> None:
        with self._changed:
            got = self._changed.wait_for(lambda: len(self.events) >= count, timeout)
        assert got, f"timed out after {timeout}s waiting for {count} event(s)"


class Outbox:
    """One test's stream and group on a Redis server: transports and buses on them (closed at
    the end) and a client to read the stream."""

    def __init__(self, url: str) -> None:
        suffix = uuid.uuid4().hex
        self.url = url
        self.stream = f"test:outbox:{suffix}"
        self.group = f"group:{suffix}"
        # Any, as in the transport: redis-py's return types are unions shared with asyncio.
        self.redis: Any = redis.Redis.from_url(url, decode_responses=True)
        self._buses: list[EventBus] = []

    def transport(self) -> RedisStreamsTransport:
        # trim=False: a consumer's upkeep must not delete entries the test reads with XRANGE.
        return RedisStreamsTransport(
            self.url, stream=self.stream, group=self.group, block=BLOCK, trim=False
        )

    def track(self, bus: EventBus) -> EventBus:
        self._buses.append(bus)
        return bus

    def producer(self, store: Store, **options: Any) -> EventBus:
        """A bus whose *store* is the outbox of this test's stream."""
        return self.track(EventBus(store=store, transport=self.transport(), **options))

    def consumer(self, **options: Any) -> EventBus:
        """A plain transport bus (call ``start()`` once handlers are subscribed)."""
        options.setdefault("max_workers", 2)
        return self.track(EventBus(transport=self.transport(), **options))

    # -- reading the stream ------------------------------------------------------------------

    def entries(self) -> list[tuple[str, dict[str, str]]]:
        return list(self.redis.xrange(self.stream))

    def event_ids(self) -> list[str]:
        """The event id of every entry, in stream order."""
        return [fields["id"] for _entry, fields in self.entries()]

    def length(self) -> int:
        return int(self.redis.xlen(self.stream))

    def reconnect(self) -> None:
        """Drop the reading client's connections (after a Redis restart)."""
        self.redis.connection_pool.disconnect()

    def close(self) -> None:
        for bus in self._buses:
            bus.close(timeout=WAIT)
        self.redis.close()


@pytest.fixture
def outbox(redis_url: str) -> Iterator[Outbox]:
    """Fresh stream and group names on the session server, and cleanup of the test's buses."""
    made = Outbox(redis_url)
    yield made
    made.close()


@pytest.fixture
def persistent_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own that keeps what it acknowledged across a restart
    (append-only file, fsynced before each reply), so a stream read after an outage shows
    every entry ever acknowledged."""
    with RedisServer(persistent=True) as server:
        yield server


# -- emitting and relaying --------------------------------------------------------------------


def test_emit_returns_the_event_and_the_relay_publishes_it_once(
    outbox: Outbox, tmp_path: Path
) -> None:
    """emit() returns the event; the relay publishes it once and marks it; a consumer gets it."""
    consumer = outbox.consumer()
    received = Received()
    consumer.subscribe("order:placed", received)
    consumer.start()
    store = SQLiteStore(tmp_path / "outbox.sqlite3")
    producer = outbox.producer(store)

    event = producer.emit("order:placed", {"order_id": 7}, metadata={"request_id": "r1"})

    assert isinstance(event, Event)
    assert (event.name, event.payload) == ("order:placed", {"order_id": 7})
    assert producer.drain(WAIT)
    assert outbox.event_ids() == [event.id]
    assert relay_state(store, event.id) == "succeeded"
    received.wait_count(1)
    [got] = received.events
    assert (got.id, got.name, got.payload) == (event.id, "order:placed", {"order_id": 7})
    assert got.metadata == {"request_id": "r1"}


def test_store_shows_the_relay_row_succeeded_as_soon_as_drain_returns(
    outbox: Outbox, tmp_path: Path
) -> None:
    """Right after drain() returns, the store shows each relayed event's row succeeded."""
    store = SQLiteStore(tmp_path / "outbox.sqlite3")
    producer = outbox.producer(store)
    seen = []
    for number in range(10):
        event = producer.emit("order:placed", {"order_id": number})
        assert producer.drain(WAIT)
        seen.append(relay_state(store, event.id))
    assert seen == ["succeeded"] * 10


def test_events_are_published_in_emit_order(outbox: Outbox, tmp_path: Path) -> None:
    """500 emits reach the stream once each, in the order they were emitted."""
    producer = outbox.producer(SQLiteStore(tmp_path / "outbox.sqlite3"))
    emitted = [producer.emit("tick", {"n": n}).id for n in range(500)]
    assert producer.drain(WAIT)
    assert outbox.event_ids() == emitted


def test_memory_store_outbox_relays_too(outbox: Outbox) -> None:
    """A MemoryStore as the outbox: emit, drain, and the stream holds the event."""
    store = MemoryStore()
    producer = outbox.producer(store)
    event = producer.emit("order:placed", {"order_id": 3})
    assert producer.drain(WAIT)
    assert outbox.event_ids() == [event.id]
    assert relay_state(store, event.id) == "succeeded"


# -- emit(..., within=conn) ---------------------------------------------------------------------


class AppDatabase:
    """The application's database, which the outbox store shares (an SQLite file, or a
    PostgreSQL database), with an ``orders`` table; closes the connections it made."""

    def __init__(self, kind: str, tmp_path: Path, dsn: str | None) -> None:
        self.kind = kind
        self.path = tmp_path / "app.sqlite3"
        self.dsn = dsn
        self._connections: list[Connection] = []
        self.store: Store = SQLiteStore(self.path) if kind == "sqlite" else PostgresStore(str(dsn))
        conn = self.connect()
        conn.execute("CREATE TABLE orders (id integer PRIMARY KEY)")
        conn.commit()

    def connect(self) -> Connection:
        """A connection of the application's own, in transaction mode."""
        conn: Connection = (
            sqlite3.connect(self.path) if self.kind == "sqlite" else psycopg.connect(self.dsn)
        )
        self._connections.append(conn)
        return conn

    def orders(self) -> list[int]:
        with contextlib.closing(self.connect()) as conn:
            rows = conn.execute("SELECT id FROM orders ORDER BY id").fetchall()
            conn.rollback()
        return [order_id for (order_id,) in rows]

    def close(self) -> None:
        for conn in self._connections:
            with contextlib.suppress(Exception):
                conn.rollback()
            conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def app_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AppDatabase]:
    """The application's database of each kind (PostgreSQL: a fresh database)."""
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgres" else None
    made = AppDatabase(request.param, tmp_path, dsn)
    try:
        yield made
    finally:
        made.close()


def test_emit_within_relays_only_what_the_transaction_committed(
    outbox: Outbox, app_db: AppDatabase
) -> None:
    """A rolled-back emit(within=conn) never reaches the stream; a committed one does."""
    producer = outbox.producer(app_db.store)
    conn = app_db.connect()
    conn.execute("INSERT INTO orders (id) VALUES (1)")
    rolled_back = producer.emit("order:placed", {"order_id": 1}, within=conn)
    conn.rollback()
    conn.execute("INSERT INTO orders (id) VALUES (2)")
    committed = producer.emit("order:placed", {"order_id": 2}, within=conn)
    conn.commit()

    # The committed event, written after the rolled-back one, is the sentinel: once it is in
    # the stream, the relay has claimed everything committed before it.
    wait_until(lambda: outbox.length() >= 1, "the committed event is in the stream")
    assert outbox.event_ids() == [committed.id]
    assert app_db.orders() == [2]
    assert app_db.store.status(rolled_back.id) is None
    wait_until(
        lambda: relay_state(app_db.store, committed.id) == "succeeded", "the relay row succeeded"
    )


def test_drain_waits_for_events_committed_within_before_it(outbox: Outbox, tmp_path: Path) -> None:
    """drain() after a within= commit returns only once that event is in the stream."""
    app_db = AppDatabase("sqlite", tmp_path, None)
    try:
        producer = outbox.producer(app_db.store)
        conn = app_db.connect()
        missing = []
        for number in range(5):
            event = producer.emit("order:placed", {"order_id": number}, within=conn)
            conn.commit()
            assert producer.drain(WAIT)
            if event.id not in outbox.event_ids():
                missing.append(number)
        # Let the relay finish before the test ends (its log records would outlive it).
        wait_until(lambda: outbox.length() >= 5, "every committed event is in the stream")
        assert missing == [], f"not yet in the stream when drain() returned: {missing}"
    finally:
        app_db.close()


# -- key= and delay= -----------------------------------------------------------------------------


def test_emit_with_a_known_key_returns_the_first_event_and_publishes_nothing(
    outbox: Outbox, tmp_path: Path
) -> None:
    """A second emit with the same key, before or after the first is published, adds nothing."""
    producer = outbox.producer(SQLiteStore(tmp_path / "outbox.sqlite3"))
    first = producer.emit("order:paid", {"order_id": 1}, key="pay-1")
    assert producer.emit("order:paid", {"order_id": 1}, key="pay-1").id == first.id
    assert producer.drain(WAIT)
    assert producer.emit("order:paid", {"order_id": 1}, key="pay-1").id == first.id
    other = producer.emit("order:paid", {"order_id": 2}, key="pay-2")  # a new key publishes
    assert producer.drain(WAIT)
    assert outbox.event_ids() == [first.id, other.id]


def test_delayed_emit_is_published_with_not_before_and_held_by_the_consumer(
    outbox: Outbox, tmp_path: Path
) -> None:
    """delay= is published at once with a not_before field; the consumer runs it no earlier."""
    consumer = outbox.consumer()
    received = Received()
    consumer.subscribe("reminder", received)
    consumer.start()
    producer = outbox.producer(SQLiteStore(tmp_path / "outbox.sqlite3"))

    before = time.time()
    event = producer.emit("reminder", {"n": 1}, delay=0.5)
    after = time.time()

    assert producer.drain(WAIT)
    [(_entry, fields)] = outbox.entries()
    assert fields["id"] == event.id
    not_before = float(fields["not_before"])
    assert before + 0.5 <= not_before <= after + 0.5
    received.wait_count(1)
    # A lower bound the consumer enforces (10 ms of slack for wall vs monotonic clocks).
    assert received.times[0] >= not_before - 0.01


# -- handlers of the producing bus ---------------------------------------------------------------


def test_producer_that_does_not_consume_never_runs_its_handlers(
    outbox: Outbox, tmp_path: Path
) -> None:
    """emit() on an outbox bus without start() runs none of its handlers; consumers get it."""
    consumer = outbox.consumer()
    elsewhere = Received()
    consumer.subscribe("order:placed", elsewhere)
    consumer.start()
    producer = outbox.producer(SQLiteStore(tmp_path / "outbox.sqlite3"))
    here = Received()
    producer.subscribe("order:placed", here)

    event = producer.emit("order:placed", {"order_id": 1})

    elsewhere.wait_count(1)
    assert producer.drain(WAIT)
    assert [e.id for e in elsewhere.events] == [event.id]
    assert here.events == []


def test_producer_that_also_consumes_runs_its_handler_once_through_the_stream(
    outbox: Outbox, tmp_path: Path
) -> None:
    """An outbox bus that start()s gets its own event from the stream, delivered once."""
    bus = outbox.producer(SQLiteStore(tmp_path / "outbox.sqlite3"), max_workers=2)
    received = Received()
    bus.subscribe("order:placed", received)
    bus.start()

    event = bus.emit("order:placed", {"order_id": 1})

    received.wait_count(1)
    assert bus.drain(WAIT)
    [(entry_id, _fields)] = outbox.entries()
    # Read from the stream by this group and acknowledged: nothing of it is still to come.
    [group] = outbox.redis.xinfo_groups(outbox.stream)
    assert group["last-delivered-id"] == entry_id
    wait_until(
        lambda: int(outbox.redis.xpending(outbox.stream, outbox.group)["pending"]) == 0,
        "the entry is acknowledged",
    )
    assert [e.id for e in received.events] == [event.id]


# -- Redis outages -------------------------------------------------------------------------------


def test_redis_outage_mid_burst_delays_events_and_loses_none(
    persistent_redis: RedisServer, tmp_path: Path
) -> None:
    """Redis down 5 s mid-burst: emits stay fast, and afterwards all 1,000 are published once."""
    outbox = Outbox(persistent_redis.url)
    try:
        with capture_logs() as logs:
            producer = outbox.producer(SQLiteStore(tmp_path / "outbox.sqlite3"))
            emitted = [producer.emit("tick", {"n": n}).id for n in range(300)]
            persistent_redis.stop()
            slowest = 0.0
            for n in range(300, 600):
                started = time.monotonic()
                emitted.append(producer.emit("tick", {"n": n}).id)
                slowest = max(slowest, time.monotonic() - started)
            # Not a wait for work: the outage's length is the scenario (Redis stays down 5 s).
            threading.Event().wait(5)
            persistent_redis.start()
            emitted += [producer.emit("tick", {"n": n}).id for n in range(600, 1000)]
            assert producer.drain(timeout=60)
        outbox.reconnect()
        published = outbox.event_ids()
    finally:
        outbox.close()

    # emit() only commits to the store: the outage never reaches the caller.
    assert slowest < 0.5, f"an emit during the outage took {slowest:.3f}s"
    names = [record["event"] for record in logs]
    failed = [record for record in logs if record["event"] == "relay.publish_failed"]
    assert len(failed) == 1, f"relay.publish_failed logged {len(failed)} times"
    assert failed[0]["log_level"] == "warning"
    assert names.count("relay.resumed") == 1
    assert names.index("relay.resumed") > names.index("relay.publish_failed")

    assert set(published) == set(emitted), "events lost"
    # Each once: the relay publishes one at a time and marks after. The one publish that may
    # have reached Redis without its reply reaching the relay is the one the stop cut off,
    # named by relay.publish_failed (at least once); any other duplicate is a relay bug.
    duplicates = {event_id: n for event_id, n in Counter(published).items() if n > 1}
    assert set(duplicates) <= {failed[0]["event_id"]}, f"duplicated: {duplicates}"
    assert all(n == 2 for n in duplicates.values()), f"duplicated: {duplicates}"
    assert list(dict.fromkeys(published)) == emitted, "published out of emit order"


def test_close_during_an_outage_is_prompt_and_the_next_bus_publishes_what_was_left(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """close() while Redis is down returns at once; a new bus on the store publishes the rest."""
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(own_redis.url)
    try:
        own_redis.stop()
        with capture_logs() as logs:
            first = outbox.producer(SQLiteStore(path))
            emitted = [first.emit("tick", {"n": n}).id for n in range(20)]
            started = time.monotonic()
            first.close(timeout=None)
            took = time.monotonic() - started

        assert took < 5, f"close() took {took:.1f}s during the outage"
        left = [record for record in logs if record["event"] == "handler.left_in_store"]
        assert sorted(record["event_id"] for record in left) == sorted(emitted)
        assert {(record["handler"], record["state"]) for record in left} == {(RELAY, "unpublished")}
        with contextlib.closing(sqlite3.connect(path)) as db:
            rows = db.execute(
                "SELECT state, owner FROM deliveries WHERE handler = ?", (RELAY,)
            ).fetchall()
        assert rows == [("pending", None)] * 20  # released: anyone's to claim

        own_redis.start()  # empty: the server keeps nothing, and nothing was published
        outbox.reconnect()
        second = outbox.producer(SQLiteStore(path))
        # The new relay claims the released rows on its first round; drain() alone does not
        # wait for that claim (see test_drain_waits_for_events_committed_within_before_it).
        wait_until(lambda: outbox.length() >= 20, "the left events are published")
        assert second.drain(WAIT)
        assert outbox.event_ids() == emitted
    finally:
        outbox.close()
