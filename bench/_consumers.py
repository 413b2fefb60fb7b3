"""What the transport scenarios with consumer processes share (bench/redis_streams.py,
bench/rabbitmq.py): the consumer processes and the line protocol that drives them, one timed
trial, the warm-up and round robin over the configurations, and the rows.

The parent starts each consumer once (``python -m <module> consume --url URL --name NAME
...``), which answers ``started``; then per trial it sends ``run <words>`` (answered
``ready`` once the consumer consumes), publishes from its own process, polls until the
consumers are done, and sends ``stop`` (answered ``handled <calls>``); ``exit`` ends the
consumer. Waiting here is for external processes, always bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._harness import PAYLOAD, WAIT_TIMEOUT, Row, Section, configure_structlog, median

#: Pause between two checks of whether the consumers are done.
POLL = 0.002
#: How long a consumer process may take to start.
STARTUP_DEADLINE = 30.0
ROOT = Path(__file__).resolve().parent.parent


def processes(n: int) -> str:
    return f"{n} consumer process{'es' if n > 1 else ''}"


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a live process (Linux ``/proc``; NaN elsewhere)."""
    if pid is None:
        return math.nan
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- consumer processes (parent side) ------------------------------------------------------------


class Consumer:
    """One ``python -m <module> consume`` child, driven by lines on its stdin."""

    def __init__(
        self,
        module: str,
        url: str,
        name: str,
        directory: Path,
        extra: Sequence[str] = (),
        exit_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.exit_timeout = exit_timeout
        self.stderr_path = directory / f"{name}.stderr"
        command = [sys.executable, "-m", module, "consume", "--url", url, "--name", name]
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [*command, *extra],
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
                self.process.wait(timeout=self.exit_timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.reader.join(5)


@contextlib.contextmanager
def consumer_processes(
    module: str,
    url: str,
    directory: Path,
    count: int,
    extra: Callable[[int], Sequence[str]] = lambda _i: (),
    exit_timeout: float = 10.0,
) -> Iterator[list[Consumer]]:
    """*count* consumers ``consumer-0`` ... (``extra(i)``: the arguments the i-th also gets),
    each started; all closed at the end."""
    consumers: list[Consumer] = []
    try:
        for i in range(count):
            consumers.append(
                Consumer(module, url, f"consumer-{i}", directory, extra(i), exit_timeout)
            )
        for c in consumers:
            c.expect("started", STARTUP_DEADLINE)
        yield consumers
    finally:
        for c in consumers:
            c.close()


def run_all(consumers: Sequence[Consumer], line: str) -> None:
    """Send ``run ...`` *line* to each of *consumers*, then wait until each is ``ready``."""
    for c in consumers:
        c.send(line)
    for c in consumers:
        c.expect("ready")


def stop_all(consumers: Sequence[Consumer]) -> list[int]:
    """Stop each consumer's trial; how many handler calls each made."""
    for c in consumers:
        c.send("stop")
    return [int(c.expect("handled")) for c in consumers]


# -- one trial -----------------------------------------------------------------------------------


@dataclass
class Timing:
    seconds: float
    publish_seconds: float
    finished: bool
    polls: int
    #: CPU seconds during the timed part: this process, the server, the consumers.
    cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class ConsumerTrial:
    timing: Timing
    events: int
    #: Handler calls the consumers must make in all.
    expected: int
    #: Handler calls each consumer made.
    handled: list[int]
    #: More to report per trial, under its key (in the rows: one list per key).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.timing.seconds

    @property
    def ok(self) -> bool:
        return self.timing.finished and sum(self.handled) == self.expected


def publish_and_wait(
    publish: Callable[[Any], object],
    events: int,
    done: Callable[[], bool],
    consumers: Sequence[Consumer],
    server: tuple[str, int | None],
) -> Timing:
    """Publish *events* events back to back, then poll *done* every POLL seconds until it is
    True or WAIT_TIMEOUT has passed; wall time, and CPU time of this process, the server
    (``(name, pid)``) and the consumers."""
    payload = PAYLOAD
    pause = threading.Event()
    polls = 0
    name, server_pid = server
    pids: dict[str, list[int | None]] = {
        name: [server_pid],
        "consumers": [c.process.pid for c in consumers],
    }

    def cpu() -> dict[str, float]:
        used = {k: sum(cpu_seconds(pid) for pid in v) for k, v in pids.items()}
        return {"producer": time.process_time(), **used}

    gc.collect()
    cpu_before = cpu()
    start = time.perf_counter()
    for _ in range(events):
        publish(payload)
    published = time.perf_counter()
    deadline = published + WAIT_TIMEOUT
    while not (finished := done()):
        if time.perf_counter() > deadline:
            break
        polls += 1
        pause.wait(POLL)  # bounded polling of external processes
    end = time.perf_counter()
    cpu_after = cpu()
    used = {k: cpu_after[k] - cpu_before[k] for k in cpu_before}
    return Timing(end - start, published - start, finished, polls, used)


# -- the scenario --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One row: its scenario and label, eventbus or the raw loop (*mode*), how many consumer
    processes, events per trial, and the handlers' weight where a scenario has more than one."""

    scenario: str
    label: str
    mode: str
    processes: int
    events: int
    weight: str = ""


def configs(
    scenario: str,
    labels: Mapping[str, Callable[[int], str]],
    processes: Sequence[int],
    events: Callable[[str], int],
    weight: str = "",
) -> list[Config]:
    """One configuration of *scenario* per mode (the keys of *labels*, each with the function
    that labels its rows for a number of processes) and per number of *processes*, in that
    order; ``events(mode)`` events per trial."""
    return [
        Config(scenario, label(n), mode, n, events(mode), weight)
        for mode, label in labels.items()
        for n in processes
    ]


def measure(
    configs: Sequence[Config],
    trial: Callable[[Config, int], ConsumerTrial],
    repeats: int,
    server: str,
    reference: Callable[[Config], tuple[str, str]],
) -> Section:
    """Warm each configuration up (a tenth of its events), then *repeats* rounds, each
    configuration once per round (drift spreads evenly over the rows); one events/s row per
    configuration, its ratio to the row ``reference(config)`` names (scenario, label)."""
    for c in configs:  # warm-up: imports, connections, code paths
        warm = trial(c, max(c.processes, c.events // 10))
        if not warm.ok:
            weight = f" ({c.weight})" if c.weight else ""
            raise RuntimeError(f"{server} warm-up of {c.label!r}{weight} came out wrong: {warm}")
    trials: dict[Config, list[ConsumerTrial]] = {c: [] for c in configs}
    for _ in range(repeats):  # round robin: drift spreads evenly over the rows
        for c in configs:
            trials[c].append(trial(c, c.events))
    rows = [_row(c, runs) for c, runs in trials.items()]
    by = {(r.scenario, r.dispatcher): r for r in rows}
    for c, row in zip(configs, rows, strict=True):
        base = by[reference(c)]
        row.ratio = row.value / base.value
        row.ratio_to = base.dispatcher
    return Section(rows)


def _row(config: Config, runs: list[ConsumerTrial]) -> Row:
    values = [t.rate for t in runs]
    return Row(
        config.scenario,
        config.label,
        median(values),
        "events/s",
        samples=values,
        ok=all(t.ok for t in runs),
        detail={
            "events_per_trial": runs[0].events,
            "handled": sum(sum(t.handled) for t in runs),
            "expected": sum(t.expected for t in runs),
            "handled_per_consumer": [t.handled for t in runs],
            "best": max(values),
            "publish_events_per_s_median": median(
                [t.events / t.timing.publish_seconds for t in runs]
            ),
            "polls_median": median([t.timing.polls for t in runs]),
            **{key: [t.extra[key] for t in runs] for key in runs[0].extra},
            "cpu_us_per_event_median": {
                k: median([t.timing.cpu[k] / t.events * 1e6 for t in runs])
                for k in runs[0].timing.cpu
            },
        },
    )


# -- consumer processes (child side) -------------------------------------------------------------


def out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def serve(run: Callable[[list[str]], Callable[[], None]], handled: Callable[[], int]) -> None:
    """A consumer's loop over the lines of its stdin, after saying ``started``: ``run <words>``
    starts a trial, ``run(words)``, which returns what stops it, and answers ``ready``;
    ``stop`` stops it and answers ``handled <handled()>``; ``exit`` (or the end of stdin)
    stops what runs and returns."""
    configure_structlog()
    stop_trial: Callable[[], None] = lambda: None  # noqa: E731
    out("started")
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "exit":
            break
        if words[0] == "run":
            stop_trial = run(words[1:])
            out("ready")
        elif words[0] == "stop":
            stop_trial()
            stop_trial = lambda: None  # noqa: E731
            out(f"handled {handled()}")
    stop_trial()


def in_thread(
    target: Callable[..., None], *args: Any, name: str | None = None
) -> Callable[[], None]:
    """Start ``target(*args, stop)`` on a daemon thread, *stop* a ``threading.Event``; return
    what sets it and joins the thread."""
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(*args, stop), name=name, daemon=True)
    thread.start()

    def stop_thread() -> None:
        stop.set()
        thread.join()

    return stop_thread


def consumer_args(
    prog: str,
    description: str | None,
    argv: list[str] | None,
    more: Callable[[argparse.ArgumentParser], object] = lambda _parser: None,
) -> argparse.Namespace:
    """The command line of ``python -m <prog> consume --url URL [--name NAME]``, plus the
    options *more* adds."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    modes = parser.add_subparsers(dest="mode", required=True)
    consumer = modes.add_parser("consume", help="a consumer process (driven by its parent)")
    consumer.add_argument("--url", required=True)
    consumer.add_argument("--name", default=f"bench-consumer-{os.getpid()}")
    more(consumer)
    return parser.parse_args(argv)
