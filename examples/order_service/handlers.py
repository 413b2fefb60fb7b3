"""What happens after an order event: one independent handler per side effect.

:func:`register_handlers` subscribes them to the bus it is given (there is no module-level
bus). Each handler is its own delivery: it runs on the bus's worker pool, is retried on its
own, and a failure in one never stops the others. Because a delivery may run more than once
(retries, replays), every handler is idempotent: emails are keyed, reservations and
notifications are per order, status updates are conditional, audit rows are keyed by event id.

In redis mode (several worker processes) the fakes' memory is per process, so "per order" no
longer holds across workers: ``register_handlers(once=transport.once)`` wraps the handlers with
outside effects so each runs to success at most once per event id, whichever worker gets it.

In AMQP mode (RabbitMQ) there is no ``once``: a message redelivered to another worker (the
first died before acknowledging it) runs all of its handlers again. What that repeats: the
audit row (keyed by event id) and the status update (conditional) are written once, in the
shared orders database; the email file is rewritten, not duplicated (a real mailer would pass
its key to the provider as an idempotency key); the reservation and the warehouse
notification are per order in each worker's fakes, so a second worker repeats them (a real
inventory or warehouse API would be keyed by order id); analytics may count an order twice.

The request id comes from the event's metadata: the events are committed in the orders'
transactions (``emit(..., within=...)``) and the handlers run once the bus finds them in the
store, or in a worker process, so the emitting request's context variables are not theirs.
Each handler binds it, so its log lines carry it.

========================== =================== =======================================
handler                    event               retry policy
========================== =================== =======================================
audit_log                  ``order:*``         bus default; runs first (priority 10)
send_confirmation_email    ``OrderCreated``    bus default
reserve_inventory          ``OrderCreated``    5 attempts, transient errors only
notify_warehouse           ``OrderCreated``    bus default
track_analytics            ``OrderCreated``    none: analytics is best effort
send_shipping_notification ``OrderShipped``    bus default
update_order_status        ``OrderShipped``    bus default
========================== =================== =======================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeAlias, TypeVar

import structlog
import tenacity

from eventbus import DuplicateInFlightError, Event, EventBus, RetryPolicy
from examples.order_service.domain import OrderCreated, OrderShipped
from examples.order_service.fakes import CATALOG, Services, TransientServiceError
from examples.order_service.repository import AuditEntry, SqliteOrderRepository

__all__ = [
    "ALL_HANDLERS",
    "AUDIT_LOG",
    "NOTIFY_WAREHOUSE",
    "RESERVE_INVENTORY",
    "SEND_CONFIRMATION_EMAIL",
    "SEND_SHIPPING_NOTIFICATION",
    "TRACK_ANALYTICS",
    "UPDATE_ORDER_STATUS",
    "WaitStrategy",
    "register_handlers",
]

#: Any tenacity wait strategy (``tenacity.wait_fixed(0.1)``, ``wait_exponential(...)``, ...).
WaitStrategy: TypeAlias = Callable[[tenacity.RetryCallState], float]

# Handler names: what status, dead letters and logs call them.
AUDIT_LOG: Final = "audit_log"
SEND_CONFIRMATION_EMAIL: Final = "send_confirmation_email"
RESERVE_INVENTORY: Final = "reserve_inventory"
NOTIFY_WAREHOUSE: Final = "notify_warehouse"
TRACK_ANALYTICS: Final = "track_analytics"
SEND_SHIPPING_NOTIFICATION: Final = "send_shipping_notification"
UPDATE_ORDER_STATUS: Final = "update_order_status"
ALL_HANDLERS: Final = (
    AUDIT_LOG,
    SEND_CONFIRMATION_EMAIL,
    RESERVE_INVENTORY,
    NOTIFY_WAREHOUSE,
    TRACK_ANALYTICS,
    SEND_SHIPPING_NOTIFICATION,
    UPDATE_ORDER_STATUS,
)

#: Stock reservations matter and their failures are usually lock timeouts: try harder.
INVENTORY_ATTEMPTS: Final = 5

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("order_service.handlers")

P = TypeVar("P")
Handler: TypeAlias = Callable[[Event], None]


def _bind_request_id(event: Event) -> str | None:
    """The request id of the HTTP request that emitted *event*: bound in the context (a bus
    without a store runs handlers in a copy of the emitter's), else taken from the event's
    metadata and bound (an event committed to the store, or read from the stream)."""
    bound = structlog.contextvars.get_contextvars().get("request_id")
    if bound is not None:
        return str(bound)
    request_id = event.metadata.get("request_id")
    if request_id is not None:
        structlog.contextvars.bind_contextvars(request_id=request_id)
    return request_id


def payload(event: Event, cls: type[P]) -> P:
    """The event's payload, checked to be a *cls* (typed events carry themselves)."""
    if not isinstance(event.payload, cls):
        raise TypeError(f"{event.name} carries {type(event.payload).__name__}, not {cls.__name__}")
    return event.payload


def register_handlers(
    bus: EventBus,
    *,
    repository: SqliteOrderRepository,
    services: Services,
    retry_wait: WaitStrategy,
    once: Callable[[Handler], Handler] | None = None,
) -> None:
    """Subscribe the order handlers to *bus*. Handlers without their own policy use the bus's
    default ``retry``; *retry_wait* is the backoff of those that set one.

    *once* (redis mode: ``transport.once``; ``None`` in AMQP mode, where RabbitMQ offers no
    such helper) wraps the handlers with outside effects (emails,
    inventory, warehouse, analytics). It raises ``DuplicateInFlightError`` while another
    worker runs the same event, so the policies that retry only some errors retry that too.
    """
    mailer, inventory = services.mailer, services.inventory
    warehouse, analytics = services.warehouse, services.analytics
    effect: Callable[[Handler], Handler] = once if once is not None else _as_is
    in_flight: tuple[type[Exception], ...] = (DuplicateInFlightError,) if once else ()
    # Best effort in one process; across workers, a duplicate in flight is waited for.
    analytics_policy = (
        RetryPolicy(max_attempts=3, wait=retry_wait, retry_on=in_flight)
        if in_flight
        else RetryPolicy(max_attempts=1)
    )

    @bus.on("order:*", priority=10, name=AUDIT_LOG)
    def audit_log(event: Event) -> None:
        # The request id was bound by the web layer (structlog.contextvars) when the event was
        # emitted; eventbus runs every handler in a copy of the emitter's context. A worker
        # process has no such context: the id comes from the event's metadata.
        request_id = _bind_request_id(event)
        entry = AuditEntry(
            event_id=event.id,
            event_name=event.name,
            order_id=getattr(event.payload, "order_id", None),
            occurred_at=event.occurred_at,
            request_id=request_id,
        )
        if repository.record_audit(entry):
            log.debug("audit.recorded", event_id=event.id, order_id=entry.order_id)

    @bus.on(OrderCreated, name=SEND_CONFIRMATION_EMAIL)
    @effect
    def send_confirmation_email(event: Event) -> None:
        _bind_request_id(event)
        order = payload(event, OrderCreated)
        lines = "\n".join(
            f"  {item.quantity} x {CATALOG.get(item.sku, item.sku)} ({item.sku})"
            for item in order.items
        )
        mailer.send(
            to=order.customer_email,
            subject=f"Your order {order.order_id} is confirmed",
            body=f"Thank you for your order {order.order_id}.\n\n{lines}\n\n"
            "We will email you again when it ships.\n",
            key=f"{order.order_id}-confirmation",
        )
        log.info("email.sent", kind="confirmation", order_id=order.order_id)

    @bus.on(
        OrderCreated,
        name=RESERVE_INVENTORY,
        retry=RetryPolicy(
            max_attempts=INVENTORY_ATTEMPTS,
            wait=retry_wait,
            # An unknown SKU will not appear by trying again: straight to the dead letters.
            retry_on=(TransientServiceError, *in_flight),
        ),
    )
    @effect
    def reserve_inventory(event: Event) -> None:
        _bind_request_id(event)
        order = payload(event, OrderCreated)
        inventory.reserve(order.order_id, order.items)
        log.info("inventory.reserved", order_id=order.order_id, lines=len(order.items))

    @bus.on(OrderCreated, name=NOTIFY_WAREHOUSE)
    @effect
    def notify_warehouse(event: Event) -> None:
        _bind_request_id(event)
        order = payload(event, OrderCreated)
        warehouse.notify(order.order_id, order.items)
        log.info("warehouse.notified", order_id=order.order_id)

    @bus.on(OrderCreated, name=TRACK_ANALYTICS, retry=analytics_policy)
    @effect
    def track_analytics(event: Event) -> None:
        _bind_request_id(event)
        order = payload(event, OrderCreated)
        analytics.track(
            "order_created",
            {"order_id": order.order_id, "units": sum(i.quantity for i in order.items)},
        )
        log.debug("analytics.tracked", order_id=order.order_id)

    @bus.on(OrderShipped, name=SEND_SHIPPING_NOTIFICATION)
    @effect
    def send_shipping_notification(event: Event) -> None:
        _bind_request_id(event)
        shipped = payload(event, OrderShipped)
        mailer.send(
            to=shipped.customer_email,
            subject=f"Your order {shipped.order_id} is on its way",
            body=f"Good news: order {shipped.order_id} has shipped.\n\n"
            f"Tracking number: {shipped.tracking_number}\n",
            key=f"{shipped.order_id}-shipped",
        )
        log.info("email.sent", kind="shipping", order_id=shipped.order_id)

    @bus.on(OrderShipped, name=UPDATE_ORDER_STATUS)
    def update_order_status(event: Event) -> None:
        _bind_request_id(event)
        shipped = payload(event, OrderShipped)
        if repository.mark_shipped(shipped.order_id, event.occurred_at):
            log.info("order.status_updated", order_id=shipped.order_id, status="shipped")


def _as_is(handler: Handler) -> Handler:
    return handler
