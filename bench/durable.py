"""Durable dispatch: events/s with 4 handlers through ``SQLiteStore``, beside a raw ``sqlite3``
loop doing the same inserts and updates in the same run.

* **eventbus**: ``EventBus(store=SQLiteStore(tmp/"events.db"), max_workers=8)``, 4 trivial
  handlers; one thread emits N events back to back (each ``emit()`` timed alone), then the
  clock stops once all 4N handler calls were counted and ``bus.drain()`` returned.
  ``SQLiteStore`` commits the event and its deliveries before ``emit()`` returns and each
  attempt's start before the handler runs; successes are committed lazily, batched with later
  writes. What ``close()`` then costs (the last deferred successes, the owner's release) is
  reported beside, not in, the rate.
* **raw sqlite3 loop**: one thread, plain ``sqlite3`` with SQLiteStore's pragmas (WAL,
  ``synchronous=NORMAL``, ``busy_timeout``), schema and statements, the naive write pattern with
  the same guarantees: per event one ``BEGIN IMMEDIATE`` transaction inserting the event and its
  4 delivery rows; then per handler a committed UPDATE to 'running' (attempts=1), the handler
  call, and a committed UPDATE to 'succeeded'. 9 commits per event.
* **raw sqlite3 loop, one transaction per event** (upper bound, information only): the same
  statements and handler calls inside one transaction per event. It does NOT give the
  per-attempt guarantee (a crash inside a handler loses the record of the attempt).

Every trial uses a fresh temporary directory (a fresh database); after each trial the file is
read back to check that it holds N events and 4N succeeded deliveries.
"""

from __future__ import annotations

import gc
import itertools
import json
import sqlite3
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
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
    make_handlers,
    median,
    percentile,
    subscribe_all,
)

HANDLERS = 4
#: SQLiteStore's default busy_timeout, in seconds.
BUSY_TIMEOUT = 5.0
SCENARIO = f"durable (SQLite), {HANDLERS} handlers"
LATENCY = "durable (SQLite) emit() latency {q}, 4 handlers"
EVENTBUS = f"eventbus EventBus(store=SQLiteStore, max_workers={WORKERS})"
RAW = "raw sqlite3 loop, commit per attempt (same guarantees)"
RAW_ONE_TX = "raw sqlite3 loop, 1 transaction/event (upper bound, NO per-attempt commit)"


@dataclass
class DurableTrial:
    seconds: float
    events: int
    handled: int
    finished: bool
    stored_events: int
    stored_succeeded: int
    close_seconds: float = 0.0
    emit_ns: array | None = None

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def ok(self) -> bool:
        expected = self.events * HANDLERS
        return (
            self.finished
            and self.handled == expected
            and self.stored_events == self.events
            and self.stored_succeeded == expected
        )


def _schema() -> str:
    from eventbus.stores import sqlite as store_module

    return store_module._SCHEMA  # the very schema SQLiteStore creates


def _stored_counts(path: Path) -> tuple[int, int]:
    """(events, succeeded deliveries) in the database file, read on a fresh connection."""
    db = sqlite3.connect(path)
    try:
        events = db.execute("SELECT count(*) FROM events").fetchone()[0]
        succeeded = db.execute(
            "SELECT count(*) FROM deliveries WHERE state = 'succeeded'"
        ).fetchone()[0]
    finally:
        db.close()
    return events, succeeded


# -- eventbus ----------------------------------------------------------------------------------


def _eventbus_trial(
    directory: Path, tally: Tally, handlers: Sequence[Any], events: int
) -> DurableTrial:
    from eventbus import EventBus
    from eventbus.stores import SQLiteStore

    path = directory / "events.db"
    bus = EventBus(store=SQLiteStore(path), max_workers=WORKERS, name="bench-durable")
    return bus_trial(bus, tally, handlers, events, lambda: _stored_counts(path))


# -- raw sqlite3 -------------------------------------------------------------------------------

_INSERT_EVENT = "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_DELIVERY = (
    "INSERT INTO deliveries (event_id, handler, state, owner) VALUES (?, ?, 'pending', ?)"
)
_RUNNING = (
    "UPDATE deliveries SET state = 'running', attempts = ? WHERE event_id = ? AND handler = ?"
)
_SUCCEEDED = (
    "UPDATE deliveries SET state = 'succeeded', error = NULL, due_at = NULL, "
    "owner = NULL WHERE event_id = ? AND handler = ?"
)


def _raw_connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
    db.execute("BEGIN IMMEDIATE")
    for statement in _schema().split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("INSERT INTO owners VALUES (?, ?)", ("bench-raw", time.time()))
    db.execute("COMMIT")
    return db


def _event_row(event_id: str) -> tuple[Any, ...]:
    """The events row SQLiteStore writes for the benchmark's event (payload as JSON)."""
    return (
        event_id,
        EVENT_NAME,
        None,
        json.dumps(PAYLOAD),
        json.dumps({}),
        datetime.now(UTC).isoformat(),
        None,
        time.time(),
    )


def _raw_loop(db: sqlite3.Connection, handlers: Sequence[Any], events: int) -> None:
    """Per event: one transaction for the event and its deliveries, then per handler a
    committed 'running', the call, a committed 'succeeded' (SQLiteStore's guarantees)."""
    execute, executemany = db.execute, db.executemany
    names = [f"bench.handler_{i}" for i in range(len(handlers))]
    pairs = list(zip(names, handlers, strict=True))
    ids = itertools.count()
    for _ in range(events):
        event_id = f"raw-{next(ids)}"
        execute("BEGIN IMMEDIATE")
        execute(_INSERT_EVENT, _event_row(event_id))
        executemany(_INSERT_DELIVERY, [(event_id, name, "bench-raw") for name in names])
        execute("COMMIT")
        for name, handler in pairs:
            execute("BEGIN IMMEDIATE")
            execute(_RUNNING, (1, event_id, name))
            execute("COMMIT")
            handler(PAYLOAD)
            execute("BEGIN IMMEDIATE")
            execute(_SUCCEEDED, (event_id, name))
            execute("COMMIT")


def _raw_loop_one_transaction(db: sqlite3.Connection, handlers: Sequence[Any], events: int) -> None:
    """The same statements and calls in one transaction per event: an upper bound only."""
    execute, executemany = db.execute, db.executemany
    names = [f"bench.handler_{i}" for i in range(len(handlers))]
    pairs = list(zip(names, handlers, strict=True))
    ids = itertools.count()
    for _ in range(events):
        event_id = f"raw-{next(ids)}"
        execute("BEGIN IMMEDIATE")
        execute(_INSERT_EVENT, _event_row(event_id))
        executemany(_INSERT_DELIVERY, [(event_id, name, "bench-raw") for name in names])
        for name, handler in pairs:
            execute(_RUNNING, (1, event_id, name))
            handler(PAYLOAD)
            execute(_SUCCEEDED, (event_id, name))
        execute("COMMIT")


def _raw_trial(
    loop: Callable[[sqlite3.Connection, Sequence[Any], int], None],
    directory: Path,
    tally: Tally,
    handlers: Sequence[Any],
    events: int,
) -> DurableTrial:
    path = directory / "events.db"
    db = _raw_connect(path)
    return raw_trial(
        lambda: loop(db, handlers, events), db.close, tally, events, lambda: _stored_counts(path)
    )


# -- trials and rows (bench/postgres.py's PostgresStore scenario uses them too) ----------------


def bus_trial(
    bus: Any,
    tally: Tally,
    handlers: Sequence[Any],
    events: int,
    stored: Callable[[], tuple[int, int]],
) -> DurableTrial:
    """The eventbus trial on *bus* (made for it, closed here): *handlers* subscribed, *events*
    events emitted back to back (each ``emit()`` timed alone), the clock stopped once every
    handler call was counted and ``bus.drain()`` returned; ``close()`` timed apart, then
    *stored* reads back (events, succeeded deliveries)."""
    try:
        subscribe_all(bus, handlers)
        tally.reset(events * HANDLERS)
        samples = array("q", bytes(8 * events))
        clock = time.perf_counter_ns
        emit = bus.emit
        payload = PAYLOAD
        gc.collect()
        start = time.perf_counter()
        for i in range(events):
            t0 = clock()
            emit(EVENT_NAME, payload)
            samples[i] = clock() - t0
        finished = tally.done.wait(WAIT_TIMEOUT) and bus.drain(WAIT_TIMEOUT)
        seconds = time.perf_counter() - start
    finally:
        closing = time.perf_counter()
        bus.close()
        close_seconds = time.perf_counter() - closing
    stored_events, stored_succeeded = stored()
    return DurableTrial(
        seconds,
        events,
        tally.handled(),
        finished,
        stored_events,
        stored_succeeded,
        close_seconds,
        samples,
    )


def raw_trial(
    loop: Callable[[], None],
    close: Callable[[], None],
    tally: Tally,
    events: int,
    stored: Callable[[], tuple[int, int]],
) -> DurableTrial:
    """A raw loop's trial: *loop* (which runs *events* events through the handlers) timed until
    every handler call was counted; then, outside the clock, *close* (its connection) and
    *stored*, which reads back (events, succeeded deliveries)."""
    try:
        tally.reset(events * HANDLERS)
        gc.collect()
        start = time.perf_counter()
        loop()
        finished = tally.done.wait(WAIT_TIMEOUT)
        seconds = time.perf_counter() - start
    finally:
        close()
    stored_events, stored_succeeded = stored()
    return DurableTrial(seconds, events, tally.handled(), finished, stored_events, stored_succeeded)


def run_trials(
    what: str,
    runners: dict[str, Callable[[int], DurableTrial]],
    events: int,
    warmup: int,
    repeats: int,
) -> dict[str, list[DurableTrial]]:
    """Each runner's trials: one warm-up trial of *warmup* events each (imports, caches, code
    paths; a RuntimeError naming *what* unless it came out right), then *repeats* rounds of
    *events* events, each runner once per round (round robin: drift spreads evenly over them)."""
    for name, run in runners.items():
        trial = run(warmup)
        if not trial.ok:
            raise RuntimeError(f"{what} warm-up of {name!r} came out wrong: {trial}")
    trials: dict[str, list[DurableTrial]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            trials[name].append(run(events))
    return trials


def trial_rows(
    trials: dict[str, list[DurableTrial]],
    events: int,
    *,
    scenario: str,
    latency: str,
    eventbus: str,
    reference: str,
) -> list[Row]:
    """A *scenario* row per runner (events/s, median of its trials, with its ratio to the
    *reference* runner's; the *eventbus* runner's also says what ``close()`` cost), then the
    *eventbus* runner's ``emit()`` latency rows (*latency* with ``{q}`` = p50, p99; in us)."""
    rows: list[Row] = []
    for name, runs in trials.items():
        values = [t.rate for t in runs]
        detail: dict[str, Any] = {
            "events_per_trial": events,
            "handled": sum(t.handled for t in runs),
            "expected": sum(t.events * HANDLERS for t in runs),
            "stored_events": sum(t.stored_events for t in runs),
            "stored_succeeded_deliveries": sum(t.stored_succeeded for t in runs),
            "best": max(values),
        }
        if name == eventbus:
            detail["close_seconds_median"] = median([t.close_seconds for t in runs])
            detail["events_per_s_including_close"] = median(
                [t.events / (t.seconds + t.close_seconds) for t in runs]
            )
        rows.append(
            Row(
                scenario,
                name,
                median(values),
                "events/s",
                samples=values,
                ok=all(t.ok for t in runs),
                detail=detail,
            )
        )
    by = {r.dispatcher: r for r in rows}
    for row in rows:
        row.ratio = row.value / by[reference].value
        row.ratio_to = reference

    bus_runs = trials[eventbus]
    for q, label in ((0.50, "p50"), (0.99, "p99")):
        per_trial = [percentile(sorted(t.emit_ns or ()), q) / 1000 for t in bus_runs]
        rows.append(
            Row(
                latency.format(q=label),
                eventbus,
                median(per_trial),
                "us",
                samples=per_trial,
                ok=by[eventbus].ok,
                detail={
                    "emits_per_trial": events,
                    "max_us": max(max(t.emit_ns or (0,)) for t in bus_runs) / 1000,
                },
            )
        )
    return rows


# -- the scenario ------------------------------------------------------------------------------


def _in_fresh_directory(
    trial: Callable[[Path, int], DurableTrial],
) -> Callable[[int], DurableTrial]:
    """*trial* with a fresh temporary directory (a fresh database) each time it runs."""

    def run(events: int) -> DurableTrial:
        with tempfile.TemporaryDirectory(prefix="eventbus-bench-durable-") as directory:
            return trial(Path(directory), events)

    return run


def durable(sizes: Sizes) -> Section:
    """events/s with 4 handlers through SQLiteStore vs raw sqlite3 loops, same run."""
    events = sizes.durable_events
    warmup = max(1, events // 10)
    tally = Tally()
    handlers = make_handlers(tally, HANDLERS)
    runners = {
        EVENTBUS: _in_fresh_directory(lambda d, n: _eventbus_trial(d, tally, handlers, n)),
        RAW: _in_fresh_directory(lambda d, n: _raw_trial(_raw_loop, d, tally, handlers, n)),
        RAW_ONE_TX: _in_fresh_directory(
            lambda d, n: _raw_trial(_raw_loop_one_transaction, d, tally, handlers, n)
        ),
    }
    trials = run_trials("durable", runners, events, warmup, sizes.repeats)
    return Section(
        trial_rows(
            trials, events, scenario=SCENARIO, latency=LATENCY, eventbus=EVENTBUS, reference=RAW
        )
    )
