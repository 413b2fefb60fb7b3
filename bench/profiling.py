"""Profile eventbus's thread dispatch, 4 handlers, 8 workers: ``python -m bench.profiling``.

Two views, with structlog configured as in the benchmark (records below WARNING dropped):

* cProfile with a per-thread CPU clock (``time.thread_time``), so that time spent waiting for
  the GIL or a lock is not charged to whatever function was waiting. The caller's thread is
  profiled around the emit loop only (cost **per emit**); each worker thread has its own
  profiler (installed by a ``WorkerPool`` subclass passed as ``executor=``), merged into one
  (cost **per delivery**). cProfile adds its own overhead to every call: read the numbers as
  proportions, then scale them by the unprofiled us/event the benchmark measures.
* ``--pyinstrument``: a statistical profile (low overhead) of the inline mode, where emit and
  all four deliveries run on one thread; needs ``pip install pyinstrument``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import threading
import time
from functools import partial

from bench._harness import (
    EVENT_NAME,
    PAYLOAD,
    WORKERS,
    Tally,
    configure_structlog,
    make_handlers,
    subscribe_all,
)

HANDLERS = 4


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def _profiling_pool(workers: int, clock):
    from eventbus._dispatch import WorkerPool

    class ProfilingPool(WorkerPool):
        """eventbus's own worker pool, with a CPU-time profiler on each worker thread."""

        def __init__(self, max_workers: int) -> None:
            self.profiles: list[cProfile.Profile] = []
            self._profiles_lock = threading.Lock()
            super().__init__(max_workers, name="bench-profile")

        def _work(self) -> None:
            profile = cProfile.Profile(clock)
            with self._profiles_lock:
                self.profiles.append(profile)
            profile.enable()
            try:
                super()._work()
            finally:
                profile.disable()

    return ProfilingPool(workers)


def _eventbus_rows(
    stats: pstats.Stats, per: int, limit: int
) -> list[tuple[float, float, int, str]]:
    """(own us, inclusive us, calls, function) per unit for the *limit* functions with the most
    own time; a unit is one emit (caller) or one delivery (workers)."""
    rows = []
    table = stats.stats  # type: ignore[attr-defined]
    for (filename, line, func), (_cc, calls, tottime, cumtime, _callers) in table.items():
        where = filename.rsplit("/", 2)
        short = "/".join(where[-2:]) if len(where) > 1 else filename
        rows.append((tottime / per * 1e6, cumtime / per * 1e6, calls, f"{short}:{line}({func})"))
    rows.sort(reverse=True)
    return rows[:limit]


def _print_rows(title: str, rows, per: int) -> None:
    print(f"\n{title}")
    print(f"{'own us':>8} {'incl. us':>9} {'calls':>7}  function")
    for own, cum, calls, name in rows:
        print(f"{own:8.3f} {cum:9.3f} {calls / per:7.2f}  {name}")


def profile_threads(events: int, limit: int, clock) -> None:
    from eventbus import EventBus

    tally = Tally()
    handlers = make_handlers(tally, HANDLERS)
    pool = _profiling_pool(WORKERS, clock)
    bus = EventBus(executor=pool, name="bench-profile")
    subscribe_all(bus, handlers)
    emit = partial(bus.emit, EVENT_NAME)
    for _ in range(events // 4):  # warm-up: caches, retention filled
        emit(PAYLOAD)
    bus.drain()
    for p in pool.profiles:  # count the measured run only
        p.disable()
        p.clear()
        p.enable()
    tally.reset(events * HANDLERS)
    caller = cProfile.Profile(clock)
    wall = time.perf_counter()
    caller.enable()
    for _ in range(events):
        emit(PAYLOAD)
    caller.disable()
    emitted = time.perf_counter()
    bus.drain()
    done = time.perf_counter()
    bus.close()
    handled = tally.handled()
    deliveries = events * HANDLERS
    print(
        f"profiled run: {events:,} events x {HANDLERS} handlers, {WORKERS} workers; "
        f"{(emitted - wall) / events * 1e6:.1f} us/event to emit, "
        f"{(done - wall) / events * 1e6:.1f} us/event until drained (both inflated by "
        f"the profilers); handled {handled:,} of {deliveries:,}"
    )
    caller_stats = pstats.Stats(caller, stream=io.StringIO())
    worker_stats = pstats.Stats(pool.profiles[0], stream=io.StringIO())
    for p in pool.profiles[1:]:
        worker_stats.add(p)
    total_caller = caller_stats.total_tt / events * 1e6  # type: ignore[attr-defined]
    total_worker = worker_stats.total_tt / deliveries * 1e6  # type: ignore[attr-defined]
    print(
        f"profiled time per emit (caller thread): {total_caller:.2f} us; "
        f"per delivery (workers): {total_worker:.2f} us"
    )
    _print_rows(
        "caller thread, per emit (profiled):",
        _eventbus_rows(caller_stats, events, limit),
        events,
    )
    _print_rows(
        "worker threads, per delivery (profiled):",
        _eventbus_rows(worker_stats, deliveries, limit),
        deliveries,
    )


def profile_inline(events: int) -> None:
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("\npyinstrument skipped: pip install pyinstrument")
        return
    from eventbus import EventBus
    from eventbus.testing import InlineExecutor

    tally = Tally()
    bus = EventBus(executor=InlineExecutor(), name="bench-profile-inline")
    subscribe_all(bus, make_handlers(tally, HANDLERS))
    emit = partial(bus.emit, EVENT_NAME)
    for _ in range(events // 4):
        emit(PAYLOAD)
    profiler = Profiler(interval=0.0001)
    profiler.start()
    for _ in range(events):
        emit(PAYLOAD)
    profiler.stop()
    bus.close()
    print(f"\ninline mode, {events:,} events x {HANDLERS} handlers (pyinstrument):")
    print(profiler.output_text(unicode=False, color=False, show_all=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--limit", type=int, default=25, help="functions per table")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: per-thread CPU time (excludes GIL and lock waits, but the clock itself is "
        "slow and inflates every call); wall: perf_counter (cheap, includes waits)",
    )
    parser.add_argument("--pyinstrument", action="store_true", help="also profile inline mode")
    args = parser.parse_args()
    configure_structlog()
    profile_threads(args.events, args.limit, CLOCKS[args.clock])
    if args.pyinstrument:
        profile_inline(args.events)


if __name__ == "__main__":
    main()
