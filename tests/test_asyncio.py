"""``async def`` handlers beside thread handlers: which loop runs what, aemit/adrain/aclose,
isolation, retries, cancellation, the max_async bound and the errors of wrong calls.

Nothing here sleeps to wait for work: tests await ``adrain()``, asyncio events set by the
handlers, or move a fake clock."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Iterator

import pytest
import structlog
import tenacity
from structlog.testing import capture_logs

from eventbus import (
    BusClosedError,
    DrainInHandlerError,
    Event,
    EventBus,
    EventLoopError,
    InvalidHandlerError,
    QueueFullError,
    RetryPolicy,
)
from eventbus.signals import handler_succeeded
from eventbus.testing import FakeClock, inline_bus

pytestmark = pytest.mark.anyio

ONCE = RetryPolicy(max_attempts=1)
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def bus(clock: FakeClock) -> Iterator[EventBus]:
    """A bus on 2 worker threads whose retries wait on the fake clock; closed at the end
    (from the test's thread, once its loop is gone, if the test did not close it)."""
    b = EventBus(max_workers=2, clock=clock, retry=RetryPolicy(max_attempts=2))
    yield b
    b.close(timeout=5)


# -- which loop runs what --------------------------------------------------------------------


async def test_async_handlers_run_on_the_bound_loop_and_plain_ones_on_workers(bus):
    """Under ``async with bus``, an async handler runs on the test's loop (its thread) and a
    plain one on a worker thread; both receive the same event from aemit()."""
    ran: dict[str, tuple[str, str]] = {}
    loop = asyncio.get_running_loop()

    @bus.on("order:created")
    async def confirm(event: Event) -> None:
        assert asyncio.get_running_loop() is loop
        ran["confirm"] = (event.id, threading.current_thread().name)

    @bus.on("order:created")
    def reserve(event: Event) -> None:
        ran["reserve"] = (event.id, threading.current_thread().name)

    async with bus:
        event = await bus.aemit("order:created", {"id": 1})
        assert await bus.adrain(timeout=10)
    assert ran["confirm"] == (event.id, threading.current_thread().name)
    assert ran["reserve"][0] == event.id
    assert ran["reserve"][1].startswith("eventbus-worker-")
    assert {d.state for d in bus.status(event.id).values()} == {"succeeded"}


def test_a_bus_never_bound_runs_async_handlers_on_a_loop_thread_of_its_own(bus):
    """From sync code, async handlers run on the bus's own loop thread, which close() stops
    (the autouse thread check fails the test if it outlives the bus)."""
    threads: list[str] = []
    done = threading.Event()

    @bus.on("order:created")
    async def confirm(event: Event) -> None:
        await asyncio.sleep(0)  # a real suspension point on that loop
        threads.append(threading.current_thread().name)
        done.set()

    bus.emit("order:created")
    assert done.wait(10)
    assert bus.drain(timeout=10)
    assert threads == ["eventbus-loop"]
    bus.close()
    assert "eventbus-loop" not in {t.name for t in threading.enumerate()}


async def test_emit_from_another_thread_hands_async_deliveries_to_the_bound_loop(bus):
    """A plain emit() on some other thread delivers to async handlers on the bound loop."""
    loop = asyncio.get_running_loop()
    seen: list[bool] = []

    @bus.on("order:created")
    async def confirm(event: Event) -> None:
        seen.append(asyncio.get_running_loop() is loop)

    async with bus:
        thread = threading.Thread(target=bus.emit, args=("order:created",))
        thread.start()
        thread.join()
        assert await bus.adrain(timeout=10)
    assert seen == [True]


async def test_async_handler_sees_the_emitters_context_variables(bus):
    """The emitter's contextvars (a request id, structlog's bound variables) are visible in
    the async handler and on the bus's own records."""
    seen: list[str] = []

    @bus.on("order:created")
    async def confirm(event: Event) -> None:
        seen.append(request_id.get())

    async with bus:
        request_id.set("req-42")
        structlog.contextvars.bind_contextvars(request_id="req-42")
        try:
            # capture_logs drops configured processors; merge_contextvars is an app's.
            with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
                await bus.aemit("order:created")
                assert await bus.adrain(timeout=10)
        finally:
            structlog.contextvars.clear_contextvars()
    assert seen == ["req-42"]
    succeeded = [r for r in logs if r["event"] == "handler.succeeded"]
    assert [r.get("request_id") for r in succeeded] == ["req-42"]


async def test_async_handler_outcomes_are_signalled(bus):
    """The blinker signals fire for async handlers as for thread ones."""
    received: list[str] = []

    def on_success(sender: object, **kwargs: object) -> None:
        received.append(kwargs["delivery"].handler)  # type: ignore[attr-defined]

    @bus.on("order:created", name="confirm")
    async def confirm(event: Event) -> None:
        pass

    handler_succeeded.connect(on_success, sender=bus)
    try:
        async with bus:
            await bus.aemit("order:created")
            assert await bus.adrain(timeout=10)
    finally:
        handler_succeeded.disconnect(on_success, sender=bus)
    assert received == ["confirm"]


# -- isolation, retries, dead letters --------------------------------------------------------


async def test_failing_async_handler_is_retried_on_the_clock_then_dead_lettered(bus, clock):
    """A failure is retried after its backoff (held by the bus's clock, no task waiting) and
    then kept as a dead letter; the other handlers are unaffected."""
    attempts: list[int] = []
    failed = asyncio.Event()

    @bus.on("order:created", name="flaky", retry=RetryPolicy(max_attempts=2))
    async def flaky(event: Event) -> None:
        attempts.append(1)
        failed.set()
        raise ConnectionError("mail server down")

    @bus.on("order:created", name="steady")
    async def steady(event: Event) -> None:
        pass

    async with bus:
        event = await bus.aemit("order:created")
        await failed.wait()
        assert not await bus.adrain(timeout=0)  # waiting for its backoff, on the fake clock
        assert bus.status(event.id)["flaky"].state == "retrying"
        assert bus.status(event.id)["steady"].state == "succeeded"
        clock.advance(60)
        assert await bus.adrain(timeout=10)
    assert len(attempts) == 2
    [letter] = bus.dead_letters()
    assert (letter.handler, letter.reason, letter.attempts) == ("flaky", "exhausted", 2)
    assert "mail server down" in letter.error


async def test_cancelled_error_raised_inside_a_handler_is_a_failure_like_any_other(bus):
    """A CancelledError the bus did not cause (the handler awaited something cancelled) fails
    the delivery instead of escaping or vanishing."""

    @bus.on("order:created", name="cancelled_inside", retry=ONCE)
    async def cancelled_inside(event: Event) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    async with bus:
        event = await bus.aemit("order:created")
        assert await bus.adrain(timeout=10)
    assert bus.status(event.id)["cancelled_inside"].state == "dead"
    [letter] = bus.dead_letters()
    assert letter.reason == "not_retryable"  # a BaseException, as for a thread handler
    assert "CancelledError" in letter.error


async def test_any_base_exception_of_an_async_handler_stays_in_its_delivery(bus):
    """Even KeyboardInterrupt raised by an async handler becomes that delivery's failure."""

    @bus.on("order:created", name="interrupted", retry=ONCE)
    async def interrupted(event: Event) -> None:
        raise KeyboardInterrupt

    async with bus:
        await bus.aemit("order:created")
        assert await bus.adrain(timeout=10)
    [letter] = bus.dead_letters()
    assert "KeyboardInterrupt" in letter.error


def test_plain_handler_returning_a_coroutine_fails_with_an_error_saying_so(clock):
    """The "never awaited" trap: a plain function that returns a coroutine fails its delivery
    with InvalidHandlerError, and the coroutine is closed (no warning, which -W error would
    turn into a test error)."""
    returned: list[object] = []

    async def send(event: Event) -> None:
        raise AssertionError("never runs")

    def handler(event: Event) -> object:
        coroutine = send(event)
        returned.append(coroutine)
        return coroutine

    bus, _ = inline_bus(clock=clock, retry=ONCE)
    try:
        bus.subscribe("order:created", handler, name="trap")
        event = bus.emit("order:created")
        assert bus.status(event.id)["trap"].state == "dead"
        [letter] = bus.dead_letters()
        assert "InvalidHandlerError" in letter.error
        assert "async def" in letter.error
        [coroutine] = returned
        assert coroutine.cr_frame is None  # type: ignore[attr-defined]  # closed
    finally:
        bus.close()


def test_async_generator_handler_is_rejected_at_subscription(bus):
    """An async generator function cannot be a handler: TypeError when subscribing."""

    async def handler(event: Event):  # type: ignore[no-untyped-def]
        yield

    with pytest.raises(InvalidHandlerError, match="async generator") as info:
        bus.subscribe("order:created", handler)
    assert isinstance(info.value, TypeError)


# -- aemit never blocks the loop --------------------------------------------------------------


async def test_aemit_on_a_full_bus_awaits_room_while_the_loop_keeps_running(clock):
    """With max_pending reached, aemit() waits for room without blocking the loop: other
    coroutines run meanwhile, and it returns once a delivery settles."""
    gate = threading.Event()
    async with EventBus(max_workers=1, max_pending=1, clock=clock) as bus:

        @bus.on("job")
        def slow(event: Event) -> None:
            gate.wait(10)

        first = await bus.aemit("job")
        waiting = asyncio.create_task(bus.aemit("job"))
        for _ in range(20):  # the loop runs other work while aemit waits
            await asyncio.sleep(0)
        assert not waiting.done()
        gate.set()
        second = await asyncio.wait_for(waiting, 10)
        assert second.id != first.id
        assert await bus.adrain(timeout=10)


async def test_aemit_cancelled_while_waiting_for_room_emits_nothing(clock):
    """Cancelling an aemit() that waits for room queues nothing."""
    gate = threading.Event()
    emitted: list[str] = []
    async with EventBus(max_workers=1, max_pending=1, clock=clock) as bus:

        @bus.on("job")
        def slow(event: Event) -> None:
            emitted.append(event.payload)
            gate.wait(10)

        await bus.aemit("job", "first")
        waiting = asyncio.create_task(bus.aemit("job", "second"))
        for _ in range(20):
            await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        gate.set()
        assert await bus.adrain(timeout=10)
    assert emitted == ["first"]


async def test_plain_emit_on_the_loop_raises_queue_full_instead_of_blocking_it(clock):
    """A plain emit() on a loop's thread never blocks it: a full bus raises at once."""
    gate = threading.Event()
    async with EventBus(max_workers=1, max_pending=1, clock=clock) as bus:

        @bus.on("job")
        def slow(event: Event) -> None:
            gate.wait(10)

        bus.emit("job")
        with pytest.raises(QueueFullError, match="aemit"):
            bus.emit("job")
        gate.set()
        assert await bus.adrain(timeout=10)


async def test_aemit_with_zero_block_timeout_raises_at_once_on_a_full_bus(clock):
    """block_timeout=0 means "never wait", for aemit() too."""
    gate = threading.Event()
    async with EventBus(max_workers=1, max_pending=1, block_timeout=0, clock=clock) as bus:

        @bus.on("job")
        def slow(event: Event) -> None:
            gate.wait(10)

        await bus.aemit("job")
        with pytest.raises(QueueFullError):
            await bus.aemit("job")
        gate.set()
        assert await bus.adrain(timeout=10)


async def test_aemit_from_an_async_handler_never_waits_for_room(clock):
    """An async handler's own aemit() on a full bus does not wait (it might wait for itself):
    it passes the bound, as a thread handler's emit() does."""
    async with EventBus(max_pending=1, clock=clock) as bus:
        chained: list[str] = []

        @bus.on("first")
        async def first(event: Event) -> None:
            await bus.aemit("second")

        @bus.on("second")
        async def second(event: Event) -> None:
            chained.append(event.name)

        await bus.aemit("first")
        assert await bus.adrain(timeout=10)
    assert chained == ["second"]


async def test_aemit_validates_its_arguments_at_the_call(bus):
    """Bad input raises from aemit() itself, before anything is queued."""
    async with bus:
        with pytest.raises(TypeError):
            await bus.aemit("order:created", metadata={"n": 1})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="event name"):
            await bus.aemit("Not A Name")


async def test_aemit_after_close_raises_bus_closed(bus):
    async with bus:
        pass
    with pytest.raises(BusClosedError):
        await bus.aemit("order:created")


# -- the max_async bound ---------------------------------------------------------------------


async def test_at_most_max_async_deliveries_run_at_once(clock):
    """With max_async=2, ten events become at most two running tasks; the rest wait in line
    and all run in the end."""
    running = 0
    peak = 0
    release = asyncio.Event()
    started = asyncio.Event()
    done = 0
    async with EventBus(max_async=2, clock=clock) as bus:

        @bus.on("job")
        async def work(event: Event) -> None:
            nonlocal running, peak, done
            running += 1
            peak = max(peak, running)
            if running == 2:
                started.set()
            await release.wait()
            running -= 1
            done += 1

        for _ in range(10):
            await bus.aemit("job")
        await started.wait()
        for _ in range(20):
            await asyncio.sleep(0)
        assert running == 2
        release.set()
        assert await bus.adrain(timeout=10)
    assert (peak, done) == (2, 10)


@pytest.mark.parametrize("value", [0, -1])
def test_max_async_below_one_is_rejected(value):
    with pytest.raises(ValueError, match="max_async"):
        EventBus(max_async=value, executor=None, max_workers=1)


# -- shutting down ---------------------------------------------------------------------------


async def test_aclose_past_its_timeout_cancels_running_async_deliveries(bus):
    """An async delivery still running when aclose()'s timeout ends is cancelled and kept as
    an abandoned dead letter: nothing disappears, nothing keeps running."""
    started = asyncio.Event()
    cancelled: list[bool] = []

    @bus.on("order:created", name="stuck")
    async def stuck(event: Event) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async with bus:
        await bus.aemit("order:created")
        await started.wait()
        with capture_logs() as logs:
            await bus.aclose(timeout=0.05)
    assert cancelled == [True]
    [letter] = bus.dead_letters()
    assert (letter.handler, letter.reason) == ("stuck", "abandoned")
    assert "cancelled while running: the bus closed" in letter.error
    [closed] = [r for r in logs if r["event"] == "bus.closed"]
    assert closed["abandoned"] == 1


def test_delivery_left_running_when_its_loop_ends_is_abandoned_not_lost(bus):
    """asyncio.run() ending without aclose() cancels the bus's task: the delivery becomes an
    abandoned dead letter saying its loop stopped."""
    started = threading.Event()

    @bus.on("order:created", name="stuck")
    async def stuck(event: Event) -> None:
        started.set()
        await asyncio.Event().wait()

    async def app() -> None:
        await bus.astart()
        await bus.aemit("order:created")
        await asyncio.sleep(0)  # lets the delivery's task start before the loop ends

    asyncio.run(app())
    assert started.is_set()
    [letter] = bus.dead_letters()
    assert letter.reason == "abandoned"
    assert "its event loop stopped" in letter.error
    assert bus.drain(timeout=0)


def test_emit_after_the_bound_loop_closed_runs_on_a_loop_of_the_bus_own(bus):
    """Once the loop the bus was bound to is closed, async handlers run on the bus's own
    loop thread instead of being lost."""
    threads: list[str] = []

    @bus.on("order:created")
    async def confirm(event: Event) -> None:
        threads.append(threading.current_thread().name)

    async def app() -> None:
        await bus.astart()

    asyncio.run(app())
    bus.emit("order:created")
    assert bus.drain(timeout=10)
    assert threads == ["eventbus-loop"]


async def test_drain_and_close_on_the_bound_loop_raise_instead_of_blocking_it(bus):
    """drain()/close() on the loop the async handlers need would wait for themselves."""
    async with bus:
        with pytest.raises(EventLoopError, match="adrain"):
            bus.drain()
        with pytest.raises(EventLoopError, match="aclose"):
            bus.close()
        assert not bus.closed


async def test_adrain_and_aclose_inside_an_async_handler_fail_that_delivery(bus):
    """A handler awaiting adrain()/aclose() would wait for itself: the call raises."""
    errors: list[type[BaseException]] = []

    @bus.on("order:created", retry=ONCE)
    async def waits_for_itself(event: Event) -> None:
        for call in (bus.adrain, bus.aclose):
            try:
                await call()
            except DrainInHandlerError as exc:
                errors.append(type(exc))

    async with bus:
        await bus.aemit("order:created")
        assert await bus.adrain(timeout=10)
    assert errors == [DrainInHandlerError, DrainInHandlerError]


def test_binding_to_a_second_running_loop_is_refused(bus):
    """A bus serves one loop at a time: astart() on another running loop raises."""
    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, name="test-other-loop")
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(bus.astart(), other).result(10)

        async def bind_here() -> None:
            await bus.astart()

        with pytest.raises(EventLoopError, match="another running event loop"):
            asyncio.run(bind_here())
        bus.close(timeout=5)
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join()
        other.close()


async def test_astart_after_close_raises(bus):
    bus.close()
    with pytest.raises(BusClosedError):
        await bus.astart()


# -- testing helpers --------------------------------------------------------------------------


async def test_aemit_on_an_inline_bus_returns_once_async_handlers_ran(clock):
    """On an inline bus, await aemit() returns after the event's handlers of both kinds (and
    the events they emit) ran."""
    calls: list[str] = []
    bus, _ = inline_bus(clock=clock)
    async with bus:

        @bus.on("order:paid")
        async def ship(event: Event) -> None:
            calls.append("ship")
            await bus.aemit("order:shipped")

        @bus.on("order:shipped")
        def notify(event: Event) -> None:
            calls.append("notify")

        await bus.aemit("order:paid")
        assert calls == ["ship", "notify"]


def test_emit_on_an_inline_bus_from_sync_code_waits_for_async_handlers(clock):
    """From sync code, an inline bus's emit() returns after its async handlers ran."""
    calls: list[str] = []
    bus, _ = inline_bus(clock=clock)
    try:

        @bus.on("order:paid")
        async def ship(event: Event) -> None:
            await asyncio.sleep(0)
            calls.append("ship")

        bus.emit("order:paid")
        assert calls == ["ship"]
    finally:
        bus.close()


async def test_async_retry_on_an_inline_bus_runs_when_the_clock_moves(clock):
    """Retries of async deliveries wait on the fake clock, and run when it is advanced."""
    attempts: list[int] = []
    bus, _ = inline_bus(clock=clock, retry=RetryPolicy(max_attempts=2, wait=tenacity.wait_fixed(5)))
    async with bus:

        @bus.on("order:paid", name="charge")
        async def charge(event: Event) -> None:
            attempts.append(1)
            if len(attempts) == 1:
                raise TimeoutError("gateway")

        event = await bus.aemit("order:paid")
        assert bus.status(event.id)["charge"].state == "retrying"
        clock.advance(5)
        assert await bus.adrain(timeout=10)
        assert bus.status(event.id)["charge"].state == "succeeded"
    assert len(attempts) == 2
