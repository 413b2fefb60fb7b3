"""The durable promise of EventBus(store=SQLiteStore(path)) under real crashes.

Processes running tests/support/crash_worker.py are SIGKILLed at chosen moments (the test acts
on the progress lines they print; nothing here sleeps), then a new process recovers. The worker's
handlers record their effects in a separate SQLite file: ``effects`` (one row per event id)
and ``invocations`` (one row per call), so lost work and duplicates can be counted.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import signal
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog
import tenacity
from structlog.testing import capture_logs

from eventbus import Event, EventBus, RetryPolicy
from eventbus.stores import SQLiteStore
from tests.support.children import ChildProcess, Children

pytestmark = pytest.mark.multiprocess

#: Generous bound on drain(); only a broken bus waits this long.
LOAD_WAIT = 30.0


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    """Only critical records (internal errors) from the in-process bus: it makes thousands.
    (conftest restores structlog's defaults afterwards.)"""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


@pytest.fixture
def spawn(children: Children) -> Any:
    """Start crash_worker.py processes (stdin a pipe only if *stdin*); every one is killed
    and reaped when the test ends."""

    def start(*args: str, stdin: bool = False) -> ChildProcess:
        return children.script("crash_worker", *args, stdin=stdin, name=f"worker-{next(numbers)}")

    numbers = itertools.count()
    return start


def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(sql, params).fetchall()


def scalar(path: Path, sql: str, params: tuple[Any, ...] = ()) -> Any:
    return query(path, sql, params)[0][0]


def states(db: Path) -> dict[str, int]:
    return dict(query(db, "SELECT state, count(*) FROM deliveries GROUP BY state"))


# -- 1. a burst of slow deliveries, killed half-way ------------------------------------------

BURST = 1000
BURST_WORKERS = 4
KILL_AFTER = 300


def test_burst_killed_midway_loses_nothing_and_duplicates_at_most_pool_size(
    tmp_path: Path, spawn: Any
) -> None:
    """1,000 emitted events survive a SIGKILL mid-burst: recovery completes every one, with at
    most one duplicate per worker thread."""
    db, effects = tmp_path / "bus.db", tmp_path / "effects.db"
    common = ["--db", str(db), "--effects", str(effects), "--handler", "record"]
    common += ["--workers", str(BURST_WORKERS), "--work", "0.002"]

    first = spawn(*common, "--emit", str(BURST), "--gate", "--progress")
    assert first.expect("emit-errors").startswith("0 "), first.lines[-1]
    while int(first.expect("effects ")) < KILL_AFTER:
        pass
    first.kill()
    at_kill = scalar(effects, "SELECT count(*) FROM effects")
    left = states(db)
    open_at_kill = BURST - left.get("succeeded", 0)
    assert KILL_AFTER <= at_kill < BURST, f"the kill did not land mid-burst: {at_kill} effects"
    assert sum(left.values()) == BURST, f"emitted deliveries in the store at the kill: {left}"

    second = spawn(*common, "--recover")
    recovered = int(second.expect("recovered "))
    assert second.wait() == 0, second.stderr()
    assert recovered == open_at_kill, (
        f"recover() queued {recovered}, the store held {open_at_kill} unfinished ({left})"
    )

    unique = scalar(effects, "SELECT count(*) FROM effects")
    calls = scalar(effects, "SELECT count(*) FROM invocations")
    duplicates = calls - unique
    assert unique == BURST, f"{BURST - unique} of {BURST} events lost ({at_kill} at the kill)"
    assert duplicates <= BURST_WORKERS, (
        f"{duplicates} duplicated invocations, more than the {BURST_WORKERS} worker threads"
    )
    assert states(db) == {"succeeded": BURST}


# -- 2. SIGKILL as soon as emit() returns ----------------------------------------------------

TRIALS = 50


def test_sigkill_right_after_emit_returns_then_recovery_runs_the_handler(
    tmp_path: Path, spawn: Any
) -> None:
    """50 times: a process is killed the moment emit() returned; the next process recovers the
    event and its handler runs exactly once."""
    db, effects = tmp_path / "bus.db", tmp_path / "effects.db"
    # A chain: process k recovers process k-1's event, then emits its own and is killed. Its
    # handler holds (never finishes) after recovery, so every effect comes from a recovery.
    common = ["--db", str(db), "--effects", str(effects), "--handler", "record", "--recover"]
    emitted: list[str] = []
    recovered: list[int] = []
    for _ in range(TRIALS):
        worker = spawn(*common, "--hold", "--emit", "1", "--print-ids", "--hang", stdin=True)
        recovered.append(int(worker.expect("recovered ")))
        emitted.append(worker.expect("emitted "))
        worker.kill()
    last = spawn(*common)
    recovered.append(int(last.expect("recovered ")))
    assert last.wait() == 0, last.stderr()

    assert recovered == [0] + [1] * TRIALS, f"recover() counts per process: {recovered}"
    done = {e for (e,) in query(effects, "SELECT event_id FROM effects")}
    missing = [e for e in emitted if e not in done]
    assert not missing, f"{len(missing)} of {TRIALS} emitted events never handled: {missing[:3]}"
    calls = dict(query(effects, "SELECT event_id, count(*) FROM invocations GROUP BY event_id"))
    assert calls == dict.fromkeys(emitted, 1), f"invocations per event: {calls}"
    assert states(db) == {"succeeded": TRIALS}


# -- 3. SIGKILL inside the handler -----------------------------------------------------------

MAX_ATTEMPTS = 3


def test_handler_killing_its_process_becomes_an_exhausted_dead_letter(
    tmp_path: Path, spawn: Any
) -> None:
    """A handler that SIGKILLs its process has each attempt counted before it runs, and after
    max_attempts restarts recovery makes it a dead letter ("exhausted") instead of looping."""
    db, effects = tmp_path / "bus.db", tmp_path / "effects.db"
    common = ["--db", str(db), "--effects", str(effects), "--handler", "kill"]
    common += ["--max-attempts", str(MAX_ATTEMPTS)]

    first = spawn(*common, "--emit", "1", "--print-ids", "--gate")
    event_id = first.expect("emitted ")
    assert first.wait() == -signal.SIGKILL, first.stderr()
    row = query(db, "SELECT state, attempts FROM deliveries WHERE event_id = ?", (event_id,))
    assert row == [("running", 1)], f"the store after a kill inside attempt 1: {row}"

    restarts = 0
    while True:
        restarts += 1
        assert restarts <= MAX_ATTEMPTS, f"still no dead letter after {restarts - 1} restarts"
        worker = spawn(*common, "--recover")
        rc = worker.wait()
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, f"restart {restarts}: rc {rc}: {worker.stderr()}"
        attempts = scalar(db, "SELECT attempts FROM deliveries WHERE event_id = ?", (event_id,))
        assert attempts == restarts + 1, f"attempts after restart {restarts}: {attempts}"

    assert restarts == MAX_ATTEMPTS, f"dead-lettered at restart {restarts}"
    assert "recovered 0" in worker.lines, worker.lines
    calls = scalar(effects, "SELECT count(*) FROM invocations")
    assert calls == MAX_ATTEMPTS, f"the handler ran {calls} times, max_attempts={MAX_ATTEMPTS}"
    store = SQLiteStore(db)
    try:
        letters = store.dead_letters()
    finally:
        store.close()
    assert [(d.event.id, d.reason, d.attempts) for d in letters] == [
        (event_id, "exhausted", MAX_ATTEMPTS)
    ], letters

    again = spawn(*common, "--recover")
    assert again.wait() == 0, again.stderr()
    assert "recovered 0" in again.lines, again.lines
    calls = scalar(effects, "SELECT count(*) FROM invocations")
    assert calls == MAX_ATTEMPTS, f"the dead letter's handler ran again: {calls} calls"


# -- 4. sustained write contention -----------------------------------------------------------

THREADS = 8
PER_THREAD = 400


def test_eight_emitting_threads_and_retries_never_see_a_locked_database(
    tmp_path: Path,
) -> None:
    """8 threads emit 3,200 events whose handler fails once each: no emitter gets an error, no
    store write fails, and every delivery ends succeeded after exactly 2 attempts."""
    db = tmp_path / "bus.db"
    seen: set[str] = set()
    lock = threading.Lock()
    calls = [0]

    def flaky(event: Event) -> None:
        with lock:
            calls[0] += 1
            first = event.id not in seen
            seen.add(event.id)
        if first:
            raise RuntimeError("the first attempt fails")

    errors: list[BaseException] = []
    bus = EventBus(
        store=SQLiteStore(db),
        max_workers=4,
        retry=RetryPolicy(max_attempts=3, wait=tenacity.wait_none()),
    )
    bus.subscribe("job", flaky, name="flaky")
    barrier = threading.Barrier(THREADS)

    def emit_some(thread: int) -> None:
        barrier.wait()
        for i in range(PER_THREAD):
            try:
                bus.emit("job", {"n": i, "thread": thread})
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                with lock:
                    errors.append(exc)

    with capture_logs() as logs:
        try:
            threads = [threading.Thread(target=emit_some, args=(t,)) for t in range(THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert bus.drain(timeout=LOAD_WAIT), "deliveries still open after 30 s"
        finally:
            bus.close()

    total = THREADS * PER_THREAD
    assert not errors, f"{len(errors)} emits raised, first: {errors[0]!r}"
    internal = [entry for entry in logs if entry["event"] == "eventbus.internal_error"]
    assert not internal, f"{len(internal)} store writes failed, first: {internal[0]}"
    assert calls[0] == 2 * total, f"{calls[0]} handler calls for {total} events"
    rows = query(db, "SELECT state, attempts, count(*) FROM deliveries GROUP BY state, attempts")
    assert rows == [("succeeded", 2, total)], f"(state, attempts, deliveries): {rows}"


PROCESSES = 2
PROCESS_THREADS = 4
PROCESS_PER_THREAD = 300


def test_two_processes_emitting_into_one_file_never_see_a_locked_database(
    tmp_path: Path, spawn: Any
) -> None:
    """Two processes, each with its own bus and 4 emitting threads, write the same file at
    once: no emit or store write fails and every delivery succeeds after exactly 2 attempts."""
    db = tmp_path / "bus.db"
    args = ["--db", str(db), "--handler", "flaky", "--no-wait", "--ready"]
    args += ["--threads", str(PROCESS_THREADS), "--emit", str(PROCESS_PER_THREAD)]
    workers = [spawn(*args, stdin=True) for _ in range(PROCESSES)]
    for worker in workers:
        worker.expect("ready")
    for worker in workers:  # both start emitting together
        worker.send("go")

    per_process = PROCESS_THREADS * PROCESS_PER_THREAD
    for number, worker in enumerate(workers):
        assert worker.expect("emit-errors ").startswith("0 "), f"process {number}: {worker.lines}"
        calls = int(worker.expect("calls "))
        logs = json.loads(worker.expect("logs "))
        assert worker.wait() == 0, worker.stderr()
        assert "eventbus.internal_error" not in logs, f"process {number}: {worker.stderr()}"
        assert calls == 2 * per_process, f"process {number}: {calls} calls for {per_process}"
    rows = query(db, "SELECT state, attempts, count(*) FROM deliveries GROUP BY state, attempts")
    total = PROCESSES * per_process
    assert rows == [("succeeded", 2, total)], f"(state, attempts, deliveries): {rows}"
