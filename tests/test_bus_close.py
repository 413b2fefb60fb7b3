"""Behaviour of EventBus.close(): intake stops, running and queued work finishes, due retries
run, and what cannot run becomes abandoned dead letters announced by a warning.

Nothing here sleeps: blocked handlers wait on ``threading.Event``s the test sets, and backoffs
wait on the fake clock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import tenacity
from structlog.testing import capture_logs

from eventbus import BusClosedError, DrainInHandlerError, Event, EventBus, RetryPolicy, signals
from eventbus.testing import FakeClock

#: Upper bound for waits that normally end at once; only a broken bus ever waits this long.
WAIT = 5.0


class Blocker:
    """A handler that signals it started, then waits until the test releases it."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def __call__(self, event: Event) -> None:
        self.started.set()
        self.release.wait(WAIT)
        self.finished.set()


class SignalWaiter:
    """A blinker receiver the test can wait on: records each call's kwargs."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.calls: list[dict[str, Any]] = []

    def __call__(self, sender: object, **kwargs: Any) -> None:
        with self._cond:
            self.calls.append(kwargs)
            self._cond.notify_all()

    def wait_for(self, count: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.calls) >= count, WAIT)


def always_fails(event: Event) -> None:
    raise ConnectionError("inventory service unreachable")


def far_future() -> RetryPolicy:
    return RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(3600))


@pytest.fixture
def single(clock: FakeClock) -> Iterator[EventBus]:
    """A bus with exactly one worker thread whose backoffs wait on the fake clock."""
    with EventBus(max_workers=1, clock=clock, retry=RetryPolicy(max_attempts=3)) as b:
        yield b


@pytest.fixture
def blocker(single: EventBus) -> Iterator[Blocker]:
    """A Blocker subscribed to ``job:block`` on the single-worker bus; released and drained
    when the test ends so no handler outlives it."""
    handler = Blocker()
    single.subscribe("job:block", handler, name="blocker")
    yield handler
    handler.release.set()
    assert single.drain(WAIT)


# -- intake ----------------------------------------------------------------------------------


def test_emit_after_close_raises_bus_closed_error(inline):
    """emit() on a closed bus raises BusClosedError, a RuntimeError."""
    bus, _ = inline
    bus.close()
    with pytest.raises(BusClosedError) as info:
        bus.emit("order:created")
    assert isinstance(info.value, RuntimeError)


def test_emit_after_close_delivers_nothing(inline):
    """A refused emit after close reaches no handler."""
    bus, _ = inline
    received: list[Event] = []
    bus.subscribe("order:created", received.append, name="recorder")
    bus.close()
    with pytest.raises(BusClosedError):
        bus.emit("order:created")
    assert received == []


def test_context_manager_closes_the_bus():
    """Leaving ``with EventBus() as bus:`` closes the bus."""
    with EventBus(max_workers=2) as bus:
        assert not bus.closed
        bus.emit("order:created")
    assert bus.closed
    with pytest.raises(BusClosedError):
        bus.emit("order:created")


def test_context_manager_runs_pending_work_before_closing():
    """Deliveries emitted inside the ``with`` block have run when it exits."""
    received: list[Event] = []
    with EventBus(max_workers=2) as bus:
        bus.subscribe("order:created", received.append, name="recorder")
        event = bus.emit("order:created")
    assert received == [event]


def test_close_is_idempotent(inline):
    """A second close() does nothing: no error, and only one ``bus.closed`` record."""
    bus, _ = inline
    with capture_logs() as logs:
        bus.close()
        bus.close()
    assert bus.closed
    assert [r["event"] for r in logs].count("bus.closed") == 1


def test_close_inside_a_handler_raises_and_leaves_the_bus_open(bus):
    """close() from a handler, which would wait for itself, raises DrainInHandlerError and the
    bus stays open."""
    errors: list[BaseException] = []

    def handler(event: Event) -> None:
        try:
            bus.close()
        except RuntimeError as exc:
            errors.append(exc)

    bus.subscribe("order:created", handler)
    bus.emit("order:created")
    assert bus.drain(WAIT)
    assert [type(e) for e in errors] == [DrainInHandlerError]
    assert not bus.closed


# -- letting work finish ----------------------------------------------------------------------


def test_close_lets_a_running_handler_finish(single, blocker):
    """close() waits for a handler already running, which then ends ``succeeded``."""
    event = single.emit("job:block")
    assert blocker.started.wait(WAIT)
    closer = threading.Thread(target=single.close)
    closer.start()
    closer.join(timeout=0.05)
    assert closer.is_alive()  # still waiting for the blocked handler
    blocker.release.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert blocker.finished.is_set()
    assert single.status(event.id)["blocker"].state == "succeeded"
    assert single.dead_letters() == []


def test_close_without_timeout_runs_queued_deliveries(single, blocker):
    """Deliveries queued behind a running handler still run before close() returns."""
    received: list[Event] = []
    single.subscribe("job:queued", received.append, name="queued")
    single.emit("job:block")
    assert blocker.started.wait(WAIT)
    queued = single.emit("job:queued")
    closer = threading.Thread(target=single.close)
    closer.start()
    closer.join(timeout=0.05)
    assert closer.is_alive()  # close() is waiting while the queued delivery has not run
    assert received == []
    blocker.release.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert received == [queued]
    assert single.dead_letters() == []


# -- retries at close -------------------------------------------------------------------------


def test_close_turns_a_far_future_retry_into_an_abandoned_dead_letter(bus):
    """A retry still waiting for its backoff when the bus closes becomes a dead letter with
    reason ``abandoned``."""
    scheduled = SignalWaiter()
    signals.retry_scheduled.connect(scheduled, sender=bus, weak=False)
    try:
        bus.subscribe("order:created", always_fails, name="inventory", retry=far_future())
        event = bus.emit("order:created")
        assert scheduled.wait_for(1)
        bus.close()
    finally:
        signals.retry_scheduled.disconnect(scheduled, sender=bus)
    [dead] = bus.dead_letters()
    assert dead.abandoned is True
    assert dead.reason == "abandoned"
    assert (dead.event, dead.handler, dead.attempts) == (event, "inventory", 1)
    assert bus.status(event.id)["inventory"].state == "dead"


def test_close_with_abandoned_retries_logs_a_warning_with_their_number(inline):
    """Closing with a pending retry logs a ``bus.closed`` warning with ``abandoned=1``."""
    bus, _ = inline
    bus.subscribe("order:created", always_fails, name="inventory", retry=far_future())
    bus.emit("order:created")
    with capture_logs() as logs:
        bus.close()
    [record] = [r for r in logs if r["event"] == "bus.closed"]
    assert record["log_level"] == "warning"
    assert record["abandoned"] == 1


def test_close_with_nothing_abandoned_is_not_a_warning(inline):
    """A clean close logs ``bus.closed`` below warning level, with ``abandoned=0``."""
    bus, _ = inline
    bus.subscribe("order:created", lambda event: None, name="ok")
    bus.emit("order:created")
    with capture_logs() as logs:
        bus.close()
    [record] = [r for r in logs if r["event"] == "bus.closed"]
    assert record["abandoned"] == 0
    assert record["log_level"] in {"debug", "info"}


def test_close_abandons_the_retry_without_running_it_again(inline):
    """An abandoned retry is not attempted again at close, nor later on the clock."""
    bus, clock = inline
    calls: list[Event] = []

    def handler(event: Event) -> None:
        calls.append(event)
        raise ConnectionError("down")

    bus.subscribe("order:created", handler, name="inventory", retry=far_future())
    bus.emit("order:created")
    bus.close()
    clock.advance(7200)
    assert len(calls) == 1


def test_close_runs_a_retry_that_is_already_due(inline):
    """A retry whose backoff has elapsed when close() runs is attempted, not abandoned."""
    bus, _ = inline
    calls: list[Event] = []

    def flaky(event: Event) -> None:
        calls.append(event)
        if len(calls) == 1:
            raise ConnectionError("down")

    policy = RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(0))  # due at once
    bus.subscribe("order:created", flaky, name="flaky", retry=policy)
    event = bus.emit("order:created")
    assert bus.status(event.id)["flaky"].state == "retrying"  # the fake clock never moved
    bus.close()
    assert len(calls) == 2
    assert bus.status(event.id)["flaky"].state == "succeeded"
    assert bus.dead_letters() == []


def test_bus_closed_signal_carries_the_abandoned_count(inline):
    """``bus_closed`` is sent with the bus as sender and ``abandoned`` as keyword."""
    bus, _ = inline
    bus.subscribe("order:*", always_fails, name="inventory", retry=far_future())
    bus.emit("order:created")
    bus.emit("order:paid")
    closed = SignalWaiter()
    signals.bus_closed.connect(closed, sender=bus, weak=False)
    try:
        bus.close()
    finally:
        signals.bus_closed.disconnect(closed, sender=bus)
    assert closed.calls == [{"abandoned": 2}]


# -- close with a timeout ---------------------------------------------------------------------


def test_close_timeout_returns_while_a_handler_is_blocked(single, blocker):
    """close(timeout) returns after its timeout even though a handler is still running."""
    single.emit("job:block")
    assert blocker.started.wait(WAIT)
    single.close(timeout=0.05)
    assert single.closed
    assert not blocker.finished.is_set()


def test_close_timeout_abandons_deliveries_that_never_started(single, blocker):
    """Deliveries still queued when close(timeout) gives up become abandoned dead letters
    with no attempts, and their handler never runs."""
    received: list[Event] = []
    single.subscribe("job:queued", received.append, name="queued")
    single.emit("job:block")
    assert blocker.started.wait(WAIT)
    queued = single.emit("job:queued")
    single.close(timeout=0.05)
    [dead] = single.dead_letters()
    assert (dead.event, dead.handler, dead.reason, dead.attempts) == (
        queued,
        "queued",
        "abandoned",
        0,
    )
    assert single.status(queued.id)["queued"].state == "dead"
    blocker.release.set()
    assert single.drain(WAIT)
    assert received == []


def test_handler_running_past_close_timeout_is_recorded_when_it_ends(single, blocker):
    """A handler still running when close(timeout) returned finishes and ends ``succeeded``."""
    event = single.emit("job:block")
    assert blocker.started.wait(WAIT)
    single.close(timeout=0.05)
    blocker.release.set()
    assert single.drain(WAIT)
    assert single.status(event.id)["blocker"].state == "succeeded"
    assert single.dead_letters() == []


def test_handler_failing_after_close_timeout_is_abandoned_not_retried(single):
    """A handler still running when close(timeout) returned, which then fails, becomes an
    abandoned dead letter instead of a retry that nothing would ever run."""
    started, release = threading.Event(), threading.Event()

    def fails_late(event: Event) -> None:
        started.set()
        release.wait(WAIT)
        raise ConnectionError("down")

    single.subscribe("order:created", fails_late, name="late", retry=far_future())
    try:
        event = single.emit("order:created")
        assert started.wait(WAIT)
        single.close(timeout=0.05)
    finally:
        release.set()
    assert single.drain(WAIT)
    [dead] = single.dead_letters()
    assert (dead.event, dead.reason, dead.attempts) == (event, "abandoned", 1)
    assert dead.error == "ConnectionError: down"
    assert single.status(event.id)["late"].state == "dead"


def test_close_does_not_wait_for_a_backoff_that_starts_while_it_waits():
    """An attempt failing while close() waits for it turns into an abandoned retry at once."""
    started = threading.Event()
    release = threading.Event()
    clock = FakeClock()
    bus = EventBus(max_workers=1, clock=clock, retry=RetryPolicy(wait=tenacity.wait_fixed(3600)))

    @bus.on("job:run")
    def fails_when_released(event: Event) -> None:
        started.set()
        assert release.wait(5)
        raise ConnectionError("down")

    bus.emit("job:run")
    assert started.wait(5)
    closer = threading.Thread(target=bus.close)
    closer.start()
    release.set()
    closer.join(5)
    assert not closer.is_alive()
    [dead] = bus.dead_letters()
    assert dead.reason == "abandoned"
