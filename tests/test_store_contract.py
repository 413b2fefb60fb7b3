"""The Store protocol, tested directly on every store: one suite parametrised over MemoryStore
and SQLiteStore, then a few SQLite-only behaviours (encoding, corruption, file modes, options,
concurrent claims).

PostgresStore joins the shared suite when a PostgreSQL server can be started (see
tests/support/postgres.py); its own behaviours are in tests/test_postgres_store.py.

A "second session" is what a restarted process sees: for MemoryStore the same object closed and
opened again, for SQLiteStore a new SQLiteStore on the same file. A "peer" is another session
that is live at the same time: a second SQLiteStore on the file, or (since one MemoryStore holds
one session) the MemoryStore's own session. Nothing here sleeps.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from eventbus import DeadLetter, Event
from eventbus.stores import Claim, MemoryStore, PostgresStore, SQLiteStore, StoredDelivery
from eventbus.typing import Store
from tests.support.damaged_rows import DAMAGE, damage

KINDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.integration)]

#: Upper bound on events added while waiting for a store to prune; only a store that never
#: prunes gets there.
PRUNE_BOUND = 5000


class Sessions:
    """The stores of one test on one set of data (MemoryStore object or SQLite file)."""

    def __init__(self, kind: str, path: Path, dsn: str | None = None, **options: Any) -> None:
        self.kind = kind
        self.path = path
        self.dsn = dsn
        self.options = options
        self._made: list[Store] = []
        self._memory = MemoryStore(**options) if kind == "memory" else None

    def new(self) -> Store:
        """A store on this data, not yet opened."""
        if self._memory is not None:
            return self._memory
        store: Store
        if self.dsn is not None:
            store = PostgresStore(self.dsn, **self.options)
        else:
            store = SQLiteStore(self.path, **self.options)
        self._made.append(store)
        return store

    def reader(self) -> Store:
        """A store to read this data through while a session is open (not opened itself)."""
        return self.new()

    def first(self) -> Store:
        """The first session, opened."""
        store = self.new()
        store.open()
        return store

    def reopen(self, store: Store) -> Store:
        """Close *store* and return a second session on the same data, opened."""
        store.close()
        again = self.new()
        again.open()
        return again

    def peer(self, store: Store) -> Store:
        """Another session live beside *store*'s (for MemoryStore, its own session)."""
        if self._memory is not None:
            return store
        return self.first()

    def close(self) -> None:
        for store in [*self._made, *([self._memory] if self._memory else [])]:
            store.close()


@pytest.fixture
def make_sessions(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Sessions]]:
    """Builds Sessions of a kind with store options; every store is closed at teardown.
    PostgreSQL sessions get a database of their own (a schema each within it)."""
    made: list[Sessions] = []

    def make(kind: str, **options: Any) -> Sessions:
        dsn = None
        if kind == "postgres":
            dsn = request.getfixturevalue("postgres_dsn")
            options.setdefault("schema", f"store{len(made)}")
        sessions = Sessions(kind, tmp_path / f"store-{len(made)}.db", dsn, **options)
        made.append(sessions)
        return sessions

    yield make
    for sessions in made:
        sessions.close()


@pytest.fixture(params=KINDS)
def sessions(request: pytest.FixtureRequest, make_sessions: Callable[..., Sessions]) -> Sessions:
    """Sessions of each store kind with default options."""
    return make_sessions(request.param)


@pytest.fixture
def store(sessions: Sessions) -> Store:
    """An opened store of each kind (closed at teardown)."""
    return sessions.first()


def event(name: str = "order:created", payload: Any = None) -> Event:
    return Event(name=name, payload={"id": 1} if payload is None else payload)


def letter(ev: Event, handler: str = "h", *, failed_at: datetime | None = None) -> DeadLetter:
    return DeadLetter(
        id=f"dl-{ev.id}-{handler}",
        event=ev,
        handler=handler,
        attempts=3,
        error="ValueError: bad",
        reason="exhausted",
        traceback="Traceback ...",
        failed_at=failed_at or datetime.now(UTC),
    )


def claimed(claim: Claim) -> set[tuple[str, str]]:
    return {(d.event.id, d.handler) for d in claim.deliveries}


def only(claim: Claim) -> StoredDelivery:
    [delivery] = claim.deliveries
    return delivery


# -- sessions -------------------------------------------------------------------------------


def test_open_returns_an_owner_id(sessions):
    """open() starts a session and returns a non-empty owner id."""
    owner = sessions.new().open()
    assert isinstance(owner, str)
    assert owner


def test_open_twice_raises_runtime_error(store):
    """A second open() on an open store raises RuntimeError."""
    with pytest.raises(RuntimeError):
        store.open()


def test_two_sessions_get_different_owner_ids(sessions):
    """A session opened after another one closed gets a new owner id."""
    store = sessions.new()
    first = store.open()
    store.close()
    second = sessions.new()
    assert second.open() != first


def test_add_before_open_raises_runtime_error(sessions):
    """add() on a store with no open session raises RuntimeError."""
    store = sessions.new()
    with pytest.raises(RuntimeError):
        store.add(event(), ["h"])


# -- adding and the state of deliveries -----------------------------------------------------


def test_add_stores_a_pending_delivery_per_handler(store):
    """add() commits one pending delivery per handler, with no attempts and no error."""
    ev = event()
    assert store.add(ev, ["a", "b"]) is None
    status = store.status(ev.id)
    assert status is not None
    assert {h: (d.state, d.attempts, d.error) for h, d in status.items()} == {
        "a": ("pending", 0, None),
        "b": ("pending", 0, None),
    }


def test_status_of_an_unknown_event_is_none(store):
    """status() of an id never added is None."""
    assert store.status("no-such-event") is None


def test_add_with_a_key_twice_returns_the_first_event(store):
    """A second add() under the same key returns the first event."""
    first = event(payload={"id": 1})
    store.add(first, ["h"], key="order-1")
    again = store.add(event(payload={"id": 2}), ["h"], key="order-1")
    assert again == first


def test_add_with_a_key_twice_writes_nothing_the_second_time(store):
    """The event of a repeated key is not stored and gets no deliveries."""
    store.add(event(), ["h"], key="order-1")
    second = event()
    store.add(second, ["h", "other"], key="order-1")
    assert store.status(second.id) is None


def test_different_keys_are_stored_separately(store):
    """Events under different keys are both stored."""
    a, b = event(), event()
    assert store.add(a, ["h"], key="k1") is None
    assert store.add(b, ["h"], key="k2") is None
    assert store.status(a.id) is not None
    assert store.status(b.id) is not None


def test_started_marks_the_delivery_running_with_its_attempt(store):
    """started() makes the delivery running with the attempt number given."""
    ev = event()
    store.add(ev, ["h"])
    store.started(ev.id, "h", 1)
    assert store.status(ev.id)["h"].state == "running"
    assert store.status(ev.id)["h"].attempts == 1


def test_retrying_records_attempts_and_error(store):
    """retrying() makes the delivery retrying with its attempts and last error."""
    ev = event()
    store.add(ev, ["h"])
    store.started(ev.id, "h", 1)
    store.retrying(ev.id, "h", 1, "ValueError: bad", datetime.now(UTC).timestamp() + 60)
    delivery = store.status(ev.id)["h"]
    assert (delivery.state, delivery.attempts, delivery.error) == ("retrying", 1, "ValueError: bad")


def test_succeeded_clears_the_error(store):
    """succeeded() after a failed attempt marks the delivery succeeded with no error."""
    ev = event()
    store.add(ev, ["h"])
    store.started(ev.id, "h", 1)
    store.retrying(ev.id, "h", 1, "ValueError: bad", datetime.now(UTC).timestamp())
    store.started(ev.id, "h", 2)
    store.succeeded(ev.id, "h")
    store.flush()
    delivery = store.status(ev.id)["h"]
    assert (delivery.state, delivery.attempts, delivery.error) == ("succeeded", 2, None)


def test_flush_makes_a_success_visible_to_other_readers(sessions):
    """After succeeded() and flush(), a reader of the same data sees the delivery succeeded."""
    store = sessions.first()
    ev = event()
    store.add(ev, ["h"])
    store.started(ev.id, "h", 1)
    store.succeeded(ev.id, "h")
    store.flush()
    assert sessions.reader().status(ev.id)["h"].state == "succeeded"


def test_flush_with_nothing_deferred_is_harmless(store):
    """flush() with no deferred write changes nothing."""
    ev = event()
    store.add(ev, ["h"])
    store.flush()
    assert store.status(ev.id)["h"].state == "pending"


def test_transitions_touch_only_their_own_delivery(store):
    """A state change of one handler's delivery leaves the event's other deliveries as they were."""
    ev = event()
    store.add(ev, ["a", "b"])
    store.started(ev.id, "a", 1)
    store.succeeded(ev.id, "a")
    store.flush()
    assert store.status(ev.id)["b"].state == "pending"


def test_dead_marks_the_delivery_dead(store):
    """dead() marks the delivery dead with the letter's attempts and error."""
    ev = event()
    store.add(ev, ["h"])
    store.started(ev.id, "h", 3)
    store.dead(letter(ev))
    delivery = store.status(ev.id)["h"]
    assert (delivery.state, delivery.attempts, delivery.error) == ("dead", 3, "ValueError: bad")


# -- dead letters ---------------------------------------------------------------------------


def test_dead_letter_is_listed(store):
    """dead() adds the letter to dead_letters(), equal to what was stored."""
    ev = event()
    store.add(ev, ["h"])
    dead = letter(ev)
    store.dead(dead)
    assert store.dead_letters() == [dead]


def test_dead_letter_by_id(store):
    """dead_letter(id) returns the stored letter."""
    ev = event()
    store.add(ev, ["h"])
    dead = letter(ev)
    store.dead(dead)
    assert store.dead_letter(dead.id) == dead


def test_dead_letter_of_an_unknown_id_is_none(store):
    """dead_letter() of an unknown id is None."""
    assert store.dead_letter("no-such-letter") is None


def test_dead_letters_are_listed_oldest_first(store):
    """dead_letters() lists letters in the order they failed."""
    events = [event() for _ in range(3)]
    start = datetime.now(UTC)
    for i, ev in enumerate(events):
        store.add(ev, ["h"])
        store.dead(letter(ev, failed_at=start + timedelta(seconds=i)))
    assert [d.event.id for d in store.dead_letters()] == [ev.id for ev in events]


def test_dead_letters_are_ordered_by_failure_time_not_by_commit(store):
    """A letter that failed earlier is listed first even if it was committed later."""
    early, late = event(), event()
    now = datetime.now(UTC)
    store.add(late, ["h"])
    store.add(early, ["h"])
    store.dead(letter(late, failed_at=now))
    store.dead(letter(early, failed_at=now - timedelta(seconds=5)))
    assert [d.event.id for d in store.dead_letters()] == [early.id, late.id]


def test_dead_letters_survive_a_new_session(sessions):
    """Dead letters committed by one session are listed by the next."""
    store = sessions.first()
    ev = event()
    store.add(ev, ["h"])
    dead = letter(ev)
    store.dead(dead)
    assert sessions.reopen(store).dead_letters() == [dead]


def test_replay_returns_and_removes_the_letter(store):
    """replay_dead_letter() returns the letter and removes it from the dead letters."""
    ev = event()
    store.add(ev, ["h"])
    dead = letter(ev)
    store.dead(dead)
    assert store.replay_dead_letter(dead.id) == dead
    assert store.dead_letters() == []
    assert store.dead_letter(dead.id) is None


def test_replay_makes_the_delivery_pending_with_no_attempts(store):
    """A replayed delivery is pending again, with 0 attempts and no error."""
    ev = event()
    store.add(ev, ["h"])
    store.dead(letter(ev))
    store.replay_dead_letter(letter(ev).id)
    delivery = store.status(ev.id)["h"]
    assert (delivery.state, delivery.attempts, delivery.error) == ("pending", 0, None)


def test_replay_of_an_unknown_letter_is_none(store):
    """replay_dead_letter() of an unknown id returns None."""
    assert store.replay_dead_letter("no-such-letter") is None


def test_replay_without_claim_is_claimable_by_another_session(sessions):
    """A delivery replayed with claim=False is claimed by the next session that claims."""
    store = sessions.first()
    ev = event()
    store.add(ev, ["h"])
    store.dead(letter(ev))
    store.replay_dead_letter(letter(ev).id, claim=False)
    delivery = only(sessions.peer(store).claim(["h"]))
    assert (delivery.event, delivery.handler, delivery.state, delivery.attempts) == (
        ev,
        "h",
        "pending",
        0,
    )


def test_replay_with_claim_is_not_claimable_by_another_session(sessions):
    """A delivery replayed with claim=True belongs to the open bus: another live owner gets none."""
    store = sessions.first()
    ev = event()
    store.add(ev, ["h"])
    store.dead(letter(ev))
    store.replay_dead_letter(letter(ev).id, claim=True)
    assert sessions.peer(store).claim(["h"]).deliveries == []


def test_replay_with_claim_needs_an_open_session(sessions):
    """replay_dead_letter(claim=True) without an open session raises RuntimeError."""
    store = sessions.first()
    ev = event()
    store.add(ev, ["h"])
    store.dead(letter(ev))
    store.close()
    reader = sessions.new()
    with pytest.raises(RuntimeError):
        reader.replay_dead_letter(letter(ev).id, claim=True)


def test_purge_by_ids_deletes_those_letters(store):
    """purge_dead_letters(ids) deletes the letters named and counts only those that existed."""
    a, b = event(), event()
    for ev in (a, b):
        store.add(ev, ["h"])
        store.dead(letter(ev))
    assert store.purge_dead_letters([letter(a).id, "no-such-letter"]) == 1
    assert [d.event.id for d in store.dead_letters()] == [b.id]


def test_purge_all(store):
    """purge_dead_letters() with no ids deletes every letter and returns how many."""
    for ev in (event(), event()):
        store.add(ev, ["h"])
        store.dead(letter(ev))
    assert store.purge_dead_letters() == 2
    assert store.dead_letters() == []


def test_purged_delivery_stays_dead(store):
    """A purged letter's delivery is still recorded as dead."""
    ev = event()
    store.add(ev, ["h"])
    store.dead(letter(ev))
    store.purge_dead_letters()
    assert store.status(ev.id)["h"].state == "dead"


# -- release and claim ----------------------------------------------------------------------


def test_claim_never_returns_a_delivery_a_live_session_owns(sessions):
    """Deliveries added by a live session are not claimable by another."""
    store = sessions.first()
    store.add(event(), ["h"])
    assert sessions.peer(store).claim(["h"]).deliveries == []


def test_release_makes_deliveries_claimable(sessions):
    """release() hands the deliveries to whichever session claims next."""
    store = sessions.first()
    ev = event()
    store.add(ev, ["a", "b"])
    store.release([(ev.id, "a")])
    assert claimed(sessions.peer(store).claim(["a", "b"])) == {(ev.id, "a")}


def test_release_turns_running_into_pending(sessions):
    """A released running delivery is claimed as pending with its attempts kept."""
    store = sessions.first()
    ev = event()
    store.add(ev, ["h"])
    store.started(ev.id, "h", 2)
    store.release([(ev.id, "h")])
    delivery = only(sessions.peer(store).claim(["h"]))
    assert (delivery.state, delivery.attempts) == ("pending", 2)


def test_claim_takes_a_delivery_once(sessions):
    """A claimed delivery is not returned by a later claim."""
    store = sessions.first()
    ev = event()
    store.add(ev, ["h"])
    store.release([(ev.id, "h")])
    peer = sessions.peer(store)
    assert claimed(peer.claim(["h"])) == {(ev.id, "h")}
    assert peer.claim(["h"]).deliveries == []


def test_claim_after_close_returns_pending_deliveries(sessions):
    """A second session claims the pending deliveries the first one left."""
    store = sessions.first()
    ev = event(payload={"id": 7})
    store.add(ev, ["h"])
    delivery = only(sessions.reopen(store).claim(["h"]))
    assert delivery == StoredDelivery(ev, "h", "pending", 0, None, None)


def test_claim_returns_a_running_delivery_with_its_attempts(sessions):
    """A running delivery no session owns is claimed as running, with its attempts."""
    store = sessions.first()
    ev = event()
    store.add(ev, ["h"])
    store.release([(ev.id, "h")])
    store.started(ev.id, "h", 2)  # what a process that died mid-attempt leaves behind
    delivery = only(sessions.peer(store).claim(["h"]))
    assert (delivery.state, delivery.attempts) == ("running", 2)


def test_claim_after_close_returns_a_retry_with_its_due_time(sessions):
    """A retrying delivery is claimed with its attempts, error and wall-clock due time."""
    store = sessions.first()
    ev = event()
    due_at = datetime.now(UTC).timestamp() + 60
    store.add(ev, ["h"])
    store.started(ev.id, "h", 1)
    store.retrying(ev.id, "h", 1, "ValueError: bad", due_at)
    delivery = only(sessions.reopen(store).claim(["h"]))
    assert (delivery.state, delivery.attempts, delivery.error, delivery.due_at) == (
        "retrying",
        1,
        "ValueError: bad",
        due_at,
    )


def test_claim_skips_finished_deliveries(sessions):
    """Succeeded and dead deliveries are never claimed."""
    store = sessions.first()
    ev = event()
    store.add(ev, ["ok", "dead"])
    store.succeeded(ev.id, "ok")
    store.dead(letter(ev, "dead"))
    assert sessions.reopen(store).claim(["ok", "dead"]).deliveries == []


def test_claim_counts_unknown_handlers(sessions):
    """Deliveries for handler names not asked for are counted in unknown, by name."""
    store = sessions.first()
    store.add(event(), ["known", "gone"])
    store.add(event(), ["gone"])
    claim = sessions.reopen(store).claim(["known"])
    assert (len(claim.deliveries), claim.unknown) == (1, {"gone": 2})


def test_claim_leaves_unknown_handlers_for_a_later_claim(sessions):
    """Deliveries of an unknown handler stay claimable by a session that knows it."""
    store = sessions.first()
    ev = event()
    store.add(ev, ["known", "gone"])
    store = sessions.reopen(store)
    store.claim(["known"])
    assert claimed(sessions.reopen(store).claim(["gone"])) == {(ev.id, "gone")}


def test_claim_quarantines_nothing_that_decodes(sessions):
    """A claim of well-formed rows quarantines nothing."""
    store = sessions.first()
    store.add(event(), ["h"])
    assert sessions.reopen(store).claim(["h"]).quarantined == []


def test_claim_needs_an_open_session(sessions):
    """claim() without an open session raises RuntimeError."""
    store = sessions.first()
    store.close()
    with pytest.raises(RuntimeError):
        sessions.new().claim(["h"])


def test_close_releases_the_sessions_deliveries(sessions):
    """close() makes the session's unfinished deliveries claimable."""
    store = sessions.first()
    events = [event() for _ in range(3)]
    for ev in events:
        store.add(ev, ["h"])
    assert claimed(sessions.reopen(store).claim(["h"])) == {(ev.id, "h") for ev in events}


def test_close_turns_running_into_pending_with_attempts(sessions):
    """A delivery running at close() is claimed as pending, its attempts kept."""
    store = sessions.first()
    ev = event()
    store.add(ev, ["h"])
    store.started(ev.id, "h", 2)
    delivery = only(sessions.reopen(store).claim(["h"]))
    assert (delivery.state, delivery.attempts) == ("pending", 2)


def test_close_leaves_a_running_delivery_it_does_not_own_as_it_is(sessions):
    """close() touches only its own deliveries: an unowned running one stays running."""
    store = sessions.first()
    ev = event()
    store.add(ev, ["h"])
    store.release([(ev.id, "h")])
    store.started(ev.id, "h", 3)  # what a process that died mid-attempt leaves behind
    delivery = only(sessions.reopen(store).claim(["h"]))
    assert (delivery.state, delivery.attempts) == ("running", 3)


def test_close_is_idempotent(store):
    """close() twice is harmless."""
    store.close()
    store.close()


def test_store_can_be_opened_again_after_close(sessions):
    """A closed store opens a new session."""
    store = sessions.first()
    ev = event()
    store.add(ev, ["h"])
    store.close()
    store.open()
    assert claimed(store.claim(["h"])) == {(ev.id, "h")}


# -- retention ------------------------------------------------------------------------------


def fill_until_pruned(store: Store, oldest: Event) -> None:
    """Add succeeded events until *oldest* is pruned (failing after PRUNE_BOUND events)."""
    for _ in range(PRUNE_BOUND):
        if store.status(oldest.id) is None:
            store.flush()
            return
        filler = event("tick")
        store.add(filler, ["h"])
        store.succeeded(filler.id, "h")
    pytest.fail(f"{oldest.id} was not pruned after {PRUNE_BOUND} events")


@pytest.mark.parametrize("kind", KINDS)
def test_retention_prunes_old_succeeded_events(make_sessions, kind):
    """Once more than retention events are stored, old fully succeeded ones are pruned."""
    store = make_sessions(kind, retention=2).first()
    oldest = event()
    store.add(oldest, ["h"])
    store.succeeded(oldest.id, "h")
    fill_until_pruned(store, oldest)
    assert store.status(oldest.id) is None


@pytest.mark.parametrize("kind", KINDS)
def test_retention_forgets_the_key_of_a_pruned_event(make_sessions, kind):
    """A key whose event was pruned can be used again."""
    store = make_sessions(kind, retention=2).first()
    oldest = event()
    store.add(oldest, ["h"], key="k")
    store.succeeded(oldest.id, "h")
    fill_until_pruned(store, oldest)
    assert store.add(event(), ["h"], key="k") is None


@pytest.mark.parametrize("kind", KINDS)
def test_retention_keeps_events_with_a_dead_delivery(make_sessions, kind):
    """An event with a dead delivery is not pruned, nor its dead letter."""
    store = make_sessions(kind, retention=2).first()
    dead = event()
    store.add(dead, ["ok", "bad"])
    store.succeeded(dead.id, "ok")
    store.dead(letter(dead, "bad"))
    marker = event()
    store.add(marker, ["h"])
    store.succeeded(marker.id, "h")
    fill_until_pruned(store, marker)
    assert store.status(dead.id)["bad"].state == "dead"
    assert [d.event.id for d in store.dead_letters()] == [dead.id]


@pytest.mark.parametrize("kind", KINDS)
def test_retention_keeps_events_with_open_deliveries(make_sessions, kind):
    """An event with a pending, running or retrying delivery is not pruned."""
    store = make_sessions(kind, retention=2).first()
    open_event = event()
    store.add(open_event, ["done", "pending", "running", "retrying"])
    store.succeeded(open_event.id, "done")
    store.started(open_event.id, "running", 1)
    store.retrying(open_event.id, "retrying", 1, "ValueError: x", 0.0)
    marker = event()
    store.add(marker, ["h"])
    store.succeeded(marker.id, "h")
    fill_until_pruned(store, marker)
    assert {h: d.state for h, d in store.status(open_event.id).items()} == {
        "done": "succeeded",
        "pending": "pending",
        "running": "running",
        "retrying": "retrying",
    }


# -- SQLiteStore only -----------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
def sqlite_stores(db_path: Path) -> Iterator[Callable[..., SQLiteStore]]:
    """Builds SQLiteStores on db_path; all are closed at teardown."""
    made: list[SQLiteStore] = []

    def make(**options: Any) -> SQLiteStore:
        store = SQLiteStore(db_path, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def count_rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        count: int = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    db.close()
    return count


def test_sqlite_unserializable_payload_raises_type_error(sqlite_stores):
    """add() of a payload JSON cannot hold raises TypeError."""
    store = sqlite_stores()
    store.open()
    with pytest.raises(TypeError, match="set"):
        store.add(event(payload={"tags": {1, 2}}), ["h"])


def test_sqlite_unserializable_payload_writes_no_row(sqlite_stores, db_path):
    """A refused payload leaves no event or delivery row behind."""
    store = sqlite_stores()
    store.open()
    ev = event(payload={"tags": {1, 2}})
    with pytest.raises(TypeError):
        store.add(ev, ["h"])
    assert store.status(ev.id) is None
    assert (count_rows(db_path, "events"), count_rows(db_path, "deliveries")) == (0, 0)


def corrupt_payloads(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE events SET payload = '{not json'")
    db.close()


def test_sqlite_corrupted_payload_is_quarantined_by_claim(sqlite_stores, db_path):
    """A row whose payload no longer decodes is turned into a not_retryable dead letter."""
    first = sqlite_stores()
    first.open()
    ev = event()
    first.add(ev, ["h"])
    first.close()
    corrupt_payloads(db_path)
    second = sqlite_stores()
    second.open()
    claim = second.claim(["h"])
    [quarantined] = claim.quarantined
    assert claim.deliveries == []
    assert (quarantined.event.id, quarantined.handler, quarantined.reason) == (
        ev.id,
        "h",
        "not_retryable",
    )
    assert "CodecError" in quarantined.error
    assert "not valid JSON" in quarantined.error


def test_sqlite_quarantined_row_is_a_stored_dead_letter(sqlite_stores, db_path):
    """The quarantined delivery is dead and its letter is listed with the payload None."""
    first = sqlite_stores()
    first.open()
    ev = event()
    first.add(ev, ["h"])
    first.close()
    corrupt_payloads(db_path)
    second = sqlite_stores()
    second.open()
    [quarantined] = second.claim(["h"]).quarantined
    assert second.status(ev.id)["h"].state == "dead"
    [listed] = second.dead_letters()
    assert (listed.id, listed.event.payload, listed.error) == (
        quarantined.id,
        None,
        quarantined.error,
    )


@pytest.fixture
def normal_umask() -> Iterator[None]:
    """Run under the usual umask 022, whatever the test runner's is."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.usefixtures("normal_umask")
def test_sqlite_files_are_readable_by_the_owner_only(sqlite_stores, db_path):
    """The database file and its -wal and -shm files are mode 0o600 while a store is open."""
    store = sqlite_stores()
    store.open()
    store.add(event(), ["h"])
    paths = [db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")]
    modes = {p.name: oct(os.stat(p).st_mode & 0o777) for p in paths}
    assert modes == {p.name: oct(0o600) for p in paths}


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_sqlite_synchronous_accepts_normal_and_full(sqlite_stores, synchronous):
    """synchronous="NORMAL" and "FULL" are accepted and the store works."""
    store = sqlite_stores(synchronous=synchronous)
    store.open()
    ev = event()
    store.add(ev, ["h"])
    assert store.status(ev.id)["h"].state == "pending"


@pytest.mark.parametrize("synchronous", ["OFF", "normal", "EXTRA", ""])
def test_sqlite_synchronous_rejects_other_values(db_path, synchronous):
    """Any other synchronous value raises ValueError and creates no file."""
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore(db_path, synchronous=synchronous)
    assert not db_path.exists()


def test_sqlite_live_session_of_another_instance_is_not_claimed(sqlite_stores):
    """A second SQLiteStore on the file does not claim deliveries a live instance owns."""
    first = sqlite_stores()
    first.open()
    first.add(event(), ["h"])
    second = sqlite_stores()
    second.open()
    assert second.claim(["h"]).deliveries == []


def test_sqlite_concurrent_claims_never_share_a_delivery(sqlite_stores):
    """Two stores on one file claiming at once from two threads split the deliveries exactly."""
    maker = sqlite_stores()
    maker.open()
    events = [event() for _ in range(200)]
    for ev in events:
        maker.add(ev, ["h"])
    maker.close()  # releases all 200
    claimers = [sqlite_stores(), sqlite_stores()]
    for store in claimers:
        store.open()
    barrier = threading.Barrier(len(claimers))
    results: list[set[tuple[str, str]]] = [set(), set()]

    def claim(i: int) -> None:
        barrier.wait()
        for _ in range(20):  # several rounds, so the two really interleave
            results[i] |= claimed(claimers[i].claim(["h"]))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(claimers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] | results[1] == {(ev.id, "h") for ev in events}
    assert results[0] & results[1] == set()


def test_sqlite_store_stamps_its_schema_version(tmp_path):
    """A new store file records the schema version it was written with."""
    import sqlite3

    from eventbus.stores.sqlite import SCHEMA_VERSION, SQLiteStore

    SQLiteStore(tmp_path / "v.db").close()
    with sqlite3.connect(tmp_path / "v.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_sqlite_store_refuses_a_file_from_a_newer_schema(tmp_path):
    """A file stamped with a newer schema version is refused, not misread."""
    import sqlite3

    from eventbus.stores.sqlite import SCHEMA_VERSION, SQLiteStore

    SQLiteStore(tmp_path / "v.db").close()
    with sqlite3.connect(tmp_path / "v.db") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="upgrade eventbus"):
        SQLiteStore(tmp_path / "v.db")


def test_sqlite_heartbeat_brings_back_an_owner_declared_dead(tmp_path):
    """A heartbeat after another process deleted this owner's row (a pause longer than the
    lease) writes the row again, so the owner is alive to others once more."""
    import sqlite3

    from eventbus.stores import SQLiteStore

    store = SQLiteStore(tmp_path / "h.db")
    owner = store.open()
    try:
        with sqlite3.connect(tmp_path / "h.db") as other:
            other.execute("DELETE FROM owners WHERE owner = ?", (owner,))
        store._beat()  # what the background thread does every lease / 3
        with sqlite3.connect(tmp_path / "h.db") as other:
            rows = other.execute("SELECT owner FROM owners").fetchall()
        assert rows == [(owner,)]
    finally:
        store.close()


# -- SQLiteStore: rows that cannot be decoded -----------------------------------------------


def left_pending(make: Callable[..., SQLiteStore], count: int) -> list[Event]:
    """*count* events, each with a pending delivery to "h" that nobody owns."""
    store = make()
    store.open()
    events = [event(payload={"id": i}) for i in range(count)]
    for ev in events:
        store.add(ev, ["h"])
    store.close()
    return events


@pytest.mark.parametrize(("column", "text", "why"), DAMAGE)
def test_sqlite_claim_quarantines_a_damaged_row_and_claims_the_others(
    sqlite_stores, db_path, column, text, why
):
    """A claim turns the one undecodable row into a dead letter saying why, and takes the
    good rows around it."""
    good, bad, other = left_pending(sqlite_stores, 3)
    damage(db_path, bad.id, column, text)
    store = sqlite_stores()
    store.open()
    claim = store.claim(["h"])
    assert claimed(claim) == {(good.id, "h"), (other.id, "h")}
    [quarantined] = claim.quarantined
    assert (quarantined.event.id, quarantined.handler, quarantined.reason) == (
        bad.id,
        "h",
        "not_retryable",
    )
    assert quarantined.error.startswith("cannot decode the stored event: CodecError: ")
    assert why in quarantined.error
    assert store.status(bad.id)["h"].state == "dead"


@pytest.mark.parametrize(("column", "text", "why"), DAMAGE)
def test_sqlite_quarantined_row_is_listed_with_what_could_be_read(
    sqlite_stores, db_path, column, text, why
):
    """dead_letters() and dead_letter() list a quarantined row, keeping every readable field
    and the stored text of the name."""
    [bad] = left_pending(sqlite_stores, 1)
    damage(db_path, bad.id, column, text)
    store = sqlite_stores()
    store.open()
    [quarantined] = store.claim(["h"]).quarantined
    [listed] = store.dead_letters()
    assert listed == quarantined
    assert store.dead_letter(quarantined.id) == quarantined
    kept = listed.event
    assert kept.name == (text if column == "name" else bad.name)
    assert kept.payload == (None if column == "payload" else bad.payload)
    assert kept.metadata == ({} if column == "metadata" else bad.metadata)
    assert kept.occurred_at.tzinfo is not None
    if column != "occurred_at":
        assert kept.occurred_at == bad.occurred_at


@pytest.mark.parametrize(("column", "text", "why"), DAMAGE)
def test_sqlite_dead_letter_of_a_damaged_event_can_be_read_and_replayed(
    sqlite_stores, db_path, column, text, why
):
    """A dead letter whose event was damaged afterwards is still listed, shown and replayed
    without a claim (the next claim then quarantines it again)."""
    store = sqlite_stores()
    store.open()
    ev = event()
    store.add(ev, ["h"])
    dead = letter(ev)
    store.dead(dead)
    store.close()
    damage(db_path, ev.id, column, text)
    reader = sqlite_stores()
    assert [d.id for d in reader.dead_letters()] == [dead.id]
    assert reader.dead_letter(dead.id).event.id == ev.id
    replayed = reader.replay_dead_letter(dead.id)
    assert replayed is not None
    assert replayed.error == dead.error
    assert reader.status(ev.id)["h"].state == "pending"
    reader.open()
    claim = reader.claim(["h"])
    assert claim.deliveries == []
    assert why in claim.quarantined[0].error


def test_sqlite_add_under_the_key_of_a_damaged_event_returns_what_can_be_read(
    sqlite_stores, db_path
):
    """add() under the key of a stored event that no longer decodes returns that event as
    far as it can be read, and writes nothing."""
    store = sqlite_stores()
    store.open()
    first = event()
    store.add(first, ["h"], key="order-1")
    damage(db_path, first.id, "occurred_at", "yesterday")
    second = event()
    kept = store.add(second, ["h"], key="order-1")
    assert kept is not None
    assert (kept.id, kept.name, kept.payload, kept.metadata) == (
        first.id,
        first.name,
        first.payload,
        first.metadata,
    )
    assert store.status(second.id) is None


def test_sqlite_replay_with_claim_refuses_an_event_that_cannot_be_decoded(sqlite_stores, db_path):
    """replay_dead_letter(claim=True) of an undecodable event raises CodecError and changes
    nothing: the dead letter stays and its delivery stays dead."""
    from eventbus.exceptions import CodecError

    store = sqlite_stores()
    store.open()
    ev = event()
    store.add(ev, ["h"])
    dead = letter(ev)
    store.dead(dead)
    damage(db_path, ev.id, "occurred_at", "yesterday")
    with pytest.raises(CodecError, match="occurred_at"):
        store.replay_dead_letter(dead.id, claim=True)
    assert [d.id for d in store.dead_letters()] == [dead.id]
    assert store.status(ev.id)["h"].state == "dead"


@pytest.mark.parametrize(
    ("column", "text", "why"),
    [
        pytest.param("attempts", "two", "attempts", id="attempts"),
        pytest.param("due_at", "soon", "due_at", id="due-at"),
    ],
)
def test_sqlite_claim_quarantines_a_damaged_delivery_row(sqlite_stores, db_path, column, text, why):
    """A delivery row whose attempt count or due time is not a number is quarantined with a
    dead letter naming the column; the other rows are claimed."""
    good, bad = left_pending(sqlite_stores, 2)
    with sqlite3.connect(db_path) as db:
        db.execute(f"UPDATE deliveries SET {column} = ? WHERE event_id = ?", (text, bad.id))
    db.close()
    store = sqlite_stores()
    store.open()
    claim = store.claim(["h"])
    assert claimed(claim) == {(good.id, "h")}
    [quarantined] = claim.quarantined
    assert quarantined.event == bad
    assert quarantined.error.startswith("cannot decode the stored delivery: ")
    assert why in quarantined.error


def test_sqlite_dead_letter_with_a_damaged_failure_time_is_listed(sqlite_stores, db_path):
    """A dead letter whose stored failure time is not a timestamp is listed all the same."""
    store = sqlite_stores()
    store.open()
    ev = event()
    store.add(ev, ["h"])
    dead = letter(ev)
    store.dead(dead)
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE dead_letters SET failed_at = 'a while ago'")
    db.close()
    [listed] = store.dead_letters()
    assert (listed.id, listed.event) == (dead.id, ev)
    assert listed.failed_at.tzinfo is not None


# -- SQLiteStore(create=False): an existing store only --------------------------------------


def test_sqlite_create_false_opens_an_existing_store(sqlite_stores, db_path):
    """create=False opens a store file made earlier and reads and writes it as usual."""
    first = sqlite_stores()
    first.open()
    ev = event()
    first.add(ev, ["h"])
    first.close()
    store = sqlite_stores(create=False)
    store.open()
    assert claimed(store.claim(["h"])) == {(ev.id, "h")}


def test_sqlite_create_false_refuses_a_missing_file_and_creates_none(tmp_path):
    """create=False on a path that does not exist raises FileNotFoundError naming it, and
    creates no file."""
    path = tmp_path / "typo.db"
    with pytest.raises(FileNotFoundError, match=r"typo\.db"):
        SQLiteStore(path, create=False)
    assert list(tmp_path.iterdir()) == []


def test_sqlite_create_false_refuses_an_empty_file_and_leaves_it_empty(tmp_path):
    """create=False on a 0-byte file raises ValueError ("not an eventbus store") and writes
    nothing: the file stays empty and no journal file appears."""
    path = tmp_path / "empty.db"
    path.touch()
    with pytest.raises(ValueError, match="not an eventbus store"):
        SQLiteStore(path, create=False)
    assert {p.name: p.stat().st_size for p in tmp_path.iterdir()} == {"empty.db": 0}


def test_sqlite_create_false_refuses_a_store_missing_a_table(sqlite_stores, db_path):
    """create=False on a file with some eventbus tables missing raises ValueError naming them
    and creates none."""
    sqlite_stores().close()
    with sqlite3.connect(db_path) as db:
        db.execute("DROP TABLE dead_letters")
    db.close()
    with pytest.raises(ValueError, match="dead_letters"):
        SQLiteStore(db_path, create=False)
    with sqlite3.connect(db_path) as db:
        tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    db.close()
    assert "dead_letters" not in tables


def test_sqlite_create_false_refuses_another_applications_database(db_path):
    """create=False on a database holding only other tables raises ValueError ("not an
    eventbus store") and adds no eventbus table."""
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    db.close()
    with pytest.raises(ValueError, match="not an eventbus store"):
        SQLiteStore(db_path, create=False)
    with sqlite3.connect(db_path) as db:
        tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    db.close()
    assert tables == {"customers"}


def test_sqlite_store_shares_a_file_with_the_applications_tables(db_path):
    """create=True adds the store's tables beside the application's (so that emit(within=)
    can join its transactions) and leaves the application's rows alone."""
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
        db.execute("INSERT INTO customers VALUES (7)")
    db.close()
    store = SQLiteStore(db_path)
    store.close()
    with sqlite3.connect(db_path) as db:
        tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        rows = db.execute("SELECT id FROM customers").fetchall()
    db.close()
    assert tables == {"customers", "events", "deliveries", "dead_letters", "owners", "attempts"}
    assert rows == [(7,)]


def test_sqlite_create_false_refuses_a_newer_schema(sqlite_stores, db_path):
    """create=False on a file of a newer schema version raises RuntimeError naming the file."""
    from eventbus.stores.sqlite import SCHEMA_VERSION

    sqlite_stores().close()
    with sqlite3.connect(db_path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match=r"events\.db.*upgrade eventbus"):
        SQLiteStore(db_path, create=False)


def test_sqlite_create_false_refuses_memory(tmp_path):
    """create=False with ":memory:" (always a new, empty database) raises ValueError."""
    with pytest.raises(ValueError, match="create=False"):
        SQLiteStore(":memory:", create=False)


# -- attempt history (SQL stores) ------------------------------------------------------------

SQL_KINDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)]


def _sql(sessions: Sessions, query: str) -> list[tuple[Any, ...]]:
    """Rows of *query* (with ``{t}`` before table names) on the sessions' data, read apart."""
    if sessions.dsn is None:
        with sqlite3.connect(sessions.path) as db:
            found = db.execute(query.format(t="")).fetchall()
        db.close()
        return found
    import psycopg

    with psycopg.connect(sessions.dsn, autocommit=True) as conn:
        cursor = conn.execute(query.format(t=f"{sessions.options['schema']}."))
        return cursor.fetchall() if cursor.description is not None else []


def history(sessions: Sessions) -> list[tuple[str, str, int, str]]:
    return [
        (e, h, int(n), err)
        for e, h, n, err in _sql(
            sessions,
            "SELECT event_id, handler, attempt, error FROM {t}attempts ORDER BY failed_at, attempt",
        )
    ]


def _as_schema_version_1(sessions: Sessions) -> None:
    """Turn the sessions' store back into what schema version 1 wrote: no attempts table."""
    if sessions.dsn is None:
        with sqlite3.connect(sessions.path) as db:
            db.execute("DROP TABLE attempts")
            db.execute("PRAGMA user_version = 1")
        db.close()
    else:
        _sql(sessions, "DROP TABLE {t}attempts")
        _sql(sessions, "UPDATE {t}meta SET version = 1")


@pytest.mark.parametrize("kind", SQL_KINDS)
def test_each_failed_attempt_is_kept_in_the_history(make_sessions, kind):
    """retrying() and dead() each add the failure (attempt number, error) to the history; a
    delivery delayed before its first attempt (attempts 0) adds nothing."""
    sessions = make_sessions(kind)
    store = sessions.first()
    ev = event()
    store.add(ev, ["h", "later"])
    store.retrying(ev.id, "later", 0, "", 0.0)
    for n in (1, 2):
        store.started(ev.id, "h", n)
        store.retrying(ev.id, "h", n, f"TimeoutError: try {n}", 0.0)
    store.started(ev.id, "h", 3)
    store.dead(letter(ev))
    assert history(sessions) == [
        (ev.id, "h", 1, "TimeoutError: try 1"),
        (ev.id, "h", 2, "TimeoutError: try 2"),
        (ev.id, "h", 3, "ValueError: bad"),
    ]


@pytest.mark.parametrize("kind", SQL_KINDS)
def test_a_schema_version_1_store_is_used_without_history_then_upgraded(make_sessions, kind):
    """Opened with create=False, a store written by schema version 1 works as before and
    writes no history; opened with create=True it gains the attempts table."""
    sessions = make_sessions(kind)
    sessions.first().close()
    _as_schema_version_1(sessions)
    old: Store
    if kind == "postgres":
        old = PostgresStore(sessions.dsn, create=False, schema=sessions.options["schema"])
    else:
        old = SQLiteStore(sessions.path, create=False)
    try:
        old.open()
        ev = event()
        old.add(ev, ["h"])
        old.retrying(ev.id, "h", 1, "TimeoutError: once", 0.0)
        old.dead(letter(ev))
        assert old.status(ev.id)["h"].state == "dead"
    finally:
        old.close()
    sessions.first().close()  # create=True: brings the schema up to date
    assert history(sessions) == []
    version = (
        _sql(sessions, "PRAGMA user_version")
        if kind == "sqlite"
        else _sql(sessions, "SELECT version FROM {t}meta")
    )
    assert version == [(2,)]
