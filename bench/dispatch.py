"""Thread dispatch (1 and 4 handlers per event, 8 workers) and inline (synchronous) mode.

Each trial emits N events back to back and stops the clock once every handler has run: for
eventbus when ``bus.drain()`` returns, for the thread peers when the handlers' shared counter
reaches the total. Synchronous dispatchers are done when ``emit`` returns.
"""

from __future__ import annotations

from functools import partial

from bench._harness import (
    Dispatcher,
    Section,
    Sizes,
    Tally,
    blinker_sync,
    closing_all,
    eventbus_inline,
    eventbus_threads,
    make_handlers,
    make_latch_handlers,
    pyee_executor,
    pyee_sync,
    queue_floor,
    raw_thread_pool,
    round_robin,
    rows_from_trials,
    sync_loop,
    timed_run,
)

FLOOR = "SimpleQueue + 8 threads (thread floor)"
BLINKER = "blinker Signal.send (sync)"


def _measure(
    scenario: str,
    factories: list,
    k: int,
    sizes: Sizes,
    events: int,
    reference: str,
    handler_factory=make_handlers,
) -> list:
    tally = Tally()
    handlers = handler_factory(tally, k)
    dispatchers: list[Dispatcher] = [make(tally, handlers) for make in factories]
    with closing_all(dispatchers):
        trials = round_robin(
            dispatchers,
            lambda d: timed_run(d, tally, events, k),
            sizes.repeats,
            warmup=lambda d: timed_run(d, tally, sizes.warmup_events, k),
        )
    return rows_from_trials(scenario, trials, reference)


def thread_dispatch(sizes: Sizes, k: int) -> Section:
    """us/event until every handler has run, *k* handlers per event, 8 worker threads."""
    scenario = f"thread dispatch, {k} handler{'s' if k > 1 else ''}"
    rows = _measure(
        scenario,
        [
            sync_loop,
            pyee_sync,
            blinker_sync,
            queue_floor,
            raw_thread_pool,
            pyee_executor,
            eventbus_threads,
        ],
        k,
        sizes,
        sizes.dispatch_events,
        FLOOR,
    )
    return Section(rows)


def thread_dispatch_two_workers(sizes: Sizes) -> Section:
    """us/event until every handler has run, 4 handlers per event, 2 worker threads (as many
    as the machine's cores, where thread hand-offs cost the most)."""
    floor = partial(queue_floor, workers=2)
    rows = _measure(
        "thread dispatch, 4 handlers, 2 workers",
        [floor, partial(pyee_executor, workers=2), partial(eventbus_threads, workers=2)],
        4,
        sizes,
        sizes.dispatch_events,
        "SimpleQueue + 2 threads (thread floor)",
    )
    return Section(rows)


def inline(sizes: Sizes) -> Section:
    """Synchronous dispatch, 4 handlers: eventbus with the inline executor vs blinker and pyee."""
    rows = _measure(
        "inline (sync), 4 handlers",
        [sync_loop, pyee_sync, blinker_sync, eventbus_inline],
        4,
        sizes,
        sizes.inline_events,
        BLINKER,
    )
    return Section(rows)


def latch_sensitivity(sizes: Sizes) -> Section:
    """For information: thread dispatch, 4 handlers that each take a shared lock (a countdown
    latch written the usual way). A heavier handler raises the floor, and every ratio to it
    shrinks, compared with the lock-free counter used everywhere else here."""
    rows = _measure(
        "info: thread dispatch, 4 handlers taking a lock",
        [sync_loop, queue_floor, pyee_executor, eventbus_threads],
        4,
        sizes,
        sizes.dispatch_events,
        FLOOR,
        handler_factory=make_latch_handlers,
    )
    return Section(rows)
