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

import argparse
import gc
import itertools
import json
import math
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
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
#: Pause between two polls of XINFO GROUPS while waiting for the consumers.
POLL = 0.002
#: How long redis-server may take to answer PING, or a consumer to start.
STARTUP_DEADLINE = 30.0

SCENARIO = f"multi-process (Redis), {HANDLERS} handlers"
SCENARIO_IO = f"multi-process (Redis), {HANDLERS} handlers waiting {IO_WAIT * 1000:g} ms (I/O-like)"
NO_SERVER = "redis-server not installed"
NO_REDIS_PY = "redis-py not installed"
ROOT = Path(__file__).resolve().parent.parent


def _processes(n: int) -> str:
    return f"{n} consumer process{'es' if n > 1 else ''}"


def eventbus_label(n: int) -> str:
    each = " each" if n > 1 else ""
    return f"eventbus RedisStreamsTransport, {_processes(n)} (max_workers={WORKERS}{each})"


def raw_label(n: int) -> str:
    return f"raw redis-py XADD/XREADGROUP/XACK loop, {_processes(n)}"


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


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (Linux ``/proc``; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- consumer processes (parent side) ------------------------------------------------------------


class _Consumer:
    """One ``python -m bench.redis_streams consume`` child, driven by lines on its stdin."""

    def __init__(self, url: str, name: str, directory: Path) -> None:
        self.name = name
        self.stderr_path = directory / f"{name}.stderr"
        command = [sys.executable, "-m", "bench.redis_streams", "consume"]
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [*command, "--url", url, "--name", name],
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
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.reader.join(5)


# -- one trial -----------------------------------------------------------------------------------


@dataclass
class RedisTrial:
    seconds: float
    publish_seconds: float
    events: int
    finished: bool
    handled: list[int]
    polls: int
    #: CPU seconds during the timed part: this process, the consumers, redis-server.
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    @property
    def ok(self) -> bool:
        return self.finished and sum(self.handled) == self.events * HANDLERS


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
    consumers: list[_Consumer]
    server_pid: int
    streams: itertools.count = field(default_factory=itertools.count)


def _trial(ctx: _Context, mode: str, weight: str, n: int, events: int) -> RedisTrial:
    from eventbus import EventBus
    from eventbus.transports import RedisStreamsTransport

    client = ctx.client
    stream = f"bench-{mode}-{weight}-{n}-{next(ctx.streams)}"
    consumers = ctx.consumers[:n]
    for c in consumers:
        c.send(f"run {mode} {weight} {stream}")
    for c in consumers:
        c.expect("ready")
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

    payload = PAYLOAD
    pause = threading.Event()
    polls = 0
    pids = {"redis_server": [ctx.server_pid], "consumers": [c.process.pid for c in consumers]}

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
        last_id = client.xinfo_stream(stream)["last-generated-id"]
        deadline = published + WAIT_TIMEOUT
        while not (finished := _settled(client, stream, last_id)):
            if time.perf_counter() > deadline:
                break
            polls += 1
            pause.wait(POLL)  # bounded polling of external processes
        end = time.perf_counter()
        cpu_after = cpu()
        used = {k: cpu_after[k] - cpu_before[k] for k in cpu_before}
    finally:
        if producer is not None:
            producer.close()
        for c in consumers:
            c.send("stop")
        handled = [int(c.expect("handled")) for c in consumers]
        client.delete(stream, f"{stream}:dead")
    return RedisTrial(end - start, published - start, events, finished, handled, polls, used)


# -- the scenario --------------------------------------------------------------------------------


def _skipped(reason: str) -> Section:
    banner = "!" * 78
    print(
        f"\n{banner}\n!! multi-process (Redis) scenario SKIPPED: {reason}.\n"
        "!! Install redis-server (apt-get install redis-server / brew install redis) and\n"
        f"!! redis-py (pip install redis) to measure it.\n{banner}",
        file=sys.stderr,
        flush=True,
    )
    return Section(
        [Row(name, f"skipped: {reason}", math.nan, "", ok=True) for name in (SCENARIO, SCENARIO_IO)]
    )


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
        consumers: list[_Consumer] = []
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            consumers = [
                _Consumer(server.url, f"consumer-{i}", directory) for i in range(max(CONSUMERS))
            ]
            for c in consumers:
                c.expect("started", STARTUP_DEADLINE)
            ctx = _Context(server.url, client, consumers, server.process.pid)
            return _measure(ctx, sizes)
        finally:
            for c in consumers:
                c.close()
            client.close()
            server.stop()


def _measure(ctx: _Context, sizes: Sizes) -> Section:
    # scenario, label, mode, weight, consumer processes, events per trial
    configs: list[tuple[str, str, str, str, int, int]] = []
    for weight, scenario in (("trivial", SCENARIO), ("io", SCENARIO_IO)):
        for mode in ("eventbus", "raw"):
            for n in CONSUMERS:
                if weight == "trivial":
                    events = sizes.redis_events
                elif mode == "eventbus":
                    events = sizes.redis_io_events
                else:
                    events = sizes.redis_raw_io_events
                label = eventbus_label(n) if mode == "eventbus" else raw_label(n)
                configs.append((scenario, label, mode, weight, n, events))

    for _scenario, label, mode, weight, n, events in configs:  # warm-up: imports, code paths
        trial = _trial(ctx, mode, weight, n, max(n, events // 10))
        if not trial.ok:
            raise RuntimeError(f"Redis warm-up of {label!r} ({weight}) came out wrong: {trial}")
    trials: dict[tuple[str, str], list[RedisTrial]] = {(c[0], c[1]): [] for c in configs}
    for _ in range(sizes.repeats):  # round robin: drift spreads evenly over the rows
        for scenario, label, mode, weight, n, events in configs:
            trials[scenario, label].append(_trial(ctx, mode, weight, n, events))

    rows: list[Row] = []
    for (scenario, label), runs in trials.items():
        values = [t.rate for t in runs]
        rows.append(
            Row(
                scenario,
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
                    "cpu_us_per_event_median": {
                        k: median([t.cpu[k] / t.events * 1e6 for t in runs]) for k in runs[0].cpu
                    },
                },
            )
        )
    by = {(r.scenario, r.dispatcher): r for r in rows}
    processes = {(c[0], c[1]): c[4] for c in configs}
    for row in rows:
        if row.scenario == SCENARIO:  # each to the raw loop with as many consumers
            reference = by[SCENARIO, raw_label(processes[row.scenario, row.dispatcher])]
        else:  # the I/O-like rows to eventbus with 1 consumer
            reference = by[SCENARIO_IO, eventbus_label(1)]
        row.ratio = row.value / reference.value
        row.ratio_to = reference.dispatcher
    return Section(rows)


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

    configure_structlog()

    def out(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    client = redis.Redis.from_url(url, decode_responses=True)
    counter = [itertools.count()]
    stop_trial: Callable[[], None] = lambda: None  # noqa: E731
    out("started")
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "exit":
            break
        if words[0] == "run":
            mode, weight, stream = words[1:4]
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
                stop_trial = bus.close
            else:
                try:
                    client.xgroup_create(stream, GROUP, id="0", mkstream=True)
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                stop = threading.Event()
                thread = threading.Thread(
                    target=_raw_consume, args=(client, stream, name, handlers, stop), daemon=True
                )
                thread.start()

                def stop_trial(stop: threading.Event = stop, thread: threading.Thread = thread):
                    stop.set()
                    thread.join()

            out("ready")
        elif words[0] == "stop":
            stop_trial()
            stop_trial = lambda: None  # noqa: E731
            out(f"handled {next(counter[0])}")
    stop_trial()
    client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_streams", description=__doc__)
    modes = parser.add_subparsers(dest="mode", required=True)
    consumer = modes.add_parser("consume", help="a consumer process (driven by its parent)")
    consumer.add_argument("--url", required=True)
    consumer.add_argument("--name", default=f"bench-consumer-{os.getpid()}")
    args = parser.parse_args(argv)
    return consume(args.url, args.name)


if __name__ == "__main__":
    sys.exit(main())
