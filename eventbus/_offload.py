"""Blocking work awaited from an event loop without blocking it: store commits and transport
publishes of ``aemit()`` and of async deliveries, and the waits of ``adrain()``/``aclose()``.

Not the loop's default executor: its threads belong to the application (and outlive a test's
bus), and ``aclose()`` must not wait for itself on a pool it is shutting down. Both helpers run
the function in a copy of the caller's context, as ``asyncio.to_thread`` does, so structlog's
bound variables reach the records written there.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["Offload", "in_thread"]

T = TypeVar("T")

#: Threads of a bus's offload pool: enough for a few concurrent commits; each waits on I/O.
OFFLOAD_THREADS = 4


class Offload:
    """A small thread pool for one bus, started on first use and joined by :meth:`shutdown`.
    Thread-safe."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], /, *args: object) -> T:
        """Await ``fn(*args)`` run on the pool; raises what it raises."""
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await loop.run_in_executor(self._get(), call)

    def _get(self) -> ThreadPoolExecutor:
        pool = self._pool
        if pool is None:
            with self._lock:
                pool = self._pool
                if pool is None:
                    pool = self._pool = ThreadPoolExecutor(
                        OFFLOAD_THREADS, thread_name_prefix=f"{self._name}-offload"
                    )
        return pool

    def shutdown(self) -> None:
        """Wait for work in progress, then stop the threads. Not from one of them."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


async def in_thread(fn: Callable[..., T], /, *args: object, name: str) -> T:
    """Await ``fn(*args)`` run on a new daemon thread called *name*. If the awaiting task is
    cancelled, the thread still runs to its end; its result is dropped."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def work() -> None:
        try:
            result = context.run(fn, *args)
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
            _hand_over(loop, future, error, None)
        else:
            _hand_over(loop, future, None, result)

    threading.Thread(target=work, name=name, daemon=True).start()
    return await future


def _hand_over(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[T],
    error: BaseException | None,
    result: T | None,
) -> None:
    def settle() -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody awaits it
        loop.call_soon_threadsafe(settle)
