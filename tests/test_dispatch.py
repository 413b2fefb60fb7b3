"""The worker pool: jobs on worker threads, isolated failures, and shutdown."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from eventbus._dispatch import WorkerPool

TIMEOUT = 5.0
_names = itertools.count()

PoolFactory = Callable[..., WorkerPool]


class _Abort(BaseException):
    """A BaseException that is not an Exception."""


def _threads_named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


@pytest.fixture
def make_pool() -> Iterator[PoolFactory]:
    """Build pools with unique thread names; every pool is shut down after the test."""
    pools: list[WorkerPool] = []

    def make(max_workers: int = 1, **options: Any) -> WorkerPool:
        options.setdefault("name", f"test-pool-{next(_names)}")
        pool = WorkerPool(max_workers, **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown(timeout=TIMEOUT)


def test_jobs_run_on_named_worker_threads(make_pool: PoolFactory) -> None:
    """A job runs on a worker thread named '<name>-worker-<n>', not on the caller's thread."""
    pool = make_pool(2, name="orders")
    done = threading.Event()
    names: list[str] = []

    def job() -> None:
        names.append(threading.current_thread().name)
        done.set()

    pool.submit(job)
    assert done.wait(TIMEOUT)
    assert names[0] in {"orders-worker-0", "orders-worker-1"}


def test_pool_starts_max_workers_threads(make_pool: PoolFactory) -> None:
    """A pool starts exactly max_workers threads."""
    pool = make_pool(3, name="sized")
    assert pool.max_workers == 3
    assert sorted(t.name for t in _threads_named("sized-worker-")) == [
        "sized-worker-0",
        "sized-worker-1",
        "sized-worker-2",
    ]


def test_worker_threads_are_daemons(make_pool: PoolFactory) -> None:
    """Worker threads are daemons, so a forgotten pool cannot hang interpreter exit."""
    make_pool(2, name="daemons")
    threads = _threads_named("daemons-worker-")
    assert len(threads) == 2
    assert all(t.daemon for t in threads)


def test_jobs_run_concurrently_on_separate_workers(make_pool: PoolFactory) -> None:
    """Two jobs that wait for each other both finish on a two-worker pool."""
    pool = make_pool(2)
    barrier = threading.Barrier(2, timeout=TIMEOUT)
    done: list[str] = []
    finished = threading.Semaphore(0)

    def job() -> None:
        barrier.wait()
        done.append(threading.current_thread().name)
        finished.release()

    pool.submit(job)
    pool.submit(job)
    assert finished.acquire(timeout=TIMEOUT)
    assert finished.acquire(timeout=TIMEOUT)
    assert len(set(done)) == 2


def test_single_worker_runs_jobs_in_fifo_order(make_pool: PoolFactory) -> None:
    """With one worker, jobs run in submission order."""
    pool = make_pool(1)
    order: list[int] = []
    done = threading.Event()
    for i in range(20):
        pool.submit(lambda i=i: order.append(i))
    pool.submit(done.set)
    assert done.wait(TIMEOUT)
    assert order == list(range(20))


@pytest.mark.parametrize("max_workers", [True, False, 1.5, "2", None])
def test_max_workers_of_the_wrong_type_is_a_type_error(max_workers: object) -> None:
    """max_workers must be an int (booleans excluded)."""
    with pytest.raises(TypeError, match="max_workers must be an int"):
        WorkerPool(max_workers)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_workers", [0, -1])
def test_max_workers_below_one_is_a_value_error(max_workers: int) -> None:
    """max_workers must be at least 1."""
    with pytest.raises(ValueError, match="max_workers must be at least 1"):
        WorkerPool(max_workers)


def test_raising_job_is_reported_and_the_worker_carries_on(make_pool: PoolFactory) -> None:
    """A job's exception goes to on_error and the same worker runs the next job."""
    errors: list[BaseException] = []
    pool = make_pool(1, on_error=errors.append)
    error = RuntimeError("bug")
    done = threading.Event()

    def failing() -> None:
        raise error

    pool.submit(failing)
    pool.submit(done.set)
    assert done.wait(TIMEOUT)
    assert errors == [error]


def test_base_exception_in_a_job_does_not_kill_the_worker(make_pool: PoolFactory) -> None:
    """A job raising a BaseException is reported too, and the worker survives it."""
    errors: list[BaseException] = []
    pool = make_pool(1, on_error=errors.append)
    done = threading.Event()

    def aborting() -> None:
        raise _Abort

    pool.submit(aborting)
    pool.submit(done.set)
    assert done.wait(TIMEOUT)
    assert [type(e) for e in errors] == [_Abort]


def test_shutdown_returns_jobs_not_started(make_pool: PoolFactory) -> None:
    """shutdown() hands back the queued jobs a busy worker never started."""
    pool = make_pool(1)
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def blocker() -> None:
        started.set()
        release.wait(TIMEOUT)

    pool.submit(blocker)
    assert started.wait(TIMEOUT)
    queued: list[Callable[[], None]] = [lambda i=i: ran.append(i) for i in range(3)]
    for job in queued:
        pool.submit(job)
    try:
        returned = pool.shutdown(timeout=0.01)
    finally:
        release.set()
    assert returned == queued
    pool.shutdown(timeout=TIMEOUT)
    assert ran == []


def test_shutdown_stops_the_workers(make_pool: PoolFactory) -> None:
    """After shutdown() with time to spare, no worker thread is left."""
    pool = make_pool(3, name="stopping")
    assert len(_threads_named("stopping-worker-")) == 3
    assert pool.shutdown(timeout=TIMEOUT) == []
    assert _threads_named("stopping-worker-") == []


def test_shutdown_lets_the_running_job_finish(make_pool: PoolFactory) -> None:
    """A job already running when shutdown() is called runs to completion."""
    pool = make_pool(1)
    started, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def job() -> None:
        started.set()
        release.wait(TIMEOUT)
        finished.append("done")

    pool.submit(job)
    assert started.wait(TIMEOUT)
    release.set()
    pool.shutdown(timeout=TIMEOUT)
    assert finished == ["done"]


def test_shutdown_from_a_worker_does_not_wait_for_itself(make_pool: PoolFactory) -> None:
    """shutdown() called from a job returns instead of joining its own thread."""
    pool = make_pool(1)
    done = threading.Event()
    results: list[list[Callable[[], None]]] = []

    def closing() -> None:
        results.append(pool.shutdown(timeout=None))
        done.set()

    pool.submit(closing)
    assert done.wait(TIMEOUT)
    assert results == [[]]


def test_pool_reports_its_backlog_until_shutdown() -> None:
    """has_backlog() is True while jobs wait for a worker, and False once shutdown began."""
    gate = threading.Event()
    pool = WorkerPool(1, name="backlog")
    try:
        pool.submit(lambda: gate.wait(5))
        pool.submit(lambda: None)  # waits behind the held job
        assert pool.has_backlog()
    finally:
        gate.set()
        pool.shutdown(5)
    assert not pool.has_backlog()


def test_submit_copies_queues_one_job_per_copy() -> None:
    """submit_copies(job, n) runs the job n times, as n submits would."""
    ran = itertools.count()
    done = threading.Event()

    def job() -> None:
        if next(ran) == 2:
            done.set()

    pool = WorkerPool(2, name="copies")
    try:
        pool.submit_copies(job, 3)
        assert done.wait(5)
    finally:
        pool.shutdown(5)
