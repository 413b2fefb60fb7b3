"""Delivery policies on thread dispatch: what ``ordered_by`` and ``concurrency`` cost.

Each scenario measures two eventbus dispatchers round-robin in the same run, with the same 4
counting handlers per event, the same ``EventBus(max_workers=8)`` settings and the same
payloads ``{"k": i % 500}``: the handlers subscribed with the option, and subscribed without it
(the reference). Each trial emits N events back to back and stops the clock when ``drain()``
returns, as in thread dispatch. Throughput in events/s, so the ratio column is the option's
throughput over the plain bus's.

* ``ordered_by="k"`` over 500 keys: each handler's deliveries of one key run one at a time,
  in emit order; the others of the key wait in line as queued jobs.
* ``concurrency=16``: at most 16 attempts of each handler at once (a delivery handed to the
  worker pool holds its slot until its attempt ends); the rest wait as queued jobs.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from bench._harness import (
    EVENT_NAME,
    WAIT_TIMEOUT,
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
    median,
    round_robin,
)

HANDLERS = 4
KEYS = 500
LIMIT = 16
KEYED = 'eventbus EventBus(max_workers=8), on(..., ordered_by="k")'
UNKEYED = "eventbus EventBus(max_workers=8), on(...) unkeyed"
LIMITED = f"eventbus EventBus(max_workers=8), on(..., concurrency={LIMIT})"
UNLIMITED = "eventbus EventBus(max_workers=8), on(...) unlimited"


def _eventbus(label: str, handlers: Sequence[Any], **options: Any) -> Dispatcher:
    from eventbus import EventBus

    bus = EventBus(max_workers=WORKERS, name="bench-policies")
    for i, h in enumerate(handlers):
        bus.subscribe(EVENT_NAME, h, name=f"bench.handler_{i}", **options)
    return Dispatcher(label, partial(bus.emit, EVENT_NAME), bus.drain, bus.close, {"bus": bus})


def payloads(events: int) -> list[dict[str, int]]:
    """The payloads of one trial, built outside the clock: ``{"k": i % 500}``."""
    return [{"k": i % KEYS} for i in range(events)]


def timed_payloads(d: Dispatcher, tally: Tally, sent: Sequence[Any], per_event: int) -> Trial:
    """:func:`bench._harness.timed_run`, emitting *sent* in order instead of one payload."""
    tally.reset(len(sent) * per_event)
    emit = d.emit
    gc.collect()
    start = time.perf_counter()
    for payload in sent:
        emit(payload)
    finished = d.wait(WAIT_TIMEOUT)
    seconds = time.perf_counter() - start
    return Trial(seconds, len(sent), len(sent) * per_event, tally.handled(), finished)


def _compare(scenario: str, sizes: Sizes, option: str, reference: str, **options: Any) -> Section:
    tally = Tally()
    handlers = make_handlers(tally, HANDLERS)
    dispatchers = [_eventbus(option, handlers, **options), _eventbus(reference, handlers)]
    sent, warm = payloads(sizes.dispatch_events), payloads(sizes.warmup_events)
    with closing_all(dispatchers):
        trials = round_robin(
            dispatchers,
            lambda d: timed_payloads(d, tally, sent, HANDLERS),
            sizes.repeats,
            warmup=lambda d: timed_payloads(d, tally, warm, HANDLERS),
        )
    rows = []
    for d in dispatchers:
        runs = trials[d.name]
        values = [t.events / t.seconds for t in runs]
        rows.append(
            Row(
                scenario,
                d.name,
                median(values),
                "events/s",
                samples=values,
                ok=all(t.ok for t in runs),
                detail={
                    "events_per_trial": runs[0].events,
                    "handled": sum(t.handled for t in runs),
                    "expected": sum(t.expected for t in runs),
                    "us_per_event": median([t.us_per_event for t in runs]),
                    "best_us_per_event": min(t.us_per_event for t in runs),
                },
            )
        )
    add_ratios(rows, next(r for r in rows if r.dispatcher == reference))
    return Section(rows)


def keyed(sizes: Sizes) -> Section:
    """4 handlers with ``ordered_by="k"`` over 500 keys vs the same handlers unkeyed."""
    return _compare(
        f"keyed dispatch, {KEYS} keys, {HANDLERS} handlers", sizes, KEYED, UNKEYED, ordered_by="k"
    )


def concurrency(sizes: Sizes) -> Section:
    """4 handlers with ``concurrency=16`` vs the same handlers unlimited."""
    return _compare(
        f"concurrency={LIMIT}, {HANDLERS} handlers", sizes, LIMITED, UNLIMITED, concurrency=LIMIT
    )
