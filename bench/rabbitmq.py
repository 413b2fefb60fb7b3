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

import functools
import itertools
import json
import mmap
import queue
import struct
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

from bench._consumers import (
    Config,
    Consumer,
    ConsumerTrial,
    configs,
    consumer_args,
    consumer_processes,
    in_thread,
    measure,
    processes,
    publish_and_wait,
    run_all,
    serve,
    stop_all,
)
from bench._harness import (
    EVENT_NAME,
    WORKERS,
    Section,
    Sizes,
    server_unavailable,
    skipped_row,
    warn_skipped,
)

HANDLERS = 1
CONSUMERS = (1, 3)
#: The consumers' prefetch (the transport's default), the same for the raw loop.
PREFETCH = 100
#: The exchange each mode publishes to (one for the scenario); each trial has its own group.
EXCHANGES = {"eventbus": "bench-eventbus", "raw": "bench-raw"}
#: The transport's ``max_deliveries`` default: the queue's delivery limit is one less.
MAX_DELIVERIES = 5
#: One count per consumer process: a signed 64-bit integer each, in the shared file.
SLOT = struct.Struct("q")

SCENARIO = f"RabbitMQ transport, {HANDLERS} handler"
NO_SERVER = "rabbitmq-server not installed"
NO_PIKA = "pika not installed"


def events_per_trial(sizes: Sizes) -> int:
    """Events per trial (``Sizes`` has no field of its own for them): a fifth of the durable
    scenario's, 1,000 at full size and 60 when quick. Each is one confirmed publish, about
    1 ms here, so a trial takes about a second."""
    return sizes.durable_events // 5


def eventbus_label(n: int) -> str:
    each = " each" if n > 1 else ""
    return (
        f"eventbus RabbitMQTransport, {processes(n)} "
        f"(max_workers={WORKERS}{each}, prefetch={PREFETCH})"
    )


def raw_label(n: int) -> str:
    return f"raw pika confirm-publish / basic_consume+ack loop, {processes(n)}"


#: The function labelling each mode's rows.
LABELS = {"eventbus": eventbus_label, "raw": raw_label}


def _routing_key() -> str:
    from eventbus.transports.rabbitmq import routing_key

    return routing_key(EVENT_NAME)


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
class _Context:
    url: str
    admin: Any  # a pika channel for deleting each trial's queues
    consumers: list[Consumer]
    counts: mmap.mmap
    server_pid: int | None
    publishers: dict[str, Callable[[Any], object]]
    groups: itertools.count = field(default_factory=itertools.count)


def _handled(counts: mmap.mmap, n: int) -> int:
    return sum(SLOT.unpack_from(counts, i * SLOT.size)[0] for i in range(n))


def _trial(ctx: _Context, config: Config, events: int) -> ConsumerTrial:
    mode, n = config.mode, config.processes
    exchange = EXCHANGES[mode]
    group = f"{mode}-{n}-{next(ctx.groups)}"
    consumers = ctx.consumers[:n]
    # The first consumer declares the group's queue alone: RabbitMQ 3.10 answers a
    # concurrent declaration of a new quorum queue before the queue's process runs, and a
    # basic.consume then fails with INTERNAL_ERROR ({error,noproc}).
    for batch in (consumers[:1], consumers[1:]):
        run_all(batch, f"run {mode} {exchange} {group}")
    counts = ctx.counts
    expected = events * HANDLERS
    try:
        timing = publish_and_wait(
            ctx.publishers[mode],
            events,
            lambda: _handled(counts, n) >= expected,
            consumers,
            ("rabbitmq_server", ctx.server_pid),
        )
    finally:
        handled = stop_all(consumers)
        queue_name = f"{exchange}.{group}"
        left = ctx.admin.queue_declare(queue_name, passive=True).method.message_count
        ctx.admin.queue_delete(queue_name)
        ctx.admin.queue_delete(f"{queue_name}.dead")
        ctx.admin.exchange_delete(f"{queue_name}.dlx")
    # left_in_queue: messages still in the trial's queue once its consumers had stopped
    # (unacknowledged ones go back to it): 0 when every one was acknowledged before they closed.
    return ConsumerTrial(timing, events, expected, handled, {"left_in_queue": left})


# -- the scenario --------------------------------------------------------------------------------


def _skipped(reason: str) -> Section:
    warn_skipped(
        "RabbitMQ transport scenario",
        reason,
        "Install rabbitmq-server (apt-get install rabbitmq-server / brew install rabbitmq)\n"
        "and pika (pip install 'eventbus[rabbitmq]') to measure it.",
    )
    return Section([skipped_row(SCENARIO, reason)])


def _unavailable() -> str | None:
    """Why no RabbitMQ node can be started here, or None."""
    return server_unavailable(["pika"], NO_PIKA, "rabbitmq", "find_rabbitmq_server", NO_SERVER)


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
    counts: mmap.mmap | None = None
    admin = pika.BlockingConnection(_connection_parameters(server.url))
    raw = _RawProducer(server.url)
    transport = RabbitMQTransport(server.url, exchange=EXCHANGES["eventbus"], group="producer")
    producer = EventBus(transport=transport, max_workers=1, name="bench-producer")
    try:
        with open(counts_path, "r+b") as f:
            counts = mmap.mmap(f.fileno(), 0)
        with consumer_processes(
            "bench.rabbitmq",
            server.url,
            directory,
            max(CONSUMERS),
            lambda i: ["--counts", str(counts_path), "--slot", str(i)],
            exit_timeout=15,
        ) as consumers:
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
        producer.close()
        raw.close()
        admin.close()
        if counts is not None:
            counts.close()


def _measure(ctx: _Context, sizes: Sizes) -> Section:
    events = events_per_trial(sizes)
    return measure(
        configs(SCENARIO, LABELS, CONSUMERS, lambda _mode: events),
        functools.partial(_trial, ctx),
        sizes.repeats,
        "RabbitMQ",
        # each to the raw loop with as many consumers
        lambda config: (SCENARIO, raw_label(config.processes)),
    )


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

    with open(counts_path, "r+b") as f:
        counts = mmap.mmap(f.fileno(), 0)
    counter = _Counter(counts, slot)

    def run(words: list[str]) -> Callable[[], None]:
        mode, exchange, group = words[:3]
        counter.reset()
        if mode == "eventbus":
            transport = RabbitMQTransport(url, exchange=exchange, group=group, prefetch=PREFETCH)
            bus = EventBus(transport=transport, max_workers=WORKERS, name=name)
            bus.subscribe(EVENT_NAME, counter.handler, name="bench.handler")
            bus.start()
            return bus.close
        ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        stop = in_thread(
            _raw_consume, url, exchange, group, counter.handler, ready, name=f"bench-raw-{group}"
        )
        error = ready.get()
        if error is not None:
            raise error
        return stop

    serve(run, lambda: counter.calls)
    counts.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    def more(consumer: Any) -> None:
        consumer.add_argument("--counts", required=True, help="the shared file of handler counts")
        consumer.add_argument("--slot", type=int, required=True, help="this consumer's slot in it")

    args = consumer_args("python -m bench.rabbitmq", __doc__, argv, more)
    return consume(args.url, args.name, args.counts, args.slot)


if __name__ == "__main__":
    sys.exit(main())
