"""The one line protocol between a test and the child processes it starts.

The child's side (the worker scripts of this package): :func:`out` writes one progress line on
stdout, flushed at once, and :func:`log_to_stderr` keeps structlog's records on stderr, out of
the protocol's way.

The test's side: :class:`ChildProcess` runs a command and reads one of its streams line by
line on a thread into a queue (stdout for the worker scripts, stderr for the order service's
JSON log lines), so every wait for a line is bounded and nothing sleeps; the reader also keeps
the pipe drained, so the child never blocks on a full pipe. :class:`Children` (the
``children`` fixture of tests/conftest.py) starts them and kills and reaps every one when the
test ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Literal

REPO = Path(__file__).resolve().parents[2]
#: Bound on any one wait for a child's line; only a broken child (or bus) waits this long.
LINE_WAIT = 30.0
#: Bound on a child's exit once it was told to stop (or killed).
EXIT_WAIT = 30.0

# -- the child's side -------------------------------------------------------------------------

_print_lock = threading.Lock()


def out(line: str) -> None:
    """One progress line for the parent on stdout, flushed at once (thread-safe)."""
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def consume_until_stop(bus: Any, consumer: str) -> None:
    """A consumer child's life: say who it is, start *bus* consuming (``recovered <k>``: the
    entries taken over), say ``ready``, then run until the parent writes ``stop``."""
    out(f"consumer {consumer}")
    out(f"recovered {bus.recover()}")
    out("ready")
    for line in sys.stdin:
        if line.strip() == "stop":
            break


def log_to_stderr(*processors: Any) -> None:
    """Render structlog records at INFO and above as key=value lines on stderr, after
    *processors* (structlog's default would print to stdout, the parent's protocol)."""
    import structlog  # only the children log through it here

    structlog.configure(
        processors=[
            *processors,
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )


# -- the test's side --------------------------------------------------------------------------


def script(name: str, *args: str) -> list[str]:
    """The command running the worker script ``tests/support/<name>.py`` with *args*."""
    return [sys.executable, "-m", f"tests.support.{name}", *args]


def order_service(*args: str) -> list[str]:
    """The command running the example's CLI, ``python -m examples.order_service <args>``."""
    return [sys.executable, "-m", "examples.order_service", *args]


def run_order_service(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run the example's CLI to its end in the repository, its output captured as text."""
    return subprocess.run(
        order_service(*args),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class ChildProcess:
    """*argv* run in the repository, its *read* stream (``stdout`` or ``stderr``) read by lines.

    When stdout is read, stderr goes to *err_path* (or nowhere); when stderr is read, stdout
    goes nowhere. ``lines`` holds every line read so far, in order; each line is also passed
    to *on_line* (on the reader thread) and queued for :meth:`next_line` and the ``expect``
    methods, which consume the queue. stdin is a pipe (:meth:`send`) only if *stdin*.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        read: Literal["stdout", "stderr"] = "stdout",
        stdin: bool = True,
        err_path: Path | None = None,
        on_line: Callable[[str], None] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.name = name
        self.err_path = err_path if read == "stdout" else None
        self._err: IO[str] | None = None
        if self.err_path is not None:
            self._err = self.err_path.open("w")
        pipe, other = subprocess.PIPE, self._err or subprocess.DEVNULL
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=pipe if read == "stdout" else subprocess.DEVNULL,
            stderr=pipe if read == "stderr" else other,
            text=True,
            cwd=cwd,
        )
        stream = self.proc.stdout if read == "stdout" else self.proc.stderr
        assert stream is not None
        self._stream: IO[str] = stream
        self.lines: list[str] = []
        self._on_line = on_line
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._eof = False
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for text in self._stream:
                line = text.rstrip("\n")
                self.lines.append(line)
                if self._on_line is not None:
                    self._on_line(line)
                self._queue.put(line)
        finally:
            self._queue.put(None)

    # -- reading --------------------------------------------------------------------------

    def next_line(self, timeout: float = LINE_WAIT, *, waiting_for: str = "a line") -> str:
        """The next line not consumed yet; fails if none comes within *timeout* or the child
        closes the stream first."""
        line = None
        if not self._eof:
            try:
                line = self._queue.get(timeout=max(0.0, timeout))
            except queue.Empty:
                raise AssertionError(
                    f"{self.name}: no {waiting_for} within {timeout} s; {self.output()}"
                ) from None
        if line is None:
            self._eof = True
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(EXIT_WAIT)
            raise AssertionError(
                f"{self.name} exited (rc={self.proc.returncode}) before printing "
                f"{waiting_for}; {self.output()}"
            )
        return line

    def expect_line(
        self, matches: Callable[[str], bool], what: str, timeout: float = LINE_WAIT
    ) -> str:
        """Consume lines until one *matches*; return it (*what* names it in failures)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.next_line(deadline - time.monotonic(), waiting_for=what)
            if matches(line):
                return line

    def expect_any(self, *prefixes: str, timeout: float = LINE_WAIT) -> tuple[str, str]:
        """Consume lines until one starts with one of *prefixes*; return (prefix, rest of the
        line, stripped)."""
        line = self.expect_line(lambda text: text.startswith(prefixes), f"{prefixes} line", timeout)
        prefix = next(p for p in prefixes if line.startswith(p))
        return prefix, line[len(prefix) :].strip()

    def expect(self, prefix: str, timeout: float = LINE_WAIT) -> str:
        """Consume lines until one starts with *prefix*; return the rest of it, stripped."""
        return self.expect_any(prefix, timeout=timeout)[1]

    def expect_event(self, event: str, timeout: float = LINE_WAIT) -> dict[str, Any]:
        """Consume lines until a JSON log line whose ``event`` is *event*; return it decoded."""
        line = self.expect_line(
            lambda text: text.startswith("{") and json.loads(text).get("event") == event,
            f"{event!r} log line",
            timeout,
        )
        decoded: dict[str, Any] = json.loads(line)
        return decoded

    def json_lines(self) -> list[dict[str, Any]]:
        """Every JSON line read so far (log lines), decoded, in order."""
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    def stderr(self) -> str:
        """What the child wrote on stderr so far (its file, or the lines read from it)."""
        if self._err is not None and self.err_path is not None:
            self._err.flush()
            return self.err_path.read_text()
        if self._stream is self.proc.stderr:
            return "\n".join(self.lines)
        return "(not kept)"

    def output(self) -> str:
        """The end of what the child printed, for failure messages."""
        tail = "\n".join(self.lines[-30:])
        if self._stream is self.proc.stderr:
            return f"its last lines:\n{tail}"
        return f"stdout tail: {self.lines[-5:]}; stderr: {self.stderr()[-2000:]}"

    # -- talking to it, ending it ---------------------------------------------------------

    def send(self, line: str) -> None:
        """One line on the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = EXIT_WAIT) -> int:
        """Wait for the exit and for the reader to reach the end of the stream (so ``lines``
        is complete); return the exit status."""
        returncode = self.proc.wait(timeout)
        self._reader.join(timeout)
        return returncode

    def send_signal(self, signum: int) -> None:
        """Send *signum* (if the child still runs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = EXIT_WAIT) -> None:
        """The worker scripts' way to end: ``stop`` on stdin, then their ``done`` line and
        exit status 0."""
        self.send("stop")
        self.expect("done", timeout)
        rc = self.wait(timeout)
        assert rc == 0, f"{self.name}: rc {rc}: {self.stderr()[-2000:]}"

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM (SIGKILL if it has not exited within *timeout*); wait for the exit and the
        last line; return the exit status."""
        self.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL and reap (an unreaped child would still look alive)."""
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Kill the child if it still runs, let the reader finish, close every pipe."""
        if self.proc.poll() is None:
            self.kill()
        self._reader.join(EXIT_WAIT)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr, self._err):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class Children:
    """Starts :class:`ChildProcess`es for one test; :meth:`close` ends every one."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._started: list[ChildProcess] = []

    def start(
        self, argv: Sequence[str], *, name: str | None = None, **options: Any
    ) -> ChildProcess:
        """Start *argv* (see :class:`ChildProcess` for *options*); when its stdout is read and
        no *err_path* is given, its stderr goes to ``<name>.err`` in the test's directory."""
        name = name or f"child-{len(self._started)}"
        if options.get("read", "stdout") == "stdout":
            options.setdefault("err_path", self._directory / f"{name}.err")
        child = ChildProcess(argv, name=name, **options)
        self._started.append(child)
        return child

    def script(self, script_name: str, *args: str, **options: Any) -> ChildProcess:
        """Start the worker script ``tests/support/<script_name>.py`` with *args*."""
        return self.start(script(script_name, *args), **options)

    def close(self) -> None:
        """Kill and reap every child still running; close their pipes."""
        for child in self._started:
            child.close()
