"""EventBus with a store: idempotent emits, commits before handlers run, close() leaving work in
the store, recover() and polling, stored dead letters, typed events across a restart.

Tests that make sense without a store too are parametrised over ``[None, "memory", "sqlite"]``.
Handlers run inline and backoffs wait on a FakeClock; a "restart" is a new bus on the same
store data (the same MemoryStore object, or a new SQLiteStore on the same file). Nothing
sleeps.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import tenacity
from structlog.testing import capture_logs

from eventbus import (
    BusClosedError,
    Delivery,
    Event,
    EventBus,
    RetryPolicy,
    UnknownDeadLetterError,
    UnknownEventError,
    UnknownHandlerError,
)
from eventbus.stores import MemoryStore, SQLiteStore
from eventbus.testing import FakeClock, InlineExecutor
from eventbus.typing import Store
from tests.support.damaged_rows import DAMAGE, damage
from tests.support.executors import QueueingExecutor

#: A retry policy whose one retry waits 10 s (on the fake clock).
RETRY_IN_10S = RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(10))
#: No retries: the first failure is a dead letter.
ONE_ATTEMPT = RetryPolicy(max_attempts=1)
#: Upper bound on filler emits while waiting for retention to evict an event.
EVICT_BOUND = 5000


@dataclass(frozen=True)
class OrderCreated:
    event_name: ClassVar[str] = "order:created"
    order_id: int
    email: str
    lines: list[str]


class Calls:
    """A handler that records the events it gets, failing the first *failures* calls."""

    def __init__(self, failures: int = 0) -> None:
        self.events: list[Event] = []
        self.failures = failures

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if len(self.events) <= self.failures:
            raise ValueError(f"failure {len(self.events)}")

    @property
    def count(self) -> int:
        return len(self.events)


class Backend:
    """One test's store data and the buses and stores made on it; all closed at teardown."""

    def __init__(self, kind: str | None, path: Path, **options: Any) -> None:
        self.kind = kind
        self.path = path
        self.options = options
        self._memory = MemoryStore(**options) if kind == "memory" else None
        self._stores: list[SQLiteStore] = []
        self._buses: list[EventBus] = []

    def store(self) -> Store | None:
        """A store on this data for a new bus (None without a store)."""
        if self.kind is None or self._memory is not None:
            return self._memory
        store = SQLiteStore(self.path, **self.options)
        self._stores.append(store)
        return store

    def outside(self) -> Store:
        """A store to look at the data from outside the open bus (not opened): a second
        SQLiteStore on the file, or the MemoryStore itself."""
        store = self.store()
        assert store is not None
        return store

    def bus(
        self,
        *,
        clock: FakeClock | None = None,
        executor: Any = None,
        retry: RetryPolicy | None = None,
        **options: Any,
    ) -> EventBus:
        bus = EventBus(
            store=self.store(),
            executor=executor if executor is not None else InlineExecutor(),
            clock=clock if clock is not None else FakeClock(),
            retry=retry if retry is not None else RETRY_IN_10S,
            **options,
        )
        self._buses.append(bus)
        return bus

    def close(self) -> None:
        for bus in self._buses:
            bus.close(timeout=0)  # jobs a QueueingExecutor still holds must not block teardown
        for store in self._stores:
            store.close()


@pytest.fixture
def make_backend(tmp_path: Path) -> Iterator[Callable[..., Backend]]:
    made: list[Backend] = []

    def make(kind: str | None, **options: Any) -> Backend:
        backend = Backend(kind, tmp_path / f"bus-{len(made)}.db", **options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture(params=[None, "memory", "sqlite"])
def any_backend(request: pytest.FixtureRequest, make_backend: Callable[..., Backend]) -> Backend:
    """No store, a MemoryStore, or an SQLiteStore."""
    return make_backend(request.param)


@pytest.fixture(params=["memory", "sqlite"])
def durable(request: pytest.FixtureRequest, make_backend: Callable[..., Backend]) -> Backend:
    """A MemoryStore or an SQLiteStore."""
    return make_backend(request.param)


@pytest.fixture
def sqlite_backend(make_backend: Callable[..., Backend]) -> Backend:
    return make_backend("sqlite")


def records(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in logs if r["event"] == name]


def make_dead_letter(backend: Backend, handler_name: str = "h") -> str:
    """Have a bus on *backend* dead-letter one delivery, close it; return the letter's id."""
    bus = backend.bus(retry=ONE_ATTEMPT)
    bus.subscribe("order:created", Calls(failures=1), name=handler_name)
    bus.emit("order:created", {"id": 1})
    [dead] = bus.dead_letters()
    bus.close()
    return dead.id


# -- idempotent emit ------------------------------------------------------------------------


def test_emit_with_a_key_twice_returns_the_first_event(any_backend):
    """A second emit under the same key returns the first event."""
    bus = any_backend.bus()
    bus.subscribe("order:created", Calls(), name="h")
    first = bus.emit("order:created", {"id": 1}, key="order-1")
    assert bus.emit("order:created", {"id": 2}, key="order-1") == first


def test_emit_with_a_key_twice_runs_the_handler_once(any_backend):
    """The second emit under a key delivers nothing."""
    bus = any_backend.bus()
    calls = bus.subscribe("order:created", Calls(), name="h")
    bus.emit("order:created", {"id": 1}, key="order-1")
    bus.emit("order:created", {"id": 2}, key="order-1")
    assert [e.payload for e in calls.events] == [{"id": 1}]


def test_repeated_key_leaves_no_delivery_in_flight(any_backend):
    """An emit answered by its key counts nothing as pending: drain() returns at once."""
    executor = QueueingExecutor()
    bus = any_backend.bus(executor=executor)
    bus.subscribe("order:created", Calls(), name="h")
    bus.emit("order:created", key="order-1")
    executor.run_all()
    bus.emit("order:created", key="order-1")
    assert bus.drain(timeout=0)


@pytest.mark.parametrize("kind", [None, "memory", "sqlite"])
def test_key_is_forgotten_once_its_event_is_evicted(make_backend, kind):
    """After retention evicts the keyed event, the key emits a new event."""
    options = {} if kind is None else {"retention": 1}
    backend = make_backend(kind, **options)
    bus = backend.bus(status_retention=1)
    calls = bus.subscribe("order:created", Calls(), name="h")
    first = bus.emit("order:created", {"id": 1}, key="order-1")
    with capture_logs():  # silence a thousand event.unhandled records
        for _ in range(EVICT_BOUND):
            bus.emit("tick")
            try:
                bus.status(first.id)
            except UnknownEventError:
                break
        else:
            pytest.fail(f"the keyed event was not evicted after {EVICT_BOUND} emits")
    again = bus.emit("order:created", {"id": 2}, key="order-1")
    assert again.id != first.id
    assert calls.count == 2


def test_non_str_key_raises_type_error_and_queues_nothing(any_backend):
    """A key that is not a str raises TypeError and nothing is queued."""
    executor = QueueingExecutor()
    bus = any_backend.bus(executor=executor)
    bus.subscribe("order:created", Calls(), name="h")
    with pytest.raises(TypeError, match="key"):
        bus.emit("order:created", key=42)  # type: ignore[arg-type]
    assert executor.jobs == []
    assert bus.drain(timeout=0)


def test_empty_key_raises_value_error_and_queues_nothing(any_backend):
    """An empty key raises ValueError and nothing is queued."""
    executor = QueueingExecutor()
    bus = any_backend.bus(executor=executor)
    bus.subscribe("order:created", Calls(), name="h")
    with pytest.raises(ValueError, match="key"):
        bus.emit("order:created", key="")
    assert executor.jobs == []
    assert bus.drain(timeout=0)


# -- commits --------------------------------------------------------------------------------


def test_emit_commits_before_returning(durable):
    """With a store, the event's deliveries are committed, pending, before any handler runs."""
    executor = QueueingExecutor()
    bus = durable.bus(executor=executor)
    bus.subscribe("order:created", Calls(), name="h")
    event = bus.emit("order:created", {"id": 1})
    status = durable.outside().status(event.id)
    assert status is not None
    assert (status["h"].state, status["h"].attempts) == ("pending", 0)
    assert len(executor.jobs) == 1


def test_success_is_committed_once_the_bus_is_drained(durable):
    """Once the queued job has run and drain() returned, the store shows it succeeded."""
    executor = QueueingExecutor()
    bus = durable.bus(executor=executor)
    bus.subscribe("order:created", Calls(), name="h")
    event = bus.emit("order:created", {"id": 1})
    executor.run_all()
    assert bus.drain(timeout=0)  # drain() also commits the deferred success
    delivery = durable.outside().status(event.id)["h"]
    assert (delivery.state, delivery.attempts) == ("succeeded", 1)


def test_unserializable_payload_raises_type_error_at_emit(sqlite_backend):
    """Emitting a payload the store cannot encode raises TypeError."""
    bus = sqlite_backend.bus()
    bus.subscribe("order:created", Calls(), name="h")
    with pytest.raises(TypeError, match="set"):
        bus.emit("order:created", {"tags": {1, 2}})


def test_unserializable_payload_stores_and_queues_nothing(sqlite_backend):
    """A refused payload leaves no row in the store and no job on the executor."""
    executor = QueueingExecutor()
    bus = sqlite_backend.bus(executor=executor)
    bus.subscribe("order:created", Calls(), name="h")
    with pytest.raises(TypeError):
        bus.emit("order:created", {"tags": {1, 2}})
    with sqlite3.connect(sqlite_backend.path) as db:
        rows = db.execute("SELECT count(*) FROM events").fetchone()[0]
    db.close()
    assert (rows, executor.jobs) == (0, [])
    assert bus.drain(timeout=0)


def test_bus_still_works_after_an_unserializable_payload(sqlite_backend):
    """After a refused payload the next emit is delivered as usual."""
    bus = sqlite_backend.bus()
    calls = bus.subscribe("order:created", Calls(), name="h")
    with pytest.raises(TypeError):
        bus.emit("order:created", {"tags": {1, 2}})
    event = bus.emit("order:created", {"tags": [1, 2]})
    assert calls.count == 1
    assert bus.status(event.id)["h"].state == "succeeded"


def test_attempt_is_committed_before_the_handler_runs(durable):
    """Inside the handler, the store already shows its delivery running with attempt 1."""
    outside = durable.outside()
    seen: list[tuple[str, int]] = []

    def look(event: Event) -> None:
        delivery = outside.status(event.id)["h"]
        seen.append((delivery.state, delivery.attempts))

    bus = durable.bus()
    bus.subscribe("order:created", look, name="h")
    bus.emit("order:created", {"id": 1})
    assert seen == [("running", 1)]


# -- close and recover ----------------------------------------------------------------------


def leave_retry_in_store(backend: Backend) -> tuple[EventBus, Event]:
    """A bus whose delivery failed once and waits 10 s for its retry; it is not closed yet."""
    bus = backend.bus(retry=RETRY_IN_10S)
    bus.subscribe("order:created", Calls(failures=1), name="h")
    event = bus.emit("order:created", {"id": 1})
    assert bus.status(event.id)["h"].state == "retrying"
    return bus, event


def test_close_leaves_a_retry_that_is_not_due_in_the_store(durable):
    """close() leaves a not-yet-due retry in the store, retrying and due in the future."""
    bus, event = leave_retry_in_store(durable)
    before = time.time()
    bus.close()
    store = durable.outside()
    assert store.status(event.id)["h"].state == "retrying"
    store.open()
    [stored] = store.claim(["h"]).deliveries
    assert stored.state == "retrying"
    assert stored.due_at is not None
    assert stored.due_at > before


def test_close_makes_no_dead_letter_of_a_retry_left_in_the_store(durable):
    """A retry left in the store by close() is not a dead letter."""
    bus, _ = leave_retry_in_store(durable)
    bus.close()
    assert durable.outside().dead_letters() == []


def test_close_logs_the_delivery_left_in_the_store(durable):
    """close() logs handler.left_in_store for the retry it left."""
    bus, event = leave_retry_in_store(durable)
    with capture_logs() as logs:
        bus.close()
    [record] = records(logs, "handler.left_in_store")
    assert (record["event_id"], record["handler"], record["state"]) == (event.id, "h", "retrying")


def test_close_logs_how_many_it_left_in_the_store(durable):
    """The bus.closed record says left_in_store=1 and abandoned=0."""
    bus, _ = leave_retry_in_store(durable)
    with capture_logs() as logs:
        bus.close()
    [record] = records(logs, "bus.closed")
    assert (record["left_in_store"], record["abandoned"]) == (1, 0)


def test_close_without_a_store_logs_no_left_in_store_key(make_backend):
    """Without a store, bus.closed has no left_in_store key."""
    bus = make_backend(None).bus()
    with capture_logs() as logs:
        bus.close()
    [record] = records(logs, "bus.closed")
    assert "left_in_store" not in record


def test_recover_returns_the_number_of_deliveries_taken_over(durable):
    """recover() on a new bus returns how many unfinished deliveries it took over."""
    bus, _ = leave_retry_in_store(durable)
    bus.close()
    again = durable.bus()
    again.subscribe("order:created", Calls(), name="h")
    assert again.recover() == 1


def test_recovered_retry_runs_when_it_comes_due(durable):
    """A recovered retry waits for its due time and then runs once."""
    bus, event = leave_retry_in_store(durable)
    bus.close()
    clock = FakeClock()
    again = durable.bus(clock=clock)
    calls = again.subscribe("order:created", Calls(), name="h")
    again.recover()
    assert calls.count == 0
    clock.advance(11)
    assert [e.id for e in calls.events] == [event.id]
    delivery = again.status(event.id)["h"]
    assert (delivery.state, delivery.attempts) == ("succeeded", 2)


def test_recovered_pending_delivery_runs_at_once(durable):
    """A delivery left pending by a closed bus runs during recover()."""
    executor = QueueingExecutor()
    bus = durable.bus(executor=executor)
    bus.subscribe("order:created", Calls(), name="h")
    event = bus.emit("order:created", {"id": 1})
    bus.close(timeout=0)  # the queued job never started: it stays pending in the store
    again = durable.bus()
    calls = again.subscribe("order:created", Calls(), name="h")
    assert again.recover() == 1
    assert [e.id for e in calls.events] == [event.id]


def test_running_delivery_at_its_last_attempt_becomes_an_exhausted_dead_letter(sqlite_backend):
    """A delivery left running at its last attempt is dead-lettered as exhausted, ProcessLost."""
    first = sqlite_backend.store()
    first.open()
    event = Event(name="order:created", payload={"id": 1})
    first.add(event, ["h"])
    first.close()
    crashed = sqlite_backend.store()  # a process that started attempt 3, then died
    crashed.open()
    crashed.started(event.id, "h", 3)
    crashed.close()
    bus = sqlite_backend.bus(retry=RetryPolicy(max_attempts=3))
    calls = bus.subscribe("order:created", Calls(), name="h")
    assert bus.recover() == 0
    [dead] = bus.dead_letters()
    assert (dead.event.id, dead.reason, dead.attempts) == (event.id, "exhausted", 3)
    assert "ProcessLost" in dead.error
    assert calls.count == 0


def test_running_delivery_with_attempts_left_runs_again(sqlite_backend):
    """A delivery left running before its last attempt is run again on recovery."""
    first = sqlite_backend.store()
    first.open()
    event = Event(name="order:created", payload={"id": 1})
    first.add(event, ["h"])
    first.close()
    crashed = sqlite_backend.store()
    crashed.open()
    crashed.started(event.id, "h", 1)
    crashed.close()
    bus = sqlite_backend.bus(retry=RetryPolicy(max_attempts=3))
    calls = bus.subscribe("order:created", Calls(), name="h")
    assert bus.recover() == 1
    assert calls.count == 1
    assert bus.status(event.id)["h"] == Delivery("h", "succeeded", 2)


# -- unknown handlers -----------------------------------------------------------------------


def leave_pending_for(backend: Backend, handler_name: str) -> Event:
    """Commit an event with one pending delivery for *handler_name*, owned by nobody."""
    store = backend.store()
    assert store is not None
    store.open()
    event = Event(name="order:created", payload={"id": 1})
    store.add(event, [handler_name])
    store.close()
    return event


def leave_pending_beside(backend: Backend, handlers: list[str]) -> Event:
    """While a bus has the store open, commit an event whose deliveries nobody owns (from
    another SQLiteStore on the file; in a MemoryStore, added and released)."""
    event = Event(name="order:created", payload={"id": 2})
    if backend.kind == "memory":
        store = backend.outside()
        store.add(event, handlers)
        store.release([(event.id, h) for h in handlers])
        return event
    store = backend.outside()
    store.open()
    store.add(event, handlers)
    store.close()
    return event


def test_unknown_handler_at_recovery_is_warned_about_once(durable):
    """recover() logs one delivery.unknown_handler warning per name, not again on later polls."""
    leave_pending_for(durable, "gone")
    leave_pending_for(durable, "gone")
    clock = FakeClock()
    bus = durable.bus(clock=clock)
    calls = bus.subscribe("order:created", Calls(), name="h")
    with capture_logs() as logs:
        assert bus.recover() == 0
        later = leave_pending_beside(durable, ["gone", "h"])
        clock.advance(durable.outside().poll_interval)
    assert [e.id for e in calls.events] == [later.id]  # the poll did claim
    [record] = records(logs, "delivery.unknown_handler")
    assert (record["log_level"], record["handler"], record["deliveries"]) == ("warning", "gone", 2)


def test_unknown_handler_delivery_stays_pending(durable):
    """A delivery for a handler this bus lacks stays pending in the store."""
    event = leave_pending_for(durable, "gone")
    bus = durable.bus()
    bus.subscribe("order:created", Calls(), name="h")
    bus.recover()
    assert bus.status(event.id)["gone"].state == "pending"


def test_unknown_handler_delivery_runs_on_a_bus_that_has_it(durable):
    """A bus subscribing the missing handler delivers the delivery left pending."""
    event = leave_pending_for(durable, "gone")
    bus = durable.bus()
    bus.subscribe("order:created", Calls(), name="h")
    bus.recover()
    bus.close()
    again = durable.bus()
    calls = again.subscribe("order:created", Calls(), name="gone")
    assert again.recover() == 1
    assert [e.id for e in calls.events] == [event.id]


# -- dead letters ---------------------------------------------------------------------------


def test_replay_of_a_dead_letter_from_a_previous_bus_runs_the_handler(durable):
    """A dead letter made by a closed bus is replayed by a new bus's handler of that name."""
    dead_id = make_dead_letter(durable)
    bus = durable.bus()
    calls = bus.subscribe("order:created", Calls(), name="h")
    [letter] = bus.dead_letters()
    bus.replay(dead_id)
    assert [e.id for e in calls.events] == [letter.event.id]
    assert bus.status(letter.event.id)["h"].state == "succeeded"


def test_replay_of_a_stored_dead_letter_removes_it(durable):
    """A replayed stored dead letter is no longer listed, by the bus or the store."""
    dead_id = make_dead_letter(durable)
    bus = durable.bus()
    bus.subscribe("order:created", Calls(), name="h")
    bus.replay(dead_id)
    assert bus.dead_letters() == []
    assert durable.outside().dead_letter(dead_id) is None


def test_replay_of_an_unknown_id_raises(any_backend):
    """replay() of an id that is no dead letter raises UnknownDeadLetterError."""
    bus = any_backend.bus()
    with pytest.raises(UnknownDeadLetterError):
        bus.replay("no-such-letter")


def test_replay_without_the_handler_raises_and_keeps_the_letter(durable):
    """replay() when no handler of the letter's name is subscribed raises UnknownHandlerError,
    and the letter stays."""
    dead_id = make_dead_letter(durable)
    bus = durable.bus()
    bus.subscribe("order:created", Calls(), name="other")
    with pytest.raises(UnknownHandlerError):
        bus.replay(dead_id)
    assert [d.id for d in bus.dead_letters()] == [dead_id]


def test_purge_dead_letters_deletes_them(any_backend):
    """purge_dead_letters() returns how many letters there were and leaves none."""
    bus = any_backend.bus(retry=ONE_ATTEMPT)
    bus.subscribe("order:created", Calls(failures=2), name="h")
    bus.emit("order:created", {"id": 1})
    bus.emit("order:created", {"id": 2})
    assert bus.purge_dead_letters() == 2
    assert bus.dead_letters() == []


def test_purged_stored_dead_letters_are_gone_for_the_next_bus(durable):
    """Dead letters purged by one bus are not listed by the next."""
    make_dead_letter(durable)
    bus = durable.bus()
    assert bus.purge_dead_letters() == 1
    bus.close()
    assert durable.bus().dead_letters() == []


# -- status, recover() errors ---------------------------------------------------------------


def test_status_of_an_event_of_a_previous_bus_comes_from_the_store(durable):
    """A new bus reports the status of an event that an earlier bus delivered."""
    bus = durable.bus()
    bus.subscribe("order:created", Calls(), name="h")
    event = bus.emit("order:created", {"id": 1})
    bus.close()
    again = durable.bus()
    delivery = again.status(event.id)["h"]
    assert (delivery.state, delivery.attempts) == ("succeeded", 1)


def test_status_of_an_unknown_event_with_a_store_raises(durable):
    """status() of an id in neither memory nor the store raises UnknownEventError."""
    bus = durable.bus()
    with pytest.raises(UnknownEventError):
        bus.status("no-such-event")


def test_recover_without_a_store_raises_runtime_error(make_backend):
    """recover() on a bus without a store raises RuntimeError."""
    bus = make_backend(None).bus()
    with pytest.raises(RuntimeError, match="store"):
        bus.recover()


def test_recover_after_close_raises_bus_closed_error(durable):
    """recover() after close() raises BusClosedError."""
    bus = durable.bus()
    bus.close()
    with pytest.raises(BusClosedError):
        bus.recover()


# -- polling --------------------------------------------------------------------------------


def test_recovered_bus_polls_for_replays_made_outside(durable):
    """After recover(), a dead letter replayed from outside is delivered at the next poll."""
    clock = FakeClock()
    bus = durable.bus(clock=clock, retry=ONE_ATTEMPT)
    calls = bus.subscribe("order:created", Calls(failures=1), name="h")
    event = bus.emit("order:created", {"id": 1})
    [letter] = bus.dead_letters()
    bus.recover()
    assert durable.outside().replay_dead_letter(letter.id, claim=False) is not None
    assert calls.count == 1
    clock.advance(durable.outside().poll_interval)
    assert [e.id for e in calls.events] == [event.id, event.id]
    assert bus.status(event.id)["h"].state == "succeeded"


def test_bus_without_recover_does_not_poll(durable):
    """A bus that never called recover() schedules no poll."""
    clock = FakeClock()
    durable.bus(clock=clock)
    assert clock.pending == 0


# -- typed events ---------------------------------------------------------------------------


def test_typed_event_survives_a_restart(durable):
    """A dataclass event left pending is delivered after a restart as an equal instance."""
    order = OrderCreated(order_id=7, email="a@example.com", lines=["book", "pen"])
    bus = durable.bus(executor=QueueingExecutor())
    bus.on(OrderCreated, name="orders")(Calls())
    bus.emit(order)
    bus.close(timeout=0)  # the queued job never started: it stays pending in the store
    again = durable.bus()
    calls = again.on(OrderCreated, name="orders")(Calls())
    assert again.recover() == 1
    [received] = calls.events
    assert type(received.payload) is OrderCreated
    assert received.payload == order


def test_a_store_already_in_use_leaves_no_threads_behind(tmp_path):
    """A bus whose store is already open elsewhere raises and stops the threads it started."""
    import threading

    from eventbus.stores import SQLiteStore

    store = SQLiteStore(tmp_path / "events.db")
    with EventBus(store=store, max_workers=2):
        before = set(threading.enumerate())
        with pytest.raises(RuntimeError, match="already used"):
            EventBus(store=store, max_workers=3, name="second")
        started = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        assert started == []


# -- rows that cannot be decoded ------------------------------------------------------------


@pytest.mark.parametrize(("column", "text", "why"), DAMAGE)
def test_recover_delivers_the_good_rows_beside_a_damaged_one(sqlite_backend, column, text, why):
    """recover() delivers every decodable pending event and turns the one that cannot be
    decoded into a dead letter whose error says why."""
    events = [leave_pending_for(sqlite_backend, "h") for _ in range(3)]
    damage(sqlite_backend.path, events[1].id, column, text)
    bus = sqlite_backend.bus()
    calls = bus.subscribe("order:created", Calls(), name="h")
    with capture_logs() as logs:
        assert bus.recover() == 2
    assert sorted(e.id for e in calls.events) == sorted([events[0].id, events[2].id])
    [dead] = bus.dead_letters()
    assert (dead.event.id, dead.handler, dead.reason) == (events[1].id, "h", "not_retryable")
    assert why in dead.error
    [record] = records(logs, "handler.dead_lettered")
    assert record["dead_letter_id"] == dead.id


def test_poll_quarantines_a_damaged_row_and_keeps_polling(sqlite_backend):
    """A damaged row found by a poll becomes a dead letter, the good row beside it is
    delivered, and the bus goes on polling."""
    clock = FakeClock()
    bus = sqlite_backend.bus(clock=clock)
    calls = bus.subscribe("order:created", Calls(), name="h")
    bus.recover()
    bad = leave_pending_beside(sqlite_backend, ["h"])
    good = leave_pending_beside(sqlite_backend, ["h"])
    damage(sqlite_backend.path, bad.id, "occurred_at", "yesterday")
    with capture_logs() as logs:
        clock.advance(sqlite_backend.outside().poll_interval)
    assert [e.id for e in calls.events] == [good.id]
    assert [d.event.id for d in bus.dead_letters()] == [bad.id]
    assert records(logs, "eventbus.internal_error") == []
    later = leave_pending_beside(sqlite_backend, ["h"])
    clock.advance(sqlite_backend.outside().poll_interval)
    assert [e.id for e in calls.events] == [good.id, later.id]


def test_replay_of_a_dead_letter_whose_event_cannot_be_decoded_raises(sqlite_backend):
    """bus.replay() of a dead letter whose stored event no longer decodes raises CodecError
    and the dead letter stays."""
    from eventbus.exceptions import CodecError

    dead_id = make_dead_letter(sqlite_backend)
    bus = sqlite_backend.bus()
    calls = bus.subscribe("order:created", Calls(), name="h")
    [letter] = bus.dead_letters()
    damage(sqlite_backend.path, letter.event.id, "metadata", "[]")
    with pytest.raises(CodecError, match="metadata"):
        bus.replay(dead_id)
    assert [d.id for d in bus.dead_letters()] == [dead_id]
    assert calls.count == 0


def test_stored_retry_due_time_follows_the_bus_clock() -> None:
    """A failed attempt stores its retry's due time from the bus clock's wall time."""
    from eventbus.stores import MemoryStore
    from eventbus.testing import FakeClock, InlineExecutor

    due_times: list[float] = []

    class Recording(MemoryStore):
        def retrying(
            self, event_id: str, handler: str, attempts: int, error: str, due_at: float
        ) -> None:
            due_times.append(due_at)
            super().retrying(event_id, handler, attempts, error, due_at)

    clock = FakeClock()
    clock.advance(10_000)  # far from the real clock: a due time from time.time() would differ
    with EventBus(
        executor=InlineExecutor(),
        clock=clock,
        store=Recording(),
        retry=RetryPolicy(max_attempts=2, wait=tenacity.wait_fixed(30)),
    ) as bus:

        def broken(event: Event) -> None:
            raise RuntimeError("down")

        bus.subscribe("order:created", broken, name="broken")
        bus.emit("order:created")
        assert due_times == [pytest.approx(clock.time() + 30)]


def test_sqlite_store_reports_background_errors_to_the_reporter_it_opened_with(
    tmp_path: Path,
) -> None:
    """SQLiteStore.open(reporter) sends its background errors to that reporter."""
    from eventbus.stores import SQLiteStore

    reported: list[tuple[str, BaseException]] = []

    class Reporter:
        def internal_error(self, where: str, error: BaseException) -> None:
            reported.append((where, error))

        def stream_dead_lettered(self, *args: object) -> None:
            raise AssertionError("a store has no stream")

        def stream_taken_over(self, count: int) -> None:
            raise AssertionError("a store has no stream")

    store = SQLiteStore(tmp_path / "events.sqlite3")
    store.open(Reporter())
    try:
        error = OSError("disk gone")
        store.on_error(error)  # what its background thread calls when a write fails
    finally:
        store.close()
    assert reported == [("store", error)]
