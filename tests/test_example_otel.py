"""The order-service example with tracing on (``demo --trace``, ``serve --trace``): one trace
per order, from the demo's "place order" step (or the HTTP request) through the emit to every
attempt of every handler, retries and dead letters included."""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from examples.order_service.__main__ import main
from examples.order_service.demo import demo_settings, run_demo
from examples.order_service.handlers import NOTIFY_WAREHOUSE, RESERVE_INVENTORY
from examples.order_service.tracing import SDK_MISSING, tracer_provider
from examples.order_service.web import create_app
from examples.order_service.wiring import Settings, build_app
from tests.support.children import run_order_service

ADA = {"email": "ada@example.com", "items": [{"sku": "KB-101", "quantity": 1}]}


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = tracer_provider(exporter)
    yield provider, exporter
    provider.shutdown()


def _attr(span: ReadableSpan, name: str) -> object:
    return (span.attributes or {}).get(name)


def test_demo_makes_one_trace_per_order(
    tmp_path: Path, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """Each order's "place order" span is the root of a trace holding the producer span and
    every attempt span of each of its events; retries and dead letters are in it."""
    provider, exporter = traced
    settings = demo_settings(
        db_path=tmp_path / "demo.sqlite3", outbox_dir=tmp_path / "outbox", latency=0, backoff=0
    )
    with build_app(settings, tracer_provider=provider) as app:
        result = run_demo(app, io.StringIO())
    assert result.drained
    spans = exporter.get_finished_spans()
    by_id = {span.context.span_id: span for span in spans}
    places = {_attr(s, "order.id"): s for s in spans if s.name == "place order"}
    assert set(places) == set(result.order_ids)
    assert len({s.context.trace_id for s in places.values()}) == len(result.order_ids)

    for order_id, place in places.items():
        trace_id = place.context.trace_id
        assert place.parent is None  # the root of the order's trace
        events = [e for e, o in result.order_of.items() if o == order_id]
        assert events
        for event_id in events:
            [producer] = [
                s
                for s in spans
                if s.name.endswith(" publish") and _attr(s, "messaging.message.id") == event_id
            ]
            attempts = [
                s
                for s in spans
                if s.name.endswith(" process") and _attr(s, "messaging.message.id") == event_id
            ]
            assert attempts
            assert {s.context.trace_id for s in [producer, *attempts]} == {trace_id}
            assert {s.parent.span_id for s in attempts if s.parent} == {producer.context.span_id}
            assert len(attempts) == sum(d.attempts for d in app.bus.status(event_id).values())
            # Its parent: the order's "place order" span, or the "ship order" span in its trace.
            assert producer.parent is not None
            assert by_id[producer.parent.span_id].name in {"place order", "ship order"}

    # The retried handler (Grace's hot stock row, Margaret's warehouse outage): 2+ attempt
    # spans in the order's trace, the failed ones with a retry scheduled.
    grace, margaret = result.order_ids[1], result.order_ids[3]
    for order_id, handler in ((grace, RESERVE_INVENTORY), (margaret, NOTIFY_WAREHOUSE)):
        tries = sorted(
            (
                s
                for s in spans
                if s.context.trace_id == places[order_id].context.trace_id
                and _attr(s, "eventbus.handler") == handler
            ),
            key=lambda s: _attr(s, "eventbus.attempt"),  # type: ignore[arg-type,return-value]
        )
        assert len(tries) >= 2
        assert all("eventbus.retry_scheduled" in [e.name for e in s.events] for s in tries[:-1])

    # Each dead-lettered delivery's last attempt carries the eventbus.dead_lettered event.
    assert len(result.dead_letters) == 2
    for dead in result.dead_letters:
        tries = [
            s
            for s in spans
            if _attr(s, "messaging.message.id") == dead.event.id
            and _attr(s, "eventbus.handler") == dead.handler
        ]
        assert len(tries) == dead.attempts
        last = max(tries, key=lambda s: _attr(s, "eventbus.attempt"))  # type: ignore[arg-type,return-value]
        assert _attr(last, "eventbus.outcome") == "dead"
        [event] = [e for e in last.events if e.name == "eventbus.dead_lettered"]
        assert (event.attributes or {})["eventbus.dead_letter.id"] == dead.id
        assert last.context.trace_id == places[result.order_of[dead.event.id]].context.trace_id
        others = [s for s in tries if s is not last]
        assert not any(e.name == "eventbus.dead_lettered" for s in others for e in s.events)


def test_a_traced_request_is_the_root_of_its_events_trace(
    tmp_path: Path, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """serve --trace: each HTTP request is a SERVER span, parent of the emit's span, whose
    attempts are in the same trace."""
    provider, exporter = traced
    settings = Settings(
        db_path=tmp_path / "orders.sqlite3", outbox_dir=tmp_path / "outbox", latency=0
    )
    with build_app(settings, tracer_provider=provider) as app:
        response = create_app(app).test_client().post("/api/orders", json=ADA)
        assert response.status_code == 201
        assert app.bus.drain(timeout=10)
    spans = exporter.get_finished_spans()
    [request] = [s for s in spans if s.name == "POST /api/orders"]
    assert request.parent is None
    assert _attr(request, "http.response.status_code") == 201
    [producer] = [s for s in spans if s.name == "order:created publish"]
    assert producer.parent is not None
    assert producer.parent.span_id == request.context.span_id
    attempts = [s for s in spans if s.name == "order:created process"]
    assert len(attempts) == 5  # one per handler of order:created, none failing
    assert {s.context.trace_id for s in spans} == {request.context.trace_id}


def test_untraced_app_makes_no_spans(
    tmp_path: Path, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """Without a tracer provider the app's bus is not instrumented and the demo opens none."""
    settings = demo_settings(db_path=":memory:", outbox_dir=tmp_path / "outbox", latency=0)
    with build_app(settings) as app:
        assert app.tracer_provider is None
        event = app.orders.create_order(ADA).event
        assert "traceparent" not in event.metadata


def test_trace_without_the_sdk_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """demo --trace without opentelemetry-sdk: one line naming the package, exit 2."""
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace.export", None)
    assert main(["demo", "--trace"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [captured.err.strip()]
    assert captured.err.strip().endswith(f"demo: error: {SDK_MISSING}")
    assert "pip install opentelemetry-sdk" in captured.err


def test_demo_trace_command_prints_spans_to_stderr(tmp_path: Path) -> None:
    """`demo --trace` exits 0, prints the usual report on stdout, and console-exporter spans
    (JSON) on stderr: a "place order" root per order."""
    completed = run_order_service(
        "demo",
        "--trace",
        "--db",
        str(tmp_path / "demo.sqlite3"),
        "--outbox",
        str(tmp_path / "outbox"),
        "--latency",
        "0",
        "--backoff",
        "0",
    )
    assert completed.returncode == 0, completed.stderr
    assert "Deliveries per handler" in completed.stdout
    assert '"trace_id"' not in completed.stdout
    # The console exporter writes each span as an indented JSON object, between log lines.
    blocks = re.findall(r"^\{\n.*?^\}$", completed.stderr, flags=re.MULTILINE | re.DOTALL)
    spans = [json.loads(block) for block in blocks]
    roots = [s for s in spans if s["name"] == "place order"]
    assert len(roots) == 4
    assert all(s["parent_id"] is None for s in roots)
    assert sum(s["name"] == "order:created process" for s in spans) == 24
