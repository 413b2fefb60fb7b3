"""Bounded intake: ``max_pending`` and ``block_timeout``, and what ``emit()`` does when full.

Handlers are held on ``threading.Event`` gates so the bus is full for as long as a test needs;
nothing sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from eventbus import BusClosedError, Event, EventBus, QueueFullError

WAIT = 5.0


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """A gate that holds handlers until the test opens it (opened at teardown too)."""
    opened = threading.Event()
    yield opened
    opened.set()


def _held_bus(gate: threading.Event, **options: object) -> tuple[EventBus, list[str]]:
    """A one-worker bus whose only handler waits for *gate*; returns it and the call log."""
    bus = EventBus(max_workers=1, **options)  # type: ignore[arg-type]
    calls: list[str] = []

    @bus.on("job:run")
    def held(event: Event) -> None:
        assert gate.wait(WAIT)
        calls.append(event.payload)

    return bus, calls


def test_emit_raises_queue_full_without_waiting_when_block_timeout_is_zero(gate):
    """With block_timeout=0 a full bus raises QueueFullError at once and queues nothing."""
    bus, calls = _held_bus(gate, max_pending=2, block_timeout=0)
    with bus:
        bus.emit("job:run", "a")
        bus.emit("job:run", "b")
        with pytest.raises(QueueFullError, match="max_pending=2"):
            bus.emit("job:run", "c")
        gate.set()
        assert bus.drain(WAIT)
    assert calls == ["a", "b"]


def test_queue_full_error_is_a_runtime_error():
    """QueueFullError can be caught as the RuntimeError it is."""
    assert issubclass(QueueFullError, RuntimeError)


def test_emit_gives_up_after_block_timeout(gate):
    """A full bus makes emit() wait for block_timeout, then raise having queued nothing."""
    bus, calls = _held_bus(gate, max_pending=1, block_timeout=0.05)
    with bus:
        bus.emit("job:run", "a")
        with pytest.raises(QueueFullError):
            bus.emit("job:run", "b")
        gate.set()
        assert bus.drain(WAIT)
    assert calls == ["a"]


def test_blocked_emit_proceeds_once_there_is_room(gate):
    """An emit() blocked on a full bus returns as soon as a delivery finishes."""
    bus, calls = _held_bus(gate, max_pending=1)
    accepted = threading.Event()

    def producer() -> None:
        bus.emit("job:run", "b")
        accepted.set()

    with bus:
        bus.emit("job:run", "a")
        thread = threading.Thread(target=producer)
        thread.start()
        assert not accepted.wait(0.05)  # still blocked: the only slot is taken
        gate.set()
        assert accepted.wait(WAIT)
        thread.join(WAIT)
        assert bus.drain(WAIT)
    assert calls == ["a", "b"]


def test_close_wakes_a_blocked_emit_with_bus_closed_error(gate):
    """Closing the bus makes an emit() blocked on a full queue raise BusClosedError."""
    bus, _ = _held_bus(gate, max_pending=1)
    errors: list[BaseException] = []
    blocked = threading.Thread(target=lambda: _emit_catching(bus, errors))
    bus.emit("job:run", "a")
    blocked.start()
    closer = threading.Thread(target=bus.close)
    closer.start()
    blocked.join(WAIT)
    gate.set()
    closer.join(WAIT)
    assert [type(e) for e in errors] == [BusClosedError]


def _emit_catching(bus: EventBus, errors: list[BaseException]) -> None:
    try:
        bus.emit("job:run", "b")
    except BusClosedError as exc:
        errors.append(exc)


def test_event_with_more_handlers_than_the_bound_is_admitted_when_idle():
    """An event whose fan-out exceeds max_pending is still admitted when nothing is queued."""
    with EventBus(max_workers=2, max_pending=1, block_timeout=0) as bus:
        seen: list[str] = []
        lock = threading.Lock()
        for i in range(3):
            bus.subscribe("wide:event", lambda e, i=i: _append(lock, seen, f"h{i}"), name=f"h{i}")
        bus.emit("wide:event")
        assert bus.drain(WAIT)
    assert sorted(seen) == ["h0", "h1", "h2"]


def _append(lock: threading.Lock, seen: list[str], item: str) -> None:
    with lock:
        seen.append(item)


def test_handler_emits_are_never_blocked_by_the_bound(gate):
    """A handler emitting into a full bus is not blocked (it could be waiting for itself)."""
    chained = threading.Event()
    with EventBus(max_workers=1, max_pending=1, block_timeout=0) as bus:

        @bus.on("step:one")
        def one(event: Event) -> None:
            bus.emit("step:two")

        @bus.on("step:two")
        def two(event: Event) -> None:
            chained.set()

        bus.emit("step:one")
        assert chained.wait(WAIT)
        assert bus.drain(WAIT)


@pytest.mark.parametrize("bound", [0, -1])
def test_max_pending_below_one_is_a_value_error(bound):
    """max_pending below 1 is rejected when the bus is built."""
    with pytest.raises(ValueError, match="max_pending must be at least 1"):
        EventBus(max_pending=bound)


@pytest.mark.parametrize("bound", [True, 1.5, "10"])
def test_max_pending_of_the_wrong_type_is_a_type_error(bound):
    """max_pending that is not an int is rejected when the bus is built."""
    with pytest.raises(TypeError, match="max_pending must be an int"):
        EventBus(max_pending=bound)


def test_negative_block_timeout_is_rejected():
    """A negative block_timeout is rejected when the bus is built."""
    with pytest.raises(ValueError, match="block_timeout"):
        EventBus(block_timeout=-1)


def test_idempotency_key_delivers_once_when_two_emits_wait_for_room(gate):
    """Two emits with one key, both blocked on a full bus, deliver one event between them."""
    bus, calls = _held_bus(gate, max_pending=1)
    results: list[str] = []

    def emit_keyed() -> None:
        results.append(bus.emit("job:run", "keyed", key="K").id)

    # Told each time an emit starts waiting for room (it waits under the admission lock, so
    # a delivery that finishes after this cannot miss it).
    waiting = threading.Semaphore(0)
    admission = bus._admission
    wait = admission._wait

    def counted_wait(
        predicate: Callable[[], bool], timeout: float | None, *, room: bool = False
    ) -> bool:
        waiting.release()
        return wait(predicate, timeout, room=room)

    admission._wait = counted_wait  # type: ignore[method-assign]
    with bus:
        bus.emit("job:run", "a")  # takes the only slot; its handler waits at the gate
        threads = [threading.Thread(target=emit_keyed) for _ in range(2)]
        for thread in threads:
            thread.start()
        assert waiting.acquire(timeout=WAIT)
        assert waiting.acquire(timeout=WAIT)  # both emits wait for room now
        gate.set()
        for thread in threads:
            thread.join(WAIT)
        assert bus.drain(WAIT)
    assert calls.count("keyed") == 1
    assert len(results) == 2
    assert results[0] == results[1]
