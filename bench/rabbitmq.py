"""The RabbitMQ transport end to end: events/s with 1 handler and 1 or 3 consumer processes,
beside a raw pika loop doing the same broker work in the same run.

One RabbitMQ node is started for the scenario with ``tests/support/rabbitmq.py``'s
``RabbitMQServer`` (free local ports, a temporary directory, as the unprivileged ``rabbitmq``
user when this process is root) and stopped at its end. Three consumer processes
(``python -m bench.rabbitmq consume --url URL --counts PATH --slot I``) are started once and
reused: for each trial the parent tells the 1 or 3 it uses which queue to consume and how (a
line on stdin), waits until each answers ``ready`` (connected, queue declared and bound,
consuming), publishes N events from this process, and stops the clock once the consumers'
handlers have been called N times in all. Each consumer writes its running count of handler
calls into its own 8-byte slot of a small shared file (``mmap``), which the parent reads every
2 ms. Each consumer then stops and reports how many handler calls it made; the sum must be
exactly N. Every trial uses a fresh group (a fresh quorum queue), deleted afterwards.

* **eventbus**: the parent emits with one ``EventBus(transport=RabbitMQTransport(url,
  exchange=X, group=G))`` kept for the whole scenario (its connection is opened by the warm-up
  trial); ``emit()`` returns once the broker confirmed the message. Each consumer runs
  ``EventBus(transport=RabbitMQTransport(url, exchange=X, group=G, prefetch=100),
  max_workers=8)`` with the handler, and ``start()``. A message is acknowledged once its
  delivery has settled.
* **raw pika loop**: the parent publishes on one ``BlockingConnection`` with
  ``confirm_delivery()`` (one confirm per publish, as ``emit()`` waits for), persistent
  messages with the same properties and the same JSON body the transport writes, built by
  hand. Each consumer declares the same topology (a durable topic exchange; a durable quorum
  queue with the same arguments, bound for the event's routing key), ``basic_qos(prefetch=100)``,
  ``basic_consume`` on one thread, and per message ``json.loads`` of the body and of the
  payload, the handler, and ``basic_ack`` of that message.

The handler is trivial: it counts its call (under a lock, since eventbus calls it from 8
worker threads, and writes the count to the shared slot). The ratio column is to the raw loop
with as many consumer processes.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import mmap
import os
import queue
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
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
    configure_structlog,
    median,
)

HANDLERS = 1
CONSUMERS = (1, 3)
#: The consumers' prefetch (the transport's default), the same for the raw loop.
PREFETCH = 100
#: The exchange each mode publishes to (one for the scenario); each trial has its own group.
EXCHANGES = {"eventbus": "bench-eventbus", "raw": "bench-raw"}
#: The transport's ``max_deliveries`` default: the queue's delivery limit is one less.
MAX_DELIVERIES = 5
#: Pause between two reads of the consumers' counts while waiting for them.
POLL = 0.002
#: How long a consumer process may take to start.
STARTUP_DEADLINE = 30.0
#: One count per consumer process: a signed 64-bit integer each, in the shared file.
SLOT = struct.Struct("q")

SCENARIO = f"RabbitMQ transport, {HANDLERS} handler"
NO_SERVER = "rabbitmq-server not installed"
NO_PIKA = "pika not installed"
ROOT = Path(__file__).resolve().parent.parent


def events_per_trial(sizes: Sizes) -> int:
    """Events per trial (``Sizes`` has no field of its own for them): a fifth of the durable
    scenario's, 1,000 at full size and 60 when quick. Each is one confirmed publish, about
    1 ms here, so a trial takes about a second."""
    return sizes.durable_events // 5


def _processes(n: int) -> str:
    return f"{n} consumer process{'es' if n > 1 else ''}"


def eventbus_label(n: int) -> str:
    each = " each" if n > 1 else ""
    return (
        f"eventbus RabbitMQTransport, {_processes(n)} "
        f"(max_workers={WORKERS}{each}, prefetch={PREFETCH})"
    )


def raw_label(n: int) -> str:
    return f"raw pika confirm-publish / basic_consume+ack loop, {_processes(n)}"


def _routing_key() -> str:
    from eventbus.transports.rabbitmq import routing_key

    return routing_key(EVENT_NAME)


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a live process (Linux ``/proc``; NaN elsewhere)."""
    if pid is None:
        return math.nan
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- consumer processes (parent side) ------------------------------------------------------------


class _Consumer:
    """One ``python -m bench.rabbitmq consume`` child, driven by lines on its stdin."""

    def __init__(self, url: str, name: str, directory: Path, counts: Path, slot: int) -> None:
        self.name = name
        self.stderr_path = directory / f"{name}.stderr"
        command = [sys.executable, "-m", "bench.rabbitmq", "consume", "--url", url]
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [*command, "--name", name, "--counts", str(counts), "--slot", str(slot)],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                bufsize=1,
            )
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.reader = threading.Thread(target=self._read, name=f"bench-{name}", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put("")  # EOF: the process is gone

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def expect(self, word: str, timeout: float = WAIT_TIMEOUT) -> str:
        """The rest of the next line, which must start with *word*."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            line = f"(nothing within {timeout} s)"
        head, _, rest = line.partition(" ")
        if head != word:
            raise RuntimeError(
                f"consumer {self.name} said {line!r}, expected {word!r}; its stderr:\n"
                + self.stderr_path.read_text(errors="replace")[-4000:]
            )
        return rest

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send("exit")
                self.process.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.reader.join(5)


# -- publishing (parent side) --------------------------------------------------------------------


def _connection_parameters(url: str) -> Any:
    import pika

    parameters = pika.URLParameters(url)
    parameters.connection_attempts = 1
    parameters.heartbeat = 0  # idle between its trials: no heartbeat to miss
    return parameters


def _raw_body(payload: Any) -> bytes:
    """The JSON body RabbitMQTransport writes for an event, built by hand."""
    return json.dumps(
        {
            "id": uuid.uuid4().hex,
            "name": EVENT_NAME,
            "payload_type": None,
            "payload": json.dumps(payload),
            "metadata": "{}",
            "occurred_at": datetime.now(UTC).isoformat(),
        }
    ).encode()


class _RawProducer:
    """The raw loop's publisher: one connection, publisher confirms, persistent messages."""

    def __init__(self, url: str) -> None:
        import pika

        self.connection = pika.BlockingConnection(_connection_parameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.channel.exchange_declare(EXCHANGES["raw"], exchange_type="topic", durable=True)
        self.key = _routing_key()

    def publish(self, payload: Any) -> None:
        import pika

        body = _raw_body(payload)
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type="application/json",
            message_id=uuid.uuid4().hex,
            timestamp=int(time.time()),
        )
        # With confirm_delivery(), basic_publish returns once the broker confirmed it.
        self.channel.basic_publish(EXCHANGES["raw"], self.key, body, properties)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


# -- one trial -----------------------------------------------------------------------------------


@dataclass
class RabbitTrial:
    seconds: float
    publish_seconds: float
    events: int
    finished: bool
    handled: list[int]
    polls: int
    #: Messages still in the trial's queue once its consumers had stopped (unacknowledged
    #: ones go back to it): 0 when every message was acknowledged before the consumers closed.
    left_in_queue: int
    #: CPU seconds during the timed part: this process, the consumers, the RabbitMQ node.
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def ok(self) -> bool:
        return self.finished and sum(self.handled) == self.events * HANDLERS


@dataclass
class _Context:
    url: str
    admin: Any  # a pika channel for deleting each trial's queues
    consumers: list[_Consumer]
    counts: mmap.mmap
    server_pid: int | None
    publishers: dict[str, Callable[[Any], object]]
    groups: itertools.count = field(default_factory=itertools.count)


def _handled(counts: mmap.mmap, n: int) -> int:
    return sum(SLOT.unpack_from(counts, i * SLOT.size)[0] for i in range(n))


def _trial(ctx: _Context, mode: str, n: int, events: int) -> RabbitTrial:
    exchange = EXCHANGES[mode]
    group = f"{mode}-{n}-{next(ctx.groups)}"
    consumers = ctx.consumers[:n]
    # The first consumer declares the group's queue alone: RabbitMQ 3.10 answers a
    # concurrent declaration of a new quorum queue before the queue's process runs, and a
    # basic.consume then fails with INTERNAL_ERROR ({error,noproc}).
    for batch in (consumers[:1], consumers[1:]):
        for c in batch:
            c.send(f"run {mode} {exchange} {group}")
        for c in batch:
            c.expect("ready")
    publish = ctx.publishers[mode]
    counts = ctx.counts
    expected = events * HANDLERS
    payload = PAYLOAD
    pause = threading.Event()
    polls = 0
    pids = {"rabbitmq_server": [ctx.server_pid], "consumers": [c.process.pid for c in consumers]}

    def cpu() -> dict[str, float]:
        used = {k: sum(_cpu_seconds(pid) for pid in v) for k, v in pids.items()}
        return {"producer": time.process_time(), **used}

    gc.collect()
    try:
        cpu_before = cpu()
        start = time.perf_counter()
        for _ in range(events):
            publish(payload)
        published = time.perf_counter()
        deadline = published + WAIT_TIMEOUT
        while not (finished := _handled(counts, n) >= expected):
            if time.perf_counter() > deadline:
                break
            polls += 1
            pause.wait(POLL)  # bounded polling of external processes
        end = time.perf_counter()
        cpu_after = cpu()
        used = {k: cpu_after[k] - cpu_before[k] for k in cpu_before}
    finally:
        for c in consumers:
            c.send("stop")
        handled = [int(c.expect("handled")) for c in consumers]
        queue_name = f"{exchange}.{group}"
        left = ctx.admin.queue_declare(queue_name, passive=True).method.message_count
        ctx.admin.queue_delete(queue_name)
        ctx.admin.queue_delete(f"{queue_name}.dead")
        ctx.admin.exchange_delete(f"{queue_name}.dlx")
    return RabbitTrial(end - start, published - start, events, finished, handled, polls, left, used)


# -- the scenario --------------------------------------------------------------------------------


def _skipped(reason: str) -> Section:
    banner = "!" * 78
    print(
        f"\n{banner}\n!! RabbitMQ transport scenario SKIPPED: {reason}.\n"
        "!! Install rabbitmq-server (apt-get install rabbitmq-server / brew install rabbitmq)\n"
        f"!! and pika (pip install 'eventbus[rabbitmq]') to measure it.\n{banner}",
        file=sys.stderr,
        flush=True,
    )
    return Section([Row(SCENARIO, f"skipped: {reason}", math.nan, "", ok=True)])


def _unavailable() -> str | None:
    """Why no RabbitMQ node can be started here, or None."""
    try:
        import pika  # noqa: F401
    except ImportError:
        return NO_PIKA
    try:
        from tests.support.rabbitmq import find_rabbitmq_server
    except ImportError as exc:  # pytest missing, or not run from the repository
        return f"tests/support/rabbitmq.py cannot be imported ({exc})"
    if find_rabbitmq_server() is None:
        return NO_SERVER
    return None


def rabbitmq_transport(sizes: Sizes) -> Section:
    """events/s through RabbitMQ with 1 and 3 consumer processes, eventbus vs raw pika."""
    reason = _unavailable()
    if reason is not None:
        return _skipped(reason)
    import pytest

    from tests.support.rabbitmq import RabbitMQServer, find_rabbitmq_server

    try:
        server = RabbitMQServer(find_rabbitmq_server())
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:  # no epmd beside it
        return _skipped(str(exc))
    with server, tempfile.TemporaryDirectory(prefix="eventbus-bench-rabbitmq-") as tmp:
        return _with_server(server, Path(tmp), sizes)


def _with_server(server: Any, directory: Path, sizes: Sizes) -> Section:
    import pika

    from eventbus import EventBus
    from eventbus.transports import RabbitMQTransport

    counts_path = directory / "counts"
    counts_path.write_bytes(bytes(SLOT.size * max(CONSUMERS)))
    consumers: list[_Consumer] = []
    counts: mmap.mmap | None = None
    admin = pika.BlockingConnection(_connection_parameters(server.url))
    raw = _RawProducer(server.url)
    transport = RabbitMQTransport(server.url, exchange=EXCHANGES["eventbus"], group="producer")
    producer = EventBus(transport=transport, max_workers=1, name="bench-producer")
    try:
        with open(counts_path, "r+b") as f:
            counts = mmap.mmap(f.fileno(), 0)
        consumers = [
            _Consumer(server.url, f"consumer-{i}", directory, counts_path, i)
            for i in range(max(CONSUMERS))
        ]
        for c in consumers:
            c.expect("started", STARTUP_DEADLINE)
        emit = producer.emit

        def publish(payload: Any) -> object:
            return emit(EVENT_NAME, payload)

        ctx = _Context(
            server.url,
            admin.channel(),
            consumers,
            counts,
            server.pid,
            {"eventbus": publish, "raw": raw.publish},
        )
        return _measure(ctx, sizes)
    finally:
        for c in consumers:
            c.close()
        producer.close()
        raw.close()
        admin.close()
        if counts is not None:
            counts.close()


def _measure(ctx: _Context, sizes: Sizes) -> Section:
    events = events_per_trial(sizes)
    # label, mode, consumer processes
    configs: list[tuple[str, str, int]] = [
        (eventbus_label(n) if mode == "eventbus" else raw_label(n), mode, n)
        for mode in ("eventbus", "raw")
        for n in CONSUMERS
    ]
    for label, mode, n in configs:  # warm-up: imports, connections, code paths
        trial = _trial(ctx, mode, n, max(n, events // 10))
        if not trial.ok:
            raise RuntimeError(f"RabbitMQ warm-up of {label!r} came out wrong: {trial}")
    trials: dict[str, list[RabbitTrial]] = {c[0]: [] for c in configs}
    for _ in range(sizes.repeats):  # round robin: drift spreads evenly over the rows
        for label, mode, n in configs:
            trials[label].append(_trial(ctx, mode, n, events))

    rows: list[Row] = []
    for label, runs in trials.items():
        values = [t.rate for t in runs]
        rows.append(
            Row(
                SCENARIO,
                label,
                median(values),
                "events/s",
                samples=values,
                ok=all(t.ok for t in runs),
                detail={
                    "events_per_trial": runs[0].events,
                    "handled": sum(sum(t.handled) for t in runs),
                    "expected": sum(t.events * HANDLERS for t in runs),
                    "handled_per_consumer": [t.handled for t in runs],
                    "best": max(values),
                    "publish_events_per_s_median": median(
                        [t.events / t.publish_seconds for t in runs]
                    ),
                    "polls_median": median([t.polls for t in runs]),
                    "left_in_queue": [t.left_in_queue for t in runs],
                    "cpu_us_per_event_median": {
                        k: median([t.cpu[k] / t.events * 1e6 for t in runs]) for k in runs[0].cpu
                    },
                },
            )
        )
    by = {r.dispatcher: r for r in rows}
    processes = {c[0]: c[2] for c in configs}
    for row in rows:  # each to the raw loop with as many consumers
        reference = by[raw_label(processes[row.dispatcher])]
        row.ratio = row.value / reference.value
        row.ratio_to = reference.dispatcher
    return Section(rows)


# -- consumer processes (child side) -------------------------------------------------------------


class _Counter:
    """The trial's handler calls: counted under a lock and written to this process's slot of
    the shared file, where the parent reads them."""

    def __init__(self, counts: mmap.mmap, slot: int) -> None:
        self.counts = counts
        self.offset = slot * SLOT.size
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.calls = 0
            SLOT.pack_into(self.counts, self.offset, 0)

    def handler(self, *_args: object) -> None:
        with self.lock:
            self.calls += 1
            SLOT.pack_into(self.counts, self.offset, self.calls)


def _declare_raw(channel: Any, exchange: str, queue_name: str) -> None:
    """The raw loop's topology: what RabbitMQTransport declares for a group, by hand."""
    dead_exchange, dead_queue = f"{queue_name}.dlx", f"{queue_name}.dead"
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    channel.exchange_declare(dead_exchange, exchange_type="fanout", durable=True)
    channel.queue_declare(dead_queue, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(dead_queue, dead_exchange)
    channel.queue_declare(
        queue_name,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": MAX_DELIVERIES - 1,
            "x-dead-letter-exchange": dead_exchange,
        },
    )
    channel.queue_bind(queue_name, exchange, _routing_key())


def _raw_consume(
    url: str,
    exchange: str,
    group: str,
    handler: Callable[..., None],
    ready: queue.SimpleQueue[BaseException | None],
    stop: threading.Event,
) -> None:
    """The raw loop, on its own thread (a pika connection stays on one thread): declare, then
    per message decode, call the handler, ``basic_ack``."""
    import pika

    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()
        queue_name = f"{exchange}.{group}"
        _declare_raw(channel, exchange, queue_name)
        channel.basic_qos(prefetch_count=PREFETCH)
        loads, ack = json.loads, channel.basic_ack

        def on_message(_channel: Any, method: Any, _properties: Any, body: bytes) -> None:
            handler(loads(loads(body)["payload"]))
            ack(method.delivery_tag)

        channel.basic_consume(queue_name, on_message)
    except BaseException as exc:  # noqa: BLE001 - reported to the waiting thread
        ready.put(exc)
        return
    ready.put(None)
    try:
        while not stop.is_set():
            connection.process_data_events(time_limit=0.05)
    finally:
        connection.close()


def consume(url: str, name: str, counts_path: str, slot: int) -> int:
    """Serve trials: ``run <mode> <exchange> <group>`` (answers ``ready``), ``stop`` (answers
    ``handled <calls>``), ``exit``."""
    from eventbus import EventBus
    from eventbus.transports import RabbitMQTransport

    configure_structlog()

    def out(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    with open(counts_path, "r+b") as f:
        counts = mmap.mmap(f.fileno(), 0)
    counter = _Counter(counts, slot)
    stop_trial: Callable[[], None] = lambda: None  # noqa: E731
    out("started")
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "exit":
            break
        if words[0] == "run":
            mode, exchange, group = words[1:4]
            counter.reset()
            if mode == "eventbus":
                transport = RabbitMQTransport(
                    url, exchange=exchange, group=group, prefetch=PREFETCH
                )
                bus = EventBus(transport=transport, max_workers=WORKERS, name=name)
                bus.subscribe(EVENT_NAME, counter.handler, name="bench.handler")
                bus.start()
                stop_trial = bus.close
            else:
                stop = threading.Event()
                ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
                thread = threading.Thread(
                    target=_raw_consume,
                    args=(url, exchange, group, counter.handler, ready, stop),
                    name=f"bench-raw-{group}",
                    daemon=True,
                )
                thread.start()
                error = ready.get()
                if error is not None:
                    raise error

                def stop_trial(stop: threading.Event = stop, thread: threading.Thread = thread):
                    stop.set()
                    thread.join()

            out("ready")
        elif words[0] == "stop":
            stop_trial()
            stop_trial = lambda: None  # noqa: E731
            out(f"handled {counter.calls}")
    stop_trial()
    counts.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rabbitmq", description=__doc__)
    modes = parser.add_subparsers(dest="mode", required=True)
    consumer = modes.add_parser("consume", help="a consumer process (driven by its parent)")
    consumer.add_argument("--url", required=True)
    consumer.add_argument("--name", default=f"bench-consumer-{os.getpid()}")
    consumer.add_argument("--counts", required=True, help="the shared file of handler counts")
    consumer.add_argument("--slot", type=int, required=True, help="this consumer's slot in it")
    args = parser.parse_args(argv)
    return consume(args.url, args.name, args.counts, args.slot)


if __name__ == "__main__":
    sys.exit(main())
