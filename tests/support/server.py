"""What the starters of real servers share: :class:`~tests.support.postgres.PostgresServer`,
:class:`~tests.support.rabbitmq.RabbitMQServer`, :class:`~tests.support.redis.RedisServer`, and
the benchmark's ``redis-server`` (bench/redis_streams.py).

A server runs as a child process writing a log file: :func:`wait_until_ready` waits for it to
answer, :func:`stop_process` ends it (a signal, then SIGKILL after a timeout), :func:`read_log`
reads its log for failure messages, and :class:`ServerProcess` is the base of the test starters
(``running``, ``log()``, the context manager, and closing at exit those that ask for it).

A server that must not run as root (or had better not) runs as an unprivileged system user
when the tests run as root: :func:`server_account` gives the command prefix that switches to
it (``setpriv``, or ``runuser``) and :func:`chown_tree` hands its directory over. The tree of
processes a server starts is followed through ``/proc`` (``pgrep`` elsewhere):
:func:`children`, :func:`descendants`, :func:`gone`, :func:`kill` and :func:`wait_gone`.

Nothing here imports pytest, so the benchmarks can use it. Waiting here is for an external
process to start or stop (a bounded loop with a deadline), never for work of the code under test.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "NoServerAccount",
    "ServerProcess",
    "children",
    "chown_tree",
    "descendants",
    "gone",
    "kill",
    "read_log",
    "server_account",
    "stop_process",
    "wait_gone",
    "wait_until_ready",
]


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


# -- the server's user ------------------------------------------------------------------------


class NoServerAccount(Exception):
    """The tests run as root and the server cannot run as its unprivileged user: the user does
    not exist (``user_missing``), or neither ``setpriv`` nor ``runuser`` does."""

    def __init__(self, message: str, *, user_missing: bool) -> None:
        super().__init__(message)
        self.user_missing = user_missing


def server_account(user: str) -> tuple[list[str], int, int]:
    """The command prefix that runs a command as a server's user, and that user's ids: the
    current user, or the unprivileged system *user* when running as root (through ``setpriv``,
    else ``runuser``); raise :class:`NoServerAccount` when that is not possible."""
    if os.geteuid() != 0:
        return [], os.geteuid(), os.getegid()
    import pwd  # Unix only, as is running as root

    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise NoServerAccount(f"no user {user!r}", user_missing=True) from None
    uid, gid = account.pw_uid, account.pw_gid
    if shutil.which("setpriv"):
        # setpriv execs the command: the server is then the tests' own child process.
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--"], uid, gid
    if shutil.which("runuser"):
        return ["runuser", "-u", user, "--"], uid, gid
    raise NoServerAccount("neither setpriv nor runuser (util-linux) exists", user_missing=False)


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Hand *root* and everything under it to *uid*:*gid* (a no-op unless they differ)."""
    if os.geteuid() == uid:
        return
    os.chown(root, uid, gid)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(parent, name), uid, gid, follow_symlinks=False)


# -- process trees ----------------------------------------------------------------------------


def gone(pid: int) -> bool:
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


def children(pid: int) -> list[int]:
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


def descendants(pid: int) -> list[int]:
    """Every process below *pid*, parents before their children."""
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children(pending.pop(0)):
            if child not in found:
                found.append(child)
                pending.append(child)
    return found


def kill(pid: int) -> None:
    """SIGKILL process *pid*, unless it is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def wait_gone(pids: list[int], timeout: float, what: str) -> None:
    """Wait until every process of *pids* has exited; after *timeout* seconds, raise a
    RuntimeError naming *what* and the processes still running."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not all(gone(pid) for pid in pids):
        if time.monotonic() > deadline:
            alive = [pid for pid in pids if not gone(pid)]
            raise RuntimeError(f"{what}: processes {alive} still running")
        pause.wait(0.01)  # the kernel is tearing the processes down


# -- the starters' base -----------------------------------------------------------------------

#: The servers to close when the interpreter exits (the tests were interrupted), should their
#: owners not have closed them: those that asked for it (``_close_at_exit``) and are still open.
_open_servers: set[ServerProcess] = set()


@atexit.register
def _close_open_servers() -> None:
    for server in list(_open_servers):
        server.close()


class ServerProcess(abc.ABC):
    """A server the tests run as a child process, writing a log file; a context manager:
    entering starts it (and closes it again if it does not start), leaving closes it.

    A subclass sets ``_process`` (the child, None while the server is stopped) and ``_log``
    (the log file's path), and defines ``start()``, ``stop()`` and ``close()``; its ``start()``
    launches the child and calls ``_wait_started()``. A server with a directory of its own may
    close with ``_close_once()``; one that calls ``_close_at_exit()`` is closed when the
    interpreter exits, unless ``_close_once()`` closed it before.
    """

    _process: subprocess.Popen[bytes] | None
    _log: Path
    #: Set by ``_close_once()``.
    _closed = False

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
        since: float | None = None,
    ) -> None:
        """Return once the just started ``_process`` is *ready* (see :func:`wait_until_ready`)
        within *timeout* seconds of *since* (a ``time.monotonic()`` reading; default: now);
        if it is not, *end* it and raise a RuntimeError: *failed* within *timeout*, the exit
        code, and the log."""
        assert self._process is not None
        left = timeout if since is None else since + timeout - time.monotonic()
        if wait_until_ready(self._process, ready, left, pause):
            return
        returncode = self._process.poll()
        end()
        raise RuntimeError(
            f"{failed} within {timeout}s (exit code {returncode}); its log:\n{self.log()}"
        )

    def _close_once(self, directory: Path) -> None:
        """``close()`` for a server with a *directory* of its own: unless it was closed
        already, ``stop()`` it, then (even if stopping failed) mark it closed, take it off the
        servers to close at exit, and remove *directory*."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
            self._close_at_exit(False)
            shutil.rmtree(directory, ignore_errors=True)

    def _close_at_exit(self, wanted: bool = True) -> None:
        """Have the server closed when the interpreter exits (*wanted*), or no longer."""
        if wanted:
            _open_servers.add(self)
        else:
            _open_servers.discard(self)

    @abc.abstractmethod
    def start(self) -> None:
        """Start the server and wait until it answers; raise if it does not."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop the server (it may be started again); a no-op when it is not running."""

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
