"""The HTTP API (Flask): a thin layer that parses requests, calls ``OrderService`` and the bus,
and maps errors to status codes.

=========================================== ====== =============================================
route                                       status body
=========================================== ====== =============================================
``POST /api/orders``                        201    ``{order, event_id, status_url}``, at once
``GET  /api/orders/<id>``                   200    ``{order, audit}``
``POST /api/orders/<id>/ship``              202    ``{order, event_id, status_url}``
``GET  /api/events/<event_id>``             200    each handler's ``state``/``attempts``/``error``
``GET  /api/dead-letters``                  200    ``{dead_letters: [...]}``
``POST /api/dead-letters/<id>/replay``      202    ``{replayed, event_id, status_url}``
``GET  /api/health``                        200    ``{status: "ok"}``; 503 when shutting down;
                                                   (redis/AMQP mode) ``"degraded"`` without
                                                   the broker
``POST /api/fakes/warehouse/(down|up)``     200    only with ``fake_controls=True``
=========================================== ====== =============================================

Errors are ``{"error": message}`` (plus ``"fields"`` for validation): 400 for a body that is
not JSON, is nested deeper than :data:`MAX_JSON_DEPTH`, is not a JSON object or misses a field;
413 for a body larger than :data:`MAX_BODY_BYTES` (in all these cases nothing is saved or
emitted); 404 for unknown ids; 409 for a state conflict; 503 while shutting down. Redis (or
RabbitMQ) being unreachable is no error here: each event is committed with its order to the
outbox, and published once the broker answers (see ``orders.py``).

Each request gets a request id (the ``X-Request-ID`` header if it is sane, else a new one),
bound with ``structlog.contextvars``: it appears in this request's log lines *and* in the log
lines of every handler of the events it emits, since eventbus runs handlers in a copy of the
emitter's context. It is echoed in the ``X-Request-ID`` response header.

With tracing on (``serve --trace``: ``orders_app.tracer_provider``), each request is also an
OpenTelemetry span (``"POST /api/orders/<order_id>/ship"``, kind ``SERVER``), current while
the view runs, so the events it emits, and every attempt of their handlers, are in its trace.

Redis mode (``serve --redis URL``), or AMQP mode (``serve --amqp URL``): this process only
publishes; the handlers run in worker processes, which keep their deliveries' status and dead
letters in memory. The API does not pretend to know them: ``GET /api/orders/<id>`` shows the
order and its audit trail (written by the workers' ``audit_log`` into the shared orders
database) with a ``note``, and ``GET /api/events/<id>`` and ``GET /api/dead-letters`` answer
200 with ``handlers``/``dead_letters`` empty and a ``note`` pointing at the workers' logs.
``GET /api/health`` pings the broker (``transport.ping()``) and answers ``{"status":
"degraded", "transport": "unreachable: ..."}`` when it does not answer, still with 200: the
API keeps taking orders (their events wait in the outbox), so a load balancer should keep
sending it requests.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import structlog
from flask import Flask, Response, g, request, url_for
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from eventbus import (
    BusClosedError,
    DeadLetter,
    Delivery,
    TransportError,
    UnknownDeadLetterError,
    UnknownEventError,
    UnknownHandlerError,
)
from examples.order_service.domain import Order, ValidationError
from examples.order_service.orders import Accepted, OrderNotFoundError, OrderStateError
from examples.order_service.repository import AuditEntry
from examples.order_service.wiring import OrderApp

__all__ = ["MAX_BODY_BYTES", "MAX_JSON_DEPTH", "create_app"]

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("order_service.web")

#: The largest request body accepted (Flask's ``MAX_CONTENT_LENGTH``); larger ones get a 413
#: before they are read. An order of 50 lines (the most ``domain.MAX_ITEMS`` allows) is 3 KiB.
MAX_BODY_BYTES = 64 * 1024
#: How deeply a JSON body may nest arrays and objects; an order needs 3 levels. Deeper ones
#: get a 400 before they are parsed (Python's parser recurses, and fails past ~1000 levels).
MAX_JSON_DEPTH = 16
#: Seconds a client is asked to wait (``Retry-After``) after a 503.
RETRY_AFTER = 5

_REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")
#: A JSON string (escapes included), or one of the brackets whose nesting is counted.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_SETTLED = frozenset({"succeeded", "dead"})
#: What the API says in redis or AMQP mode about the handlers, which run in the workers.
WORKERS_NOTE = (
    "handlers run in the worker processes (redis or AMQP mode): their status and dead letters "
    "are in the workers' logs; the audit trail shows each event the workers have handled"
)


class BadRequestBody(Exception):
    """The request body is not JSON."""


def create_app(orders_app: OrderApp, *, fake_controls: bool = False) -> Flask:
    """The Flask app serving *orders_app*. The caller keeps ownership of *orders_app* (and
    closes it). *fake_controls* adds routes that take the fake warehouse down and up."""
    app = Flask("order_service")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.extensions["order_service"] = orders_app
    transport = orders_app.transport
    # Redis or AMQP mode: the handlers run in the workers; the answers about them say so.
    bus, orders, note = orders_app.bus, orders_app.orders, _workers_note(orders_app)

    # -- request id and access log -------------------------------------------------------

    @app.before_request
    def bind_request_id() -> None:
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        g.started = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=g.request_id)

    @app.after_request
    def access_log(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.request_id
        log.info(
            "http.request",
            method=request.method,
            path=request.path,
            status=response.status_code,
            duration_ms=round((time.perf_counter() - g.started) * 1000, 1),
        )
        return response

    @app.teardown_request
    def unbind_request_id(_: BaseException | None) -> None:
        structlog.contextvars.clear_contextvars()

    if orders_app.tracer_provider is not None:
        _trace_requests(app, orders_app.tracer_provider)

    # -- orders --------------------------------------------------------------------------

    @app.post("/api/orders")
    def create_order() -> ResponseReturnValue:
        accepted = orders.create_order(_json_body(), metadata=_correlation())
        headers = {"Location": url_for("get_order", order_id=accepted.order.id)}
        return _accepted(accepted), 201, headers

    @app.get("/api/orders/<order_id>")
    def get_order(order_id: str) -> ResponseReturnValue:
        order = orders.get_order(order_id)
        audit = orders_app.repository.audit_trail(order_id)
        return {"order": _order(order), "audit": [_audit(entry) for entry in audit], **note}

    @app.post("/api/orders/<order_id>/ship")
    def ship_order(order_id: str) -> ResponseReturnValue:
        return _accepted(orders.ship_order(order_id, metadata=_correlation())), 202

    # -- events and dead letters ---------------------------------------------------------

    @app.get("/api/events/<event_id>")
    def event_status(event_id: str) -> ResponseReturnValue:
        deliveries = {} if note else bus.status(event_id)
        return {
            "event_id": event_id,
            "settled": None if note else all(d.state in _SETTLED for d in deliveries.values()),
            "handlers": {name: _delivery(d) for name, d in deliveries.items()},
            **note,
        }

    @app.get("/api/dead-letters")
    def list_dead_letters() -> ResponseReturnValue:
        return {"dead_letters": [_dead_letter(d) for d in bus.dead_letters()], **note}

    @app.post("/api/dead-letters/<dead_letter_id>/replay")
    def replay_dead_letter(dead_letter_id: str) -> ResponseReturnValue:
        found = next((d for d in bus.dead_letters() if d.id == dead_letter_id), None)
        if found is None:
            raise UnknownDeadLetterError(dead_letter_id)
        bus.replay(found)
        log.info("dead_letter.replayed", dead_letter_id=found.id, handler=found.handler)
        return {
            "replayed": found.id,
            "handler": found.handler,
            "event_id": found.event.id,
            "status_url": url_for("event_status", event_id=found.event.id),
        }, 202

    @app.get("/api/health")
    def health() -> ResponseReturnValue:
        if bus.closed:
            return {"status": "shutting down"}, 503
        if transport is None:
            return {"status": "ok"}
        try:
            transport.ping()  # raises TransportError when the broker does not answer in time
        except TransportError as exc:
            # Still 200: orders are accepted; their events wait in the outbox for the broker.
            return {"status": "degraded", "transport": f"unreachable: {exc}"}
        return {"status": "ok", "transport": "reachable"}

    if fake_controls:
        warehouse = orders_app.warehouse

        @app.post("/api/fakes/warehouse/down")
        def warehouse_down() -> ResponseReturnValue:
            warehouse.down()
            log.warning("fake.warehouse_down")
            return {"warehouse": "down"}

        @app.post("/api/fakes/warehouse/up")
        def warehouse_up() -> ResponseReturnValue:
            warehouse.up()
            log.info("fake.warehouse_up")
            return {"warehouse": "up"}

    _register_error_handlers(app)
    return app


def _register_error_handlers(app: Flask) -> None:
    """Map the errors of the service, the bus and HTTP to JSON error answers."""

    @app.errorhandler(BadRequestBody)
    def bad_body(error: BadRequestBody) -> ResponseReturnValue:
        return {"error": str(error)}, 400

    @app.errorhandler(ValidationError)
    def invalid(error: ValidationError) -> ResponseReturnValue:
        return {"error": f"invalid order: {error}", "fields": error.errors}, 400

    @app.errorhandler(OrderNotFoundError)
    def order_not_found(error: OrderNotFoundError) -> ResponseReturnValue:
        return {"error": f"no order with id {error.args[0]!r}"}, 404

    @app.errorhandler(OrderStateError)
    def conflict(error: OrderStateError) -> ResponseReturnValue:
        return {"error": str(error)}, 409

    @app.errorhandler(UnknownEventError)
    def event_not_found(error: UnknownEventError) -> ResponseReturnValue:
        return {"error": f"no event with id {error.args[0]!r} (or its record has expired)"}, 404

    @app.errorhandler(UnknownDeadLetterError)
    def dead_letter_not_found(error: UnknownDeadLetterError) -> ResponseReturnValue:
        return {"error": f"no dead letter with id {error.args[0]!r}"}, 404

    @app.errorhandler(UnknownHandlerError)
    def handler_gone(error: UnknownHandlerError) -> ResponseReturnValue:
        return {"error": error.args[0]}, 409

    @app.errorhandler(BusClosedError)
    def shutting_down(_: BusClosedError) -> ResponseReturnValue:
        return {"error": "the service is shutting down; try again shortly"}, 503, _retry_later()

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_: RequestEntityTooLarge) -> ResponseReturnValue:
        return {"error": f"request body is larger than {MAX_BODY_BYTES} bytes"}, 413

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> ResponseReturnValue:
        return {"error": error.description}, error.code or 500


def _trace_requests(app: Flask, provider: Any) -> None:
    """A ``SERVER`` span around each request, current from ``before_request`` to
    ``teardown_request`` (the same thread and context). Imported only with tracing on."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace

    from examples.order_service.tracing import SCOPE

    tracer = provider.get_tracer(SCOPE)

    @app.before_request
    def start_span() -> None:
        route = request.url_rule.rule if request.url_rule is not None else request.path
        span = tracer.start_span(
            f"{request.method} {route}",
            kind=trace.SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "url.path": request.path,
                "http.route": route,
                "request_id": g.request_id,
            },
        )
        g.span = span
        g.span_token = otel_context.attach(trace.set_span_in_context(span))

    @app.after_request
    def record_status(response: Response) -> Response:
        span = g.get("span")
        if span is not None:
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(trace.Status(trace.StatusCode.ERROR))
        return response

    @app.teardown_request
    def end_span(_: BaseException | None) -> None:
        span = g.pop("span", None)
        if span is None:
            return
        otel_context.detach(g.pop("span_token"))
        span.end()


def _workers_note(orders_app: OrderApp) -> dict[str, str]:
    return {"note": WORKERS_NOTE} if orders_app.transport is not None else {}


def _retry_later() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER)}


def _correlation() -> dict[str, str]:
    # Travels with the event (and so with its dead letters); the contextvars binding only
    # lives as long as the request and its handlers' context.
    return {"request_id": g.request_id}


def _json_body() -> Any:
    if not request.is_json:
        raise BadRequestBody("send the order as JSON, with Content-Type: application/json")
    # Reading the body raises RequestEntityTooLarge (413) past MAX_CONTENT_LENGTH.
    data = request.get_data(cache=False)
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise BadRequestBody(f"request body is not valid JSON: {exc}") from None
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise BadRequestBody(
            f"request body is not valid JSON: nested more than {MAX_JSON_DEPTH} levels deep"
        )
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError
        raise BadRequestBody(f"request body is not valid JSON: {exc}") from None


def _json_depth(text: str) -> int:
    """How deeply *text* nests arrays and objects, counted without parsing it (brackets
    inside strings do not count; for malformed JSON the count is a guess, and the parser
    rejects it anyway)."""
    depth = deepest = 0
    for token in _JSON_TOKENS.findall(text):
        if token in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in ("]", "}"):
            depth -= 1
    return deepest


def _accepted(accepted: Accepted) -> dict[str, Any]:
    return {
        "order": _order(accepted.order),
        "event_id": accepted.event.id,
        "status_url": url_for("event_status", event_id=accepted.event.id),
    }


def _order(order: Order) -> dict[str, Any]:
    return {
        "id": order.id,
        "email": order.customer_email,
        "items": [{"sku": i.sku, "quantity": i.quantity} for i in order.items],
        "status": order.status,
        "created_at": order.created_at.isoformat(),
        "tracking_number": order.tracking_number,
        "shipped_at": None if order.shipped_at is None else order.shipped_at.isoformat(),
    }


def _audit(entry: AuditEntry) -> dict[str, Any]:
    return {
        "event_id": entry.event_id,
        "event_name": entry.event_name,
        "occurred_at": entry.occurred_at.isoformat(),
        "request_id": entry.request_id,
    }


def _delivery(delivery: Delivery) -> dict[str, Any]:
    return {"state": delivery.state, "attempts": delivery.attempts, "error": delivery.error}


def _dead_letter(dead_letter: DeadLetter) -> dict[str, Any]:
    event = dead_letter.event
    return {
        "id": dead_letter.id,
        "handler": dead_letter.handler,
        "event": {
            "id": event.id,
            "name": event.name,
            "occurred_at": event.occurred_at.isoformat(),
            "order_id": getattr(event.payload, "order_id", None),
            "metadata": dict(event.metadata),
        },
        "attempts": dead_letter.attempts,
        "error": dead_letter.error,
        "reason": dead_letter.reason,
        "failed_at": dead_letter.failed_at.isoformat(),
        "replay_url": url_for("replay_dead_letter", dead_letter_id=dead_letter.id),
    }
