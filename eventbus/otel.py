"""OpenTelemetry traces and metrics for a bus: ``instrument(bus)``.

The only module that imports ``opentelemetry`` (the ``otel`` extra: ``opentelemetry-api``;
the application brings the SDK and its exporters).

Traces follow OpenTelemetry's messaging conventions. Each ``emit()`` is a producer span,
``"<event name> publish"``, a child of the caller's current span; its context travels in the
event's metadata as W3C ``traceparent`` (and ``tracestate``), so it survives the durable
store, a crash and ``recover()``, a Redis stream or a RabbitMQ queue into another process. Each
delivery attempt is a consumer span, ``"<event name> process"``, whose parent is that context,
made current while the handler runs, so the handler's own spans (an HTTP call, a query) nest
under it. A failed attempt records its exception; a retry and a dead letter are events on the
attempt's span (a dead letter made outside an attempt, by ``close()`` or recovery, is a span of
its own in the event's trace); a replayed delivery's attempts join the same trace.

Metrics (instrument names and units):

* ``eventbus.deliveries`` (counter): attempts by handler and outcome (``succeeded``,
  ``retrying``, ``dead``, or ``left`` when a closing bus cancelled it and left the delivery
  to a store or stream).
* ``messaging.process.duration`` (histogram, s): attempt duration, by handler and outcome.
* ``eventbus.delivery.wait`` (histogram, s): from emit to the first attempt's start.
* ``eventbus.deliveries.active`` and ``eventbus.deliveries.retrying`` (gauges): deliveries
  queued or running, and waiting for their backoff, in this bus.
* ``eventbus.dead_letters`` (gauge): dead letters the bus (or its store) holds, read when the
  metrics are collected.

Every instrument carries the bus's name as ``eventbus.bus``, so buses sharing a meter
provider stay apart when their names differ (``EventBus(name=...)``).

With no instrumentation the bus pays nothing for it: the hooks are chosen when
:func:`instrument` is called, not tested on every delivery.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Mapping
from contextvars import Token
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from eventbus import signals
from eventbus._event import Event
from eventbus._registry import event_name_of

if TYPE_CHECKING:
    from eventbus._bus import EventBus

__all__ = ["instrument", "uninstrument"]

_SYSTEM = "eventbus"
_SCOPE = "eventbus"
#: A delivery's state after an attempt, as the attempt's outcome.
_OUTCOMES = {
    "pending": "retrying",
    "scheduled": "retrying",
    "retrying": "retrying",
    # Still running once its attempt ended: cancelled by a closing bus and left unfinished
    # to a store or stream (without one it is an abandoned dead letter: "dead").
    "running": "left",
}


def instrument(
    bus: EventBus,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
) -> None:
    """Trace and measure *bus* from now on, with the global providers unless others are
    given. Idempotent for one bus (a second call replaces the providers). Thread-safe; call it
    before emitting, typically right after building the bus."""
    uninstrument(bus)
    tracing = _Tracing(bus, tracer_provider, meter_provider)
    bus._set_tracing(tracing)


def uninstrument(bus: EventBus) -> None:
    """Stop tracing and measuring *bus* (deliveries already running finish their spans)."""
    current = bus._tracing
    if isinstance(current, _Tracing):
        current.disconnect()
    bus._set_tracing(None)


class _Produce:
    """One emit's producer span, as the bus sees it: a context manager (a class rather than
    a generator: this runs around every emit) that makes the span current."""

    __slots__ = ("span", "token")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.token: Token[otel_context.Context]  # set by __enter__

    def __enter__(self) -> _Produce:
        self.token = otel_context.attach(trace.set_span_in_context(self.span))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        otel_context.detach(self.token)
        if exc is not None:  # the emit was refused: the span says why
            self.span.record_exception(exc)
            self.span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        self.span.end()

    def inject(self, metadata: Mapping[str, str] | None) -> dict[str, str]:
        """*metadata* with this span's context added (``traceparent``)."""
        carrier = dict(metadata or {})
        propagate.inject(carrier)  # the span is current
        return carrier

    def sent(self, event: Event) -> None:
        self.span.update_name(f"{event.name} publish")
        self.span.set_attribute("messaging.destination.name", event.name)
        self.span.set_attribute("messaging.message.id", event.id)


class _Attempt:
    """One attempt's consumer span, as the bus sees it: a context manager (a class rather
    than a generator: this runs around every attempt) that makes the span current."""

    __slots__ = ("done", "handler", "key", "span", "started", "token", "tracing")

    def __init__(self, tracing: _Tracing, span: trace.Span, handler: str, key: Any) -> None:
        self.tracing = tracing
        self.span = span
        self.handler = handler
        self.key = key
        self.started = time.perf_counter()
        self.done = False
        self.token: Token[otel_context.Context]  # set by __enter__

    def __enter__(self) -> _Attempt:
        running = self.tracing.running
        with self.tracing.lock:
            running[self.key] = self
        self.token = otel_context.attach(trace.set_span_in_context(self.span))
        return self

    def __exit__(self, *exc_info: object) -> None:
        otel_context.detach(self.token)
        running = self.tracing.running
        with self.tracing.lock:
            if running.get(self.key) is self:
                del running[self.key]
        self.span.end()

    def ended(self, state: str) -> None:
        """The attempt is over and its delivery is now *state*. Once per attempt."""
        if self.done:
            return
        self.done = True
        # A failed attempt whose retry is due at once is pending again; one with a backoff
        # is retrying: both are the "retrying" outcome.
        outcome = _OUTCOMES.get(state, state)
        self.span.set_attribute("eventbus.outcome", outcome)
        tracing = self.tracing
        attributes = tracing.outcome_attributes(self.handler, outcome)
        tracing.deliveries.add(1, attributes)
        tracing.duration.record(time.perf_counter() - self.started, attributes)


class _Tracing:
    """What :func:`instrument` hands the bus: spans around emits and attempts, and metrics."""

    def __init__(
        self,
        bus: EventBus,
        tracer_provider: trace.TracerProvider | None,
        meter_provider: metrics.MeterProvider | None,
    ) -> None:
        self._bus = bus
        self.tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, meter_provider=meter_provider)
        self.deliveries = meter.create_counter(
            "eventbus.deliveries", unit="{attempt}", description="Attempts by outcome"
        )
        self.duration = meter.create_histogram(
            "messaging.process.duration", unit="s", description="Duration of one attempt"
        )
        self.wait = meter.create_histogram(
            "eventbus.delivery.wait", unit="s", description="From emit to the first attempt"
        )
        self.bus_attributes = {"eventbus.bus": bus._name}
        # Metric attributes per handler (and outcome), made once: they are the same for
        # every attempt. Unbounded only if handler names are, and they are the bus's own.
        self._handler_attributes: dict[str, dict[str, str]] = {}
        self._outcome_attributes: dict[tuple[str, str], dict[str, str]] = {}
        self.lock = threading.Lock()
        self.running: dict[tuple[str, str], _Attempt] = {}
        self._gauges = _gauges_for(meter_provider, meter)
        self._gauges.add(self)
        # Failures, retries and dead letters are told through the bus's signals, on the
        # thread (and in the context) of the attempt whose span is current.
        self._receivers: list[tuple[Any, Callable[..., None]]] = [
            (signals.handler_failed, self._failed),
            (signals.retry_scheduled, self._retry),
            (signals.dead_lettered, self._dead),
        ]
        for signal, receiver in self._receivers:
            signal.connect(receiver, sender=bus, weak=False)

    def disconnect(self) -> None:
        for signal, receiver in self._receivers:
            signal.disconnect(receiver, sender=self._bus)
        self._gauges.discard(self)

    def active(self) -> int:
        """Deliveries of the bus queued or running (a snapshot)."""
        return self._bus._counts()[0]

    def retrying(self) -> int:
        """Deliveries of the bus waiting for their backoff (a snapshot)."""
        return self._bus._counts()[1]

    def dead_letters(self) -> int | None:
        """Dead letters the bus (or its store) holds; ``None`` when the store cannot be
        read now."""
        try:
            return len(self._bus.dead_letters())
        except Exception:  # noqa: BLE001 - a store out of reach: no observation this time
            return None

    def handler_attributes(self, handler: str) -> dict[str, str]:
        attributes = self._handler_attributes.get(handler)
        if attributes is None:
            attributes = {**self.bus_attributes, "eventbus.handler": handler}
            self._handler_attributes[handler] = attributes
        return attributes

    def outcome_attributes(self, handler: str, outcome: str) -> dict[str, str]:
        attributes = self._outcome_attributes.get((handler, outcome))
        if attributes is None:
            attributes = {**self.handler_attributes(handler), "eventbus.outcome": outcome}
            self._outcome_attributes[handler, outcome] = attributes
        return attributes

    # -- the bus's hooks -----------------------------------------------------------------

    def produce(self, event: object) -> _Produce:
        """Around one emit: a producer span, current while the event is made and sent."""
        name = event if isinstance(event, str) else _name_of(event)
        attributes = {
            "messaging.system": _SYSTEM,
            "messaging.operation.type": "send",
            "messaging.destination.name": name,
        }
        return _Produce(
            self.tracer.start_span(f"{name} publish", kind=SpanKind.PRODUCER, attributes=attributes)
        )

    def attempt(self, event: Event, handler: str, attempt: int, waited: float | None) -> _Attempt:
        """Around one attempt: a consumer span in the event's trace, current meanwhile."""
        parent = propagate.extract(event.metadata)
        span = self.tracer.start_span(
            f"{event.name} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.operation.type": "process",
                "messaging.destination.name": event.name,
                "messaging.message.id": event.id,
                "eventbus.handler": handler,
                "eventbus.attempt": attempt,
            },
        )
        if waited is not None:
            self.wait.record(waited, self.handler_attributes(handler))
        return _Attempt(self, span, handler, (event.id, handler))

    # -- signal receivers ----------------------------------------------------------------

    def _span_of(self, event: Event, handler: str) -> trace.Span | None:
        """The span of the attempt of *handler* on *event* running now, if any: found by
        delivery, not as the current span, since a timeout fails an attempt from the
        clock's thread and close() may run under a span of the application's."""
        with self.lock:
            attempt = self.running.get((event.id, handler))
        return None if attempt is None else attempt.span

    def _failed(self, sender: object, *, event: Event, delivery: Any, error: BaseException) -> None:
        span = self._span_of(event, delivery.handler)
        if span is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))

    def _retry(self, sender: object, *, event: Event, delivery: Any, delay: float) -> None:
        span = self._span_of(event, delivery.handler)
        if span is not None:
            span.add_event("eventbus.retry_scheduled", {"eventbus.delay": delay})

    def _dead(self, sender: object, *, event: Event, dead_letter: Any) -> None:
        attributes = {
            "eventbus.handler": dead_letter.handler,
            "eventbus.dead_letter.id": dead_letter.id,
            "eventbus.dead_letter.reason": dead_letter.reason,
            "eventbus.attempts": dead_letter.attempts,
        }
        span = self._span_of(event, dead_letter.handler)
        if span is not None:
            span.add_event("eventbus.dead_lettered", attributes)
            return
        # Outside an attempt (close() abandoning it, recovery quarantining a row): a span of
        # its own in the event's trace.
        parent = propagate.extract(event.metadata)
        with self.tracer.start_as_current_span(
            f"{event.name} dead_letter", context=parent, kind=SpanKind.INTERNAL
        ) as own:
            own.set_attributes({**attributes, "messaging.message.id": event.id})
            own.set_status(Status(StatusCode.ERROR, dead_letter.error))


class _Gauges:
    """The three observable gauges of one meter provider, observing every bus instrumented
    with it (the SDK keeps one instrument per name, so each bus cannot have its own), each
    bus's values with its name as ``eventbus.bus``. Buses are held weakly and dropped by
    :func:`uninstrument`."""

    def __init__(self, meter: metrics.Meter) -> None:
        self._tracings: weakref.WeakSet[_Tracing] = weakref.WeakSet()
        self._lock = threading.Lock()
        # Each gauge reads only its own figure: the dead letters are a store query.
        for name, read, description in (
            ("eventbus.deliveries.active", _Tracing.active, "Deliveries queued or running"),
            (
                "eventbus.deliveries.retrying",
                _Tracing.retrying,
                "Deliveries waiting for their backoff",
            ),
            ("eventbus.dead_letters", _Tracing.dead_letters, "Dead letters held"),
        ):
            meter.create_observable_gauge(
                name, [self._observer(read)], unit="{delivery}", description=description
            )

    def add(self, tracing: _Tracing) -> None:
        with self._lock:
            self._tracings.add(tracing)

    def discard(self, tracing: _Tracing) -> None:
        with self._lock:
            self._tracings.discard(tracing)

    def _observer(
        self, read: Callable[[_Tracing], int | None]
    ) -> Callable[[Any], list[metrics.Observation]]:
        def observe(options: Any) -> list[metrics.Observation]:
            with self._lock:
                tracings = list(self._tracings)
            observations = []
            for tracing in tracings:
                value = read(tracing)
                if value is not None:
                    observations.append(metrics.Observation(value, tracing.bus_attributes))
            return observations

        return observe


_GAUGES: weakref.WeakKeyDictionary[object, _Gauges] = weakref.WeakKeyDictionary()
_GAUGES_LOCK = threading.Lock()


def _gauges_for(provider: metrics.MeterProvider | None, meter: metrics.Meter) -> _Gauges:
    """The gauges of *provider* (``None``: the global one), made on first use."""
    key = metrics.get_meter_provider() if provider is None else provider
    with _GAUGES_LOCK:
        gauges = _GAUGES.get(key)
        if gauges is None:
            gauges = _GAUGES[key] = _Gauges(meter)
        return gauges


def _name_of(event: object) -> str:
    try:
        return event_name_of(type(event))
    except Exception:  # noqa: BLE001 - emit() itself raises the right error for it
        return type(event).__name__
