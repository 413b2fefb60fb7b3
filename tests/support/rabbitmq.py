"""The one way a test starts a real RabbitMQ server: on free local ports, in a temporary
directory.

:class:`RabbitMQServer` runs one RabbitMQ node (no plugins) whose AMQP listener, Erlang
distribution port and epmd are all bound to 127.0.0.1, on ports of its own; its node name
(``rabbit-<AMQP port>@localhost``), database, logs, configuration and Erlang cookie (``HOME``)
all live in its temporary directory, and every ``RABBITMQ_*``/``ERL_*`` setting of the
environment (and /etc/rabbitmq's files) is replaced, so that it never meets a system RabbitMQ
or another test's. The default user ``guest``/``guest`` may connect (from localhost only, as
RabbitMQ allows it). The node can be stopped and started again, or killed (SIGKILL) and started
again, on the same data directory and ports: durable queues and their persistent messages
survive both, for crash and connection-loss tests. :func:`rabbitmq_server_path` finds the
server's script, skipping the test with one line naming the package to install when it is
missing, except under CI (``CI`` set), where the tests must run and fail instead. The fixtures
of tests/conftest.py (``rabbitmq_server``, ``rabbitmq_url``, ``own_rabbitmq``) are built on it.

When the tests run as root, the node runs as the unprivileged ``rabbitmq`` user that the Debian
package creates (through ``setpriv``, or ``runuser``), and the temporary directory is handed to
that user; without that user it runs as root, which RabbitMQ allows. Debian's
/usr/sbin/rabbitmq-server is not used: it switches users with ``su`` and sends the output to
/var/log; its real script, /usr/lib/rabbitmq/bin/rabbitmq-server, runs the node in the
foreground as a child of the tests (the script's shell stays as the node's parent and forwards
SIGTERM), so that a killed node is reaped here. epmd is started here too, as a child of the
tests, on the server's own port (``ERL_EPMD_PORT``), rather than left to the node, which would
start it as a daemon that outlives it; it ends with the node.

A node takes about 4 s to start (3.6 to 5.5 s measured, restarts included), most of it the
Erlang VM loading RabbitMQ's code; a clean stop about 1 s. Erlang resolves host names from
/etc/hosts first (``ERL_INETRC``): that saves nearly a second a start, and the ``inet_gethost``
helper processes. A server still open when the interpreter exits (the tests were interrupted)
is closed then.

Waiting here is for an external process to start or stop (a bounded loop of connection
attempts with a deadline), never for work of the code under test.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import pika
import pika.exceptions
import pytest

from tests.support.net import server_port
from tests.support.server import (
    NoServerAccount,
    ServerProcess,
    chown_tree,
    descendants,
    kill,
    read_log,
    server_account,
    wait_gone,
    wait_until_ready,
)

__all__ = [
    "INSTALL_HINT",
    "SYSTEM_USER",
    "RabbitMQServer",
    "find_rabbitmq_server",
    "rabbitmq_server_path",
]

#: How long a node may take to accept AMQP connections (recovery after a crash included).
STARTUP_DEADLINE = 30.0
#: How long a node may take to exit after SIGTERM (a clean shutdown), or its processes after
#: SIGKILL; and epmd to listen or exit.
STOP_DEADLINE = 15.0
#: The unprivileged system user the node runs as when the tests run as root.
SYSTEM_USER = "rabbitmq"

INSTALL_HINT = (
    "install it with `sudo apt-get install rabbitmq-server` (Debian/Ubuntu) or "
    "`brew install rabbitmq` (macOS); .ci/run installs it in CI"
)

#: Debian's real server script (its /usr/sbin/rabbitmq-server is a wrapper, see above).
_DEBIAN_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")

#: The node's configuration (rabbitmq.conf, the sysctl-like format).
_CONFIG = """\
# eventbus tests (tests/support/rabbitmq.py)
# A nearly full disk must not block the tests' publishers.
disk_free_limit.absolute = 1MB
log.console = false
log.file.level = info
"""

#: Erlang's resolver settings: /etc/hosts first (``localhost`` is there), then the system's.
_INETRC = "{lookup, [file, native]}.\n"


def _unavailable(message: str) -> NoReturn:
    """Skip the test with *message*, or fail it under CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: the RabbitMQ tests must run here)")
    pytest.skip(message)


def find_rabbitmq_server() -> Path | None:
    """The ``rabbitmq-server`` script that runs a node in the foreground, or None: Debian's
    /usr/lib/rabbitmq/bin/rabbitmq-server, else the one on PATH (symlinks followed)."""
    if os.access(_DEBIAN_SCRIPT, os.X_OK):
        return _DEBIAN_SCRIPT
    on_path = shutil.which("rabbitmq-server")
    return Path(on_path).resolve() if on_path is not None else None


def rabbitmq_server_path() -> Path:
    """The ``rabbitmq-server`` script: skips the test without one, fails it under CI."""
    path = find_rabbitmq_server()
    if path is None:
        _unavailable(f"rabbitmq-server not installed: {INSTALL_HINT}")
    return path


def _epmd_path() -> str:
    """Erlang's ``epmd``, which every installed RabbitMQ brings along."""
    on_path = shutil.which("epmd")
    if on_path is not None:
        return on_path
    for candidate in sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"), reverse=True):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    _unavailable(f"epmd (Erlang) not found beside rabbitmq-server: {INSTALL_HINT}")


def _server_account() -> tuple[list[str], int, int]:
    """The command prefix that runs a command as the node's user, and that user's ids: the
    current user, or the unprivileged ``rabbitmq`` user when running as root (root itself when
    that user or a way to switch to it is missing)."""
    try:
        return server_account(SYSTEM_USER)
    except NoServerAccount:
        return [], 0, 0


def _distinct_server_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = server_port()
        if port not in ports:
            ports.append(port)
    return ports


# -- processes --------------------------------------------------------------------------------


def _listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:*port*."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _end(process: subprocess.Popen[bytes], signum: int = signal.SIGTERM) -> None:
    """Send *signum* to a child of the tests, or to the processes below it when there are any
    (epmd below ``runuser``, which reaps it and exits then: signalled itself, runuser would
    wait 2 s, or die first and leave epmd to init); reap the child and wait until they are
    all gone; SIGKILL them all after STOP_DEADLINE."""
    if process.poll() is None:
        below = descendants(process.pid)
        for pid in below[::-1] or [process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        try:
            process.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            for pid in [*below, process.pid]:
                kill(pid)
        process.wait(timeout=STOP_DEADLINE)
        wait_gone(below, STOP_DEADLINE, f"the processes of {process.args!r}")


class RabbitMQServer(ServerProcess):
    """One RabbitMQ node on its own ports and data directory; a context manager.

    ``start()`` launches it (and its epmd) and returns once it accepts AMQP connections;
    ``stop()`` shuts it down cleanly (SIGTERM, then SIGKILL after a timeout) and ends its epmd;
    ``kill()`` crashes it (SIGKILL to the node, its helper processes and its epmd). Each may be
    followed by ``start()`` again: the restarted node has the same name, data directory and
    ports, so durable queues and persistent messages are recovered. ``close()`` (or leaving
    the ``with`` block) stops it and removes its directory.
    """

    def __init__(self, script: Path | None = None, port: int | None = None) -> None:
        self.script = script or rabbitmq_server_path()
        self._epmd = _epmd_path()
        self._prefix, self._uid, self._gid = _server_account()
        ports = _distinct_server_ports(3 if port is None else 2)
        self.port = port if port is not None else ports.pop()
        self.dist_port, self.epmd_port = ports[:2]
        self.nodename = f"rabbit-{self.port}@localhost"
        self.directory = Path(tempfile.mkdtemp(prefix="eventbus-rabbitmq-"))
        self._log = self.directory / "rabbitmq-server.out"  # the script's output
        self._epmd_output = self.directory / "epmd.out"
        self._pid_file = self.directory / "rabbit.pid"
        self._write_settings()
        chown_tree(self.directory, self._uid, self._gid)
        self._env = self._environment()
        self._process: subprocess.Popen[bytes] | None = None
        self._epmd_process: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._closed = False
        self._close_at_exit()

    # -- addresses ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The AMQP URL of the default virtual host as ``guest``."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def pid(self) -> int | None:
        """The node's (``beam.smp``'s) process id while it runs, else None."""
        return self._pid if self.running else None

    @property
    def epmd_pid(self) -> int | None:
        """The process id of the server's own epmd while it runs, else None."""
        process = self._epmd_process
        if process is None or process.poll() is not None:
            return None
        below = descendants(process.pid)  # runuser stands in between
        return below[-1] if below else process.pid

    def processes(self) -> list[int]:
        """The process ids of everything the server runs now: the script's process and all
        below it (the node, its helpers), and epmd."""
        found = []
        for process in (self._process, self._epmd_process):
            if process is not None and process.poll() is None:
                found += [process.pid, *descendants(process.pid)]
        return found

    # -- setup --------------------------------------------------------------------------------

    def _write_settings(self) -> None:
        (self.directory / "rabbitmq.conf").write_text(_CONFIG)
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq-env.conf").write_text("# none: see rabbitmq.py\n")
        (self.directory / "inetrc").write_text(_INETRC)

    def _environment(self) -> dict[str, str]:
        """The environment of the node and its epmd: the tests' own, minus every RabbitMQ and
        Erlang setting (and systemd's, which would change how the script runs the node), plus
        this server's."""
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("RABBITMQ_", "ERL_")) and name != "NOTIFY_SOCKET"
        }
        d = self.directory
        env.update(
            HOME=str(d),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_INETRC=str(d / "inetrc"),
            RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_PID_FILE=str(self._pid_file),
            # The distribution listens on loopback only; epmd is started here (_start_epmd).
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                "-kernel inet_dist_use_interface {127,0,0,1} -start_epmd false"
            ),
        )
        return env

    # -- life cycle ---------------------------------------------------------------------------

    def _spawn(self, command: list[str], output: Path) -> subprocess.Popen[bytes]:
        with output.open("ab") as out:
            return subprocess.Popen(
                [*self._prefix, *command],
                cwd=self.directory,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def _start_epmd(self, deadline: float) -> None:
        if self.epmd_pid is not None:
            return
        command = [self._epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"]
        self._epmd_process = process = self._spawn(command, self._epmd_output)
        listening = functools.partial(_listening, self.epmd_port)
        if wait_until_ready(process, listening, deadline - time.monotonic(), 0.01):
            return
        returncode = process.poll()
        self._stop_epmd(signal.SIGKILL)
        raise RuntimeError(
            f"epmd on port {self.epmd_port} did not listen (exit code {returncode}):\n"
            f"{read_log(self._epmd_output)}"
        )

    def _accepts_connections(self) -> bool:
        """Whether the node takes AMQP connections (a TCP connection first: the listener is
        the last thing a node starts, so pika tries only a node that is as good as ready)."""
        if not _listening(self.port):
            return False
        parameters = pika.URLParameters(self.url)
        parameters.connection_attempts = 1
        parameters.socket_timeout = 2.0
        try:
            pika.BlockingConnection(parameters).close()
        except pika.exceptions.AMQPError:
            return False
        return True

    def start(self) -> None:
        """Start epmd and the node and wait until it accepts AMQP connections; raise (after
        killing what started) if it does not within STARTUP_DEADLINE."""
        if self._closed:
            raise RuntimeError("the server was closed")
        if self.running:
            return
        started = time.monotonic()
        self._start_epmd(started + STARTUP_DEADLINE)
        self._process = self._spawn([str(self.script)], self._log)
        self._wait_started(
            self._accepts_connections,
            STARTUP_DEADLINE,
            0.02,
            failed=(
                f"RabbitMQ node {self.nodename} did not accept AMQP connections on port {self.port}"
            ),
            end=self.kill,
            since=started,
        )
        self._pid = self._node_pid()

    def _node_pid(self) -> int | None:
        """The node's pid: from its pid file, checked to be below the script; else the first
        ``beam.smp`` found below it."""
        assert self._process is not None
        below = descendants(self._process.pid)
        with contextlib.suppress(OSError, ValueError):
            pid = int(self._pid_file.read_text().strip())
            if pid in below:
                return pid
        for pid in below:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip().startswith("beam"):
                    return pid
        return None

    def stop(self) -> None:
        """Shut the node down cleanly (SIGTERM: RabbitMQ stops its listeners, closes its
        connections and queues, and syncs its stores), or kill it if it has not exited in
        time; then end its epmd. Idempotent."""
        process = self._process
        if process is None:
            self._stop_epmd()
            return
        if process.poll() is None:
            node = self._pid or self._node_pid()
            below = descendants(process.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(node or process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.kill()
                return
            try:
                wait_gone(below, STOP_DEADLINE, f"RabbitMQ node {self.nodename} after its shutdown")
            except RuntimeError:  # a helper outlived the node: orphaned, out of kill()'s reach
                for pid in below:
                    kill(pid)
                wait_gone(below, STOP_DEADLINE, f"RabbitMQ node {self.nodename} after SIGKILL")
        self._reap()

    def kill(self) -> None:
        """Crash the node: SIGKILL to it and to each of its helper processes and to its epmd,
        as a crash of its host would end them, then wait until they are gone (so that
        ``start()`` can recover at once). Persistent messages that RabbitMQ confirmed survive;
        nothing else is promised. A no-op when it is not running."""
        process = self._process
        if process is None:
            self._stop_epmd(signal.SIGKILL)
            return
        if process.poll() is None:
            below = descendants(process.pid)
            node = self._pid if self._pid in below else None
            # The node and what it started first: the script's shell, still alive, reaps the
            # node (an orphaned one would wait for init to reap it).
            victims = [node, *descendants(node)] if node is not None else below
            for pid in victims:
                kill(pid)
            try:
                process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                for pid in [process.pid, *below]:
                    kill(pid)
                process.wait(timeout=STOP_DEADLINE)
            wait_gone(below, STOP_DEADLINE, f"RabbitMQ node {self.nodename} after SIGKILL")
        self._reap(signal.SIGKILL)

    def _reap(self, epmd_signal: int = signal.SIGTERM) -> None:
        if self._process is not None:
            self._process.wait(timeout=STOP_DEADLINE)
        self._process = None
        self._pid = None
        self._stop_epmd(epmd_signal)

    def _stop_epmd(self, signum: int = signal.SIGTERM) -> None:
        process, self._epmd_process = self._epmd_process, None
        if process is not None:
            _end(process, signum)

    def log(self) -> str:
        """The node's output and log file, for failure messages."""
        log_file = self.directory / "log" / f"{self.nodename}.log"
        return (
            f"-- {self._log.name}:\n{read_log(self._log)}\n"
            f"-- {log_file.name}:\n{read_log(log_file)}"
        )

    def close(self) -> None:
        """Stop the node and its epmd, and remove its directory."""
        self._close_once(self.directory)
