"""Multi-process dispatch through Redis Streams: events/s with 4 handlers and 1 or 3 consumer
processes, beside a raw redis-py XADD / XREADGROUP / XACK loop in the same run.

One ``redis-server`` (free local port, temporary directory, ``--save '' --appendonly no``) is
started for the scenario and stopped at its end. Three consumer processes
(``python -m bench.redis_streams consume --url URL``) are started once and reused: for each
trial the parent tells the 1 or 3 it uses which stream to consume and how (a line on stdin),
waits until each answers ``ready``, publishes N events from this process, and stops the clock
once the group has every entry delivered and acknowledged (``XINFO GROUPS``: last-delivered-id
is the stream's last id and nothing is pending), polled every 2 ms. Each consumer then stops
and reports how many handler calls it made; the sum must be exactly 4N. Every trial uses a
fresh stream, deleted afterwards.

* **eventbus**: the parent emits with ``EventBus(transport=RedisStreamsTransport(url,
  stream=S, group=G))``; each consumer runs ``EventBus(transport=RedisStreamsTransport(url,
  stream=S, group=G, block=0.05), max_workers=8)`` with 4 handlers and ``recover()``. An entry
  is acknowledged once its 4 deliveries have settled.
* **raw redis-py loop**: the parent ``XADD``s the same fields the transport writes (id, name,
  JSON payload, metadata, occurred_at); each consumer runs one thread doing ``XREADGROUP``
  (``COUNT 100``, ``BLOCK 50``), and per entry ``json.loads`` of the payload, the 4 handlers
  called in turn, and ``XACK``.

Two handler weights: trivial (count the call) and I/O-like (wait 2 ms on a never-set
``threading.Event``, then count: simulated I/O, which holds no CPU and no GIL).
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
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
    skipped_row,
    warn_skipped,
)
from tests.support.server import read_log, stop_process, wait_until_ready

HANDLERS = 4
CONSUMERS = (1, 3)
#: Seconds each I/O-like handler call waits.
IO_WAIT = 0.002
#: The consumers' XREADGROUP block, in seconds (the transport's ``block=``).
BLOCK = 0.05
#: The raw loop's XREADGROUP COUNT (the transport's default ``batch``).
BATCH = 100
GROUP = "bench"
#: How long redis-server may take to answer PING.
STARTUP_DEADLINE = 30.0

SCENARIO = f"multi-process (Redis), {HANDLERS} handlers"
SCENARIO_IO = f"multi-process (Redis), {HANDLERS} handlers waiting {IO_WAIT * 1000:g} ms (I/O-like)"
NO_SERVER = "redis-server not installed"
NO_REDIS_PY = "redis-py not installed"


def eventbus_label(n: int) -> str:
    each = " each" if n > 1 else ""
    return f"eventbus RedisStreamsTransport, {processes(n)} (max_workers={WORKERS}{each})"


def raw_label(n: int) -> str:
    return f"raw redis-py XADD/XREADGROUP/XACK loop, {processes(n)}"


#: The function labelling each mode's rows.
LABELS = {"eventbus": eventbus_label, "raw": raw_label}


# -- redis-server --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class _Server:
    """One throw-away redis-server: free port, temporary directory, no persistence."""

    def __init__(self, executable: str, directory: Path) -> None:
        self.port = _free_port()
        self.directory = directory
        self.log = directory / "redis.log"
        self.process = subprocess.Popen(
            [
                executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                str(self.log),
            ],
            cwd=directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if wait_until_ready(self.process, lambda: _ping(self.port), STARTUP_DEADLINE, 0.01):
            return
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING; its log:\n{read_log(self.log)}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        stop_process(self.process, 5)


# -- one trial -----------------------------------------------------------------------------------


def _raw_fields(payload: Any) -> dict[str, str]:
    """The fields RedisStreamsTransport writes for an event, built by hand."""
    return {
        "id": uuid.uuid4().hex,
        "name": EVENT_NAME,
        "payload_type": "",
        "payload": json.dumps(payload),
        "metadata": "{}",
        "occurred_at": datetime.now(UTC).isoformat(),
    }


def _settled(client: Any, stream: str, last_id: str) -> bool:
    for info in client.xinfo_groups(stream):
        if info["name"] == GROUP:
            return info["last-delivered-id"] == last_id and int(info["pending"]) == 0
    return False


@dataclass
class _Context:
    url: str
    client: Any
    consumers: list[Consumer]
    server_pid: int
    streams: itertools.count = field(default_factory=itertools.count)


def _trial(ctx: _Context, config: Config, events: int) -> ConsumerTrial:
    from eventbus import EventBus
    from eventbus.transports import RedisStreamsTransport

    mode, weight, n = config.mode, config.weight, config.processes
    client = ctx.client
    stream = f"bench-{mode}-{weight}-{n}-{next(ctx.streams)}"
    consumers = ctx.consumers[:n]
    run_all(consumers, f"run {mode} {weight} {stream}")
    producer = None
    if mode == "eventbus":
        transport = RedisStreamsTransport(ctx.url, stream=stream, group=GROUP)
        producer = EventBus(transport=transport, max_workers=1, name="bench-producer")
        emit = producer.emit

        def publish(payload: Any) -> object:
            return emit(EVENT_NAME, payload)
    else:
        xadd = client.xadd

        def publish(payload: Any) -> object:
            return xadd(stream, _raw_fields(payload))

    @functools.cache
    def last_id() -> str:  # read once everything is published
        return str(client.xinfo_stream(stream)["last-generated-id"])

    try:
        timing = publish_and_wait(
            publish,
            events,
            lambda: _settled(client, stream, last_id()),
            consumers,
            ("redis_server", ctx.server_pid),
        )
    finally:
        if producer is not None:
            producer.close()
        handled = stop_all(consumers)
        client.delete(stream, f"{stream}:dead")
    return ConsumerTrial(timing, events, events * HANDLERS, handled)


# -- the scenario --------------------------------------------------------------------------------


def _skipped(reason: str) -> Section:
    warn_skipped(
        "multi-process (Redis) scenario",
        reason,
        "Install redis-server (apt-get install redis-server / brew install redis) and\n"
        "redis-py (pip install redis) to measure it.",
    )
    return Section([skipped_row(name, reason) for name in (SCENARIO, SCENARIO_IO)])


def multi_process(sizes: Sizes) -> Section:
    """events/s through Redis Streams with 1 and 3 consumer processes, eventbus vs raw redis-py."""
    executable = shutil.which("redis-server")
    if executable is None:
        return _skipped(NO_SERVER)
    try:
        import redis
    except ImportError:
        return _skipped(NO_REDIS_PY)

    with tempfile.TemporaryDirectory(prefix="eventbus-bench-redis-") as tmp:
        directory = Path(tmp)
        server = _Server(executable, directory)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            with consumer_processes(
                "bench.redis_streams", server.url, directory, max(CONSUMERS)
            ) as consumers:
                ctx = _Context(server.url, client, consumers, server.process.pid)
                return _measure(ctx, sizes)
        finally:
            client.close()
            server.stop()


def _reference(config: Config) -> tuple[str, str]:
    if config.scenario == SCENARIO:  # each to the raw loop with as many consumers
        return SCENARIO, raw_label(config.processes)
    return SCENARIO_IO, eventbus_label(1)  # the I/O-like rows to eventbus with 1 consumer


def _measure(ctx: _Context, sizes: Sizes) -> Section:
    def io_events(mode: str) -> int:
        return sizes.redis_io_events if mode == "eventbus" else sizes.redis_raw_io_events

    return measure(
        [
            *configs(SCENARIO, LABELS, CONSUMERS, lambda _mode: sizes.redis_events, "trivial"),
            *configs(SCENARIO_IO, LABELS, CONSUMERS, io_events, "io"),
        ],
        functools.partial(_trial, ctx),
        sizes.repeats,
        "Redis",
        _reference,
    )


# -- consumer processes (child side) -------------------------------------------------------------

_never = threading.Event()  # never set: its wait() is the I/O-like handler's simulated I/O


def _handlers(counter: list[itertools.count], weight: str) -> list[Callable[..., None]]:
    """4 handlers counting their calls on ``counter[0]`` (replaced for each trial)."""

    def make(i: int) -> Callable[..., None]:
        if weight == "io":

            def handler(*_args: object) -> None:
                _never.wait(IO_WAIT)
                next(counter[0])
        else:

            def handler(*_args: object) -> None:
                next(counter[0])

        handler.__name__ = handler.__qualname__ = f"handler_{i}"
        return handler

    return [make(i) for i in range(HANDLERS)]


def _raw_consume(
    client: Any, stream: str, name: str, handlers: Sequence[Callable[..., None]], stop: Any
) -> None:
    """The raw loop: XREADGROUP COUNT 100 BLOCK 50, then per entry decode, call, XACK."""
    xreadgroup, xack, loads = client.xreadgroup, client.xack, json.loads
    streams = {stream: ">"}
    block = int(BLOCK * 1000)
    while not stop.is_set():
        for _stream, entries in xreadgroup(GROUP, name, streams, count=BATCH, block=block) or []:
            for entry_id, fields in entries:
                payload = loads(fields["payload"])
                for h in handlers:
                    h(payload)
                xack(stream, GROUP, entry_id)


def consume(url: str, name: str) -> int:
    """Serve trials: ``run <mode> <weight> <stream>`` (answers ``ready``), ``stop`` (answers
    ``handled <calls>``), ``exit``."""
    import redis

    from eventbus import EventBus
    from eventbus.transports import RedisStreamsTransport

    client = redis.Redis.from_url(url, decode_responses=True)
    counter = [itertools.count()]

    def run(words: list[str]) -> Callable[[], None]:
        mode, weight, stream = words[:3]
        counter[0] = itertools.count()
        handlers = _handlers(counter, weight)
        if mode == "eventbus":
            transport = RedisStreamsTransport(
                url, stream=stream, group=GROUP, consumer=name, block=BLOCK
            )
            bus = EventBus(transport=transport, max_workers=WORKERS, name=name)
            for i, h in enumerate(handlers):
                bus.subscribe(EVENT_NAME, h, name=f"bench.handler_{i}")
            bus.recover()
            return bus.close
        try:
            client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        return in_thread(_raw_consume, client, stream, name, handlers)

    serve(run, lambda: next(counter[0]))
    client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = consumer_args("python -m bench.redis_streams", __doc__, argv)
    return consume(args.url, args.name)


if __name__ == "__main__":
    sys.exit(main())
