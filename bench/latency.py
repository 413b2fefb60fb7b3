"""emit() latency on the caller's thread, 4 handlers, while the workers are busy.

Each round emits bursts of back-to-back events and times every ``emit`` call on its own with
``time.perf_counter_ns``; while a burst runs, the 8 workers are running the handlers of the
events emitted before, so the caller competes with them for the GIL and for any lock the
dispatcher shares with its workers. Between bursts the clock is stopped and the handlers
catch up. p50 and p99 are taken per round over every emit of the round; the table shows the
median over rounds.
"""

from __future__ import annotations

import gc
import time
from array import array

from bench._harness import (
    PAYLOAD,
    WAIT_TIMEOUT,
    Dispatcher,
    Row,
    Section,
    Sizes,
    Tally,
    closing_all,
    eventbus_threads,
    make_handlers,
    median,
    percentile,
    pyee_executor,
    queue_floor,
)

HANDLERS = 4
FLOOR = "SimpleQueue + 8 threads (thread floor)"
PYEE_EXECUTOR = "pyee ExecutorEventEmitter"
EVENTBUS = "eventbus EventBus(max_workers=8)"


def _round(d: Dispatcher, tally: Tally, bursts: int, burst: int) -> tuple[array, bool]:
    """Time each emit of *bursts* bursts; return the samples (ns) and whether all handlers ran
    with the right count."""
    samples = array("q", bytes(8 * bursts * burst))
    clock = time.perf_counter_ns
    emit = d.emit
    payload = PAYLOAD
    ok = True
    i = 0
    gc.collect()
    for _ in range(bursts):
        tally.reset(burst * HANDLERS)
        for _ in range(burst):
            t0 = clock()
            emit(payload)
            samples[i] = clock() - t0
            i += 1
        finished = d.wait(WAIT_TIMEOUT)
        ok = ok and finished and tally.handled() == burst * HANDLERS
    return samples, ok


def emit_latency(sizes: Sizes) -> Section:
    tally = Tally()
    handlers = make_handlers(tally, HANDLERS)
    dispatchers = [make(tally, handlers) for make in (queue_floor, pyee_executor, eventbus_threads)]
    p50s: dict[str, list[float]] = {d.name: [] for d in dispatchers}
    p99s: dict[str, list[float]] = {d.name: [] for d in dispatchers}
    maxes: dict[str, list[float]] = {d.name: [] for d in dispatchers}
    oks: dict[str, bool] = {d.name: True for d in dispatchers}
    with closing_all(dispatchers):
        for d in dispatchers:  # warm-up round
            _round(d, tally, 1, sizes.latency_burst)
        for _ in range(sizes.repeats):
            for d in dispatchers:
                samples, ok = _round(d, tally, sizes.latency_bursts, sizes.latency_burst)
                ordered = sorted(samples)
                p50s[d.name].append(percentile(ordered, 0.50) / 1000)
                p99s[d.name].append(percentile(ordered, 0.99) / 1000)
                maxes[d.name].append(ordered[-1] / 1000)
                oks[d.name] = oks[d.name] and ok
    rows: list[Row] = []
    by: dict[tuple[str, str], Row] = {}
    for quantile, values in (("p50", p50s), ("p99", p99s)):
        floor = median(values[FLOOR])
        for d in dispatchers:
            value = median(values[d.name])
            row = by[(quantile, d.name)] = Row(
                f"emit() latency {quantile}, 4 handlers, workers busy",
                d.name,
                value,
                "us",
                ratio=value / floor,
                ratio_to=FLOOR,
                samples=values[d.name],
                ok=oks[d.name],
                detail={
                    "emits_per_round": sizes.latency_bursts * sizes.latency_burst,
                    "burst": sizes.latency_burst,
                    "max_us": max(maxes[d.name]),
                },
            )
            rows.append(row)
    return Section(rows)
