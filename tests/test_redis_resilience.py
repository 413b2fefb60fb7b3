"""RedisStreamsTransport under failure: Redis restarted or its connections cut while events
flow (no event accepted by ``emit()`` is lost), and a poison event that kills every consumer
given it (dead-lettered after ``max_deliveries`` deliveries, by real processes).

Synchronisation is on the producer's own counters (``threading.Event``s it sets), a
``threading.Condition`` the consumer's handler notifies, the lines consumer processes print,
and bounded polls of Redis state (XPENDING): nothing here sleeps to wait for work.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from eventbus import Event, EventBus, TransportError
from eventbus.transports import RedisStreamsTransport
from tests.support.children import ChildProcess, Children
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

#: Upper bound for waits that normally end within a few seconds; only a broken transport
#: (or a lost event) waits this long.
WAIT = 20.0
#: A reader's XREADGROUP wait: short, so that close() and test teardown are quick.
BLOCK = 0.05


@pytest.fixture
def aof_server() -> Iterator[RedisServer]:
    """A persistent redis-server of the test's own (skipped without redis-server, failed
    under CI), which the test may stop and restart."""
    with RedisServer(persistent=True) as server:
        yield server


def names() -> tuple[str, str]:
    """A fresh stream and group name."""
    suffix = uuid.uuid4().hex
    return f"test:{suffix}", f"group:{suffix}"


# -- 1. Redis restarted, or every connection cut, while a producer emits ---------------------

#: Emits attempted at least; more if fewer than AFTER were accepted after the disruption.
TOTAL = 2_000
#: Disrupt once the producer has this many accepted (counted by the producer itself).
DISRUPT_AT = 300
#: Accepted emits the producer needs after the disruption before it stops.
AFTER = 300
#: Entries a consumer held when its connection broke are taken over (by itself) after this.
CLAIM_IDLE = 1.0


class Producer(threading.Thread):
    """Emits ``tick`` events ``{"n": n}`` with n = 0, 1, 2, ... and records each emit as
    accepted (returned) or refused (raised TransportError); anything else raised is kept in
    ``other``. Stops after TOTAL attempts once AFTER were accepted since ``restored``."""

    def __init__(self, bus: EventBus) -> None:
        super().__init__(name="producer", daemon=True)
        self.bus = bus
        self.accepted: list[int] = []
        self.refused: list[int] = []
        self.other: list[tuple[int, str]] = []
        self.attempted = 0
        self.milestones: dict[int, threading.Event] = {}
        self.restored = threading.Event()  # set by the test once the disruption is over
        self.accepted_when_restored = 0
        self.first_refusal = threading.Event()

    def reached(self, accepted: int) -> threading.Event:
        """An Event set when *accepted* emits have been accepted (register before start)."""
        return self.milestones.setdefault(accepted, threading.Event())

    def restore(self) -> None:
        self.accepted_when_restored = len(self.accepted)
        self.restored.set()

    def accepted_since_restored(self) -> int:
        return len(self.accepted) - self.accepted_when_restored

    def run(self) -> None:
        deadline = time.monotonic() + WAIT  # a guard: normally over in a few seconds
        n = 0
        while time.monotonic() < deadline:
            restored = self.restored.is_set()
            if restored and n >= TOTAL and self.accepted_since_restored() >= AFTER:
                break
            try:
                self.bus.emit("tick", {"n": n})
            except TransportError:
                self.refused.append(n)
                self.first_refusal.set()
            except Exception as exc:  # noqa: BLE001 - recorded; the test asserts there is none
                self.other.append((n, repr(exc)))
            else:
                self.accepted.append(n)
                milestone = self.milestones.get(len(self.accepted))
                if milestone is not None:
                    milestone.set()
            n += 1
            self.attempted = n


class Handled:
    """The consumer's handler: counts deliveries per n and notifies waiters."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.counts: Counter[int] = Counter()

    def __call__(self, event: Event) -> None:
        with self._changed:
            self.counts[event.payload["n"]] += 1
            self._changed.notify_all()

    def wait_for(self, wanted: set[int], timeout: float) -> set[int]:
        """Wait until every n in *wanted* was handled; return those still missing."""
        with self._changed:
            self._changed.wait_for(lambda: wanted <= self.counts.keys(), timeout)
            return wanted - self.counts.keys()


def restart(server: RedisServer, admin: Any, producer: Producer) -> str:
    """Stop Redis with SIGTERM (its AOF is fsynced) and start it again on the same port and
    directory, once the producer has DISRUPT_AT accepted."""
    assert producer.reached(DISRUPT_AT).wait(WAIT), (
        f"only {len(producer.accepted)} accepted in {WAIT} s"
    )
    server.stop()
    # The producer goes on meanwhile: its emits fail until the server answers again.
    producer.first_refusal.wait(2.0)  # bounded: a refusal is likely, not required
    server.start()
    return "restarted"


def cut_connections(server: RedisServer, admin: Any, producer: Producer) -> str:
    """``CLIENT KILL TYPE normal`` (every client but the admin) three times, at DISRUPT_AT,
    2 x DISRUPT_AT and 3 x DISRUPT_AT accepted emits."""
    killed = []
    for times in (1, 2, 3):
        assert producer.reached(times * DISRUPT_AT).wait(WAIT), (
            f"only {len(producer.accepted)} accepted in {WAIT} s"
        )
        killed.append(admin.client_kill_filter(_type="normal", skipme=True))
    # At least the consumer's blocked XREADGROUP connection and the producer's.
    assert all(k >= 2 for k in killed), f"CLIENT KILL closed {killed} connections"
    return f"connections cut {killed}"


@pytest.mark.parametrize("disrupt", [restart, cut_connections], ids=["restart", "client-kill"])
def test_no_event_accepted_by_emit_is_lost_when_redis_restarts_or_drops_connections(
    aof_server: RedisServer,
    disrupt: Callable[[RedisServer, Any, Producer], str],
) -> None:
    """Every event whose emit() returned is handled by a running consumer although Redis is
    restarted (or every connection cut) mid-run; every other emit raised TransportError."""
    started = time.monotonic()
    stream, group = names()

    def transport() -> RedisStreamsTransport:
        return RedisStreamsTransport(
            aof_server.url, stream=stream, group=group, claim_idle=CLAIM_IDLE, block=BLOCK
        )

    admin = redis.Redis.from_url(aof_server.url, decode_responses=True)
    consumer = EventBus(transport=transport(), max_workers=4, name="consumer")
    producer_bus = EventBus(transport=transport(), max_workers=1, name="producer")
    handled = Handled()
    consumer.subscribe("tick", handled)
    consumer.recover()
    producer = Producer(producer_bus)
    for times in (1, 2, 3):
        producer.reached(times * DISRUPT_AT)
    try:
        producer.start()
        what = disrupt(aof_server, admin, producer)
        producer.restore()
        producer.join(WAIT + 5)
        assert not producer.is_alive(), f"producer still emitting after {WAIT} s"
        accepted, refused = set(producer.accepted), set(producer.refused)
        missing = handled.wait_for(accepted, WAIT)
        all_handled = time.monotonic()
        dead = admin.xrange(f"{stream}:dead")
    finally:
        producer_bus.close(timeout=WAIT)
        consumer.close(timeout=WAIT)
        admin.close()

    counts = handled.counts
    duplicates = sum(counts.values()) - len(counts)
    refused_but_handled = refused & counts.keys()
    print(  # shown with -s or on failure: what the run measured
        f"\n{what}: attempted {producer.attempted}, accepted {len(accepted)} "
        f"({producer.accepted_when_restored} before the disruption ended), refused "
        f"{len(refused)}, handled {len(counts)} distinct, duplicates {duplicates}, refused "
        f"but handled {len(refused_but_handled)}, dead-lettered {len(dead)}; "
        f"{all_handled - started:.1f} s"
    )

    assert producer.other == [], f"emit() raised other than TransportError: {producer.other[:5]}"
    assert len(accepted) + len(refused) == producer.attempted, (
        f"{len(accepted)} accepted + {len(refused)} refused != {producer.attempted} attempted"
    )
    assert accepted | refused == set(range(producer.attempted))
    assert producer.accepted_since_restored() >= AFTER, (
        f"only {producer.accepted_since_restored()} accepted after the disruption"
    )
    assert not missing, (
        f"{len(missing)} of {len(accepted)} accepted events lost (not handled within {WAIT} s "
        f"of the last emit), e.g. n={sorted(missing)[:10]}; dead-lettered: {dead[:3]}"
    )
    assert counts.keys() <= accepted | refused, "handled events nobody emitted"


# -- 2. a poison event kills every consumer it reaches --------------------------------------

MAX_DELIVERIES = 3
POISON_CLAIM_IDLE = 0.5
RESTARTS = 6  # bound of the supervisor loop
NORMAL_BEFORE, NORMAL_AFTER = 5, 5
#: Bound on any one wait for a process's line; only a broken transport waits this long.
LINE_WAIT = 15.0


def wait_pending(client: Any, stream: str, group: str, count: int) -> int:
    """Wait (bounded) until the group has *count* pending entries; return how many it has.
    Polling, acceptable only because it observes another process: a consumer prints its
    ``handled`` line before its worker thread sends the XACK."""
    deadline = time.monotonic() + LINE_WAIT
    pause = threading.Event()
    while (pending := int(client.xpending(stream, group)["pending"])) != count:
        if time.monotonic() >= deadline:
            break
        pause.wait(0.02)
    return pending


@pytest.mark.multiprocess
def test_poison_event_is_dead_lettered_after_max_deliveries_with_consumers_killed(
    own_redis: RedisServer, children: Children
) -> None:
    """A poison event that SIGKILLs each consumer handling it reaches the handler
    max_deliveries times, then the next consumer moves it to <stream>:dead and lives on."""
    started = time.monotonic()
    stream, group = names()
    client = redis.Redis.from_url(own_redis.url, decode_responses=True)
    producer = EventBus(
        transport=RedisStreamsTransport(own_redis.url, stream=stream, group=group, block=BLOCK),
        max_workers=1,
        name="producer",
    )
    common = ["--url", own_redis.url, "--stream", stream, "--group", group]
    common += ["--claim-idle", str(POISON_CLAIM_IDLE)]
    common += ["--max-deliveries", str(MAX_DELIVERIES)]
    consumers: list[ChildProcess] = []

    def spawn() -> ChildProcess:
        """One redis_poison_worker.py process, named consumer-<k>; its stderr in the test's
        directory."""
        # Not waiting for its "ready": it may dead-letter the poison in recover(), first.
        name = f"consumer-{len(consumers)}"
        consumer = children.script("redis_poison_worker", *common, "--consumer", name, name=name)
        consumers.append(consumer)
        return consumer

    try:
        current = spawn()
        current.expect("ready")
        handled: Counter[int] = Counter()
        # Normal events first, settled before the poison arrives: none is held by a
        # consumer when it dies, so none shares the poison's redeliveries.
        for n in range(NORMAL_BEFORE):
            producer.emit("job", {"n": n})
        for _ in range(NORMAL_BEFORE):
            handled[int(current.expect("handled "))] += 1
        assert wait_pending(client, stream, group, 0) == 0, "normal events left pending"

        poison = producer.emit("job", {"n": -1, "poison": True})
        poisoned: list[str] = []  # the consumer each poison delivery reached
        deaths: list[int | None] = []
        # The supervisor: each time the poison kills the consumer, start a new one.
        while True:
            kind, rest = current.expect_any("poison ", "dead ")
            if kind == "dead ":
                dead_line = rest
                break
            assert rest == poison.id, f"{current.name} got poison {rest}, not {poison.id}"
            poisoned.append(current.name)
            deaths.append(current.proc.wait(LINE_WAIT))
            assert len(consumers) <= RESTARTS, (
                f"still looping after {RESTARTS} restarts: poison reached {poisoned}"
            )
            current = spawn()
        dead_lettered = time.monotonic()

        for n in range(NORMAL_BEFORE, NORMAL_BEFORE + NORMAL_AFTER):
            producer.emit("job", {"n": n})
        for _ in range(NORMAL_AFTER):
            handled[int(current.expect("handled "))] += 1
        alive = current.proc.poll() is None
        pending = wait_pending(client, stream, group, 0)
        dead = client.xrange(f"{stream}:dead")
        current.stop()
    finally:
        producer.close(timeout=WAIT)
        client.close()  # the consumers are killed and reaped by the children fixture

    print(  # shown with -s or on failure: what the run measured
        f"\npoison reached {poisoned} (exit codes {deaths}); dead-lettered by {current.name} "
        f"({dead_line}) {dead_lettered - started:.1f} s after start; dead entry {dead}; "
        f"{time.monotonic() - started:.1f} s in all"
    )
    assert len(poisoned) == MAX_DELIVERIES, (
        f"the poison reached the handler {len(poisoned)} times, not max_deliveries="
        f"{MAX_DELIVERIES}: {poisoned}"
    )
    assert deaths == [-9] * MAX_DELIVERIES, f"exit codes of the poisoned consumers: {deaths}"
    [(_dead_id, fields)] = dead
    # Each take-over (XAUTOCLAIM) counts a delivery: the first read and max_deliveries - 1
    # take-overs reached the handler; the next take-over is delivery max_deliveries + 1,
    # which is over the limit and is dead-lettered instead.
    assert fields["id"] == poison.id, f"dead-lettered {fields['id']}, not the poison {poison.id}"
    assert fields["deliveries"] == str(MAX_DELIVERIES + 1), (
        f"dead-lettered at delivery {fields['deliveries']}, expected {MAX_DELIVERIES + 1}"
    )
    assert fields["reason"] == f"delivered {MAX_DELIVERIES + 1} times", fields["reason"]
    assert dead_line == f"{fields['entry_id']} {MAX_DELIVERIES + 1}", dead_line
    assert fields["consumer"] == current.name, f"dead-lettered by {fields['consumer']}"
    assert pending == 0, f"{pending} entries still pending (the poison not acknowledged?)"
    assert sorted(handled) == list(range(NORMAL_BEFORE + NORMAL_AFTER)), (
        f"normal events handled: {dict(handled)}"
    )
    assert alive, f"{current.name} died after dead-lettering the poison"
