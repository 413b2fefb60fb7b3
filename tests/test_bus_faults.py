"""Faults outside a handler (a dead log sink, a raising retry policy, a receiver that closes
the bus) never wedge the bus: every admitted delivery still ends in one known place."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog
import tenacity

from eventbus import (
    DrainInHandlerError,
    Event,
    EventBus,
    RetryPolicy,
    signals,
)
from eventbus.stores import SQLiteStore
from eventbus.testing import FakeClock, inline_bus


class FullDisk:
    """A structlog logger whose every write fails as a full disk would."""

    def __init__(self) -> None:
        self.calls = 0

    def _fail(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    msg = debug = info = warning = warn = error = critical = exception = log = _fail


@pytest.fixture
def full_disk() -> FullDisk:
    """structlog writes every record (debug included) to a sink that raises ENOSPC."""
    sink = FullDisk()
    structlog.configure(
        processors=[structlog.processors.KeyValueRenderer()],
        logger_factory=lambda *args: sink,
        cache_logger_on_first_use=False,
    )
    return sink


def test_emit_with_a_failing_log_sink_admits_and_delivers(full_disk: FullDisk) -> None:
    """emit() returns normally and the handler runs although every log write raises."""
    ran = threading.Event()
    with EventBus(max_workers=2) as bus:
        bus.subscribe("order:created", lambda event: ran.set(), name="mark")
        event = bus.emit("order:created", {"id": 1})
        assert ran.wait(10)
        assert bus.drain(timeout=10)
        assert bus.status(event.id)["mark"].state == "succeeded"
    assert full_disk.calls > 0


def test_unhandled_emit_with_a_failing_log_sink_returns(full_disk: FullDisk) -> None:
    """An event nobody listens to is accepted although its event.unhandled record fails."""
    with EventBus(max_workers=1) as bus:
        event = bus.emit("nobody:listens")
        assert bus.status(event.id) == {}


def test_failing_log_sink_does_not_stop_retries_or_dead_letters(full_disk: FullDisk) -> None:
    """A failing delivery is retried and dead-lettered while every failure record raises."""
    bus, clock = inline_bus(retry=RetryPolicy(max_attempts=2, wait=tenacity.wait_fixed(1)))
    with bus:

        def broken(event: Event) -> None:
            raise RuntimeError("boom")

        bus.subscribe("order:created", broken, name="broken")
        event = bus.emit("order:created")
        assert bus.status(event.id)["broken"].state == "retrying"
        clock.advance(1)
        assert bus.status(event.id)["broken"].state == "dead"
        assert [letter.attempts for letter in bus.dead_letters()] == [2]
        assert bus.drain(timeout=1)


def test_failing_log_sink_leaves_close_clean(full_disk: FullDisk) -> None:
    """close() returns without raising when the bus.closed record cannot be written."""
    bus = EventBus(max_workers=1)
    bus.subscribe("order:created", lambda event: None, name="noop")
    bus.emit("order:created")
    bus.close(timeout=10)
    assert bus.closed


def test_failing_log_sink_is_reported_once_on_stderr(
    full_disk: FullDisk, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first failed log write is reported on stderr, later ones are not."""
    bus, _ = inline_bus()
    with bus:
        bus.subscribe("order:created", lambda event: None, name="noop")
        for _ in range(3):
            bus.emit("order:created")
    err = capsys.readouterr().err
    assert err.count("eventbus: cannot write log record") == 1
    assert "No space left on device" in err


def test_failing_log_sink_with_a_store_delivers_what_it_stored(
    full_disk: FullDisk, tmp_path: Path
) -> None:
    """With a store, an event committed while logging fails is delivered, not stranded."""
    ran = threading.Event()
    with EventBus(max_workers=2, store=SQLiteStore(tmp_path / "events.sqlite3")) as bus:
        bus.subscribe("order:created", lambda event: ran.set(), name="mark")
        event = bus.emit("order:created")
        assert ran.wait(10)
        assert bus.drain(timeout=10)
        assert bus.status(event.id)["mark"].state == "succeeded"


class NeedsAttribute(Exception):
    """An error without the attribute a custom wait strategy reads."""


def wait_from_error(state: tenacity.RetryCallState) -> float:
    """A wait strategy that reads an attribute every error is assumed to have."""
    error = state.outcome.exception() if state.outcome else None
    return float(error.retry_after)  # type: ignore[union-attr]


def test_raising_wait_strategy_turns_the_delivery_into_a_dead_letter() -> None:
    """A retry policy that raises settles the delivery as a dead letter naming both errors."""
    bus, _ = inline_bus(retry=RetryPolicy(max_attempts=3, wait=wait_from_error))
    with bus:

        def broken(event: Event) -> None:
            raise NeedsAttribute("partner down")

        bus.subscribe("order:created", broken, name="broken")
        event = bus.emit("order:created")
        assert bus.drain(timeout=1)
        assert bus.status(event.id)["broken"].state == "dead"
        (letter,) = bus.dead_letters()
        assert "NeedsAttribute: partner down" in letter.error
        assert "AttributeError" in letter.error
        assert letter.reason == "not_retryable"


def test_raising_wait_strategy_on_worker_threads_lets_close_return() -> None:
    """With worker threads, a raising policy still settles the delivery so close() returns."""
    bus = EventBus(max_workers=2, retry=RetryPolicy(max_attempts=3, wait=wait_from_error))

    def broken(event: Event) -> None:
        raise NeedsAttribute("partner down")

    bus.subscribe("order:created", broken, name="broken")
    bus.emit("order:created")
    assert bus.drain(timeout=10)
    bus.close(timeout=10)
    assert len(bus.dead_letters()) == 1


@pytest.mark.parametrize("call", ["close", "drain"])
def test_dead_lettered_receiver_that_waits_for_the_bus_is_refused(call: str) -> None:
    """close() or drain() from a dead_lettered receiver raises DrainInHandlerError, not hangs."""
    bus = EventBus(max_workers=1, retry=RetryPolicy(max_attempts=1))
    seen: list[BaseException] = []

    def wait_for_bus(sender: EventBus, **kwargs: Any) -> None:
        try:
            getattr(sender, call)(timeout=None)
        except BaseException as exc:
            seen.append(exc)
            raise

    def broken(event: Event) -> None:
        raise RuntimeError("boom")

    signals.dead_lettered.connect(wait_for_bus, sender=bus)
    try:
        bus.subscribe("order:created", broken, name="broken")
        bus.emit("order:created")
        assert bus.drain(timeout=10)
        assert len(seen) == 1
        assert isinstance(seen[0], DrainInHandlerError)
    finally:
        signals.dead_lettered.disconnect(wait_for_bus, sender=bus)
        bus.close(timeout=10)


def test_receiver_of_an_abandoned_retry_cannot_wait_for_close() -> None:
    """A dead_lettered receiver that drains during close() is refused instead of deadlocking."""
    clock = FakeClock()
    bus = EventBus(max_workers=1, clock=clock, retry=RetryPolicy(max_attempts=3))
    refused: list[BaseException] = []

    def drain_bus(sender: EventBus, **kwargs: Any) -> None:
        try:
            sender.drain(timeout=None)
        except DrainInHandlerError as exc:
            refused.append(exc)

    def broken(event: Event) -> None:
        raise RuntimeError("boom")

    signals.dead_lettered.connect(drain_bus, sender=bus)
    try:
        bus.subscribe("order:created", broken, name="broken")
        bus.emit("order:created")
        assert bus.drain(timeout=0) is False  # the retry waits on the fake clock
        bus.close(timeout=10)
        assert [letter.reason for letter in bus.dead_letters()] == ["abandoned"]
        assert len(refused) == 1
    finally:
        signals.dead_lettered.disconnect(drain_bus, sender=bus)
