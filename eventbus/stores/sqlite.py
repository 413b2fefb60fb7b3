"""SQLiteStore: every delivery's state in an SQLite file, so nothing is lost across crashes.

Thread-safe: one connection per store, used under a lock; other processes sharing the file are
serialised by SQLite itself (WAL, ``busy_timeout``, ``BEGIN IMMEDIATE`` for every write).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast

from eventbus._envelope import Envelope, to_envelope
from eventbus._event import DeadLetter, Delivery, Event
from eventbus.codec import JsonCodec
from eventbus.stores._group_commit import GroupCommit, Write
from eventbus.stores._model import Claim, new_owner, owner_is_dead
from eventbus.stores._rows import (
    RowReader,
    print_error,
    shown,
)
from eventbus.typing import Reporter

__all__ = ["SQLiteStore"]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    payload_type TEXT,
    payload TEXT NOT NULL,
    metadata TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    key TEXT UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    event_id TEXT NOT NULL,
    handler TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    due_at REAL,
    owner TEXT,
    PRIMARY KEY (event_id, handler)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY,
    event_id TEXT NOT NULL,
    handler TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT NOT NULL,
    reason TEXT NOT NULL,
    traceback TEXT,
    failed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS owners (
    owner TEXT PRIMARY KEY,
    heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    event_id TEXT NOT NULL,
    handler TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    error TEXT NOT NULL,
    failed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_delivery ON attempts (event_id, handler);
"""

#: The layout of the tables above, kept in ``PRAGMA user_version``. Version 2 added
#: ``attempts`` (every failed attempt, for the dashboard); opening a version 1 file with
#: ``create=True`` adds it, and one opened with ``create=False`` is used without it.
SCHEMA_VERSION = 2
#: The tables of an eventbus store present in every schema version.
_TABLES = frozenset({"events", "deliveries", "dead_letters", "owners"})

_OPEN_STATES = "('pending', 'running', 'retrying')"
#: Gives deliveries up: unowned, and an interrupted attempt is pending again.
_RELEASE = (
    "UPDATE deliveries SET owner = NULL, "
    "state = CASE state WHEN 'running' THEN 'pending' ELSE state END"
)
_EVENT_COLUMNS = "e.id, e.name, e.payload_type, e.payload, e.metadata, e.occurred_at"
_DEAD_LETTER_QUERY = (
    "SELECT x.id, x.handler, x.attempts, x.error, x.reason, x.traceback, x.failed_at, "
    f"{_EVENT_COLUMNS} FROM dead_letters x JOIN events e ON e.id = x.event_id"
)

#: How long the background thread lets a deferred write wait for a ride (seconds).
_LINGER = 0.002

#: How often the background thread looks whether an add_within() transaction ended (seconds).
_WATCH_EVERY = 0.002
#: How long an add_within() event is looked for before the regular poll takes over (seconds).
_WATCH_FOR = 30.0

#: How often old succeeded events are pruned, in emits.
_PRUNE_EVERY = 1000


class SQLiteStore(RowReader):
    """Deliveries, dead letters and idempotency keys in an SQLite database file.

    Options:

    * ``synchronous``: ``"NORMAL"`` (default) survives a crash of the process at any moment,
      since every commit reaches the write-ahead log before ``emit()`` returns; a power loss or
      OS crash may lose the last transactions. ``"FULL"`` also survives those, at the cost of an
      fsync per commit (several times slower on most disks).
    * ``busy_timeout``: seconds a write waits for another process's write lock. Writes that
      still find the database locked are retried until ``busy_timeout`` has passed three
      times over, then raise ``sqlite3.OperationalError``.
    * ``lease``: seconds without a heartbeat after which another process may take over a
      bus's unfinished deliveries. An owner on this host whose process is gone is taken over
      at once. The heartbeat runs every ``lease / 3`` seconds.
    * ``poll_interval``: how often a recovered bus looks for deliveries to take over (replays
      made from the command line, work of a crashed process).
    * ``retention`` / ``retention_seconds``: finished events (no unfinished delivery, no dead
      letter: replayed or purged ones count as finished) are pruned once more than
      ``retention`` events are stored or they are older than ``retention_seconds``. Pruning
      runs every 1,000 emits, so up to 1,000 more may be kept meanwhile. Idempotency keys
      live as long as their event.
    * ``codec``: how payloads become JSON (:class:`eventbus.codec.JsonCodec` by default).
    * ``create``: ``True`` (default) creates the file and its tables when missing, also
      beside the application's own tables in a database it already uses (so that
      ``emit(..., within=conn)`` can write in the application's transactions). ``False``
      opens an existing store only and never writes the schema: a missing path raises
      ``FileNotFoundError``, a file without the eventbus tables (an empty file, another
      application's database) ``ValueError``. This is how the command line opens stores.

    The file and its ``-wal``/``-shm`` companions are created readable by the owner only.
    Either way, a database written by a newer schema version raises ``RuntimeError``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout: float = 5.0,
        lease: float = 30.0,
        poll_interval: float = 1.0,
        retention: int = 100_000,
        retention_seconds: float = 7 * 24 * 3600,
        codec: JsonCodec | None = None,
        create: bool = True,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        for what, value in (("busy_timeout", busy_timeout), ("lease", lease)):
            if value <= 0:
                raise ValueError(f"{what} must be > 0, got {value!r}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be > 0, got {poll_interval!r}")
        if not create and str(path) == ":memory:":
            raise ValueError("create=False needs a store file; ':memory:' is always a new database")
        self.path = Path(path)
        self._create = create
        self.codec = codec if codec is not None else JsonCodec()
        self.poll_interval = poll_interval
        self._synchronous = synchronous
        self._busy_timeout = busy_timeout
        self._lease = lease
        self._retention = retention
        self._retention_seconds = retention_seconds
        self._lock = threading.Lock()
        self._writes: GroupCommit[sqlite3.Connection] = GroupCommit(self._run_batch)
        self._owner: str | None = None
        self._emits = 0
        self._claimed_version = -1
        self._next_full_claim = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()  # set when a deferred write is queued
        self._background: threading.Thread | None = None
        self._reporter: Reporter | None = None
        # Events written with add_within() not yet seen committed: id -> when to give up.
        self._watch_lock = threading.Lock()
        self._watched: dict[str, float] = {}
        self._watched_version = -1
        #: Called with errors of background work (a deferred commit, a heartbeat). The bus
        #: sets it to log ``eventbus.internal_error``.
        self.on_error: Callable[[BaseException], None] = print_error
        self._reporting: Callable[[BaseException], None] | None = None
        self._before_reporting: Callable[[BaseException], None] = print_error
        #: Whether the file has the ``attempts`` table (schema version 2), set on connecting.
        self._history = False
        self._db: sqlite3.Connection | None = self._connect()

    # -- connection ----------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        target: str | Path = self.path
        if self._create:
            if str(self.path) != ":memory:" and not self.path.exists():
                # Created owner-only here; SQLite gives -wal and -shm the database file's mode.
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        elif not self.path.exists():
            raise FileNotFoundError(errno.ENOENT, "no eventbus store here", str(self.path))
        elif self.path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "a directory, not a store", str(self.path))
        else:
            target = f"{self.path.absolute().as_uri()}?mode=rw"  # never creates the file
        db = sqlite3.connect(
            target,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
            uri=not self._create,
        )
        try:
            db.execute(f"PRAGMA busy_timeout={int(self._busy_timeout * 1000)}")
            # Checked before anything is written: journal_mode=WAL writes to the file.
            _check_is_ours(db, self.path, complete=not self._create)
            _check_version(db, self.path)
            self._enter_wal(db)
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            if self._create:
                with self._write(db):
                    _create_schema(db, self.path)
            self._history = _has_table(db, "attempts")
        except BaseException:
            db.close()
            raise
        return db

    def _enter_wal(self, db: sqlite3.Connection) -> None:
        # Switching a file to WAL needs an exclusive lock, and SQLite answers "database is
        # locked" at once, without its busy handler, when another process is opening the same
        # new file at that moment: retry within busy_timeout instead of failing the open.
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)  # another process holds the lock for a moment
            else:
                return

    @contextmanager
    def _write(self, db: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """A write transaction: ``BEGIN IMMEDIATE`` takes the write lock up front, so a
        transaction never fails half-way on a lock; "database is locked" is retried."""
        conn = db if db is not None else self._read()
        deadline = time.monotonic() + 3 * self._busy_timeout
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- lifecycle -----------------------------------------------------------------------

    def _report_to(self, reporter: Reporter) -> None:
        # The reporter replaces the default (printing to stderr); a hook the application set
        # itself still runs after it.
        previous = self.on_error
        if previous is self._reporting:  # opened again: report to the new bus only
            previous = self._before_reporting

        def report(exc: BaseException) -> None:
            reporter.internal_error("store", exc)
            if previous is not print_error:
                previous(exc)

        self._before_reporting, self._reporting = previous, report
        self.on_error = report

    def open(self, reporter: Reporter | None = None) -> str:
        """Start a session for one bus: register an owner and start its heartbeat. Returns
        the owner id. Errors of the background work (heartbeat, deferred commits) go to
        *reporter* when given, else to ``on_error``. Raises ``RuntimeError`` if the store is
        already open."""
        if reporter is not None:
            self._report_to(reporter)
        self._reporter = reporter
        with self._lock:
            if self._owner is not None:
                raise RuntimeError("this store is already used by an open bus")
            if self._db is None:
                self._db = self._connect()
            self._owner = owner = new_owner()
            with self._write() as db:
                db.execute("INSERT OR REPLACE INTO owners VALUES (?, ?)", (owner, time.time()))
        self._stop.clear()
        self._background = threading.Thread(
            target=self._work_in_background, name="eventbus-store", daemon=True
        )
        self._background.start()
        return owner

    def _work_in_background(self) -> None:
        """Commit deferred writes promptly, and renew this owner's heartbeat.

        Waits on events, not sleep: close() ends every wait at once."""
        interval = self._lease / 3
        next_beat = time.monotonic() + interval
        while not self._stop.is_set():
            wait = max(0.0, next_beat - time.monotonic())
            if self._watched:
                wait = min(wait, _WATCH_EVERY)
            if self._wake.wait(wait):
                self._wake.clear()
                # Linger a moment: a worker's next commit usually carries the deferred write
                # in its own transaction, which is cheaper than one more commit here.
                self._stop.wait(_LINGER)
                self._guard(self.flush)
            if self._watched:
                self._check_watched()
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + interval
                self._guard(self._beat)

    def _check_watched(self) -> None:
        """Tell the bus when another connection committed while events written with
        add_within() are not yet visible here. SQLite has no commit hook, so the background
        thread reads ``PRAGMA data_version`` (a counter in shared memory: no I/O) every couple
        of milliseconds while there are such events, for up to ``_WATCH_FOR`` seconds each (a
        rolled-back event never shows; the regular poll finds anything committed later)."""
        now = time.monotonic()
        with self._lock:
            db = self._read()
            version = db.execute("PRAGMA data_version").fetchone()[0]
            changed = version != self._watched_version
            self._watched_version = version
            with self._watch_lock:
                ids = list(self._watched)
            visible: set[str] = set()
            if changed:
                marks = ", ".join("?" * len(ids))
                visible = {
                    event_id
                    for (event_id,) in db.execute(
                        f"SELECT id FROM events WHERE id IN ({marks})", ids
                    )
                }
        with self._watch_lock:
            for event_id in ids:
                if event_id in visible or self._watched[event_id] < now:
                    del self._watched[event_id]
        if visible and self._reporter is not None:
            wake = getattr(self._reporter, "work_available", None)
            if wake is not None:
                wake()

    def _guard(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - reported; the next round tries again
            self.on_error(exc)

    def flush(self) -> None:
        """Commit deferred writes (successes) now; return once they are committed."""
        self._writes.flush()

    def _beat(self) -> None:
        with self._lock:
            if self._owner is not None:
                with self._write() as db:
                    # INSERT OR REPLACE, not UPDATE: if a pause longer than the lease let
                    # another process declare this owner dead and delete its row, the owner
                    # comes back (what was taken over meanwhile runs there too: at least once).
                    db.execute(
                        "INSERT OR REPLACE INTO owners VALUES (?, ?)", (self._owner, time.time())
                    )

    def close(self) -> None:
        """End the session: unfinished deliveries of this owner become anyone's (they stay in
        the file, pending or waiting for their retry), and the connection is closed.
        Idempotent; the store can be opened again."""
        self._stop.set()
        self._wake.set()
        if self._background is not None:
            self._background.join()
            self._background = None
        self._writes.flush()  # deferred successes: committed before the session ends
        with self._lock:
            owner, self._owner = self._owner, None
            if owner is not None:
                with self._write() as db:
                    db.execute(f"{_RELEASE} WHERE owner = ? AND state IN {_OPEN_STATES}", (owner,))
                    db.execute("DELETE FROM owners WHERE owner = ?", (owner,))
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- the bus's writes ----------------------------------------------------------------

    def add(
        self,
        event: Event,
        handlers: Collection[str],
        key: str | None = None,
        *,
        due_at: float | None = None,
    ) -> Event | None:
        """Commit *event* and one pending delivery per handler, owned by the open bus (with
        *due_at*, a wall-clock time: waiting to start then, as a retry waits).

        Returns ``None``, or the event first stored under *key* (then nothing is written;
        fields of that event that cannot be decoded any more are given as for a quarantined
        row). Raises ``TypeError`` for a payload the codec cannot encode, before writing
        anything.
        """
        row = (*to_envelope(self.codec, event), key, time.time())

        def write(db: sqlite3.Connection) -> Event | None:
            if key is not None:
                found = db.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM events e WHERE e.key = ?", (key,)
                ).fetchone()
                if found is not None:
                    return self._event_or_undecoded(found)
            owner = self._require_owner()
            db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
            state = "pending" if due_at is None else "retrying"
            db.executemany(
                "INSERT INTO deliveries (event_id, handler, state, due_at, owner) "
                "VALUES (?, ?, ?, ?, ?)",
                [(event.id, handler, state, due_at, owner) for handler in handlers],
            )
            self._emits += 1
            return None

        return cast(Event | None, self._writes.commit(write, several_statements=True))

    def add_within(
        self,
        connection: object,
        event: Event,
        handlers: Collection[str],
        key: str | None = None,
        *,
        due_at: float | None = None,
    ) -> Event | None:
        """Write *event* and its deliveries through the application's own *connection* to
        this store's file, in its transaction: they exist if and only if that transaction
        commits. The deliveries belong to no bus until one claims them; the open bus is told
        within a few milliseconds of the commit.

        Raises ``TypeError`` for anything but an ``sqlite3.Connection`` (or an unencodable
        payload), ``ValueError`` for a closed connection, one to another database file, or one
        in autocommit mode outside a transaction; nothing is written then. Returns as
        :meth:`add` does. Call it on the connection's own thread."""
        conn = self._check_within(connection)
        row = (*to_envelope(self.codec, event), key, time.time())  # raises before any write
        if key is not None:
            found = conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events e WHERE e.key = ?", (key,)
            ).fetchone()
            if found is not None:
                return self._event_or_undecoded(found)
        state = "pending" if due_at is None else "retrying"
        conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
        try:
            conn.executemany(
                "INSERT INTO deliveries (event_id, handler, state, due_at, owner) "
                "VALUES (?, ?, ?, ?, NULL)",
                [(event.id, handler, state, due_at) for handler in handlers],
            )
        except BaseException:
            # No savepoint (outside a transaction one would commit on release): undo by hand.
            conn.execute("DELETE FROM deliveries WHERE event_id = ?", (event.id,))
            conn.execute("DELETE FROM events WHERE id = ?", (event.id,))
            raise
        with self._watch_lock:
            self._watched[event.id] = time.monotonic() + _WATCH_FOR
        self._wake.set()
        return None

    def _check_within(self, connection: object) -> sqlite3.Connection:
        if not isinstance(connection, sqlite3.Connection):
            raise TypeError(
                "within= takes the sqlite3.Connection whose transaction the event joins "
                f"(SQLiteStore), got {type(connection).__module__}."
                f"{type(connection).__qualname__}"
            )
        try:
            files = connection.execute("PRAGMA database_list").fetchall()
        except sqlite3.ProgrammingError as exc:
            raise ValueError(f"within= got a connection that cannot be used: {exc}") from None
        main = next((file for _, name, file in files if name == "main"), "")
        if not main or str(self.path) == ":memory:" or not _same_file(main, self.path):
            raise ValueError(
                f"within= got a connection to {main or 'an in-memory database'!s}, "
                f"but this store is {self.path}"
            )
        autocommit = getattr(connection, "autocommit", None) is True  # Python 3.12+
        if (autocommit or connection.isolation_level is None) and not connection.in_transaction:
            raise ValueError(
                "within= needs a transaction: the connection is in autocommit mode; "
                "execute BEGIN first"
            )
        return connection

    def started(self, event_id: str, handler: str, attempts: int) -> None:
        """Commit that attempt number *attempts* is starting (before the handler runs, so a
        crash inside it still counts)."""
        self._update(
            "UPDATE deliveries SET state = 'running', attempts = ? WHERE event_id = ? "
            "AND handler = ?",
            (attempts, event_id, handler),
        )

    def succeeded(self, event_id: str, handler: str) -> None:
        """Record a success without waiting for its commit: it rides with the next
        transaction of any thread (a worker's next ``started``, an ``emit``), or is committed
        by the background thread within a couple of milliseconds. Writes commit in order, so
        a worker's next attempt never starts before its previous success is committed: a
        crash re-runs at most one finished delivery per worker (at least once allows it)."""

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE deliveries SET state = 'succeeded', error = NULL, due_at = NULL, "
                "owner = NULL WHERE event_id = ? AND handler = ?",
                (event_id, handler),
            )

        self._writes.defer(write)
        self._wake.set()

    def retrying(
        self, event_id: str, handler: str, attempts: int, error: str, due_at: float
    ) -> None:
        """Commit a failed attempt that will be retried at wall-clock time *due_at*, and the
        failure in the attempt history (attempt number *attempts*; 0 is a delivery delayed
        before its first attempt, not a failure)."""
        history = self._history and attempts > 0

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE deliveries SET state = 'retrying', attempts = ?, error = ?, due_at = ? "
                "WHERE event_id = ? AND handler = ?",
                (attempts, error, due_at, event_id, handler),
            )
            if history:
                _insert_attempt(db, event_id, handler, attempts, error, time.time())

        self._writes.commit(write, several_statements=history)

    def dead(self, dead_letter: DeadLetter) -> None:
        """Commit a dead letter, its last failure in the attempt history, and mark its
        delivery dead."""

        def write(db: sqlite3.Connection) -> None:
            _insert_dead_letter(db, dead_letter, history=self._history)

        self._writes.commit(write, several_statements=True)

    def release(self, deliveries: Collection[tuple[str, str]]) -> None:
        """Give up (event id, handler) deliveries this owner will not run: they stay
        pending (or waiting for their retry) for whichever bus claims them next."""
        rows = list(deliveries)

        def write(db: sqlite3.Connection) -> None:
            db.executemany(f"{_RELEASE} WHERE event_id = ? AND handler = ?", rows)

        self._writes.commit(write, several_statements=True)

    def _update(self, sql: str, params: tuple[Any, ...]) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(sql, params)

        self._writes.commit(write)

    def _run_batch(self, batch: list[Write[sqlite3.Connection]]) -> None:
        """Group commit's batch runner: every write in one transaction, each write's error
        kept for its writer; a failed transaction fails every write in it."""
        with self._lock:
            try:
                with self._write() as db:
                    for op in batch:
                        _run(op, db)
            except BaseException as exc:
                for op in batch:
                    op.error = op.error or exc
                if not isinstance(exc, Exception):
                    raise  # KeyboardInterrupt and the like: this thread's business too
            if self._emits >= _PRUNE_EVERY:
                self._emits = 0
                self._prune()

    # -- recovery ------------------------------------------------------------------------

    def needs_claim(self) -> bool:
        """Whether a claim might find something: another connection committed since the
        last claim (``PRAGMA data_version``: a replay from the command line, another bus), or
        a lease has run out since (a crashed process). Cheap; the bus asks before polling."""
        with self._lock:
            version = self._read().execute("PRAGMA data_version").fetchone()[0]
            due = time.monotonic() >= self._next_full_claim
            return due or version != self._claimed_version

    def claim(self, handlers: Collection[str]) -> Claim:
        """Take over every unfinished delivery nobody alive owns (released ones, replays
        from the command line, those of a crashed process), for the given handler names.

        Deliveries for other handler names are left alone and counted in ``unknown``. A
        delivery whose event cannot be decoded (payload, name, metadata or time), or whose
        own row is damaged (attempts or due time not a number), becomes a ``not_retryable``
        dead letter whose error says why (``quarantined``); its stored text is kept as it is,
        and the claim goes on with the other rows. Two processes claiming at once never get
        the same delivery: the claim is one write transaction.
        """
        claim = Claim()
        with self._lock:
            owner = self._require_owner()
            with self._write() as db:
                self._claimed_version = db.execute("PRAGMA data_version").fetchone()[0]
                self._next_full_claim = time.monotonic() + self._lease
                dead_owners = self._dead_owners(db)
                rows = db.execute(
                    f"SELECT d.handler, d.state, d.attempts, d.error, d.due_at, d.owner, "
                    f"{_EVENT_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id "
                    f"WHERE d.state IN {_OPEN_STATES} "
                    f"ORDER BY e.created, e.rowid"
                ).fetchall()
                for handler, state, attempts, error, due_at, held_by, *event_row in rows:
                    if held_by is not None and held_by not in dead_owners:
                        continue
                    if handler not in handlers:
                        claim.unknown[handler] = claim.unknown.get(handler, 0) + 1
                        continue
                    found = self._claimed(
                        event_row,
                        handler,
                        state=state,
                        attempts=attempts,
                        error=error,
                        due_at=due_at,
                    )
                    if isinstance(found, str):
                        claim.quarantined.append(
                            self._quarantine(db, event_row, handler, attempts, found)
                        )
                        continue
                    db.execute(
                        "UPDATE deliveries SET owner = ? WHERE event_id = ? AND handler = ?",
                        (owner, found.event.id, handler),
                    )
                    claim.deliveries.append(found)
        return claim

    def _dead_owners(self, db: sqlite3.Connection) -> set[str]:
        """Owners whose lease ran out or whose process on this host is gone (and forget them)."""
        stale = time.time() - self._lease
        dead = {
            owner
            for owner, heartbeat in db.execute("SELECT owner, heartbeat FROM owners")
            if heartbeat < stale or owner_is_dead(owner)
        }
        db.executemany("DELETE FROM owners WHERE owner = ?", [(o,) for o in dead])
        # Owners with no row at all (deleted as dead earlier) are dead too.
        live = {owner for (owner,) in db.execute("SELECT owner FROM owners")}
        orphans = {
            owner
            for (owner,) in db.execute(
                f"SELECT DISTINCT owner FROM deliveries WHERE owner IS NOT NULL "
                f"AND state IN {_OPEN_STATES}"
            )
            if owner not in live
        }
        return dead | orphans

    # -- queries (the bus, the command line) ----------------------------------------------

    def status(self, event_id: str) -> Mapping[str, Delivery] | None:
        """Each delivery of the event, by handler name; ``None`` if the event is unknown."""
        with self._lock:
            rows = (
                self._read()
                .execute(
                    "SELECT handler, state, attempts, error FROM deliveries WHERE event_id = ?",
                    (event_id,),
                )
                .fetchall()
            )
        if not rows:
            return None
        return {
            h: Delivery(h, shown(state, attempts), attempts, error)
            for h, state, attempts, error in rows
        }

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first. A dead letter whose event cannot be decoded is
        listed all the same, its unreadable fields replaced: payload ``None``, metadata
        empty, time the Unix epoch (the stored text stays in the file)."""
        with self._lock:
            rows = (
                self._read()
                .execute(f"{_DEAD_LETTER_QUERY} ORDER BY x.failed_at, x.rowid")
                .fetchall()
            )
        return [self._dead_letter_from_row(row) for row in rows]

    def dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """One dead letter by id, or ``None``; read as :meth:`dead_letters` reads them."""
        with self._lock:
            row = (
                self._read()
                .execute(f"{_DEAD_LETTER_QUERY} WHERE x.id = ?", (dead_letter_id,))
                .fetchone()
            )
        return None if row is None else self._dead_letter_from_row(row)

    def replay_dead_letter(self, dead_letter_id: str, *, claim: bool = False) -> DeadLetter | None:
        """Delete the dead letter and make its delivery pending again with a fresh attempt
        count. With *claim*, the open bus owns it (the bus runs it now); without, the next
        bus to claim runs it (a replay from the command line). ``None`` if no such letter.

        With *claim*, an event that cannot be decoded raises ``CodecError`` and nothing
        changes (the bus would have no event to run). Without, the delivery is made pending
        all the same: a claim quarantines it again unless the stored text was repaired."""
        with self._lock, self._write() as db:
            owner = self._require_owner() if claim else None
            found = db.execute(f"{_DEAD_LETTER_QUERY} WHERE x.id = ?", (dead_letter_id,)).fetchone()
            if found is None:
                return None
            if claim:
                self._event_from_row(found[7:])  # raises CodecError; the transaction rolls back
            letter = self._dead_letter_from_row(found)
            db.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,))
            db.execute(
                "UPDATE deliveries SET state = 'pending', attempts = 0, error = NULL, "
                "due_at = NULL, owner = ? WHERE event_id = ? AND handler = ?",
                (owner, letter.event.id, letter.handler),
            )
        return letter

    def purge_dead_letters(self, ids: Collection[str] | None = None) -> int:
        """Delete the given dead letters (all of them when *ids* is ``None``); return how many
        were deleted. Their deliveries stay recorded as dead."""
        with self._lock, self._write() as db:
            if ids is None:
                return db.execute("DELETE FROM dead_letters").rowcount
            return sum(
                db.execute("DELETE FROM dead_letters WHERE id = ?", (i,)).rowcount for i in ids
            )

    # -- helpers -------------------------------------------------------------------------

    def _read(self) -> sqlite3.Connection:
        # Under self._lock. After close() the store still answers queries (a closed bus's
        # status() and dead_letters(), the command line): the connection is opened again.
        if self._db is None:
            self._db = self._connect()
        return self._db

    def _require_owner(self) -> str:
        if self._owner is None:
            raise RuntimeError("the store is not open: pass it to an EventBus first")
        return self._owner

    def _prune(self) -> None:
        """Under self._lock: drop old events whose every delivery succeeded."""
        cutoff = time.time() - self._retention_seconds
        with self._write() as db:
            newest = db.execute("SELECT max(rowid) FROM events").fetchone()[0] or 0
            doomed = [
                event_id
                for (event_id,) in db.execute(
                    "SELECT id FROM events e WHERE (e.created < ? OR e.rowid <= ?) "
                    f"AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id "
                    f"AND d.state IN {_OPEN_STATES}) "
                    "AND NOT EXISTS (SELECT 1 FROM dead_letters x WHERE x.event_id = e.id)",
                    (cutoff, newest - self._retention),
                )
            ]
            db.executemany("DELETE FROM deliveries WHERE event_id = ?", [(i,) for i in doomed])
            if self._history:
                db.executemany("DELETE FROM attempts WHERE event_id = ?", [(i,) for i in doomed])
            db.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in doomed])

    def _quarantine(
        self, db: sqlite3.Connection, event_row: Any, handler: str, attempts: object, why: str
    ) -> DeadLetter:
        """Inside a claim: a delivery that cannot be run becomes a dead letter saying *why*."""
        letter = self._quarantine_letter(event_row, handler, attempts, why)
        _insert_dead_letter(db, letter, history=self._history)
        return letter

    def _stored_event(self, event_id: str) -> Envelope | None:
        """The event's fields as the file holds them, not decoded; ``None`` if it is not
        stored. The command line shows them for an event that cannot be decoded."""
        with self._lock:
            row = (
                self._read()
                .execute(f"SELECT {_EVENT_COLUMNS} FROM events e WHERE e.id = ?", (event_id,))
                .fetchone()
            )
        return None if row is None else Envelope(*row)

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r}>"


def _run(op: Write[sqlite3.Connection], db: sqlite3.Connection) -> None:
    """Run one queued write inside the batch's transaction, keeping its result or error."""
    if not op.several_statements:  # one statement is atomic on its own
        try:
            op.result = op.write(db)
        except Exception as exc:  # noqa: BLE001 - handed to the thread that queued it
            op.error = exc
        return
    db.execute("SAVEPOINT write")
    try:
        op.result = op.write(db)
    except Exception as exc:  # noqa: BLE001 - handed to the thread that queued it
        db.execute("ROLLBACK TO write")
        op.error = exc
    db.execute("RELEASE write")


def _check_version(db: sqlite3.Connection, path: Path) -> None:
    """Refuse a file written by a newer schema (``PRAGMA user_version``), so it is not
    misread. Raises ``RuntimeError``."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"{path} was written with store schema version {version}; this eventbus reads "
            f"version {SCHEMA_VERSION}: upgrade eventbus"
        )


def _create_schema(db: sqlite3.Connection, path: Path) -> None:
    """Create the tables if missing and stamp the schema version (``PRAGMA user_version``),
    so a later release can migrate the file, and this one refuses a file it does not know.
    Raises ``RuntimeError`` for a file written by a newer schema."""
    _check_version(db, path)  # again, inside the write transaction
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    if version < SCHEMA_VERSION:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    message = str(exc)
    return "locked" in message or "busy" in message


def _insert_attempt(  # noqa: PLR0917 - one row's columns
    db: sqlite3.Connection, event_id: str, handler: str, attempt: int, error: str, failed_at: float
) -> None:
    db.execute(
        "INSERT INTO attempts VALUES (?, ?, ?, ?, ?)",
        (event_id, handler, attempt, error, failed_at),
    )


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return db.execute(query, (name,)).fetchone() is not None


def _insert_dead_letter(db: sqlite3.Connection, dead_letter: DeadLetter, *, history: bool) -> None:
    """The dead letter, its delivery marked dead, and (with *history*) its last failure."""
    db.execute(
        "INSERT INTO dead_letters VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            dead_letter.id,
            dead_letter.event.id,
            dead_letter.handler,
            dead_letter.attempts,
            dead_letter.error,
            dead_letter.reason,
            dead_letter.traceback,
            dead_letter.failed_at.isoformat(),
        ),
    )
    db.execute(
        "UPDATE deliveries SET state = 'dead', attempts = ?, error = ?, due_at = NULL, "
        "owner = NULL WHERE event_id = ? AND handler = ?",
        (dead_letter.attempts, dead_letter.error, dead_letter.event.id, dead_letter.handler),
    )
    if history:
        _insert_attempt(
            db,
            dead_letter.event.id,
            dead_letter.handler,
            dead_letter.attempts,
            dead_letter.error,
            dead_letter.failed_at.timestamp(),
        )


def _check_is_ours(db: sqlite3.Connection, path: Path, *, complete: bool) -> None:
    """With *complete* (opening an existing store only), refuse a database that is not one:
    other tables and none of ours, no tables at all, or some of ours missing, since nothing
    will create them. Raises ``ValueError``. (Creating our tables beside an application's is
    how a store shares its database.)"""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if complete and tables and not tables & {"events", "deliveries"}:
        raise ValueError(
            f"{path} is an SQLite database of something else (tables: "
            f"{', '.join(sorted(tables))}), not an eventbus store"
        )
    if complete and not tables:
        raise ValueError(f"{path} is not an eventbus store: it is an empty database")
    if complete and (missing := _TABLES - tables):
        raise ValueError(
            f"{path} is not an eventbus store: tables missing: {', '.join(sorted(missing))}"
        )


def _same_file(path: str, other: Path) -> bool:
    try:
        return os.path.samefile(path, other)
    except OSError:
        return False
