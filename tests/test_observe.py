"""Observer: each outcome becomes one structlog record and one blinker signal, with receivers
isolated and the in-delivery guard held while they run."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from eventbus import _observe, signals
from eventbus._event import DeadLetter, Delivery, Event
from eventbus._observe import InDelivery, Observer
from eventbus._outcomes import OutcomeRecorder


class Sender:
    """Stands in for the bus that sends the signals."""


@pytest.fixture
def sender() -> Sender:
    return Sender()


@pytest.fixture
def guard() -> InDelivery:
    return InDelivery()


@pytest.fixture
def observer(sender: Sender, guard: InDelivery) -> Observer:
    return Observer(OutcomeRecorder(), sender, guard)


@pytest.fixture
def event() -> Event:
    return Event(name="order:created", payload={"id": 1})


class Receiver:
    """Records each call: the sender and the keyword arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, dict[str, Any]]] = []

    def __call__(self, sender: object, **kwargs: Any) -> None:
        self.calls.append((sender, kwargs))


def _letter(event: Event) -> DeadLetter:
    return DeadLetter(
        id="dl-1",
        event=event,
        handler="a",
        attempts=3,
        error="RuntimeError: down",
        reason="exhausted",
    )


def _names(logs: list[dict[str, Any]]) -> list[str]:
    return [record["event"] for record in logs]


# -- records and signals -------------------------------------------------------------------


def test_emitted_logs_and_signals_the_event(
    observer: Observer, sender: Sender, event: Event
) -> None:
    """An accepted event is logged as event.emitted and sent on event_emitted."""
    receiver = Receiver()
    with signals.event_emitted.connected_to(receiver, sender=sender), capture_logs() as logs:
        observer.emitted(event, 2, verbose=True)
    assert _names(logs) == ["event.emitted"]
    assert logs[0]["handlers"] == 2
    assert receiver.calls == [(sender, {"event": event})]


def test_emitted_without_handlers_logs_unhandled_even_when_not_verbose(
    observer: Observer, event: Event
) -> None:
    """An event nobody handles is logged at info, whatever the debug setting."""
    with capture_logs() as logs:
        observer.emitted(event, 0, verbose=False)
    assert _names(logs) == ["event.unhandled"]
    assert logs[0]["log_level"] == "info"


def test_emitted_not_verbose_logs_nothing(observer: Observer, event: Event) -> None:
    """With debug records filtered out, a handled event writes no record."""
    with capture_logs() as logs:
        observer.emitted(event, 1, verbose=False)
    assert logs == []


def test_published_logs_and_signals_the_event(
    observer: Observer, sender: Sender, event: Event
) -> None:
    """A published event is logged as event.published and sent on event_emitted."""
    receiver = Receiver()
    with signals.event_emitted.connected_to(receiver, sender=sender), capture_logs() as logs:
        observer.published(event)
    assert _names(logs) == ["event.published"]
    assert receiver.calls == [(sender, {"event": event})]


def test_succeeded_logs_and_signals_the_delivery(
    observer: Observer, sender: Sender, event: Event
) -> None:
    """A success is logged with its duration and sent with a succeeded Delivery."""
    receiver = Receiver()
    with signals.handler_succeeded.connected_to(receiver, sender=sender), capture_logs() as logs:
        observer.succeeded(event, "a", 2, "RuntimeError: down", 0.25)
    assert _names(logs) == ["handler.succeeded"]
    assert logs[0]["duration_ms"] == 250.0
    assert logs[0]["attempt"] == 2
    delivery = Delivery("a", "succeeded", 2, "RuntimeError: down")
    assert receiver.calls == [(sender, {"event": event, "delivery": delivery})]


def test_succeeded_without_duration_signals_but_logs_nothing(
    observer: Observer, sender: Sender, event: Event
) -> None:
    """With no duration (debug filtered out) the success is still signalled, not logged."""
    receiver = Receiver()
    with signals.handler_succeeded.connected_to(receiver, sender=sender), capture_logs() as logs:
        observer.succeeded(event, "a", 1, None, None)
    assert logs == []
    assert len(receiver.calls) == 1


def test_failed_logs_and_signals_the_error(
    observer: Observer, sender: Sender, event: Event
) -> None:
    """A failed attempt is logged as handler.failed and sent with the exception itself."""
    receiver = Receiver()
    error = RuntimeError("down")
    delivery = Delivery("a", "running", 1, "RuntimeError: down")
    with signals.handler_failed.connected_to(receiver, sender=sender), capture_logs() as logs:
        observer.failed(event, delivery, error, will_retry=True)
    assert _names(logs) == ["handler.failed"]
    assert logs[0]["will_retry"] is True
    assert logs[0]["error"] == "RuntimeError: down"
    assert receiver.calls == [(sender, {"event": event, "delivery": delivery, "error": error})]


def test_retry_scheduled_logs_and_signals_the_delay(
    observer: Observer, sender: Sender, event: Event
) -> None:
    """A scheduled retry is logged and sent with its delay."""
    receiver = Receiver()
    delivery = Delivery("a", "retrying", 1, "RuntimeError: down")
    with signals.retry_scheduled.connected_to(receiver, sender=sender), capture_logs() as logs:
        observer.retry_scheduled(event, delivery, 2.5)
    assert _names(logs) == ["handler.retry_scheduled"]
    assert logs[0]["delay"] == 2.5
    assert receiver.calls == [(sender, {"event": event, "delivery": delivery, "delay": 2.5})]


def test_dead_lettered_logs_and_signals_the_letter(
    observer: Observer, sender: Sender, event: Event
) -> None:
    """A dead letter is logged at error and sent with its event and the letter."""
    receiver = Receiver()
    letter = _letter(event)
    with signals.dead_lettered.connected_to(receiver, sender=sender), capture_logs() as logs:
        observer.dead_lettered(letter)
    assert _names(logs) == ["handler.dead_lettered"]
    assert logs[0]["log_level"] == "error"
    assert receiver.calls == [(sender, {"event": event, "dead_letter": letter})]


def test_closed_logs_and_signals_the_abandoned_count(observer: Observer, sender: Sender) -> None:
    """Closing is logged with its counts and sent with how many were abandoned."""
    receiver = Receiver()
    with signals.bus_closed.connected_to(receiver, sender=sender), capture_logs() as logs:
        observer.closed(2, 0, 5)
    assert _names(logs) == ["bus.closed"]
    assert (logs[0]["abandoned"], logs[0]["left_in_store"]) == (2, 5)
    assert receiver.calls == [(sender, {"abandoned": 2})]


def test_receivers_of_another_sender_are_not_called(observer: Observer, event: Event) -> None:
    """Only receivers connected for this observer's sender (or any sender) hear it."""
    receiver = Receiver()
    with signals.event_emitted.connected_to(receiver, sender=Sender()):
        observer.emitted(event, 1, verbose=False)
    assert receiver.calls == []


def test_verbose_follows_the_configured_log_level(observer: Observer) -> None:
    """verbose() is True by default and False once debug records are filtered out."""
    assert observer.verbose()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(20))
    assert not observer.verbose()


# -- receivers are isolated ----------------------------------------------------------------


def test_raising_receiver_is_logged_and_the_others_still_run(
    observer: Observer, sender: Sender, event: Event
) -> None:
    """A receiver that raises is logged as signal.receiver_failed; later receivers still run."""

    def broken(sender: object, **kwargs: Any) -> None:
        raise ValueError("receiver bug")

    after = Receiver()
    with (
        signals.event_emitted.connected_to(broken, sender=sender),
        signals.event_emitted.connected_to(after, sender=sender),
        capture_logs() as logs,
    ):
        observer.emitted(event, 1, verbose=False)
    assert _names(logs) == ["signal.receiver_failed"]
    assert logs[0]["signal"] == "event_emitted"
    assert logs[0]["error"] == "ValueError: receiver bug"
    assert len(after.calls) == 1


def test_receiver_raising_a_base_exception_is_isolated(
    observer: Observer, sender: Sender, event: Event
) -> None:
    """Even a KeyboardInterrupt from a receiver is logged, not raised into the delivery."""

    def interrupting(sender: object, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    with signals.dead_lettered.connected_to(interrupting, sender=sender), capture_logs() as logs:
        observer.dead_lettered(_letter(event))
    assert _names(logs) == ["handler.dead_lettered", "signal.receiver_failed"]


# -- the in-delivery guard -----------------------------------------------------------------


def test_guard_is_set_inside_receivers_and_cleared_after(
    observer: Observer, sender: Sender, guard: InDelivery, event: Event
) -> None:
    """While a receiver runs the guard is active; afterwards it is as before."""
    seen: list[bool] = []
    with signals.event_emitted.connected_to(lambda s, **kw: seen.append(guard.active), sender):
        observer.emitted(event, 1, verbose=False)
    assert seen == [True]
    assert guard.active is False


def test_guard_keeps_its_outer_value(
    observer: Observer, sender: Sender, guard: InDelivery, event: Event
) -> None:
    """A receiver run from inside a delivery leaves the guard active afterwards."""
    guard.active = True
    with signals.event_emitted.connected_to(Receiver(), sender=sender):
        observer.emitted(event, 1, verbose=False)
    assert guard.active is True


def test_guard_is_cleared_after_a_raising_receiver(
    observer: Observer, sender: Sender, guard: InDelivery, event: Event
) -> None:
    """A receiver that raises still leaves the guard as it was."""

    def broken(sender: object, **kwargs: Any) -> None:
        raise ValueError("receiver bug")

    with signals.event_emitted.connected_to(broken, sender=sender), capture_logs():
        observer.emitted(event, 1, verbose=False)
    assert guard.active is False


def test_guard_is_per_thread(guard: InDelivery) -> None:
    """The guard set on one thread reads as inactive on another."""
    guard.active = True
    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(guard.active))
    thread.start()
    thread.join()
    assert seen == [False]


# -- nothing is built for nobody -----------------------------------------------------------


OUTCOMES: dict[str, Callable[[Observer, Event], None]] = {
    "emitted": lambda o, e: o.emitted(e, 1, verbose=False),
    "published": lambda o, e: o.published(e),
    "succeeded": lambda o, e: o.succeeded(e, "a", 1, None, None),
    "failed": lambda o, e: o.failed(
        e, Delivery("a", "running", 1), RuntimeError("x"), will_retry=False
    ),
    "retry_scheduled": lambda o, e: o.retry_scheduled(e, Delivery("a", "retrying", 1), 1.0),
    "dead_lettered": lambda o, e: o.dead_lettered(_letter(e)),
    "closed": lambda o, e: o.closed(0, 0, None),
}
ALL_SIGNALS = (
    signals.event_emitted,
    signals.handler_succeeded,
    signals.handler_failed,
    signals.retry_scheduled,
    signals.dead_lettered,
    signals.bus_closed,
)


@pytest.mark.parametrize("outcome", sorted(OUTCOMES))
def test_signal_without_receivers_is_not_sent(
    observer: Observer, event: Event, outcome: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outcome whose signal has no receivers never reaches signals.send."""
    for signal in ALL_SIGNALS:
        monkeypatch.setattr(signal, "receivers", {})
    sent: list[object] = []
    monkeypatch.setattr(signals, "send", lambda signal, *args, **kwargs: sent.append(signal))
    with capture_logs():
        OUTCOMES[outcome](observer, event)
    assert sent == []


def test_success_builds_no_delivery_without_receivers(
    observer: Observer, event: Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nobody listening for successes, no Delivery is built for the signal."""

    def no_delivery(*args: object) -> None:
        raise AssertionError("a Delivery was built for a signal nobody hears")

    monkeypatch.setattr(_observe, "Delivery", no_delivery)
    monkeypatch.setattr(signals.handler_succeeded, "receivers", {})
    with capture_logs() as logs:
        observer.succeeded(event, "a", 1, None, 0.001)
    assert _names(logs) == ["handler.succeeded"]
