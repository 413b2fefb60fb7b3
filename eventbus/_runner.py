"""Running one attempt: call the handler and turn whatever happens into an outcome.

This is the seam where an attempt's policies plug in (a timeout, a tracing span around the
call): each wraps :func:`run_attempt` or :func:`arun_attempt` and still returns an outcome, so
the pipeline around it does not change. Nothing here logs, counts or retries.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable

from eventbus._event import Event
from eventbus.exceptions import InvalidHandlerError
from eventbus.typing import Handler

__all__ = ["arun_attempt", "run_attempt"]


def run_attempt(handler: Handler, event: Event) -> BaseException | None:
    """Call *handler* with *event*; return the exception it raised (any ``BaseException``:
    isolation is total), or ``None`` if it returned. Never raises; blocks as long as the
    handler runs.

    A handler that returns an awaitable (a plain function returning a coroutine, or a lambda
    around an ``async def``) did none of its work: the attempt fails with an
    ``InvalidHandlerError`` saying so, and a coroutine is closed, so it never warns "never
    awaited" at some random later point.
    """
    try:
        result = handler(event)
    except BaseException as error:  # noqa: BLE001 - isolation: nothing reaches the caller
        return error
    if result is not None and inspect.isawaitable(result):
        return _returned_awaitable(handler, result)
    return None


async def arun_attempt(
    handler: Handler, event: Event, timed_out: Callable[[], bool] | None = None
) -> BaseException | None:
    """Await the ``async def`` *handler* with *event*; return the exception it raised, or
    ``None``. Must run in the delivery's own task.

    A ``CancelledError`` that did not come from cancelling this task (the handler awaited
    something that was cancelled) is a failure like any other. One that did (the bus closing
    past its timeout, the event loop shutting down) is raised: the delivery did not fail, it
    was stopped, and the caller settles it as such. Unless *timed_out* says the cancellation
    was the handler's timeout: then it is withdrawn and returned, for the caller to turn into
    the timeout's error.
    """
    try:
        await handler(event)  # type: ignore[misc]  # an async handler's result is awaitable
    except asyncio.CancelledError as error:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            if timed_out is not None and timed_out() and task.uncancel() == 0:
                return error
            raise
        return error
    except BaseException as error:  # noqa: BLE001 - isolation: nothing reaches the caller
        return error
    return None


def _returned_awaitable(handler: Handler, result: object) -> InvalidHandlerError:
    close = getattr(result, "close", None)
    if inspect.iscoroutine(result) and callable(close):
        close()
    return InvalidHandlerError(
        f"the handler returned {type(result).__name__} object instead of running: it is a "
        "plain function, so eventbus does not await what it returns; declare it `async def` "
        "(or await the coroutine inside it)"
    )
