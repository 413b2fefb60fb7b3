"""Behaviour of EventBus retries and dead letters: retry policies, the retry queue and its
backoff on the clock, dead letters, replay and purge.

Backoffs run on the fake clock (or, where a real clock is needed, last zero seconds): nothing
here sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import tenacity

from eventbus import (
    BusClosedError,
    Event,
    EventBus,
    RetryPolicy,
    UnknownDeadLetterError,
    UnknownHandlerError,
    signals,
)
from eventbus.testing import FakeClock, inline_bus

#: Upper bound for waits that normally end at once; only a broken bus ever waits this long.
WAIT = 5.0


class Flaky:
    """A handler that fails its first *failures* calls (all of them if None), then succeeds."""

    def __init__(self, failures: int | None = None, error: type[BaseException] = ValueError):
        self.failures = failures
        self.error = error
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.calls += 1
            calls = self.calls
        if self.failures is None or calls <= self.failures:
            raise self.error(f"attempt {calls} failed")


class Counter:
    """A handler that counts its calls (thread-safe)."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.calls += 1


def fixed(seconds: float, attempts: int = 3, **options: Any) -> RetryPolicy:
    return RetryPolicy(max_attempts=attempts, wait=tenacity.wait_fixed(seconds), **options)


@pytest.fixture
def realtime() -> Iterator[EventBus]:
    """A bus on 4 worker threads and the real clock, whose retries come due at once."""
    with EventBus(max_workers=4, retry=fixed(0)) as b:
        yield b


@pytest.fixture
def single(clock: FakeClock) -> Iterator[EventBus]:
    """A bus with exactly one worker thread whose backoffs wait on the fake clock."""
    with EventBus(max_workers=1, clock=clock, retry=fixed(1)) as b:
        yield b


# -- retrying -------------------------------------------------------------------------------


def test_always_failing_handler_is_tried_max_attempts_times_then_dead_lettered(realtime):
    """With ``max_attempts=3`` a handler that always fails is called 3 times and leaves one
    dead letter, while the other handlers of the event succeed."""
    failing, first, second = Flaky(), Counter(), Counter()
    realtime.subscribe("order:created", failing, name="inventory")
    realtime.subscribe("order:created", first, name="email")
    realtime.subscribe("order:*", second, name="analytics")
    event = realtime.emit("order:created", {"id": 42})
    assert realtime.drain(WAIT)
    assert failing.calls == 3
    assert (first.calls, second.calls) == (1, 1)
    [dead] = realtime.dead_letters()
    assert (dead.handler, dead.attempts, dead.event) == ("inventory", 3, event)
    status = realtime.status(event.id)
    assert (status["email"].state, status["analytics"].state) == ("succeeded", "succeeded")
    assert (status["inventory"].state, status["inventory"].attempts) == ("dead", 3)


def test_handler_that_recovers_succeeds_on_a_later_attempt(realtime):
    """A handler failing once is retried and its delivery ends ``succeeded`` on attempt 2."""
    flaky = Flaky(failures=1)
    realtime.subscribe("order:created", flaky, name="flaky")
    event = realtime.emit("order:created")
    assert realtime.drain(WAIT)
    delivery = realtime.status(event.id)["flaky"]
    assert (delivery.state, delivery.attempts) == ("succeeded", 2)
    assert realtime.dead_letters() == []


def test_dead_letter_records_event_handler_attempts_error_and_reason(inline):
    """An exhausted delivery's dead letter names its event and handler, counts every attempt,
    and gives the last error as ``Type: message`` with reason ``exhausted``."""
    bus, clock = inline
    bus.subscribe("order:created", Flaky(), name="inventory", retry=fixed(1))
    event = bus.emit("order:created", {"id": 42})
    clock.advance(1)
    clock.advance(1)
    [dead] = bus.dead_letters()
    assert dead.event == event
    assert dead.handler == "inventory"
    assert dead.attempts == 3
    assert dead.error == "ValueError: attempt 3 failed"
    assert dead.reason == "exhausted"
    assert dead.abandoned is False


def test_dead_letter_keeps_the_traceback_of_the_last_failure(inline):
    """A dead letter carries the formatted traceback of the error that ended it."""
    bus, _ = inline
    bus.subscribe("order:created", Flaky(), name="inventory", retry=fixed(1, attempts=1))
    bus.emit("order:created")
    [dead] = bus.dead_letters()
    assert dead.traceback is not None
    assert "ValueError: attempt 1 failed" in dead.traceback
    assert "Traceback" in dead.traceback


def test_failed_delivery_is_retrying_right_after_emit(inline):
    """On the inline bus a failing handler's delivery reads ``retrying`` once emit returns."""
    bus, _ = inline
    bus.subscribe("order:created", Flaky(failures=1), name="flaky", retry=fixed(2))
    event = bus.emit("order:created")
    delivery = bus.status(event.id)["flaky"]
    assert (delivery.state, delivery.attempts) == ("retrying", 1)
    assert delivery.error == "ValueError: attempt 1 failed"


def test_retry_runs_when_the_clock_reaches_the_policy_delay(inline):
    """A retry waits exactly the wait strategy's delay: not before, and then it runs."""
    bus, clock = inline
    flaky = Flaky(failures=1)
    bus.subscribe("order:created", flaky, name="flaky", retry=fixed(2))
    event = bus.emit("order:created")
    clock.advance(1.5)
    assert (flaky.calls, bus.status(event.id)["flaky"].state) == (1, "retrying")
    clock.advance(0.5)
    delivery = bus.status(event.id)["flaky"]
    assert (flaky.calls, delivery.state, delivery.attempts) == (2, "succeeded", 2)


def test_retry_delays_follow_the_tenacity_wait_strategy(inline):
    """Successive retries wait what ``wait_exponential`` computes for each attempt."""
    bus, clock = inline
    policy = RetryPolicy(max_attempts=4, wait=tenacity.wait_exponential(multiplier=1, max=30))
    bus.subscribe("order:created", Flaky(), name="flaky", retry=policy)
    delays: list[float] = []

    def on_retry(sender: object, **kwargs: Any) -> None:
        delays.append(kwargs["delay"])

    signals.retry_scheduled.connect(on_retry, sender=bus, weak=False)
    try:
        bus.emit("order:created")
        clock.advance(60)
    finally:
        signals.retry_scheduled.disconnect(on_retry, sender=bus)
    assert delays == [1, 2, 4]


def test_error_not_in_retry_on_goes_straight_to_dead_letters(inline):
    """An exception outside ``retry_on`` is not retried: one call, reason ``not_retryable``."""
    bus, _ = inline
    handler = Flaky(error=KeyError)
    bus.subscribe("order:created", handler, retry=fixed(1, retry_on=(ConnectionError,)))
    event = bus.emit("order:created")
    assert handler.calls == 1
    [dead] = bus.dead_letters()
    assert (dead.reason, dead.attempts) == ("not_retryable", 1)
    assert bus.status(event.id)[dead.handler].state == "dead"


def test_error_matching_retry_on_is_retried(inline):
    """An exception that subclasses a ``retry_on`` type is retried."""
    bus, clock = inline
    handler = Flaky(failures=1, error=ConnectionRefusedError)
    bus.subscribe("order:created", handler, retry=fixed(1, retry_on=(ConnectionError,)))
    bus.emit("order:created")
    clock.advance(1)
    assert handler.calls == 2
    assert bus.dead_letters() == []


def test_max_attempts_one_means_no_retry(inline):
    """``RetryPolicy(max_attempts=1)``: a failure is final after one call."""
    bus, clock = inline
    handler = Flaky()
    bus.subscribe("order:created", handler, retry=RetryPolicy(max_attempts=1))
    bus.emit("order:created")
    clock.advance(3600)
    assert handler.calls == 1
    [dead] = bus.dead_letters()
    assert (dead.reason, dead.attempts) == ("exhausted", 1)


def test_handler_policy_overrides_the_bus_default(inline):
    """A handler's own ``retry=`` policy is used instead of the bus's."""
    bus, clock = inline
    handler = Flaky()
    bus.subscribe("order:created", handler, retry=fixed(1, attempts=5))
    bus.emit("order:created")
    clock.advance(10)
    assert handler.calls == 5
    assert bus.dead_letters()[0].attempts == 5


def test_bus_default_policy_applies_to_handlers_without_one():
    """A handler subscribed without ``retry=`` follows the bus's ``retry`` policy."""
    bus, clock = inline_bus(retry=fixed(1, attempts=2))
    with bus:
        handler = Flaky()
        bus.subscribe("order:created", handler)
        bus.emit("order:created")
        clock.advance(10)
        assert handler.calls == 2
        assert bus.dead_letters()[0].attempts == 2


def test_retries_run_in_the_emitter_context():
    """A retry sees the context variables of the original emit, not those of the thread that
    advanced the clock."""
    import contextvars

    tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")
    seen: list[str | None] = []

    def handler(event: Event) -> None:
        seen.append(tenant.get(None))
        if len(seen) == 1:
            raise ValueError("first attempt fails")

    bus, clock = inline_bus()
    with bus:
        bus.subscribe("order:created", handler, retry=fixed(1))
        token = tenant.set("acme")
        try:
            bus.emit("order:created")
        finally:
            tenant.reset(token)
        token = tenant.set("someone-else")
        try:
            clock.advance(1)
        finally:
            tenant.reset(token)
    assert seen == ["acme", "acme"]


def test_retries_on_worker_threads_see_the_emitter_context(realtime):
    """Every attempt on the worker pool, retries included, sees the emitter's context."""
    import contextvars

    tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")
    seen: list[str | None] = []

    def handler(event: Event) -> None:
        seen.append(tenant.get(None))
        if len(seen) < 3:
            raise ValueError("not yet")

    realtime.subscribe("order:created", handler)
    token = tenant.set("acme")
    try:
        realtime.emit("order:created")
    finally:
        tenant.reset(token)
    assert realtime.drain(WAIT)
    assert seen == ["acme", "acme", "acme"]


# -- the retry queue holds no worker --------------------------------------------------------


def test_backoff_does_not_hold_the_only_worker(single, clock):
    """With one worker, another event's handler runs while a failed delivery waits out a 1 s
    backoff on the clock; the retry then succeeds on attempt 2."""
    flaky = Flaky(failures=1)
    other_started, release_other = threading.Event(), threading.Event()

    def other(event: Event) -> None:
        other_started.set()
        release_other.wait(WAIT)

    single.subscribe("order:created", flaky, name="A", retry=fixed(1))
    single.subscribe("report:requested", other, name="B")
    first = single.emit("order:created")
    try:
        second = single.emit("report:requested")
        assert other_started.wait(WAIT)
        assert single.status(first.id)["A"].state == "retrying"
        assert single.status(second.id)["B"].state == "running"
    finally:
        release_other.set()
    clock.advance(1)
    assert single.drain(WAIT)
    delivery = single.status(first.id)["A"]
    assert (delivery.state, delivery.attempts) == ("succeeded", 2)


def test_drain_waits_for_deliveries_in_backoff(single, clock):
    """drain() does not return True while a delivery still waits for its retry."""
    flaky = Flaky(failures=1)
    marker = threading.Event()
    single.subscribe("order:created", flaky, name="A", retry=fixed(1))
    single.subscribe("test:marker", lambda event: marker.set(), name="marker")
    event = single.emit("order:created")
    single.emit("test:marker")  # one worker: the marker runs after A's failure was handled
    assert marker.wait(WAIT)
    assert single.drain(timeout=0.05) is False
    clock.advance(1)
    assert single.drain(WAIT) is True
    assert single.status(event.id)["A"].state == "succeeded"


# -- signals ------------------------------------------------------------------------------------


def test_retry_scheduled_signal_carries_event_delivery_and_delay(inline):
    """``retry_scheduled`` is sent with the bus, the event, the delivery and the delay."""
    bus, _ = inline
    bus.subscribe("order:created", Flaky(failures=1), name="flaky", retry=fixed(2))
    calls: list[tuple[object, dict[str, Any]]] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        calls.append((sender, kwargs))

    signals.retry_scheduled.connect(receiver, sender=bus, weak=False)
    try:
        event = bus.emit("order:created")
    finally:
        signals.retry_scheduled.disconnect(receiver, sender=bus)
    [(sender, kwargs)] = calls
    assert sender is bus
    assert kwargs["event"] == event
    assert kwargs["delay"] == 2
    delivery = kwargs["delivery"]
    assert (delivery.handler, delivery.state, delivery.attempts) == ("flaky", "retrying", 1)


def test_dead_lettered_signal_carries_the_dead_letter(inline):
    """``dead_lettered`` is sent with the bus, the event and the dead letter as it is listed."""
    bus, _ = inline
    bus.subscribe("order:created", Flaky(), name="broken", retry=RetryPolicy(max_attempts=1))
    calls: list[tuple[object, dict[str, Any]]] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        calls.append((sender, kwargs))

    signals.dead_lettered.connect(receiver, sender=bus, weak=False)
    try:
        bus.emit("order:created")
    finally:
        signals.dead_lettered.disconnect(receiver, sender=bus)
    [dead] = bus.dead_letters()
    assert calls == [(bus, {"event": dead.event, "dead_letter": dead})]


# -- dead letters: replay and purge ---------------------------------------------------------------


def dead_letter_of(bus: EventBus, clock: FakeClock, handler: Flaky, attempts: int = 2) -> Event:
    """Subscribe *handler* as "inventory" and emit an event whose delivery to it dies."""
    bus.subscribe("order:created", handler, name="inventory", retry=fixed(1, attempts=attempts))
    event = bus.emit("order:created", {"id": 42})
    clock.advance(attempts)
    assert len(bus.dead_letters()) == 1
    return event


def test_replay_runs_the_delivery_again_with_a_fresh_attempt_count(inline):
    """After replay, the delivery's attempts count from 1 again and it can succeed."""
    bus, clock = inline
    handler = Flaky(failures=2)
    event = dead_letter_of(bus, clock, handler)
    assert bus.status(event.id)["inventory"].attempts == 2
    bus.replay(bus.dead_letters()[0])
    delivery = bus.status(event.id)["inventory"]
    assert (delivery.state, delivery.attempts, delivery.error) == ("succeeded", 1, None)
    assert handler.calls == 3


def test_replay_delivers_the_original_event(inline):
    """A replayed delivery receives the same Event as the first time."""
    bus, clock = inline
    received: list[Event] = []

    def handler(event: Event) -> None:
        received.append(event)
        if len(received) <= 2:
            raise ValueError("down")

    bus.subscribe("order:created", handler, name="inventory", retry=fixed(1, attempts=2))
    event = bus.emit("order:created", {"id": 42})
    clock.advance(1)
    bus.replay(bus.dead_letters()[0])
    assert received == [event, event, event]


def test_replay_removes_the_dead_letter(inline):
    """A replayed dead letter is no longer listed."""
    bus, clock = inline
    dead_letter_of(bus, clock, Flaky(failures=2))
    bus.replay(bus.dead_letters()[0])
    assert bus.dead_letters() == []


def test_replayed_delivery_that_fails_again_gets_all_its_attempts(inline):
    """A replay that keeps failing uses the full policy again and ends as a new dead letter."""
    bus, clock = inline
    handler = Flaky()
    dead_letter_of(bus, clock, handler, attempts=2)
    [old] = bus.dead_letters()
    bus.replay(old)
    clock.advance(1)
    assert handler.calls == 4
    [new] = bus.dead_letters()
    assert new.id != old.id
    assert (new.attempts, new.reason) == (2, "exhausted")


def test_replaying_the_same_dead_letter_twice_is_a_key_error(inline):
    """A second replay of one dead letter raises UnknownDeadLetterError (a KeyError)."""
    bus, clock = inline
    dead_letter_of(bus, clock, Flaky(failures=2))
    [dead] = bus.dead_letters()
    bus.replay(dead)
    with pytest.raises(UnknownDeadLetterError) as info:
        bus.replay(dead)
    assert isinstance(info.value, KeyError)


def test_replay_after_the_handler_was_removed_keeps_the_dead_letter(inline):
    """Replaying to a handler no longer subscribed raises UnknownHandlerError and the dead
    letter stays listed."""
    bus, clock = inline
    handler = Flaky(failures=2)
    dead_letter_of(bus, clock, handler)
    [dead] = bus.dead_letters()
    bus.off(handler)
    with pytest.raises(UnknownHandlerError):
        bus.replay(dead)
    assert bus.dead_letters() == [dead]
    assert handler.calls == 2


def test_replay_goes_to_the_handler_now_subscribed_under_that_name(inline):
    """A dead letter replays to whichever handler now holds its name (a fixed version)."""
    bus, clock = inline
    broken = Flaky()
    event = dead_letter_of(bus, clock, broken)
    bus.off(broken)
    fixed_version: list[Event] = []
    bus.subscribe("order:created", fixed_version.append, name="inventory")
    bus.replay(bus.dead_letters()[0])
    assert fixed_version == [event]
    assert bus.status(event.id)["inventory"].state == "succeeded"


def test_replay_on_worker_threads_is_drained(realtime):
    """A replay on the worker pool runs the handler again and drain() waits for it."""
    handler = Flaky(failures=3)
    realtime.subscribe("order:created", handler, name="inventory")
    event = realtime.emit("order:created")
    assert realtime.drain(WAIT)
    [dead] = realtime.dead_letters()
    realtime.replay(dead)
    assert realtime.drain(WAIT)
    assert handler.calls == 4
    assert realtime.status(event.id)["inventory"].state == "succeeded"


def test_purge_dead_letters_returns_how_many_it_removed(inline):
    """purge_dead_letters() clears the dead letters and returns their number."""
    bus, _ = inline
    bus.subscribe("order:*", Flaky(), name="broken", retry=RetryPolicy(max_attempts=1))
    for name in ("order:created", "order:paid", "order:shipped"):
        bus.emit(name)
    assert bus.purge_dead_letters() == 3
    assert bus.dead_letters() == []
    assert bus.purge_dead_letters() == 0


def test_purged_dead_letter_cannot_be_replayed(inline):
    """Replaying a purged dead letter raises UnknownDeadLetterError."""
    bus, clock = inline
    dead_letter_of(bus, clock, Flaky())
    [dead] = bus.dead_letters()
    bus.purge_dead_letters()
    with pytest.raises(UnknownDeadLetterError):
        bus.replay(dead)


def test_dead_letters_are_listed_oldest_first(inline):
    """dead_letters() lists dead letters in the order the deliveries died."""
    bus, _ = inline
    bus.subscribe("order:*", Flaky(), name="broken", retry=RetryPolicy(max_attempts=1))
    events = [bus.emit(name) for name in ("order:created", "order:paid", "order:shipped")]
    assert [d.event for d in bus.dead_letters()] == events


def test_dead_letters_outlive_status_retention():
    """Dead letters are never evicted, however many events settle after them."""
    bus, _ = inline_bus(status_retention=1)
    with bus:
        bus.subscribe("order:broken", Flaky(), name="broken", retry=RetryPolicy(max_attempts=1))
        bus.subscribe("order:fine", Counter(), name="fine")
        broken = bus.emit("order:broken")
        for _ in range(5):
            bus.emit("order:fine")
        assert [d.event for d in bus.dead_letters()] == [broken]


def test_replay_after_close_is_refused(inline):
    """replay() on a closed bus raises BusClosedError and keeps the dead letter."""
    bus, clock = inline
    dead_letter_of(bus, clock, Flaky())
    [dead] = bus.dead_letters()
    bus.close()
    with pytest.raises(BusClosedError):
        bus.replay(dead)
    assert bus.dead_letters() == [dead]


def test_replay_cut_short_by_close_keeps_the_dead_letter(inline):
    """A replay that loses the race with close() raises BusClosedError and keeps the letter."""
    bus, _ = inline

    def broken(event: Event) -> None:
        raise RuntimeError("down")

    bus.subscribe("order:created", broken, name="broken", retry=RetryPolicy(max_attempts=1))
    bus.emit("order:created")
    (letter,) = bus.dead_letters()
    admit = bus._pipeline.adopt

    def close_first(*args: Any, **kwargs: Any) -> Any:
        bus._admission.close()  # close() starts between taking the letter and queueing it
        return admit(*args, **kwargs)

    bus._pipeline.adopt = close_first  # type: ignore[method-assign]
    with pytest.raises(BusClosedError):
        bus.replay(letter)
    assert [d.id for d in bus.dead_letters()] == [letter.id]
