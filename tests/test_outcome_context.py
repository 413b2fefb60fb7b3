"""The bus's own outcome records carry the emitter's structlog context (e.g. a request id), so
one grep for the request id finds the handlers' lines and the bus's lines alike."""

from __future__ import annotations

import structlog
import tenacity
from structlog.contextvars import bind_contextvars, clear_contextvars
from structlog.testing import capture_logs

from eventbus import Event, RetryPolicy
from eventbus.testing import inline_bus


def _records_with_context() -> list[dict[str, object]]:
    bus, clock = inline_bus(retry=RetryPolicy(max_attempts=2, wait=tenacity.wait_fixed(1)))
    attempts: list[int] = []

    @bus.on("order:created")
    def flaky(event: Event) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("down")

    # capture_logs drops configured processors; merge_contextvars is what an app would add.
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as records:
        bind_contextvars(request_id="req-7")
        try:
            bus.emit("order:created")
        finally:
            clear_contextvars()
        clock.advance(1)  # the retry runs outside any request: it keeps the emitter's context
    bus.close()
    return records


def test_handler_outcome_records_carry_the_emitters_request_id():
    """handler.failed, retry_scheduled and succeeded records all carry the emitter's binding."""
    records = _records_with_context()
    outcomes = {r["event"]: r for r in records if str(r["event"]).startswith("handler.")}
    assert set(outcomes) == {"handler.failed", "handler.retry_scheduled", "handler.succeeded"}
    assert {r.get("request_id") for r in outcomes.values()} == {"req-7"}
