"""asyncio: ``async def`` handlers run as tasks on the loop the bus is bound to.

Every measurement runs in its own ``asyncio.run(...)`` with a fresh emitter: for eventbus a
fresh ``EventBus(max_async=1000)`` inside ``async with bus:`` (bound to that loop; its
``aclose()`` on the way out is outside the clock). Every dispatcher runs the same coroutine
functions: count the call, set an ``asyncio.Event`` on the last one.

* **1,000 sleeping handlers.** One event to 1,000 async handlers that each await
  ``asyncio.sleep(0.1)``: seconds from ``await bus.aemit(...)`` until ``await bus.adrain()``
  returns. The floor: the same 1,000 handler coroutines started with ``loop.create_task``, the
  clock stopped by the last one's ``asyncio.Event``.
* **Async dispatch, 4 handlers.** N events back to back, 4 trivial async handlers each;
  us/event until every handler has finished. eventbus: ``await bus.aemit(...)`` N times, then
  ``await bus.adrain()``. pyee ``AsyncIOEventEmitter``: ``emit`` N times, then await the
  ``asyncio.Event`` set by the last handler call. bubus: ``bus.dispatch(BenchEvent(...))`` N
  times, then ``await bus.wait_until_idle()``, as its README says; its default bus
  (``max_history_size=50``) queues at most 50 events and raises beyond that, so the emitter
  keeps at most 50 in flight by awaiting the oldest dispatched event first; and bubus runs
  N/40 events per trial (at least 100), as it costs about 2 ms per event (``max_history_size=
  None`` would lift the bound, but its per-event cost then grows with the history). The floor:
  ``loop.create_task`` per handler call. Ratios to pyee; bubus's to eventbus.
* **aemit() latency, loop busy.** As the ``emit() latency`` scenario (bursts of back-to-back
  emits, nearest-rank p50/p99 per round, median over rounds), but each ``await bus.aemit()``
  is timed on the loop, and after each one (outside the clock) the emitter yields once, so the
  loop runs the async handlers of the events emitted before and 4 background tasks that keep
  yielding (``await asyncio.sleep(0)`` in a loop). Beside it, in the same rounds, ``emit()``
  of ``EventBus(max_workers=8)`` measured exactly as the ``emit() latency`` scenario measures
  it; the ratio is aemit() / emit() (information, no target).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import logging
import os
import time
from array import array
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from bench import latency
from bench._harness import (
    EVENT_NAME,
    PAYLOAD,
    WAIT_TIMEOUT,
    Row,
    Section,
    Sizes,
    Tally,
    Trial,
    eventbus_threads,
    make_handlers,
    median,
    percentile,
    round_robin,
    rows_from_trials,
    subscribe_all,
)

HANDLERS = 4
MAX_ASYNC = 1000
SLEEPERS = 1_000
SLEEP = 0.1
#: Background tasks that keep the loop busy while aemit() is timed.
BUSY_TASKS = 4
#: bubus runs 1/40 of the events per trial (at least 100): about 2 ms per event.
BUBUS_SHARE = 40
BUBUS_MIN_EVENTS = 100
#: bubus's default bus (max_history_size=50) queues at most 50 events.
BUBUS_IN_FLIGHT = 50

SLEEPERS_SCENARIO = f"{SLEEPERS:,} async handlers, each awaiting asyncio.sleep({SLEEP})"
DISPATCH_SCENARIO = f"async dispatch, {HANDLERS} handlers"
LATENCY_SCENARIO = "aemit() latency {q}, 4 async handlers, loop busy"

EVENTBUS = f"eventbus EventBus(max_async={MAX_ASYNC})"
FLOOR = "asyncio create_task per handler (async floor)"
PYEE = "pyee AsyncIOEventEmitter"
BUBUS = "bubus EventBus (defaults, fewer events per trial)"
AEMIT = f"eventbus EventBus(max_async={MAX_ASYNC}): await aemit()"
EMIT = "eventbus EventBus(max_workers=8): emit(), as in emit() latency"


# -- handlers ----------------------------------------------------------------------------------


class AsyncTally:
    """Counts async handler calls and sets ``done`` (an ``asyncio.Event``) when ``expected``
    is reached. ``reset`` runs inside each trial's loop: every trial gets a new Event."""

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, expected: int) -> None:
        self.counter = itertools.count(1)
        self.expected = expected
        self.done = asyncio.Event()

    def handled(self) -> int:
        """How many calls were counted (call only once the trial is over)."""
        return next(self.counter) - 1


def make_async_handlers(
    tally: AsyncTally, k: int, sleep: float | None = None
) -> tuple[Callable[..., Coroutine[Any, Any, None]], ...]:
    """*k* distinct trivial ``async def`` handlers that accept any call signature (eventbus
    and bubus pass the event, pyee the payload) and count themselves on *tally*; with *sleep*,
    each first awaits ``asyncio.sleep(sleep)``."""

    def make(i: int) -> Callable[..., Coroutine[Any, Any, None]]:
        if sleep is None:

            async def handler(*_args: object, **_kwargs: object) -> None:
                if next(tally.counter) == tally.expected:
                    tally.done.set()

        else:

            async def handler(*_args: object, **_kwargs: object) -> None:
                await asyncio.sleep(sleep)
                if next(tally.counter) == tally.expected:
                    tally.done.set()

        handler.__name__ = handler.__qualname__ = f"async_handler_{i}"
        return handler

    return tuple(make(i) for i in range(k))


async def _wait_done(tally: AsyncTally) -> bool:
    try:
        await asyncio.wait_for(tally.done.wait(), WAIT_TIMEOUT)
    except TimeoutError:
        return False
    return True


# -- one trial per dispatcher, each in its own asyncio.run -------------------------------------


@dataclass
class AsyncPeer:
    """One way of delivering *events* events to the handlers, one fresh emitter and one
    ``asyncio.run`` per trial; ``trial(events)`` returns the timed Trial."""

    name: str
    trial: Callable[[int], Trial]


async def _eventbus(
    handlers: Sequence[Callable[..., Any]], tally: AsyncTally, events: int
) -> Trial:
    from eventbus import EventBus

    per_event = len(handlers)
    bus = EventBus(max_async=MAX_ASYNC, name="bench-async")
    subscribe_all(bus, handlers)
    async with bus:
        tally.reset(events * per_event)
        aemit = bus.aemit
        payload = PAYLOAD
        gc.collect()
        start = time.perf_counter()
        for _ in range(events):
            await aemit(EVENT_NAME, payload)
        finished = await bus.adrain(timeout=WAIT_TIMEOUT)
        seconds = time.perf_counter() - start
    return Trial(seconds, events, events * per_event, tally.handled(), finished)


async def _floor(handlers: Sequence[Callable[..., Any]], tally: AsyncTally, events: int) -> Trial:
    per_event = len(handlers)
    hs = tuple(handlers)
    create_task = asyncio.get_running_loop().create_task
    tasks: set[asyncio.Task[None]] = set()  # strong references, as asyncio asks
    add = tasks.add
    tally.reset(events * per_event)
    payload = PAYLOAD
    gc.collect()
    start = time.perf_counter()
    for _ in range(events):
        for h in hs:
            add(create_task(h(payload)))
    finished = await _wait_done(tally)
    seconds = time.perf_counter() - start
    await asyncio.gather(*tasks)
    return Trial(seconds, events, events * per_event, tally.handled(), finished)


async def _pyee(handlers: Sequence[Callable[..., Any]], tally: AsyncTally, events: int) -> Trial:
    from pyee.asyncio import AsyncIOEventEmitter

    per_event = len(handlers)
    ee = AsyncIOEventEmitter()
    for h in handlers:
        ee.on(EVENT_NAME, h)
    tally.reset(events * per_event)
    emit = ee.emit
    payload = PAYLOAD
    gc.collect()
    start = time.perf_counter()
    for _ in range(events):
        emit(EVENT_NAME, payload)
    finished = await _wait_done(tally)
    seconds = time.perf_counter() - start
    await ee.wait_for_complete()  # the last tasks' done-callbacks, outside the clock
    return Trial(seconds, events, events * per_event, tally.handled(), finished)


_bubus_ids = itertools.count()


@functools.cache
def _bubus_event() -> type[Any]:
    """The bubus event class carrying PAYLOAD's fields (bubus is imported only when used)."""
    from bubus import BaseEvent

    class BenchEvent(BaseEvent):
        order_id: int
        email: str

    return BenchEvent


@functools.cache
def _quiet_bubus() -> None:
    """bubus logs through the standard library: the same policy as the structlog set-up
    (records below WARNING dropped, the rest rendered to os.devnull, nothing on stderr)."""
    log = logging.getLogger("bubus")
    log.setLevel(logging.WARNING)
    log.addHandler(logging.FileHandler(os.devnull))
    log.propagate = False


async def _bubus(handlers: Sequence[Callable[..., Any]], tally: AsyncTally, events: int) -> Trial:
    from bubus import EventBus as BubusBus

    _quiet_bubus()
    cls = _bubus_event()
    per_event = len(handlers)
    bus = BubusBus(name=f"bench_async_{next(_bubus_ids)}")
    for h in handlers:
        bus.on(cls.__name__, h)
    tally.reset(events * per_event)
    dispatch = bus.dispatch
    in_flight: deque[Any] = deque()
    gc.collect()
    start = time.perf_counter()
    for _ in range(events):
        if len(in_flight) >= BUBUS_IN_FLIGHT:
            await in_flight.popleft()
        in_flight.append(dispatch(cls(**PAYLOAD)))
    await bus.wait_until_idle(timeout=WAIT_TIMEOUT)
    finished = tally.done.is_set()
    seconds = time.perf_counter() - start
    await bus.stop(clear=True)
    return Trial(seconds, events, events * per_event, tally.handled(), finished)


def _peer(name: str, body, handlers, tally: AsyncTally) -> AsyncPeer:
    return AsyncPeer(name, lambda events: asyncio.run(body(handlers, tally, events)))


def bubus_events(sizes: Sizes) -> int:
    return max(BUBUS_MIN_EVENTS, sizes.dispatch_events // BUBUS_SHARE)


# -- scenarios ---------------------------------------------------------------------------------


def sleepers(sizes: Sizes) -> Section:
    """Seconds from aemit() until adrain() returns, one event to 1,000 handlers each awaiting
    asyncio.sleep(0.1), beside 1,000 plain tasks running the same handlers."""
    tally = AsyncTally()
    handlers = make_async_handlers(tally, SLEEPERS, sleep=SLEEP)
    peers = [
        _peer(FLOOR, _floor, handlers, tally),
        _peer(EVENTBUS, _eventbus, handlers, tally),
    ]
    trials = round_robin(peers, lambda p: p.trial(1), sizes.repeats, warmup=lambda p: p.trial(1))
    rows = []
    for peer in peers:
        runs = trials[peer.name]
        values = [t.seconds for t in runs]
        value = median(values)
        rows.append(
            Row(
                SLEEPERS_SCENARIO,
                peer.name,
                value,
                "s",
                samples=values,
                ok=all(t.ok for t in runs),
                detail={
                    "handlers": SLEEPERS,
                    "sleep_s": SLEEP,
                    "over_sleep_s": value - SLEEP,
                    "ratio_to_sleep": value / SLEEP,
                    "handled": sum(t.handled for t in runs),
                    "expected": sum(t.expected for t in runs),
                    "best": min(values),
                },
            )
        )
    floor = rows[0]
    for row in rows:
        row.ratio = row.value / floor.value
        row.ratio_to = floor.dispatcher
    return Section(rows)


def async_dispatch(sizes: Sizes) -> Section:
    """us/event until every async handler has finished, 4 handlers per event: eventbus, pyee's
    AsyncIOEventEmitter, bubus and the asyncio floor. Ratios to pyee, bubus's to eventbus."""
    tally = AsyncTally()
    handlers = make_async_handlers(tally, HANDLERS)
    events = {FLOOR: sizes.dispatch_events, PYEE: sizes.dispatch_events}
    events |= {EVENTBUS: sizes.dispatch_events, BUBUS: bubus_events(sizes)}
    warmup = {
        name: max(1, n * sizes.warmup_events // sizes.dispatch_events) for name, n in events.items()
    }
    peers = [
        _peer(FLOOR, _floor, handlers, tally),
        _peer(PYEE, _pyee, handlers, tally),
        _peer(BUBUS, _bubus, handlers, tally),
        _peer(EVENTBUS, _eventbus, handlers, tally),
    ]
    trials = round_robin(
        peers,
        lambda p: p.trial(events[p.name]),
        sizes.repeats,
        warmup=lambda p: p.trial(warmup[p.name]),
    )
    rows = rows_from_trials(DISPATCH_SCENARIO, trials, PYEE)
    by = {r.dispatcher: r for r in rows}
    bubus, eventbus, pyee = by[BUBUS], by[EVENTBUS], by[PYEE]
    bubus.ratio = bubus.value / eventbus.value
    bubus.ratio_to = EVENTBUS
    bubus.detail["note"] = (
        f"{bubus.detail['events_per_trial']:,} events per trial (others: "
        f"{sizes.dispatch_events:,}); per-event cost compared"
    )
    eventbus.detail["ratio_to_pyee"] = eventbus.value / pyee.value
    eventbus.detail["bubus_ratio_to_eventbus"] = bubus.ratio
    return Section(rows)


# -- aemit() latency ---------------------------------------------------------------------------


async def _spin(stop: asyncio.Event, steps: list[int], i: int) -> None:
    """Keep the loop busy: yield to it over and over until *stop* is set."""
    while not stop.is_set():
        await asyncio.sleep(0)
        steps[i] += 1


async def _aemit_round(bursts: int, burst: int) -> tuple[array, bool, int]:
    """Time each ``await bus.aemit()`` of *bursts* bursts on a busy loop; return the samples
    (ns), whether all handlers ran with the right count, and the busy tasks' steps."""
    from eventbus import EventBus

    tally = AsyncTally()
    handlers = make_async_handlers(tally, HANDLERS)
    bus = EventBus(max_async=MAX_ASYNC, name="bench-aemit")
    subscribe_all(bus, handlers)
    samples = array("q", bytes(8 * bursts * burst))
    clock = time.perf_counter_ns
    ok = True
    i = 0
    async with bus:
        stop = asyncio.Event()
        steps = [0] * BUSY_TASKS
        busy = [asyncio.create_task(_spin(stop, steps, j)) for j in range(BUSY_TASKS)]
        aemit = bus.aemit
        payload = PAYLOAD
        await asyncio.sleep(0)  # the busy tasks are running
        gc.collect()
        for _ in range(bursts):
            tally.reset(burst * HANDLERS)
            for _ in range(burst):
                t0 = clock()
                await aemit(EVENT_NAME, payload)
                samples[i] = clock() - t0
                i += 1
                await asyncio.sleep(0)  # untimed: the loop runs its other work in between
            finished = await bus.adrain(timeout=WAIT_TIMEOUT)
            ok = ok and finished and tally.handled() == burst * HANDLERS
        stop.set()
        await asyncio.gather(*busy)
    return samples, ok, sum(steps)


def aemit_latency(sizes: Sizes) -> Section:
    """p50/p99 of ``await bus.aemit()`` on a busy loop, beside ``emit()`` measured as in the
    emit() latency scenario, in the same rounds; ratios to emit()."""
    tally = Tally()
    threads = eventbus_threads(tally, make_handlers(tally, HANDLERS))
    bursts, burst = sizes.latency_bursts, sizes.latency_burst
    p50s: dict[str, list[float]] = {AEMIT: [], EMIT: []}
    p99s: dict[str, list[float]] = {AEMIT: [], EMIT: []}
    maxes: dict[str, list[float]] = {AEMIT: [], EMIT: []}
    oks = {AEMIT: True, EMIT: True}
    busy_steps: list[int] = []
    try:
        asyncio.run(_aemit_round(1, burst))  # warm-up rounds
        latency._round(threads, tally, 1, burst)
        for _ in range(sizes.repeats):
            for name in (AEMIT, EMIT):
                if name == AEMIT:
                    samples, ok, steps = asyncio.run(_aemit_round(bursts, burst))
                    busy_steps.append(steps)
                else:
                    samples, ok = latency._round(threads, tally, bursts, burst)
                ordered = sorted(samples)
                p50s[name].append(percentile(ordered, 0.50) / 1000)
                p99s[name].append(percentile(ordered, 0.99) / 1000)
                maxes[name].append(ordered[-1] / 1000)
                oks[name] = oks[name] and ok
    finally:
        threads.close()
    rows: list[Row] = []
    for quantile, values in (("p50", p50s), ("p99", p99s)):
        reference = median(values[EMIT])
        for name in (AEMIT, EMIT):
            value = median(values[name])
            detail: dict[str, Any] = {
                "emits_per_round": bursts * burst,
                "burst": burst,
                "max_us": max(maxes[name]),
            }
            if name == AEMIT:
                detail["busy_tasks"] = BUSY_TASKS
                detail["busy_task_steps_per_round"] = busy_steps
                detail[f"emit_{quantile}_us"] = reference
            rows.append(
                Row(
                    LATENCY_SCENARIO.format(q=quantile),
                    name,
                    value,
                    "us",
                    ratio=value / reference,
                    ratio_to=EMIT,
                    samples=values[name],
                    ok=oks[name],
                    detail=detail,
                )
            )
    return Section(rows)
