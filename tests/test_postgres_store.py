"""PostgresStore's own behaviours, on real PostgreSQL servers (tests/support/postgres.py): its
schema, its options, ``add_within`` (events written through the application's transaction),
notices of new work (LISTEN/NOTIFY), several sessions sharing one database, a server crash, and
rows that cannot be decoded. The shared Store contract runs in tests/test_store_contract.py.

Nothing here sleeps to wait for the store: where its background thread must act, the test
waits on a threading.Event with a deadline. A store's listener starts LISTENing in the
background after ``open()`` returns, so the notice tests first poke it until it answers.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from eventbus import DeadLetter, Event, StoreError
from eventbus.stores import PostgresStore
from eventbus.stores.postgres import SCHEMA_VERSION
from tests.support.net import free_port
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.integration

#: How long a notice of new work may take to reach a listening store (seconds).
NOTICE_TIMEOUT = 5.0
#: How long a store's listener may take to reconnect after its server came back: it backs
#: off up to 5 s between attempts.
RECONNECT_TIMEOUT = 15.0
#: How long a write may take to give up on a server that is down (connect_timeout=1).
DOWN_TIMEOUT = 15.0
PASSWORD = "s3cret"

MakeStore = Callable[..., PostgresStore]
Connect = Callable[..., "psycopg.Connection[Any]"]


class Reporter:
    """What a bus hands its store: records background errors, and signals work_available."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, BaseException]] = []
        self.work = threading.Event()
        self._lock = threading.Lock()

    def internal_error(self, where: str, error: BaseException) -> None:
        with self._lock:
            self.errors.append((where, error))

    def stream_dead_lettered(self, entry_id: str, fields: Mapping[str, str], reason: str) -> None:
        """A transport's notice: never sent by a store."""

    def stream_taken_over(self, count: int) -> None:
        """A transport's notice: never sent by a store."""

    def work_available(self) -> None:
        self.work.set()


# -- helpers ---------------------------------------------------------------------------------


def event(name: str = "order:created", payload: Any = None) -> Event:
    return Event(name=name, payload={"id": 1} if payload is None else payload)


def rows(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of its own (committed) and return its rows."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description is not None else []


def count(dsn: str, table: str, schema: str = "eventbus") -> int:
    query = sql.SQL("SELECT count(*) FROM {}.{}").format(
        sql.Identifier(schema), sql.Identifier(table)
    )
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def tables(dsn: str, schema: str) -> set[str]:
    found = rows(
        dsn,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
        (schema,),
    )
    return {name for (name,) in found}


def schema_exists(dsn: str, schema: str) -> bool:
    return bool(
        rows(dsn, "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (schema,))
    )


def with_password(dsn: str) -> str:
    """*dsn* (postgresql://user@host...) with a password; trust authentication ignores it."""
    return dsn.replace("@", f":{PASSWORD}@", 1)


def claimed(store: PostgresStore, handlers: list[str]) -> set[tuple[str, str]]:
    return {(d.event.id, d.handler) for d in store.claim(handlers).deliveries}


def wait_until_listening(reporter: Reporter, poke: PostgresStore) -> None:
    """Poke a freshly opened store's listener (``release([])`` by another store sends a
    notice) until it answers, then forget the answer: open() returns before its LISTEN ran,
    and a notice sent before that is never delivered."""
    deadline = time.monotonic() + NOTICE_TIMEOUT
    while time.monotonic() < deadline:
        poke.release([])
        if reporter.work.wait(0.2):
            reporter.work.clear()
            return
    raise AssertionError(f"the store did not LISTEN within {NOTICE_TIMEOUT} s")


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def make_store(postgres_dsn: str) -> Iterator[MakeStore]:
    """Builds PostgresStores (on the test's database unless given a dsn); all closed at the
    end."""
    made: list[PostgresStore] = []

    def make(dsn: str | None = None, **options: Any) -> PostgresStore:
        store = PostgresStore(dsn or postgres_dsn, **options)
        made.append(store)
        return store

    yield make
    for store in reversed(made):
        store.close()


@pytest.fixture
def connect(postgres_dsn: str) -> Iterator[Connect]:
    """Opens psycopg connections (to the test's database unless given a dsn); all closed at
    the end."""
    opened: list[psycopg.Connection[Any]] = []

    def make(dsn: str | None = None, **options: Any) -> psycopg.Connection[Any]:
        conn = psycopg.connect(dsn or postgres_dsn, connect_timeout=5, **options)
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.close()


@pytest.fixture
def orders(postgres_dsn: str) -> str:
    """The application's own table (public.orders), for inserts beside add_within."""
    rows(postgres_dsn, "CREATE TABLE public.orders (id integer PRIMARY KEY)")
    return postgres_dsn


def order_ids(dsn: str) -> list[int]:
    return [order_id for (order_id,) in rows(dsn, "SELECT id FROM public.orders ORDER BY id")]


# -- the schema ------------------------------------------------------------------------------


def test_first_use_creates_the_tables_in_the_named_schema(make_store, postgres_dsn):
    """The store's tables are created on first use, in the schema it is given (not public)."""
    make_store(schema="bus_tables")
    assert tables(postgres_dsn, "bus_tables") == {
        "meta",
        "events",
        "deliveries",
        "dead_letters",
        "owners",
        "attempts",
    }
    assert tables(postgres_dsn, "public") == set()
    assert not schema_exists(postgres_dsn, "eventbus")


def test_the_schema_version_is_stamped_in_meta(make_store, postgres_dsn):
    """{schema}.meta holds this eventbus's schema version."""
    make_store(schema="stamped")
    assert rows(postgres_dsn, "SELECT version FROM stamped.meta") == [(SCHEMA_VERSION,)]


def test_a_schema_from_a_newer_version_is_refused_with_upgrade_advice(make_store, postgres_dsn):
    """A schema whose meta.version is newer than this eventbus raises RuntimeError."""
    make_store().close()
    rows(postgres_dsn, "UPDATE eventbus.meta SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match="upgrade eventbus"):
        make_store()


def test_a_schema_holding_other_tables_is_refused_and_left_untouched(make_store, postgres_dsn):
    """A schema with only another application's tables raises ValueError; nothing is added."""
    rows(postgres_dsn, "CREATE SCHEMA billing")
    rows(postgres_dsn, "CREATE TABLE billing.invoices (id integer)")
    with pytest.raises(ValueError, match="invoices"):
        make_store(schema="billing")
    assert tables(postgres_dsn, "billing") == {"invoices"}


def test_create_false_refuses_a_database_without_a_store_and_creates_no_schema(
    make_store, postgres_dsn
):
    """create=False on a database with no store raises ValueError and creates nothing."""
    with pytest.raises(ValueError, match="no eventbus store"):
        make_store(create=False)
    assert not schema_exists(postgres_dsn, "eventbus")


def test_create_false_opens_an_existing_store(make_store):
    """create=False opens a store that exists, and sees what it holds."""
    first = make_store()
    first.open()
    ev = event()
    first.add(ev, ["h"])
    existing = make_store(create=False)
    status = existing.status(ev.id)
    assert status is not None
    assert status["h"].state == "pending"


def test_stores_in_different_schemas_of_one_database_are_independent(make_store, connect):
    """An event added in one schema is unknown to a store of another schema of the database."""
    left, right = make_store(schema="left_bus"), make_store(schema="right_bus")
    left.open()
    right.open()
    ev = event()
    left.add(ev, ["h"])
    conn = connect()
    unowned = event()
    left.add_within(conn, unowned, ["h"])
    conn.commit()
    assert right.status(ev.id) is None
    assert right.status(unowned.id) is None
    assert right.claim(["h"]).deliveries == []
    assert claimed(left, ["h"]) == {(unowned.id, "h")}


def test_a_schema_name_too_long_for_a_notice_channel_is_refused(make_store):
    """A schema whose notice channel ("eventbus." + schema) would pass PostgreSQL's 63 bytes
    is refused by the constructor with ValueError."""
    with pytest.raises(ValueError, match="at most 54 bytes"):
        make_store(schema="s" * 55)


def test_a_schema_name_of_54_bytes_works_for_notices_and_close(make_store, connect):
    """The longest schema accepted works for add_within (its notice), release and close."""
    store = make_store(schema="s" * 54)
    store.open()
    try:
        conn = connect()
        store.add_within(conn, event(), ["h"])
        conn.commit()
        store.release([])
    finally:
        store.close()


# -- options ---------------------------------------------------------------------------------

#: A dsn nothing is asked of: every bad option is refused before connecting.
UNUSED_DSN = "postgresql://nobody@127.0.0.1:1/nothing"


def test_a_dsn_that_is_not_a_string_raises_type_error():
    """dsn must be a str."""
    with pytest.raises(TypeError, match="dsn"):
        PostgresStore(b"postgresql://nobody@127.0.0.1:1/nothing")  # type: ignore[arg-type]


@pytest.mark.parametrize("schema", ["a-b", "x;drop", "", "1abc", "a b"])
def test_a_schema_that_is_not_an_identifier_raises_value_error(schema):
    """schema must be a plain identifier (it is spliced into statements)."""
    with pytest.raises(ValueError, match="schema"):
        PostgresStore(UNUSED_DSN, schema=schema)


@pytest.mark.parametrize("option", ["lease", "poll_interval"])
@pytest.mark.parametrize("value", [0, -1.0])
def test_lease_and_poll_interval_must_be_positive(option, value):
    """lease and poll_interval of zero or less raise ValueError."""
    with pytest.raises(ValueError, match=option):
        PostgresStore(UNUSED_DSN, **{option: value})


def test_a_pool_size_of_zero_raises_value_error():
    """pool_size must be at least 1."""
    with pytest.raises(ValueError, match="pool_size"):
        PostgresStore(UNUSED_DSN, pool_size=0)


def test_an_unreachable_server_raises_store_error_without_the_password(caplog):
    """A server nobody listens for raises StoreError from the constructor; no password shown."""
    caplog.set_level(logging.DEBUG)
    dsn = f"postgresql://u:{PASSWORD}@127.0.0.1:{free_port()}/db"
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        PostgresStore(dsn, connect_timeout=1)
    assert time.monotonic() - started < DOWN_TIMEOUT
    assert isinstance(caught.value, RuntimeError)
    assert "127.0.0.1" in str(caught.value)
    shown = "".join(traceback.format_exception(caught.value))
    assert PASSWORD not in shown
    assert PASSWORD not in caplog.text


def test_repr_hides_the_password(make_store, postgres_dsn):
    """repr(store) shows where it connects, never the password."""
    store = make_store(with_password(postgres_dsn))
    assert PASSWORD not in repr(store)
    assert "127.0.0.1" in repr(store)


# -- add_within: the application's transaction -------------------------------------------------


def test_add_within_rolled_back_leaves_the_event_unknown(make_store, connect, postgres_dsn):
    """An add_within whose transaction rolls back stores nothing."""
    store = make_store()
    conn = connect()
    ev = event()
    assert store.add_within(conn, ev, ["a", "b"]) is None
    conn.rollback()
    assert store.status(ev.id) is None
    assert count(postgres_dsn, "events") == 0
    assert count(postgres_dsn, "deliveries") == 0


def test_add_within_committed_is_pending_and_unowned_for_the_next_claim(make_store, connect):
    """A committed add_within has pending deliveries no bus owns: another store claims them."""
    store = make_store()
    store.open()
    conn = connect()
    ev = event()
    store.add_within(conn, ev, ["a", "b"])
    conn.commit()
    status = store.status(ev.id)
    assert status is not None
    assert {h: (d.state, d.attempts) for h, d in status.items()} == {
        "a": ("pending", 0),
        "b": ("pending", 0),
    }
    other = make_store()
    other.open()
    claim = other.claim(["a", "b"])
    assert {(d.event.id, d.handler, d.state) for d in claim.deliveries} == {
        (ev.id, "a", "pending"),
        (ev.id, "b", "pending"),
    }
    assert claim.deliveries[0].event.payload == {"id": 1}


def test_add_within_writes_through_the_callers_transaction(make_store, connect):
    """Until the caller commits, no other connection sees the event."""
    store = make_store()
    conn = connect()
    ev = event()
    store.add_within(conn, ev, ["h"])
    assert store.status(ev.id) is None  # the store's own connections see nothing yet
    conn.commit()
    assert store.status(ev.id) is not None


def test_add_within_with_due_at_is_scheduled(make_store, connect):
    """add_within(..., due_at=) stores a delayed start, shown as scheduled."""
    store = make_store()
    conn = connect()
    ev = event()
    due = time.time() + 3600
    store.add_within(conn, ev, ["h"], due_at=due)
    conn.commit()
    status = store.status(ev.id)
    assert status is not None
    assert status["h"].state == "scheduled"
    store.open()
    [delivery] = store.claim(["h"]).deliveries
    assert delivery.due_at == pytest.approx(due)


@pytest.mark.parametrize(
    "make_connection",
    [lambda: sqlite3.connect(":memory:"), object],
    ids=["sqlite3", "object"],
)
def test_add_within_rejects_what_is_not_a_psycopg_connection(
    make_store, connect, orders, make_connection
):
    """Anything but a psycopg connection raises TypeError; nothing is written."""
    store = make_store()
    app = connect()
    app.execute("INSERT INTO orders VALUES (1)")
    wrong = make_connection()
    try:
        ev = event()
        with pytest.raises(TypeError, match="psycopg"):
            store.add_within(wrong, ev, ["h"])
    finally:
        if isinstance(wrong, sqlite3.Connection):
            wrong.close()
    app.commit()
    assert store.status(ev.id) is None
    assert order_ids(orders) == [1]


def test_add_within_rejects_a_closed_connection(make_store, connect, postgres_dsn):
    """A closed connection raises ValueError; nothing is written."""
    store = make_store()
    conn = connect()
    conn.close()
    ev = event()
    with pytest.raises(ValueError, match="closed"):
        store.add_within(conn, ev, ["h"])
    assert store.status(ev.id) is None
    assert count(postgres_dsn, "events") == 0


def test_add_within_rejects_a_failed_transaction_and_writes_nothing(make_store, connect, orders):
    """A connection whose transaction failed raises ValueError; the caller can roll back."""
    store = make_store()
    conn = connect()
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("SELECT 1 / 0")
    ev = event()
    with pytest.raises(ValueError, match="failed"):
        store.add_within(conn, ev, ["h"])
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    conn.rollback()
    conn.execute("INSERT INTO orders VALUES (1)")
    conn.commit()
    assert order_ids(orders) == [1]
    assert store.status(ev.id) is None


def test_add_within_rejects_an_autocommit_connection_outside_a_transaction(
    make_store, connect, orders
):
    """An autocommit connection with no transaction open raises ValueError; nothing written."""
    store = make_store()
    conn = connect(autocommit=True)
    ev = event()
    with pytest.raises(ValueError, match="autocommit"):
        store.add_within(conn, ev, ["h"])
    conn.execute("INSERT INTO orders VALUES (1)")
    assert order_ids(orders) == [1]
    assert store.status(ev.id) is None
    assert count(orders, "events") == 0


def test_add_within_works_inside_an_autocommit_connections_transaction(make_store, connect, orders):
    """Inside `with conn.transaction():` an autocommit connection is accepted, atomically."""
    store = make_store()
    conn = connect(autocommit=True)
    ev = event()
    with conn.transaction():
        conn.execute("INSERT INTO orders VALUES (1)")
        store.add_within(conn, ev, ["h"])
    status = store.status(ev.id)
    assert status is not None
    assert status["h"].state == "pending"
    assert order_ids(orders) == [1]


def test_add_within_rejects_a_connection_to_another_database(
    make_store, connect, postgres_server: PostgresServer, postgres_dsn
):
    """A connection to another database raises ValueError, writes nothing and stays usable."""
    store = make_store()
    other_dsn = postgres_server.create_database()
    rows(other_dsn, "CREATE TABLE public.orders (id integer)")
    conn = connect(other_dsn)
    conn.execute("INSERT INTO orders VALUES (1)")
    ev = event()
    with pytest.raises(ValueError, match="database"):
        store.add_within(conn, ev, ["h"])
    conn.commit()
    assert order_ids(other_dsn) == [1]
    assert not schema_exists(other_dsn, "eventbus")
    assert store.status(ev.id) is None
    assert count(postgres_dsn, "events") == 0


def test_add_within_rejects_an_unencodable_payload_and_leaves_the_transaction_usable(
    make_store, connect, orders
):
    """A payload the codec cannot encode raises TypeError; the caller can still commit."""
    store = make_store()
    conn = connect()
    conn.execute("INSERT INTO orders VALUES (1)")
    ev = event(payload=object())
    with pytest.raises(TypeError):
        store.add_within(conn, ev, ["h"])
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    conn.commit()
    assert order_ids(orders) == [1]
    assert store.status(ev.id) is None
    assert count(orders, "events") == 0


def test_add_within_with_a_known_key_returns_the_first_event_and_writes_nothing(
    make_store, connect, postgres_dsn
):
    """A second add_within under a committed key returns the first event and adds nothing."""
    store = make_store()
    conn = connect()
    first = event(payload={"n": 1})
    assert store.add_within(conn, first, ["h"], key="order-1") is None
    conn.commit()
    second = event(payload={"n": 2})
    found = store.add_within(conn, second, ["h"], key="order-1")
    conn.commit()
    assert found is not None
    assert (found.id, found.payload) == (first.id, {"n": 1})
    assert store.status(second.id) is None
    assert count(postgres_dsn, "events") == 1
    assert count(postgres_dsn, "deliveries") == 1


def test_add_within_works_on_a_connection_returning_dict_rows(make_store, connect):
    """A connection made with row_factory=dict_row (common in applications) is accepted."""
    store = make_store()
    conn = connect(row_factory=dict_row)
    ev = event()
    assert store.add_within(conn, ev, ["h"]) is None
    conn.commit()
    status = store.status(ev.id)
    assert status is not None
    assert status["h"].state == "pending"


# -- notices of new work ---------------------------------------------------------------------


@pytest.fixture
def listening(make_store: MakeStore) -> tuple[PostgresStore, Reporter, PostgresStore]:
    """An opened store whose listener is known to LISTEN, its reporter, and another store
    (not opened) on the same schema."""
    store, other = make_store(), make_store()
    reporter = Reporter()
    store.open(reporter)
    wait_until_listening(reporter, other)
    return store, reporter, other


def test_a_committed_add_within_wakes_the_store_and_needs_claim(listening, connect):
    """Committing an add_within elsewhere calls work_available, and needs_claim() turns True."""
    store, reporter, _ = listening
    assert store.claim(["h"]).deliveries == []
    assert not store.needs_claim()
    conn = connect()
    ev = event()
    store.add_within(conn, ev, ["h"])
    assert not reporter.work.wait(0.05)  # nothing before the commit
    conn.commit()
    assert reporter.work.wait(NOTICE_TIMEOUT)
    assert store.needs_claim()
    assert claimed(store, ["h"]) == {(ev.id, "h")}


def test_a_rolled_back_add_within_is_never_claimed(listening, connect):
    """After a rolled-back add_within and a committed one, the claim finds only the second."""
    store, reporter, _ = listening
    conn = connect()
    rolled_back, committed = event(), event()
    store.add_within(conn, rolled_back, ["h"])
    conn.rollback()
    store.add_within(conn, committed, ["h"])
    conn.commit()
    assert reporter.work.wait(NOTICE_TIMEOUT)
    assert claimed(store, ["h"]) == {(committed.id, "h")}
    assert store.status(rolled_back.id) is None


def test_release_by_another_store_wakes_the_store(listening, make_store):
    """Deliveries released by another bus's store call work_available; they can be claimed."""
    store, reporter, _ = listening
    releaser = make_store()
    releaser.open()
    ev = event()
    releaser.add(ev, ["h"])
    assert store.claim(["h"]).deliveries == []  # owned by the live releaser
    releaser.release([(ev.id, "h")])
    assert reporter.work.wait(NOTICE_TIMEOUT)
    assert claimed(store, ["h"]) == {(ev.id, "h")}


def test_replay_without_claim_by_another_store_wakes_the_store(listening, connect):
    """replay_dead_letter(claim=False) by another store calls work_available."""
    store, reporter, other = listening
    conn = connect()
    ev = event()
    other.add_within(conn, ev, ["h"])
    conn.commit()
    assert reporter.work.wait(NOTICE_TIMEOUT)
    other.dead(
        DeadLetter(
            id="dl-1",
            event=ev,
            handler="h",
            attempts=3,
            error="ValueError: bad",
            reason="exhausted",
            failed_at=datetime.now(UTC),
        )
    )
    assert store.claim(["h"]).deliveries == []
    reporter.work.clear()
    assert other.replay_dead_letter("dl-1") is not None
    assert reporter.work.wait(NOTICE_TIMEOUT)
    assert store.needs_claim()
    assert claimed(store, ["h"]) == {(ev.id, "h")}


# -- several sessions on one database --------------------------------------------------------


def test_concurrent_claims_of_two_stores_never_share_a_delivery(make_store, connect):
    """Two stores claiming at once from two threads split the deliveries exactly."""
    maker = make_store()
    conn = connect()
    events = [event() for _ in range(200)]
    for ev in events:
        maker.add_within(conn, ev, ["h1", "h2"])
    conn.commit()
    claimers = [make_store(), make_store()]
    for store in claimers:
        store.open()
    barrier = threading.Barrier(len(claimers), timeout=10)
    results: list[set[tuple[str, str]]] = [set(), set()]
    errors: list[BaseException] = []

    def claim(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(10):  # several rounds, so that the two really interleave
                results[i] |= claimed(claimers[i], ["h1", "h2"])
        except BaseException as exc:  # noqa: BLE001 - shown by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(claimers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert results[0] | results[1] == {(ev.id, h) for ev in events for h in ("h1", "h2")}
    assert results[0] & results[1] == set()


def test_a_live_owners_deliveries_are_not_claimed_by_another_store(make_store):
    """While its owner's heartbeat is fresh, another store claims none of its deliveries."""
    owner = make_store()
    owner.open()
    pending, running = event(), event()
    owner.add(pending, ["h"])
    owner.add(running, ["h"])
    owner.started(running.id, "h", 1)
    other = make_store()
    other.open()
    assert other.claim(["h"]).deliveries == []


def test_an_owner_past_its_lease_is_taken_over_with_running_kept(make_store, postgres_dsn):
    """An owner's heartbeat older than the lease lets another store claim it, running kept."""
    owner = make_store()  # lease 30: its next heartbeat is 10 s away
    owner_id = owner.open()
    pending, running, done = event(), event(), event()
    owner.add(pending, ["h"])
    owner.add(running, ["h"])
    owner.started(running.id, "h", 2)
    owner.add(done, ["h"])
    owner.succeeded(done.id, "h")
    owner.flush()
    rows(postgres_dsn, "UPDATE eventbus.owners SET heartbeat = 0 WHERE owner = %s", (owner_id,))
    taker = make_store(lease=1)
    taker.open()
    claim = taker.claim(["h"])
    assert {(d.event.id, d.state, d.attempts) for d in claim.deliveries} == {
        (pending.id, "pending", 0),
        (running.id, "running", 2),
    }
    assert rows(postgres_dsn, "SELECT 1 FROM eventbus.owners WHERE owner = %s", (owner_id,)) == []


def test_an_owner_whose_process_on_this_host_is_gone_is_taken_over_at_once(
    make_store, connect, postgres_dsn
):
    """Deliveries of an owner naming a dead process of this host are claimed, lease or not."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert child.wait(timeout=30) == 0  # exited and reaped: its pid names no process
    gone = f"{socket.gethostname()}:{child.pid}:x"
    store = make_store()
    conn = connect()
    evs = [event(), event()]
    for ev in evs:
        store.add_within(conn, ev, ["h"])
    conn.commit()
    rows(
        postgres_dsn,
        "INSERT INTO eventbus.owners VALUES (%s, extract(epoch FROM clock_timestamp()))",
        (gone,),
    )
    rows(postgres_dsn, "UPDATE eventbus.deliveries SET owner = %s", (gone,))
    taker = make_store()  # the default 30 s lease: the heartbeat is fresh
    taker.open()
    assert claimed(taker, ["h"]) == {(ev.id, "h") for ev in evs}


# -- losing the server -----------------------------------------------------------------------
#
# After a crash two things reconnect on their own schedules: the store's listener (pauses of
# 0.05, 0.2, 1, 2, then 5 s: attempts about 0.05, 0.25, 1.25, 3.25 and 8.25 s after the loss)
# and psycopg_pool's replacement connections (exponential backoff from the first failed
# getconn: attempts about 1, 3, 7, 15 s later, each +-10 %). The server is kept down for a
# fixed time (an outage of the test's making, not a wait for the store) so that each test
# knows which of those attempts find it up again.


def hold_down_until(deadline: float) -> None:
    """Keep the killed server down until monotonic time *deadline*."""
    threading.Event().wait(max(0.0, deadline - time.monotonic()))


def test_a_crashed_server_fails_writes_then_the_store_recovers(own_postgres: PostgresServer):
    """Writes fail with StoreError while the server is down; back up, the store works again."""
    dsn = with_password(own_postgres.create_database())
    reporter = Reporter()
    store = PostgresStore(dsn, connect_timeout=1)
    poke = PostgresStore(dsn, connect_timeout=1)
    try:
        store.open(reporter)
        wait_until_listening(reporter, poke)
        poke.close()
        before = event()
        store.add(before, ["h"])

        own_postgres.kill()
        killed = time.monotonic()
        lost = event()
        with pytest.raises(StoreError) as caught:
            store.add(lost, ["h"])
        assert time.monotonic() - killed < DOWN_TIMEOUT
        assert PASSWORD not in str(caught.value)

        # Down past the listener's attempt at 3.25 s: it reconnects at 8.25 s, after the
        # pool's attempt at 7 s (at most 7.7 s) found the server up again.
        hold_down_until(killed + 3.5)
        own_postgres.start()
        assert reporter.work.wait(RECONNECT_TIMEOUT)  # reconnected: told to look
        reporter.work.clear()
        assert reporter.errors
        assert {where for where, _ in reporter.errors} == {"store"}
        assert any("listening" in str(error) for _, error in reporter.errors)
        assert all(PASSWORD not in str(error) for _, error in reporter.errors)

        after = event()
        assert store.add(after, ["h"]) is None
        assert store.status(lost.id) is None
        for ev in (before, after):
            status = store.status(ev.id)
            assert status is not None
            assert status["h"].state == "pending"

        with psycopg.connect(dsn, connect_timeout=5) as conn:
            within = event()
            store.add_within(conn, within, ["h"])
        assert reporter.work.wait(NOTICE_TIMEOUT)
        assert claimed(store, ["h"]) == {(within.id, "h")}
    finally:
        poke.close()
        store.close()
    assert rows(dsn, "SELECT owner FROM eventbus.owners") == []


def test_a_write_right_after_the_server_restarts_succeeds(own_postgres: PostgresServer):
    """Once the restarted server accepts connections, the store's next write succeeds."""
    dsn = own_postgres.create_database()
    store = PostgresStore(dsn, connect_timeout=0.5)  # a write gives up after 3 x 0.5 s
    try:
        store.open(Reporter())
        store.add(event(), ["h"])
        own_postgres.kill()
        killed = time.monotonic()
        with pytest.raises(StoreError):
            store.add(event(), ["h"])
        # Back up after the pool's attempt at 3 s (at most 3.3 s); its next is at 6.3 s or
        # later, after this write gave up.
        hold_down_until(killed + 3.5)
        own_postgres.start()
        if time.monotonic() - killed > 4.6:
            pytest.skip("the server restarted too slowly to show the pool's backoff")
        after = event()
        assert store.add(after, ["h"]) is None
        status = store.status(after.id)
        assert status is not None
        assert status["h"].state == "pending"
    finally:
        store.close()


# -- rows that cannot be decoded -------------------------------------------------------------


def test_claim_quarantines_an_event_whose_payload_is_not_json(make_store, connect, postgres_dsn):
    """A stored payload that is not JSON is quarantined by claim(), which claims the rest."""
    store = make_store()
    conn = connect()
    good, bad, also_good = event(), event(), event()
    for ev in (good, bad, also_good):
        store.add_within(conn, ev, ["h"])
    conn.commit()
    rows(postgres_dsn, "UPDATE eventbus.events SET payload = '{not json' WHERE id = %s", (bad.id,))
    store.open()
    claim = store.claim(["h"])
    assert {(d.event.id, d.handler) for d in claim.deliveries} == {
        (good.id, "h"),
        (also_good.id, "h"),
    }
    [letter] = claim.quarantined
    assert (letter.event.id, letter.handler, letter.reason) == (bad.id, "h", "not_retryable")
    status = store.status(bad.id)
    assert status is not None
    assert status["h"].state == "dead"


def test_a_quarantined_event_is_listed_with_payload_none(make_store, connect, postgres_dsn):
    """dead_letters() lists the quarantined delivery with what could be read: payload None."""
    store = make_store()
    conn = connect()
    bad = event(name="order:paid")
    store.add_within(conn, bad, ["h"])
    conn.commit()
    rows(postgres_dsn, "UPDATE eventbus.events SET payload = '{not json' WHERE id = %s", (bad.id,))
    store.open()
    [quarantined] = store.claim(["h"]).quarantined
    [listed] = store.dead_letters()
    assert listed.id == quarantined.id
    assert (listed.event.id, listed.event.name, listed.event.payload) == (
        bad.id,
        "order:paid",
        None,
    )
    assert listed.reason == "not_retryable"
    assert store.dead_letter(listed.id) is not None
