"""Running one attempt: call the handler and turn whatever happens into an outcome.

This is the seam where an attempt's policies plug in (a timeout, an async handler on an event
loop, a tracing span around the call): each wraps :func:`run_attempt` and still returns an
outcome, so the pipeline around it does not change. Nothing here logs, counts or retries.
"""

from __future__ import annotations

from eventbus._event import Event
from eventbus.typing import Handler

__all__ = ["run_attempt"]


def run_attempt(handler: Handler, event: Event) -> BaseException | None:
    """Call *handler* with *event*; return the exception it raised (any ``BaseException``:
    isolation is total), or ``None`` if it returned. Never raises; blocks as long as the
    handler runs."""
    try:
        handler(event)
    except BaseException as error:  # noqa: BLE001 - isolation: nothing reaches the caller
        return error
    return None
