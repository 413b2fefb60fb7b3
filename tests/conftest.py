"""Shared fixtures: every bus a test makes is closed when the test ends, and no thread it
started is left running; the real redis-servers, PostgreSQL and RabbitMQ servers and child
processes of the integration and multi-process tests (see tests/support/)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from eventbus import EventBus, RetryPolicy
from eventbus.testing import FakeClock, inline_bus
from tests.support.children import Children
from tests.support.postgres import PostgresServer
from tests.support.rabbitmq import RabbitMQServer
from tests.support.redis import RedisServer

#: How long a thread a test started may take to end after the test (and its fixtures) did.
THREAD_GRACE = 2.0
#: Threads of the library and of the benchmarks: daemons, but they must not outlive a test.
WATCHED_PREFIXES = ("eventbus-", "bench-")


@pytest.fixture(autouse=True)
def _no_thread_left_running() -> Iterator[None]:
    """Fails the test if a thread it started is still alive after it and its fixtures ended:
    any non-daemon thread, and the library's and benchmarks' threads (``eventbus-*``,
    ``bench-*``) even as daemons; a bus left open is the usual cause. Each gets up to
    THREAD_GRACE seconds to end (joined, not slept on). Defined first, so that its teardown
    runs after every other function-scoped fixture's."""
    before = set(threading.enumerate())
    yield
    started = [t for t in threading.enumerate() if t not in before]
    watched = [t for t in started if not t.daemon or t.name.startswith(WATCHED_PREFIXES)]
    deadline = time.monotonic() + THREAD_GRACE
    for thread in watched:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = [t for t in watched if t.is_alive()]
    if alive:
        names = ", ".join(f"{t.name} ({'daemon' if t.daemon else 'non-daemon'})" for t in alive)
        pytest.fail(
            f"{len(alive)} thread(s) started by the test still running {THREAD_GRACE} s after "
            f"it ended: {names} (a bus or transport not closed?)",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """Each test starts from structlog's defaults, whatever an earlier test configured."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (``@pytest.mark.anyio``, anyio's pytest plugin) run on asyncio."""
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock: backoffs run only when the test advances it."""
    return FakeClock()


@pytest.fixture
def bus(clock: FakeClock) -> Iterator[EventBus]:
    """A bus on 4 real worker threads whose retries wait on the fake clock."""
    with EventBus(max_workers=4, clock=clock, retry=RetryPolicy(max_attempts=3)) as b:
        yield b


@pytest.fixture
def inline() -> Iterator[tuple[EventBus, FakeClock]]:
    """A bus that runs handlers on the test's thread, with its fake clock."""
    b, c = inline_bus()
    yield b, c
    b.close()


# -- child processes and real redis-servers ---------------------------------------------------


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    """Starts child processes read by lines (tests/support/children.py); every one still
    running is killed and reaped when the test ends, and its pipes closed."""
    started = Children(tmp_path)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole session (skipped without one, failed under CI): tests
    sharing it use names of their own."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL."""
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A fresh redis-server of the test's own (skipped without one, failed under CI), which
    the test may stop, restart or pause; stopped at the end."""
    with RedisServer() as server:
        yield server


# -- real PostgreSQL servers ------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session (skipped without one, failed under CI):
    tests sharing it use databases of their own (``postgres_dsn``)."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """The connection string of a fresh, empty database of the session server, the test's
    own (left behind: the server and its data go at the end of the session)."""
    return postgres_server.create_database()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A fresh PostgreSQL server of the test's own (skipped without one, failed under CI),
    which the test may stop, kill and restart; stopped and removed at the end."""
    with PostgresServer() as server:
        yield server


# -- real RabbitMQ servers --------------------------------------------------------------------


@pytest.fixture(scope="session")
def rabbitmq_server() -> Iterator[RabbitMQServer]:
    """One RabbitMQ server for the whole session (skipped without one, failed under CI): tests
    sharing it use exchange and queue names of their own."""
    with RabbitMQServer() as server:
        yield server


@pytest.fixture
def rabbitmq_url(rabbitmq_server: RabbitMQServer) -> str:
    """The session server's AMQP URL (``guest``, the default virtual host)."""
    return rabbitmq_server.url


@pytest.fixture
def own_rabbitmq() -> Iterator[RabbitMQServer]:
    """A fresh RabbitMQ server of the test's own (skipped without one, failed under CI), which
    the test may stop, kill and restart; stopped and removed at the end."""
    with RabbitMQServer() as server:
        yield server
