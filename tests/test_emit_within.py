"""emit(..., within=conn): the transactional outbox, on SQLiteStore and PostgresStore.

The shared behaviours run on both stores through a small Backend helper (the store, and
connections of the application's own to the same database, which holds an ``orders`` table);
the PostgreSQL runs are integration tests on a real server (tests/support/postgres.py).
Nothing here sleeps: tests wait on events set by handlers (bounded) or on ``bus.drain()``;
the one short negative wait (handlers must not start before the commit) is 0.2 s.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from eventbus import Delivery, Event, EventBus
from eventbus.exceptions import BusClosedError, UnknownEventError
from eventbus.stores import MemoryStore, PostgresStore, SQLiteStore
from eventbus.typing import Store
from tests.support.postgres import PostgresServer

#: How long a test waits for a handler it expects to run (seconds).
WAIT = 10.0
#: The one negative wait: how long a handler is given to (wrongly) run before the commit.
NOT_BEFORE_COMMIT = 0.2

KINDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)]

Connection = Any  # sqlite3.Connection or psycopg.Connection: both have execute/commit/rollback


class Backend:
    """One store's data (an SQLite file, or a PostgreSQL database) shared by the application
    and the bus: ``store`` (created first, so the eventbus tables exist), ``connect()`` for the
    application's own connections (not in autocommit mode), buses on stores of that data, and
    reads through fresh connections. Everything made is closed by :meth:`close`."""

    def __init__(self, kind: str, tmp_path: Path, dsn: str | None = None) -> None:
        self.kind = kind
        self.path = tmp_path / "app.sqlite3"
        self.dsn = dsn
        self.events_table = "events" if kind == "sqlite" else "eventbus.events"
        self.deliveries_table = "deliveries" if kind == "sqlite" else "eventbus.deliveries"
        self._connections: list[Connection] = []
        self._buses: list[EventBus] = []
        self._stores: list[Store] = []
        self._store_taken = False
        self.store = self.new_store()
        with contextlib.closing(self.connect()) as conn:
            conn.execute("CREATE TABLE orders (id integer PRIMARY KEY)")
            conn.commit()

    def new_store(self) -> Store:
        """Another store object on the same data (as another process would open it)."""
        store: Store
        if self.kind == "sqlite":
            store = SQLiteStore(self.path)
        else:
            assert self.dsn is not None
            store = PostgresStore(self.dsn)
        self._stores.append(store)
        return store

    def connect(self) -> Connection:
        """An application connection to the store's database, in transaction mode."""
        conn: Connection = (
            sqlite3.connect(self.path) if self.kind == "sqlite" else psycopg.connect(self.dsn)
        )
        self._connections.append(conn)
        return conn

    def bus(self, **options: Any) -> EventBus:
        """A bus on ``store`` the first time, on a new store object of the same data after."""
        store = self.store if not self._store_taken else self.new_store()
        self._store_taken = True
        bus = EventBus(store=store, **options)
        self._buses.append(bus)
        return bus

    def transaction(self, conn: Connection) -> contextlib.AbstractContextManager[Any]:
        """The idiomatic transaction block of the connection's driver: commits at its end,
        rolls back when an exception leaves it."""
        return conn if self.kind == "sqlite" else conn.transaction()

    def scalar(self, query: str) -> Any:
        """One value read through a fresh connection (sees only what is committed)."""
        if self.kind == "sqlite":
            with contextlib.closing(sqlite3.connect(self.path)) as conn:
                return conn.execute(query).fetchone()[0]
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(query).fetchone()
            assert row is not None
            return row[0]

    def orders(self) -> list[int]:
        """The committed order ids."""
        if self.kind == "sqlite":
            with contextlib.closing(sqlite3.connect(self.path)) as conn:
                return [i for (i,) in conn.execute("SELECT id FROM orders ORDER BY id")]
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return [i for (i,) in conn.execute("SELECT id FROM orders ORDER BY id")]

    def stored_events(self, event_id: str | None = None) -> int:
        """How many committed event rows there are (of *event_id*, when given)."""
        where = "" if event_id is None else f" WHERE id = '{event_id}'"
        return int(self.scalar(f"SELECT count(*) FROM {self.events_table}{where}"))

    def stored_deliveries(self) -> int:
        return int(self.scalar(f"SELECT count(*) FROM {self.deliveries_table}"))

    def close(self) -> None:
        # Connections first (an open SQLite write transaction would block the stores' final
        # writes), then buses (each closes its store), then stores no bus took.
        for conn in self._connections:
            with contextlib.suppress(Exception):
                conn.rollback()
            conn.close()
        for bus in self._buses:
            bus.close()
        for store in self._stores:
            store.close()


@pytest.fixture(params=KINDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A Backend of each store kind (PostgreSQL: a fresh database of the session server)."""
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgres" else None
    made = Backend(request.param, tmp_path, dsn)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def postgres_backend(tmp_path: Path, postgres_dsn: str) -> Iterator[Backend]:
    """A PostgreSQL Backend, for behaviours SQLite cannot show."""
    made = Backend("postgres", tmp_path, postgres_dsn)
    try:
        yield made
    finally:
        made.close()


class Recorder:
    """A handler that records each event it is called with, and lets a test wait for the
    n-th call or for a given event (bounded)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    @property
    def ids(self) -> list[str]:
        with self._changed:
            return [e.id for e in self.events]

    def wait_for(self, predicate: Callable[[list[Event]], bool], timeout: float = WAIT) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.events), timeout)

    def wait_count(self, count: int, timeout: float = WAIT) -> bool:
        return self.wait_for(lambda events: len(events) >= count, timeout)

    def wait_event(self, event_id: str, timeout: float = WAIT) -> bool:
        return self.wait_for(lambda events: any(e.id == event_id for e in events), timeout)


def insert_order(conn: Connection, order_id: int) -> None:
    """The application's own write (literal SQL: same text for both drivers)."""
    conn.execute(f"INSERT INTO orders (id) VALUES ({int(order_id)})")


def emit_committed(backend: Backend, bus: EventBus, name: str, payload: Any = None) -> Event:
    """Emit within a transaction of its own and commit it."""
    conn = backend.connect()
    event = bus.emit(name, payload, within=conn)
    conn.commit()
    return event


# -- the outbox on both stores ----------------------------------------------------------------


def test_the_order_and_its_event_commit_together_and_each_handler_runs_once(
    backend: Backend,
) -> None:
    """Order row and event commit together; each of two handlers runs once, sees the payload."""
    bus = backend.bus()
    first, second = Recorder(), Recorder()
    bus.subscribe("order:created", first, name="first")
    bus.subscribe("order:created", second, name="second")
    conn = backend.connect()

    insert_order(conn, 42)
    event = bus.emit("order:created", {"order_id": 42}, within=conn)
    assert backend.orders() == []  # neither is visible before the commit
    assert backend.stored_events() == 0
    conn.commit()
    assert backend.orders() == [42]
    assert backend.stored_events(event.id) == 1

    assert first.wait_count(1)
    assert second.wait_count(1)
    assert bus.drain(timeout=WAIT)
    assert first.ids == [event.id]
    assert second.ids == [event.id]
    assert first.events[0].payload == {"order_id": 42}
    assert first.events[0].name == "order:created"
    assert bus.status(event.id) == {
        "first": Delivery("first", "succeeded", 1),
        "second": Delivery("second", "succeeded", 1),
    }


@dataclass
class OrderPlaced:
    order_id: int
    total: float


def test_the_handler_gets_the_event_as_emitted(backend: Backend) -> None:
    """The handler gets the event as emitted: id, time, metadata, a typed payload's class."""
    bus = backend.bus()
    handler = Recorder()
    bus.subscribe(OrderPlaced, handler, name="typed")
    conn = backend.connect()

    event = bus.emit(OrderPlaced(7, 9.5), metadata={"request_id": "r-1"}, within=conn)
    conn.commit()

    assert handler.wait_event(event.id)
    got = handler.events[0]
    assert got.payload == OrderPlaced(7, 9.5)
    assert got.name == "OrderPlaced"
    assert dict(got.metadata) == {"request_id": "r-1"}
    assert got.occurred_at == event.occurred_at


def test_a_rolled_back_emit_delivers_nothing_and_leaves_no_trace(backend: Backend) -> None:
    """After a rollback nothing runs (a later event does), no status, no stored row."""
    bus = backend.bus()
    handler = Recorder()
    bus.subscribe("order:created", handler, name="handler")
    conn = backend.connect()

    insert_order(conn, 1)
    rolled_back = bus.emit("order:created", {"order_id": 1}, within=conn)
    conn.rollback()
    sentinel = emit_committed(backend, bus, "order:created", {"order_id": 2})

    assert handler.wait_event(sentinel.id)
    assert bus.drain(timeout=WAIT)
    assert handler.ids == [sentinel.id]
    with pytest.raises(UnknownEventError):
        bus.status(rolled_back.id)
    assert backend.stored_events(rolled_back.id) == 0
    assert backend.orders() == []


def test_an_exception_in_the_transaction_block_delivers_nothing(backend: Backend) -> None:
    """An exception leaving the driver's transaction block rolls the event back too."""
    bus = backend.bus()
    handler = Recorder()
    bus.subscribe("order:created", handler, name="handler")
    conn = backend.connect()

    emitted: list[Event] = []

    def place_order() -> None:
        with backend.transaction(conn):
            insert_order(conn, 7)
            emitted.append(bus.emit("order:created", {"order_id": 7}, within=conn))
            raise RuntimeError("payment declined")

    with pytest.raises(RuntimeError, match="payment declined"):
        place_order()
    sentinel = emit_committed(backend, bus, "order:created", {"order_id": 8})

    assert handler.wait_event(sentinel.id)
    assert bus.drain(timeout=WAIT)
    assert handler.ids == [sentinel.id]
    assert backend.stored_events(emitted[0].id) == 0
    assert backend.orders() == []


def test_a_committed_transaction_block_delivers(backend: Backend) -> None:
    """A transaction block that ends normally commits the event, which runs."""
    bus = backend.bus()
    handler = Recorder()
    bus.subscribe("order:created", handler, name="handler")
    conn = backend.connect()

    with backend.transaction(conn):
        insert_order(conn, 9)
        event = bus.emit("order:created", {"order_id": 9}, within=conn)

    assert handler.wait_event(event.id)
    assert backend.orders() == [9]


def test_handlers_do_not_start_before_the_commit(backend: Backend) -> None:
    """Nothing runs while the transaction is open; it runs once it commits."""
    bus = backend.bus()
    started = threading.Event()
    bus.subscribe("order:created", lambda event: started.set(), name="handler")
    conn = backend.connect()

    insert_order(conn, 1)
    bus.emit("order:created", {"order_id": 1}, within=conn)
    assert not started.wait(NOT_BEFORE_COMMIT)
    conn.commit()
    assert started.wait(WAIT)


def test_drain_after_the_commit_waits_for_the_delivery(backend: Backend) -> None:
    """drain() called right after the commit waits for the event's handler."""
    bus = backend.bus()
    handler = Recorder()
    bus.subscribe("order:created", handler, name="handler")

    for n in range(10):  # each round races drain()'s own look against the background one
        event = emit_committed(backend, bus, "order:created", {"order_id": n})
        assert bus.drain(timeout=WAIT)
        assert handler.ids[-1:] == [event.id]
    assert bus.status(event.id) == {"handler": Delivery("handler", "succeeded", 1)}


def test_drain_waits_for_what_a_background_look_claimed_but_has_not_queued_yet(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """drain() waits for deliveries a background look claimed but has not queued yet."""
    bus = backend.bus()
    handler = Recorder()
    bus.subscribe("order:created", handler, name="handler")
    store = backend.store
    claim = store.claim
    test_thread = threading.current_thread()
    claimed_in_background = threading.Event()
    drained = threading.Event()

    def claim_then_linger(handlers: Any) -> Any:
        # The background look's claim lingers (bounded) between the claim and the queueing,
        # where a thread switch can leave it on its own: the race made deterministic.
        result = claim(handlers)
        in_background = threading.current_thread() is not test_thread
        if result.deliveries and in_background and not claimed_in_background.is_set():
            claimed_in_background.set()
            drained.wait(0.5)
        return result

    monkeypatch.setattr(store, "claim", claim_then_linger)
    event = emit_committed(backend, bus, "order:created", {"order_id": 1})
    assert claimed_in_background.wait(WAIT)
    drained_in_time = bus.drain(timeout=WAIT)
    ran_by_then = handler.ids
    drained.set()
    assert handler.wait_event(event.id)  # it does run: the question is whether drain waited
    assert bus.drain(timeout=WAIT)
    assert drained_in_time
    assert ran_by_then == [event.id]
    assert bus.status(event.id) == {"handler": Delivery("handler", "succeeded", 1)}


def test_an_emit_with_a_known_key_returns_the_first_event_and_delivers_nothing_more(
    backend: Backend,
) -> None:
    """key=: emitting a committed key again returns the first event and delivers nothing."""
    bus = backend.bus()
    handler = Recorder()
    bus.subscribe("order:created", handler, name="handler")

    conn = backend.connect()
    first = bus.emit("order:created", {"order_id": 1}, key="order-1", within=conn)
    conn.commit()
    assert handler.wait_event(first.id)
    again = bus.emit("order:created", {"order_id": 1}, key="order-1", within=conn)
    conn.commit()
    assert again.id == first.id
    assert again.payload == {"order_id": 1}
    sentinel = emit_committed(backend, bus, "order:created", {"order_id": 2})

    assert handler.wait_event(sentinel.id)
    assert bus.drain(timeout=WAIT)
    assert handler.ids == [first.id, sentinel.id]
    assert backend.stored_events() == 2
    assert backend.stored_deliveries() == 2


def test_the_same_key_twice_in_one_transaction_stores_one_event(backend: Backend) -> None:
    """key=: the same key twice in one transaction stores and delivers one event."""
    bus = backend.bus()
    handler = Recorder()
    bus.subscribe("order:created", handler, name="handler")
    conn = backend.connect()

    first = bus.emit("order:created", {"order_id": 1}, key="order-1", within=conn)
    again = bus.emit("order:created", {"order_id": 1}, key="order-1", within=conn)
    conn.commit()
    assert again.id == first.id
    sentinel = emit_committed(backend, bus, "order:created", {"order_id": 2})

    assert handler.wait_event(sentinel.id)
    assert bus.drain(timeout=WAIT)
    assert sorted(handler.ids) == sorted([first.id, sentinel.id])
    assert backend.stored_deliveries() == 2


def test_a_delayed_emit_within_is_scheduled_after_the_commit(backend: Backend) -> None:
    """delay=: after the commit the delivery is scheduled and has not run."""
    bus = backend.bus()
    handler = Recorder()
    bus.subscribe("order:created", handler, name="handler")

    event = emit_committed(backend, bus, "order:created", {"order_id": 1})
    delayed_conn = backend.connect()
    delayed = bus.emit("order:created", {"order_id": 2}, delay=3600, within=delayed_conn)
    delayed_conn.commit()
    assert handler.wait_event(event.id)

    bus.drain(timeout=NOT_BEFORE_COMMIT)  # False: the delayed delivery is still waiting
    assert bus.status(delayed.id) == {"handler": Delivery("handler", "scheduled", 0)}
    assert handler.ids == [event.id]


def test_events_of_one_transaction_run_in_emit_order_for_an_ordered_handler(
    backend: Backend,
) -> None:
    """20 events of one transaction reach an ordered_by handler in emit order."""
    bus = backend.bus(max_workers=8)
    seen: list[int] = []
    done = threading.Event()

    @bus.on("tick", ordered_by="k", name="ordered")
    def ordered(event: Event) -> None:
        seen.append(event.payload["n"])
        if len(seen) == 20:
            done.set()

    conn = backend.connect()
    for n in range(20):
        bus.emit("tick", {"k": "same", "n": n}, within=conn)
    conn.commit()

    assert done.wait(WAIT)
    assert bus.drain(timeout=WAIT)
    assert seen == list(range(20))


def test_each_event_runs_once_across_two_buses_of_the_store(backend: Backend) -> None:
    """With a second recovered bus on the store, each of 50 events runs once in all."""
    runs = Recorder()
    emitting = backend.bus()
    emitting.subscribe("order:created", runs, name="count")
    other = backend.bus()
    other.subscribe("order:created", runs, name="count")
    other.recover()

    conn = backend.connect()
    emitted = []
    for n in range(50):
        insert_order(conn, n)
        emitted.append(emitting.emit("order:created", {"order_id": n}, within=conn))
        conn.commit()

    assert runs.wait_count(50)
    assert emitting.drain(timeout=WAIT)
    assert other.drain(timeout=WAIT)
    assert Counter(runs.ids) == Counter(e.id for e in emitted)
    assert backend.orders() == list(range(50))


def test_a_bus_closed_right_after_the_commit_leaves_the_delivery_to_the_next(
    backend: Backend,
) -> None:
    """A bus closed right after the commit leaves the event to the next bus: runs once."""
    runs = Recorder()
    first = backend.bus()
    first.subscribe("order:created", runs, name="handler")
    conn = backend.connect()
    insert_order(conn, 1)
    event = first.emit("order:created", {"order_id": 1}, within=conn)
    conn.commit()
    first.close()

    second = backend.bus()
    second.subscribe("order:created", runs, name="handler")
    second.recover()
    assert runs.wait_event(event.id)
    assert second.drain(timeout=WAIT)
    assert runs.ids == [event.id]
    assert second.status(event.id) == {"handler": Delivery("handler", "succeeded", 1)}


def test_sqlite_drain_before_the_commit_keeps_to_its_timeout(tmp_path: Path) -> None:
    """drain(timeout=0.2) inside the open emitting transaction keeps to its timeout."""
    path = tmp_path / "app.sqlite3"
    handler = Recorder()
    with EventBus(store=SQLiteStore(path, busy_timeout=1.0)) as bus:
        bus.subscribe("order:created", handler, name="handler")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE orders (id integer PRIMARY KEY)")
            insert_order(conn, 1)
            event = bus.emit("order:created", {"order_id": 1}, within=conn)
            started = time.monotonic()
            bus.drain(timeout=NOT_BEFORE_COMMIT)
            took = time.monotonic() - started
            conn.commit()
        assert handler.wait_event(event.id)
    assert took < 1.5, f"drain(timeout={NOT_BEFORE_COMMIT}) took {took:.1f} s"


# -- the late committer (PostgreSQL: SQLite has one writer at a time) -----------------------


@pytest.mark.integration
def test_a_writer_that_commits_late_is_not_skipped(postgres_backend: Backend) -> None:
    """An event emitted first but committed last still runs, after the other."""
    backend = postgres_backend
    bus = backend.bus()
    handler = Recorder()
    bus.subscribe("order:created", handler, name="handler")
    a, b = backend.connect(), backend.connect()

    e1 = bus.emit("order:created", {"order_id": 1}, within=a)
    e2 = bus.emit("order:created", {"order_id": 2}, within=b)
    b.commit()
    assert handler.wait_event(e2.id)
    a.commit()
    assert handler.wait_event(e1.id)
    assert bus.drain(timeout=WAIT)
    assert handler.ids == [e2.id, e1.id]


# -- what within= refuses: an error, nothing written, the caller's transaction intact -------


def assert_refused(
    backend: Backend, bus: EventBus, error: type[Exception], within: object = None
) -> None:
    """emit(within=...) in the middle of the application's transaction (on a connection of
    *backend*, passed as within= unless *within* is given) raises *error*; the application can
    still write and commit its own rows on that connection, and no event was stored."""
    conn = backend.connect()
    insert_order(conn, 1)
    with pytest.raises(error):
        bus.emit("order:created", {"order_id": 1}, within=conn if within is None else within)
    insert_order(conn, 2)
    conn.commit()
    assert backend.orders() == [1, 2]
    assert backend.stored_events() == 0
    assert backend.stored_deliveries() == 0


def test_within_on_a_bus_without_a_store_is_a_value_error(backend: Backend) -> None:
    """A bus without a store: ValueError, nothing written, transaction intact."""
    with EventBus() as bus:
        assert_refused(backend, bus, ValueError)


def test_within_on_a_bus_with_a_memory_store_is_a_type_error(backend: Backend) -> None:
    """A bus with a MemoryStore: TypeError, nothing written, transaction intact."""
    with EventBus(store=MemoryStore()) as bus:
        assert_refused(backend, bus, TypeError)


def test_within_something_else_than_a_connection_is_a_type_error(backend: Backend) -> None:
    """within=object(): TypeError, nothing written."""
    bus = backend.bus()
    assert_refused(backend, bus, TypeError, object())


def test_within_a_closed_connection_is_a_value_error(backend: Backend) -> None:
    """A closed connection: ValueError, nothing written."""
    bus = backend.bus()
    closed = backend.connect()
    closed.close()
    assert_refused(backend, bus, ValueError, closed)


def test_within_an_unencodable_payload_is_a_type_error(backend: Backend) -> None:
    """An unencodable payload: TypeError, nothing written, transaction intact."""
    bus = backend.bus()
    conn = backend.connect()
    insert_order(conn, 1)
    with pytest.raises(TypeError):
        bus.emit("order:created", {"what": object()}, within=conn)
    insert_order(conn, 2)
    conn.commit()
    assert backend.orders() == [1, 2]
    assert backend.stored_events() == 0
    assert backend.stored_deliveries() == 0


def test_within_after_close_is_bus_closed(backend: Backend) -> None:
    """emit(within=...) after close(): BusClosedError, nothing written."""
    bus = backend.bus()
    bus.close()
    conn = backend.connect()
    insert_order(conn, 1)
    with pytest.raises(BusClosedError):
        bus.emit("order:created", {"order_id": 1}, within=conn)
    insert_order(conn, 2)
    conn.commit()
    assert backend.orders() == [1, 2]
    assert backend.stored_events() == 0


def test_within_an_autocommit_connection_outside_a_transaction_is_a_value_error(
    backend: Backend,
) -> None:
    """An autocommit connection outside a transaction: ValueError, nothing written."""
    bus = backend.bus()
    auto: Connection
    if backend.kind == "sqlite":
        auto = sqlite3.connect(backend.path, isolation_level=None)
    else:
        auto = psycopg.connect(backend.dsn, autocommit=True)
    with contextlib.closing(auto):
        with pytest.raises(ValueError, match="autocommit"):
            bus.emit("order:created", {"order_id": 1}, within=auto)
        insert_order(auto, 1)  # still usable: its own write commits by itself
    assert backend.orders() == [1]
    assert backend.stored_events() == 0


def test_an_autocommit_connection_inside_an_explicit_transaction_is_accepted(
    backend: Backend,
) -> None:
    """An autocommit connection inside an explicit transaction is accepted, atomically."""
    bus = backend.bus()
    handler = Recorder()
    bus.subscribe("order:created", handler, name="handler")
    auto: Connection
    if backend.kind == "sqlite":
        auto = sqlite3.connect(backend.path, isolation_level=None)
    else:
        auto = psycopg.connect(backend.dsn, autocommit=True)
    with contextlib.closing(auto):
        if backend.kind == "sqlite":
            auto.execute("BEGIN")
            rolled_back = bus.emit("order:created", {"order_id": 1}, within=auto)
            auto.execute("ROLLBACK")
            auto.execute("BEGIN")
            insert_order(auto, 2)
            committed = bus.emit("order:created", {"order_id": 2}, within=auto)
            auto.execute("COMMIT")
        else:
            with contextlib.suppress(RuntimeError), auto.transaction():
                rolled_back = bus.emit("order:created", {"order_id": 1}, within=auto)
                raise RuntimeError("roll back")
            with auto.transaction():
                insert_order(auto, 2)
                committed = bus.emit("order:created", {"order_id": 2}, within=auto)
    assert handler.wait_event(committed.id)
    assert bus.drain(timeout=WAIT)
    assert handler.ids == [committed.id]
    assert backend.stored_events(rolled_back.id) == 0
    assert backend.orders() == [2]


def test_sqlite_within_a_connection_to_another_file_is_a_value_error(tmp_path: Path) -> None:
    """An sqlite3 connection to another file: ValueError, nothing written anywhere."""
    backend = Backend("sqlite", tmp_path)
    try:
        bus = backend.bus()
        with contextlib.closing(sqlite3.connect(tmp_path / "other.sqlite3")) as other:
            other.execute("CREATE TABLE orders (id integer PRIMARY KEY)")
            insert_order(other, 1)
            with pytest.raises(ValueError, match="but this store"):
                bus.emit("order:created", {"order_id": 1}, within=other)
            insert_order(other, 2)
            other.commit()
            assert other.execute("SELECT count(*) FROM orders").fetchone()[0] == 2
            tables = {n for (n,) in other.execute("SELECT name FROM sqlite_master")}
            assert "events" not in tables
        assert backend.stored_events() == 0
    finally:
        backend.close()


@pytest.mark.integration
def test_postgres_within_a_connection_to_another_database_is_a_value_error(
    postgres_backend: Backend, postgres_server: PostgresServer
) -> None:
    """A psycopg connection to another database: ValueError, nothing written anywhere."""
    backend = postgres_backend
    bus = backend.bus()
    with psycopg.connect(postgres_server.create_database()) as other:
        other.execute("CREATE TABLE orders (id integer PRIMARY KEY)")
        insert_order(other, 1)
        with pytest.raises(ValueError, match="but this store"):
            bus.emit("order:created", {"order_id": 1}, within=other)
        insert_order(other, 2)
        other.commit()
        row = other.execute("SELECT count(*) FROM orders").fetchone()
        assert row is not None
        assert row[0] == 2
        other.rollback()
    assert backend.stored_events() == 0


@pytest.mark.integration
def test_postgres_within_a_failed_transaction_is_a_value_error(
    postgres_backend: Backend,
) -> None:
    """A connection whose transaction failed: ValueError; after a rollback it works."""
    backend = postgres_backend
    bus = backend.bus()
    handler = Recorder()
    bus.subscribe("order:created", handler, name="handler")
    conn = backend.connect()
    with pytest.raises(psycopg.errors.UndefinedTable):
        conn.execute("SELECT * FROM no_such_table")
    with pytest.raises(ValueError, match="failed"):
        bus.emit("order:created", {"order_id": 1}, within=conn)
    conn.rollback()
    event = bus.emit("order:created", {"order_id": 1}, within=conn)
    conn.commit()
    assert handler.wait_event(event.id)
    assert backend.stored_events() == 1


@pytest.mark.integration
def test_within_a_connection_of_the_other_database_kind_is_a_type_error(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """psycopg connection to an SQLite bus, sqlite3 one to a PostgreSQL bus: TypeError."""
    sqlite_side = Backend("sqlite", tmp_path)
    postgres_side = Backend("postgres", tmp_path / "unused", postgres_dsn)
    try:
        assert_refused(postgres_side, sqlite_side.bus(), TypeError)
        assert_refused(sqlite_side, postgres_side.bus(), TypeError)
        assert sqlite_side.stored_events() == 0
        assert postgres_side.stored_events() == 0
    finally:
        sqlite_side.close()
        postgres_side.close()
