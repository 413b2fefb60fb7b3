"""What the starters of real servers share: :class:`~tests.support.postgres.PostgresServer`,
:class:`~tests.support.redis.RedisServer`, and the benchmark's ``redis-server``
(bench/redis_streams.py).

A server runs as a child process writing a log file: :func:`wait_until_ready` waits for it to
answer, :func:`stop_process` ends it (a signal, then SIGKILL after a timeout), :func:`read_log`
reads its log for failure messages, and :class:`ServerProcess` is the base of the two test
starters (``running``, ``log()``, the context manager).

Nothing here imports pytest, so the benchmarks can use it. Waiting here is for an external
process to start or stop (a bounded loop with a deadline), never for work of the code under test.
"""

from __future__ import annotations

import abc
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["ServerProcess", "read_log", "stop_process", "wait_until_ready"]


def read_log(path: Path) -> str:
    """A server's log file, for failure messages; ``(no log)`` when it cannot be read."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return "(no log)"


def wait_until_ready(
    process: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float, pause: float
) -> bool:
    """Call *ready* until it returns True (then return True), *process* exits or *timeout*
    seconds pass (then False). Between calls, wait up to *pause* seconds on the process itself,
    which ends at once when it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        try:
            process.wait(timeout=pause)  # the external process is starting up
        except subprocess.TimeoutExpired:
            continue
        return False
    return False


def stop_process(
    process: subprocess.Popen[bytes], timeout: float, sig: int = signal.SIGTERM
) -> None:
    """Send *sig* to *process* unless it has exited, and wait up to *timeout* seconds for it to
    exit; if it has not, SIGKILL it and wait as long again."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


class ServerProcess(abc.ABC):
    """A server the tests run as a child process, writing a log file; a context manager:
    entering starts it (and closes it again if it does not start), leaving closes it.

    A subclass sets ``_process`` (the child, None while the server is stopped) and ``_log``
    (the log file's path), and defines ``start()`` and ``close()``; its ``start()`` launches the
    child and calls ``_wait_started()``.
    """

    _process: subprocess.Popen[bytes] | None
    _log: Path

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        """The server's log, for failure messages."""
        return read_log(self._log)

    def _wait_started(
        self,
        ready: Callable[[], bool],
        timeout: float,
        pause: float,
        *,
        failed: str,
        end: Callable[[], None],
    ) -> None:
        """Return once the just started ``_process`` is *ready* (see :func:`wait_until_ready`);
        if it is not, *end* it and raise a RuntimeError: *failed* within *timeout*, the exit
        code, and the log."""
        assert self._process is not None
        if wait_until_ready(self._process, ready, timeout, pause):
            return
        returncode = self._process.poll()
        end()
        raise RuntimeError(
            f"{failed} within {timeout}s (exit code {returncode}); its log:\n{self.log()}"
        )

    @abc.abstractmethod
    def start(self) -> None:
        """Start the server and wait until it answers; raise if it does not."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the server and remove its directory."""

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
