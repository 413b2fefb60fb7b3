"""RedisStreamsTransport across real processes, with consumers killed by SIGKILL.

Processes running tests/support/redis_worker.py share one consumer group on a real
redis-server of the test's own. The test acts on the progress lines they print (``ready``,
``handled <k>``); their handler records its effect idempotently in a shared SQLite file
(``effects``: one row per event id; ``invocations``: one row per call), so lost events and
duplicates can be counted after a kill.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.children import ChildProcess, Children
from tests.support.redis import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess]

STREAM, GROUP = "jobs", "effects"
#: Bound on any one wait for a process's line; only a broken transport waits this long.
LINE_WAIT = 30.0


# -- worker processes ------------------------------------------------------------------------


@pytest.fixture
def spawn(own_redis: RedisServer, children: Children) -> Any:
    """Start redis_worker.py processes on the test's own server and stream; every one is
    killed and reaped when the test ends."""
    where = ["--url", own_redis.url, "--stream", STREAM, "--group", GROUP]
    numbers = itertools.count()

    def start(mode: str, *args: str) -> ChildProcess:
        return children.script("redis_worker", mode, *where, *args, name=f"worker-{next(numbers)}")

    return start


@pytest.fixture
def client(own_redis: RedisServer) -> Iterator[Any]:
    """A plain Redis client on the test's server, for XPENDING."""
    c = redis.Redis.from_url(own_redis.url, decode_responses=True)
    yield c
    c.close()


@pytest.fixture
def effects(tmp_path: Path) -> Path:
    """The shared effects file, its tables created before any consumer starts."""
    path = tmp_path / "effects.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE invocations "
            "(id INTEGER PRIMARY KEY, event_id TEXT NOT NULL, consumer TEXT NOT NULL)"
        )
        db.execute("CREATE TABLE effects (event_id TEXT PRIMARY KEY, n INTEGER)")
        db.commit()
    return path


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        return db.execute(sql).fetchall()


def scalar(path: Path, sql: str) -> Any:
    return query(path, sql)[0][0]


def pending_of(client: Any, consumer: str | None = None) -> int:
    """Entries of the group not acknowledged (those of *consumer* only, if given)."""
    summary = client.xpending(STREAM, GROUP)
    if consumer is None:
        return int(summary["pending"])
    return sum(int(c["pending"]) for c in summary["consumers"] if c["name"] == consumer)


def wait_for_effects(path: Path, count: int, timeout: float) -> int:
    """Wait until *path* holds *count* effects (or *timeout* passed); return the count.

    Polling is acceptable here only because it observes other processes' progress: no
    single process knows when the group as a whole is done."""
    deadline = time.monotonic() + timeout
    while True:
        done = scalar(path, "SELECT count(*) FROM effects")
        if done >= count or time.monotonic() >= deadline:
            return int(done)
        threading.Event().wait(0.05)


# -- 1. three consumers, one SIGKILLed mid-way -----------------------------------------------

EVENTS = 10_000
CONSUMERS = ("victim", "survivor-1", "survivor-2")
WORKERS = 6  # max_workers of each consumer
#: Seconds of simulated work per call: at most WORKERS / WORK = 300 events/s per consumer,
#: below the producer's rate, so the victim holds a backlog of read, unacknowledged entries
#: when it is killed (without it the consumers keep up and hold almost nothing).
WORK = 0.02
KILL_AFTER = 1_000
CLAIM_IDLE = 1.0


# About 20 s on a 2-CPU machine; 120 s leaves room for slower CI machines.
@pytest.mark.timeout(120)
def test_three_consumers_one_killed_midway_handle_every_event_once_in_effect(
    spawn: Any, client: Any, effects: Path
) -> None:
    """10,000 events through 3 consumers, one SIGKILLed after 1,000: the survivors take over
    its pending entries, every event has exactly one effect, and duplicates stay within what
    the killed consumer had in flight."""
    started = time.monotonic()
    common = ["--effects", str(effects), "--claim-idle", str(CLAIM_IDLE)]
    common += ["--workers", str(WORKERS), "--work", str(WORK)]
    consumers = {name: spawn("consume", *common, "--consumer", name) for name in CONSUMERS}
    for consumer in consumers.values():
        consumer.expect("ready")
    producer = spawn("produce", "--count", str(EVENTS))

    victim = consumers["victim"]
    while int(victim.expect("handled ")) < KILL_AFTER:
        pass
    victim.kill()
    # Read at once: the survivors take nothing over before CLAIM_IDLE has passed.
    victim_pending = pending_of(client, "victim")
    killed_at = time.monotonic()
    victim_calls = scalar(effects, "SELECT count(*) FROM invocations WHERE consumer = 'victim'")

    assert producer.expect("published ") == str(EVENTS)
    done = wait_for_effects(effects, EVENTS, timeout=60)
    finished = time.monotonic()
    for name in CONSUMERS[1:]:
        consumers[name].stop()  # closing lets the survivors' last deliveries settle

    unique = scalar(effects, "SELECT count(*) FROM effects")
    numbers = scalar(effects, "SELECT count(DISTINCT n) FROM effects")
    calls = scalar(effects, "SELECT count(*) FROM invocations")
    duplicated = query(
        effects,
        "SELECT event_id, group_concat(consumer) FROM invocations "
        "GROUP BY event_id HAVING count(*) > 1",
    )
    duplicates = calls - unique
    left = pending_of(client)
    print(  # shown with -s or on failure: takeover, duplicates and recovery time
        f"\nvictim: {victim_calls} calls, {victim_pending} pending at the kill; "
        f"duplicates {duplicates}: {duplicated[:5]}; all handled "
        f"{finished - killed_at:.1f} s after the kill, {finished - started:.1f} s in all"
    )

    assert done == EVENTS, f"{done} of {EVENTS} effects after 60 s ({victim_calls} by the victim)"
    assert unique == numbers == EVENTS, f"{unique} effects, {numbers} distinct n of {EVENTS}"
    assert KILL_AFTER <= victim_calls < EVENTS, f"the kill did not land mid-way: {victim_calls}"
    # What the victim held when killed: entries read (XREADGROUP) and not acknowledged,
    # i.e. handlers running, queued on its pool, or finished with the XACK not yet sent.
    # Only those can run twice; the survivors acknowledge everything they handle.
    assert duplicates <= victim_pending, (
        f"{duplicates} duplicate invocations, more than the {victim_pending} entries the "
        f"victim had pending (read, not acknowledged) at the kill: {duplicated[:5]}"
    )
    # Tighter: a handler's effect is committed before its worker thread sends the XACK, so at
    # most one entry per worker thread of the victim was handled but not acknowledged.
    assert duplicates <= WORKERS, (
        f"{duplicates} duplicate invocations, more than the victim's {WORKERS} worker "
        f"threads (each has at most one effect committed but not yet acknowledged): "
        f"{duplicated[:5]}"
    )
    assert all("victim" in who.split(",") for _, who in duplicated), (
        f"events run twice without the victim among their consumers: {duplicated[:5]}"
    )
    assert left == 0, f"{left} entries still pending in the group after the survivors closed"


# -- 2. the only consumer killed; a new one started later takes over -------------------------

HELD = 20
LATE_CLAIM_IDLE = 1.5


def test_entries_of_a_killed_sole_consumer_are_taken_over_by_a_later_one(
    spawn: Any, client: Any, effects: Path
) -> None:
    """The only consumer is killed holding every entry; a consumer started afterwards takes
    them over once claim_idle has passed and handles each exactly once."""
    common = ["--effects", str(effects), "--claim-idle", str(LATE_CLAIM_IDLE), "--every", "1"]
    first = spawn("consume", *common, "--consumer", "first", "--hold", "--workers", "2")
    first.expect("ready")
    producer = spawn("produce", "--count", str(HELD))
    assert producer.expect("published ") == str(HELD)
    first.expect("holding ")  # it read the entries; its handlers never finish
    deadline = time.monotonic() + LINE_WAIT
    # Polling, acceptable only because it observes another process: the consumer prints
    # nothing when its reader takes entries, only when a handler starts.
    while (held := pending_of(client, "first")) < HELD and time.monotonic() < deadline:
        threading.Event().wait(0.02)
    first.kill()
    killed_at = time.monotonic()
    assert held == HELD, f"the first consumer held {held} of {HELD} entries at the kill"

    late = spawn("consume", *common, "--consumer", "late")
    recovered = int(late.expect("recovered "))
    late.expect("ready")
    while int(late.expect("handled ")) < HELD:
        pass
    took = time.monotonic() - killed_at
    late.stop()

    unique = scalar(effects, "SELECT count(*) FROM effects")
    calls = dict(query(effects, "SELECT consumer, count(*) FROM invocations GROUP BY consumer"))
    # The first consumer refreshed its entries at most claim_idle/3 before the kill, so
    # they become claimable (idle for claim_idle) no earlier than 2/3 claim_idle after it.
    assert took >= LATE_CLAIM_IDLE * 2 / 3, (
        f"all handled {took:.2f} s after the kill (recover() took {recovered}), before "
        f"claim_idle={LATE_CLAIM_IDLE} s could have passed"
    )
    assert unique == HELD, f"{unique} of {HELD} events have their effect"
    assert calls == {"late": HELD}, f"invocations per consumer: {calls}"
    assert pending_of(client) == 0, f"{pending_of(client)} entries still pending"
