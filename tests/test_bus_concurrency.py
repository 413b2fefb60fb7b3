"""Behaviour of EventBus under concurrency: many emitting threads, handlers of one event
running at once, subscriptions changing while events flow, and readers racing writers.

Threads start together on a barrier and are joined; work is awaited with drain(). Nothing here
sleeps.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
import structlog

from eventbus import Event, EventBus, RetryPolicy

#: Upper bound for waits that normally end at once; only a broken bus ever waits this long.
WAIT = 5.0
#: drain() bound for the load tests: generous, they finish in well under a second.
LOAD_WAIT = 30.0


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    """Thousands of outcomes: keep only critical records (internal errors) in these tests.
    (conftest restores structlog's defaults afterwards.)"""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


class Counter:
    """A handler that counts its calls under a lock."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.calls += 1


def run_together(count: int, target: Callable[[int], Any]) -> None:
    """Run ``target(i)`` on *count* threads started on a common barrier; re-raise the first
    error any of them hit."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(WAIT)
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOAD_WAIT)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]


def test_eight_threads_emitting_a_thousand_events_each_make_24000_calls(bus):
    """8 threads emitting 1,000 events each to 3 handlers produce exactly 24,000 handler
    calls, and drain() then returns True."""
    handlers = [Counter() for _ in range(3)]
    bus.subscribe("load:tick", handlers[0], name="exact")
    bus.subscribe("load:*", handlers[1], name="pattern")
    bus.subscribe("**", handlers[2], name="everything")

    def emit_many(i: int) -> None:
        for n in range(1_000):
            bus.emit("load:tick", (i, n))

    run_together(8, emit_many)
    assert bus.drain(LOAD_WAIT) is True
    assert [h.calls for h in handlers] == [8_000, 8_000, 8_000]
    assert sum(h.calls for h in handlers) == 24_000


def test_every_event_from_every_thread_is_delivered_once(bus):
    """Each (thread, sequence) payload emitted concurrently reaches the handler exactly once."""
    seen: list[Any] = []
    lock = threading.Lock()

    def handler(event: Event) -> None:
        with lock:
            seen.append(event.payload)

    bus.subscribe("load:tick", handler)
    run_together(4, lambda i: [bus.emit("load:tick", (i, n)) for n in range(500)])
    assert bus.drain(LOAD_WAIT)
    assert sorted(seen) == [(i, n) for i in range(4) for n in range(500)]


def test_handlers_of_one_event_run_concurrently(bus):
    """The handlers of one event run at the same time on different workers."""
    barrier = threading.Barrier(3)
    met: list[str] = []
    lock = threading.Lock()

    def make(label: str) -> Callable[[Event], None]:
        def handler(event: Event) -> None:
            barrier.wait(WAIT)  # passes only if all three are running together
            with lock:
                met.append(label)

        return handler

    for label in ("a", "b", "c"):
        bus.subscribe("order:created", make(label), name=label)
    event = bus.emit("order:created")
    assert bus.drain(LOAD_WAIT)
    assert sorted(met) == ["a", "b", "c"]
    assert {d.state for d in bus.status(event.id).values()} == {"succeeded"}


def test_subscription_changes_during_emits_take_effect_at_once(bus):
    """While other threads emit, a handler subscribed gets the next event emitted after the
    subscription, and after off() it gets none: the resolution cache never goes stale."""
    steady = Counter()
    churn = Counter()
    bus.subscribe("load:tick", steady, name="steady")
    while_on: list[Event] = []
    while_off: list[Event] = []

    def work(i: int) -> None:
        if i == 0:
            for _ in range(200):
                bus.subscribe("load:*", churn, name="churn")
                while_on.append(bus.emit("load:tick"))
                bus.off(churn)
                while_off.append(bus.emit("load:tick"))
        else:
            for _ in range(500):
                bus.emit("load:tick")

    run_together(4, work)
    assert bus.drain(LOAD_WAIT)
    assert steady.calls == 3 * 500 + 2 * 200
    assert all("churn" in bus.status(e.id) for e in while_on)
    assert all("churn" not in bus.status(e.id) for e in while_off)
    assert churn.calls >= len(while_on)


def test_failures_from_many_threads_each_leave_one_dead_letter(bus):
    """Concurrent failing deliveries produce exactly one dead letter each."""

    def broken(event: Event) -> None:
        raise ValueError(f"order {event.payload} failed")

    bus.subscribe("order:created", broken, name="broken", retry=RetryPolicy(max_attempts=1))
    emitted: list[Event] = []
    lock = threading.Lock()

    def emit_many(i: int) -> None:
        for n in range(250):
            event = bus.emit("order:created", (i, n))
            with lock:
                emitted.append(event)

    run_together(4, emit_many)
    assert bus.drain(LOAD_WAIT)
    dead = bus.dead_letters()
    assert len(dead) == 1_000
    assert {d.event.id for d in dead} == {e.id for e in emitted}
    assert len({d.id for d in dead}) == 1_000


def test_status_and_dead_letters_can_be_read_while_events_flow(bus):
    """status() and dead_letters() called from other threads during emits never fail, and
    every status read shows a valid state."""
    valid = {"pending", "running", "retrying", "succeeded", "dead"}
    flaky_calls = Counter()

    def flaky(event: Event) -> None:
        flaky_calls(event)
        if event.payload % 10 == 0:
            raise ValueError("every tenth order fails")

    bus.subscribe("order:created", flaky, name="flaky", retry=RetryPolicy(max_attempts=1))
    emitted: list[Event] = []
    lock = threading.Lock()
    states: set[str] = set()

    def work(i: int) -> None:
        if i < 2:
            for n in range(500):
                event = bus.emit("order:created", n)
                with lock:
                    emitted.append(event)
            return
        finished = False
        while not finished:
            with lock:
                recent = emitted[-20:]
                finished = len(emitted) == 1_000
            read = {d.state for event in recent for d in bus.status(event.id).values()}
            bus.dead_letters()
            with lock:
                states.update(read)

    run_together(4, work)
    assert bus.drain(LOAD_WAIT)
    assert states <= valid
    assert len(bus.dead_letters()) == 100
    assert flaky_calls.calls == 1_000


def test_drain_from_several_threads_returns_true_for_all(bus):
    """drain() called from several threads at once returns True in each once work is done."""
    release = threading.Event()
    bus.subscribe("order:created", lambda event: release.wait(WAIT), name="slow")
    bus.emit("order:created")
    results: list[bool] = []
    lock = threading.Lock()

    def drain(i: int) -> None:
        if i == 0:
            release.set()
            return
        result = bus.drain(LOAD_WAIT)
        with lock:
            results.append(result)

    run_together(4, drain)
    assert results == [True, True, True]


def test_emits_from_handlers_on_all_workers_are_all_delivered(bus):
    """Handlers that emit follow-up events from every worker at once lose none of them."""
    followers = Counter()

    def fan_out(event: Event) -> None:
        for n in range(10):
            bus.emit("order:followed", n)

    bus.subscribe("order:created", fan_out)
    bus.subscribe("order:followed", followers, name="followers")
    run_together(4, lambda i: [bus.emit("order:created") for _ in range(50)])
    assert bus.drain(LOAD_WAIT)
    assert followers.calls == 4 * 50 * 10


def test_single_worker_bus_survives_concurrent_emitters(clock):
    """With one worker, 4 emitting threads still get every delivery made, in full."""
    counter = Counter()
    with EventBus(max_workers=1, clock=clock) as bus:
        bus.subscribe("load:tick", counter, name="counter")
        run_together(4, lambda i: [bus.emit("load:tick") for _ in range(500)])
        assert bus.drain(LOAD_WAIT)
    assert counter.calls == 2_000
