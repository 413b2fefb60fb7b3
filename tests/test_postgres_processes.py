"""``emit(within=conn)`` and PostgresStore across real processes, on a real PostgreSQL server.

The processes run tests/support/postgres_worker.py: buses whose two handlers (``first``,
``second``) record every run in the application's ``runs`` table, its start and its end each
committed on its own with the server's clock, so lost work, duplicates and runs of one
delivery that overlapped in two processes can be read back after any SIGKILL.

1. Events emitted within transactions that roll back are never delivered anywhere; the one
   committed sentinel is, by a consumer in this process.
2. A process SIGKILLed on the line after its commit (before its bus could dispatch), 100
   times: the restart (a new bus, ``recover()`` and ``drain()``) runs each handler once.
3. Two consumer processes share 20,000 events committed while they run; one is SIGKILLed
   mid-run; the survivor finishes everything, and no delivery ran in both at once.
4. With nothing committed after the kill, a running consumer still takes a dead local
   process's deliveries over at once, without waiting for the lease.

Nothing here sleeps to wait for the code under test: the tests act on the children's lines
and on their own buses' handlers; where they wait for another process's progress in the
database, they poll it with a deadline.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

import psycopg
import pytest
import structlog

from eventbus import Event, UnknownEventError
from eventbus.stores import PostgresStore
from tests.support.children import ChildProcess, Children
from tests.support.postgres_worker import (
    EVENT,
    HANDLERS,
    Runs,
    application_name,
    create_tables,
    make_bus,
)

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess]

OPEN = "('pending', 'running', 'retrying')"


@pytest.fixture(autouse=True)
def _quiet_logs() -> None:
    """Only critical records (internal errors) from the buses of this process.
    (conftest restores structlog's defaults afterwards.)"""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


def rows(dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def scalar(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    return rows(dsn, query, params)[0][0]


class Finished:
    """Counts finished runs reported from other threads (handlers of a bus of this process,
    or a child's ``ran <k>`` lines); waits on a condition, never sleeps."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.counts: dict[str, int] = defaultdict(int)

    def set(self, who: str, count: int) -> None:
        with self._cond:
            self.counts[who] = max(self.counts[who], count)
            self._cond.notify_all()

    def total(self) -> int:
        with self._cond:
            return sum(self.counts.values())

    def wait_for(self, predicate: Callable[[int], bool], timeout: float) -> bool:
        """Wait until *predicate* (of the total) holds; False after *timeout* seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(sum(self.counts.values())), timeout)

    def wait_for_news(self, timeout: float) -> None:
        """Return at the next report, or after *timeout* seconds."""
        with self._cond:
            self._cond.wait(timeout)


# -- 1. rolled back: never delivered ---------------------------------------------------------

ROLLED_BACK = 200
#: How long a committed event may take to be run by a listening consumer (it takes ms).
SENTINEL_WAIT = 10.0


def test_events_emitted_within_rolled_back_transactions_are_never_delivered(
    postgres_dsn: str, children: Children
) -> None:
    """A process emits 200 events within transactions it rolls back (an exception in the
    transaction block, ``rollback()``, a failed statement), then one sentinel whose
    transaction it commits after closing its bus. A consumer of this process that recovered
    before runs the sentinel once per handler, hearing of its commit; no rolled-back event
    is stored, claimed or run."""
    dsn = postgres_dsn
    create_tables(dsn)
    finished = Finished()
    runs = Runs(dsn, on_run=lambda count: finished.set("consumer", count))
    consumer = make_bus(dsn, runs)
    try:
        assert consumer.recover() == 0
        emitter = children.script(
            "postgres_worker", "rollback", "--dsn", dsn, "--events", str(ROLLED_BACK),
            name="emitter", stdin=False,
        )  # fmt: skip
        sentinel = emitter.expect("sentinel ")
        assert emitter.wait() == 0, emitter.output()
        rolled_back = [line.split()[1] for line in emitter.lines if line.startswith("rolled-back")]
        assert len(set(rolled_back)) == ROLLED_BACK, emitter.output()
        # No drain(): the commit's notice alone makes the consumer claim and run it.
        assert finished.wait_for(lambda total: total >= len(HANDLERS), SENTINEL_WAIT), (
            f"the sentinel was not run within {SENTINEL_WAIT} s: "
            f"{rows(dsn, 'SELECT handler, state, owner FROM eventbus.deliveries')}"
        )
        assert consumer.drain(timeout=30)  # claims whatever else is committed: nothing
        for event_id in rolled_back[:: ROLLED_BACK // 10]:
            with pytest.raises(UnknownEventError):
                consumer.status(event_id)
    finally:
        consumer.close()
        runs.close()

    me = os.getpid()
    ran = rows(dsn, "SELECT event_id, handler, pid, ended IS NOT NULL FROM runs ORDER BY handler")
    assert ran == [(sentinel, h, me, True) for h in HANDLERS], f"runs: {ran}"
    assert rows(dsn, "SELECT id FROM eventbus.events") == [(sentinel,)]
    assert rows(
        dsn, "SELECT event_id, handler, state FROM eventbus.deliveries ORDER BY handler"
    ) == [(sentinel, h, "succeeded") for h in HANDLERS]
    assert rows(dsn, "SELECT label FROM orders") == [("sentinel",)]
    assert scalar(dsn, "SELECT count(*) FROM eventbus.dead_letters") == 0


# -- 2. SIGKILL on the line after the commit, 100 times --------------------------------------

TRIALS = 100


def _kill_after_commit_trial(trials: ChildProcess, dsn: str, trial: int) -> dict[str, Any]:
    """One trial: a process forked by *trials* commits its order and event and is SIGKILLed,
    then a bus of this process recovers and drains. Checks what each handler ran and returns
    what was seen."""
    label = f"trial-{trial}"
    trials.send(f"trial {label}")
    event_id = trials.expect("committing ")
    pid, signum = map(int, trials.expect("killed ").split())
    assert signum == signal.SIGKILL, f"{label}: the process ended with {signum}; {trials.output()}"
    assert scalar(dsn, "SELECT count(*) FROM orders WHERE label = %s", (label,)) == 1, (
        f"{label}: the order was not committed"
    )
    at_kill = {
        handler: (state, attempts, owner)
        for handler, state, attempts, owner in rows(
            dsn,
            "SELECT handler, state, attempts, owner FROM eventbus.deliveries WHERE event_id = %s",
            (event_id,),
        )
    }
    assert set(at_kill) == set(HANDLERS), f"{label}: deliveries at the kill: {at_kill}"

    runs = Runs(dsn)
    restart = make_bus(dsn, runs)
    try:
        recovered = restart.recover()
        assert restart.drain(timeout=30), f"{label}: drain() timed out"
    finally:
        restart.close()
        runs.close()
    ran: dict[str, list[tuple[int, bool]]] = defaultdict(list)
    for handler, run_pid, completed in rows(
        dsn, "SELECT handler, pid, ended IS NOT NULL FROM runs WHERE event_id = %s", (event_id,)
    ):
        ran[handler].append((run_pid, completed))
    me = os.getpid()
    for handler in HANDLERS:
        state, attempts, _ = at_kill[handler]
        killed_runs = [completed for run_pid, completed in ran[handler] if run_pid == pid]
        restart_runs = [completed for run_pid, completed in ran[handler] if run_pid == me]
        assert len(killed_runs) + len(restart_runs) == len(ran[handler]), f"{label}: {ran}"
        what = f"{label} {handler}: at the kill {at_kill[handler]}, runs {ran[handler]}"
        if state == "pending" and attempts == 0:  # the kill came first: the usual case
            assert (killed_runs, restart_runs) == ([], [True]), what
        elif state == "succeeded":  # the killed bus ran it and committed that
            assert (killed_runs, restart_runs) == ([True], []), what
        else:  # an attempt had begun: at least once, the second run after the restart
            assert len(killed_runs) <= 1, what
            assert restart_runs == [True], what
    assert rows(
        dsn, "SELECT handler, state FROM eventbus.deliveries WHERE event_id = %s ORDER BY 1",
        (event_id,),
    ) == [(h, "succeeded") for h in HANDLERS]  # fmt: skip
    expected = sum(at_kill[h][0] != "succeeded" for h in HANDLERS)
    assert recovered == expected, f"{label}: recover() queued {recovered}, at the kill {at_kill}"
    return {
        "event": event_id,
        "before_dispatch": all(at_kill[h][:2] == ("pending", 0) for h in HANDLERS),
        "killed_runs": sum(run_pid == pid for h in HANDLERS for run_pid, _ in ran[h]),
    }


@pytest.mark.timeout(120)
def test_sigkill_right_after_commit_then_restart_runs_each_handler_once(
    postgres_dsn: str, children: Children
) -> None:
    """100 processes each commit an event with their order and SIGKILL themselves on the next
    line, before their bus could dispatch it; after each, a restarted bus (``recover()``,
    ``drain()``) runs each handler exactly once. If a process was descheduled long enough for
    its bus to start a handler before the kill, that run counts: the restart runs it again
    only if it did not commit its success (at least once), and the trial is reported."""
    dsn = postgres_dsn
    create_tables(dsn)
    PostgresStore(dsn).close()  # the store's schema, before the first trial
    trials = children.script("postgres_worker", "trials", "--dsn", dsn, name="trials")
    trials.expect("ready")
    started = time.monotonic()
    results = [_kill_after_commit_trial(trials, dsn, trial) for trial in range(TRIALS)]
    elapsed = time.monotonic() - started
    trials.stop()
    assert len({r["event"] for r in results}) == TRIALS
    before_dispatch = sum(r["before_dispatch"] for r in results)
    # The point of the test: in most trials the kill came before any dispatch.
    assert before_dispatch >= TRIALS // 2, f"only {before_dispatch} kills came before dispatch"
    assert scalar(dsn, "SELECT count(*) FROM eventbus.dead_letters") == 0
    print(
        f"\n{TRIALS} trials passed in {elapsed:.1f} s; the kill came before dispatch in "
        f"{before_dispatch}; runs by killed processes: {sum(r['killed_runs'] for r in results)}"
    )


# -- 3. two consumers, 20,000 events, one SIGKILLed mid-run ----------------------------------

EVENTS = 20_000
BATCH = 100
WORKERS = 8
#: Finished runs (of both consumers) before one of them is killed ...
KILL_AT = 5_000
#: ... once it holds at least this many unfinished deliveries, one of them running.
VICTIM_HOLDS = 20
#: Deliveries committed and not yet run, at most, before the producer waits for the
#: consumers: production goes on well after the kill.
BACKLOG = 4_000
#: Bound on the whole run; only a broken store waits this long.
RUN_WAIT = 110.0
#: How long the server may take to end the sessions of a killed process.
SESSIONS_WAIT = 10.0


def _holdings(dsn: str) -> dict[int, tuple[int, int]]:
    """Unfinished deliveries held, and how many of them running, by owner pid."""
    return {
        int(pid): (held, running)
        for pid, held, running in rows(
            dsn,
            "SELECT split_part(owner, ':', 2), count(*), count(*) FILTER "
            "(WHERE state = 'running') FROM eventbus.deliveries "
            f"WHERE owner IS NOT NULL AND state IN {OPEN} GROUP BY 1",
        )
    }


class Killed:
    """SIGKILLs a consumer and notes the server's time once it and its sessions were gone,
    but before it was reaped (until then its owner still looks alive: nobody takes its work
    over), and the deliveries it held unfinished then, (event id, handler) -> state."""

    def __init__(self, child: ChildProcess, dsn: str) -> None:
        self.pid = child.proc.pid
        os.kill(self.pid, signal.SIGKILL)
        os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)  # dead, its pid not yet free
        # The server may still be running a statement the process sent just before it died
        # (an autocommit insert in ``runs`` commits all the same): its sessions end first.
        deadline = time.monotonic() + SESSIONS_WAIT
        pause = threading.Event()
        while scalar(
            dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name(self.pid),),
        ):
            assert time.monotonic() < deadline, f"sessions of {self.pid} outlived it"
            pause.wait(0.005)  # the server is ending another process's sessions
        self.at: datetime = scalar(dsn, "SELECT clock_timestamp()")
        self.unfinished: dict[tuple[str, str], str] = {
            (event_id, handler): state
            for event_id, handler, state in rows(
                dsn,
                "SELECT event_id, handler, state FROM eventbus.deliveries "
                f"WHERE split_part(owner, ':', 2) = %s AND state IN {OPEN}",
                (str(self.pid),),
            )
        }
        child.wait()  # reaped: from now on its owner is seen to be gone


def start_consumers(
    children: Children, dsn: str, finished: Finished, *options: str, names: tuple[str, ...]
) -> list[ChildProcess]:
    """Consumer processes on *dsn*, recovered (nothing there yet) and ready; their ``ran``
    lines go to *finished*."""
    started = []
    for name in names:

        def on_line(line: str, name: str = name) -> None:
            if line.startswith("ran "):
                finished.set(name, int(line.split()[1]))

        started.append(
            children.script(
                "postgres_worker", "consume", "--dsn", dsn, *options, name=name, on_line=on_line
            )
        )
    for child in started:
        assert int(child.expect("pid ")) == child.proc.pid
        assert child.expect("recovered ") == "0", child.output()
        child.expect("ready")
    return started


@pytest.mark.timeout(180)
def test_two_consumers_one_sigkilled_midrun_the_survivor_finishes_without_overlap(
    postgres_dsn: str, children: Children
) -> None:
    """20,000 events are committed in transactions of 100 while two consumer processes (8
    workers each) run them; after 5,000 runs, the one holding work is SIGKILLed. The survivor
    finishes every (event, handler); no delivery ran in both processes at once (a run the
    kill cut short lasts until the kill); a delivery ran twice only if it was in flight
    (``running``) at the kill.

    The producer is this process, writing with ``PostgresStore.add_within`` (what
    ``emit(within=conn)`` runs): a bus that emits ``within=`` starts claiming committed work
    itself, and would be a third consumer."""
    dsn = postgres_dsn
    create_tables(dsn)
    finished = Finished()
    consumers = start_consumers(
        children, dsn, finished, "--workers", str(WORKERS), names=("consumer-a", "consumer-b")
    )
    producer = PostgresStore(dsn)
    emitted: list[str] = []
    killed: Killed | None = None
    at_kill: dict[str, Any] = {}
    started = time.monotonic()
    deadline = started + RUN_WAIT
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while len(emitted) < EVENTS:
                committed = len(emitted)
                behind = committed * len(HANDLERS) - BACKLOG  # runs that must have finished
                assert finished.wait_for(behind.__lt__, deadline - time.monotonic()), (
                    f"the consumers stopped: {dict(finished.counts)} runs, {committed} committed"
                )
                with conn.transaction():
                    for n in range(committed, committed + BATCH):
                        event = Event(name=EVENT, payload={"n": n})
                        producer.add_within(conn, event, HANDLERS)
                        emitted.append(event.id)
                if killed is None and finished.total() >= KILL_AT:
                    held = _holdings(dsn)
                    busy = [
                        c
                        for c in consumers
                        if held.get(c.proc.pid, (0, 0))[0] >= VICTIM_HOLDS
                        and held[c.proc.pid][1] >= 1
                    ]
                    if busy:
                        victim = max(busy, key=lambda c: held[c.proc.pid])
                        at_kill = {"runs": dict(finished.counts), "committed": len(emitted)}
                        killed = Killed(victim, dsn)
        produced = time.monotonic() - started
        assert killed is not None, "no consumer held work after 5,000 runs: the kill never came"
        survivor = next(c for c in consumers if c.proc.pid != killed.pid)

        # The survivor's progress, in the store: every delivery succeeded.
        expected_deliveries = EVENTS * len(HANDLERS)
        while (
            done := scalar(
                dsn, "SELECT count(*) FROM eventbus.deliveries WHERE state = 'succeeded'"
            )
        ) < expected_deliveries:
            assert time.monotonic() < deadline, (
                f"{done} of {expected_deliveries} deliveries succeeded after {RUN_WAIT} s; "
                f"unfinished held by pid: {_holdings(dsn)}; killed: {killed.pid}"
            )
            finished.wait_for_news(0.2)  # the survivor prints a line every 100 runs
        elapsed = time.monotonic() - started
        survivor.send("drain")
        survivor.expect("drained")
        survivor.stop()
    finally:
        producer.close()

    runs = rows(dsn, "SELECT event_id, handler, pid, started, ended FROM runs")
    expected = {(e, h) for e in emitted for h in HANDLERS}
    by_delivery: dict[tuple[str, str], list[tuple[int, datetime, datetime | None]]] = defaultdict(
        list
    )
    for event_id, handler, pid, start, end in runs:
        by_delivery[event_id, handler].append((pid, start, end))
    foreign = set(by_delivery) - expected
    assert not foreign, f"runs of deliveries never committed: {sorted(foreign)[:5]}"
    unfinished = [d for d in expected if not any(end for _, _, end in by_delivery.get(d, []))]
    assert not unfinished, f"{len(unfinished)} deliveries never completed: {unfinished[:5]}"
    late = [
        (delivery, run)
        for delivery, delivered in by_delivery.items()
        for run in delivered
        if run[0] == killed.pid and max(run[1], run[2] or run[1]) > killed.at
    ]
    assert not late, f"runs of the killed process after it was gone: {late[:5]}"

    overlaps, twice_in_one, duplicates = [], [], []
    for delivery, delivered in by_delivery.items():
        if len(delivered) == 1:
            continue
        duplicates.append(delivery)
        pids = [pid for pid, _, _ in delivered]
        if len(set(pids)) < len(pids):
            twice_in_one.append((delivery, delivered))
        spans = sorted((start, end or killed.at, pid) for pid, start, end in delivered)
        for (_, end_a, pid_a), (start_b, _, pid_b) in itertools.pairwise(spans):
            if pid_a != pid_b and start_b < end_a:
                overlaps.append((delivery, delivered))
    assert not overlaps, f"{len(overlaps)} deliveries ran in two processes at once: {overlaps[:3]}"
    assert not twice_in_one, f"deliveries run twice by one process: {twice_in_one[:3]}"
    in_flight = {d for d, state in killed.unfinished.items() if state == "running"}
    unexplained = [d for d in duplicates if d not in in_flight]
    assert not unexplained, (
        f"{len(unexplained)} deliveries ran twice though not in flight at the kill: "
        f"{[(d, by_delivery[d]) for d in unexplained[:3]]}"
    )
    # Running at the kill: at most an attempt and a finished one not yet committed per worker.
    assert len(in_flight) <= 2 * WORKERS, f"{len(in_flight)} deliveries running at the kill"
    assert rows(dsn, "SELECT state, count(*) FROM eventbus.deliveries GROUP BY 1") == [
        ("succeeded", expected_deliveries)
    ]
    assert scalar(dsn, "SELECT count(*) FROM eventbus.dead_letters") == 0

    first_start = min(start for _, _, _, start, _ in runs)
    last_end = max(end for _, _, _, _, end in runs if end is not None)
    span = (last_end - first_start).total_seconds()
    cut_short = sum(1 for _, _, pid, _, end in runs if pid == killed.pid and end is None)
    taken_over = [
        start for d in killed.unfinished for pid, start, _ in by_delivery[d] if pid != killed.pid
    ]
    print(
        f"\n{EVENTS} events, {len(runs)} runs in {span:.1f} s ({len(runs) / span:.0f} runs/s); "
        f"produced in {produced:.1f} s, all succeeded after {elapsed:.1f} s. Killed pid "
        f"{killed.pid} after {at_kill['runs']} finished runs with {at_kill['committed']} "
        f"events committed, holding {len(killed.unfinished)} unfinished ({len(in_flight)} "
        f"running, {cut_short} runs cut short); first takeover run "
        f"{(min(taken_over) - killed.at).total_seconds():.3f} s after the kill; "
        f"{len(duplicates)} deliveries ran twice; {len(overlaps)} overlaps"
    )


# -- 4. no new work after the kill: the survivor must still take over at once -----------------

TAKEOVER_EVENTS = 20
#: "At once" (docs/durability.md, PostgreSQL): at the survivor's next look (every
#: ``poll_interval``, 1 s), not after the 30 s lease.
TAKEOVER_WAIT = 5.0


def test_a_running_consumer_takes_over_a_dead_local_process_without_new_work(
    postgres_dsn: str, children: Children
) -> None:
    """A consumer claims 20 events and is SIGKILLed while its handlers run; another consumer,
    running since before the kill, takes its deliveries over at its next look (its pid is
    gone from this host) though nothing new is committed afterwards."""
    dsn = postgres_dsn
    create_tables(dsn)
    finished = Finished()
    producer = PostgresStore(dsn)
    try:
        (victim,) = start_consumers(
            children, dsn, finished, "--workers", "2", "--hold", names=("victim",)
        )
        with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
            for n in range(TAKEOVER_EVENTS):
                producer.add_within(conn, Event(name=EVENT, payload={"n": n}), HANDLERS)
        deliveries = TAKEOVER_EVENTS * len(HANDLERS)
        deadline = time.monotonic() + SENTINEL_WAIT
        pause = threading.Event()
        while _holdings(dsn).get(victim.proc.pid) != (deliveries, 2):
            assert time.monotonic() < deadline, f"the victim holds {_holdings(dsn)}"
            pause.wait(0.01)  # the victim process claims and starts two runs
        start_consumers(children, dsn, finished, "--progress", "1", names=("survivor",))
        killed = Killed(victim, dsn)
        assert len(killed.unfinished) == deliveries
        taken_over = finished.wait_for(lambda total: total >= deliveries, TAKEOVER_WAIT)
        assert taken_over, (
            f"{finished.total()} of {deliveries} deliveries of the dead process run by the "
            f"survivor {TAKEOVER_WAIT} s after the kill; held: {_holdings(dsn)}"
        )
    finally:
        producer.close()
