"""The one way a test starts a real PostgreSQL server: on a free local port, in a temporary
directory.

:class:`PostgresServer` runs one ``postgres`` process on a cluster of its own, bound to
127.0.0.1 only (its unix socket is in its temporary directory too), set up for speed rather
than durability (``fsync=off``, ``full_page_writes=off``; committed transactions still
survive a crash of the server, not one of the machine), with ``max_connections=200`` and
trust authentication for the superuser ``postgres``. It can be stopped and started again, or
killed (SIGKILL) and started again, on the same data directory and port, for crash and
connection-loss tests; :meth:`PostgresServer.create_database` makes a fresh empty database.
:func:`postgres_bin_dir` finds the server's executables, skipping the test with one line naming
the package to install when they are missing, except under CI (``CI`` set), where the tests
must run and fail instead. The fixtures of tests/conftest.py (``postgres_server``,
``postgres_dsn``, ``own_postgres``) are built on it.

PostgreSQL refuses to run as root, and the tests (and CI) may: then initdb and the server run
as the unprivileged ``postgres`` user (which the Debian package creates), through ``setpriv``
or ``runuser``, and the temporary directory is handed to that user. pytest-postgresql's
``postgresql_proc`` was not used because it runs initdb and pg_ctl as the current user in
pytest's root-owned 0700 temporary directories, so it cannot work under root even through a
user-switching wrapper. The server is started as a child process of the tests (as pg_ctl
would start it, minus the daemonizing), so that a killed server is reaped here: an orphaned
postmaster left a zombie (a container's init may be slow to reap it, or never do) would keep
its lock file looking alive and block the restart.
initdb runs once per test session; every server starts from a copy of that pristine cluster.

Waiting here is for an external process to start or stop (a bounded loop of connection
attempts with a deadline), never for work of the code under test.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
from psycopg import sql

from tests.support.net import server_port
from tests.support.server import (
    NoServerAccount,
    ServerProcess,
    children,
    chown_tree,
    kill,
    server_account,
    wait_gone,
)

__all__ = [
    "INSTALL_HINT",
    "PostgresServer",
    "find_postgres_bin",
    "postgres_bin_dir",
]

#: How long a server may take to accept connections (crash recovery included), or to exit.
STARTUP_DEADLINE = 15.0
STOP_DEADLINE = 10.0
#: How long initdb may take.
INITDB_DEADLINE = 60.0
#: The database superuser of every cluster (trust authentication, local connections only).
SUPERUSER = "postgres"
#: The unprivileged system user the server runs as when the tests run as root.
SYSTEM_USER = "postgres"

INSTALL_HINT = (
    "install it with `sudo apt-get install postgresql` (Debian/Ubuntu) or "
    "`brew install postgresql@15` (macOS); .ci/run installs it in CI"
)

#: Debian's layout: /usr/lib/postgresql/<major version>/bin.
_DEBIAN_ROOT = Path("/usr/lib/postgresql")


def _unavailable(message: str) -> NoReturn:
    """Skip the test with *message*, or fail it under CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: the PostgreSQL tests must run here)")
    pytest.skip(message)


def _is_server_bin_dir(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in ("initdb", "postgres"))


def find_postgres_bin() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None: that of ``initdb`` on PATH
    (symlinks followed: Debian puts only wrappers or links there), else the highest version
    of /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        for directory in (Path(on_path).resolve().parent, Path(on_path).parent):
            if _is_server_bin_dir(directory):
                return directory
    candidates = [initdb.parent for initdb in _DEBIAN_ROOT.glob("*/bin/initdb")]

    def version(directory: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", directory.parent.name))

    for directory in sorted(candidates, key=version, reverse=True):
        if _is_server_bin_dir(directory):
            return directory
    return None


def postgres_bin_dir() -> Path:
    """The PostgreSQL executables' directory: skips the test without one, fails it under CI."""
    directory = find_postgres_bin()
    if directory is None:
        _unavailable(f"PostgreSQL (initdb, postgres) not installed: {INSTALL_HINT}")
    return directory


def _server_account() -> tuple[list[str], int, int]:
    """The command prefix that runs a command as the server's user, and that user's ids: the
    current user, or the unprivileged ``postgres`` user when running as root."""
    try:
        return server_account(SYSTEM_USER)
    except NoServerAccount as exc:
        if exc.user_missing:
            _unavailable(
                f"the tests run as root, and PostgreSQL must run as the unprivileged user "
                f"{SYSTEM_USER!r}, which does not exist: {INSTALL_HINT}"
            )
        _unavailable(f"the tests run as root, and {exc}")


def _make_owned_tempdir(prefix: str, uid: int, gid: int) -> Path:
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    chown_tree(directory, uid, gid)
    return directory


# -- one initdb per session -------------------------------------------------------------------

_pristine_lock = threading.Lock()
_pristine: dict[Path, Path] = {}


def _pristine_cluster(bin_dir: Path, prefix: list[str], uid: int, gid: int) -> Path:
    """A data directory fresh from initdb, made once per process for *bin_dir* and removed at
    exit: servers copy it (a tenth of initdb's time)."""
    with _pristine_lock:
        if bin_dir in _pristine:
            return _pristine[bin_dir]
        home = _make_owned_tempdir("eventbus-postgres-initdb-", uid, gid)
        atexit.register(shutil.rmtree, home, ignore_errors=True)
        data = home / "data"
        command = [
            *prefix,
            str(bin_dir / "initdb"),
            "--pgdata",
            str(data),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
            "--no-sync",
        ]
        result = subprocess.run(
            command,
            cwd=home,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=INITDB_DEADLINE,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed (exit code {result.returncode}):\n{result.stdout}{result.stderr}"
            )
        _pristine[bin_dir] = data
        return data


class PostgresServer(ServerProcess):
    """One PostgreSQL server on its own cluster and a fixed local port; a context manager.

    ``start()`` launches it and returns once it accepts connections; ``stop()`` shuts it down
    cleanly (a fast shutdown, then SIGKILL after a timeout); ``kill()`` crashes it. Each may be
    followed by ``start()`` again: the restarted server uses the same data directory (crash
    recovery included) and port. ``close()`` (or leaving the ``with`` block) stops it and
    removes its directory.
    """

    def __init__(self, bin_dir: Path | None = None, port: int | None = None) -> None:
        self.bin_dir = bin_dir or postgres_bin_dir()
        self._prefix, self._uid, self._gid = _server_account()
        self.port = port if port is not None else server_port()
        self.user = SUPERUSER
        self.directory = _make_owned_tempdir("eventbus-postgres-", self._uid, self._gid)
        self.data_dir = self.directory / "data"
        self._log = self.directory / "postgres.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._closed = False

    # -- addresses ----------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        """The connection string of database *dbname* as the superuser, over TCP."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while the server runs, else None."""
        return self._pid if self.running else None

    # -- databases ----------------------------------------------------------------------------

    def create_database(self) -> str:
        """Create a fresh, empty, uniquely named database; return its connection string."""
        name = f"test_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
            )
        return self.dsn(name)

    # -- life cycle ---------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Copy the pristine cluster into the data directory and configure it (first start)."""
        pristine = _pristine_cluster(self.bin_dir, self._prefix, self._uid, self._gid)
        shutil.copytree(pristine, self.data_dir, symlinks=True)
        socket_dir = str(self.directory).replace("'", "''")
        settings = f"""
# eventbus tests (tests/support/postgres.py)
listen_addresses = '127.0.0.1'
port = {self.port}
unix_socket_directories = '{socket_dir}'
max_connections = 200
fsync = off
full_page_writes = off
logging_collector = off
"""
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(settings)
        chown_tree(self.data_dir, self._uid, self._gid)

    def _accepts_connections(self) -> bool:
        try:
            with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def start(self) -> None:
        """Start the server and wait until it accepts connections; raise if it does not."""
        if self._closed:
            raise RuntimeError("the server was closed")
        if self.running:
            return
        if not self.data_dir.exists():
            self._prepare()
        command = [*self._prefix, str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_started(
            self._accepts_connections,
            STARTUP_DEADLINE,
            0.02,
            failed=f"PostgreSQL on port {self.port} did not accept connections",
            end=self.kill,
        )
        self._pid = self._postmaster_pid()

    def _postmaster_pid(self) -> int:
        """The postmaster's pid: the child itself, unless runuser stands in between."""
        assert self._process is not None
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first_line)
        except (OSError, ValueError):
            return self._process.pid

    def stop(self) -> None:
        """Shut the server down cleanly (SIGINT: a fast shutdown, which rolls back open
        transactions and checkpoints), or kill it if it has not exited in time. Idempotent."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            os.kill(self._pid or process.pid, signal.SIGINT)
            try:
                process.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._reap()

    def kill(self) -> None:
        """Crash the server: SIGKILL to the postmaster and to each of its processes, as a crash
        of its host would end them, then wait until they are gone (so that ``start()`` can run
        crash recovery at once). Whatever was committed survives; nothing else does.
        A no-op when it is not running."""
        process = self._process
        if process is None:
            return
        postmaster = self._pid or process.pid
        if process.poll() is None:
            processes = [postmaster, *children(postmaster)]
            for pid in processes:
                kill(pid)
            if postmaster != process.pid:
                kill(process.pid)
            process.wait(timeout=STOP_DEADLINE)
            wait_gone(processes, STOP_DEADLINE, f"PostgreSQL on port {self.port} after SIGKILL")
        self._reap()

    def _reap(self) -> None:
        if self._process is not None:
            self._process.wait(timeout=STOP_DEADLINE)
        self._process = None
        self._pid = None

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self._close_once(self.directory)
