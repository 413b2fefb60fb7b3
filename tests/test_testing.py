"""The testing helpers: fake clock, inline executor, inline bus and event recorder."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import tenacity

from eventbus import Event, EventBus, RetryPolicy
from eventbus.testing import EventRecorder, FakeClock, InlineExecutor, inline_bus

# -- FakeClock ----------------------------------------------------------------------------


def test_fake_clock_starts_where_told() -> None:
    """A fake clock reads its start time until advanced."""
    assert FakeClock().monotonic() == 0.0
    assert FakeClock(start=100.0).monotonic() == 100.0


def test_advance_moves_time_forward(clock: FakeClock) -> None:
    """advance(seconds) adds exactly that many seconds to the reading."""
    clock.advance(1.5)
    clock.advance(2.25)
    assert clock.monotonic() == 3.75


def test_callbacks_wait_for_advance(clock: FakeClock) -> None:
    """A scheduled callback does not run until the clock is advanced past its due time."""
    calls: list[str] = []
    clock.call_later(1, lambda: calls.append("a"))
    assert calls == []
    clock.advance(0.5)
    assert calls == []
    clock.advance(0.5)
    assert calls == ["a"]


def test_advance_runs_callbacks_in_due_order(clock: FakeClock) -> None:
    """Callbacks that come due in one advance run in due-time order, not scheduling order."""
    calls: list[str] = []
    clock.call_later(3, lambda: calls.append("c"))
    clock.call_later(1, lambda: calls.append("a"))
    clock.call_later(2, lambda: calls.append("b"))
    clock.advance(5)
    assert calls == ["a", "b", "c"]


def test_same_due_time_runs_in_scheduling_order(clock: FakeClock) -> None:
    """Callbacks due at the same time run in the order they were scheduled."""
    calls: list[int] = []
    for i in range(5):
        clock.call_later(1, lambda i=i: calls.append(i))
    clock.advance(1)
    assert calls == [0, 1, 2, 3, 4]


def test_monotonic_reads_each_due_time_during_its_callback(clock: FakeClock) -> None:
    """Inside a callback, monotonic() reads that callback's due time."""
    seen: list[float] = []
    for delay in (2.0, 0.5, 1.25):
        clock.call_later(delay, lambda: seen.append(clock.monotonic()))
    clock.advance(10)
    assert seen == [0.5, 1.25, 2.0]
    assert clock.monotonic() == 10.0


def test_callback_scheduled_during_advance_runs_if_due(clock: FakeClock) -> None:
    """A callback scheduled by a callback runs in the same advance if it comes due in it."""
    calls: list[tuple[str, float]] = []

    def first() -> None:
        calls.append(("first", clock.monotonic()))
        clock.call_later(2, lambda: calls.append(("second", clock.monotonic())))
        clock.call_later(10, lambda: calls.append(("too late", clock.monotonic())))

    clock.call_later(1, first)
    clock.advance(5)
    assert calls == [("first", 1.0), ("second", 3.0)]
    assert clock.pending == 1


def test_cancelled_callback_does_not_run(clock: FakeClock) -> None:
    """A cancelled callback is skipped when its time comes."""
    calls: list[str] = []
    handle = clock.call_later(1, lambda: calls.append("cancelled"))
    clock.call_later(2, lambda: calls.append("kept"))
    handle.cancel()
    clock.advance(5)
    assert calls == ["kept"]


def test_cancel_after_running_is_a_no_op(clock: FakeClock) -> None:
    """Cancelling a callback that already ran changes nothing."""
    calls: list[str] = []
    handle = clock.call_later(1, lambda: calls.append("ran"))
    clock.advance(1)
    handle.cancel()
    assert calls == ["ran"]


def test_pending_counts_uncancelled_callbacks(clock: FakeClock) -> None:
    """pending counts the callbacks still scheduled, leaving out cancelled and run ones."""
    first = clock.call_later(1, lambda: None)
    clock.call_later(2, lambda: None)
    clock.call_later(3, lambda: None)
    assert clock.pending == 3
    first.cancel()
    assert clock.pending == 2
    clock.advance(2)
    assert clock.pending == 1


def test_negative_advance_is_rejected(clock: FakeClock) -> None:
    """advance() with a negative number raises ValueError and leaves the time alone."""
    clock.advance(3)
    with pytest.raises(ValueError, match="forward"):
        clock.advance(-1)
    assert clock.monotonic() == 3.0


def test_advance_zero_runs_callbacks_due_now(clock: FakeClock) -> None:
    """advance(0) runs callbacks scheduled with no delay."""
    calls: list[str] = []
    clock.call_later(0, lambda: calls.append("now"))
    clock.advance(0)
    assert calls == ["now"]


def test_close_drops_pending_callbacks(clock: FakeClock) -> None:
    """close() drops every scheduled callback."""
    calls: list[str] = []
    clock.call_later(1, lambda: calls.append("dropped"))
    clock.close()
    clock.advance(10)
    assert calls == []
    assert clock.pending == 0


def test_callbacks_run_on_the_advancing_thread(clock: FakeClock) -> None:
    """Callbacks run on the thread that calls advance()."""
    threads: list[threading.Thread] = []
    clock.call_later(1, lambda: threads.append(threading.current_thread()))
    clock.advance(1)
    assert threads == [threading.current_thread()]


# -- InlineExecutor -----------------------------------------------------------------------


def test_inline_job_runs_before_submit_returns() -> None:
    """submit() runs the job on the calling thread before it returns."""
    ran: list[threading.Thread] = []
    InlineExecutor().submit(lambda: ran.append(threading.current_thread()))
    assert ran == [threading.current_thread()]


def test_nested_submit_runs_after_the_current_job() -> None:
    """A job submitted from inside a job runs after the submitting job finishes."""
    executor = InlineExecutor()
    order: list[str] = []

    def outer() -> None:
        order.append("outer start")
        executor.submit(lambda: order.append("inner"))
        order.append("outer end")

    executor.submit(outer)
    assert order == ["outer start", "outer end", "inner"]


def test_nested_submits_run_in_fifo_order() -> None:
    """Jobs submitted from jobs run breadth-first, in submission order."""
    executor = InlineExecutor()
    order: list[str] = []

    def job(label: str, children: list[str]) -> Callable[[], None]:
        def run() -> None:
            order.append(label)
            for child in children:
                executor.submit(job(child, [f"{child}.1"] if len(child) == 1 else []))

        return run

    executor.submit(job("root", ["a", "b"]))
    assert order == ["root", "a", "b", "a.1", "b.1"]


def test_long_chains_do_not_recurse() -> None:
    """A chain of jobs far deeper than the recursion limit runs without recursion."""
    executor = InlineExecutor()
    count = 0

    def step() -> None:
        nonlocal count
        count += 1
        if count < 5000:
            executor.submit(step)

    executor.submit(step)
    assert count == 5000


def test_failing_job_does_not_stop_the_others() -> None:
    """A job that raises does not stop the queued jobs, and its error is re-raised after."""
    executor = InlineExecutor()
    order: list[str] = []
    error = RuntimeError("bug")

    def failing() -> None:
        executor.submit(lambda: order.append("after"))
        order.append("failing")
        raise error

    with pytest.raises(RuntimeError, match="bug") as info:
        executor.submit(failing)
    assert info.value is error
    assert order == ["failing", "after"]


def test_first_error_is_re_raised() -> None:
    """When several jobs raise, the first error is re-raised."""
    executor = InlineExecutor()

    def first() -> None:
        executor.submit(second)
        raise KeyError("first")

    def second() -> None:
        raise ValueError("second")

    with pytest.raises(KeyError, match="first"):
        executor.submit(first)


def test_executor_is_usable_after_an_error() -> None:
    """After a job raised, the next submit() runs its job inline again."""
    executor = InlineExecutor()

    def failing() -> None:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        executor.submit(failing)
    ran: list[str] = []
    executor.submit(lambda: ran.append("ran"))
    assert ran == ["ran"]


def test_inline_shutdown_returns_nothing() -> None:
    """shutdown() of an inline executor has no unstarted jobs to return."""
    assert InlineExecutor().shutdown(timeout=0) == []


def test_each_thread_runs_its_own_jobs() -> None:
    """A submit from another thread runs on that thread, not queued behind this one's jobs."""
    executor = InlineExecutor()
    threads: list[str] = []

    def outer() -> None:
        other = threading.Thread(
            target=executor.submit,
            args=(lambda: threads.append(threading.current_thread().name),),
            name="other",
        )
        other.start()
        other.join(timeout=5)
        threads.append(threading.current_thread().name)

    executor.submit(outer)
    assert threads == ["other", threading.current_thread().name]


# -- inline_bus ---------------------------------------------------------------------------


@pytest.fixture
def flaky_bus() -> Iterator[tuple[EventBus, FakeClock, list[int]]]:
    """An inline bus with a handler that fails once, retried after a fixed 5 s."""
    bus, clock = inline_bus(retry=RetryPolicy(max_attempts=2, wait=tenacity.wait_fixed(5)))
    calls: list[int] = []

    @bus.on("order:created")
    def flaky(event: Event) -> None:
        calls.append(len(calls) + 1)
        if len(calls) == 1:
            raise ConnectionError("down")

    yield bus, clock, calls
    bus.close()


def test_inline_bus_returns_a_bus_and_its_fake_clock() -> None:
    """inline_bus() returns an EventBus and a FakeClock."""
    bus, clock = inline_bus()
    try:
        assert isinstance(bus, EventBus)
        assert isinstance(clock, FakeClock)
    finally:
        bus.close()


def test_inline_bus_uses_a_given_clock() -> None:
    """inline_bus(clock=...) uses and returns that clock."""
    mine = FakeClock(start=50)
    bus, clock = inline_bus(clock=mine)
    try:
        assert clock is mine
    finally:
        bus.close()


def test_inline_bus_runs_handlers_before_emit_returns(
    inline: tuple[EventBus, FakeClock],
) -> None:
    """On an inline bus the handler has run, on the emitting thread, when emit() returns."""
    bus, _ = inline
    threads: list[threading.Thread] = []
    bus.subscribe("order:created", lambda event: threads.append(threading.current_thread()))
    bus.emit("order:created")
    assert threads == [threading.current_thread()]


def test_inline_bus_retries_wait_for_the_clock(
    flaky_bus: tuple[EventBus, FakeClock, list[int]],
) -> None:
    """A failed delivery is retried only when the fake clock reaches its backoff."""
    bus, clock, calls = flaky_bus
    event = bus.emit("order:created")
    assert calls == [1]
    clock.advance(4.9)
    assert calls == [1]
    clock.advance(0.1)
    assert calls == [1, 2]
    assert [d.state for d in bus.status(event.id).values()] == ["succeeded"]


# -- EventRecorder ------------------------------------------------------------------------


def test_recorder_records_names_in_order(inline: tuple[EventBus, FakeClock]) -> None:
    """The recorder keeps every emitted event's name, in emit order."""
    bus, _ = inline
    with EventRecorder(bus) as recorder:
        bus.emit("order:created")
        bus.emit("order:paid")
        bus.emit("order:created")
    assert recorder.names == ["order:created", "order:paid", "order:created"]


def test_recorder_keeps_the_events(inline: tuple[EventBus, FakeClock]) -> None:
    """The recorder keeps the Event objects emit() returned."""
    bus, _ = inline
    with EventRecorder(bus) as recorder:
        event = bus.emit("order:created", {"id": 1})
    assert recorder.events == [event]


def test_recorder_records_events_nobody_handles(inline: tuple[EventBus, FakeClock]) -> None:
    """An event with no handlers is still recorded."""
    bus, _ = inline
    with EventRecorder(bus) as recorder:
        bus.emit("nobody:listens")
    assert recorder.names == ["nobody:listens"]


def test_recorder_records_events_emitted_by_handlers(inline: tuple[EventBus, FakeClock]) -> None:
    """Events emitted from inside handlers are recorded after the one that caused them."""
    bus, _ = inline
    bus.subscribe("order:created", lambda event: bus.emit("invoice:requested"))
    with EventRecorder(bus) as recorder:
        bus.emit("order:created")
    assert recorder.names == ["order:created", "invoice:requested"]


def test_recorder_stops_after_close(inline: tuple[EventBus, FakeClock]) -> None:
    """After close(), the recorder records nothing more."""
    bus, _ = inline
    recorder = EventRecorder(bus)
    bus.emit("before")
    recorder.close()
    bus.emit("after")
    assert recorder.names == ["before"]


def test_recorder_context_manager_closes_on_exit(inline: tuple[EventBus, FakeClock]) -> None:
    """Leaving the with block stops the recording."""
    bus, _ = inline
    with EventRecorder(bus) as recorder:
        bus.emit("inside")
    bus.emit("outside")
    assert recorder.names == ["inside"]


def test_recorder_hears_only_its_bus(inline: tuple[EventBus, FakeClock]) -> None:
    """A recorder ignores events emitted on another bus."""
    bus, _ = inline
    other, _ = inline_bus()
    try:
        with EventRecorder(bus) as recorder:
            other.emit("elsewhere")
            bus.emit("here")
    finally:
        other.close()
    assert recorder.names == ["here"]


def test_fake_clock_wall_time_moves_with_advance() -> None:
    """FakeClock.time() is wall-clock time that advance() moves forward too."""
    clock = FakeClock()
    before = clock.time()
    clock.advance(3600)
    assert clock.time() == pytest.approx(before + 3600)
