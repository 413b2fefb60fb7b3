"""PostgreSQL: ``PostgresStore`` beside a raw psycopg loop, and what ``emit(..., within=conn)``
costs the caller's transaction and how soon its handlers start after the commit.

One throw-away PostgreSQL server per scenario, started with ``tests/support/postgres.py``'s
``PostgresServer`` (a free port on 127.0.0.1, a temporary cluster copied from one initdb per
process, ``fsync=off``, run as the unprivileged ``postgres`` user when this process is root);
each scenario makes a fresh database on it and stops the server at its end. Without PostgreSQL
(no ``initdb``/``postgres`` executables), without psycopg, or when the server cannot run as an
unprivileged user, each scenario reports one ``skipped: ...`` row and says so on stderr.

* **PostgresStore, 4 handlers** (events/s): as ``durable (SQLite)`` in ``bench/durable.py``.

  * eventbus: ``EventBus(store=PostgresStore(dsn, schema=S), max_workers=8)``, 4 trivial
    handlers; one thread emits N events back to back (each ``emit()`` timed alone), then the
    clock stops once all 4N handler calls were counted and ``bus.drain()`` returned.
    ``close()`` is reported beside the rate, not in it.
  * raw psycopg loop, commit per attempt (the reference): one thread, one psycopg connection,
    the store's own tables (its ``_SCHEMA``) in a fresh schema and the store's statements, the
    naive write pattern with the same guarantees: per event one transaction inserting the
    event (``RETURNING seq``) and its 4 delivery rows (``executemany``); then per handler a
    committed UPDATE to 'running' (attempts=1), the handler call, a committed UPDATE to
    'succeeded'. 9 commits per event, each ``with conn.transaction():`` (BEGIN ... COMMIT).
  * raw psycopg loop, 1 transaction/event (upper bound, information only).

  Every trial uses a fresh schema, read back afterwards (N events, 4N succeeded deliveries)
  and dropped.

* **emit(within=) round trips**: an application connection (psycopg, not autocommit) runs
  transactions of ``INSERT INTO orders``, ``emit(..., within=conn)`` and a second plain INSERT;
  the bus has the 4 handlers, and each transaction's handlers run before the next begins. The
  libpq trace of the connection (``conn.pgconn.trace``) is split at marker queries: every
  ``Sync`` or simple ``Query`` message the client sends is one round trip. Beside it, untraced,
  the latency of each ``emit(within=)``, of a plain INSERT and of ``SELECT 1`` in the same
  transaction (median): the emit's ratio to ``SELECT 1`` is its cost in round trips.

* **commit -> handler start latency (within=)**: per commit, the time from the caller's
  ``commit()`` returning (the ``with`` block's end) to the first line of the one handler,
  sequentially (each handler run is waited for with a ``threading.Event`` before the next
  transaction). PostgreSQL: a psycopg connection, the bus hears of the commit by
  LISTEN/NOTIFY. SQLite: ``SQLiteStore(path)`` and the application's ``sqlite3`` connection
  to the same file (the store polls every 2 ms while an event it wrote is not yet visible).
  p50 and p99 in ms; the p50 rows' ratio is to 20 ms.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._harness import (
    EVENT_NAME,
    PAYLOAD,
    WAIT_TIMEOUT,
    WORKERS,
    Row,
    Section,
    Sizes,
    Tally,
    make_handlers,
    median,
    percentile,
    server_unavailable,
    skipped_row,
    subscribe_all,
    warn_skipped,
)
from bench.durable import (
    HANDLERS,
    DurableTrial,
    _event_row,
    bus_trial,
    raw_trial,
    run_trials,
    trial_rows,
)

SCENARIO = f"PostgresStore, {HANDLERS} handlers"
LATENCY = "PostgresStore emit() latency {q}, 4 handlers"
EVENTBUS = f"eventbus EventBus(store=PostgresStore, max_workers={WORKERS})"
RAW = "raw psycopg loop, commit per attempt (same guarantees)"
RAW_ONE_TX = "raw psycopg loop, 1 transaction/event (upper bound, NO per-attempt commit)"

ROUND_TRIPS = "emit(within=) round trips"
WITHIN_LATENCY = "emit(within=) latency in the caller's transaction"
COUNTED_EMIT = "eventbus emit(..., within=conn), counted in the libpq trace"
COUNTED_INSERT = "plain INSERT in the same transaction, counted in the libpq trace"
TIMED_EMIT = "eventbus emit(..., within=conn)"
TIMED_INSERT = "plain INSERT in the same transaction"
TIMED_SELECT = "SELECT 1 in the same transaction"

COMMIT_TO_HANDLER = "commit -> handler start latency (within=) {q}"
PG_WITHIN = "eventbus PostgresStore (LISTEN/NOTIFY)"
SQLITE_WITHIN = "eventbus SQLiteStore (polls every 2 ms), same file"
#: What the p50 rows are divided by, in ms.
GOAL_MS = 20.0

NO_SERVER = "PostgreSQL (initdb, postgres) not installed"
NO_PSYCOPG = "psycopg 3 / psycopg-pool not installed"

_CREATE_ORDERS = "CREATE TABLE orders (id bigint PRIMARY KEY, total numeric NOT NULL)"
_INSERT_ORDER = "INSERT INTO orders VALUES (%s, %s)"


# -- the server ----------------------------------------------------------------------------------

_warned: set[str] = set()


def _skipped_row(scenario: str, reason: str) -> Row:
    if reason not in _warned:  # one banner per reason, not one per scenario
        _warned.add(reason)
        warn_skipped(
            "PostgreSQL scenarios",
            reason,
            "Install PostgreSQL (apt-get install postgresql / brew install postgresql@15) and\n"
            "psycopg (pip install 'psycopg[binary]' psycopg-pool) to measure them.",
        )
    return skipped_row(scenario, reason)


def _unavailable() -> str | None:
    """Why no PostgreSQL server can be started here, or None."""
    return server_unavailable(
        ["psycopg", "psycopg_pool"], NO_PSYCOPG, "postgres", "find_postgres_bin", NO_SERVER
    )


@contextlib.contextmanager
def _database() -> Iterator[str]:
    """A fresh database on a throw-away server (call only when :func:`_unavailable` is None)."""
    import pytest

    from tests.support.postgres import PostgresServer, find_postgres_bin

    try:
        server = PostgresServer(find_postgres_bin())
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:  # root, no 'postgres' user
        raise _Unavailable(str(exc)) from None
    with server:
        yield server.create_database()


class _Unavailable(Exception):
    """PostgreSQL is installed but cannot be run here (the message says why)."""


def _with_database(scenario: str, measure: Callable[[str], Section]) -> Section:
    """*measure* on a fresh database, or one *scenario* row saying why not."""
    reason = _unavailable()
    if reason is None:
        try:
            with _database() as dsn:
                return measure(dsn)
        except _Unavailable as exc:
            reason = str(exc)
    return Section([_skipped_row(scenario, reason)])


# -- PostgresStore vs raw psycopg ----------------------------------------------------------------


def _stored_counts(dsn: str, schema: str) -> tuple[int, int]:
    """(events, succeeded deliveries) in *schema*, read on a fresh connection; then the schema
    is dropped."""
    import psycopg
    from psycopg import sql

    s = sql.Identifier(schema)
    with psycopg.connect(dsn, autocommit=True) as conn:
        events, succeeded = conn.execute(
            sql.SQL(
                "SELECT (SELECT count(*) FROM {s}.events), "
                "(SELECT count(*) FROM {s}.deliveries WHERE state = 'succeeded')"
            ).format(s=s)
        ).fetchone() or (0, 0)
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(s))
    return int(events), int(succeeded)


def _eventbus_trial(
    dsn: str, schema: str, tally: Tally, handlers: Sequence[Any], events: int
) -> DurableTrial:
    from eventbus import EventBus
    from eventbus.stores import PostgresStore

    bus = EventBus(
        store=PostgresStore(dsn, schema=schema), max_workers=WORKERS, name="bench-postgres"
    )
    return bus_trial(bus, tally, handlers, events, lambda: _stored_counts(dsn, schema))


@dataclass(frozen=True)
class _Statements:
    """The store's statements with the trial's schema in them (built once, outside the clock)."""

    insert_event: str
    insert_delivery: str
    running: str
    succeeded: str


def _raw_connect(dsn: str, schema: str) -> tuple[Any, _Statements]:
    """A connection (autocommit: each ``conn.transaction()`` is BEGIN ... COMMIT) to a fresh
    schema holding the store's tables, created from the store's own ``_SCHEMA``."""
    import psycopg
    from psycopg import sql

    from eventbus.stores import postgres as store_module

    s = sql.Identifier(schema)
    conn = psycopg.connect(dsn, autocommit=True)
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(s))
        for statement in store_module._SCHEMA.split(";"):
            conn.execute(sql.SQL(statement.strip()).format(s=s))
        conn.execute(
            sql.SQL("INSERT INTO {}.owners VALUES (%s, %s)").format(s), ("bench-raw", time.time())
        )

    def text(statement: str) -> str:
        return sql.SQL(statement).format(s=s).as_string(conn)

    return conn, _Statements(
        text(
            "INSERT INTO {s}.events "
            "(id, name, payload_type, payload, metadata, occurred_at, key, created) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING seq"
        ),
        text(
            "INSERT INTO {s}.deliveries (event_id, handler, seq, state, owner) "
            "VALUES (%s, %s, %s, 'pending', %s)"
        ),
        text(
            "UPDATE {s}.deliveries SET state = 'running', attempts = %s "
            "WHERE event_id = %s AND handler = %s"
        ),
        text(
            "UPDATE {s}.deliveries SET state = 'succeeded', error = NULL, due_at = NULL, "
            "owner = NULL WHERE event_id = %s AND handler = %s"
        ),
    )


def _raw_loop(
    conn: Any, q: _Statements, handlers: Sequence[Any], events: int, *, commit_per_attempt: bool
) -> None:
    """Per event: the event and its deliveries inserted, then per handler a 'running' update,
    the call, a 'succeeded' update. With *commit_per_attempt* (the store's guarantees) the
    inserts and each update are a committed transaction of their own, 9 per event; without (an
    upper bound only) the same statements and calls share one transaction per event."""
    cur = conn.cursor()
    execute, executemany = cur.execute, cur.executemany
    # One of the two is a transaction, the other does nothing.
    each, per_event = (
        (conn.transaction, contextlib.nullcontext)
        if commit_per_attempt
        else (contextlib.nullcontext, conn.transaction)
    )
    names = [f"bench.handler_{i}" for i in range(len(handlers))]
    pairs = list(zip(names, handlers, strict=True))
    ids = itertools.count()
    for _ in range(events):
        event_id = f"raw-{next(ids)}"
        with per_event():
            with each():
                seq = execute(q.insert_event, _event_row(event_id)).fetchone()[0]
                executemany(
                    q.insert_delivery, [(event_id, name, seq, "bench-raw") for name in names]
                )
            for name, handler in pairs:
                with each():
                    execute(q.running, (1, event_id, name))
                handler(PAYLOAD)
                with each():
                    execute(q.succeeded, (event_id, name))


def _raw_trial(
    dsn: str,
    schema: str,
    tally: Tally,
    handlers: Sequence[Any],
    events: int,
    *,
    commit_per_attempt: bool,
) -> DurableTrial:
    conn, q = _raw_connect(dsn, schema)
    return raw_trial(
        lambda: _raw_loop(conn, q, handlers, events, commit_per_attempt=commit_per_attempt),
        conn.close,
        tally,
        events,
        lambda: _stored_counts(dsn, schema),
    )


def store_events(sizes: Sizes) -> int:
    """Events per PostgresStore trial: a tenth of the SQLite scenario's (each event costs 9
    commits over a socket)."""
    return max(20, sizes.durable_events // 10)


def postgres_store(sizes: Sizes) -> Section:
    """events/s with 4 handlers through PostgresStore vs raw psycopg loops, same run."""
    return _with_database(SCENARIO, lambda dsn: _measure_store(dsn, sizes))


def _measure_store(dsn: str, sizes: Sizes) -> Section:
    events = store_events(sizes)
    warmup = max(1, events // 10)
    tally = Tally()
    handlers = make_handlers(tally, HANDLERS)
    schemas = (f"bench_{i}" for i in itertools.count())
    runners: dict[str, Callable[[int], DurableTrial]] = {
        EVENTBUS: lambda n: _eventbus_trial(dsn, next(schemas), tally, handlers, n),
        RAW: lambda n: _raw_trial(dsn, next(schemas), tally, handlers, n, commit_per_attempt=True),
        RAW_ONE_TX: lambda n: _raw_trial(
            dsn, next(schemas), tally, handlers, n, commit_per_attempt=False
        ),
    }
    trials = run_trials("PostgreSQL", runners, events, warmup, sizes.repeats)
    return Section(
        trial_rows(
            trials, events, scenario=SCENARIO, latency=LATENCY, eventbus=EVENTBUS, reference=RAW
        )
    )


# -- emit(within=): round trips and latency ------------------------------------------------------

_START, _MIDDLE, _END = "SELECT 'bench:start'", "SELECT 'bench:middle'", "SELECT 'bench:end'"


def _counting_cursor() -> type:
    """A psycopg cursor class counting the statements executed through it."""
    import psycopg

    class CountingCursor(psycopg.Cursor):  # type: ignore[type-arg]
        statements = 0

        def execute(self, *args: Any, **kwargs: Any) -> Any:
            type(self).statements += 1
            return super().execute(*args, **kwargs)

        def executemany(self, *args: Any, **kwargs: Any) -> Any:
            type(self).statements += 1
            return super().executemany(*args, **kwargs)

    return CountingCursor


def _round_trips(trace: str) -> tuple[list[int], list[int]]:
    """Round trips between the markers of each traced transaction of a libpq trace:
    ([start..middle], [middle..end]), one number per transaction. Each ``Sync`` (extended
    protocol) or ``Query`` (simple protocol) message the client sends ends one round trip; the
    markers' own are not counted."""
    spans: dict[str, list[int]] = {_START: [], _MIDDLE: []}
    open_span: str | None = None
    count = 0
    for line in trace.splitlines():
        direction, _length, message, *rest = [*line.split("\t"), "", "", ""][:4]
        if direction != "F" or message not in ("Sync", "Query"):
            continue
        marker = next((m for m in (_START, _MIDDLE, _END) if rest[0].strip() == f'"{m}"'), None)
        if marker is None:
            count += 1
            continue
        if open_span is not None:
            spans[open_span].append(count)
        open_span = None if marker == _END else marker
        count = 0
    return spans[_START], spans[_MIDDLE]


@dataclass
class _WithinRun:
    emit_trips: list[int] = field(default_factory=list)
    insert_trips: list[int] = field(default_factory=list)
    emit_statements: list[int] = field(default_factory=list)
    emit_ns: list[int] = field(default_factory=list)
    insert_ns: list[int] = field(default_factory=list)
    select_ns: list[int] = field(default_factory=list)
    handled: int = 0
    expected: int = 0
    finished: bool = True


def within_transactions(sizes: Sizes) -> tuple[int, int]:
    """(traced, timed) transactions of the emit(within=) scenarios: 200 and 1,000 at full
    size; the traced count is also the commit -> handler scenario's commits per store."""
    return max(30, sizes.durable_events // 25), max(60, sizes.durable_events // 5)


def within_round_trips(sizes: Sizes) -> Section:
    """Round trips emit(within=) adds to the caller's transaction: counted and timed."""
    return _with_database(ROUND_TRIPS, lambda dsn: _measure_within(dsn, sizes))


def _measure_within(dsn: str, sizes: Sizes) -> Section:
    import psycopg
    from psycopg import pq

    from eventbus import EventBus
    from eventbus.stores import PostgresStore

    counted, timed = within_transactions(sizes)
    warmup = 10  # psycopg prepares a statement on its 5th execution: an extra round trip, once
    tally = Tally()
    bus = EventBus(store=PostgresStore(dsn), max_workers=WORKERS, name="bench-within")
    cursor = _counting_cursor()
    conn = psycopg.connect(dsn, cursor_factory=cursor)
    run = _WithinRun()
    orders = itertools.count()
    try:
        subscribe_all(bus, make_handlers(tally, HANDLERS))
        conn.execute(_CREATE_ORDERS)
        conn.commit()

        def transaction(body: Callable[[], None]) -> None:
            tally.reset(HANDLERS)
            with conn.transaction():
                body()
            run.expected += HANDLERS
            if tally.done.wait(WAIT_TIMEOUT):  # the bus claims and runs it after the commit
                run.handled += HANDLERS
            else:
                run.finished = False

        def traced() -> None:
            conn.execute(_INSERT_ORDER, (next(orders), 9.5))
            conn.execute(_START, prepare=False)  # a Query message carrying its text
            before = cursor.statements
            bus.emit(EVENT_NAME, PAYLOAD, within=conn)
            run.emit_statements.append(cursor.statements - before)
            conn.execute(_MIDDLE, prepare=False)  # a Query message carrying its text
            conn.execute(_INSERT_ORDER, (next(orders), 9.5))
            conn.execute(_END, prepare=False)  # a Query message carrying its text

        clock = time.perf_counter_ns

        def timed_one() -> None:
            conn.execute(_INSERT_ORDER, (next(orders), 9.5))  # the transaction has begun
            t0 = clock()
            bus.emit(EVENT_NAME, PAYLOAD, within=conn)
            t1 = clock()
            conn.execute(_INSERT_ORDER, (next(orders), 9.5))
            t2 = clock()
            conn.execute("SELECT 1")
            t3 = clock()
            run.emit_ns.append(t1 - t0)
            run.insert_ns.append(t2 - t1)
            run.select_ns.append(t3 - t2)

        for _ in range(warmup):
            transaction(timed_one)
        for samples in (run.emit_ns, run.insert_ns, run.select_ns):
            samples.clear()

        with tempfile.TemporaryDirectory(prefix="eventbus-bench-trace-") as directory:
            path = Path(directory) / "libpq.trace"
            with open(path, "wb") as sink:
                conn.pgconn.trace(os.dup(sink.fileno()))  # libpq's FILE* owns the copy
                conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
                try:
                    for _ in range(counted):
                        transaction(traced)
                finally:
                    conn.pgconn.untrace()  # flushes
            run.emit_trips, run.insert_trips = _round_trips(path.read_text(errors="replace"))
        gc.collect()
        for _ in range(timed):
            transaction(timed_one)
    finally:
        conn.close()
        bus.close()
    return _within_rows(run, counted, timed)


def _within_rows(run: _WithinRun, counted: int, timed: int) -> Section:
    if not run.emit_trips or not run.insert_trips:
        raise RuntimeError("the libpq trace holds no marked transaction: cannot count")
    ok = run.finished and run.handled == run.expected and len(run.emit_trips) == counted
    handled = {"handled": run.handled, "expected": run.expected}
    emit_trips = median(run.emit_trips)
    insert_trips = median(run.insert_trips)
    rows = [
        Row(
            ROUND_TRIPS,
            COUNTED_EMIT,
            emit_trips,
            "round trips",
            ratio=emit_trips / insert_trips,
            ratio_to=COUNTED_INSERT,
            samples=[float(n) for n in run.emit_trips],
            ok=ok,
            detail={
                "emits": counted,
                "max": max(run.emit_trips),
                "mean": sum(run.emit_trips) / len(run.emit_trips),
                "statements_median": median(run.emit_statements),
                **handled,
            },
        ),
        Row(
            ROUND_TRIPS,
            COUNTED_INSERT,
            insert_trips,
            "round trips",
            ratio=1.0,
            ratio_to=COUNTED_INSERT,
            samples=[float(n) for n in run.insert_trips],
            ok=ok,
            detail={"inserts": counted, "max": max(run.insert_trips)},
        ),
    ]
    select_us = median(run.select_ns) / 1000
    for name, samples in (
        (TIMED_EMIT, run.emit_ns),
        (TIMED_INSERT, run.insert_ns),
        (TIMED_SELECT, run.select_ns),
    ):
        ordered = sorted(samples)
        value = median(samples) / 1000
        rows.append(
            Row(
                WITHIN_LATENCY,
                name,
                value,
                "us",
                ratio=value / select_us,
                ratio_to=TIMED_SELECT,
                ok=ok,
                detail={
                    "transactions": timed,
                    "p99_us": percentile(ordered, 0.99) / 1000,
                    "min_us": ordered[0] / 1000,
                },
            )
        )
    return Section(rows)


# -- commit -> handler start ---------------------------------------------------------------------


@dataclass
class _CommitLatency:
    #: From commit() returning to the handler's first line, per commit.
    seconds: list[float] = field(default_factory=list)
    #: From commit() being called (the transaction's last statement done) to the same.
    from_call: list[float] = field(default_factory=list)
    handled: int = 0
    expected: int = 0


#: How long one handler may take to start after its commit before the scenario gives up.
COMMIT_WAIT = 10.0


def _commit_latency(
    bus: Any,
    conn: Any,
    transaction: Callable[[], contextlib.AbstractContextManager[Any]],
    orders: tuple[str, str],
    commits: int,
) -> _CommitLatency:
    """On the application's connection *conn* to the bus's database (closed here, and so is
    *bus*): an orders table made with ``orders[0]``, then a few warm-up transactions and
    *commits* sequential ones, each a *transaction* inserting an order (``orders[1]``) and
    emitting within it; for each, the time from its commit returning to the handler's first
    line."""
    create, insert = orders
    arrived = threading.Event()
    started: list[float] = []

    def handler(_event: object) -> None:
        started.append(time.perf_counter())
        arrived.set()

    def commit_one(i: int) -> float:
        with transaction():
            conn.execute(insert, (i, 9.5))
            bus.emit(EVENT_NAME, PAYLOAD, within=conn)
            return time.perf_counter()  # read before leaving the block commits

    try:
        conn.execute(create)
        conn.commit()
        bus.subscribe(EVENT_NAME, handler, name="bench.first_line")
        result = _CommitLatency()
        warmup = 5
        gc.collect()
        for i in range(warmup + commits):
            arrived.clear()
            calling = commit_one(i)
            committed = time.perf_counter()
            if i >= warmup:
                result.expected += 1
            if not arrived.wait(COMMIT_WAIT):
                break  # counted as not handled: the row is flagged
            if i >= warmup:
                result.handled += 1
                result.seconds.append(started[-1] - committed)
                result.from_call.append(started[-1] - calling)
        return result
    finally:
        conn.close()
        bus.close()


def _sqlite_commit_latency(commits: int) -> _CommitLatency:
    from eventbus import EventBus
    from eventbus.stores import SQLiteStore

    with tempfile.TemporaryDirectory(prefix="eventbus-bench-within-") as directory:
        path = Path(directory) / "app.sqlite3"
        bus = EventBus(store=SQLiteStore(path), max_workers=WORKERS, name="bench-sqlite-within")
        db = sqlite3.connect(path)
        orders = (
            "CREATE TABLE orders (id INTEGER PRIMARY KEY, total REAL NOT NULL)",
            "INSERT INTO orders VALUES (?, ?)",
        )
        return _commit_latency(bus, db, lambda: db, orders, commits)


def _postgres_commit_latency(dsn: str, commits: int) -> _CommitLatency:
    import psycopg

    from eventbus import EventBus
    from eventbus.stores import PostgresStore

    bus = EventBus(store=PostgresStore(dsn), max_workers=WORKERS, name="bench-postgres-within")
    conn = psycopg.connect(dsn)
    return _commit_latency(bus, conn, conn.transaction, (_CREATE_ORDERS, _INSERT_ORDER), commits)


def commit_to_handler(sizes: Sizes) -> Section:
    """p50/p99 ms from commit() returning to the handler starting, PostgreSQL and SQLite."""
    commits = within_transactions(sizes)[0]
    p50, p99 = COMMIT_TO_HANDLER.format(q="p50"), COMMIT_TO_HANDLER.format(q="p99")
    measured: dict[str, _CommitLatency] = {}

    def on_postgres(dsn: str) -> Section:
        measured[PG_WITHIN] = _postgres_commit_latency(dsn, commits)
        return Section()

    rows = _with_database(p50, on_postgres).rows  # a skipped row, or none
    measured[SQLITE_WITHIN] = _sqlite_commit_latency(commits)
    for q, scenario in ((0.50, p50), (0.99, p99)):
        for name, result in measured.items():
            ordered = sorted(result.seconds)
            ms = percentile(ordered, q) * 1000
            rows.append(
                Row(
                    scenario,
                    name,
                    ms,
                    "ms",
                    ratio=ms / GOAL_MS if q == 0.50 else None,
                    ratio_to=f"{GOAL_MS:g} ms" if q == 0.50 else None,
                    samples=[s * 1000 for s in result.seconds],
                    ok=result.handled == result.expected == commits,
                    detail={
                        "commits": commits,
                        "handled": result.handled,
                        "expected": result.expected,
                        "min_ms": ordered[0] * 1000 if ordered else math.nan,
                        "max_ms": ordered[-1] * 1000 if ordered else math.nan,
                        # Below 0 when the caller got the CPU (the GIL) back only after the
                        # bus's threads had run the handler; from the commit call, never.
                        "from_commit_call_ms": percentile(sorted(result.from_call), q) * 1000,
                    },
                )
            )
    return Section(rows)
