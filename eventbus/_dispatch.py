"""Executors: where deliveries run. A pool of worker threads, and an inline one for tests."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from queue import Empty, SimpleQueue

__all__ = ["InlineExecutor", "Job", "RetireWorker", "WorkerPool"]

#: One unit of work handed to an executor.
Job = Callable[[], None]


class RetireWorker(Exception):
    """Raised by a job to end the worker thread running it, once the pool has replaced it
    (its handler outlived a timeout and its place was given to a fresh thread)."""


class WorkerPool:
    """``max_workers`` daemon threads taking jobs from one unbounded FIFO queue. Thread-safe.

    Deliberately not a ``concurrent.futures.ThreadPoolExecutor``: it allocates a ``Future`` and a
    work item per call, several times the cost of a plain queue hand-off, and the bus keeps its
    own records so it needs no futures. A job that raises is reported to ``on_error`` and the
    worker carries on. The threads are daemons so a forgotten bus cannot hang interpreter exit;
    open buses are closed by an ``atexit`` hook instead (see ``EventBus``).
    """

    def __init__(
        self,
        max_workers: int,
        *,
        name: str = "eventbus",
        on_error: Callable[[BaseException], None] = lambda exc: None,
    ) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int, got {max_workers!r}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers!r}")
        self._queue: SimpleQueue[Job | None] = SimpleQueue()
        self._on_error = on_error
        self._stopping = False
        self._name = name
        self._lock = threading.Lock()  # the thread list, changed by replace()
        self._started = 0
        self._threads = [self._new_thread() for _ in range(max_workers)]
        for thread in self._threads:
            thread.start()

    def _new_thread(self) -> threading.Thread:
        self._started += 1
        name = f"{self._name}-worker-{self._started - 1}"
        return threading.Thread(target=self._work, name=name, daemon=True)

    @property
    def max_workers(self) -> int:
        """Live workers: always the number asked for (a stuck one is replaced)."""
        return len(self._threads)

    def replace(self, stuck: threading.Thread) -> bool:
        """Start a worker in place of *stuck* (whose handler outlived its timeout), so the
        pool keeps its size; *stuck* leaves when its job raises :class:`RetireWorker`. False
        if *stuck* is not one of the pool's workers (or the pool is shutting down)."""
        with self._lock:
            if self._stopping or stuck not in self._threads:
                return False
            fresh = self._new_thread()
            self._threads[self._threads.index(stuck)] = fresh
        fresh.start()
        return True

    def submit(self, job: Job) -> None:
        """Queue *job* for a worker. Never blocks."""
        self._queue.put(job)

    def submit_copies(self, job: Job, copies: int) -> None:
        """Queue *job* *copies* times (one per delivery of an event). Never blocks."""
        put = self._queue.put
        for _ in range(copies):
            put(job)

    def has_backlog(self) -> bool:
        """Whether jobs are queued and not yet taken by a worker (a snapshot). False once
        :meth:`shutdown` began: what is queued then is the workers' stop signals."""
        return not self._stopping and not self._queue.empty()

    def shutdown(self, timeout: float | None) -> list[Job]:
        """Take back the jobs not yet started, stop the workers once their current job ends,
        and wait up to *timeout* seconds for that. Returns the jobs taken back."""
        with self._lock:
            self._stopping = True
        not_started: list[Job] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except Empty:
                break
            if job is not None:
                not_started.append(job)
        for _ in self._threads:
            self._queue.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        current = threading.current_thread()
        for thread in self._threads:
            if thread is current:  # closing from a handler: this worker stops after it returns
                continue
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not_started

    def _work(self) -> None:
        get = self._queue.get
        while True:
            job = get()
            if job is None:
                return
            try:
                job()
            except RetireWorker:
                return
            except BaseException as exc:  # noqa: BLE001 - a worker must outlive any job
                _report(self._on_error, exc)


def _report(on_error: Callable[[BaseException], None], error: BaseException) -> None:
    # The reporter logs; if logging itself is broken, the thread must still survive.
    with contextlib.suppress(BaseException):
        on_error(error)


class _Pending(threading.local):
    jobs: deque[Job] | None = None  # a class default: reading it costs no exception


class InlineExecutor:
    """Runs each job on the submitting thread before ``submit()`` returns: for tests.

    A job submitted from inside a running job (a handler that emits, a retry that comes due)
    is queued and runs when the current one finishes, so chains never recurse and run in the
    same breadth-first order as on a pool. If a job raises (a bug in eventbus, since deliveries
    catch everything), the remaining jobs still run and the first error is re-raised.
    """

    def __init__(self) -> None:
        self._local = _Pending()

    def submit(self, job: Job) -> None:
        local = self._local
        pending = local.jobs
        if pending is not None:
            pending.append(job)
            return
        pending = local.jobs = deque([job])
        first_error: BaseException | None = None
        try:
            while pending:
                try:
                    pending.popleft()()
                except BaseException as exc:  # noqa: BLE001 - finish the rest, then re-raise
                    first_error = first_error or exc
        finally:
            local.jobs = None
        if first_error is not None:
            raise first_error

    def shutdown(self, timeout: float | None) -> list[Job]:
        return []
