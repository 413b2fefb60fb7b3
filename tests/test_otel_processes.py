"""Traces that outlive the emitting bus: through an SQLite store across a close, a crash (a
SIGKILLed process) and recover(), through an outbox (an SQLite store relayed to a Redis
stream), and through a Redis stream or a RabbitMQ queue into another process.

The trace context travels as W3C ``traceparent`` in the event's metadata, so the attempt span
made by the bus that finally runs the delivery is a child of the producer span made by the bus
that emitted it, in the same trace.

Run as ``python -m tests.test_otel_processes crash PATH`` this module is the SIGKILL test's
child (:func:`emit_then_hang`). Run as ``python -m tests.test_otel_processes --kind
redis|rabbitmq --url URL --name STREAM_OR_EXCHANGE --group GROUP`` it is the child process of
the Redis and RabbitMQ tests: a consumer on an instrumented bus with a tracer provider of its
own (in-memory exporter). It speaks the line protocol of tests/support/children.py:
``consumer <name>``, ``recovered <n>``, ``ready``, then ``handled <event id>`` after each
successful call; on ``stop`` it closes its bus, prints each finished span as ``span <json>``
(name, kind, trace id, span id, parent span id, attributes) and ``done``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tenacity
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from eventbus import Event, EventBus, RetryPolicy
from eventbus.otel import instrument
from eventbus.stores import SQLiteStore
from eventbus.testing import FakeClock, InlineExecutor
from tests.support.children import Children, consume_until_stop, log_to_stderr, out
from tests.support.executors import QueueingExecutor

RETRY_IN_10S = RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(10))


def tracer_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


#: The ``tracing`` fixture: a tracer provider and its in-memory exporter.
Tracing = tuple[TracerProvider, InMemorySpanExporter]


@pytest.fixture
def tracing() -> Iterator[Tracing]:
    provider, exporter = tracer_provider()
    yield provider, exporter
    provider.shutdown()


def of_kind(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is kind]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


class Restarts:
    """Buses on one SQLite file, each with its own SQLiteStore, instrumented with one tracer
    provider (a process and its restart); all closed at teardown."""

    def __init__(self, path: Path, provider: TracerProvider) -> None:
        self.path = path
        self.provider = provider
        self._buses: list[EventBus] = []
        self._stores: list[SQLiteStore] = []

    def bus(self, **options: Any) -> EventBus:
        options.setdefault("executor", InlineExecutor())
        options.setdefault("clock", FakeClock())
        options.setdefault("retry", RETRY_IN_10S)
        bus = EventBus(store=SQLiteStore(self.path), **options)
        self._buses.append(bus)
        instrument(bus, tracer_provider=self.provider)
        return bus

    def store(self) -> SQLiteStore:
        """A store on the file, outside any bus (opened)."""
        store = SQLiteStore(self.path)
        store.open()
        self._stores.append(store)
        return store

    def close(self) -> None:
        for bus in self._buses:
            bus.close(timeout=0)
        for store in self._stores:
            store.close()


@pytest.fixture
def restarts(tmp_path: Path, tracing: Tracing) -> Iterator[Restarts]:
    made = Restarts(tmp_path / "events.db", tracing[0])
    yield made
    made.close()


def calls(into: list[str]) -> Any:
    def handler(event: Event) -> None:
        into.append(event.id)

    return handler


# -- through an SQLite store -------------------------------------------------------------------


def test_delivery_left_pending_by_a_closed_bus_runs_in_the_emits_trace(
    restarts: Restarts, tracing: Tracing
) -> None:
    """A delivery left by close() runs after recover() as a child of the producer span."""
    _, exporter = tracing
    tracer = restarts.provider.get_tracer("tests")
    first = restarts.bus(executor=QueueingExecutor())  # holds the job: the handler never runs
    first.subscribe("order:created", calls([]), name="fulfil")
    with tracer.start_as_current_span("POST /orders") as request:
        event = first.emit("order:created", {"id": 1})
    first.close(timeout=0)
    assert of_kind(exporter, SpanKind.CONSUMER) == []

    ran: list[str] = []
    again = restarts.bus()
    again.subscribe("order:created", calls(ran), name="fulfil")
    assert again.recover() == 1
    assert ran == [event.id]
    [producer] = of_kind(exporter, SpanKind.PRODUCER)
    [attempt] = of_kind(exporter, SpanKind.CONSUMER)
    assert producer.context.trace_id == request.get_span_context().trace_id
    assert attempt.context.trace_id == producer.context.trace_id
    assert parent_id(attempt) == producer.context.span_id
    assert attempt.attributes is not None
    assert (attempt.attributes["eventbus.attempt"], attempt.attributes["eventbus.outcome"]) == (
        1,
        "succeeded",
    )


def test_delivery_interrupted_by_a_crash_is_retried_in_the_emits_trace(
    restarts: Restarts, tracing: Tracing
) -> None:
    """A delivery a crash interrupted is retried after recover() under the producer span."""
    _, exporter = tracing
    tracer = restarts.provider.get_tracer("tests")
    first = restarts.bus(executor=QueueingExecutor())
    first.subscribe("order:created", calls([]), name="fulfil")
    with tracer.start_as_current_span("POST /orders"):
        event = first.emit("order:created", {"id": 1})
    first.close(timeout=0)
    restarts.store().started(event.id, "fulfil", 1)  # attempt 1 began, then the process died

    ran: list[str] = []
    again = restarts.bus()
    again.subscribe("order:created", calls(ran), name="fulfil")
    assert again.recover() == 1
    assert ran == [event.id]
    [producer] = of_kind(exporter, SpanKind.PRODUCER)
    [attempt] = of_kind(exporter, SpanKind.CONSUMER)
    assert (attempt.context.trace_id, parent_id(attempt)) == (
        producer.context.trace_id,
        producer.context.span_id,
    )
    assert attempt.attributes is not None
    assert attempt.attributes["eventbus.attempt"] == 2


@pytest.mark.multiprocess
def test_delivery_cut_off_by_sigkill_is_retried_in_the_emits_trace(
    restarts: Restarts, tracing: Tracing, children: Children
) -> None:
    """A child process emits under a span of its own and is SIGKILLed while its handler runs;
    the attempt that recover() makes here is a child of the dead process's producer span."""
    _, exporter = tracing
    child = children.start(
        [sys.executable, "-m", "tests.test_otel_processes", "crash", str(restarts.path)],
        name="crashing",
    )
    event_id, trace_id, producer_id = child.expect("emitted ").split()
    child.kill()

    ran: list[str] = []
    again = restarts.bus()
    again.subscribe("order:created", calls(ran), name="fulfil")
    assert again.recover() == 1
    assert ran == [event_id]
    [attempt] = of_kind(exporter, SpanKind.CONSUMER)
    assert (f"{attempt.context.trace_id:032x}", f"{parent_id(attempt):016x}") == (
        trace_id,
        producer_id,
    )
    assert attempt.attributes is not None
    assert (attempt.attributes["eventbus.attempt"], attempt.attributes["eventbus.outcome"]) == (
        2,
        "succeeded",
    )


def test_retry_left_in_the_store_runs_in_the_emits_trace(
    restarts: Restarts, tracing: Tracing
) -> None:
    """A retry left in the store by close() runs after recover() under the producer span."""
    _, exporter = tracing
    tracer = restarts.provider.get_tracer("tests")
    first = restarts.bus()

    def fails(event: Event) -> None:
        raise ConnectionError("warehouse down")

    first.subscribe("order:created", fails, name="fulfil")
    with tracer.start_as_current_span("POST /orders"):
        first.emit("order:created", {"id": 1})
    first.close()

    clock = FakeClock()
    ran: list[str] = []
    again = restarts.bus(clock=clock)
    again.subscribe("order:created", calls(ran), name="fulfil")
    assert again.recover() == 1
    clock.advance(11)
    assert len(ran) == 1
    [producer] = of_kind(exporter, SpanKind.PRODUCER)
    attempts = of_kind(exporter, SpanKind.CONSUMER)
    assert [
        (a.attributes["eventbus.attempt"], a.attributes["eventbus.outcome"])
        for a in attempts
        if a.attributes is not None
    ] == [(1, "retrying"), (2, "succeeded")]
    assert {(a.context.trace_id, parent_id(a)) for a in attempts} == {
        (producer.context.trace_id, producer.context.span_id)
    }


# -- through an outbox: an SQLite store relayed to a Redis stream -----------------------------


@pytest.mark.integration
def test_attempt_after_an_outbox_relay_is_a_child_of_the_producer_span(
    redis_url: str, tmp_path: Path, tracing: Tracing
) -> None:
    """An event committed to an outbox and relayed to a Redis stream keeps the emit's trace:
    the consumer's attempt is a child of the producer span."""
    from eventbus.transports import RedisStreamsTransport  # the redis extra

    provider, exporter = tracing
    stream, group = f"otel-outbox-{uuid.uuid4().hex}", "fulfilment"

    def transport() -> RedisStreamsTransport:
        return RedisStreamsTransport(redis_url, stream=stream, group=group, block=0.05)

    handled: list[str] = []
    got = threading.Event()

    def fulfil(event: Event) -> None:
        handled.append(event.id)
        got.set()

    consumer = EventBus(transport=transport(), max_workers=2)
    producer_bus = EventBus(store=SQLiteStore(tmp_path / "outbox.db"), transport=transport())
    try:
        instrument(consumer, tracer_provider=provider)
        instrument(producer_bus, tracer_provider=provider)
        consumer.subscribe("order:created", fulfil, name="fulfil")
        consumer.start()
        with provider.get_tracer("tests").start_as_current_span("POST /orders") as request:
            event = producer_bus.emit("order:created", {"id": 1})
        assert producer_bus.drain(10)  # relayed to the stream
        assert got.wait(10), "the consumer never got the relayed event"
    finally:
        producer_bus.close(timeout=10)
        consumer.close(timeout=10)  # lets the attempt finish, and its span end

    assert handled == [event.id]
    [producer] = of_kind(exporter, SpanKind.PRODUCER)
    assert producer.context.trace_id == request.get_span_context().trace_id
    assert parent_id(producer) == request.get_span_context().span_id
    [attempt] = of_kind(exporter, SpanKind.CONSUMER)
    assert (attempt.context.trace_id, parent_id(attempt)) == (
        producer.context.trace_id,
        producer.context.span_id,
    )
    assert attempt.attributes is not None
    assert attempt.attributes["messaging.message.id"] == event.id
    assert (attempt.attributes["eventbus.attempt"], attempt.attributes["eventbus.outcome"]) == (
        1,
        "succeeded",
    )


# -- through a Redis stream or a RabbitMQ queue, into another process --------------------------


def make_transport(kind: str, url: str, name: str, group: str) -> Any:
    """A transport of *kind* (``redis``: the stream *name*; ``rabbitmq``: the exchange *name*)
    for *group*: the parent's producer and the child's consumer are made here alike."""
    if kind == "redis":
        from eventbus.transports import RedisStreamsTransport  # the redis extra

        return RedisStreamsTransport(url, stream=name, group=group, block=0.05)
    if kind == "rabbitmq":
        from eventbus.transports import RabbitMQTransport  # the rabbitmq extra

        return RabbitMQTransport(url, exchange=name, group=group)
    raise ValueError(f"unknown transport kind {kind!r}")


@pytest.mark.integration
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_attempt_in_another_process_is_a_child_of_the_producer_span(
    kind: str, request: pytest.FixtureRequest, children: Children, tracing: Tracing
) -> None:
    """A child process's attempts on a Redis stream or a RabbitMQ queue are children of this
    process's producer span."""
    url: str = request.getfixturevalue(f"{kind}_url")
    provider, exporter = tracing
    name, group = f"otel-{uuid.uuid4().hex}", f"fulfilment-{uuid.uuid4().hex[:8]}"
    child = children.start(
        [
            sys.executable,
            "-m",
            "tests.test_otel_processes",
            "--kind",
            kind,
            "--url",
            url,
            "--name",
            name,
            "--group",
            group,
        ],
        name="consumer",
    )
    child.expect("ready")  # consuming: with RabbitMQ, the group's queue is bound by now

    producer_bus = EventBus(transport=make_transport(kind, url, name, group))
    try:
        instrument(producer_bus, tracer_provider=provider)
        with provider.get_tracer("tests").start_as_current_span("POST /orders") as request_span:
            event = producer_bus.emit("order:created", {"id": 1})
    finally:
        producer_bus.close(timeout=10)
    child.expect_line(lambda line: line == f"handled {event.id}", f"handled {event.id}")
    child.send("stop")
    spans: list[dict[str, Any]] = []
    while True:
        prefix, rest = child.expect_any("span ", "done")
        if prefix == "done":
            break
        spans.append(json.loads(rest))
    assert child.wait() == 0

    [producer] = of_kind(exporter, SpanKind.PRODUCER)
    assert producer.context.trace_id == request_span.get_span_context().trace_id
    attempts = sorted(
        (s for s in spans if s["kind"] == "CONSUMER"),
        key=lambda s: s["attributes"]["eventbus.attempt"],
    )
    assert [
        (a["attributes"]["eventbus.attempt"], a["attributes"]["eventbus.outcome"]) for a in attempts
    ] == [
        (1, "retrying"),
        (2, "succeeded"),
    ]
    expected = (f"{producer.context.trace_id:032x}", f"{producer.context.span_id:016x}")
    assert {(a["trace_id"], a["parent_span_id"]) for a in attempts} == {expected}
    assert {a["attributes"]["messaging.message.id"] for a in attempts} == {event.id}
    [work] = [s for s in spans if s["name"] == "reserve stock"]
    assert work["trace_id"] == expected[0]
    assert work["parent_span_id"] == attempts[-1]["span_id"]


# -- the child process -------------------------------------------------------------------------


def span_line(span: ReadableSpan) -> str:
    """*span* as the child prints it: ``span <json>``."""
    return "span " + json.dumps(
        {
            "name": span.name,
            "kind": span.kind.name,
            "trace_id": f"{span.context.trace_id:032x}",
            "span_id": f"{span.context.span_id:016x}",
            "parent_span_id": (f"{span.parent.span_id:016x}" if span.parent is not None else None),
            "attributes": dict(span.attributes or {}),
        }
    )


def consume(argv: list[str]) -> int:
    """The cross-process tests' child: consume ``order:created`` from a Redis stream or a
    RabbitMQ queue (``--kind``) with an instrumented bus whose handler fails its first call
    (retried at once) and starts a span of its own."""
    parser = argparse.ArgumentParser(description="a traced consumer for test_otel_processes")
    parser.add_argument("--kind", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True, help="the stream (redis) or exchange (rabbitmq)")
    parser.add_argument("--group", required=True)
    args = parser.parse_args(argv)
    log_to_stderr()
    provider, exporter = tracer_provider()
    tracer = provider.get_tracer("child")
    transport = make_transport(args.kind, args.url, args.name, args.group)
    bus = EventBus(
        transport=transport,
        max_workers=2,
        retry=RetryPolicy(max_attempts=2, wait=tenacity.wait_none()),
    )
    instrument(bus, tracer_provider=provider)
    calls = 0

    def fulfil(event: Event) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("warehouse down")
        with tracer.start_as_current_span("reserve stock"):
            pass
        out(f"handled {event.id}")

    bus.subscribe("order:created", fulfil, name="fulfil")
    consume_until_stop(bus, getattr(transport, "consumer", f"{args.kind}-{os.getpid()}"))
    bus.close(timeout=30)
    for span in exporter.get_finished_spans():
        out(span_line(span))
    provider.shutdown()
    out("done")
    return 0


def emit_then_hang(path: str) -> int:
    """The SIGKILL test's child: an instrumented bus on the SQLite store at *path* emits
    ``order:created`` under a ``POST /orders`` span; once its handler runs (and never returns)
    it prints ``emitted <event id> <trace id> <producer span id>`` and waits to be killed."""
    log_to_stderr()
    provider, exporter = tracer_provider()
    bus = EventBus(store=SQLiteStore(path), max_workers=1)
    instrument(bus, tracer_provider=provider)
    running, killed = threading.Event(), threading.Event()

    def fulfil(event: Event) -> None:
        running.set()
        killed.wait()  # never set: the test SIGKILLs this process

    bus.subscribe("order:created", fulfil, name="fulfil")
    with provider.get_tracer("child").start_as_current_span("POST /orders"):
        event = bus.emit("order:created", {"id": 1})
    running.wait()
    [producer] = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.PRODUCER]
    out(f"emitted {event.id} {producer.context.trace_id:032x} {producer.context.span_id:016x}")
    killed.wait()
    return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["crash"]:
        sys.exit(emit_then_hang(sys.argv[2]))
    sys.exit(consume(sys.argv[1:]))
