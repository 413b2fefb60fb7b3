"""Opt-in tracing (``demo --trace``, ``serve --trace``): one OpenTelemetry trace per order.

``eventbus.otel.instrument`` makes each ``emit()`` a producer span and each attempt of each
handler a consumer span, its child; this module adds the span they hang from: the demo's
``place order`` (and ``ship order``) step, or the HTTP request in ``web.py``. So an order's
trace runs from the request through its event to every attempt, retry and dead letter.

The demo's ``ship order`` span is put in the order's trace too (its parent is the order's
``place order`` span), so an order is one trace from placement to shipping.

Nothing here imports ``opentelemetry`` at module level: the example runs without it, and
only ``--trace`` (:func:`console_tracer_provider`) needs the SDK. Spans are written by the
SDK's ``ConsoleSpanExporter`` to stderr, with the log lines; the report stays on stdout.
Tests pass their own tracer provider (an in-memory exporter) to ``wiring.build_app``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, SpanContext, TracerProvider

    from eventbus import EventBus

__all__ = [
    "SDK_MISSING",
    "TracingUnavailableError",
    "console_tracer_provider",
    "instrument_bus",
    "span",
    "tracer_provider",
]

#: The one line ``--trace`` prints when the SDK is not installed.
SDK_MISSING = "--trace needs the OpenTelemetry SDK: pip install opentelemetry-sdk"
#: The instrumentation scope of the example's own spans.
SCOPE = "examples.order_service"


class TracingUnavailableError(Exception):
    """``opentelemetry-sdk`` (or ``opentelemetry-api``) is not installed."""


def tracer_provider(exporter: SpanExporter) -> SdkTracerProvider:
    """An SDK tracer provider exporting each span to *exporter* as it ends (a
    ``SimpleSpanProcessor``: nothing is lost when the command stops)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = SdkTracerProvider(resource=Resource.create({"service.name": "order-service"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def console_tracer_provider(out: TextIO | None = None) -> SdkTracerProvider:
    """What ``--trace`` uses: spans as JSON on *out* (default ``sys.stderr``). Raises
    :class:`TracingUnavailableError` when the SDK is not installed."""
    try:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
    except ImportError:
        raise TracingUnavailableError(SDK_MISSING) from None
    # Each span is one write() starting on a line of its own: structlog's print() writes a
    # log line and its newline apart, and a span (ended on another thread) may come between.
    exporter = ConsoleSpanExporter(
        out=out if out is not None else sys.stderr,
        formatter=lambda span: "\n" + span.to_json() + "\n",
    )
    return tracer_provider(exporter)


def instrument_bus(bus: EventBus, provider: TracerProvider) -> None:
    """Trace *bus* with *provider* (no metrics: the example exports none)."""
    from opentelemetry.metrics import NoOpMeterProvider

    from eventbus.otel import instrument

    instrument(bus, tracer_provider=provider, meter_provider=NoOpMeterProvider())


@contextlib.contextmanager
def span(
    provider: TracerProvider | None,
    name: str,
    *,
    parent: SpanContext | None = None,
    attributes: Mapping[str, str] | None = None,
) -> Iterator[Span | None]:
    """A span named *name*, current meanwhile (a child of *parent* if given, else of the
    current span); without a *provider* nothing at all (``None``)."""
    if provider is None:
        yield None
        return
    from opentelemetry import trace

    context = None
    if parent is not None:
        context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
    tracer = provider.get_tracer(SCOPE)
    with tracer.start_as_current_span(
        name, context=context, attributes=dict(attributes or {})
    ) as current:
        yield current
