"""Memory: 1,000,000 events through the bus with a bounded intake; peak RSS; counts checked.

Runs in a child process (``python -m bench.memory``) so that the peak resident set size
is this scenario's own: ``VmHWM`` from ``/proc/self/status``, with ``resource.getrusage``'s
``ru_maxrss`` next to it (see :func:`_peak_rss_mb` for why the latter alone is not enough).
The scenario runs first, while the parent process is still small. With
``EventBus(max_pending=N)`` (detected with ``inspect.signature``) every event is emitted in one
stream against a bound of 10,000; a ``QueueFullError`` from ``emit`` is waited out and retried.
Without it, the bound is emulated: batches of 10,000 events, each followed by ``drain()``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._harness import (
    EVENT_NAME,
    PAYLOAD,
    WAIT_TIMEOUT,
    WORKERS,
    Row,
    Section,
    Sizes,
    Tally,
    configure_structlog,
    make_handlers,
    subscribe_all,
)

HANDLERS = 4


def _ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _peak_rss_mb() -> float:
    """This process's own peak RSS: ``VmHWM`` from ``/proc/self/status`` where there is one.

    ``ru_maxrss`` is not enough in a child process on Linux: the high-water mark of the
    parent's memory at spawn time is carried over into the child (fork and exec keep it), so
    a child of a 300 MB parent reports at least 300 MB. ``VmHWM`` belongs to the child's own
    address space. Elsewhere, fall back to ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _ru_maxrss_mb()


def supports_max_pending() -> bool:
    from eventbus import EventBus

    return "max_pending" in inspect.signature(EventBus.__init__).parameters


def run_in_this_process(events: int, bound: int) -> dict[str, Any]:
    """The scenario itself; call it in a fresh process."""
    configure_structlog()
    from eventbus import EventBus, exceptions

    queue_full = getattr(exceptions, "QueueFullError", None)
    tally = Tally()
    tally.reset(events * HANDLERS)
    handlers = make_handlers(tally, HANDLERS)
    bounded = supports_max_pending()
    options: dict[str, Any] = {"max_workers": WORKERS, "name": "bench-memory"}
    if bounded:
        options["max_pending"] = bound
    bus = EventBus(**options)
    subscribe_all(bus, handlers)
    baseline = _peak_rss_mb()
    emitted = rejected = 0
    drained = True
    start = time.perf_counter()
    if bounded:
        emit = bus.emit
        for _ in range(events):
            while True:
                try:
                    emit(EVENT_NAME, PAYLOAD)
                except Exception as exc:
                    if queue_full is None or not isinstance(exc, queue_full):
                        raise
                    rejected += 1
                    time.sleep(0.0005)
                else:
                    emitted += 1
                    break
        drained = bus.drain(WAIT_TIMEOUT)
    else:
        emit = bus.emit
        remaining = events
        while remaining:
            batch = min(bound, remaining)
            for _ in range(batch):
                emit(EVENT_NAME, PAYLOAD)
            emitted += batch
            remaining -= batch
            drained = bus.drain(WAIT_TIMEOUT) and drained
    seconds = time.perf_counter() - start
    bus.close()
    deliveries = tally.handled()
    return {
        "mode": "max_pending" if bounded else "batches+drain",
        "events": events,
        "bound": bound,
        "emitted": emitted,
        "rejected_emits": rejected,
        "handlers": HANDLERS,
        "handled_deliveries": deliveries,
        "expected_deliveries": emitted * HANDLERS,
        "drained": drained,
        "seconds": seconds,
        "events_per_s": emitted / seconds,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": _peak_rss_mb(),
        "ru_maxrss_mb": _ru_maxrss_mb(),
    }


def memory(sizes: Sizes) -> Section:
    """Run the scenario in a child process and report its peak RSS."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.memory",
            "--events",
            str(sizes.memory_events),
            "--bound",
            str(sizes.memory_bound),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory scenario failed ({proc.returncode}):\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    counts_ok = (
        result["drained"]
        and result["emitted"] == result["events"]
        and result["handled_deliveries"] == result["expected_deliveries"]
    )
    how = (
        f"EventBus(max_pending={sizes.memory_bound:,})"
        if result["mode"] == "max_pending"
        else f"batches of {sizes.memory_bound:,} + drain() (EventBus without max_pending)"
    )
    label = f"eventbus, {how}"
    scenario = f"memory, {sizes.memory_events:,} events x {HANDLERS} handlers"
    rows = [
        Row(
            scenario,
            label,
            result["peak_rss_mb"],
            "MB peak RSS",
            ok=counts_ok,
            detail=result,
        ),
        Row(scenario, label, result["events_per_s"], "events/s", ok=counts_ok, detail=result),
    ]
    return Section(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--bound", type=int, default=10_000)
    args = parser.parse_args()
    print(json.dumps(run_in_this_process(args.events, args.bound)))


if __name__ == "__main__":
    main()
