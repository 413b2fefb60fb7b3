"""The app factory: one bus, its handlers, the routes, and a lifespan that binds the bus to
the server's event loop.

The lifespan is the whole of the asyncio wiring::

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await bus.astart()  # async handlers now run on this loop
        try:
            yield  # the app serves requests
        finally:
            await bus.aclose(timeout=close_timeout)  # finish what runs, then stop

(``async with bus: yield`` does the same, with no bound on how long closing may take.)
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final

import structlog
import tenacity
from fastapi import FastAPI, Request, Response

from eventbus import EventBus, RetryPolicy
from examples.fastapi_orders.api import build_router
from examples.fastapi_orders.fakes import Services
from examples.fastapi_orders.handlers import HANDLERS, register_handlers
from examples.fastapi_orders.orders import OrderRepository

__all__ = ["DEFAULT_RETRY", "MAX_ASYNC", "MAX_BODY_BYTES", "create_app", "default_bus"]

#: Two attempts, 0.2 s apart: a failing handler reaches the dead letters within a second.
DEFAULT_RETRY: Final = RetryPolicy(max_attempts=2, wait=tenacity.wait_fixed(0.2))
#: At most this many async deliveries run at once on the event loop.
MAX_ASYNC: Final = 1000
#: The fakes' latency in seconds when the app builds its own: long enough for
#: ``GET /orders/{id}`` right after ``POST /orders`` to show deliveries still running.
FAKE_LATENCY: Final = 0.05
#: The largest request body the API reads; an order of 50 lines, the most it may have, is
#: about 4 KiB.
MAX_BODY_BYTES: Final = 64 * 1024
#: A client's ``X-Request-ID`` is used (and logged) only if it looks like this.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("fastapi_orders")


def default_bus() -> EventBus:
    """The bus the app builds when given none: 4 worker threads for the sync handlers, up to
    :data:`MAX_ASYNC` async deliveries at once, and :data:`DEFAULT_RETRY`."""
    return EventBus(max_workers=4, max_async=MAX_ASYNC, retry=DEFAULT_RETRY)


def create_app(
    bus: EventBus | None = None,
    *,
    services: Services | None = None,
    close_timeout: float = 10.0,
) -> FastAPI:
    """The orders API over *bus* (default: :func:`default_bus`), whose handlers talk to
    *services* (default: fakes with a little latency).

    The handlers are subscribed to *bus* here, so a bus serves one app. The app owns the
    bus: its lifespan starts it (``await bus.astart()``) and closes it on the way out
    (``await bus.aclose(timeout=close_timeout)``), letting running handlers finish first.
    """
    bus = bus if bus is not None else default_bus()
    services = services if services is not None else Services.with_latency(FAKE_LATENCY)
    register_handlers(bus, services)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await bus.astart()  # binds the async handlers to this (the server's) event loop
        log.info("app.started", handlers=list(HANDLERS))
        try:
            yield
        finally:
            log.info("app.stopping", close_timeout=close_timeout)
            await bus.aclose(timeout=close_timeout)
            dead = bus.dead_letters()
            (log.warning if dead else log.info)(
                "app.stopped",
                dead_letters=len(dead),
                abandoned=sum(1 for d in dead if d.abandoned),
            )

    # max_body_size: a body is read whole before it is validated; 413 above the bound.
    app = FastAPI(
        title="eventbus orders (asyncio)", lifespan=lifespan, max_body_size=MAX_BODY_BYTES
    )
    app.middleware("http")(_request_context)
    app.include_router(build_router(bus, OrderRepository(), services.inventory))
    return app


async def _request_context(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Binds a request id for the request's log lines, and for its events' handlers: the bus
    runs each handler in the emitter's ``contextvars`` context. Logs ``http.request``."""
    given = request.headers.get("x-request-id", "")
    request_id = given if _REQUEST_ID.fullmatch(given) else secrets.token_hex(6)
    started = time.perf_counter()
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        response = await call_next(request)
        log.info(
            "http.request",
            method=request.method,
            path=request.url.path,
            status=response.status_code,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
    response.headers["X-Request-ID"] = request_id
    return response
