"""Where ``async def`` handlers run: as tasks on one event loop, at most ``max_async`` at once.

A bus is *bound* to the application's loop by ``astart()`` (or ``async with bus``). A bus
never bound, or whose loop has closed, starts a loop of its own on a daemon thread the first
time an async delivery needs one, and stops and closes it in ``close()``.

Jobs reach a loop through an inbox (a deque: appending is atomic, so any thread may submit)
and one ``call_soon_threadsafe`` wake-up per batch rather than per job, since each wake-up
writes to the loop's self-pipe. The inbox is also the waiting line of the ``max_async``
bound, and what ``close()`` takes back: a job handed to a loop that stops before running it
is still found there, never lost with the loop's callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from eventbus._records import PENDING, STATE_MASK
from eventbus.exceptions import EventLoopError

if TYPE_CHECKING:
    from eventbus._records import Dispatch, RetryJob

__all__ = ["CANCEL_GRACE", "MAX_ASYNC", "EventLoops", "LoopRunner"]

#: The default ``max_async``: async deliveries running at once on a bus's event loop.
MAX_ASYNC = 1000

#: Seconds ``close()`` gives cancelled async deliveries to finish their cancellation.
CANCEL_GRACE = 1.0

Run = Callable[["Dispatch", int], Coroutine[Any, Any, None]]
Cancelled = Callable[["Dispatch", int], None]


class LoopRunner:
    """Runs async delivery jobs as tasks on one event loop, at most *limit* at once.

    :meth:`submit` is thread-safe and never blocks; :meth:`shutdown` is called from a thread
    other than the loop's. Everything else runs on the loop's thread.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        limit: int,
        run: Run,
        cancelled: Cancelled,
        on_error: Callable[[BaseException], None],
        thread: threading.Thread | None = None,
    ) -> None:
        self.loop = loop
        self.thread = thread  # the loop's own thread, when the bus owns the loop
        self._limit = limit
        self._run = run
        self._cancelled = cancelled
        self._on_error = on_error
        self._inbox: deque[RetryJob] = deque()
        self._tasks: dict[asyncio.Task[None], RetryJob] = {}
        self._wake_pending = False
        self._stopped = False

    @property
    def owned(self) -> bool:
        return self.thread is not None

    def usable(self) -> bool:
        """Whether the loop can still run jobs (an application's loop may have closed)."""
        return not self.loop.is_closed()

    def submit(self, job: RetryJob) -> bool:
        """Queue *job*; False if the loop is closed (the job was not taken)."""
        loop = self.loop
        self._inbox.append(job)
        if asyncio._get_running_loop() is loop:
            self._pump()
            return True
        # Cleared by _pump before it drains the inbox, so a job appended after that drain
        # always finds it cleared and wakes the loop again.
        if not self._wake_pending:
            self._wake_pending = True
            try:
                loop.call_soon_threadsafe(self._pump)
            except RuntimeError:  # the loop closed
                self._wake_pending = False
                with contextlib.suppress(ValueError):
                    self._inbox.remove(job)
                    return False
        return True

    def has_backlog(self) -> bool:
        return bool(self._inbox)

    def _pump(self) -> None:
        self._wake_pending = False
        inbox = self._inbox
        tasks = self._tasks
        while inbox and len(tasks) < self._limit and not self._stopped:
            self._start(inbox.popleft())

    def _start(self, job: RetryJob) -> None:
        dispatch, index = job.dispatch, job.index
        context = dispatch.context_of(index)
        assert context is not None  # an unsettled delivery's context is kept
        # The delivery's own copy of the emitter's context, as on a worker thread.
        task = self.loop.create_task(self._run(dispatch, index), context=context.copy())
        self._tasks[task] = job
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        job = self._tasks.pop(task)
        if task.cancelled():
            # Cancelled before its first step (the loop shut down, or close() cancelled it
            # while queued): the attempt never began, so nothing settled it.
            if job.dispatch.progress[job.index] & STATE_MASK == PENDING:
                self._cancelled(job.dispatch, job.index)
        else:
            error = task.exception()
            if error is not None:  # the attempt catches everything: a bug in eventbus
                self._on_error(error)
        if self._inbox:
            self._pump()

    async def idle(self) -> None:
        """Return once no job is queued or running on this loop (jobs added meanwhile
        included). On the loop's thread."""
        while self._tasks or (self._inbox and not self._stopped):
            if not self._tasks:
                self._pump()
                continue
            await asyncio.wait(list(self._tasks))

    def shutdown(self) -> list[RetryJob]:
        """Cancel the running deliveries (each settles itself as abandoned), stop starting new
        ones, and take back the jobs never started; an owned loop is then stopped and closed.
        Blocks up to about :data:`CANCEL_GRACE` seconds for the cancellations."""
        loop = self.loop
        if loop.is_running() and not loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self._cancel_all(), loop)
            with contextlib.suppress(Exception):
                future.result(CANCEL_GRACE * 2)
        self._stopped = True
        not_started: list[RetryJob] = []
        while self._inbox:
            not_started.append(self._inbox.popleft())
        if not loop.is_running():
            # The application's loop ended without cancelling them: they never ran to an end.
            for task, job in list(self._tasks.items()):
                if task.done():
                    continue
                del self._tasks[task]
                not_started.append(job)
        if self.thread is not None:
            self._stop_owned(self.thread)
        return not_started

    async def _cancel_all(self) -> None:
        self._stopped = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CANCEL_GRACE)

    def _stop_owned(self, thread: threading.Thread) -> None:
        loop = self.loop
        with contextlib.suppress(RuntimeError):  # already closed
            loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join()
        if not loop.is_running():
            loop.close()

    @classmethod
    def start_owned(
        cls, name: str, *, limit: int, run: Run, cancelled: Cancelled,
        on_error: Callable[[BaseException], None],
    ) -> LoopRunner:  # fmt: skip
        """A runner on a new event loop, run by a new daemon thread called *name*."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_serve, args=(loop,), name=name, daemon=True)
        runner = cls(
            loop, limit=limit, run=run, cancelled=cancelled, on_error=on_error, thread=thread
        )
        thread.start()
        return runner


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


class EventLoops:
    """The event loops one bus's async deliveries run on: the loop it is bound to, or one of
    its own. Thread-safe."""

    def __init__(
        self,
        *,
        name: str,
        limit: int,
        run: Run,
        cancelled: Cancelled,
        on_error: Callable[[BaseException], None],
    ) -> None:
        self._name = name
        self._limit = limit
        self._run = run
        self._cancelled = cancelled
        self._on_error = on_error
        self._lock = threading.Lock()
        self._current: LoopRunner | None = None
        self._retired: list[LoopRunner] = []  # earlier loops: they finish what they hold
        self._closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run async deliveries queued from now on on *loop*. Raises ``EventLoopError`` if the
        bus is bound to another loop that is still running."""
        with self._lock:
            current = self._current
            if current is not None:
                if current.loop is loop:
                    return
                if not current.owned and current.loop.is_running():
                    raise EventLoopError(
                        "this bus is bound to another running event loop; a bus serves one "
                        "loop at a time"
                    )
                self._retired.append(current)
            self._current = self._runner(loop)

    def _runner(self, loop: asyncio.AbstractEventLoop) -> LoopRunner:
        return LoopRunner(
            loop,
            limit=self._limit,
            run=self._run,
            cancelled=self._cancelled,
            on_error=self._on_error,
        )

    def has_runner(self) -> bool:
        """Whether async deliveries ever had a loop here (else there is nothing to wait for)."""
        return self._current is not None

    def bound_to(self, loop: asyncio.AbstractEventLoop | None) -> bool:
        """Whether *loop* is the application's loop this bus is bound to."""
        current = self._current
        return loop is not None and current is not None and current.loop is loop

    def runner(self) -> LoopRunner:
        """The runner for new async deliveries: the bound loop's, else (starting it if need
        be) the bus's own."""
        current = self._current
        if current is not None and current.usable() and not self._closed:
            return current
        with self._lock:
            if self._closed:
                raise EventLoopError("the bus is closed: its event loops are shut down")
            current = self._current
            if current is None or not current.usable():
                if current is not None:
                    self._retired.append(current)
                current = self._current = LoopRunner.start_owned(
                    f"{self._name}-loop",
                    limit=self._limit,
                    run=self._run,
                    cancelled=self._cancelled,
                    on_error=self._on_error,
                )
            return current

    def submit(self, job: RetryJob) -> None:
        """Queue an async delivery. Thread-safe; never blocks. After :meth:`shutdown` (the
        bus closed), the delivery is settled as abandoned instead."""
        while True:
            try:
                runner = self.runner()
            except EventLoopError:  # closed
                self._cancelled(job.dispatch, job.index)
                return
            if runner.submit(job):
                return
            # The loop closed just now: runner() moves on to a loop of the bus's own.

    def has_backlog(self) -> bool:
        current = self._current
        return current is not None and current.has_backlog()

    async def idle(self) -> None:
        """Return once the current loop runs and queues no async delivery; awaitable from
        any loop."""
        current = self._current
        if current is None:
            return
        if current.loop is asyncio.get_running_loop():
            await current.idle()
        else:
            idle = asyncio.run_coroutine_threadsafe(current.idle(), current.loop)
            await asyncio.wrap_future(idle)

    def shutdown(self) -> list[RetryJob]:
        """Cancel what still runs, stop and close the bus's own loop, and take back the jobs
        never started (see :meth:`LoopRunner.shutdown`)."""
        with self._lock:
            self._closed = True
            runners = [*self._retired, *([self._current] if self._current else [])]
            self._retired = []
            self._current = None
        not_started: list[RetryJob] = []
        for runner in runners:
            not_started += runner.shutdown()
        return not_started
