"""Timing attempts: a handler's ``timeout`` and ``stall_warning``.

Both are timers on the bus's clock, started with the attempt and cancelled when it ends, so an
attempt that ends in time costs two timer entries and nothing else. Whichever of the attempt's
end and its timeout comes first wins (:class:`~eventbus._policies.AttemptWatch`):

* a thread cannot be stopped, so on a timeout the attempt is failed at once with
  ``HandlerTimeoutError``, the pool starts a worker in the stuck one's place (its capacity never
  drops), and when the handler returns at last its result is logged as ``handler.late_result``
  and dropped, and that thread leaves the pool;
* a task can: it is cancelled on its own loop, where the attempt's end is decided too, so
  there is no race between the two.

A stall warning only reports (once per attempt): ``handler.stalled`` with the stack where the
attempt is stuck, and the ``handler_stalled`` signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from eventbus._dispatch import WorkerPool
from eventbus._policies import AttemptWatch
from eventbus.exceptions import HandlerTimeoutError

if TYPE_CHECKING:
    from eventbus._observe import Observer
    from eventbus._records import Dispatch
    from eventbus.typing import Cancellable, Clock, Executor

__all__ = ["Watchdog", "Watched", "timeout_error"]

#: Called with the delivery and the error when a thread's attempt times out.
TimedOut = Callable[["Dispatch", int, HandlerTimeoutError], None]


def timeout_error(handler: str, seconds: float) -> HandlerTimeoutError:
    return HandlerTimeoutError(f"{handler} did not finish within its timeout of {seconds:g} s")


class Watched:
    """One attempt being timed."""

    __slots__ = ("replaced", "timers", "watch")

    def __init__(self) -> None:
        self.watch = AttemptWatch()
        self.timers: list[Cancellable] = []
        self.replaced = False  # its worker thread was replaced: it must leave the pool

    def end(self) -> bool:
        """The attempt returned: stop its timers; False if its timeout came first."""
        for timer in self.timers:
            timer.cancel()
        return self.watch.finish()


class Watchdog:
    """Starts the timers of watched attempts. Thread-safe."""

    def __init__(
        self, clock: Clock, observer: Observer, executor: Executor, timed_out: TimedOut
    ) -> None:
        self._clock = clock
        self._observer = observer
        self._pool = executor if isinstance(executor, WorkerPool) else None
        self._timed_out = timed_out

    def watch_thread(self, dispatch: Dispatch, index: int) -> Watched:
        """Time an attempt running on the calling thread."""
        watched = Watched()
        thread = threading.current_thread()
        policy = dispatch.subs[index].policy
        assert policy is not None
        clock = self._clock
        if policy.timeout is not None:

            def on_timeout() -> None:
                if not watched.watch.time_out():
                    return
                if self._pool is not None and self._pool.replace(thread):
                    watched.replaced = True
                name = dispatch.subs[index].name
                self._timed_out(dispatch, index, timeout_error(name, policy.timeout or 0.0))

            watched.timers.append(clock.call_later(policy.timeout, on_timeout))
        if policy.stall_warning is not None:
            self._watch_stall(
                watched,
                dispatch,
                index,
                policy.stall_warning,
                where=thread.name,
                stack=lambda: _thread_stack(thread),
            )
        return watched

    def watch_task(self, dispatch: Dispatch, index: int) -> Watched:
        """Time an attempt running in the current task."""
        watched = Watched()
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        policy = dispatch.subs[index].policy
        assert policy is not None
        clock = self._clock
        if policy.timeout is not None:

            def cancel() -> None:  # on the loop, where the attempt's end is decided too
                if watched.watch.time_out():
                    task.cancel()

            watched.timers.append(clock.call_later(policy.timeout, lambda: _on_loop(loop, cancel)))
        if policy.stall_warning is not None:
            self._watch_stall(
                watched,
                dispatch,
                index,
                policy.stall_warning,
                where=task.get_name(),
                stack=lambda: _task_stack(task),
            )
        return watched

    def _watch_stall(
        self,
        watched: Watched,
        dispatch: Dispatch,
        index: int,
        seconds: float,
        *,
        where: str,
        stack: Callable[[], str],
    ) -> None:
        """Report the attempt once if it still runs *seconds* from now (*stack* says where,
        read only then)."""
        clock = self._clock
        started = clock.monotonic()

        def on_stall() -> None:
            if watched.watch.running:
                elapsed = clock.monotonic() - started
                self._observer.stalled(
                    dispatch.event, dispatch.snapshot(index), elapsed, where=where, stack=stack()
                )

        watched.timers.append(clock.call_later(seconds, on_stall))


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed: its tasks were cancelled
        loop.call_soon_threadsafe(callback)


def _thread_stack(thread: threading.Thread) -> str:
    frame = sys._current_frames().get(thread.ident or 0)
    if frame is None:
        return ""
    return "".join(traceback.format_stack(frame))


def _task_stack(task: asyncio.Task[object]) -> str:
    # Down the chain of awaits: Task.get_stack() stops at the task's own coroutine, which is
    # eventbus's, not where the handler waits.
    frames = []
    awaitable: Any = task.get_coro()
    while awaitable is not None:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
        if frame is None:
            break
        frames.append((frame, frame.f_lineno))
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
    return "".join(traceback.StackSummary.extract(iter(frames)).format())
