"""eventbus.otel: producer and consumer spans, their parent/child shape and trace, the events
failures leave on them, the metrics, and instrument()/uninstrument().

Every test hands its own SDK providers to instrument() (in-memory span exporter and metric
reader, the ``telemetry`` fixture); the global providers are never set. Handlers run inline
(``inline_bus``) or on worker threads the test waits for with ``drain()`` or a
``threading.Event``; backoffs wait on a FakeClock. Nothing sleeps.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import tenacity
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    InMemoryMetricReader,
    Sum,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from eventbus import Event, EventBus, RetryPolicy, signals
from eventbus.otel import instrument, uninstrument
from eventbus.testing import FakeClock, inline_bus

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: One retry, 10 s after the first failure (on the fake clock), then a dead letter.
TWO_ATTEMPTS_10S = RetryPolicy(max_attempts=2, wait=tenacity.wait_fixed(10))
#: Three attempts, 10 s apart.
THREE_ATTEMPTS_10S = RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(10))
ONE_ATTEMPT = RetryPolicy(max_attempts=1)


class Telemetry:
    """One test's SDK providers: spans to an in-memory exporter, metrics to an in-memory
    reader; never the global providers."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider(shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)
        self.tracer = self.tracer_provider.get_tracer("tests")

    def instrument(self, bus: EventBus) -> EventBus:
        instrument(bus, tracer_provider=self.tracer_provider, meter_provider=self.meter_provider)
        return bus

    def spans(self, kind: SpanKind | None = None) -> list[ReadableSpan]:
        """The finished spans, in the order they ended, of *kind* if given."""
        return [s for s in self.exporter.get_finished_spans() if kind is None or s.kind is kind]

    def producers(self) -> list[ReadableSpan]:
        return self.spans(SpanKind.PRODUCER)

    def attempts(self) -> list[ReadableSpan]:
        """The consumer (attempt) spans, by attempt number then handler."""
        found = self.spans(SpanKind.CONSUMER)
        return sorted(
            found, key=lambda s: (attr(s, "eventbus.attempt"), attr(s, "eventbus.handler"))
        )

    def named(self, name: str) -> ReadableSpan:
        [span] = [s for s in self.spans() if s.name == name]
        return span

    def metrics(self) -> dict[str, Any]:
        """Metric name -> the SDK's Metric (collected now)."""
        data = self.reader.get_metrics_data()
        if data is None:
            return {}
        return {
            metric.name: metric
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }

    def points(self, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        """Metric *name*'s data points keyed by their sorted attributes (empty if none)."""
        metric = self.metrics().get(name)
        if metric is None:
            return {}
        return {tuple(sorted(p.attributes.items())): p for p in metric.data.data_points}

    def gauge(self, name: str) -> float:
        [point] = self.points(name).values()
        return point.value

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = Telemetry()
    yield t
    t.shutdown()


@pytest.fixture
def buses() -> Iterator[list[EventBus]]:
    """Buses a test makes; each closed at the end."""
    made: list[EventBus] = []
    yield made
    for bus in made:
        bus.close(timeout=5)


@pytest.fixture
def traced(telemetry: Telemetry, buses: list[EventBus]) -> tuple[EventBus, FakeClock]:
    """An instrumented inline bus (3 attempts, 10 s apart) and its fake clock."""
    bus, clock = inline_bus(retry=THREE_ATTEMPTS_10S)
    buses.append(bus)
    telemetry.instrument(bus)
    return bus, clock


def attr(span: ReadableSpan, key: str) -> Any:
    assert span.attributes is not None
    return span.attributes.get(key)


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def event_names(span: ReadableSpan) -> list[str]:
    return [e.name for e in span.events]


def span_event(span: ReadableSpan, name: str) -> dict[str, Any]:
    [found] = [e for e in span.events if e.name == name]
    return dict(found.attributes or {})


class FailsFirst:
    """A handler that raises ValueError on its first *failures* calls, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self, event: Event) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ValueError(f"failure {self.calls}")


@dataclass(frozen=True)
class OrderCreated:
    event_name: ClassVar[str] = "order:created"
    order_id: int


# -- producer spans ----------------------------------------------------------------------------


def test_emit_makes_one_producer_span_named_after_the_event(traced, telemetry):
    """Each emit() is one span "<name> publish" of kind PRODUCER."""
    bus, _ = traced
    bus.emit("order:created", {"id": 1})
    bus.emit("order:shipped", {"id": 1})
    assert [(s.name, s.kind) for s in telemetry.producers()] == [
        ("order:created publish", SpanKind.PRODUCER),
        ("order:shipped publish", SpanKind.PRODUCER),
    ]


def test_producer_span_has_the_messaging_attributes(traced, telemetry):
    """The producer span says system eventbus, operation send, the event name and its id."""
    bus, _ = traced
    event = bus.emit("order:created", {"id": 1})
    [span] = telemetry.producers()
    assert dict(span.attributes or {}) == {
        "messaging.system": "eventbus",
        "messaging.operation.type": "send",
        "messaging.destination.name": "order:created",
        "messaging.message.id": event.id,
    }


def test_typed_event_producer_span_uses_its_event_name(traced, telemetry):
    """Emitting a typed event names the span after its class's event_name."""
    bus, _ = traced
    bus.emit(OrderCreated(order_id=1))
    [span] = telemetry.producers()
    assert (span.name, attr(span, "messaging.destination.name")) == (
        "order:created publish",
        "order:created",
    )


def test_producer_span_is_a_child_of_the_callers_current_span(traced, telemetry):
    """emit() under the caller's span makes the producer span its child, in its trace."""
    bus, _ = traced
    with telemetry.tracer.start_as_current_span("POST /orders") as request:
        bus.emit("order:created", {"id": 1})
    [span] = telemetry.producers()
    assert span.context.trace_id == request.get_span_context().trace_id
    assert parent_id(span) == request.get_span_context().span_id


def test_emit_without_a_current_span_starts_a_trace(traced, telemetry):
    """With no span current, the producer span is a root span."""
    bus, _ = traced
    bus.emit("order:created")
    [span] = telemetry.producers()
    assert span.parent is None


def test_emit_carries_the_producer_span_context_in_the_metadata(traced, telemetry):
    """The metadata gets the producer span's traceparent, beside the caller's own keys."""
    bus, _ = traced
    event = bus.emit("order:created", metadata={"request_id": "r-1"})
    [span] = telemetry.producers()
    context = span.get_span_context()
    assert event.metadata["request_id"] == "r-1"
    flags = int(context.trace_flags)
    assert event.metadata["traceparent"] == (
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"
    )


def test_emit_that_raises_ends_its_producer_span_with_the_error(traced, telemetry):
    """An emit() that raises ends its producer span with the exception and ERROR."""
    bus, _ = traced
    with pytest.raises(ValueError, match="invalid event name"):
        bus.emit("not a name!")
    [span] = telemetry.producers()
    assert span.status.status_code is StatusCode.ERROR
    assert event_names(span) == ["exception"]


# -- consumer (attempt) spans ------------------------------------------------------------------


def test_each_attempt_of_each_handler_is_one_consumer_span(traced, telemetry):
    """Each attempt of each handler is one CONSUMER span "<name> process"."""
    bus, clock = traced
    bus.subscribe("order:created", FailsFirst(0), name="email")
    bus.subscribe("order:created", FailsFirst(1), name="stock")
    bus.emit("order:created", {"id": 1})
    clock.advance(10)
    assert [
        (s.name, s.kind, attr(s, "eventbus.handler"), attr(s, "eventbus.attempt"))
        for s in telemetry.attempts()
    ] == [
        ("order:created process", SpanKind.CONSUMER, "email", 1),
        ("order:created process", SpanKind.CONSUMER, "stock", 1),
        ("order:created process", SpanKind.CONSUMER, "stock", 2),
    ]


def test_attempt_span_has_the_messaging_and_delivery_attributes(traced, telemetry):
    """The attempt span has the messaging attributes, the handler, attempt and outcome."""
    bus, _ = traced
    bus.subscribe("order:created", FailsFirst(0), name="email")
    event = bus.emit("order:created", {"id": 1})
    [span] = telemetry.attempts()
    assert dict(span.attributes or {}) == {
        "messaging.system": "eventbus",
        "messaging.operation.type": "process",
        "messaging.destination.name": "order:created",
        "messaging.message.id": event.id,
        "eventbus.handler": "email",
        "eventbus.attempt": 1,
        "eventbus.outcome": "succeeded",
    }


def test_attempt_outcomes_are_retrying_then_dead(traced, telemetry):
    """A handler that always fails: its attempts' outcomes are retrying, retrying, dead."""
    bus, clock = traced
    bus.subscribe("order:created", FailsFirst(99), name="stock")
    bus.emit("order:created")
    clock.advance(10)
    clock.advance(10)
    assert [attr(s, "eventbus.outcome") for s in telemetry.attempts()] == [
        "retrying",
        "retrying",
        "dead",
    ]


def test_attempt_span_is_a_child_of_the_producer_span(traced, telemetry):
    """Every attempt span's parent is the emit's producer span."""
    bus, clock = traced
    bus.subscribe("order:created", FailsFirst(0), name="email")
    bus.subscribe("order:created", FailsFirst(1), name="stock")
    with telemetry.tracer.start_as_current_span("POST /orders"):
        bus.emit("order:created")
    clock.advance(10)
    [producer] = telemetry.producers()
    assert [parent_id(s) for s in telemetry.attempts()] == [producer.context.span_id] * 3


def test_producer_and_all_attempts_share_one_trace(traced, telemetry):
    """The caller's span, the producer span and every attempt (retries too) share one trace."""
    bus, clock = traced
    bus.subscribe("order:created", FailsFirst(2), name="stock")
    with telemetry.tracer.start_as_current_span("POST /orders"):
        bus.emit("order:created")
    clock.advance(10)
    clock.advance(10)
    assert len(telemetry.attempts()) == 3
    assert {s.context.trace_id for s in telemetry.spans()} == {
        telemetry.named("POST /orders").context.trace_id
    }


def test_handlers_own_span_nests_under_its_attempt_span(traced, telemetry):
    """A span the handler starts is a child of its attempt span (current meanwhile)."""
    bus, _ = traced

    @bus.on("order:created")
    def send_email(event: Event) -> None:
        with telemetry.tracer.start_as_current_span("smtp send"):
            pass

    bus.emit("order:created")
    [attempt] = telemetry.attempts()
    assert parent_id(telemetry.named("smtp send")) == attempt.context.span_id


def test_handler_on_a_worker_thread_sees_its_attempt_span_current(telemetry, buses):
    """On a worker pool too, the handler's own span is a child of its attempt span."""
    bus = telemetry.instrument(EventBus(max_workers=2))
    buses.append(bus)

    @bus.on("order:created")
    def send_email(event: Event) -> None:
        with telemetry.tracer.start_as_current_span("smtp send"):
            pass

    with telemetry.tracer.start_as_current_span("POST /orders"):
        bus.emit("order:created")
    assert bus.drain(timeout=10)
    [producer] = telemetry.producers()
    [attempt] = telemetry.attempts()
    assert parent_id(attempt) == producer.context.span_id
    assert parent_id(telemetry.named("smtp send")) == attempt.context.span_id


def test_emit_from_a_handler_makes_a_producer_span_under_its_attempt(traced, telemetry):
    """An emit() in a handler is a producer span under its attempt, in the same trace."""
    bus, _ = traced
    bus.subscribe("order:created", lambda e: bus.emit("invoice:due"), name="bill")
    bus.subscribe("invoice:due", FailsFirst(0), name="remind")
    bus.emit("order:created")
    bill = telemetry.named("order:created process")
    due = telemetry.named("invoice:due publish")
    remind = telemetry.named("invoice:due process")
    assert parent_id(due) == bill.context.span_id
    assert parent_id(remind) == due.context.span_id
    assert len({s.context.trace_id for s in telemetry.spans()}) == 1


def test_successful_attempt_has_unset_status_and_no_events(traced, telemetry):
    """A successful attempt's span has no events and an unset status."""
    bus, _ = traced
    bus.subscribe("order:created", FailsFirst(0), name="email")
    bus.emit("order:created")
    [span] = telemetry.attempts()
    assert (span.status.status_code, span.events) == (StatusCode.UNSET, ())


def test_failed_attempt_records_the_exception_and_error_status(traced, telemetry):
    """A failed attempt's span has an "exception" event for the error and ERROR status."""
    bus, _ = traced
    bus.subscribe("order:created", FailsFirst(1), name="stock")
    bus.emit("order:created")
    [span] = telemetry.attempts()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError: failure 1"
    exception = span_event(span, "exception")
    assert (exception["exception.type"], exception["exception.message"]) == (
        "ValueError",
        "failure 1",
    )


def test_retried_attempt_has_a_retry_scheduled_event_with_its_delay(traced, telemetry):
    """A retried attempt has an eventbus.retry_scheduled event with the backoff in seconds."""
    bus, _ = traced
    bus.subscribe("order:created", FailsFirst(1), name="stock")
    bus.emit("order:created")
    [span] = telemetry.attempts()
    assert event_names(span) == ["exception", "eventbus.retry_scheduled"]
    assert span_event(span, "eventbus.retry_scheduled") == {"eventbus.delay": 10.0}


def test_last_attempt_has_a_dead_lettered_event(telemetry, buses):
    """The attempt that makes a dead letter has an eventbus.dead_lettered event describing it."""
    bus, clock = inline_bus(retry=TWO_ATTEMPTS_10S)
    buses.append(telemetry.instrument(bus))
    bus.subscribe("order:created", FailsFirst(99), name="stock")
    bus.emit("order:created")
    clock.advance(10)
    first, last = telemetry.attempts()
    [dead] = bus.dead_letters()
    assert event_names(first) == ["exception", "eventbus.retry_scheduled"]
    assert event_names(last) == ["exception", "eventbus.dead_lettered"]
    assert span_event(last, "eventbus.dead_lettered") == {
        "eventbus.handler": "stock",
        "eventbus.dead_letter.id": dead.id,
        "eventbus.dead_letter.reason": "exhausted",
        "eventbus.attempts": 2,
    }
    assert last.status.status_code is StatusCode.ERROR


def test_replayed_dead_letter_runs_in_a_new_attempt_span_of_the_same_trace(telemetry, buses):
    """replay() runs a new attempt span (attempt 1) under the original producer span."""
    bus, _ = inline_bus(retry=ONE_ATTEMPT)
    buses.append(telemetry.instrument(bus))
    handler = bus.subscribe("order:created", FailsFirst(1), name="stock")
    with telemetry.tracer.start_as_current_span("POST /orders"):
        bus.emit("order:created")
    [dead] = bus.dead_letters()
    bus.replay(dead)
    assert handler.calls == 2
    [producer] = telemetry.producers()
    failed, replayed = telemetry.spans(SpanKind.CONSUMER)
    assert replayed.context.span_id != failed.context.span_id
    assert (attr(replayed, "eventbus.attempt"), attr(replayed, "eventbus.outcome")) == (
        1,
        "succeeded",
    )
    assert parent_id(replayed) == producer.context.span_id
    assert replayed.context.trace_id == producer.context.trace_id


def test_dead_letter_made_by_close_is_a_span_of_its_own_in_the_events_trace(telemetry):
    """A letter abandoned by close() is an ERROR "<name> dead_letter" span in the event's trace."""
    bus, _ = inline_bus(retry=THREE_ATTEMPTS_10S)
    telemetry.instrument(bus)
    bus.subscribe("order:created", FailsFirst(99), name="stock")
    bus.emit("order:created")
    bus.close()
    [producer] = telemetry.producers()
    dead = telemetry.named("order:created dead_letter")
    assert dead.context.trace_id == producer.context.trace_id
    assert parent_id(dead) == producer.context.span_id
    assert dead.status.status_code is StatusCode.ERROR
    assert (attr(dead, "eventbus.handler"), attr(dead, "eventbus.dead_letter.reason")) == (
        "stock",
        "abandoned",
    )


def test_dead_letter_made_by_close_under_another_span_stays_in_the_events_trace(telemetry):
    """close() under an unrelated span: the abandoned letter still goes to the event's trace."""
    bus, _ = inline_bus(retry=THREE_ATTEMPTS_10S)
    telemetry.instrument(bus)
    bus.subscribe("order:created", FailsFirst(99), name="stock")
    bus.emit("order:created")
    with telemetry.tracer.start_as_current_span("shutdown"):
        bus.close()
    assert event_names(telemetry.named("shutdown")) == []
    [producer] = telemetry.producers()
    assert telemetry.named("order:created dead_letter").context.trace_id == (
        producer.context.trace_id
    )


def time_out_on_a_worker_thread(telemetry, buses) -> EventBus:
    """An instrumented bus whose one thread handler ran past its 1 s timeout (on a fake clock)
    with a single attempt allowed; drained."""
    clock = FakeClock()
    bus = telemetry.instrument(EventBus(max_workers=2, clock=clock, retry=ONE_ATTEMPT))
    buses.append(bus)
    release, started = threading.Event(), threading.Event()

    @bus.on("order:created", timeout=1, name="slow")
    def slow(event: Event) -> None:
        started.set()
        release.wait(10)

    bus.emit("order:created")
    assert started.wait(10)
    clock.advance(2)
    release.set()
    assert bus.drain(timeout=10)
    return bus


def test_handler_timeout_on_a_worker_thread_fails_its_attempt(telemetry, buses):
    """A thread handler past its timeout is a dead letter on an instrumented bus."""
    bus = time_out_on_a_worker_thread(telemetry, buses)
    [dead] = bus.dead_letters()
    assert "HandlerTimeoutError" in dead.error


def test_handler_timeout_on_a_worker_thread_is_recorded_on_its_attempt(telemetry, buses):
    """A thread handler's timeout is on its attempt span (error, outcome dead) and counted."""
    bus = time_out_on_a_worker_thread(telemetry, buses)
    bus.close(timeout=10)
    [span] = telemetry.attempts()
    assert attr(span, "eventbus.outcome") == "dead"
    assert span.status.status_code is StatusCode.ERROR
    assert event_names(span)[0] == "exception"
    assert sum(p.value for p in telemetry.points("eventbus.deliveries").values()) == 1


@pytest.mark.parametrize("kind", ["no store", "sqlite"])
def test_async_attempt_cancelled_by_close_is_counted_with_its_outcome(telemetry, tmp_path, kind):
    """An async attempt cancelled by close() has an outcome (dead, or left) and is counted."""
    from eventbus.stores import SQLiteStore

    store = SQLiteStore(tmp_path / "events.db") if kind == "sqlite" else None
    bus = telemetry.instrument(EventBus(store=store, max_workers=1, retry=ONE_ATTEMPT))
    started = threading.Event()

    @bus.on("order:created", name="stuck")
    async def stuck(event: Event) -> None:
        started.set()
        await asyncio.Event().wait()

    bus.emit("order:created")
    assert started.wait(10)
    bus.close(timeout=0.1)  # a bound on close(), not a wait for work: the handler never ends
    outcome = "left" if store is not None else "dead"
    [span] = telemetry.attempts()
    assert attr(span, "eventbus.outcome") == outcome
    assert deliveries(telemetry) == {("stuck", outcome): 1}


# -- asyncio -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_aemit_and_an_async_handler_give_the_same_span_shape(telemetry):
    """aemit() and an async handler: caller > producer > attempt > handler's own span."""
    bus = telemetry.instrument(EventBus(max_workers=2, retry=ONE_ATTEMPT))

    @bus.on("order:created", name="confirm")
    async def confirm(event: Event) -> None:
        await asyncio.sleep(0)
        with telemetry.tracer.start_as_current_span("smtp send"):
            await asyncio.sleep(0)

    async with bus:
        with telemetry.tracer.start_as_current_span("POST /orders") as request:
            event = await bus.aemit("order:created", {"id": 1})
        assert await bus.adrain(timeout=10)
    [producer] = telemetry.producers()
    [attempt] = telemetry.attempts()
    assert parent_id(producer) == request.get_span_context().span_id
    assert attr(producer, "messaging.message.id") == event.id
    assert parent_id(attempt) == producer.context.span_id
    assert (attr(attempt, "eventbus.handler"), attr(attempt, "eventbus.outcome")) == (
        "confirm",
        "succeeded",
    )
    assert parent_id(telemetry.named("smtp send")) == attempt.context.span_id
    assert {s.context.trace_id for s in telemetry.spans()} == {request.get_span_context().trace_id}


@pytest.mark.anyio
async def test_failing_async_handler_records_the_exception_and_retry(telemetry):
    """An async handler's failure and retry are on its attempt spans, under one producer."""
    clock = FakeClock()
    bus = telemetry.instrument(EventBus(max_workers=2, clock=clock, retry=TWO_ATTEMPTS_10S))
    loop = asyncio.get_running_loop()
    scheduled, retried = asyncio.Event(), asyncio.Event()
    calls = 0

    @bus.on("order:created", name="confirm")
    async def confirm(event: Event) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("smtp down")
        retried.set()

    def on_retry(sender: object, **kwargs: Any) -> None:
        loop.call_soon_threadsafe(scheduled.set)

    signals.retry_scheduled.connect(on_retry, sender=bus, weak=False)
    async with bus:
        await bus.aemit("order:created")
        await asyncio.wait_for(scheduled.wait(), 10)
        clock.advance(10)
        await asyncio.wait_for(retried.wait(), 10)
        assert await bus.adrain(timeout=10)
    signals.retry_scheduled.disconnect(on_retry, sender=bus)
    [producer] = telemetry.producers()
    first, second = telemetry.attempts()
    assert event_names(first) == ["exception", "eventbus.retry_scheduled"]
    assert first.status.status_code is StatusCode.ERROR
    assert attr(second, "eventbus.outcome") == "succeeded"
    assert {parent_id(first), parent_id(second)} == {producer.context.span_id}


# -- metrics -----------------------------------------------------------------------------------


def deliveries(telemetry: Telemetry) -> dict[tuple[str, str], int]:
    """eventbus.deliveries as (handler, outcome) -> count."""
    return {
        (dict(key)["eventbus.handler"], dict(key)["eventbus.outcome"]): point.value
        for key, point in telemetry.points("eventbus.deliveries").items()
    }


def test_deliveries_counter_counts_attempts_by_handler_and_outcome(traced, telemetry):
    """eventbus.deliveries counts each attempt by handler and outcome."""
    bus, clock = traced
    bus.subscribe("order:created", FailsFirst(0), name="email")
    bus.subscribe("order:created", FailsFirst(99), name="stock")
    bus.emit("order:created")
    bus.emit("order:created")
    clock.advance(10)
    clock.advance(10)
    assert deliveries(telemetry) == {
        ("email", "succeeded"): 2,
        ("stock", "retrying"): 4,
        ("stock", "dead"): 2,
    }


def test_duration_histogram_has_one_measurement_per_attempt(traced, telemetry):
    """messaging.process.duration (s) records each attempt once, by handler and outcome."""
    bus, clock = traced
    bus.subscribe("order:created", FailsFirst(0), name="email")
    bus.subscribe("order:created", FailsFirst(1), name="stock")
    bus.emit("order:created")
    clock.advance(10)
    metric = telemetry.metrics()["messaging.process.duration"]
    assert metric.unit == "s"
    counts = {
        (dict(k)["eventbus.handler"], dict(k)["eventbus.outcome"]): p.count
        for k, p in telemetry.points("messaging.process.duration").items()
    }
    assert counts == {
        ("email", "succeeded"): 1,
        ("stock", "retrying"): 1,
        ("stock", "succeeded"): 1,
    }
    assert sum(counts.values()) == len(telemetry.attempts())


def test_wait_histogram_is_recorded_for_first_attempts_only(traced, telemetry):
    """eventbus.delivery.wait records once per delivery (its first attempt), not per retry."""
    bus, clock = traced
    bus.subscribe("order:created", FailsFirst(0), name="email")
    bus.subscribe("order:created", FailsFirst(2), name="stock")
    bus.emit("order:created")
    clock.advance(10)
    clock.advance(10)
    assert len(telemetry.attempts()) == 4
    counts = {
        dict(k)["eventbus.handler"]: p.count
        for k, p in telemetry.points("eventbus.delivery.wait").items()
    }
    assert counts == {"email": 1, "stock": 1}


def test_wait_histogram_measures_from_emit_to_the_first_attempt(traced, telemetry):
    """A delayed emit's first attempt waited its delay (on the bus's clock)."""
    bus, clock = traced
    bus.subscribe("order:created", FailsFirst(0), name="email")
    bus.emit("order:created", delay=30)
    clock.advance(30)
    [point] = telemetry.points("eventbus.delivery.wait").values()
    assert (point.count, point.sum) == (1, 30.0)


def test_retrying_and_dead_letter_gauges_read_the_bus(traced, telemetry):
    """The retrying and dead_letters gauges read the bus when collected."""
    bus, clock = traced
    bus.subscribe("order:created", FailsFirst(99), name="stock")
    bus.emit("order:created")
    assert (
        telemetry.gauge("eventbus.deliveries.retrying"),
        telemetry.gauge("eventbus.dead_letters"),
    ) == (1, 0)
    clock.advance(10)
    clock.advance(10)
    assert (
        telemetry.gauge("eventbus.deliveries.retrying"),
        telemetry.gauge("eventbus.dead_letters"),
    ) == (0, 1)
    bus.purge_dead_letters()
    assert telemetry.gauge("eventbus.dead_letters") == 0


def test_active_gauge_counts_deliveries_queued_or_running(telemetry, buses):
    """eventbus.deliveries.active counts a running delivery and one queued behind it."""
    bus = telemetry.instrument(EventBus(max_workers=1))
    buses.append(bus)
    started, release = threading.Event(), threading.Event()

    @bus.on("order:created", name="slow")
    def slow(event: Event) -> None:
        started.set()
        release.wait(10)

    bus.emit("order:created")
    bus.emit("order:created")
    assert started.wait(10)
    try:
        assert telemetry.gauge("eventbus.deliveries.active") == 2
    finally:
        release.set()
    assert bus.drain(timeout=10)
    assert telemetry.gauge("eventbus.deliveries.active") == 0


def test_instruments_have_the_documented_kinds_and_units(traced, telemetry):
    """Each instrument's kind and unit are those of the table in docs/observability.md."""
    bus, _ = traced
    bus.subscribe("order:created", FailsFirst(0), name="email")
    bus.emit("order:created")
    kinds = {Sum: "counter", Histogram: "histogram", Gauge: "gauge"}
    measured = {
        name: (kinds[type(metric.data)], metric.unit)
        for name, metric in telemetry.metrics().items()
    }
    assert measured == documented_metrics()


def documented_metrics() -> dict[str, tuple[str, str]]:
    """The metrics table of docs/observability.md: name -> (kind, unit)."""
    rows: dict[str, tuple[str, str]] = {}
    for line in (DOCS / "observability.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if "|" in line else []
        if cells and re.fullmatch(r"`[\w.]+`", cells[0]) and len(cells) >= 3:
            kind, unit = cells[1], cells[2].strip("`")
            if kind in {"counter", "histogram", "gauge"}:
                rows[cells[0].strip("`")] = (kind, unit)
    assert rows, "docs/observability.md has no metrics table"
    return rows


def test_gauges_observe_every_bus_instrumented_with_one_meter_provider(telemetry, buses):
    """Two buses on one meter provider: the dead_letters gauge sees the second bus too, each
    bus's series apart under its name (eventbus.bus)."""
    first, _ = inline_bus(retry=ONE_ATTEMPT, name="first")
    second, _ = inline_bus(retry=ONE_ATTEMPT, name="second")
    buses.extend([telemetry.instrument(first), telemetry.instrument(second)])
    second.subscribe("order:created", FailsFirst(99), name="stock")
    second.emit("order:created")
    second.emit("order:created")
    assert sum(p.value for p in telemetry.points("eventbus.dead_letters").values()) == 2


def test_uninstrument_stops_the_gauges(traced, telemetry):
    """After uninstrument(), collections report no eventbus gauge for the bus."""
    bus, _ = traced
    uninstrument(bus)
    assert telemetry.points("eventbus.dead_letters") == {}


# -- instrument() and uninstrument() -----------------------------------------------------------


def test_uninstrument_stops_new_spans(traced, telemetry):
    """After uninstrument(), emits and attempts make no spans and count nothing."""
    bus, _ = traced
    bus.subscribe("order:created", FailsFirst(0), name="email")
    bus.emit("order:created")
    uninstrument(bus)
    event = bus.emit("order:created")
    assert len(telemetry.spans()) == 2
    assert "traceparent" not in event.metadata
    assert deliveries(telemetry) == {("email", "succeeded"): 1}


def test_uninstrument_stops_the_failure_events(traced, telemetry):
    """After uninstrument(), a failure adds no event to the caller's current span."""
    bus, _ = traced
    bus.subscribe("order:created", FailsFirst(99), name="stock")
    uninstrument(bus)
    with telemetry.tracer.start_as_current_span("POST /orders"):
        bus.emit("order:created")
    assert event_names(telemetry.named("POST /orders")) == []


def test_uninstrument_of_a_bus_never_instrumented_does_nothing(buses):
    """uninstrument() on a plain bus is a no-op; the bus still delivers."""
    bus, _ = inline_bus()
    buses.append(bus)
    uninstrument(bus)
    handler = bus.subscribe("order:created", FailsFirst(0), name="email")
    bus.emit("order:created")
    assert handler.calls == 1


def test_instrument_twice_makes_one_span_per_emit_and_attempt(traced, telemetry):
    """instrument() twice: one producer span, one attempt span, one count per attempt."""
    bus, _ = traced
    telemetry.instrument(bus)
    bus.subscribe("order:created", FailsFirst(1), name="stock")
    bus.emit("order:created")
    [producer] = telemetry.producers()
    [attempt] = telemetry.attempts()
    assert event_names(attempt) == ["exception", "eventbus.retry_scheduled"]
    assert parent_id(attempt) == producer.context.span_id
    assert deliveries(telemetry) == {("stock", "retrying"): 1}


def test_instrument_again_with_another_tracer_provider_moves_the_spans(traced, telemetry):
    """instrument() with other providers: new spans go to the new provider only."""
    bus, _ = traced
    other = Telemetry()
    try:
        other.instrument(bus)
        bus.emit("order:created")
        assert (len(telemetry.spans()), len(other.producers())) == (0, 1)
    finally:
        other.shutdown()


def test_a_bus_never_instrumented_adds_no_traceparent(telemetry, buses):
    """A plain bus, even under a current span, leaves the metadata as given."""
    bus, _ = inline_bus()
    buses.append(bus)
    with telemetry.tracer.start_as_current_span("POST /orders"):
        event = bus.emit("order:created", metadata={"request_id": "r-1"})
    assert dict(event.metadata) == {"request_id": "r-1"}


def test_instrumenting_one_bus_leaves_another_untraced(traced, telemetry, buses):
    """instrument() is per bus: another bus in the process makes no spans."""
    other, _ = inline_bus()
    buses.append(other)
    other.subscribe("order:created", FailsFirst(0), name="email")
    event = other.emit("order:created")
    assert telemetry.spans() == []
    assert "traceparent" not in event.metadata
