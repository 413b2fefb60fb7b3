"""Processes for tests/test_postgres_processes.py: buses on one PostgresStore, in the roles the
test gives them, recording what their handlers did in the application's own tables.

Every bus here subscribes the same two handlers, ``first`` and ``second``, to ``order:placed``
(:func:`make_bus`). Each run of a handler is recorded in the table ``runs`` (:data:`TABLES`)
through a connection of the worker thread's own, in autocommit mode: a row with the event id,
the handler, the process id and the server's ``clock_timestamp()`` is committed when the run
starts, and its ``ended`` column when it finishes, so a run cut short by a SIGKILL is a row
without an end, and runs of different processes compare on one clock. ``orders`` is the
application's business table, written in the same transactions as the events.

Roles (the first argument), each printing its progress lines on stdout (flushed):

* ``rollback --dsn D --events N``: emits N events ``within=`` transactions that are all rolled
  back (an exception in ``conn.transaction()``, ``conn.rollback()``, and a failed statement
  after the emit), printing ``rolled-back <id>`` for each, then emits one ``sentinel`` event
  with its order, closes its bus (so that it claims nothing), commits and prints
  ``sentinel <id>``: a consumer elsewhere runs the sentinel.
* ``trials --dsn D``: a process that has done its imports and forks one process per
  ``trial <label>`` line on stdin (so a trial costs no interpreter start): that process
  opens a bus, emits one event ``within=`` a transaction holding the order ``<label>``,
  prints ``committing <id>``, commits and SIGKILLs itself on the next line, before its bus
  could dispatch. Once it is reaped, the parent prints ``killed <pid> <signal>``.
* ``consume --dsn D --workers W``: ``recover()``, then prints ``pid <pid>``, ``recovered <k>``,
  ``ready``, and ``ran <k>`` every ``--progress`` finished runs. On stdin: ``drain`` (prints
  ``drained`` once ``bus.drain()`` returned), ``stop`` (closes; ``ran-total <k>``, ``done``).
  Every connection it opens is named ``application_name`` :func:`application_name` (pid), so
  the parent can see in ``pg_stat_activity`` when the server has finished its work. With
  ``--hold``, a run records its start and never ends (its delivery stays ``running``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import psycopg

from eventbus import Event, EventBus
from eventbus.stores import PostgresStore
from tests.support.children import log_to_stderr, out

EVENT = "order:placed"
HANDLERS = ("first", "second")
TABLES = """
CREATE TABLE IF NOT EXISTS runs (
    id bigserial PRIMARY KEY,
    event_id text NOT NULL,
    handler text NOT NULL,
    pid integer NOT NULL,
    started timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended timestamptz
);
CREATE TABLE IF NOT EXISTS orders (
    id bigserial PRIMARY KEY,
    label text NOT NULL UNIQUE
)
"""


def application_name(pid: int) -> str:
    """The ``application_name`` of every connection of the consumer process *pid*."""
    return f"eventbus-consumer-{pid}"


def create_tables(dsn: str) -> None:
    """The application's tables (``runs``, ``orders``) in the database of *dsn*."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in TABLES.split(";"):
            conn.execute(statement)


class Runs:
    """Records each handler run in ``runs``: start and end, each committed on its own, through
    one autocommit connection per worker thread. Thread-safe. *on_run* is called with the
    number of runs this process finished so far, after each."""

    def __init__(
        self, dsn: str, on_run: Callable[[int], None] | None = None, *, hold: bool = False
    ) -> None:
        self._dsn = dsn
        self._on_run = on_run
        self._hold = hold
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[psycopg.Connection[Any]] = []
        self.finished = 0

    def _connection(self) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = psycopg.connect(self._dsn, autocommit=True)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def run(self, event: Event, handler: str) -> None:
        conn = self._connection()
        row = conn.execute(
            "INSERT INTO runs (event_id, handler, pid) VALUES (%s, %s, %s) RETURNING id",
            (event.id, handler, os.getpid()),
        ).fetchone()
        assert row is not None
        if self._hold:
            threading.Event().wait()  # until the process is killed
        conn.execute("UPDATE runs SET ended = clock_timestamp() WHERE id = %s", (row[0],))
        with self._lock:
            self.finished += 1
            finished = self.finished
        if self._on_run is not None:
            self._on_run(finished)

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()


def make_bus(dsn: str, runs: Runs, *, workers: int = 2) -> EventBus:
    """A bus on ``PostgresStore(dsn)`` with the two recording handlers subscribed."""
    bus = EventBus(store=PostgresStore(dsn), max_workers=workers)
    for handler in HANDLERS:
        bus.subscribe(EVENT, lambda event, handler=handler: runs.run(event, handler), name=handler)
    return bus


class _Rollback(Exception):
    """Raised inside a transaction to roll it back."""


def rollback(dsn: str, events: int) -> None:
    """Emit *events* events in transactions that roll back, then one committed sentinel."""
    bus = make_bus(dsn, Runs(dsn))
    emitted = 0

    def emit(conn: psycopg.Connection[Any], n: int) -> None:
        nonlocal emitted
        conn.execute("INSERT INTO orders (label) VALUES (%s)", (f"rolled-back-{n}",))
        event = bus.emit(EVENT, {"n": n}, within=conn)
        out(f"rolled-back {event.id}")
        emitted += 1

    with (
        psycopg.connect(dsn, autocommit=True) as blocks,
        psycopg.connect(dsn) as plain,  # not autocommit: a transaction starts implicitly
    ):
        n = 0
        while emitted < events:
            style = n % 3
            if style == 0:  # two events, and an exception leaves the transaction block
                try:
                    with blocks.transaction():
                        emit(blocks, n)
                        if emitted < events:
                            emit(blocks, n + 1)
                        raise _Rollback
                except _Rollback:
                    pass
                n += 2
                continue
            if style == 1:  # an explicit rollback
                emit(plain, n)
                plain.rollback()
            else:  # a statement fails after the emit: the transaction is aborted
                emit(plain, n)
                with contextlib.suppress(psycopg.errors.DivisionByZero):
                    plain.execute("SELECT 1 / 0")
                plain.rollback()
            n += 1
        with blocks.transaction():
            blocks.execute("INSERT INTO orders (label) VALUES ('sentinel')")
            sentinel = bus.emit(EVENT, {"n": -1}, within=blocks)
            bus.close()  # before the commit: this bus cannot claim the sentinel
    out(f"sentinel {sentinel.id}")


def kill_after_commit(dsn: str, trial: str) -> None:
    """One event committed with its order, then SIGKILL before the bus can dispatch it."""
    bus = make_bus(dsn, Runs(dsn))
    conn = psycopg.connect(dsn)  # not autocommit: the transaction starts with the insert
    conn.execute("INSERT INTO orders (label) VALUES (%s)", (trial,))
    event = bus.emit(EVENT, {"trial": trial}, within=conn)
    out(f"committing {event.id}")
    conn.commit()
    os.kill(os.getpid(), signal.SIGKILL)


def trials(dsn: str) -> None:
    """Fork one process per ``trial <label>`` line; report how each ended once reaped. This
    process starts no thread and opens no connection, so forking it is safe."""
    out("ready")
    for line in sys.stdin:
        command, _, label = line.strip().partition(" ")
        if command != "trial":
            break
        pid = os.fork()
        if pid == 0:  # the trial's own process: it never returns here
            try:
                kill_after_commit(dsn, label)
            except BaseException:  # noqa: BLE001 - reported on stderr, for the parent
                traceback.print_exc()
                sys.stderr.flush()
            finally:
                os._exit(70)  # only if it failed before the kill
        _, status = os.waitpid(pid, 0)
        out(f"killed {pid} {os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1}")
    out("done")


def consume(dsn: str, workers: int, progress: int, *, hold: bool = False) -> None:
    """Run both handlers on *workers* threads until told to stop."""
    dsn = psycopg.conninfo.make_conninfo(dsn, application_name=application_name(os.getpid()))

    def report(finished: int) -> None:
        if finished % progress == 0:
            out(f"ran {finished}")

    runs = Runs(dsn, on_run=report, hold=hold)
    bus = make_bus(dsn, runs, workers=workers)
    out(f"pid {os.getpid()}")
    out(f"recovered {bus.recover()}")
    out("ready")
    for line in sys.stdin:
        command = line.strip()
        if command == "drain":
            bus.drain()
            out("drained")
        elif command == "stop":
            break
    bus.close()
    runs.close()
    out(f"ran-total {runs.finished}")
    out("done")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("role", choices=["rollback", "trials", "consume"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--events", type=int, default=200, help="rollback: rolled-back events")
    parser.add_argument("--workers", type=int, default=8, help="consume: worker threads")
    parser.add_argument("--progress", type=int, default=100, help="consume: 'ran' line every")
    parser.add_argument("--hold", action="store_true", help="consume: runs never end")
    args = parser.parse_args()
    log_to_stderr()
    if args.role == "rollback":
        rollback(args.dsn, args.events)
    elif args.role == "trials":
        trials(args.dsn)
    else:
        consume(args.dsn, args.workers, args.progress, hold=args.hold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
