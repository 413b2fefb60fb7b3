"""Backends: what outlives a delivery, in memory, in a store, or in a transport's stream."""

from __future__ import annotations

import contextvars
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from eventbus._backends import DurableBackend, LocalBackend, StreamedBackend
from eventbus._event import DeadLetter, Delivery, Event
from eventbus._matching import compile_pattern
from eventbus._observe import InDelivery, Observer
from eventbus._outcomes import OutcomeRecorder
from eventbus._records import ATTEMPT, RUNNING, Dispatch, Records
from eventbus._registry import Subscription
from eventbus.stores import MemoryStore


class Sender:
    """Stands in for the bus."""


class FakeTransport:
    """Records acknowledgements and closes; fails them when told to."""

    def __init__(self, *, fail: BaseException | None = None) -> None:
        self.acknowledged: list[str] = []
        self.closed = 0
        self.fail = fail

    def settled(self, token: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.acknowledged.append(token)

    def close(self) -> None:
        self.closed += 1
        if self.fail is not None:
            raise self.fail


def _handler(event: Event) -> None:
    pass


def _dispatch(*handlers: str, token: str | None = None) -> Dispatch:
    subs = [
        Subscription(_handler, name, compile_pattern("order:created"), 0, None, i)
        for i, name in enumerate(handlers)
    ]
    event = Event(name="order:created", payload={"id": 1})
    return Dispatch(event, subs, contextvars.copy_context(), lambda d, i: None, token=token)


def _letter(dispatch: Dispatch, handler: str = "a") -> DeadLetter:
    return DeadLetter(
        id=f"dl-{handler}",
        event=dispatch.event,
        handler=handler,
        attempts=3,
        error="RuntimeError: down",
        reason="exhausted",
    )


def _failing(*args: Any) -> None:
    raise OSError("disk full")


@pytest.fixture
def observer() -> Observer:
    return Observer(OutcomeRecorder(), Sender(), InDelivery())


@pytest.fixture
def store() -> MemoryStore:
    opened = MemoryStore()
    opened.open()
    return opened


@pytest.fixture
def durable(store: MemoryStore, observer: Observer) -> DurableBackend:
    return DurableBackend(store, observer)


def _internal_errors(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["where"], r["error"]) for r in logs if r["event"] == "eventbus.internal_error"]


# -- what the pipeline asks of each --------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "flags"),
    [
        (LocalBackend, (False, True, False)),
        (DurableBackend, (True, False, True)),
        (StreamedBackend, (False, True, True)),
    ],
)
def test_each_backend_declares_what_it_keeps(backend: type[Any], flags: tuple[bool, ...]) -> None:
    """Attempts are recorded only by a store; keys stay in memory unless a store has them;
    unfinished work is left only to a store or a stream."""
    assert (
        backend.records_attempts,
        backend.keeps_keys_in_memory,
        backend.leaves_unfinished,
    ) == flags


# -- LocalBackend --------------------------------------------------------------------------


def test_local_backend_keeps_dead_letters_in_the_records() -> None:
    """A dead letter goes to the records, where the backend lists and purges it."""
    records = Records(10)
    backend = LocalBackend(records)
    dispatch = _dispatch("a")
    letter = _letter(dispatch)
    backend.dead(letter, dispatch, 0)
    assert records.get_dead_letter(letter.id) is letter
    assert backend.dead_letters() == [letter]
    assert backend.purge_dead_letters() == 1
    assert records.dead_letters() == []


def test_local_backend_keeps_nothing_beyond_memory() -> None:
    """add() keeps nothing and answers no key; status() knows nothing the records do not."""
    backend = LocalBackend(Records(10))
    dispatch = _dispatch("a")
    assert backend.add(dispatch, "order-1") is None
    assert backend.status(dispatch.event.id) is None


def test_local_backend_refuses_to_leave_work_unfinished() -> None:
    """leave() is never called on a backend that keeps nothing, and says so if it is."""
    backend = LocalBackend(Records(10))
    with pytest.raises(AssertionError):
        backend.leave([(_dispatch("a"), 0)])


# -- DurableBackend ------------------------------------------------------------------------


def test_durable_add_keeps_a_pending_delivery_per_handler(
    durable: DurableBackend, store: MemoryStore
) -> None:
    """add() commits the event with each handler of the dispatch pending."""
    dispatch = _dispatch("a", "b")
    assert durable.add(dispatch, None) is None
    assert store.status(dispatch.event.id) == {
        "a": Delivery("a", "pending", 0),
        "b": Delivery("b", "pending", 0),
    }


def test_durable_add_answers_a_key_with_the_first_event(durable: DurableBackend) -> None:
    """A key the store holds already returns its event, and keeps nothing new."""
    first, second = _dispatch("a"), _dispatch("a")
    durable.add(first, "order-1")
    assert durable.add(second, "order-1") is first.event
    assert durable.status(second.event.id) is None


def test_durable_backend_records_each_step(durable: DurableBackend, store: MemoryStore) -> None:
    """started, retrying and succeeded are written to the store as they happen."""
    dispatch = _dispatch("a")
    event_id = dispatch.event.id
    durable.add(dispatch, None)
    durable.started(event_id, "a", 1)
    assert durable.status(event_id) == {"a": Delivery("a", "running", 1)}
    durable.retrying(event_id, "a", 1, "RuntimeError: down", time.time() + 5)
    assert durable.status(event_id) == {"a": Delivery("a", "retrying", 1, "RuntimeError: down")}
    durable.started(event_id, "a", 2)
    durable.succeeded(event_id, "a")
    assert durable.status(event_id) == {"a": Delivery("a", "succeeded", 2)}


def test_durable_dead_letters_live_in_the_store(
    durable: DurableBackend, store: MemoryStore
) -> None:
    """A dead letter is committed to the store, listed and purged from there."""
    dispatch = _dispatch("a")
    durable.add(dispatch, None)
    letter = _letter(dispatch)
    durable.dead(letter, dispatch, 0)
    assert store.dead_letter(letter.id) == letter
    assert durable.dead_letters() == [letter]
    assert durable.purge_dead_letters() == 1
    assert store.dead_letters() == []


@pytest.mark.parametrize(
    ("step", "call"),
    [
        ("succeeded", lambda backend, d: backend.succeeded(d.event.id, "a")),
        ("retrying", lambda backend, d: backend.retrying(d.event.id, "a", 1, "E: x", 0.0)),
        ("dead", lambda backend, d: backend.dead(_letter(d), d, 0)),
        ("close", lambda backend, d: backend.close()),
    ],
)
def test_failed_store_write_is_reported_not_raised(
    durable: DurableBackend,
    store: MemoryStore,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    call: Any,
) -> None:
    """A write after the fact that fails is logged as eventbus.internal_error; nothing raises."""
    dispatch = _dispatch("a")
    durable.add(dispatch, None)
    monkeypatch.setattr(store, step, _failing)
    with capture_logs() as logs:
        call(durable, dispatch)
    assert _internal_errors(logs) == [("store", "OSError: disk full")]
    assert logs[0]["log_level"] == "critical"


def test_failed_start_reaches_the_caller(
    durable: DurableBackend, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """started() is committed before the handler runs: its failure fails the attempt."""
    monkeypatch.setattr(store, "started", _failing)
    with pytest.raises(OSError, match="disk full"):
        durable.started("e-1", "a", 1)


def test_durable_leave_releases_to_the_store_and_logs_each(
    durable: DurableBackend, store: MemoryStore
) -> None:
    """Left deliveries are unowned in the store (claimable again) and logged one by one."""
    dispatch = _dispatch("a", "b")
    durable.add(dispatch, None)
    durable.started(dispatch.event.id, "a", 1)
    dispatch.progress[0] = ATTEMPT + RUNNING
    with capture_logs() as logs:
        durable.leave([(dispatch, 0), (dispatch, 1)])
    assert [(r["event"], r["handler"], r["state"]) for r in logs] == [
        ("handler.left_in_store", "a", "running"),
        ("handler.left_in_store", "b", "pending"),
    ]
    claimed = store.claim(["a", "b"])
    assert sorted((d.handler, d.state, d.attempts) for d in claimed.deliveries) == [
        ("a", "pending", 1),
        ("b", "pending", 0),
    ]


def test_durable_leave_with_a_failing_release_still_logs(
    durable: DurableBackend, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release the store refuses is reported, and each delivery is still logged as left."""
    dispatch = _dispatch("a")
    durable.add(dispatch, None)
    monkeypatch.setattr(store, "release", _failing)
    with capture_logs() as logs:
        durable.leave([(dispatch, 0)])
    assert [r["event"] for r in logs] == ["eventbus.internal_error", "handler.left_in_store"]


def test_durable_close_closes_the_store(durable: DurableBackend, store: MemoryStore) -> None:
    """Closing the backend ends the store session, so another bus may open it."""
    durable.close()
    assert store.open()


# -- StreamedBackend -----------------------------------------------------------------------


def test_streamed_event_settled_acknowledges_its_token(observer: Observer) -> None:
    """Once an event from the stream settled, its token is acknowledged to the transport."""
    transport = FakeTransport()
    backend = StreamedBackend(Records(10), transport, observer)  # type: ignore[arg-type]
    backend.event_settled(_dispatch("a", token="1-0"))
    assert transport.acknowledged == ["1-0"]


def test_streamed_failed_acknowledgement_is_reported_not_raised(observer: Observer) -> None:
    """A transport that cannot acknowledge is logged as internal_error; nothing raises."""
    transport = FakeTransport(fail=ConnectionError("redis down"))
    backend = StreamedBackend(Records(10), transport, observer)  # type: ignore[arg-type]
    with capture_logs() as logs:
        backend.event_settled(_dispatch("a", token="1-0"))
    assert _internal_errors(logs) == [("transport", "ConnectionError: redis down")]


def test_streamed_leave_logs_each_and_acknowledges_nothing(observer: Observer) -> None:
    """Left deliveries are logged as handler.left_in_stream; the entry stays unacknowledged."""
    transport = FakeTransport()
    backend = StreamedBackend(Records(10), transport, observer)  # type: ignore[arg-type]
    dispatch = _dispatch("a", "b", token="1-0")
    with capture_logs() as logs:
        backend.leave([(dispatch, 1)])
    assert [(r["event"], r["handler"], r["state"]) for r in logs] == [
        ("handler.left_in_stream", "b", "pending")
    ]
    assert transport.acknowledged == []


def test_streamed_dead_letters_stay_in_memory(observer: Observer) -> None:
    """Dead letters of local deliveries go to the records, not the transport."""
    records = Records(10)
    backend = StreamedBackend(records, FakeTransport(), observer)  # type: ignore[arg-type]
    dispatch = _dispatch("a", token="1-0")
    letter = _letter(dispatch)
    backend.dead(letter, dispatch, 0)
    assert records.dead_letters() == [letter]
    assert backend.dead_letters() == [letter]


def test_streamed_close_closes_the_transport(observer: Observer) -> None:
    """Closing the backend closes the transport."""
    transport = FakeTransport()
    StreamedBackend(Records(10), transport, observer).close()  # type: ignore[arg-type]
    assert transport.closed == 1


def test_streamed_failed_close_is_reported_not_raised(observer: Observer) -> None:
    """A transport that fails to close is logged as internal_error; nothing raises."""
    transport = FakeTransport(fail=ConnectionError("redis down"))
    backend = StreamedBackend(Records(10), transport, observer)  # type: ignore[arg-type]
    with capture_logs() as logs:
        backend.close()
    assert _internal_errors(logs) == [("transport", "ConnectionError: redis down")]
