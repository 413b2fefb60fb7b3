"""What OpenTelemetry instrumentation costs thread dispatch, off and on (4 handlers, 8 workers).

The same bus settings and handlers as thread dispatch, measured round-robin in one run:

* the reference calls the bus's untraced emit body directly, skipping the one check
  ``emit()`` makes for instrumentation; with no instrumentation, attempts run exactly as they
  always did (the pipeline hands the executor the plain job), so this is the dispatch path
  without any tracing code;
* ``emit()`` on a bus never instrumented: the ratio to the reference is what having the
  instrumentation hooks costs when they are off;
* ``emit()`` on a bus instrumented and then uninstrumented: off again must cost the same;
* for information, ``emit()`` on an instrumented bus, with OpenTelemetry's API-only (no-op)
  providers and with the SDK's providers recording every span and metric (no exporter).

Each trial emits N events back to back and stops the clock when ``drain()`` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from bench._harness import (
    EVENT_NAME,
    WORKERS,
    Dispatcher,
    Section,
    Sizes,
    Tally,
    closing_all,
    make_handlers,
    round_robin,
    rows_from_trials,
    subscribe_all,
    timed_run,
)

HANDLERS = 4
UNTRACED = "eventbus, emit's untraced body (no tracing code on the path)"
NEVER = "eventbus emit(), never instrumented"
OFF_AGAIN = "eventbus emit(), instrumented then uninstrumented"
NOOP = "info: eventbus emit(), instrumented, no-op providers"
SDK = "info: eventbus emit(), instrumented, SDK providers (no exporter)"


def _bus(handlers: Sequence[Callable[..., None]]) -> Any:
    from eventbus import EventBus

    bus = EventBus(max_workers=WORKERS, name="bench-tracing")
    subscribe_all(bus, handlers)
    return bus


def _dispatcher(label: str, bus: Any, emit: Callable[[Any], object]) -> Dispatcher:
    return Dispatcher(label, emit, bus.drain, bus.close, {"bus": bus})


def _untraced(_tally: Tally, handlers: Sequence[Callable[..., None]]) -> Dispatcher:
    bus = _bus(handlers)
    # functools.partial adds no Python frame: the call goes straight into the untraced body.
    emit = partial(bus._emit, EVENT_NAME, metadata=None, key=None, delay=None, within=None)
    return _dispatcher(UNTRACED, bus, emit)


def _never(_tally: Tally, handlers: Sequence[Callable[..., None]]) -> Dispatcher:
    bus = _bus(handlers)
    return _dispatcher(NEVER, bus, partial(bus.emit, EVENT_NAME))


def _off_again(_tally: Tally, handlers: Sequence[Callable[..., None]]) -> Dispatcher:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    from eventbus.otel import instrument, uninstrument

    bus = _bus(handlers)
    instrument(bus, tracer_provider=TracerProvider(), meter_provider=MeterProvider())
    uninstrument(bus)
    return _dispatcher(OFF_AGAIN, bus, partial(bus.emit, EVENT_NAME))


def _noop(_tally: Tally, handlers: Sequence[Callable[..., None]]) -> Dispatcher:
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider

    from eventbus.otel import instrument

    bus = _bus(handlers)
    instrument(bus, tracer_provider=NoOpTracerProvider(), meter_provider=NoOpMeterProvider())
    return _dispatcher(NOOP, bus, partial(bus.emit, EVENT_NAME))


def _sdk(_tally: Tally, handlers: Sequence[Callable[..., None]]) -> Dispatcher:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    from eventbus.otel import instrument

    bus = _bus(handlers)
    instrument(bus, tracer_provider=TracerProvider(), meter_provider=MeterProvider())
    return _dispatcher(SDK, bus, partial(bus.emit, EVENT_NAME))


def instrumentation(sizes: Sizes) -> Section:
    """us/event until every handler has run, with instrumentation off, off again, and on.

    Twice the usual rounds: the figure of interest is a difference of a few percent."""
    tally = Tally()
    handlers = make_handlers(tally, HANDLERS)
    factories = [_untraced, _never, _off_again, _noop, _sdk]
    dispatchers = [make(tally, handlers) for make in factories]
    with closing_all(dispatchers):
        trials = round_robin(
            dispatchers,
            lambda d: timed_run(d, tally, sizes.dispatch_events, HANDLERS),
            sizes.repeats * 2,
            warmup=lambda d: timed_run(d, tally, sizes.warmup_events, HANDLERS),
        )
    return Section(rows_from_trials("instrumentation, 4 handlers", trials, UNTRACED))
