"""The routes: a thin layer over the repository and the bus.

=================================== ====== ===============================================
route                               status body
=================================== ====== ===============================================
``POST /orders``                    201    ``{order_id, event_id, status_url}``, at once
``GET  /orders/{id}``               200    the order and each handler's delivery state
``GET  /dead-letters``              200    ``{dead_letters: [...]}``, without payloads
``POST /dead-letters/{id}/replay``  202    ``{replayed, handler, event_id, status_url}``
``POST /inventory/{sku}/restock``   200    ``{sku, stock}``: fixes an out-of-stock SKU
=================================== ====== ===============================================

Errors are FastAPI's ``{"detail": ...}``: 422 for a body that does not validate (nothing is
saved or emitted), 404 for an unknown order or dead letter, 409 for a replay whose handler is
no longer subscribed, 503 while the service shuts down.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Final

from fastapi import APIRouter, HTTPException, Path, Response, status

from eventbus import (
    BusClosedError,
    EventBus,
    QueueFullError,
    UnknownDeadLetterError,
    UnknownEventError,
    UnknownHandlerError,
)
from examples.fastapi_orders.fakes import Inventory
from examples.fastapi_orders.orders import (
    ORDER_CREATED,
    Order,
    OrderRepository,
    created_payload,
    new_order_id,
)
from examples.fastapi_orders.schemas import (
    SKU_PATTERN,
    DeadLetterOut,
    DeadLettersOut,
    DeliveryOut,
    OrderAccepted,
    OrderIn,
    OrderOut,
    OrderStatus,
    ReplayAccepted,
    Restock,
    StockOut,
)

__all__ = ["SETTLED_STATES", "build_router"]

#: Delivery states that will not change on their own.
SETTLED_STATES: Final = frozenset({"succeeded", "dead"})


def _order_url(order_id: str) -> str:
    return f"/orders/{order_id}"


def build_router(bus: EventBus, orders: OrderRepository, inventory: Inventory) -> APIRouter:
    """The API's routes, over this bus, repository and inventory."""
    router = APIRouter()

    @router.post("/orders", status_code=status.HTTP_201_CREATED)
    async def create_order(body: OrderIn, response: Response) -> OrderAccepted:
        order_id = new_order_id()
        items = tuple(line.to_line_item() for line in body.items)
        try:
            # Queues one delivery per handler and returns: nothing here waits for a handler.
            event = await bus.aemit(ORDER_CREATED, created_payload(order_id, body.email, items))
        except (BusClosedError, QueueFullError) as exc:  # shutting down, or overloaded
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
        orders.add(
            Order(
                id=order_id,
                email=body.email,
                items=items,
                created_at=datetime.now(UTC),
                event_id=event.id,
            )
        )
        response.headers["Location"] = _order_url(order_id)
        return OrderAccepted(order_id=order_id, event_id=event.id, status_url=_order_url(order_id))

    @router.get("/orders/{order_id}")
    async def get_order(order_id: str) -> OrderStatus:
        order = orders.get(order_id)
        if order is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no order {order_id!r}")
        try:
            status_by_handler = bus.status(order.event_id)  # a snapshot; never blocks
        except UnknownEventError:  # settled long ago and no longer remembered
            return OrderStatus(
                order=OrderOut.of(order), event_id=order.event_id, deliveries=None, settled=True
            )
        deliveries = {name: DeliveryOut.of(d) for name, d in status_by_handler.items()}
        return OrderStatus(
            order=OrderOut.of(order),
            event_id=order.event_id,
            deliveries=deliveries,
            settled=all(d.state in SETTLED_STATES for d in deliveries.values()),
        )

    @router.get("/dead-letters")
    async def list_dead_letters() -> DeadLettersOut:
        return DeadLettersOut(dead_letters=[DeadLetterOut.of(d) for d in bus.dead_letters()])

    @router.post("/dead-letters/{dead_letter_id}/replay", status_code=status.HTTP_202_ACCEPTED)
    async def replay_dead_letter(dead_letter_id: str) -> ReplayAccepted:
        dead = next((d for d in bus.dead_letters() if d.id == dead_letter_id), None)
        if dead is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dead letter {dead_letter_id!r}")
        try:
            bus.replay(dead)  # queues the delivery again and returns
        except UnknownDeadLetterError:  # replayed by someone else meanwhile
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"no dead letter {dead_letter_id!r}"
            ) from None
        except UnknownHandlerError as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except BusClosedError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
        payload = dead.event.payload
        order_id = payload.get("order_id") if isinstance(payload, dict) else None
        return ReplayAccepted(
            replayed=dead.id,
            handler=dead.handler,
            event_id=dead.event.id,
            status_url=_order_url(order_id) if isinstance(order_id, str) else None,
        )

    @router.post("/inventory/{sku}/restock")
    async def restock(sku: Annotated[str, Path(pattern=SKU_PATTERN)], body: Restock) -> StockOut:
        return StockOut(sku=sku, stock=inventory.restock(sku, body.quantity))

    return router
