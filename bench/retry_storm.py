"""Retry storm: every handler fails once, then succeeds; zero backoff; 4 handlers, 8 workers.

eventbus runs with ``RetryPolicy(wait=tenacity.wait_none())``: each failure is caught, recorded
(``handler.failed`` is a WARNING with its traceback, so it *is* rendered), routed through the
retry queue and its timer, and run again. For reference, the same bus with handlers that never
fail, and a hand-rolled peer: ``ThreadPoolExecutor.submit`` of each handler wrapped in
``tenacity.retry(wait=wait_none(), stop=stop_after_attempt(3))`` (retries in place, records and
logs nothing). Throughput in events/s until every handler has succeeded.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import tenacity

from bench._harness import (
    EVENT_NAME,
    WORKERS,
    Dispatcher,
    Row,
    Section,
    Sizes,
    Tally,
    closing_all,
    make_handlers,
    median,
    round_robin,
    subscribe_all,
    tally_wait,
    timed_run,
)

HANDLERS = 4
STORM = "eventbus, every handler fails once"
CLEAN = "eventbus, no failures"
PEER = "ThreadPoolExecutor + tenacity.retry, fails once"


class Transient(RuntimeError):
    """What the storm's handlers raise on their first attempt."""


def make_fail_once(tally: Tally, failures: Any, k: int) -> tuple[Callable[..., None], ...]:
    """*k* handlers that fail on the first call for a given argument (the Event for eventbus, a
    fresh token per event for the peer) and succeed, counting on *tally*, on the second."""

    def make(i: int) -> Callable[..., None]:
        failed: set[int] = set()

        def handler(arg: object, *_args: object, **_kwargs: object) -> None:
            key = id(arg)  # the argument stays alive until its delivery succeeds
            if key in failed:
                failed.discard(key)
                if next(tally.counter) == tally.expected:
                    tally.done.set()
                return
            failed.add(key)
            next(failures)
            raise Transient("first attempt fails")

        handler.__name__ = handler.__qualname__ = f"flaky_{i}"
        return handler

    return tuple(make(i) for i in range(k))


def _eventbus(label: str, handlers, retry_wait) -> Dispatcher:
    from eventbus import EventBus, RetryPolicy

    bus = EventBus(max_workers=WORKERS, retry=RetryPolicy(wait=retry_wait), name="bench-retry")
    subscribe_all(bus, handlers)
    return Dispatcher(label, partial(bus.emit, EVENT_NAME), bus.drain, bus.close, {"bus": bus})


def _tenacity_pool(tally: Tally, handlers) -> Dispatcher:
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="bench-tenacity")
    retrying = tenacity.retry(
        wait=tenacity.wait_none(), stop=tenacity.stop_after_attempt(3), reraise=True
    )
    wrapped = tuple(retrying(h) for h in handlers)
    submit = pool.submit

    def emit(payload: Any) -> None:
        token = [payload]  # a fresh object per event: the handlers key their first failure on it
        for h in wrapped:
            submit(h, token)

    return Dispatcher(PEER, emit, tally_wait(tally), pool.shutdown)


def retry_storm(sizes: Sizes) -> Section:
    tally = Tally()
    failures = itertools.count()
    flaky = make_fail_once(tally, failures, HANDLERS)
    dispatchers = [
        _eventbus(STORM, flaky, tenacity.wait_none()),
        _eventbus(CLEAN, make_handlers(tally, HANDLERS), tenacity.wait_none()),
        _tenacity_pool(tally, flaky),
    ]
    with closing_all(dispatchers):
        trials = round_robin(
            dispatchers,
            lambda d: timed_run(d, tally, sizes.retry_events, HANDLERS),
            sizes.repeats,
            warmup=lambda d: timed_run(d, tally, max(1, sizes.retry_events // 4), HANDLERS),
        )
        storm_bus = dispatchers[0].extra["bus"]
        dead = len(storm_bus.dead_letters())
    failed_calls = next(failures)
    rows = []
    for d in dispatchers:
        runs = trials[d.name]
        values = [t.events / t.seconds for t in runs]
        rows.append(
            Row(
                f"retry storm, {HANDLERS} handlers, zero backoff",
                d.name,
                median(values),
                "events/s",
                samples=values,
                ok=all(t.ok for t in runs),
                detail={
                    "events_per_trial": runs[0].events,
                    "handled": sum(t.handled for t in runs),
                    "expected": sum(t.expected for t in runs),
                },
            )
        )
    by = {r.dispatcher: r for r in rows}
    # Every delivery of the flaky dispatchers failed exactly once (warm-up included).
    flaky_deliveries = sum(
        by[name].detail["expected"] for name in (STORM, PEER)
    ) + 2 * HANDLERS * max(1, sizes.retry_events // 4)
    by[STORM].detail["dead_letters"] = dead
    by[STORM].detail["failed_attempts_all_flaky"] = failed_calls
    by[STORM].detail["flaky_deliveries"] = flaky_deliveries
    by[STORM].ok = by[STORM].ok and dead == 0 and failed_calls == flaky_deliveries
    for row in rows:
        row.ratio = row.value / by[CLEAN].value
        row.ratio_to = CLEAN
    return Section(rows)
