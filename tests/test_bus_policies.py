"""Delivery policies through the bus: per-key order with retries, concurrency and rate limits
that hold no worker, timeouts of thread and async handlers, stall warnings, delayed events in
memory and in a store. Time moves only on fake clocks; threads synchronise on events."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import tenacity
from structlog.testing import capture_logs

from eventbus import Event, EventBus, HandlerTimeoutError, RetryPolicy
from eventbus.signals import handler_stalled, retry_scheduled
from eventbus.stores import SQLiteStore
from eventbus.testing import FakeClock, inline_bus

FIXED = RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(1))


@pytest.fixture
def inline() -> Iterator[tuple[EventBus, FakeClock]]:
    bus, clock = inline_bus(retry=FIXED)
    yield bus, clock
    bus.close()


# -- ordered_by ------------------------------------------------------------------------------


def test_a_retrying_delivery_holds_later_events_of_its_key(inline):
    """Events of one key reach the handler in emit order even when the first one fails and
    waits for its retry; another key is not held, nor is another handler of the same event."""
    bus, clock = inline
    calls: list[tuple[str, int]] = []
    failed_once: set[int] = set()

    @bus.on("order:*", ordered_by="order_id", name="project")
    def project(event: Event) -> None:
        n = event.payload["n"]
        if n == 1 and n not in failed_once:
            failed_once.add(n)
            raise ConnectionError("projection store busy")
        calls.append(("project", n))

    @bus.on("order:*", name="audit")
    def audit(event: Event) -> None:
        calls.append(("audit", event.payload["n"]))

    bus.emit("order:created", {"order_id": "A", "n": 1})
    bus.emit("order:paid", {"order_id": "A", "n": 2})
    bus.emit("order:created", {"order_id": "B", "n": 3})
    assert ("project", 2) not in calls  # held behind n=1's retry
    assert ("project", 3) in calls
    assert ("audit", 2) in calls
    clock.advance(1)
    projected = [n for who, n in calls if who == "project"]
    assert projected == [3, 1, 2]
    assert bus.drain(timeout=0)


def test_a_dead_letter_releases_its_key(inline):
    """Once a delivery ends as a dead letter, the next one of its key runs."""
    bus, _clock = inline
    calls: list[int] = []

    @bus.on("order:*", ordered_by=lambda e: e.payload["id"], retry=RetryPolicy(max_attempts=1))
    def project(event: Event) -> None:
        if event.payload["n"] == 1:
            raise ValueError("bad event")
        calls.append(event.payload["n"])

    bus.emit("order:created", {"id": 1, "n": 1})
    bus.emit("order:paid", {"id": 1, "n": 2})
    assert calls == [2]
    assert len(bus.dead_letters()) == 1


def test_a_key_function_that_raises_gives_a_dead_letter_naming_the_error(inline):
    bus, _ = inline

    @bus.on("order:*", ordered_by="order_id", name="project")
    def project(event: Event) -> None:
        pass

    event = bus.emit("order:created", {"no": "key"})
    [letter] = bus.dead_letters()
    assert letter.event.id == event.id
    assert letter.reason == "not_retryable"
    assert "ordered_by failed" in letter.error
    assert "order_id" in letter.error
    bus.emit("order:created", {"order_id": 1})  # nothing is stuck
    assert bus.drain(timeout=0)


def test_close_abandons_the_deliveries_waiting_behind_a_retrying_key():
    """close() treats deliveries held behind a key whose holder waits for its backoff like
    that retry: abandoned, never run out of order, never lost."""
    clock = FakeClock()
    bus = EventBus(max_workers=2, clock=clock, retry=FIXED)
    attempts: list[int] = []
    first_failed = threading.Event()

    @bus.on("order:*", ordered_by="order_id", name="project")
    def project(event: Event) -> None:
        attempts.append(event.payload["n"])
        if event.payload["n"] == 1:
            first_failed.set()
            raise ConnectionError("down")

    bus.emit("order:created", {"order_id": 1, "n": 1})
    assert first_failed.wait(10)
    bus.emit("order:paid", {"order_id": 1, "n": 2})
    bus.close(timeout=10)
    assert attempts == [1]
    letters = bus.dead_letters()
    assert sorted(letter.event.payload["n"] for letter in letters) == [1, 2]
    assert {letter.reason for letter in letters} == {"abandoned"}


# -- concurrency and rate limits --------------------------------------------------------------


def test_concurrency_bounds_running_attempts_without_holding_workers():
    """concurrency=2 on an 4-worker pool: two run, and the other workers still serve other
    handlers meanwhile (the waiting deliveries hold none)."""
    release = threading.Event()
    two_running = threading.Event()
    other_ran = threading.Event()
    running = 0
    peak = 0
    lock = threading.Lock()
    with EventBus(max_workers=4, clock=FakeClock()) as bus:

        @bus.on("report:requested", concurrency=2)
        def render(event: Event) -> None:
            nonlocal running, peak
            with lock:
                running += 1
                peak = max(peak, running)
                if running == 2:
                    two_running.set()
            release.wait(10)
            with lock:
                running -= 1

        @bus.on("ping")
        def ping(event: Event) -> None:
            other_ran.set()

        for _ in range(6):
            bus.emit("report:requested")
        assert two_running.wait(10)
        bus.emit("ping")
        assert other_ran.wait(10)  # a free worker: the 4 waiting renders hold none
        release.set()
        assert bus.drain(timeout=10)
    assert peak == 2


def test_rate_limit_starts_at_most_n_attempts_per_period(inline):
    bus, clock = inline
    started: list[float] = []

    @bus.on("partner:call", rate_limit="2/s", name="call_partner")
    def call_partner(event: Event) -> None:
        started.append(clock.monotonic())

    events = [bus.emit("partner:call") for _ in range(5)]
    assert len(started) == 2
    assert bus.status(events[4].id)["call_partner"].state == "pending"
    clock.advance(0.5)
    assert len(started) == 3
    clock.advance(1.0)
    assert len(started) == 5
    assert bus.drain(timeout=0)


def test_rate_limited_retries_take_tokens_too(inline):
    bus, clock = inline
    attempts: list[float] = []

    @bus.on(
        "partner:call",
        rate_limit="1/s",
        retry=RetryPolicy(max_attempts=2, wait=tenacity.wait_none()),
    )
    def call_partner(event: Event) -> None:
        attempts.append(clock.monotonic())
        if len(attempts) == 1:
            raise TimeoutError("partner slow")

    bus.emit("partner:call")
    assert attempts == [0.0]  # its retry is due at once, but waits for the next token
    clock.advance(1.0)
    assert attempts == [0.0, 1.0]


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"concurrency": 0}, ValueError),
        ({"concurrency": "2"}, TypeError),
        ({"rate_limit": "fast"}, ValueError),
        ({"timeout": -1}, ValueError),
        ({"stall_warning": 0}, ValueError),
        ({"ordered_by": 3}, TypeError),
    ],
)
def test_malformed_options_are_refused_at_subscription(inline, options, error):
    bus, _ = inline
    with pytest.raises(error):
        bus.subscribe("order:created", lambda event: None, name="h", **options)
    assert bus.emit("order:created") is not None  # nothing half-subscribed


@pytest.mark.parametrize(("delay", "error"), [(-1, ValueError), ("soon", TypeError)])
def test_malformed_delays_are_refused_at_emit(inline, delay, error):
    bus, _ = inline
    with pytest.raises(error, match="delay"):
        bus.emit("order:created", delay=delay)


# -- timeouts --------------------------------------------------------------------------------


def test_a_stuck_thread_handler_times_out_is_replaced_and_ends_as_a_dead_letter():
    """timeout=1 with a handler stuck until the test lets it go: each attempt fails with
    HandlerTimeoutError, the pool keeps max_workers live workers, other events keep flowing,
    and the late results are logged and dropped."""
    clock = FakeClock()
    bus = EventBus(
        max_workers=2, clock=clock, retry=RetryPolicy(max_attempts=2, wait=tenacity.wait_none())
    )
    stuck = threading.Event()
    entered = threading.Semaphore(0)
    flowed = threading.Event()

    @bus.on("partner:call", timeout=1, name="call_partner")
    def call_partner(event: Event) -> None:
        entered.release()
        stuck.wait(30)

    @bus.on("ping")
    def ping(event: Event) -> None:
        flowed.set()

    try:
        with capture_logs() as logs:
            event = bus.emit("partner:call")
            assert entered.acquire(timeout=10)
            clock.advance(1)  # attempt 1 times out; its retry starts on a fresh worker
            assert entered.acquire(timeout=10)
            assert bus._executor.max_workers == 2  # type: ignore[attr-defined]
            clock.advance(1)  # attempt 2 times out: a dead letter
            bus.emit("ping")
            assert flowed.wait(10)
            [letter] = bus.dead_letters()
            assert letter.event.id == event.id
            assert letter.reason == "exhausted"
            assert letter.error.startswith("HandlerTimeoutError")
            stuck.set()
            assert bus.drain(timeout=10)
        bus.close(timeout=10)
    finally:
        stuck.set()
    late = [r for r in logs if r["event"] == "handler.late_result"]
    # Logged by the stuck threads as they return, possibly after close() started.
    assert {r["attempt"] for r in late} <= {1, 2}
    assert issubclass(HandlerTimeoutError, TimeoutError)


@pytest.mark.anyio
async def test_an_async_handler_past_its_timeout_is_cancelled_and_retried():
    clock = FakeClock()
    cancelled: list[int] = []
    started = asyncio.Event()
    scheduled = asyncio.Event()

    def on_retry(sender: object, **kwargs: Any) -> None:
        scheduled.set()  # on the loop's thread: the attempt ends there

    policy = RetryPolicy(max_attempts=2, wait=tenacity.wait_fixed(1))
    async with EventBus(clock=clock, retry=policy) as bus:

        @bus.on("partner:call", timeout=5, name="call_partner")
        async def call_partner(event: Event) -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(1)
                raise

        retry_scheduled.connect(on_retry, sender=bus)
        try:
            event = await bus.aemit("partner:call")
            await started.wait()
            started.clear()
            clock.advance(5)  # the timeout cancels attempt 1; its retry waits 1 s
            await scheduled.wait()
            clock.advance(1)
            await started.wait()  # attempt 2 runs
            clock.advance(5)
            assert await bus.adrain(timeout=10)
        finally:
            retry_scheduled.disconnect(on_retry, sender=bus)
        status = bus.status(event.id)["call_partner"]
        assert (status.state, status.attempts) == ("dead", 2)
        assert status.error is not None
        assert status.error.startswith("HandlerTimeoutError")
    assert cancelled == [1, 1]


# -- stall warnings --------------------------------------------------------------------------


def test_a_stalled_thread_handler_is_reported_once_with_its_stack():
    clock = FakeClock()
    release = threading.Event()
    entered = threading.Event()
    received: list[dict[str, Any]] = []

    def on_stalled(sender: object, **kwargs: Any) -> None:
        received.append(kwargs)

    with EventBus(max_workers=2, clock=clock, stall_warning=30) as bus:

        @bus.on("report:requested", name="render")
        def render(event: Event) -> None:
            entered.set()
            release.wait(30)

        handler_stalled.connect(on_stalled, sender=bus)
        try:
            with capture_logs() as logs:
                bus.emit("report:requested")
                assert entered.wait(10)
                clock.advance(31)
                clock.advance(60)  # once per attempt
                release.set()
                assert bus.drain(timeout=10)
        finally:
            release.set()
            handler_stalled.disconnect(on_stalled, sender=bus)
    [record] = [r for r in logs if r["event"] == "handler.stalled"]
    assert record["handler"] == "render"
    assert record["elapsed"] == 30  # the timer fires at its time on the fake clock
    assert record["where"].startswith("eventbus-worker-")
    assert "release.wait" in record["stack"]
    [signal] = received
    assert signal["delivery"].handler == "render"
    assert signal["elapsed"] == 30


@pytest.mark.anyio
async def test_a_stalled_async_handler_is_reported_with_its_task_stack():
    clock = FakeClock()
    release = asyncio.Event()
    started = asyncio.Event()
    async with EventBus(clock=clock) as bus:

        @bus.on("report:requested", name="render", stall_warning=10)
        async def render(event: Event) -> None:
            started.set()
            await release.wait()

        with capture_logs() as logs:
            await bus.aemit("report:requested")
            await started.wait()
            clock.advance(10)
            release.set()
            assert await bus.adrain(timeout=10)
    [record] = [r for r in logs if r["event"] == "handler.stalled"]
    assert "in render" in record["stack"]
    assert "release.wait()" in record["stack"]


# -- delayed events --------------------------------------------------------------------------


def test_a_delayed_event_is_scheduled_until_its_time(inline):
    bus, clock = inline
    calls: list[str] = []

    @bus.on("report:requested", name="render")
    def render(event: Event) -> None:
        calls.append(event.id)

    event = bus.emit("report:requested", delay=timedelta(minutes=5))
    assert bus.status(event.id)["render"].state == "scheduled"
    assert not bus.drain(timeout=0)
    clock.advance(299)
    assert calls == []
    clock.advance(1)
    assert calls == [event.id]
    assert bus.status(event.id)["render"].state == "succeeded"


def test_a_delayed_event_survives_a_restart_with_a_store(tmp_path):
    """The store keeps the start time: a later bus's recover() waits for it, then runs it."""
    path = tmp_path / "events.db"
    clock = FakeClock()
    with EventBus(store=SQLiteStore(path), clock=clock, max_workers=1) as bus:
        bus.subscribe("report:requested", lambda event: None, name="render")
        event = bus.emit("report:requested", delay=3600)
        assert bus.status(event.id)["render"].state == "scheduled"
    later_clock = FakeClock()
    calls: list[str] = []
    with EventBus(store=SQLiteStore(path), clock=later_clock, max_workers=1) as later:
        later.subscribe("report:requested", lambda e: calls.append(e.id), name="render")
        assert later.recover() == 1
        assert later.status(event.id)["render"].state == "scheduled"
        later_clock.advance(3600)
        assert later.drain(timeout=10)
        assert calls == [event.id]
        assert later.status(event.id)["render"].state == "succeeded"


def test_a_delayed_event_of_a_key_holds_the_later_ones(inline):
    """Emit order per key holds for delayed events too: a later event of the key waits."""
    bus, clock = inline
    calls: list[int] = []

    @bus.on("order:*", ordered_by="order_id")
    def project(event: Event) -> None:
        calls.append(event.payload["n"])

    bus.emit("order:created", {"order_id": 1, "n": 1}, delay=10)
    bus.emit("order:paid", {"order_id": 1, "n": 2})
    assert calls == []
    clock.advance(10)
    assert calls == [1, 2]


def test_close_abandons_deliveries_waiting_for_a_token_instead_of_waiting_for_time():
    """close() does not wait for a rate limit's tokens (time may never come on a fake clock):
    deliveries still waiting for one are abandoned like retries not yet due."""
    bus, _ = inline_bus(retry=FIXED)
    calls: list[int] = []

    @bus.on("partner:call", rate_limit="1/h", name="call_partner")
    def call_partner(event: Event) -> None:
        calls.append(event.payload)

    for n in range(3):
        bus.emit("partner:call", n)
    with capture_logs() as logs:
        bus.close()
    assert calls == [0]
    assert sorted(letter.event.payload for letter in bus.dead_letters()) == [1, 2]
    assert {letter.reason for letter in bus.dead_letters()} == {"abandoned"}
    [closed] = [r for r in logs if r["event"] == "bus.closed"]
    assert closed["abandoned"] == 2
