"""What every scenario shares: logging set-up, the handlers, the dispatchers, timing and stats,
and the skipped rows of scenarios whose server cannot be started here."""

from __future__ import annotations

import contextlib
import gc
import importlib
import itertools
import logging
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from queue import SimpleQueue
from typing import Any

import structlog

#: Worker threads for every thread-based dispatcher.
WORKERS = 8
#: The name every dispatcher emits under.
EVENT_NAME = "bench:event"
#: The payload every dispatcher emits (handlers do not read it).
PAYLOAD: dict[str, Any] = {"order_id": 42, "email": "a@example.com"}
#: How long any wait for handlers may take before the trial counts as failed.
WAIT_TIMEOUT = 120.0

STRUCTLOG_SETUP = (
    "structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING), "
    "cache_logger_on_first_use=True) + JSON renderer to os.devnull: records below WARNING "
    "(handler.succeeded, event.emitted, retry_scheduled) are dropped, warnings and errors "
    "(handler.failed with traceback, dead letters) are rendered"
)

_devnull = None


def configure_structlog() -> None:
    """Configure structlog as a production application would: drop records below WARNING and
    render the rest as JSON lines with tracebacks (written to ``os.devnull`` here)."""
    global _devnull  # noqa: PLW0603 - one sink for the whole process
    if _devnull is None:
        _devnull = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.WriteLoggerFactory(file=_devnull),
        cache_logger_on_first_use=True,
    )


# -- handlers ----------------------------------------------------------------------------------


class Tally:
    """Counts handler calls from any thread and sets ``done`` when ``expected`` is reached.

    ``next()`` on an ``itertools.count`` is atomic under the GIL, so counting takes no lock: the
    handlers stay trivial and cost every dispatcher the same.
    """

    def __init__(self) -> None:
        self.done = threading.Event()  # one object for good: dispatchers hold its wait method
        self.reset(0)

    def reset(self, expected: int) -> None:
        """Start a trial (only when no handler of the previous one can still be running)."""
        self.done.clear()
        self.counter = itertools.count(1)
        self.expected = expected

    def handled(self) -> int:
        """How many calls were counted (call only once the trial is over: it reads by counting)."""
        return next(self.counter) - 1


def make_handlers(tally: Tally, k: int) -> tuple[Callable[..., None], ...]:
    """*k* distinct trivial handlers that accept any call signature (eventbus passes the Event,
    pyee the payload, blinker the sender) and count themselves on *tally*."""

    def make(i: int) -> Callable[..., None]:
        def handler(*_args: object, **_kwargs: object) -> None:
            if next(tally.counter) == tally.expected:
                tally.done.set()

        handler.__name__ = handler.__qualname__ = f"handler_{i}"
        return handler

    return tuple(make(i) for i in range(k))


def make_latch_handlers(tally: Tally, k: int) -> tuple[Callable[..., None], ...]:
    """Like :func:`make_handlers`, but each call takes a shared lock, as a hand-written
    countdown latch would: a heavier "trivial" handler, for the sensitivity scenario."""
    lock = threading.Lock()

    def make(i: int) -> Callable[..., None]:
        def handler(*_args: object, **_kwargs: object) -> None:
            with lock:
                if next(tally.counter) == tally.expected:
                    tally.done.set()

        handler.__name__ = handler.__qualname__ = f"latch_handler_{i}"
        return handler

    return tuple(make(i) for i in range(k))


# -- dispatchers -------------------------------------------------------------------------------


@dataclass
class Dispatcher:
    """One way of delivering an event to the handlers: ``emit(payload)`` then ``wait(timeout)``
    (True once every handler has run)."""

    name: str
    emit: Callable[[Any], object]
    wait: Callable[[float], bool]
    close: Callable[[], None] = lambda: None
    extra: dict[str, Any] = field(default_factory=dict)


def _already_done(_timeout: float) -> bool:
    return True


def sync_loop(tally: Tally, handlers: Sequence[Callable[..., None]]) -> Dispatcher:
    hs = tuple(handlers)

    def emit(payload: Any) -> None:
        for h in hs:
            h(payload)

    return Dispatcher("plain loop (sync floor)", emit, _already_done)


def pyee_sync(tally: Tally, handlers: Sequence[Callable[..., None]]) -> Dispatcher:
    from pyee import EventEmitter

    ee = EventEmitter()
    for h in handlers:
        ee.on(EVENT_NAME, h)
    return Dispatcher("pyee EventEmitter.emit (sync)", partial(ee.emit, EVENT_NAME), _already_done)


def blinker_sync(tally: Tally, handlers: Sequence[Callable[..., None]]) -> Dispatcher:
    from blinker import Signal

    signal = Signal()
    for h in handlers:
        signal.connect(h, weak=False)
    return Dispatcher("blinker Signal.send (sync)", signal.send, _already_done)


class _QueueFloor:
    """WORKERS threads draining one SimpleQueue of (handler, payload) items: the thread floor."""

    def __init__(self, workers: int) -> None:
        self.queue: SimpleQueue[tuple[Callable[..., None], Any] | None] = SimpleQueue()
        self.threads = [
            threading.Thread(target=self._work, name=f"bench-floor-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        get = self.queue.get
        while True:
            item = get()
            if item is None:
                return
            item[0](item[1])

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()


def queue_floor(
    tally: Tally, handlers: Sequence[Callable[..., None]], workers: int = WORKERS
) -> Dispatcher:
    floor = _QueueFloor(workers)
    put = floor.queue.put
    hs = tuple(handlers)

    def emit(payload: Any) -> None:
        for h in hs:
            put((h, payload))

    return Dispatcher(
        f"SimpleQueue + {workers} threads (thread floor)", emit, tally_wait(tally), floor.close
    )


def raw_thread_pool(tally: Tally, handlers: Sequence[Callable[..., None]]) -> Dispatcher:
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="bench-tpe")
    submit = pool.submit
    hs = tuple(handlers)

    def emit(payload: Any) -> None:
        for h in hs:
            submit(h, payload)

    return Dispatcher(
        "ThreadPoolExecutor.submit per handler", emit, tally_wait(tally), pool.shutdown
    )


def pyee_executor(
    tally: Tally, handlers: Sequence[Callable[..., None]], workers: int = WORKERS
) -> Dispatcher:
    from pyee.executor import ExecutorEventEmitter

    ee = ExecutorEventEmitter(
        executor=ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-pyee")
    )
    for h in handlers:
        ee.on(EVENT_NAME, h)
    return Dispatcher(
        "pyee ExecutorEventEmitter", partial(ee.emit, EVENT_NAME), tally_wait(tally), ee.shutdown
    )


def subscribe_all(bus: Any, handlers: Sequence[Callable[..., None]]) -> None:
    for i, h in enumerate(handlers):
        bus.subscribe(EVENT_NAME, h, name=f"bench.handler_{i}")


def eventbus_threads(
    tally: Tally,
    handlers: Sequence[Callable[..., None]],
    label: str | None = None,
    workers: int = WORKERS,
) -> Dispatcher:
    from eventbus import EventBus

    bus = EventBus(max_workers=workers, name="bench")
    subscribe_all(bus, handlers)
    return Dispatcher(
        label or f"eventbus EventBus(max_workers={workers})",
        partial(bus.emit, EVENT_NAME),
        bus.drain,
        bus.close,
        extra={"bus": bus},
    )


def eventbus_inline(tally: Tally, handlers: Sequence[Callable[..., None]]) -> Dispatcher:
    from eventbus import EventBus
    from eventbus.testing import InlineExecutor

    bus = EventBus(executor=InlineExecutor(), name="bench-inline")
    subscribe_all(bus, handlers)
    return Dispatcher(
        "eventbus EventBus(executor=InlineExecutor())",
        partial(bus.emit, EVENT_NAME),
        bus.drain,
        bus.close,
        extra={"bus": bus},
    )


def tally_wait(tally: Tally) -> Callable[[float], bool]:
    return tally.done.wait


# -- timing ------------------------------------------------------------------------------------


@dataclass
class Trial:
    seconds: float
    events: int
    expected: int
    handled: int
    finished: bool

    @property
    def us_per_event(self) -> float:
        return self.seconds / self.events * 1e6

    @property
    def ok(self) -> bool:
        return self.finished and self.handled == self.expected


def timed_run(d: Dispatcher, tally: Tally, events: int, per_event: int) -> Trial:
    """Emit *events* events back to back and wait until every handler has run; wall time."""
    tally.reset(events * per_event)
    emit = d.emit
    payload = PAYLOAD
    gc.collect()
    start = time.perf_counter()
    for _ in range(events):
        emit(payload)
    finished = d.wait(WAIT_TIMEOUT)
    seconds = time.perf_counter() - start
    return Trial(seconds, events, events * per_event, tally.handled(), finished)


def round_robin(
    dispatchers: Sequence[Dispatcher],
    run: Callable[[Dispatcher], Trial],
    repeats: int,
    warmup: Callable[[Dispatcher], object] | None = None,
) -> dict[str, list[Trial]]:
    """Warm each dispatcher up, then run *repeats* rounds, each dispatcher once per round, so
    that drift in the machine's speed spreads evenly over them."""
    if warmup is not None:
        for d in dispatchers:
            warmup(d)
    trials: dict[str, list[Trial]] = {d.name: [] for d in dispatchers}
    for _ in range(repeats):
        for d in dispatchers:
            trials[d.name].append(run(d))
    return trials


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..1)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


@contextlib.contextmanager
def closing_all(dispatchers: Sequence[Dispatcher]) -> Iterator[None]:
    try:
        yield
    finally:
        for d in dispatchers:
            d.close()


# -- results -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table."""

    scenario: str
    dispatcher: str
    value: float
    unit: str
    ratio: float | None = None
    ratio_to: str | None = None
    samples: list[float] = field(default_factory=list)
    ok: bool = True
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Section:
    """What one scenario reports: its rows of the results table."""

    rows: list[Row] = field(default_factory=list)


def add_ratios(rows: Sequence[Row], reference: Row) -> None:
    for row in rows:
        row.ratio = row.value / reference.value if reference.value else math.nan
        row.ratio_to = reference.dispatcher


def rows_from_trials(
    scenario: str, trials: dict[str, list[Trial]], reference: str | None
) -> list[Row]:
    rows = []
    for name, runs in trials.items():
        values = [t.us_per_event for t in runs]
        rows.append(
            Row(
                scenario,
                name,
                median(values),
                "us/event",
                samples=values,
                ok=all(t.ok for t in runs),
                detail={
                    "events_per_trial": runs[0].events,
                    "handled": sum(t.handled for t in runs),
                    "expected": sum(t.expected for t in runs),
                    "best": min(values),
                },
            )
        )
    if reference is not None:
        add_ratios(rows, next(r for r in rows if r.dispatcher == reference))
    return rows


# -- servers the scenarios start ---------------------------------------------------------------


def server_unavailable(
    packages: Sequence[str], no_packages: str, support: str, find: str, no_server: str
) -> str | None:
    """Why a scenario cannot start its server here, or None: one of the Python *packages* is
    missing (*no_packages*), ``tests/support/<support>.py`` cannot be imported, or its
    function *find* finds no server (*no_server*)."""
    try:
        for package in packages:
            importlib.import_module(package)
    except ImportError:
        return no_packages
    try:
        module = importlib.import_module(f"tests.support.{support}")
    except ImportError as exc:  # pytest missing, or not run from the repository
        return f"tests/support/{support}.py cannot be imported ({exc})"
    if getattr(module, find)() is None:
        return no_server
    return None


def warn_skipped(what: str, reason: str, install: str) -> None:
    """Say on stderr, in a banner, that *what* is skipped for *reason*; *install* (lines) says
    what to install to measure it."""
    banner = "!" * 78
    lines = "".join(f"!! {line}\n" for line in install.splitlines())
    print(f"\n{banner}\n!! {what} SKIPPED: {reason}.\n{lines}{banner}", file=sys.stderr, flush=True)


def skipped_row(scenario: str, reason: str) -> Row:
    return Row(scenario, f"skipped: {reason}", math.nan, "", ok=True)


@dataclass(frozen=True)
class Sizes:
    """How much work each scenario does; ``FULL`` for the real run, ``QUICK`` for a smoke run."""

    repeats: int
    dispatch_events: int
    warmup_events: int
    latency_bursts: int
    latency_burst: int
    subscriptions: int
    subscription_names: int
    subscription_patterns: int
    inline_events: int
    retry_events: int
    memory_events: int
    memory_bound: int
    #: Events per durable trial: each costs a commit, so far fewer than the in-memory runs.
    durable_events: int
    #: Events per multi-process (Redis) trial: trivial handlers; I/O-like handlers (2 ms each)
    #: through eventbus; the same through the raw loop, which waits 8 ms per event in turn.
    redis_events: int
    redis_io_events: int
    redis_raw_io_events: int


FULL = Sizes(
    repeats=5,
    dispatch_events=20_000,
    warmup_events=5_000,
    latency_bursts=10,
    latency_burst=1_000,
    subscriptions=10_000,
    subscription_names=1_000,
    subscription_patterns=100,
    inline_events=20_000,
    retry_events=2_000,
    memory_events=1_000_000,
    memory_bound=10_000,
    durable_events=5_000,
    redis_events=5_000,
    redis_io_events=1_000,
    redis_raw_io_events=250,
)

QUICK = Sizes(
    repeats=1,
    dispatch_events=300,
    warmup_events=50,
    latency_bursts=2,
    latency_burst=100,
    subscriptions=400,
    subscription_names=40,
    subscription_patterns=10,
    inline_events=300,
    retry_events=50,
    memory_events=20_000,
    memory_bound=10_000,
    durable_events=300,
    redis_events=200,
    redis_io_events=100,
    redis_raw_io_events=25,
)
