"""PostgresStore runs the deliveries of one ``ordered_by`` key one process at a time, in the
order they were committed: a claim takes a key's deliveries only up to the first earlier one
that another live session holds (or is claiming at that moment)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from eventbus import Event
from eventbus.stores import PostgresStore

pytestmark = pytest.mark.integration


@pytest.fixture
def stores(postgres_dsn: str) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    first, second = PostgresStore(postgres_dsn), PostgresStore(postgres_dsn)
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def committed(dsn: str, *events: tuple[Event, str]) -> None:
    """Commit each event for handler "h" with its order key, unowned (as emit(within=))."""
    store = PostgresStore(dsn)
    try:
        with psycopg.connect(dsn) as conn:
            for event, key in events:
                store.add_within(conn, event, ["h"], order_keys={"h": key})
    finally:
        store.close()


def ids(claim: object) -> list[str]:
    return [d.event.id for d in claim.deliveries]  # type: ignore[attr-defined]


def test_a_key_held_by_another_session_waits_and_other_keys_do_not(stores, postgres_dsn):
    """While one session holds the first delivery of key k, another session's claim skips the
    later deliveries of k and takes those of other keys."""
    first, second = stores
    e1, e2, e3 = (Event(name="order:paid", payload={"n": n}) for n in range(3))
    committed(postgres_dsn, (e1, "k"))
    first.open()
    assert ids(first.claim(["h"])) == [e1.id]
    committed(postgres_dsn, (e2, "k"), (e3, "j"))
    second.open()
    assert ids(second.claim(["h"])) == [e3.id]


def test_the_next_delivery_of_a_key_is_claimable_once_the_earlier_one_finished(
    stores, postgres_dsn
):
    """Once the holder's delivery of key k succeeded, the next one of k is anyone's."""
    first, second = stores
    e1, e2 = (Event(name="order:paid", payload={"n": n}) for n in range(2))
    committed(postgres_dsn, (e1, "k"))
    first.open()
    assert ids(first.claim(["h"])) == [e1.id]
    committed(postgres_dsn, (e2, "k"))
    second.open()
    assert ids(second.claim(["h"])) == []
    first.succeeded(e1.id, "h")
    first.flush()
    assert ids(second.claim(["h"])) == [e2.id]


def test_one_session_claims_every_committed_delivery_of_a_key_in_commit_order(stores, postgres_dsn):
    """A session that holds nothing of a key claims all its committed deliveries, oldest
    first (its bus's gate then runs them one at a time)."""
    first, _ = stores
    events = [Event(name="order:paid", payload={"n": n}) for n in range(5)]
    committed(postgres_dsn, *((e, "k") for e in events))
    first.open()
    assert ids(first.claim(["h"])) == [e.id for e in events]


def test_the_holders_own_later_deliveries_of_a_key_are_claimable_by_it(stores, postgres_dsn):
    """A session holding key k's first delivery also claims k's later ones (it orders them
    itself); the other session gets none of them."""
    first, second = stores
    e1, e2 = (Event(name="order:paid", payload={"n": n}) for n in range(2))
    committed(postgres_dsn, (e1, "k"))
    first.open()
    second.open()
    assert ids(first.claim(["h"])) == [e1.id]
    committed(postgres_dsn, (e2, "k"))
    assert ids(second.claim(["h"])) == []
    assert ids(first.claim(["h"])) == [e2.id]


def test_two_buses_sharing_a_database_keep_each_keys_order(postgres_dsn):
    """Two buses claiming from one database run each key's events in commit order and never
    two of one key at once, while different keys run on both."""
    import threading

    from eventbus import EventBus

    runs: list[tuple[str, int, str]] = []  # (key, n, phase)
    lock = threading.Lock()
    done = threading.Event()
    total = 200
    buses = []
    for _ in range(2):
        bus = EventBus(store=PostgresStore(postgres_dsn), max_workers=4)

        @bus.on("order:paid", ordered_by="k", name="h")
        def handle(event: Event) -> None:
            key, n = event.payload["k"], event.payload["n"]
            with lock:
                runs.append((key, n, "start"))
            with lock:
                runs.append((key, n, "end"))
                if sum(1 for r in runs if r[2] == "end") == total:
                    done.set()

        bus.recover()
        buses.append(bus)
    try:
        with psycopg.connect(postgres_dsn) as conn:
            for n in range(total):  # the emitting bus knows the handlers the rows are for
                buses[n % 2].emit("order:paid", {"k": f"k{n % 5}", "n": n}, within=conn)
                conn.commit()
        assert done.wait(30)
    finally:
        for bus in buses:
            bus.close()
    for key in {f"k{i}" for i in range(5)}:
        mine = [(n, phase) for k, n, phase in runs if k == key]
        assert [n for n, phase in mine if phase == "start"] == sorted(
            n for n, phase in mine if phase == "start"
        )
        # never two of one key at once: starts and ends alternate
        assert [phase for _, phase in mine] == ["start", "end"] * (len(mine) // 2)
