"""What OpenTelemetry instrumentation costs thread dispatch, off and on (4 handlers, 8 workers).

Three parts, one after the other, so that only the buses of one part are alive at a time:

1. Off. Thread dispatch (4 counting handlers, 8 workers, N events back to back per trial, the
   clock stopped when ``drain()`` returns) through three buses round-robin, three times the
   usual rounds since the figure of interest is a difference of a few percent:

   * the reference calls the bus's untraced emit body directly, skipping the one check
     ``emit()`` makes for instrumentation; with no instrumentation, attempts run exactly as
     they always did (the pipeline hands the executor the plain job), so this is the
     dispatch path without any tracing code;
   * ``emit()`` on a bus never instrumented: the ratio to the reference is what having the
     instrumentation hooks costs when they are off;
   * ``emit()`` on a bus instrumented and then uninstrumented: off again must cost the same.

2. The same difference without the workers' noise: one ``emit()`` call against one call of
   the untraced body, on an inline bus with no handler for the event, in ns per call (the
   best of many timed loops of each, alternated), and the difference as a share of part 1's
   reference us/event.

3. For information, thread dispatch on an instrumented bus, with OpenTelemetry's API-only
   (no-op) providers and with the SDK's providers recording every span and metric (no
   exporter), against the reference of part 1 (a quarter of the events per trial: each emit
   makes 5 spans and 9 measurements).
"""

from __future__ import annotations

import timeit
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from bench._harness import (
    EVENT_NAME,
    PAYLOAD,
    WORKERS,
    Dispatcher,
    Row,
    Section,
    Sizes,
    Tally,
    Trial,
    add_ratios,
    closing_all,
    make_handlers,
    round_robin,
    rows_from_trials,
    subscribe_all,
    timed_run,
)

HANDLERS = 4
SCENARIO = "instrumentation, 4 handlers"
CALL_SCENARIO = "instrumentation off, one emit() call, no handlers"
CALL_UNTRACED = "eventbus, emit's untraced body"
CALL_EMIT = "eventbus emit(), never instrumented"
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


def _measure(
    factories: Sequence[Callable[[Tally, Sequence[Callable[..., None]]], Dispatcher]],
    events: int,
    rounds: int,
    sizes: Sizes,
) -> dict[str, list[Trial]]:
    tally = Tally()
    handlers = make_handlers(tally, HANDLERS)
    dispatchers = [make(tally, handlers) for make in factories]
    with closing_all(dispatchers):
        return round_robin(
            dispatchers,
            lambda d: timed_run(d, tally, events, HANDLERS),
            rounds,
            warmup=lambda d: timed_run(d, tally, sizes.warmup_events, HANDLERS),
        )


def _call_cost(sizes: Sizes, dispatch: Row) -> list[Row]:
    """ns per call: ``emit()`` and the untraced body, on an inline bus without handlers; the
    difference also as a share of *dispatch*'s us/event."""
    from eventbus import EventBus
    from eventbus.testing import InlineExecutor

    bus = EventBus(executor=InlineExecutor(), name="bench-tracing-calls")
    calls = {
        CALL_UNTRACED: partial(bus._emit, EVENT_NAME, PAYLOAD, None, None, None, None),
        CALL_EMIT: partial(bus.emit, EVENT_NAME, PAYLOAD),
    }
    number = max(1_000, sizes.dispatch_events)
    best: dict[str, list[float]] = {name: [] for name in calls}
    try:
        for _ in range(sizes.repeats * 2):
            for name, call in calls.items():
                seconds = min(timeit.repeat(call, number=number, repeat=3))
                best[name].append(seconds / number * 1e9)
    finally:
        bus.close()
    rows = [
        Row(CALL_SCENARIO, name, min(values), "ns/call", samples=values)
        for name, values in best.items()
    ]
    add_ratios(rows, rows[0])
    extra_ns = rows[1].value - rows[0].value
    share = Row(
        CALL_SCENARIO,
        f"the difference, as a share of '{dispatch.dispatcher}' above",
        extra_ns / (dispatch.value * 1e3) * 100,
        "% of us/event",
        detail={"extra_ns_per_emit": extra_ns, "dispatch_us_per_event": dispatch.value},
    )
    return [*rows, share]


def instrumentation(sizes: Sizes) -> Section:
    """Thread dispatch with instrumentation off and off again (against the untraced body),
    one emit() call against one untraced call, and, for information, instrumented."""
    off = _measure([_untraced, _never, _off_again], sizes.dispatch_events, sizes.repeats * 3, sizes)
    rows = rows_from_trials(SCENARIO, off, UNTRACED)
    reference = rows[0]
    on = _measure([_noop, _sdk], max(100, sizes.dispatch_events // 4), sizes.repeats, sizes)
    info = rows_from_trials(SCENARIO, on, None)
    add_ratios(info, reference)
    return Section([*rows, *info, *_call_cost(sizes, reference)])
