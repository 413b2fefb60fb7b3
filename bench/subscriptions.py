"""Emit cost as subscriptions grow: 4 subscriptions vs 10,000 (over 1,000 other names and 100
patterns that do not match), thread dispatch with 8 workers, us/event until every handler ran.

The 10,000 are the 4 matching handlers, ``patterns`` non-matching ``*``/``**`` patterns, and
the rest exact names spread over ``names`` other event names, each with its own handler. Those
extra handlers count themselves too: the scenario checks that none of them was ever called.

Also reported, for information: how long subscribing took, and the cost of the first emit after
a subscription change (the resolution cache was emptied, so that emit resolves from scratch).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench._harness import (
    EVENT_NAME,
    PAYLOAD,
    Dispatcher,
    Row,
    Section,
    Sizes,
    Tally,
    closing_all,
    eventbus_threads,
    make_handlers,
    round_robin,
    rows_from_trials,
    timed_run,
)

HANDLERS = 4
COLD_SAMPLES = 20


def _patterns(count: int) -> list[str]:
    """*count* patterns using ``*`` and ``**`` that never match ``bench:event``."""
    shapes = (
        "other{i}:**",  # another namespace, any depth
        "**:nomatch{i}",  # any prefix, another last segment
        "bench:*:sub{i}",  # same first segment, one segment too many
        "*:event{i}",  # one-segment wildcard, another name
    )
    return [shapes[i % len(shapes)].format(i=i) for i in range(count)]


def _populate(bus: Any, sizes: Sizes, stray: Callable[[], None]) -> float:
    """Add the non-matching subscriptions; return the seconds it took."""
    extra = sizes.subscriptions - HANDLERS
    patterns = _patterns(sizes.subscription_patterns)
    exact = extra - len(patterns)
    targets = list(patterns) + [f"svc{i % sizes.subscription_names}:happened" for i in range(exact)]

    def make(i: int) -> Callable[..., None]:
        def filler(_event: object) -> None:
            stray()

        filler.__qualname__ = f"filler_{i}"
        return filler

    start = time.perf_counter()
    for i, target in enumerate(targets):
        bus.subscribe(target, make(i), name=f"bench.filler_{i}")
    return time.perf_counter() - start


def _cold_emit_us(bus: Any) -> float:
    """Median cost of an emit right after a subscription change (cache emptied)."""

    def probe(_event: object) -> None:
        pass

    costs = []
    for i in range(COLD_SAMPLES):
        bus.subscribe(f"probe{i}:x", probe, name="bench.probe")
        start = time.perf_counter()
        bus.emit(EVENT_NAME, PAYLOAD)
        costs.append((time.perf_counter() - start) * 1e6)
        bus.off(probe)
        bus.drain()
    return statistics.median(costs)


def subscription_growth(sizes: Sizes) -> Section:
    tally = Tally()
    handlers = make_handlers(tally, HANDLERS)
    strays = itertools.count()

    def stray() -> None:
        next(strays)

    small = eventbus_threads(tally, handlers, label=f"eventbus, {HANDLERS} subscriptions")
    large = eventbus_threads(
        tally, handlers, label=f"eventbus, {sizes.subscriptions:,} subscriptions"
    )
    dispatchers: list[Dispatcher] = [small, large]
    with closing_all(dispatchers):
        setup_s = _populate(large.extra["bus"], sizes, stray)
        trials = round_robin(
            dispatchers,
            lambda d: timed_run(d, tally, sizes.dispatch_events, HANDLERS),
            sizes.repeats,
            warmup=lambda d: timed_run(d, tally, sizes.warmup_events, HANDLERS),
        )
        cold = {d.name: _cold_emit_us(d.extra["bus"]) for d in dispatchers}
    rows = rows_from_trials(f"emit cost vs subscriptions, {HANDLERS} matching", trials, small.name)
    stray_calls = next(strays)
    for row in rows:
        row.detail["first_emit_after_subscription_change_us"] = cold[row.dispatcher]
        if row.dispatcher == large.name:
            row.detail.update(
                subscriptions=sizes.subscriptions,
                names=sizes.subscription_names,
                patterns=sizes.subscription_patterns,
                subscribe_seconds=setup_s,
                non_matching_handler_calls=stray_calls,
            )
            row.ok = row.ok and stray_calls == 0
    info = [
        Row(
            "info: first emit after a subscription change (uncached resolve)",
            d.name,
            cold[d.name],
            "us",
            ratio=cold[d.name] / cold[small.name],
            ratio_to=small.name,
        )
        for d in dispatchers
    ]
    info.append(
        Row(
            f"info: subscribing {sizes.subscriptions - HANDLERS:,} handlers",
            large.name,
            setup_s * 1e6 / (sizes.subscriptions - HANDLERS),
            "us/subscribe",
        )
    )
    return Section(rows + info)
