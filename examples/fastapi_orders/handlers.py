"""What happens after ``order:created``: two ``async def`` handlers and one plain one.

========================= ========== ===================================================
handler                   kind       runs
========================= ========== ===================================================
``send_confirmation``     async      on the event loop the bus is bound to (uvicorn's)
``record_analytics``      async      on the event loop
``reserve_inventory``     sync       on one of the bus's worker threads: it blocks
========================= ========== ===================================================

Each is its own delivery, retried on its own under the bus's retry policy; one failing never
stops the others. ``reserve_inventory`` fails for an unknown SKU or one out of stock, and
after its last attempt becomes a dead letter that ``POST /dead-letters/{id}/replay`` retries.
Every handler is idempotent (emails keyed by order, one reservation per order), because a
delivery may run more than once. Each log line says which thread the handler ran on.
"""

from __future__ import annotations

import threading
from typing import Final, cast

import structlog

from eventbus import Event, EventBus
from examples.fastapi_orders.fakes import Services
from examples.fastapi_orders.orders import ORDER_CREATED, OrderCreatedPayload

__all__ = [
    "HANDLERS",
    "RECORD_ANALYTICS",
    "RESERVE_INVENTORY",
    "SEND_CONFIRMATION",
    "register_handlers",
]

# Handler names: what bus.status(), the dead letters and the logs call them.
SEND_CONFIRMATION: Final = "send_confirmation"
RECORD_ANALYTICS: Final = "record_analytics"
RESERVE_INVENTORY: Final = "reserve_inventory"
HANDLERS: Final = (SEND_CONFIRMATION, RECORD_ANALYTICS, RESERVE_INVENTORY)

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("fastapi_orders.handlers")


def _order(event: Event) -> OrderCreatedPayload:
    return cast(OrderCreatedPayload, event.payload)


def register_handlers(bus: EventBus, services: Services) -> None:
    """Subscribe the ``order:created`` handlers, talking to *services*, to *bus*."""
    mailer, analytics, inventory = services.mailer, services.analytics, services.inventory

    @bus.on(ORDER_CREATED, name=SEND_CONFIRMATION)
    async def send_confirmation(event: Event) -> None:
        order = _order(event)
        sent = await mailer.send(
            to=order["email"],
            subject=f"Your order {order['order_id']}",
            body=f"Thank you! We received your order of {len(order['items'])} line(s), "
            f"total {order['total']}.",
            key=f"{order['order_id']}-confirmation",
        )
        log.info(
            "email.sent" if sent else "email.already_sent",
            order_id=order["order_id"],
            thread=threading.current_thread().name,
        )

    @bus.on(ORDER_CREATED, name=RECORD_ANALYTICS)
    async def record_analytics(event: Event) -> None:
        order = _order(event)
        await analytics.track(
            "order_created",
            {"order_id": order["order_id"], "lines": len(order["items"]), "total": order["total"]},
        )
        log.info(
            "analytics.recorded",
            order_id=order["order_id"],
            thread=threading.current_thread().name,
        )

    @bus.on(ORDER_CREATED, name=RESERVE_INVENTORY)
    def reserve_inventory(event: Event) -> None:
        order = _order(event)
        lines = [(line["sku"], line["quantity"]) for line in order["items"]]
        reserved = inventory.reserve(order["order_id"], lines)  # blocks: fine on a worker
        log.info(
            "inventory.reserved" if reserved else "inventory.already_reserved",
            order_id=order["order_id"],
            thread=threading.current_thread().name,
        )
