"""drain() returns only after a delivery's outcome has been logged and signalled."""

from __future__ import annotations

import threading
from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import structlog

from eventbus import Event, EventBus, RetryPolicy, signals


class GateOn:
    """A structlog processor that holds the logging thread on one event name until opened."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reached = threading.Event()
        self.opened = threading.Event()

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if event_dict.get("event") == self.name:
            self.reached.set()
            self.opened.wait(30)
        return event_dict


@pytest.fixture
def gate() -> Iterator[GateOn]:
    """Logging through a gate, with debug records kept (so successes are logged)."""
    gate = GateOn("")
    structlog.configure(processors=[gate, structlog.processors.KeyValueRenderer()])
    yield gate
    gate.opened.set()


def fail(event: Event) -> None:
    raise RuntimeError("boom")


def succeed(event: Event) -> None:
    pass


@pytest.mark.parametrize(
    ("handler", "record"), [(fail, "handler.dead_lettered"), (succeed, "handler.succeeded")]
)
def test_drain_waits_for_the_outcome_record(gate: GateOn, handler: Any, record: str) -> None:
    """While the worker is still writing the outcome's log record, drain() does not return."""
    gate.name = record
    with EventBus(max_workers=1, retry=RetryPolicy(max_attempts=1)) as bus:
        bus.subscribe("order:created", handler)
        bus.emit("order:created")
        assert gate.reached.wait(30)
        assert bus.drain(timeout=0.05) is False  # held in the log call: not settled yet
        gate.opened.set()
        assert bus.drain(timeout=30) is True


def test_drain_waits_for_signal_receivers() -> None:
    """A dead_lettered receiver has finished by the time drain() returns."""
    finished: list[str] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        finished.append(kwargs["dead_letter"].handler)

    signals.dead_lettered.connect(receiver)
    try:
        with EventBus(max_workers=1, retry=RetryPolicy(max_attempts=1)) as bus:
            bus.subscribe("order:created", fail, name="fail")
            for _ in range(20):
                bus.emit("order:created")
                assert bus.drain(timeout=30)
                assert len(finished) == len(bus.dead_letters())
    finally:
        signals.dead_lettered.disconnect(receiver)
