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

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import NoReturn

import pika
import pika.exceptions
import pytest

from tests.support.net import free_port

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
    if os.geteuid() != 0:
        return [], os.geteuid(), os.getegid()
    try:
        account = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        return [], 0, 0
    uid, gid = account.pw_uid, account.pw_gid
    if shutil.which("setpriv"):
        # setpriv execs the command: the server's script is then the tests' own child.
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--"], uid, gid
    if shutil.which("runuser"):
        return ["runuser", "-u", SYSTEM_USER, "--"], uid, gid
    return [], 0, 0


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """Hand *root* and everything under it to *uid*:*gid* (a no-op unless they differ)."""
    if os.geteuid() == uid:
        return
    os.chown(root, uid, gid)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(parent, name), uid, gid, follow_symlinks=False)


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


#: The servers made and not yet closed: closed at exit, should their owner not have done it.
_open_servers: set[RabbitMQServer] = set()


@atexit.register
def _close_open_servers() -> None:
    for server in list(_open_servers):
        server.close()


# -- processes --------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    """Whether process *pid* has exited (a zombie nobody reaps counts as exited)."""
    status = Path(f"/proc/{pid}/status")
    if status.parent.parent.is_dir():
        try:
            text = status.read_text()
        except OSError:
            return True
        return re.search(r"^State:\s+Z", text, re.MULTILINE) is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _children(pid: int) -> list[int]:
    """The processes whose parent is *pid*."""
    proc = Path("/proc")
    if proc.is_dir():
        found = []
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces and parentheses.
            fields = stat.rpartition(")")[2].split()
            if len(fields) > 1 and fields[1] == str(pid):
                found.append(int(entry.name))
        return found
    result = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=5.0, check=False
    )
    return [int(line) for line in result.stdout.split()]


def _descendants(pid: int) -> list[int]:
    """Every process below *pid*, parents before their children."""
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in _children(pending.pop(0)):
            if child not in found:
                found.append(child)
                pending.append(child)
    return found


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _wait_gone(pids: list[int], what: str) -> None:
    """Wait until every process of *pids* has exited; raise after STOP_DEADLINE."""
    deadline = time.monotonic() + STOP_DEADLINE
    pause = threading.Event()
    while not all(_gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            alive = [pid for pid in pids if not _gone(pid)]
            raise RuntimeError(f"{what}: processes {alive} still running")
        pause.wait(0.01)  # the kernel is tearing the processes down


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
        below = _descendants(process.pid)
        for pid in below[::-1] or [process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        try:
            process.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            for pid in [*below, process.pid]:
                _kill(pid)
        process.wait(timeout=STOP_DEADLINE)
        _wait_gone(below, f"the processes of {process.args!r}")


class RabbitMQServer:
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
        ports = _distinct_free_ports(3 if port is None else 2)
        self.port = port if port is not None else ports.pop()
        self.dist_port, self.epmd_port = ports[:2]
        self.nodename = f"rabbit-{self.port}@localhost"
        self.directory = Path(tempfile.mkdtemp(prefix="eventbus-rabbitmq-"))
        self._output = self.directory / "rabbitmq-server.out"
        self._epmd_output = self.directory / "epmd.out"
        self._pid_file = self.directory / "rabbit.pid"
        self._write_settings()
        _chown_tree(self.directory, self._uid, self._gid)
        self._env = self._environment()
        self._process: subprocess.Popen[bytes] | None = None
        self._epmd_process: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._closed = False
        _open_servers.add(self)

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
        below = _descendants(process.pid)  # runuser stands in between
        return below[-1] if below else process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def processes(self) -> list[int]:
        """The process ids of everything the server runs now: the script's process and all
        below it (the node, its helpers), and epmd."""
        found = []
        for process in (self._process, self._epmd_process):
            if process is not None and process.poll() is None:
                found += [process.pid, *_descendants(process.pid)]
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
        while time.monotonic() < deadline:
            if _listening(self.epmd_port):
                return
            try:
                process.wait(timeout=0.01)  # the external process is starting up
            except subprocess.TimeoutExpired:
                continue
            break
        returncode = process.poll()
        self._stop_epmd(signal.SIGKILL)
        raise RuntimeError(
            f"epmd on port {self.epmd_port} did not listen (exit code {returncode}):\n"
            f"{self._read(self._epmd_output)}"
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
        deadline = time.monotonic() + STARTUP_DEADLINE
        self._start_epmd(deadline)
        self._process = process = self._spawn([str(self.script)], self._output)
        while time.monotonic() < deadline:
            if self._accepts_connections():
                self._pid = self._node_pid()
                return
            try:
                process.wait(timeout=0.02)  # the external process is starting up
            except subprocess.TimeoutExpired:
                continue
            break
        returncode = process.poll()
        self.kill()
        raise RuntimeError(
            f"RabbitMQ node {self.nodename} did not accept AMQP connections on port "
            f"{self.port} within {STARTUP_DEADLINE}s (exit code {returncode}); its log:\n"
            f"{self.log()}"
        )

    def _node_pid(self) -> int | None:
        """The node's pid: from its pid file, checked to be below the script; else the first
        ``beam.smp`` found below it."""
        assert self._process is not None
        below = _descendants(self._process.pid)
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
            below = _descendants(process.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(node or process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.kill()
                return
            try:
                _wait_gone(below, f"RabbitMQ node {self.nodename} after its shutdown")
            except RuntimeError:  # a helper outlived the node: orphaned, out of kill()'s reach
                for pid in below:
                    _kill(pid)
                _wait_gone(below, f"RabbitMQ node {self.nodename} after SIGKILL")
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
            below = _descendants(process.pid)
            node = self._pid if self._pid in below else None
            # The node and what it started first: the script's shell, still alive, reaps the
            # node (an orphaned one would wait for init to reap it).
            victims = [node, *_descendants(node)] if node is not None else below
            for pid in victims:
                _kill(pid)
            try:
                process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                for pid in [process.pid, *below]:
                    _kill(pid)
                process.wait(timeout=STOP_DEADLINE)
            _wait_gone(below, f"RabbitMQ node {self.nodename} after SIGKILL")
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

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except OSError:
            return "(none)"

    def log(self) -> str:
        """The node's output and log file, for failure messages."""
        log_file = self.directory / "log" / f"{self.nodename}.log"
        return (
            f"-- {self._output.name}:\n{self._read(self._output)}\n"
            f"-- {log_file.name}:\n{self._read(log_file)}"
        )

    def close(self) -> None:
        """Stop the node and its epmd, and remove its directory."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
            _open_servers.discard(self)
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RabbitMQServer:
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
