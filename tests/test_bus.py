"""Behaviour of EventBus: subscriptions, names and patterns, typed events, the Event envelope,
dispatch, isolation, status, context propagation, re-entrancy, drain, outcome logs and signals.

Synchronisation is by ``threading.Event``, ``drain()``, the inline executor and the fake clock:
nothing here sleeps.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import structlog
import tenacity
from structlog.testing import capture_logs

from eventbus import (
    BusClosedError,
    DrainInHandlerError,
    DuplicateHandlerError,
    Event,
    EventBus,
    InvalidEventError,
    InvalidEventNameError,
    InvalidHandlerError,
    RetryPolicy,
    UnknownEventError,
    signals,
)
from eventbus.testing import FakeClock, inline_bus

#: Upper bound for waits that normally end at once; only a broken bus ever waits this long.
WAIT = 5.0

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


class Fatal(BaseException):
    """Not an Exception: what a handler might raise that a plain ``except Exception`` misses."""


@dataclass(frozen=True)
class OrderEvent:
    order_id: int


@dataclass(frozen=True)
class OrderCreated(OrderEvent):
    event_name: ClassVar[str] = "order:created"
    email: str = ""


@dataclass(frozen=True)
class Pinged:
    """A typed event without ``event_name``: it is emitted under its class name."""


class Recorder:
    """A thread-safe handler that remembers the events it received."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[Event] = []

    def __call__(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.events]


class OrderProcessor:
    """Wires its own bound methods, like the seed application does."""

    def __init__(self, bus: EventBus) -> None:
        self.created: list[Any] = []
        bus.on("order:created")(self.handle_created)

    def handle_created(self, event: Event) -> None:
        self.created.append(event.payload)


def module_handler(event: Event) -> None:
    """A module-level handler, for the default name."""


@pytest.fixture
def single(clock: FakeClock) -> Iterator[EventBus]:
    """A bus with exactly one worker thread: deliveries run one at a time, in queue order."""
    with EventBus(max_workers=1, clock=clock, retry=RetryPolicy(max_attempts=3)) as b:
        yield b


@contextmanager
def receiving(signal: Any, sender: object) -> Iterator[list[tuple[object, dict[str, Any]]]]:
    """Record (sender, kwargs) of every *signal* sent by *sender* while the block runs."""
    calls: list[tuple[object, dict[str, Any]]] = []

    def receiver(sent_by: object, **kwargs: Any) -> None:
        calls.append((sent_by, kwargs))

    signal.connect(receiver, sender=sender, weak=False)
    try:
        yield calls
    finally:
        signal.disconnect(receiver, sender=sender)


def records(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [r for r in logs if r["event"] == event]


# -- subscribing ---------------------------------------------------------------------------


def test_on_returns_the_decorated_function_unchanged(inline):
    """``@bus.on(...)`` hands back the very function it decorates."""
    bus, _ = inline

    def handler(event: Event) -> None:
        pass

    assert bus.on("order:created")(handler) is handler


def test_decorated_function_receives_the_emitted_event(inline):
    """A function decorated with ``@bus.on(name)`` is called with the Event that emit returned."""
    bus, _ = inline
    received = []

    @bus.on("order:created")
    def handler(event: Event) -> None:
        received.append(event)

    event = bus.emit("order:created", {"id": 42})
    assert received == [event]
    assert received[0].payload == {"id": 42}


def test_subscribe_is_the_non_decorator_form(inline):
    """``bus.subscribe(name, handler)`` subscribes the handler and returns it."""
    bus, _ = inline
    recorder = Recorder()
    assert bus.subscribe("order:created", recorder, name="recorder") is recorder
    event = bus.emit("order:created")
    assert recorder.events == [event]


def test_off_removes_a_handler_from_every_subscription(inline):
    """``bus.off(handler)`` unsubscribes it from names, patterns and classes alike."""
    bus, _ = inline
    recorder = Recorder()
    bus.subscribe("order:created", recorder, name="recorder")
    bus.subscribe("order:*", recorder, name="recorder")
    bus.subscribe(OrderCreated, recorder, name="recorder")
    bus.off(recorder)
    by_name = bus.emit("order:created")
    typed = bus.emit(OrderCreated(order_id=1))
    assert recorder.events == []
    assert bus.status(by_name.id) == {}
    assert bus.status(typed.id) == {}


def test_off_leaves_other_handlers_subscribed(inline):
    """Removing one handler does not affect another handler of the same event."""
    bus, _ = inline
    gone, kept = Recorder(), Recorder()
    bus.subscribe("order:created", gone, name="gone")
    bus.subscribe("order:created", kept, name="kept")
    bus.off(gone)
    event = bus.emit("order:created")
    assert gone.events == []
    assert kept.events == [event]


def test_bound_methods_work_as_handlers(bus):
    """A bound method subscribed by its instance is called with the event, on that instance."""
    processor = OrderProcessor(bus)
    event = bus.emit("order:created", {"id": 7})
    assert bus.drain(WAIT)
    assert processor.created == [{"id": 7}]
    assert bus.status(event.id)[f"{__name__}.OrderProcessor.handle_created"].state == "succeeded"


def test_off_accepts_a_fresh_reference_to_a_bound_method(inline):
    """``off(obj.method)`` removes the subscription made with an earlier ``obj.method``."""
    bus, _ = inline
    processor = OrderProcessor(bus)
    bus.off(processor.handle_created)
    bus.emit("order:created", {"id": 7})
    assert processor.created == []


def test_handler_name_defaults_to_module_and_qualname(inline):
    """Without ``name=``, a handler is known as ``module.qualname`` in status."""
    bus, _ = inline
    bus.subscribe("order:created", module_handler)
    event = bus.emit("order:created")
    assert list(bus.status(event.id)) == [f"{__name__}.module_handler"]


def test_name_option_overrides_the_default_name(inline):
    """``name=`` is the name under which the delivery is reported."""
    bus, _ = inline
    bus.subscribe("order:created", module_handler, name="emails.confirmation")
    event = bus.emit("order:created")
    assert list(bus.status(event.id)) == ["emails.confirmation"]


def test_two_handlers_with_the_same_name_are_rejected(inline):
    """Subscribing a second, different handler under a taken name raises a ValueError."""
    bus, _ = inline
    bus.subscribe("order:created", Recorder(), name="shared")
    with pytest.raises(DuplicateHandlerError) as info:
        bus.subscribe("order:paid", Recorder(), name="shared")
    assert isinstance(info.value, ValueError)


def test_same_handler_twice_on_one_pattern_is_rejected(inline):
    """Subscribing one handler to the same pattern twice raises a ValueError."""
    bus, _ = inline
    bus.subscribe("order:*", module_handler)
    with pytest.raises(DuplicateHandlerError) as info:
        bus.subscribe("order:*", module_handler)
    assert isinstance(info.value, ValueError)


def test_handler_on_two_matching_patterns_receives_the_event_once(inline):
    """One handler subscribed to two patterns that both match is called once per event."""
    bus, _ = inline
    recorder = Recorder()
    bus.subscribe("order:created", recorder, name="recorder")
    bus.subscribe("order:*", recorder, name="recorder")
    bus.subscribe("**", recorder, name="recorder")
    event = bus.emit("order:created")
    assert recorder.events == [event]


@pytest.mark.parametrize(
    "pattern",
    ["", "order::created", "order created", ":order", "order:", "order:*x", "order:***", "ord!er"],
)
def test_malformed_pattern_is_rejected_at_subscription(inline, pattern):
    """``on()`` with an empty or malformed name/pattern raises a ValueError right away."""
    bus, _ = inline
    with pytest.raises(InvalidEventNameError) as info:
        bus.on(pattern)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["", "   "])
def test_empty_handler_name_is_rejected(inline, name):
    """``name=`` must be a non-empty string: an empty one raises a ValueError."""
    bus, _ = inline
    with pytest.raises(ValueError, match="name"):
        bus.subscribe("order:created", module_handler, name=name)


@pytest.mark.parametrize("target", [42, None, dict, b"order:created", ["order:created"]])
def test_subscribing_to_something_not_a_name_or_event_class_is_a_type_error(inline, target):
    """``on()`` with a target that is neither a name, a pattern nor an event class raises
    TypeError."""
    bus, _ = inline
    with pytest.raises(TypeError):
        bus.on(target)


def test_non_callable_handler_is_rejected(inline):
    """Subscribing something that cannot be called raises a TypeError."""
    bus, _ = inline
    with pytest.raises(InvalidHandlerError) as info:
        bus.subscribe("order:created", "not a function", name="x")  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)


def no_args() -> None:
    pass


def two_args(event: Event, other: object) -> None:
    pass


def keyword_only(*, event: Event) -> None:
    pass


@pytest.mark.parametrize("handler", [no_args, two_args, keyword_only])
def test_handler_that_cannot_take_one_event_is_rejected(inline, handler):
    """A handler that cannot be called with exactly one positional argument raises TypeError."""
    bus, _ = inline
    with pytest.raises(InvalidHandlerError) as info:
        bus.subscribe("order:created", handler)
    assert isinstance(info.value, TypeError)


def test_handler_with_optional_extra_parameters_is_accepted(inline):
    """A handler whose extra parameters have defaults can take one event, so it is accepted."""
    bus, _ = inline
    received = []

    def handler(event: Event, retries: int = 0, *rest: object) -> None:
        received.append(event)

    bus.subscribe("order:created", handler)
    event = bus.emit("order:created")
    assert received == [event]


def test_callable_object_is_accepted_as_handler(inline):
    """An instance with ``__call__(self, event)`` is a valid handler."""
    bus, _ = inline
    recorder = Recorder()
    bus.subscribe("order:created", recorder)
    event = bus.emit("order:created")
    assert recorder.events == [event]


def test_handler_subscribed_later_receives_only_later_events(inline):
    """A subscription takes effect for events emitted after it, not before."""
    bus, _ = inline
    bus.emit("order:created")
    recorder = Recorder()
    bus.subscribe("order:created", recorder, name="late")
    later = bus.emit("order:created")
    assert recorder.events == [later]


# -- names and patterns -----------------------------------------------------------------------

EMITTED = [
    "order",
    "order:created",
    "order:paid",
    "order:created:v2",
    "billing:invoice.paid",
    "billing:invoice.paid:v1",
    "shipping-eu:label_printed",
]


def matches_of(bus: EventBus, pattern: str) -> list[str]:
    recorder = Recorder()
    bus.subscribe(pattern, recorder, name=f"matches {pattern}")
    for name in EMITTED:
        bus.emit(name)
    return recorder.names


def test_single_star_matches_exactly_one_segment(inline):
    """``order:*`` receives ``order:x`` but neither ``order`` nor ``order:x:y``."""
    bus, _ = inline
    assert matches_of(bus, "order:*") == ["order:created", "order:paid"]


def test_single_star_may_stand_in_any_position(inline):
    """``*:invoice.paid`` matches one segment before the literal one (dots are not separators)."""
    bus, _ = inline
    assert matches_of(bus, "*:invoice.paid") == ["billing:invoice.paid"]


def test_double_star_matches_one_or_more_segments(inline):
    """``order:**`` receives ``order:x`` and ``order:x:y`` but not the bare ``order``."""
    bus, _ = inline
    assert matches_of(bus, "order:**") == ["order:created", "order:paid", "order:created:v2"]


def test_double_star_alone_matches_every_event(inline):
    """A ``"**"`` subscription receives every event, whatever its number of segments."""
    bus, _ = inline
    assert matches_of(bus, "**") == EMITTED


def test_exact_name_matches_only_itself(inline):
    """A subscription without wildcards receives exactly that name."""
    bus, _ = inline
    assert matches_of(bus, "order:created") == ["order:created"]


@pytest.mark.parametrize(
    "name", ["", "order::created", "order created", "order:*", "**", ":order", "order:"]
)
def test_emit_with_malformed_name_is_a_value_error(inline, name):
    """emit() of an empty or malformed name, patterns included, raises a ValueError."""
    bus, _ = inline
    with pytest.raises(InvalidEventNameError) as info:
        bus.emit(name)
    assert isinstance(info.value, ValueError)


def test_rejected_emit_delivers_nothing(inline):
    """An emit that raised for a bad name never reaches a handler, even a catch-all."""
    bus, _ = inline
    recorder = Recorder()
    bus.subscribe("**", recorder, name="everything")
    with pytest.raises(ValueError, match="invalid event name"):
        bus.emit("order created")
    assert recorder.events == []


# -- typed events ---------------------------------------------------------------------------


def test_typed_event_reaches_class_base_class_and_pattern_subscribers(inline):
    """emit(OrderCreated(...)) reaches subscribers of the class, of its base class, of its
    ``event_name`` and of a matching pattern."""
    bus, _ = inline
    by_class, by_base, by_name, by_pattern = Recorder(), Recorder(), Recorder(), Recorder()
    bus.subscribe(OrderCreated, by_class, name="by_class")
    bus.subscribe(OrderEvent, by_base, name="by_base")
    bus.subscribe("order:created", by_name, name="by_name")
    bus.subscribe("order:*", by_pattern, name="by_pattern")
    event = bus.emit(OrderCreated(order_id=1, email="a@example.com"))
    for recorder in (by_class, by_base, by_name, by_pattern):
        assert recorder.events == [event]


def test_typed_event_instance_is_the_payload(inline):
    """The emitted instance becomes ``event.payload`` and its ``event_name`` the event name."""
    bus, _ = inline
    order = OrderCreated(order_id=1, email="a@example.com")
    event = bus.emit(order)
    assert event.payload is order
    assert event.name == "order:created"


def test_handler_subscribed_to_class_base_and_name_receives_typed_event_once(inline):
    """A handler subscribed through several routes that all match is called once."""
    bus, _ = inline
    recorder = Recorder()
    bus.subscribe(OrderCreated, recorder, name="recorder")
    bus.subscribe(OrderEvent, recorder, name="recorder")
    bus.subscribe("order:created", recorder, name="recorder")
    event = bus.emit(OrderCreated(order_id=1))
    assert recorder.events == [event]


def test_typed_event_without_event_name_uses_the_class_name(inline):
    """A class with no ``event_name`` is emitted under its class name."""
    bus, _ = inline
    recorder = Recorder()
    bus.subscribe("Pinged", recorder, name="by_name")
    event = bus.emit(Pinged())
    assert event.name == "Pinged"
    assert recorder.events == [event]


def test_class_subscriber_ignores_unrelated_event_classes(inline):
    """A subscriber to one event class does not receive events of an unrelated class."""
    bus, _ = inline
    recorder = Recorder()
    bus.subscribe(Pinged, recorder, name="pings")
    bus.emit(OrderCreated(order_id=1))
    assert recorder.events == []


def test_base_class_subscriber_does_not_receive_plain_name_emits(inline):
    """A class subscriber is reached by typed instances only, not by the same name as text."""
    bus, _ = inline
    recorder = Recorder()
    bus.subscribe(OrderCreated, recorder, name="typed_only")
    bus.emit("order:created", {"order_id": 1})
    assert recorder.events == []


def test_payload_next_to_an_event_instance_is_a_type_error(inline):
    """emit(instance, payload) is ambiguous and raises TypeError."""
    bus, _ = inline
    with pytest.raises(InvalidEventError) as info:
        bus.emit(OrderCreated(order_id=1), {"order_id": 2})
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("value", [{"name": "order:created"}, 42, None, OrderCreated, 3.5])
def test_emit_of_a_plain_value_or_a_class_is_a_type_error(inline, value):
    """emit() of a dict, a number, None or an event class (not an instance) raises TypeError."""
    bus, _ = inline
    with pytest.raises(TypeError):
        bus.emit(value)


# -- the Event envelope ------------------------------------------------------------------------


def test_event_is_immutable(inline):
    """Assigning to an emitted Event's field raises."""
    bus, _ = inline
    event = bus.emit("order:created", {"id": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.name = "order:deleted"  # type: ignore[misc]


def test_event_ids_are_unique(inline):
    """Every emitted event gets its own id."""
    bus, _ = inline
    ids = {bus.emit("order:created").id for _ in range(500)}
    assert len(ids) == 500
    assert all(isinstance(i, str) and i for i in ids)


def test_occurred_at_is_timezone_aware_utc_time_of_emit(inline):
    """``occurred_at`` is an aware UTC datetime taken when the event was emitted."""
    bus, _ = inline
    before = datetime.now(UTC)
    event = bus.emit("order:created")
    after = datetime.now(UTC)
    assert event.occurred_at.utcoffset() == timedelta(0)
    assert before <= event.occurred_at <= after


def test_metadata_is_read_only(inline):
    """The Event's metadata mapping cannot be written to."""
    bus, _ = inline
    event = bus.emit("order:created", metadata={"correlation_id": "c-1"})
    assert event.metadata == {"correlation_id": "c-1"}
    with pytest.raises(TypeError):
        event.metadata["correlation_id"] = "c-2"  # type: ignore[index]


def test_metadata_is_copied_at_emit(inline):
    """Changing the caller's dict after emit does not change the event's metadata."""
    bus, _ = inline
    metadata = {"correlation_id": "c-1"}
    event = bus.emit("order:created", metadata=metadata)
    metadata["correlation_id"] = "c-2"
    assert event.metadata["correlation_id"] == "c-1"


@pytest.mark.parametrize("metadata", [{"attempt": 1}, {1: "one"}, {"tags": ["a"]}])
def test_non_string_metadata_is_a_type_error(inline, metadata):
    """Metadata must map str to str: anything else raises TypeError and delivers nothing."""
    bus, _ = inline
    recorder = Recorder()
    bus.subscribe("order:created", recorder, name="recorder")
    with pytest.raises(TypeError):
        bus.emit("order:created", metadata=metadata)
    assert recorder.events == []


def test_handler_sees_the_emitted_metadata(inline):
    """Metadata given to emit() reaches the handler on the event."""
    bus, _ = inline
    recorder = Recorder()
    bus.subscribe("order:created", recorder, name="recorder")
    bus.emit("order:created", metadata={"correlation_id": "c-1"})
    assert dict(recorder.events[0].metadata) == {"correlation_id": "c-1"}


# -- dispatch ---------------------------------------------------------------------------------


def test_emit_returns_while_a_handler_is_still_blocked(bus):
    """emit() returns before its handler has finished (the handler is still waiting)."""
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow(event: Event) -> None:
        started.set()
        release.wait(WAIT)
        finished.set()

    bus.subscribe("order:created", slow)
    try:
        bus.emit("order:created")
        assert not finished.is_set()
        assert started.wait(WAIT)
        assert not finished.is_set()
    finally:
        release.set()
    assert bus.drain(WAIT)
    assert finished.is_set()


def test_status_reads_running_then_succeeded(bus):
    """A delivery is ``running`` while its handler runs and ``succeeded`` once it returned."""
    started, release = threading.Event(), threading.Event()

    def slow(event: Event) -> None:
        started.set()
        release.wait(WAIT)

    bus.subscribe("order:created", slow, name="slow")
    try:
        event = bus.emit("order:created")
        assert started.wait(WAIT)
        running = bus.status(event.id)["slow"]
        assert (running.state, running.attempts, running.error) == ("running", 1, None)
    finally:
        release.set()
    assert bus.drain(WAIT)
    done = bus.status(event.id)["slow"]
    assert (done.state, done.attempts, done.error) == ("succeeded", 1, None)


def test_queued_delivery_is_pending(single):
    """A delivery waiting for a free worker reads ``pending`` with no attempts yet."""
    started, release = threading.Event(), threading.Event()

    def blocker(event: Event) -> None:
        started.set()
        release.wait(WAIT)

    single.subscribe("job:block", blocker)
    single.subscribe("job:queued", module_handler, name="queued")
    try:
        single.emit("job:block")
        assert started.wait(WAIT)
        queued = single.emit("job:queued")
        delivery = single.status(queued.id)["queued"]
        assert (delivery.state, delivery.attempts) == ("pending", 0)
    finally:
        release.set()
    assert single.drain(WAIT)
    assert single.status(queued.id)["queued"].state == "succeeded"


def test_handlers_never_run_on_the_emitting_thread(bus):
    """Every handler of an event runs on a worker thread, not on the caller's."""
    threads: list[int] = []
    lock = threading.Lock()

    def make(i: int) -> Any:
        def handler(event: Event) -> None:
            with lock:
                threads.append(threading.get_ident())

        return handler

    for i in range(3):
        bus.subscribe("order:created", make(i), name=f"h{i}")
    bus.emit("order:created")
    assert bus.drain(WAIT)
    assert len(threads) == 3
    assert threading.get_ident() not in threads


def test_handlers_start_in_priority_then_registration_order(single):
    """With one worker, handlers start highest priority first, ties in registration order."""
    order: list[str] = []

    def make(label: str) -> Any:
        def handler(event: Event) -> None:
            order.append(label)

        return handler

    single.subscribe("order:created", make("default-1"), name="default-1")
    single.subscribe("order:*", make("ten"), name="ten", priority=10)
    single.subscribe("order:created", make("minus"), name="minus", priority=-1)
    single.subscribe("**", make("five"), name="five", priority=5)
    single.subscribe("order:created", make("default-2"), name="default-2")
    single.subscribe("order:**", make("ten-later"), name="ten-later", priority=10)
    single.emit("order:created")
    assert single.drain(WAIT)
    assert order == ["ten", "ten-later", "five", "default-1", "default-2", "minus"]


def test_event_nobody_listens_to_has_empty_status(inline):
    """An unhandled event is accepted and has no deliveries."""
    bus, _ = inline
    event = bus.emit("nobody:listens")
    assert bus.status(event.id) == {}
    assert bus.drain(WAIT)


# -- isolation --------------------------------------------------------------------------------


def test_base_exception_in_handler_never_reaches_the_emitter(bus):
    """A handler raising a BaseException subclass does not make emit() or drain() raise."""

    def fatal(event: Event) -> None:
        raise Fatal("stop everything")

    bus.subscribe("order:created", fatal)
    bus.emit("order:created")
    assert bus.drain(WAIT)


def test_base_exception_in_one_handler_does_not_stop_the_others(bus):
    """Other handlers of the event still succeed when one raises a BaseException."""
    recorder = Recorder()

    def fatal(event: Event) -> None:
        raise Fatal("stop everything")

    bus.subscribe("order:created", fatal, name="fatal", priority=10)
    bus.subscribe("order:created", recorder, name="recorder")
    event = bus.emit("order:created")
    assert bus.drain(WAIT)
    assert recorder.events == [event]
    assert bus.status(event.id)["recorder"].state == "succeeded"


def test_base_exception_is_recorded_as_the_delivery_error(bus):
    """The BaseException a handler raised ends the delivery as ``dead`` with its error."""

    def fatal(event: Event) -> None:
        raise Fatal("stop everything")

    bus.subscribe("order:created", fatal, name="fatal")
    event = bus.emit("order:created")
    assert bus.drain(WAIT)
    delivery = bus.status(event.id)["fatal"]
    assert (delivery.state, delivery.error) == ("dead", "Fatal: stop everything")


def test_worker_survives_a_handler_raising_base_exception(single):
    """The only worker goes on serving events after a handler raised a BaseException."""
    recorder = Recorder()

    def fatal(event: Event) -> None:
        raise Fatal("stop everything")

    single.subscribe("job:fatal", fatal)
    single.subscribe("job:next", recorder, name="next")
    single.emit("job:fatal")
    assert single.drain(WAIT)
    later = single.emit("job:next")
    assert single.drain(WAIT)
    assert recorder.events == [later]


def test_exception_whose_str_fails_is_still_recorded():
    """A handler exception whose ``str()`` itself raises still ends as a dead letter."""

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    def handler(event: Event) -> None:
        raise Unprintable

    bus = EventBus(max_workers=1, clock=FakeClock(), retry=RetryPolicy(max_attempts=1))
    try:
        bus.subscribe("order:created", handler, name="unprintable")
        event = bus.emit("order:created")
        assert bus.drain(timeout=1)
        assert bus.status(event.id)["unprintable"].state == "dead"
        assert [d.handler for d in bus.dead_letters()] == ["unprintable"]
    finally:
        bus.close(timeout=0.5)


# -- status -----------------------------------------------------------------------------------


def test_status_has_one_entry_per_handler_reached(inline):
    """status() lists exactly the handlers the event was delivered to, by name."""
    bus, _ = inline
    bus.subscribe("order:created", Recorder(), name="a")
    bus.subscribe("order:*", Recorder(), name="b")
    bus.subscribe("billing:*", Recorder(), name="not-matching")
    event = bus.emit("order:created")
    status = bus.status(event.id)
    assert sorted(status) == ["a", "b"]
    assert all(d.state == "succeeded" and d.attempts == 1 for d in status.values())


def test_status_of_unknown_event_is_a_key_error(inline):
    """status() of an id never emitted raises an error that subclasses KeyError."""
    bus, _ = inline
    with pytest.raises(UnknownEventError) as info:
        bus.status("no-such-event")
    assert isinstance(info.value, KeyError)


def test_status_of_another_bus_event_is_unknown(inline):
    """An event id from another bus is unknown on this one."""
    bus, _ = inline
    other, _ = inline_bus()
    with other:
        event = other.emit("order:created")
    with pytest.raises(KeyError):
        bus.status(event.id)


def test_status_retention_evicts_the_oldest_settled_events():
    """With ``status_retention=2``, the third settled event evicts the first."""
    bus, _ = inline_bus(status_retention=2)
    with bus:
        bus.subscribe("order:created", module_handler)
        first, second, third = (bus.emit("order:created") for _ in range(3))
        with pytest.raises(UnknownEventError):
            bus.status(first.id)
        assert bus.status(second.id)
        assert bus.status(third.id)


def test_status_retention_never_evicts_unsettled_events():
    """An event whose delivery is still waiting for a retry stays visible past the bound."""
    bus, _ = inline_bus(status_retention=2)
    with bus:

        def flaky(event: Event) -> None:
            if event.payload == "flaky":
                raise ConnectionError("down")

        bus.subscribe(
            "order:created", flaky, retry=RetryPolicy(wait=tenacity.wait_fixed(1)), name="flaky"
        )
        waiting = bus.emit("order:created", "flaky")
        for _ in range(5):
            bus.emit("order:created", "fine")
        assert bus.status(waiting.id)["flaky"].state == "retrying"


def test_default_retention_keeps_ten_thousand_settled_events():
    """By default the status of each of the last 10,000 settled events is still available."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    bus, _ = inline_bus()
    with bus:
        bus.subscribe("order:created", module_handler)
        first = bus.emit("order:created")
        for _ in range(9_999):
            bus.emit("order:created")
        assert bus.status(first.id)[f"{__name__}.module_handler"].state == "succeeded"


# -- context ----------------------------------------------------------------------------------


def test_emitter_contextvars_are_visible_in_every_handler(bus):
    """A ContextVar set by the emitter reads the same in each handler on the workers."""
    seen: dict[str, str | None] = {}
    lock = threading.Lock()

    def make(label: str) -> Any:
        def handler(event: Event) -> None:
            with lock:
                seen[label] = request_id.get(None)

        return handler

    for label in ("a", "b", "c"):
        bus.subscribe("order:created", make(label), name=label)
    token = request_id.set("req-1")
    try:
        bus.emit("order:created")
    finally:
        request_id.reset(token)
    assert bus.drain(WAIT)
    assert seen == {"a": "req-1", "b": "req-1", "c": "req-1"}


def test_contextvars_of_each_emit_stay_with_that_event(bus):
    """Two emits with different context values each deliver their own value."""
    seen: dict[Any, str | None] = {}
    lock = threading.Lock()

    def handler(event: Event) -> None:
        with lock:
            seen[event.payload] = request_id.get(None)

    bus.subscribe("order:created", handler)
    for n in range(20):
        token = request_id.set(f"req-{n}")
        try:
            bus.emit("order:created", n)
        finally:
            request_id.reset(token)
    assert bus.drain(WAIT)
    assert seen == {n: f"req-{n}" for n in range(20)}


def test_structlog_contextvars_appear_in_handler_log_records(bus):
    """A request id bound with ``structlog.contextvars`` by the emitter is on records the
    handler logs from its worker thread."""

    def handler(event: Event) -> None:
        structlog.get_logger("app").info("email.sent")

    bus.subscribe("order:created", handler)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        with structlog.contextvars.bound_contextvars(request_id="req-42"):
            bus.emit("order:created")
        assert bus.drain(WAIT)
    [record] = records(logs, "email.sent")
    assert record["request_id"] == "req-42"


# -- re-entrancy and drain ----------------------------------------------------------------------


def test_handler_may_emit_with_a_single_worker(single):
    """With one worker, a handler that emits does not deadlock; the chained event is handled."""
    chained: list[Event] = []
    recorder = Recorder()

    def on_created(event: Event) -> None:
        chained.append(single.emit("email:queued", event.payload))

    single.subscribe("order:created", on_created)
    single.subscribe("email:queued", recorder, name="mailer")
    single.emit("order:created", {"id": 1})
    assert single.drain(WAIT)
    assert recorder.events == chained
    assert single.status(chained[0].id)["mailer"].state == "succeeded"


def test_drain_waits_for_a_chain_of_events(single):
    """drain() returns only after events emitted by handlers, and theirs, were handled."""
    depth = 5
    reached: list[int] = []

    def relay(event: Event) -> None:
        reached.append(event.payload)
        if event.payload < depth:
            single.emit("chain:step", event.payload + 1)

    single.subscribe("chain:step", relay)
    single.emit("chain:step", 1)
    assert single.drain(WAIT)
    assert reached == [1, 2, 3, 4, 5]


def test_drain_inside_a_handler_raises(bus):
    """drain() from a handler raises DrainInHandlerError (a RuntimeError) instead of hanging."""
    errors: list[BaseException] = []

    def handler(event: Event) -> None:
        try:
            bus.drain(WAIT)
        except RuntimeError as exc:
            errors.append(exc)

    bus.subscribe("order:created", handler)
    bus.emit("order:created")
    assert bus.drain(WAIT)
    assert len(errors) == 1
    assert isinstance(errors[0], DrainInHandlerError)


def test_drain_times_out_while_a_handler_is_blocked(bus):
    """drain(timeout) returns False while a handler is still running, True once it ends."""
    started, release = threading.Event(), threading.Event()

    def slow(event: Event) -> None:
        started.set()
        release.wait(WAIT)

    bus.subscribe("order:created", slow)
    try:
        bus.emit("order:created")
        assert started.wait(WAIT)
        assert bus.drain(timeout=0.05) is False
    finally:
        release.set()
    assert bus.drain(WAIT) is True


# -- outcome records (structlog) ----------------------------------------------------------------

HANDLER_KEYS = {"event_id", "event_name", "handler", "attempt"}


def test_library_never_configures_structlog(inline):
    """Building a bus and running handlers leaves structlog unconfigured."""
    bus, _ = inline
    bus.subscribe("order:created", module_handler)
    bus.emit("order:created")
    assert not structlog.is_configured()


def test_success_is_logged_at_debug_with_the_handler_keys(inline):
    """A successful delivery logs ``handler.succeeded`` at debug with id, name, handler and
    attempt."""
    bus, _ = inline
    bus.subscribe("order:created", module_handler, name="ok")
    with capture_logs() as logs:
        event = bus.emit("order:created")
    [record] = records(logs, "handler.succeeded")
    assert record["log_level"] == "debug"
    assert record.keys() >= HANDLER_KEYS
    assert (record["event_id"], record["event_name"], record["handler"], record["attempt"]) == (
        event.id,
        "order:created",
        "ok",
        1,
    )


def test_failure_is_logged_as_a_warning_with_error_and_traceback(inline):
    """A failed attempt logs ``handler.failed`` with the handler keys, ``error`` and the
    exception as ``exc_info``."""
    bus, _ = inline
    raised: list[BaseException] = []

    def broken(event: Event) -> None:
        exc = ValueError("bad order")
        raised.append(exc)
        raise exc

    bus.subscribe("order:created", broken, name="broken", retry=RetryPolicy(max_attempts=1))
    with capture_logs() as logs:
        event = bus.emit("order:created")
    [record] = records(logs, "handler.failed")
    assert record["log_level"] == "warning"
    assert (record["event_id"], record["event_name"], record["handler"], record["attempt"]) == (
        event.id,
        "order:created",
        "broken",
        1,
    )
    assert record["error"] == "ValueError: bad order"
    assert record["exc_info"] is raised[0]


def test_retry_is_logged_with_its_delay(inline):
    """A scheduled retry logs ``handler.retry_scheduled`` with the handler keys and the delay."""
    bus, _ = inline

    def broken(event: Event) -> None:
        raise ValueError("bad order")

    policy = RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(2))
    bus.subscribe("order:created", broken, name="broken", retry=policy)
    with capture_logs() as logs:
        event = bus.emit("order:created")
    [record] = records(logs, "handler.retry_scheduled")
    assert (record["event_id"], record["event_name"], record["handler"], record["attempt"]) == (
        event.id,
        "order:created",
        "broken",
        1,
    )
    assert record["delay"] == 2


def test_dead_letter_is_logged_as_an_error(inline):
    """The last failure logs ``handler.dead_lettered`` at error level with the handler keys, the
    error and the final attempt number."""
    bus, clock = inline

    def broken(event: Event) -> None:
        raise ValueError("bad order")

    policy = RetryPolicy(max_attempts=2, wait=tenacity.wait_fixed(1))
    bus.subscribe("order:created", broken, name="broken", retry=policy)
    with capture_logs() as logs:
        event = bus.emit("order:created")
        clock.advance(1)
    [record] = records(logs, "handler.dead_lettered")
    assert record["log_level"] == "error"
    assert (record["event_id"], record["event_name"], record["handler"], record["attempt"]) == (
        event.id,
        "order:created",
        "broken",
        2,
    )
    assert record["error"] == "ValueError: bad order"


def test_every_attempt_of_a_failing_delivery_is_logged(inline):
    """Each attempt logs ``handler.failed`` with its own attempt number."""
    bus, clock = inline

    def broken(event: Event) -> None:
        raise ValueError("bad order")

    policy = RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(1))
    bus.subscribe("order:created", broken, name="broken", retry=policy)
    with capture_logs() as logs:
        bus.emit("order:created")
        clock.advance(1)
        clock.advance(1)
    assert [r["attempt"] for r in records(logs, "handler.failed")] == [1, 2, 3]
    assert [r["attempt"] for r in records(logs, "handler.retry_scheduled")] == [1, 2]


def test_emitted_event_is_logged_with_its_id_and_name(inline):
    """emit() logs ``event.emitted`` with the event's id and name."""
    bus, _ = inline
    bus.subscribe("order:created", module_handler)
    with capture_logs() as logs:
        event = bus.emit("order:created")
    [record] = records(logs, "event.emitted")
    assert (record["event_id"], record["event_name"]) == (event.id, "order:created")


def test_event_nobody_listens_to_is_logged_as_unhandled(inline):
    """An event with no subscriber logs ``event.unhandled`` with its id and name."""
    bus, _ = inline
    bus.subscribe("order:created", module_handler)
    with capture_logs() as logs:
        event = bus.emit("order:deleted")
    [record] = records(logs, "event.unhandled")
    assert (record["event_id"], record["event_name"]) == (event.id, "order:deleted")
    assert records(logs, "handler.succeeded") == []


def test_successes_are_dropped_by_a_logger_filtering_at_info(inline):
    """With structlog filtering at INFO, successes produce no record while failures still do."""
    bus, _ = inline
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))

    def broken(event: Event) -> None:
        raise ValueError("bad order")

    bus.subscribe("order:created", module_handler, name="ok")
    bus.subscribe("order:created", broken, name="broken", retry=RetryPolicy(max_attempts=1))
    with capture_logs() as logs:
        bus.emit("order:created")
    names = [r["event"] for r in logs]
    assert "handler.succeeded" not in names
    assert "event.emitted" not in names
    assert "handler.failed" in names


def all_handler_outcomes(bus: EventBus, clock: FakeClock, payload: Any) -> None:
    """Emit *payload* to a handler that succeeds and one that fails, is retried, and dies."""

    def broken(event: Event) -> None:
        raise ValueError("bad order")

    bus.subscribe("order:created", module_handler, name="ok")
    policy = RetryPolicy(max_attempts=2, wait=tenacity.wait_fixed(1))
    bus.subscribe("order:created", broken, name="broken", retry=policy)
    bus.emit("order:created", payload, metadata={"authorization": "Bearer abc123"})
    clock.advance(1)


def test_payload_values_are_not_logged_by_default(inline):
    """No record of any outcome carries the payload or its values unless asked."""
    bus, clock = inline
    with capture_logs() as logs:
        all_handler_outcomes(bus, clock, {"email": "a@example.com", "sku": "SKU-991"})
    assert logs
    assert all("payload" not in r for r in logs)
    assert "a@example.com" not in repr(logs)
    assert "SKU-991" not in repr(logs)


def test_log_payloads_logs_payloads_with_secrets_redacted():
    """With ``log_payloads=True`` records carry the payload, with password and token values
    redacted."""
    bus, clock = inline_bus(log_payloads=True)
    payload = {"email": "a@example.com", "password": "hunter2", "auth": {"token": "tok-xyz"}}
    with bus, capture_logs() as logs:
        all_handler_outcomes(bus, clock, payload)
    [emitted] = records(logs, "event.emitted")
    assert emitted["payload"]["email"] == "a@example.com"
    assert emitted["payload"]["password"] != "hunter2"
    assert emitted["payload"]["auth"]["token"] != "tok-xyz"
    assert "hunter2" not in repr(logs)
    assert "tok-xyz" not in repr(logs)


def test_log_payloads_redacts_secret_metadata():
    """With ``log_payloads=True`` a secret-looking metadata value is redacted too."""
    bus, clock = inline_bus(log_payloads=True)
    with bus, capture_logs() as logs:
        all_handler_outcomes(bus, clock, {"id": 1})
    assert records(logs, "event.emitted")[0]["metadata"]
    assert "abc123" not in repr(logs)


def test_log_payloads_redacts_fields_of_typed_events():
    """With ``log_payloads=True`` a typed event's secret fields are redacted as well."""

    @dataclass(frozen=True)
    class UserRegistered:
        event_name: ClassVar[str] = "user:registered"
        email: str
        password: str

    bus, _ = inline_bus(log_payloads=True)
    bus.subscribe(UserRegistered, module_handler)
    with bus, capture_logs() as logs:
        bus.emit(UserRegistered(email="a@example.com", password="hunter2"))
    assert "a@example.com" in repr(records(logs, "event.emitted"))
    assert "hunter2" not in repr(logs)


# -- lifecycle signals (blinker) ------------------------------------------------------------------


def test_event_emitted_signal_carries_the_bus_and_the_event(inline):
    """``event_emitted`` is sent with the bus as sender and the event as ``event``."""
    bus, _ = inline
    with receiving(signals.event_emitted, bus) as calls:
        event = bus.emit("order:created")
    assert calls == [(bus, {"event": event})]


def test_handler_succeeded_signal_carries_event_and_delivery(inline):
    """``handler_succeeded`` is sent with the event and the settled delivery."""
    bus, _ = inline
    bus.subscribe("order:created", module_handler, name="ok")
    with receiving(signals.handler_succeeded, bus) as calls:
        event = bus.emit("order:created")
    [(sender, kwargs)] = calls
    assert sender is bus
    assert kwargs["event"] == event
    delivery = kwargs["delivery"]
    assert (delivery.handler, delivery.state, delivery.attempts) == ("ok", "succeeded", 1)


def test_handler_failed_signal_carries_event_delivery_and_error(inline):
    """``handler_failed`` is sent with the event, the delivery and the exception raised."""
    bus, _ = inline
    raised: list[BaseException] = []

    def broken(event: Event) -> None:
        exc = ValueError("bad order")
        raised.append(exc)
        raise exc

    bus.subscribe("order:created", broken, name="broken", retry=RetryPolicy(max_attempts=1))
    with receiving(signals.handler_failed, bus) as calls:
        event = bus.emit("order:created")
    [(sender, kwargs)] = calls
    assert sender is bus
    assert kwargs["event"] == event
    assert kwargs["error"] is raised[0]
    assert kwargs["delivery"].handler == "broken"
    assert kwargs["delivery"].attempts == 1


def test_signals_of_another_bus_are_not_received(inline):
    """A receiver connected for one bus hears nothing from another bus."""
    bus, _ = inline
    other, _ = inline_bus()
    with other, receiving(signals.event_emitted, bus) as calls:
        other.emit("order:created")
    assert calls == []


def test_raising_receivers_do_not_stop_each_other_nor_the_delivery(inline):
    """Receivers that raise are each called, logged as ``signal.receiver_failed``, and the
    delivery still succeeds."""
    bus, _ = inline
    called: list[str] = []

    def first(sender: object, **kwargs: Any) -> None:
        called.append("first")
        raise RuntimeError("metrics down")

    def second(sender: object, **kwargs: Any) -> None:
        called.append("second")
        raise RuntimeError("tracing down")

    bus.subscribe("order:created", module_handler, name="ok")
    signals.handler_succeeded.connect(first, sender=bus, weak=False)
    signals.handler_succeeded.connect(second, sender=bus, weak=False)
    try:
        with capture_logs() as logs:
            event = bus.emit("order:created")
    finally:
        signals.handler_succeeded.disconnect(first, sender=bus)
        signals.handler_succeeded.disconnect(second, sender=bus)
    assert sorted(called) == ["first", "second"]
    assert bus.status(event.id)["ok"].state == "succeeded"
    failures = records(logs, "signal.receiver_failed")
    assert len(failures) == 2
    assert {r["signal"] for r in failures} == {"handler_succeeded"}


@pytest.mark.parametrize(
    "signal",
    [
        signals.event_emitted,
        signals.handler_succeeded,
        signals.handler_failed,
        signals.retry_scheduled,
        signals.dead_lettered,
    ],
    ids=lambda s: s.name,
)
def test_receiver_raising_base_exception_is_isolated_like_a_handler(signal):
    """A receiver raising a BaseException subclass neither reaches the emitter nor leaves a
    delivery unsettled."""

    def fatal(sender: object, **kwargs: Any) -> None:
        raise Fatal("receiver bug")

    def flaky(event: Event) -> None:
        if event.payload == "fail":
            raise ValueError("bad order")

    bus, clock = inline_bus()
    signal.connect(fatal, sender=bus, weak=False)
    try:
        policy = RetryPolicy(max_attempts=2, wait=tenacity.wait_fixed(1))
        bus.subscribe("order:created", flaky, name="flaky", retry=policy)
        outcome = "returned"
        try:
            ok = bus.emit("order:created", "ok")
            failing = bus.emit("order:created", "fail")
            clock.advance(1)
        except Fatal:
            outcome = "raised"
        assert outcome == "returned"
        assert bus.drain(timeout=0.5)
        assert bus.status(ok.id)["flaky"].state == "succeeded"
        assert bus.status(failing.id)["flaky"].state == "dead"
    finally:
        signal.disconnect(fatal, sender=bus)
        bus.close(timeout=0.5)


def test_emit_of_an_oversized_payload_with_a_store_stores_nothing(tmp_path: Path) -> None:
    """With a store, emit() of a payload above the codec's max_size raises and stores nothing."""
    from eventbus import PayloadTooLargeError
    from eventbus.stores import SQLiteStore

    with EventBus(max_workers=1, store=SQLiteStore(tmp_path / "events.sqlite3")) as bus:
        bus.subscribe("doc:uploaded", lambda event: None, name="index")
        with pytest.raises(PayloadTooLargeError):
            bus.emit("doc:uploaded", {"body": "x" * 2_000_000})
        assert bus.drain(timeout=5)
        assert bus.recover() == 0  # nothing half-written for a later process to find


def test_emit_of_a_cyclic_payload_with_a_store_is_a_type_error(tmp_path: Path) -> None:
    """With a store, emit() of a payload that contains itself raises TypeError, not recursion."""
    from eventbus.stores import SQLiteStore

    payload: dict[str, object] = {}
    payload["self"] = payload
    with EventBus(max_workers=1, store=SQLiteStore(tmp_path / "events.sqlite3")) as bus:
        bus.subscribe("doc:uploaded", lambda event: None, name="index")
        with pytest.raises(TypeError, match="cyclic"):
            bus.emit("doc:uploaded", payload)


class _ListTransport:
    """A transport that records what it is asked to do (for the bus's side of the seam)."""

    def __init__(self) -> None:
        self.published: list[Event] = []
        self.started = 0
        self.closed = False
        self.on_error: Any = None
        self.on_dead: Any = None
        self.on_taken_over: Any = None

    def publish(self, event: Event) -> str:
        self.published.append(event)
        return str(len(self.published))

    def start(self, deliver: Any) -> int:
        self.started += 1
        deliver(self.published[0], "token-1")
        return 7

    def settled(self, token: str) -> None:
        self.settled_token = token

    def close(self) -> None:
        self.closed = True


def test_start_consumes_the_transport_and_returns_what_it_took_over() -> None:
    """bus.start() starts the transport's consumer with the bus's delivery function."""
    transport = _ListTransport()
    seen: list[str] = []
    with EventBus(max_workers=1, transport=transport) as bus:  # type: ignore[arg-type]
        bus.subscribe("order:created", lambda event: seen.append(event.id), name="record")
        event = bus.emit("order:created")
        assert seen == []  # a transport bus delivers nothing locally until it starts
        assert bus.start() == 7
        assert bus.drain(timeout=5)
    assert seen == [event.id]
    assert transport.settled_token == "token-1"
    assert transport.closed


def test_start_without_a_transport_is_a_runtime_error() -> None:
    """start() on a bus without a transport raises RuntimeError naming what it needs."""
    with EventBus(max_workers=1) as bus, pytest.raises(RuntimeError, match="transport"):
        bus.start()


def test_start_after_close_is_refused() -> None:
    """start() after close() raises BusClosedError."""
    bus = EventBus(max_workers=1, transport=_ListTransport())  # type: ignore[arg-type]
    bus.close()
    with pytest.raises(BusClosedError):
        bus.start()


class _ReportingTransport(_ListTransport):
    """A transport of the current protocol: start() takes the bus's reporter."""

    def start(self, deliver: Any, reporter: Any = None) -> int:
        self.reporter = reporter
        reporter.internal_error("transport", OSError("reader lost its connection"))
        reporter.stream_taken_over(2)
        return 0


def test_start_hands_the_transport_a_reporter_that_logs() -> None:
    """A transport reports background errors and take-overs through the reporter it is given,
    and the bus logs them; the bus sets none of its attributes."""
    transport = _ReportingTransport()
    with capture_logs() as logs, EventBus(max_workers=1, transport=transport) as bus:  # type: ignore[arg-type]
        bus.start()
    names = [record["event"] for record in logs]
    assert "eventbus.internal_error" in names
    assert "stream.taken_over" in names
    assert transport.on_error is None  # not overwritten: the reporter is the interface


def test_a_transport_without_a_reporter_parameter_still_gets_its_hooks() -> None:
    """A transport written before the reporter existed gets on_error/on_dead set, as before."""
    transport = _ListTransport()
    transport.published.append(Event(name="order:created"))
    with EventBus(max_workers=1, transport=transport) as bus:  # type: ignore[arg-type]
        bus.start()
        assert callable(transport.on_error)
        assert callable(transport.on_dead)
