"""PostgresStore: every delivery's state in PostgreSQL, shared by several processes.

Each bus (one per process) is an owner with a heartbeat; a claim takes unowned deliveries
and those of dead owners with ``SELECT ... FOR UPDATE SKIP LOCKED``, so two processes never
take the same one. A bus learns of work committed elsewhere (``emit(..., within=conn)``,
a replay, another bus releasing its work at close) by ``LISTEN``/``NOTIFY``: the notice is
sent by the same transaction, so it arrives only once that transaction committed.

This is the only module that imports psycopg (the ``postgres`` extra).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from eventbus._envelope import Envelope, to_envelope
from eventbus._event import DeadLetter, Delivery, Event, new_id
from eventbus.codec import JsonCodec
from eventbus.exceptions import StoreError
from eventbus.stores._group_commit import GroupCommit, Write
from eventbus.stores._model import Claim, new_owner, owner_is_dead
from eventbus.stores._rows import (
    RowReader,
    print_error,
    shown,
)
from eventbus.typing import Reporter

__all__ = ["PostgresStore"]

#: The layout of the tables, kept in the ``meta`` table of the store's schema. Version 2
#: added ``attempts`` (every failed attempt, for the dashboard): a version 1 store gets it
#: when opened with ``create=True``, and one opened with ``create=False`` is used without it.
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {s}.meta (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version integer NOT NULL,
    store_id text NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.events (
    id text PRIMARY KEY,
    seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    name text NOT NULL,
    payload_type text,
    payload text NOT NULL,
    metadata text NOT NULL,
    occurred_at text NOT NULL,
    key text UNIQUE,
    created double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.deliveries (
    event_id text NOT NULL,
    handler text NOT NULL,
    seq bigint NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    error text,
    due_at double precision,
    owner text,
    order_key text,
    PRIMARY KEY (event_id, handler)
);
CREATE INDEX IF NOT EXISTS deliveries_open ON {s}.deliveries (seq)
    WHERE state IN ('pending', 'running', 'retrying');
CREATE INDEX IF NOT EXISTS deliveries_order ON {s}.deliveries (handler, order_key, seq)
    WHERE order_key IS NOT NULL AND state IN ('pending', 'running', 'retrying');
CREATE TABLE IF NOT EXISTS {s}.dead_letters (
    id text PRIMARY KEY,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    event_id text NOT NULL,
    handler text NOT NULL,
    attempts integer NOT NULL,
    error text NOT NULL,
    reason text NOT NULL,
    traceback text,
    failed_at text NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_event ON {s}.dead_letters (event_id);
CREATE TABLE IF NOT EXISTS {s}.owners (
    owner text PRIMARY KEY,
    heartbeat double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.attempts (
    seq bigint GENERATED ALWAYS AS IDENTITY,
    event_id text NOT NULL,
    handler text NOT NULL,
    attempt integer NOT NULL,
    error text NOT NULL,
    failed_at double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_delivery ON {s}.attempts (event_id, handler)
"""

_OPEN_STATES = "('pending', 'running', 'retrying')"
_EVENT_COLUMNS = "e.id, e.name, e.payload_type, e.payload, e.metadata, e.occurred_at"
#: The server's clock, in seconds: leases are judged by one clock, whatever the hosts say.
_NOW = "extract(epoch FROM clock_timestamp())"

#: How long the background thread lets a deferred write wait for a ride (seconds).
_LINGER = 0.002
#: How often old succeeded events are pruned, in emits.
_PRUNE_EVERY = 1000
#: Attempts of a write whose connection broke, and the pause before the next (seconds).
_WRITE_TRIES = 3
_RECONNECT_PAUSES = (0.05, 0.2, 1.0, 2.0, 5.0)
#: A notice's payload that ends a closing store's wait for notices (followed by its owner).
_STOP = "stop:"
#: The longest schema name: its notice channel ("eventbus." + schema) stays under 64 bytes.
_MAX_SCHEMA = 54
#: A notice's payload naming the owner that sent it (it does not wake that owner's bus).
_FROM = "from:"


class PostgresStore(RowReader):
    """Deliveries, dead letters and idempotency keys in a PostgreSQL database.

    ``PostgresStore("postgresql://app@localhost/app")``. The tables live in their own schema
    (``schema``, default ``"eventbus"``), created on first use; a schema written by a newer
    version of eventbus is refused with ``RuntimeError``, one holding other tables and none of
    ours with ``ValueError``. Several processes may share one database, each with its own bus:
    every delivery runs in one of them at a time.

    Options:

    * ``lease``: seconds without a heartbeat after which another process takes over a bus's
      unfinished deliveries (judged by the server's clock). An owner on this host whose
      process is gone is taken over at once. The heartbeat runs every ``lease / 3`` seconds.
    * ``poll_interval``: how often a recovered bus looks for work it was not told of.
    * ``retention`` / ``retention_seconds``: as for :class:`~eventbus.stores.SQLiteStore`.
    * ``pool_size``: connections kept open (writes share transactions, so few are needed).
    * ``codec``: how payloads become JSON (:class:`eventbus.codec.JsonCodec` by default).
    * ``create``: ``True`` (default) creates the schema and tables when missing. ``False``
      opens an existing store only and writes nothing to set it up: a schema without the
      eventbus tables raises ``ValueError`` (this is how the command line opens stores).

    Thread-safe. Writes from many threads share transactions (group commit). A write whose
    connection broke is retried on a new connection; if the database stays out of reach it
    raises :class:`~eventbus.exceptions.StoreError` (``emit()`` then stored nothing); the
    background work (heartbeat, notices) reports the loss and reconnects, never stops.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "eventbus",
        lease: float = 30.0,
        poll_interval: float = 1.0,
        retention: int = 100_000,
        retention_seconds: float = 7 * 24 * 3600,
        pool_size: int = 4,
        connect_timeout: float = 10.0,
        codec: JsonCodec | None = None,
        create: bool = True,
    ) -> None:
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a str (postgresql://...), got {type(dsn).__name__}")
        if not isinstance(schema, str) or not schema.isidentifier():
            raise ValueError(f"schema must be a plain identifier, got {schema!r}")
        if len(schema.encode()) > _MAX_SCHEMA:
            # PostgreSQL cuts names at 63 bytes (two long names would be one schema), and the
            # notice channel, "eventbus." + schema, must fit in them too.
            raise ValueError(f"schema must be at most {_MAX_SCHEMA} bytes long, got {schema!r}")
        for what, value in (
            ("lease", lease),
            ("poll_interval", poll_interval),
            ("connect_timeout", connect_timeout),
        ):
            if value <= 0:
                raise ValueError(f"{what} must be > 0, got {value!r}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size!r}")
        self.dsn = dsn
        self.schema = schema
        self.codec = codec if codec is not None else JsonCodec()
        self.poll_interval = poll_interval
        self._lease = lease
        self._retention = retention
        self._retention_seconds = retention_seconds
        self._connect_timeout = connect_timeout
        self._pool_size = pool_size
        self._create = create
        self._s = sql.Identifier(schema)
        self._queries: dict[str, sql.Composed] = {}
        self._channel = f"eventbus.{schema}"
        self._lock = threading.Lock()  # owner, pool and threads
        self._writes: GroupCommit[psycopg.Connection[Any]] = GroupCommit(self._run_batch)
        self._owner: str | None = None
        self._emits = 0
        self._store_id = ""
        self._history = False  # the attempts table (schema version 2), known on opening
        self._server: tuple[str, str] = ("", "")  # (database, port) the pool talks to
        self._notified = threading.Event()  # a notice arrived since the last claim
        self._next_full_claim = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()  # a deferred write is queued
        self._threads: list[threading.Thread] = []
        self._leading: dict[str, psycopg.Connection[Any]] = {}  # role -> its lock's connection
        self._me = ""  # the payload of the notices this owner sends
        self._listening = threading.Event()  # the listener has run LISTEN
        self._listener: psycopg.Connection[Any] | None = None
        self._reporter: Reporter | None = None
        #: Called with errors of background work when no bus reporter is set.
        self.on_error: Callable[[BaseException], None] = print_error
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._open_pool()

    # -- connections ---------------------------------------------------------------------

    def _open_pool(self) -> None:
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self.dsn,
            min_size=1,
            max_size=self._pool_size,
            kwargs={"connect_timeout": max(1, round(self._connect_timeout))},
            timeout=self._connect_timeout,
            # No check on each checkout (a round trip per transaction): a broken connection
            # fails its write, which is retried on a new connection (_retrying).
            name=f"eventbus-{self.schema}",
            open=False,
        )
        try:
            # One connection of our own first: it says why it failed (no such database, a
            # wrong password), where the pool would only time out.
            with self._connect() as conn:
                self._store_id, self._history = _create_schema(
                    conn, self._s, self.schema, create=self._create
                )
                self._server = (conn.info.dbname, str(conn.info.port))
            pool.open(wait=True, timeout=self._connect_timeout)
        except BaseException as exc:
            pool.close()
            if isinstance(exc, PoolTimeout):
                raise StoreError(
                    f"cannot connect to PostgreSQL at {_safe_dsn(self.dsn)} "
                    f"within {self._connect_timeout:g} s"
                ) from None
            raise
        self._pool = pool

    def _connect(self, *, autocommit: bool = False) -> psycopg.Connection[Any]:
        """A connection of our own, outside the pool. Raises ``StoreError`` with the
        server's reason when it cannot connect."""
        try:
            return psycopg.connect(
                self.dsn,
                autocommit=autocommit,
                connect_timeout=max(1, round(self._connect_timeout)),
            )
        except psycopg.OperationalError as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise StoreError(
                f"cannot connect to PostgreSQL at {_safe_dsn(self.dsn)}: {reason}"
            ) from None

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """One transaction on a pooled connection. After close() the store still answers
        queries (a closed bus's status(), the command line) on a connection of its own, opened
        for the query, so that nothing of the store stays running."""
        pool = self._pool
        if pool is None:
            with self._connect() as conn, conn.transaction():
                yield conn
            return
        with pool.connection() as conn, conn.transaction():
            yield conn

    def _retrying(self, work: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """Run *work* in a transaction; if the connection broke (or the pool has none), again
        on a connection of its own, opened now: the pool reconnects on its own schedule
        (seconds apart after an outage), and a write must not wait for that."""
        try:
            with self._transaction() as conn:
                return work(conn)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            last: Exception = exc
        pool = self._pool
        if pool is not None:
            with contextlib.suppress(Exception):  # let the pool drop its broken connections
                pool.check()
        for pause in _RECONNECT_PAUSES[: _WRITE_TRIES - 1]:
            self._stop.wait(pause)
            try:
                with self._connect() as conn, conn.transaction():
                    return work(conn)
            except (psycopg.OperationalError, StoreError) as exc:
                last = exc
        raise StoreError(f"PostgreSQL at {_safe_dsn(self.dsn)} is out of reach: {last}") from last

    # -- lifecycle -----------------------------------------------------------------------

    def open(self, reporter: Reporter | None = None) -> str:
        """Start a session for one bus: register an owner, start its heartbeat and listen for
        notices of new work. Returns the owner id. Background errors go to *reporter* when
        given, else to ``on_error``. Raises ``RuntimeError`` if already open."""
        with self._lock:
            if self._owner is not None:
                raise RuntimeError("this store is already used by an open bus")
            self._reporter = reporter
            self._listening.clear()
            if self._pool is None:  # opened again after close()
                self._open_pool()
        owner = new_owner()

        def register(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                self._q(
                    f"INSERT INTO {{s}}.owners VALUES (%s, {_NOW}) "
                    "ON CONFLICT (owner) DO UPDATE SET heartbeat = excluded.heartbeat"
                ),
                (owner,),
            )

        self._retrying(register)
        with self._lock:
            self._owner = owner
            self._me = _FROM + owner
            self._stop.clear()
            self._notified.set()  # the first look claims whatever is there
            self._threads = [
                threading.Thread(target=self._work_in_background, name=name, daemon=True)
                for name in ("eventbus-store",)
            ] + [threading.Thread(target=self._listen, name="eventbus-store-listen", daemon=True)]
            for thread in self._threads:
                thread.start()
        # Listening before open() returns: a commit right after it must wake this bus. If the
        # listener cannot connect it says so, and the polls find the work meanwhile.
        self._listening.wait(self._connect_timeout)
        return owner

    def close(self) -> None:
        """End the session: unfinished deliveries of this owner become anyone's (other buses
        are told), and the connections are closed. Idempotent; the store can be opened
        again."""
        self._stop.set()
        self._wake.set()
        if self._listener is not None and self._owner is not None:
            # The listener waits for notices: this one ends its wait at once.
            with contextlib.suppress(Exception):  # it stops within a second anyway
                self._retrying(
                    lambda conn: conn.execute(
                        "SELECT pg_notify(%s, %s)", (self._channel, _STOP + str(self._owner))
                    )
                )
        for thread in self._threads:
            thread.join()
        self._threads = []
        with self._lock:
            owner, self._owner = self._owner, None
            self._reporter = None
            leading, self._leading = list(self._leading.values()), {}
        for conn in leading:  # the roles are free for another process
            conn.close()
        try:
            self._writes.flush()  # deferred successes: committed before the session ends
            if owner is not None:

                def leave(conn: psycopg.Connection[Any]) -> None:
                    conn.execute(
                        self._q(
                            "UPDATE {s}.deliveries SET owner = NULL, state = CASE state "
                            "WHEN 'running' THEN 'pending' ELSE state END "
                            f"WHERE owner = %s AND state IN {_OPEN_STATES}"
                        ),
                        (owner,),
                    )
                    conn.execute(self._q("DELETE FROM {s}.owners WHERE owner = %s"), (owner,))
                    conn.execute("SELECT pg_notify(%s, '')", (self._channel,))

                self._retrying(leave)
        finally:
            with self._lock:
                pool, self._pool = self._pool, None
            if pool is not None:
                pool.close()

    def _report(self, error: BaseException) -> None:
        reporter = self._reporter
        if reporter is not None:
            reporter.internal_error("store", error)
        else:
            self.on_error(error)

    def _work_in_background(self) -> None:
        """Commit deferred writes promptly, and renew this owner's heartbeat. Waits on
        events, not sleep: close() ends every wait at once."""
        interval = self._lease / 3
        next_beat = time.monotonic() + interval
        while not self._stop.is_set():
            if self._wake.wait(max(0.0, next_beat - time.monotonic())):
                self._wake.clear()
                self._stop.wait(_LINGER)  # let a worker's next commit carry it instead
                self._guard(self.flush)
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + interval
                self._guard(self._beat)

    def _guard(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - reported; the next round tries again
            self._report(exc)

    def _beat(self) -> None:
        owner = self._owner
        if owner is None:
            return

        def beat(conn: psycopg.Connection[Any]) -> None:
            # An upsert: if a pause longer than the lease let another process declare this
            # owner dead, the owner comes back (what was taken over runs there: at least once).
            conn.execute(
                self._q(
                    f"INSERT INTO {{s}}.owners VALUES (%s, {_NOW}) "
                    "ON CONFLICT (owner) DO UPDATE SET heartbeat = excluded.heartbeat"
                ),
                (owner,),
            )

        self._retrying(beat)

    def _listen(self) -> None:
        """Hold a connection that LISTENs for notices of new work, and tell the bus at once.
        A lost connection is reported and opened again with backoff; after a reconnect the
        bus is told to look, since notices sent meanwhile were missed."""
        failures = 0
        while not self._stop.is_set():
            try:
                conn = psycopg.connect(
                    self.dsn, autocommit=True, connect_timeout=max(1, round(self._connect_timeout))
                )
            except psycopg.Error as exc:
                self._report(StoreError(f"cannot listen for new work: {exc}"))
                self._listening.set()  # open() waits no longer: the polls cover meanwhile
                self._stop.wait(_RECONNECT_PAUSES[min(failures, len(_RECONNECT_PAUSES) - 1)])
                failures += 1
                continue
            try:
                self._listener = conn
                if self._stop.is_set():
                    return
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                self._listening.set()
                if failures:
                    self._work_available()  # notices sent while we were away were missed
                failures = 0
                while not self._stop.is_set():
                    for notice in conn.notifies(timeout=1.0, stop_after=1):
                        # Not another bus's close, nor a notice of our own.
                        if not notice.payload.startswith(_STOP) and notice.payload != self._me:
                            self._work_available()
            except psycopg.Error as exc:
                if not self._stop.is_set():
                    self._report(StoreError(f"lost the connection listening for work: {exc}"))
                    self._stop.wait(_RECONNECT_PAUSES[min(failures, len(_RECONNECT_PAUSES) - 1)])
                    failures += 1
            finally:
                self._listener = None
                conn.close()

    def _work_available(self) -> None:
        self._notified.set()
        reporter = self._reporter
        wake = getattr(reporter, "work_available", None)
        if wake is not None:
            wake()

    def flush(self) -> None:
        """Commit deferred writes (successes) now; return once they are committed."""
        self._writes.flush()

    def lead(self, role: str) -> bool:
        """Whether this owner (this bus) is the one of all processes sharing the store that does
        *role* (``"relay"``: publishes the outbox, so that events reach the transport in
        commit order). The first to ask holds a session advisory lock on a connection of its
        own until it closes or that connection breaks; the others get ``False`` and ask again
        later, taking over when it is gone. Blocks for a round trip; never raises (a failure
        is reported and counts as ``False``)."""
        with self._lock:
            conn = self._leading.get(role)
        if conn is not None:
            try:
                conn.execute("SELECT 1")  # still connected: the lock is still ours
                return True
            except psycopg.Error:
                conn.close()
                with self._lock:
                    self._leading.pop(role, None)
        try:
            conn = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=max(1, round(self._connect_timeout))
            )
        except psycopg.Error as exc:
            self._report(StoreError(f"cannot ask to lead {role}: {exc}"))
            return False
        try:
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtext(%s))", (f"eventbus:{self.schema}:{role}",)
            ).fetchone()
        except psycopg.Error as exc:
            conn.close()
            self._report(StoreError(f"cannot ask to lead {role}: {exc}"))
            return False
        if row is None or not row[0]:
            conn.close()
            return False
        with self._lock:
            if self._owner is None:  # closed meanwhile
                conn.close()
                return False
            self._leading[role] = conn
        return True

    # -- the bus's writes ----------------------------------------------------------------

    def add(
        self,
        event: Event,
        handlers: Collection[str],
        key: str | None = None,
        *,
        due_at: float | None = None,
        claimable: bool = False,
        order_keys: Mapping[str, str] | None = None,
    ) -> Event | None:
        """Commit *event* and one pending delivery per handler, owned by the open bus (with
        *due_at*, a wall-clock time: waiting to start then). With *claimable*, owned by no
        bus, and listening buses are told, as for :meth:`add_within` (the outbox of a store
        whose one relay may be in another process). Returns ``None``, or the event first
        stored under *key* (then nothing is written). Raises ``TypeError`` for a payload the
        codec cannot encode, ``StoreError`` when the database is out of reach; either way
        nothing was written."""
        owner = self._require_owner()
        params = self._add_params(
            event, handlers, key, due_at, None if claimable else owner, order_keys=order_keys
        )

        def write(conn: psycopg.Connection[Any]) -> Event | None:
            return self._insert(conn, params, notify=claimable)

        return cast(Event | None, self._writes.commit(write))

    def add_within(
        self,
        connection: object,
        event: Event,
        handlers: Collection[str],
        key: str | None = None,
        *,
        due_at: float | None = None,
        order_keys: Mapping[str, str] | None = None,
    ) -> Event | None:
        """Write *event* and its deliveries through the application's own *connection*, in
        its open transaction, with one statement: they exist if and only if that transaction
        commits, and on commit every bus listening to this store is told (``NOTIFY`` is
        transactional). The deliveries belong to no bus until one claims them.

        Raises ``TypeError`` for anything but a psycopg 3 connection (or for an unencodable
        payload), ``ValueError`` for a closed connection, one whose transaction failed, one in
        autocommit mode outside a transaction, or one to another database; nothing is written
        then. Returns as :meth:`add` does."""
        conn = self._check_within(connection)
        params = self._add_params(event, handlers, key, due_at, None, order_keys=order_keys)
        return self._insert(conn, params, notify=True, guarded=True)

    def _check_within(self, connection: object) -> psycopg.Connection[Any]:
        if not isinstance(connection, psycopg.Connection):
            raise TypeError(
                "within= takes the psycopg 3 connection whose transaction the event joins "
                f"(PostgresStore), got {type(connection).__module__}."
                f"{type(connection).__qualname__}"
            )
        if connection.closed:
            raise ValueError("within= got a closed connection")
        status = connection.info.transaction_status
        if status == TransactionStatus.INERROR:
            raise ValueError(
                "within= got a connection whose transaction failed: roll it back first"
            )
        if connection.autocommit and status == TransactionStatus.IDLE:
            raise ValueError(
                "within= needs a transaction: the connection is in autocommit mode; "
                "use `with conn.transaction():`"
            )
        here = (connection.info.dbname, str(connection.info.port))
        if here != self._server:
            raise ValueError(
                f"within= got a connection to database {here[0]!r} (port {here[1]}), "
                f"but this store is in {self._server[0]!r} (port {self._server[1]})"
            )
        return connection

    def _add_params(
        self,
        event: Event,
        handlers: Collection[str],
        key: str | None,
        due_at: float | None,
        owner: str | None,
        *,
        order_keys: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        envelope = to_envelope(self.codec, event)  # raises before anything is written
        names = list(handlers)
        keys = [None if order_keys is None else order_keys.get(name) for name in names]
        return {
            "id": envelope.id,
            "name": envelope.name,
            "payload_type": envelope.payload_type,
            "payload": envelope.payload,
            "metadata": envelope.metadata,
            "occurred_at": envelope.occurred_at,
            "key": key,
            "created": time.time(),
            "handlers": names,
            "order_keys": keys,
            "state": "pending" if due_at is None else "retrying",
            "due_at": due_at,
            "owner": owner,
            "channel": self._channel,
            "store_id": self._store_id,
        }

    def _insert(
        self,
        conn: psycopg.Connection[Any],
        params: dict[str, Any],
        *,
        notify: bool,
        guarded: bool = False,
    ) -> Event | None:
        """The event and its deliveries in one statement (one round trip). *guarded*: only
        if this is our store's database (else nothing is written and ``ValueError``)."""
        guard = "(SELECT 1)"
        if guarded:
            guard = "(SELECT 1 FROM {s}.meta WHERE store_id = %(store_id)s)"
        note = "SELECT pg_notify(%(channel)s, '') FROM ev" if notify else "SELECT 1 WHERE false"
        query = self._q(
            f"WITH guard AS {guard}, "
            "ev AS (INSERT INTO {s}.events "
            "(id, name, payload_type, payload, metadata, occurred_at, key, created) "
            "SELECT %(id)s, %(name)s, %(payload_type)s, %(payload)s, %(metadata)s, "
            "%(occurred_at)s, %(key)s, %(created)s FROM guard "
            "ON CONFLICT DO NOTHING RETURNING seq), "
            "dl AS (INSERT INTO {s}.deliveries "
            "(event_id, handler, seq, state, due_at, owner, order_key) "
            "SELECT %(id)s, h.name, ev.seq, %(state)s, %(due_at)s, %(owner)s, h.order_key "
            "FROM ev, unnest(%(handlers)s::text[], %(order_keys)s::text[]) "
            "AS h(name, order_key) RETURNING 1), "
            f"note AS ({note}) "
            "SELECT (SELECT count(*) FROM guard), (SELECT count(*) FROM ev), "
            "(SELECT count(*) FROM dl), (SELECT count(*) FROM note)"
        )
        # Rows as tuples whatever row factory the caller's connection has.
        with conn.cursor(row_factory=tuple_row) as cur:
            row = cur.execute(query, params).fetchone()
        assert row is not None
        ours, inserted = row[0], row[1]
        if not ours:
            raise ValueError(
                "within= got a connection to a database that is not this store's "
                "(its eventbus schema belongs to another store)"
            )
        if inserted or params["key"] is None:
            # Not inserted without a key: this very event is stored already (a write retried
            # after its connection broke at commit).
            self._emits += 1
            return None
        with conn.cursor(row_factory=tuple_row) as cur:
            found = cur.execute(
                self._q(
                    f"SELECT {_EVENT_COLUMNS} FROM {{s}}.events e WHERE e.key = %s AND e.id <> %s"
                ),
                (params["key"], params["id"]),
            ).fetchone()
        return None if found is None else self._event_or_undecoded(found)

    def started(self, event_id: str, handler: str, attempts: int) -> None:
        """Commit that attempt number *attempts* is starting (before the handler runs)."""
        self._update(
            "UPDATE {s}.deliveries SET state = 'running', attempts = %s "
            "WHERE event_id = %s AND handler = %s",
            (attempts, event_id, handler),
        )

    def succeeded(self, event_id: str, handler: str) -> None:
        """Record a success without waiting for its commit: it rides with the next
        transaction of any thread, or the background thread commits it within a couple of
        milliseconds. Writes commit in order, so a worker's next attempt never starts before
        its previous success is committed."""
        query = self._q(
            "UPDATE {s}.deliveries SET state = 'succeeded', error = NULL, due_at = NULL, "
            "owner = NULL WHERE event_id = %s AND handler = %s"
        )

        def write(conn: psycopg.Connection[Any]) -> None:
            conn.execute(query, (event_id, handler))

        self._writes.defer(write)
        self._wake.set()

    def retrying(
        self, event_id: str, handler: str, attempts: int, error: str, due_at: float
    ) -> None:
        """Commit a failed attempt that will be retried at wall-clock time *due_at*, and the
        failure in the attempt history (attempt number *attempts*; 0 is a delivery delayed
        before its first attempt, not a failure)."""
        update = self._q(
            "UPDATE {s}.deliveries SET state = 'retrying', attempts = %s, error = %s, "
            "due_at = %s WHERE event_id = %s AND handler = %s"
        )
        history = self._history and attempts > 0

        def write(conn: psycopg.Connection[Any]) -> None:
            conn.execute(update, (attempts, error, due_at, event_id, handler))
            if history:
                self._insert_attempt(conn, event_id, handler, attempts, error, time.time())

        self._writes.commit(write)

    def dead(self, dead_letter: DeadLetter) -> None:
        """Commit a dead letter and mark its delivery dead."""

        def write(conn: psycopg.Connection[Any]) -> None:
            self._insert_dead_letter(conn, dead_letter)

        self._writes.commit(write)

    def release(self, deliveries: Collection[tuple[str, str]]) -> None:
        """Give up (event id, handler) deliveries this owner will not run: they stay pending
        (or waiting for their retry) for whichever bus claims them next, which is told."""
        rows = list(deliveries)
        query = self._q(
            "UPDATE {s}.deliveries SET owner = NULL, state = CASE state "
            "WHEN 'running' THEN 'pending' ELSE state END WHERE event_id = %s AND handler = %s"
        )

        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.cursor() as cur:
                cur.executemany(query, rows)
            conn.execute("SELECT pg_notify(%s, '')", (self._channel,))

        self._writes.commit(write)

    def _update(self, statement: str, params: tuple[Any, ...]) -> None:
        query = self._q(statement)

        def write(conn: psycopg.Connection[Any]) -> None:
            conn.execute(query, params)

        self._writes.commit(write)

    def _run_batch(self, batch: list[Write[psycopg.Connection[Any]]]) -> None:
        """Group commit's batch runner: every write in one transaction. A statement that
        fails aborts a PostgreSQL transaction, so then each write runs again in a
        transaction of its own and only the failing one gets its error. A broken connection
        is retried on a new one (nothing of the batch committed, and every write may run
        again: an event already stored is recognised by its id)."""
        try:
            self._retrying(lambda conn: _run_all(batch, conn))
        except Exception as exc:  # noqa: BLE001 - sorted out below
            if isinstance(exc, StoreError) or len(batch) == 1:
                for op in batch:
                    op.error = exc
            else:
                for op in batch:
                    op.error = None
                    try:
                        self._retrying(lambda conn, op=op: _run(op, conn))  # type: ignore[misc]
                    except Exception as alone:  # noqa: BLE001 - handed to its writer
                        op.error = alone
        except BaseException as exc:
            for op in batch:
                op.error = op.error or exc
            raise
        if self._emits >= _PRUNE_EVERY:
            self._emits = 0
            try:
                self._retrying(self._prune)
            except Exception as exc:  # noqa: BLE001 - pruning waits for the next round
                self._report(exc)

    # -- recovery ------------------------------------------------------------------------

    def needs_claim(self) -> bool:
        """Whether a claim might find something: a notice of new work arrived since the last
        claim, a lease may have run out since (a crashed process on another host), or an
        owner on this host is a process that is gone (asked of the database: one round
        trip, at each poll)."""
        if self._notified.is_set() or time.monotonic() >= self._next_full_claim:
            return True
        owners = self._read("SELECT owner FROM {s}.owners", ())
        return any(owner_is_dead(owner) for (owner,) in owners)

    def claim(self, handlers: Collection[str]) -> Claim:
        """Take over every unfinished delivery that no live owner holds (unowned ones: new
        work committed with ``within=``, replays, releases; and those of dead owners), for the
        given handler names, oldest first.

        Rows are locked ``FOR UPDATE SKIP LOCKED``: two processes claiming at once never get
        the same delivery. Deliveries of other handler names are left and counted in
        ``unknown``; a row that cannot be decoded becomes a ``not_retryable`` dead letter
        (``quarantined``) and the claim goes on.
        """
        owner = self._require_owner()
        names = list(handlers)
        self._notified.clear()  # a notice arriving during the claim makes the next one look
        self._next_full_claim = time.monotonic() + self._lease

        def work(conn: psycopg.Connection[Any]) -> Claim:
            claim = Claim()
            self._forget_dead_owners(conn)
            rows = conn.execute(
                self._q(
                    "SELECT d.seq, d.order_key, d.handler, d.state, d.attempts, d.error, "
                    f"d.due_at, {_EVENT_COLUMNS} FROM {{s}}.deliveries d "
                    "JOIN {s}.events e ON e.id = d.event_id "
                    f"WHERE d.state IN {_OPEN_STATES} AND (d.owner IS NULL OR NOT EXISTS "
                    "(SELECT 1 FROM {s}.owners o WHERE o.owner = d.owner)) "
                    "ORDER BY d.seq FOR UPDATE OF d SKIP LOCKED"
                )
            ).fetchall()
            stops = self._order_stops(conn, owner, [r[:3] for r in rows if r[2] in names])
            waiting = 0
            taken: list[tuple[str, str]] = []
            for seq, order_key, handler, state, attempts, error, due_at, *event_row in rows:
                if handler not in names:
                    claim.unknown[handler] = claim.unknown.get(handler, 0) + 1
                    continue
                stop = stops.get((handler, order_key))
                if stop is not None and seq >= stop:
                    waiting += 1  # an earlier delivery of its key is another process's
                    continue
                found = self._claimed(
                    event_row, handler, state=state, attempts=attempts, error=error, due_at=due_at
                )
                if isinstance(found, str):
                    claim.quarantined.append(
                        self._quarantine(conn, event_row, handler, attempts, found)
                    )
                    continue
                taken.append((found.event.id, handler))
                claim.deliveries.append(found)
            if waiting:
                # Rows this claim locked and left: an owner that skipped them meanwhile
                # (SKIP LOCKED), or the holder of their key, must look again. Not this one:
                # it would skip them again until the holder is done.
                conn.execute("SELECT pg_notify(%s, %s)", (self._channel, _FROM + owner))
            if taken:
                conn.execute(
                    self._q(
                        "UPDATE {s}.deliveries d SET owner = %s FROM "
                        "unnest(%s::text[], %s::text[]) AS t(event_id, handler) "
                        "WHERE d.event_id = t.event_id AND d.handler = t.handler"
                    ),
                    (owner, [e for e, _ in taken], [h for _, h in taken]),
                )
            return claim

        return cast(Claim, self._retrying(work))

    def _order_stops(
        self,
        conn: psycopg.Connection[Any],
        owner: str,
        candidates: list[tuple[int, str | None, str]],
    ) -> dict[tuple[str, str], int]:
        """For the keys (``ordered_by``) of the *candidates* (seq, order key, handler) this
        claim locked: the seq from which a key's deliveries must wait, because an earlier
        open delivery of that key and handler is neither locked by this claim nor this
        owner's (another process runs it, or another claim is taking it right now). So the
        deliveries of one key run one process at a time, in the order they were committed."""
        mine = {(handler, key, seq) for seq, key, handler in candidates if key is not None}
        if not mine:
            return {}
        pairs = sorted({(handler, key) for handler, key, _ in mine})
        stops: dict[tuple[str, str], int] = {}
        for handler, key, seq, held_by in conn.execute(
            self._q(
                "SELECT d.handler, d.order_key, d.seq, d.owner FROM {s}.deliveries d "
                "JOIN unnest(%s::text[], %s::text[]) AS k(handler, order_key) "
                "ON d.handler = k.handler AND d.order_key = k.order_key "
                f"WHERE d.state IN {_OPEN_STATES} ORDER BY d.seq"
            ),
            ([h for h, _ in pairs], [k for _, k in pairs]),
        ).fetchall():
            if (handler, key) in stops or (handler, key, seq) in mine or held_by == owner:
                continue
            stops[(handler, key)] = seq
        return stops

    def _forget_dead_owners(self, conn: psycopg.Connection[Any]) -> None:
        """Delete owners whose lease ran out (server time) or whose process on this host is
        gone: their deliveries are then anyone's."""
        conn.execute(
            self._q(f"DELETE FROM {{s}}.owners WHERE heartbeat < {_NOW} - %s"), (self._lease,)
        )
        gone = [
            owner
            for (owner,) in conn.execute(self._q("SELECT owner FROM {s}.owners")).fetchall()
            if owner_is_dead(owner)
        ]
        if gone:
            conn.execute(self._q("DELETE FROM {s}.owners WHERE owner = ANY(%s)"), (gone,))

    # -- queries (the bus, the command line) ----------------------------------------------

    def status(self, event_id: str) -> Mapping[str, Delivery] | None:
        """Each delivery of the event, by handler name; ``None`` if the event is unknown."""
        rows = self._read(
            "SELECT handler, state, attempts, error FROM {s}.deliveries WHERE event_id = %s",
            (event_id,),
        )
        if not rows:
            return None
        return {
            h: Delivery(h, shown(state, attempts), attempts, error)
            for h, state, attempts, error in rows
        }

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first (one whose event cannot be decoded is listed with
        what can be read of it)."""
        rows = self._read(f"{self._dead_letter_query()} ORDER BY x.failed_at, x.seq", ())
        return [self._dead_letter_from_row(row) for row in rows]

    def dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """One dead letter by id, or ``None``."""
        rows = self._read(f"{self._dead_letter_query()} WHERE x.id = %s", (dead_letter_id,))
        return self._dead_letter_from_row(rows[0]) if rows else None

    def replay_dead_letter(self, dead_letter_id: str, *, claim: bool = False) -> DeadLetter | None:
        """Delete the dead letter and make its delivery pending again with a fresh attempt
        count: owned by the open bus with *claim*, else anyone's (and listening buses are
        told). ``None`` if no such letter. With *claim*, an event that cannot be decoded
        raises ``CodecError`` and nothing changes."""
        owner = self._require_owner() if claim else None

        def work(conn: psycopg.Connection[Any]) -> DeadLetter | None:
            found = conn.execute(
                self._q(f"{self._dead_letter_query()} WHERE x.id = %s FOR UPDATE OF x"),
                (dead_letter_id,),
            ).fetchone()
            if found is None:
                return None
            if claim:
                self._event_from_row(found[7:])  # raises CodecError; rolled back
            letter = self._dead_letter_from_row(found)
            conn.execute(self._q("DELETE FROM {s}.dead_letters WHERE id = %s"), (dead_letter_id,))
            conn.execute(
                self._q(
                    "UPDATE {s}.deliveries SET state = 'pending', attempts = 0, error = NULL, "
                    "due_at = NULL, owner = %s WHERE event_id = %s AND handler = %s"
                ),
                (owner, letter.event.id, letter.handler),
            )
            if owner is None:
                conn.execute("SELECT pg_notify(%s, '')", (self._channel,))
            return letter

        return cast(DeadLetter | None, self._retrying(work))

    def purge_dead_letters(self, ids: Collection[str] | None = None) -> int:
        """Delete the given dead letters (all when *ids* is ``None``); return how many were
        deleted. Their deliveries stay recorded as dead."""

        def work(conn: psycopg.Connection[Any]) -> int:
            if ids is None:
                return conn.execute(self._q("DELETE FROM {s}.dead_letters")).rowcount
            return conn.execute(
                self._q("DELETE FROM {s}.dead_letters WHERE id = ANY(%s)"), (list(ids),)
            ).rowcount

        return cast(int, self._retrying(work))

    # -- helpers -------------------------------------------------------------------------

    def _q(self, statement: str) -> sql.Composed:
        """*statement* with ``{s}`` as this store's schema, quoted (composed once: it is on
        the path of every write)."""
        query = self._queries.get(statement)
        if query is None:
            query = self._queries[statement] = sql.SQL(statement).format(s=self._s)
        return query

    def _read(self, statement: str, params: tuple[Any, ...]) -> list[Any]:
        query = self._q(statement)
        return cast(list[Any], self._retrying(lambda conn: conn.execute(query, params).fetchall()))

    def _dead_letter_query(self) -> str:
        return (
            "SELECT x.id, x.handler, x.attempts, x.error, x.reason, x.traceback, x.failed_at, "
            f"{_EVENT_COLUMNS} FROM {{s}}.dead_letters x JOIN {{s}}.events e "
            "ON e.id = x.event_id"
        )

    def _require_owner(self) -> str:
        if self._owner is None:
            raise RuntimeError("the store is not open: pass it to an EventBus first")
        return self._owner

    def _prune(self, conn: psycopg.Connection[Any]) -> None:
        """Drop old events whose every delivery finished and that have no dead letter."""
        conn.execute(
            self._q(
                "WITH newest AS (SELECT coalesce(max(seq), 0) AS seq FROM {s}.events), "
                "doomed AS (SELECT e.id FROM {s}.events e, newest "
                "WHERE (e.created < %s OR e.seq <= newest.seq - %s) "
                "AND NOT EXISTS (SELECT 1 FROM {s}.deliveries d WHERE d.event_id = e.id "
                f"AND d.state IN {_OPEN_STATES}) "
                "AND NOT EXISTS (SELECT 1 FROM {s}.dead_letters x WHERE x.event_id = e.id)), "
                "gone AS (DELETE FROM {s}.deliveries WHERE event_id IN (SELECT id FROM doomed)), "
                "forgotten AS "
                "(DELETE FROM {s}.attempts WHERE event_id IN (SELECT id FROM doomed)) "
                "DELETE FROM {s}.events WHERE id IN (SELECT id FROM doomed)"
            ),
            (time.time() - self._retention_seconds, self._retention),
        )

    def _insert_attempt(  # noqa: PLR0917 - one row's columns
        self,
        conn: psycopg.Connection[Any],
        event_id: str,
        handler: str,
        attempt: int,
        error: str,
        failed_at: float,
    ) -> None:
        conn.execute(
            self._q(
                "INSERT INTO {s}.attempts (event_id, handler, attempt, error, failed_at) "
                "VALUES (%s, %s, %s, %s, %s)"
            ),
            (event_id, handler, attempt, error, failed_at),
        )

    def _insert_dead_letter(self, conn: psycopg.Connection[Any], letter: DeadLetter) -> None:
        """The dead letter, its delivery marked dead, and its last failure in the history
        (once: a dead letter already stored is left as it is)."""
        inserted = conn.execute(
            self._q(
                "INSERT INTO {s}.dead_letters "
                "(id, event_id, handler, attempts, error, reason, traceback, failed_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING"
            ),
            (
                letter.id,
                letter.event.id,
                letter.handler,
                letter.attempts,
                letter.error,
                letter.reason,
                letter.traceback,
                letter.failed_at.isoformat(),
            ),
        )
        conn.execute(
            self._q(
                "UPDATE {s}.deliveries SET state = 'dead', attempts = %s, error = %s, "
                "due_at = NULL, owner = NULL WHERE event_id = %s AND handler = %s"
            ),
            (letter.attempts, letter.error, letter.event.id, letter.handler),
        )
        if self._history and inserted.rowcount:
            failed_at = letter.failed_at.timestamp()
            self._insert_attempt(
                conn, letter.event.id, letter.handler, letter.attempts, letter.error, failed_at
            )

    def _quarantine(
        self,
        conn: psycopg.Connection[Any],
        event_row: Any,
        handler: str,
        attempts: object,
        why: str,
    ) -> DeadLetter:
        """Inside a claim: a delivery that cannot be run becomes a dead letter saying *why*."""
        letter = self._quarantine_letter(event_row, handler, attempts, why)
        self._insert_dead_letter(conn, letter)
        return letter

    def _stored_event(self, event_id: str) -> Envelope | None:
        """The event's fields as stored, not decoded (the command line shows them)."""
        query = f"SELECT {_EVENT_COLUMNS} FROM {{s}}.events e WHERE e.id = %s"
        rows = self._read(query, (event_id,))
        return Envelope(*rows[0]) if rows else None

    def __repr__(self) -> str:
        return f"<PostgresStore {_safe_dsn(self.dsn)!r} schema={self.schema!r}>"


def _run_all(batch: list[Write[psycopg.Connection[Any]]], conn: psycopg.Connection[Any]) -> None:
    for op in batch:
        _run(op, conn)


def _run(op: Write[psycopg.Connection[Any]], conn: psycopg.Connection[Any]) -> None:
    """Run one queued write inside the batch's transaction. An error aborts the whole
    transaction in PostgreSQL, so it is raised (the batch runner then isolates it)."""
    op.result = op.write(conn)


def _create_schema(
    conn: psycopg.Connection[Any], s: sql.Identifier, name: str, *, create: bool
) -> tuple[str, bool]:
    """Create the schema and tables if missing (one process at a time: an advisory lock),
    bring an older version up to date, stamp the version, and return the store's id and
    whether it has the attempt history (an older store opened without *create* has not).
    ``RuntimeError`` for a newer version, ``ValueError`` for a schema holding other tables
    and none of ours, or (not *create*) for no store at all."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"eventbus:{name}",))
        tables = {
            table
            for (table,) in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                (name,),
            ).fetchall()
        }
        if tables and "meta" not in tables:
            raise ValueError(
                f"schema {name!r} holds tables of something else ({', '.join(sorted(tables))}), "
                "not an eventbus store: pick another schema="
            )
        if "meta" in tables:
            query = sql.SQL("SELECT version, store_id FROM {}.meta").format(s)
            row = conn.execute(query).fetchone()
            if row is not None:
                version, store_id = row
                if version > SCHEMA_VERSION:
                    raise RuntimeError(
                        f"schema {name!r} was written with store schema version {version}; "
                        f"this eventbus reads version {SCHEMA_VERSION}: upgrade eventbus"
                    )
                if version == SCHEMA_VERSION or not create:
                    return cast(str, store_id), "attempts" in tables
        if not create:
            raise ValueError(
                f"no eventbus store in schema {name!r} of database {conn.info.dbname!r}"
            )
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
        for statement in _SCHEMA.split(";"):
            conn.execute(sql.SQL(statement.strip()).format(s=s))
        store_id = new_id()
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.meta (version, store_id) VALUES (%s, %s) "
                "ON CONFLICT (singleton) DO UPDATE SET version = excluded.version "
                "RETURNING store_id"
            ).format(s),
            (SCHEMA_VERSION, store_id),
        )
        row = conn.execute(sql.SQL("SELECT store_id FROM {}.meta").format(s)).fetchone()
        assert row is not None
        return cast(str, row[0]), True


def _safe_dsn(dsn: str) -> str:
    """*dsn* without its password, for messages and reprs."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable dsn>"
    if "password" in params:
        params["password"] = "***"
    return psycopg.conninfo.make_conninfo("", **{k: v for k, v in params.items() if v is not None})
