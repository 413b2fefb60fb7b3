"""The one way a test starts a real ``redis-server``: on a free local port, in a temporary
directory.

:class:`RedisServer` runs one server process with persistence off (``--save ''``,
``--appendonly no``), bound to 127.0.0.1 only. It can be stopped and started again on the same
port, for connection-loss tests, and paused (SIGSTOP) and resumed, for tests of a Redis that
stops answering. :func:`redis_server_path` finds the executable, skipping the test with one
line naming the package to install when it is missing, except under CI (``CI`` set), where the
tests must run and fail instead. The fixtures of tests/conftest.py (``redis_server``,
``redis_url``, ``own_redis``) are built on it.

Waiting here is for an external process to start or stop (a bounded loop of connection
attempts with a deadline), never for work of the code under test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.net import server_port
from tests.support.server import ServerProcess, stop_process

__all__ = ["INSTALL_HINT", "RedisServer", "find_redis_server", "redis_server_path"]

#: How long a server may take to answer PING, or to exit after SIGTERM.
STARTUP_DEADLINE = 10.0
STOP_DEADLINE = 5.0

INSTALL_HINT = (
    "install it with `sudo apt-get install redis-server` (Debian/Ubuntu) or "
    "`brew install redis` (macOS); .ci/run installs it in CI"
)


def find_redis_server() -> str | None:
    """The ``redis-server`` executable on PATH, or None."""
    return shutil.which("redis-server")


def redis_server_path() -> str:
    """The ``redis-server`` executable: skips the test without one, fails it under CI."""
    path = find_redis_server()
    if path is not None:
        return path
    message = f"redis-server not installed: {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: the Redis transport tests must run here)")
    pytest.skip(message)


def _ping(port: int) -> bool:
    """Whether a Redis server on *port* answers PING (RESP, no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer(ServerProcess):
    """One ``redis-server`` process on a fixed local port; a context manager.

    ``start()`` launches it and returns once it answers PING; ``stop()`` ends it (SIGTERM,
    then SIGKILL after a timeout). Both may be called again: a restarted server listens on the
    same port, with an empty data set (nothing is saved) unless *persistent*: then an
    append-only file is fsynced before every reply (``--appendfsync always``), so whatever
    Redis acknowledged survives a stop and is loaded again by the restart.
    """

    def __init__(
        self, executable: str | None = None, port: int | None = None, *, persistent: bool = False
    ) -> None:
        self.executable = executable or redis_server_path()
        self.persistent = persistent
        self.port = port if port is not None else server_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="eventbus-redis-")
        self.directory = Path(self._tmp.name)
        self._process: subprocess.Popen[bytes] | None = None
        self._log = self.directory / "redis.log"

    @property
    def url(self) -> str:
        """The server's URL, database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it answers PING; raise if it does not."""
        if self.running:
            return
        command = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            *(["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else []),
            *([] if self.persistent else ["--appendonly", "no"]),
            "--daemonize",
            "no",
            "--logfile",
            str(self._log),
        ]
        self._process = subprocess.Popen(
            command, cwd=self.directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_started(
            lambda: _ping(self.port),
            STARTUP_DEADLINE,
            0.01,
            failed=f"redis-server on port {self.port} did not answer PING",
            end=self.stop,
        )

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it keeps its port and connections, and the kernel still
        accepts new ones, but it answers nothing, as a hung or swapped-out Redis would.
        :meth:`resume` (or :meth:`stop`) lets it run again."""
        if not self.running:
            raise RuntimeError(f"redis-server on port {self.port} is not running")
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server run again (SIGCONT); a no-op when it is not running."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server, paused or not: SIGTERM, then SIGKILL if it has not exited in time.
        Idempotent."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            # A paused server handles SIGTERM only once it runs again.
            process.send_signal(signal.SIGCONT)
        stop_process(process, STOP_DEADLINE)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        self._tmp.cleanup()
