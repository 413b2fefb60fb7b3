"""The JSON the API takes and returns, as pydantic models.

FastAPI validates request bodies against them (422 with the reasons otherwise) and documents
them at ``/docs``. Prices are decimals: the API accepts ``19.99`` or ``"19.99"`` and returns
``"19.99"``, never a binary float. Dead letters are listed without their event's payload
(an order's payload holds the customer's email): the event's name and id say where to look.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from eventbus import DeadLetter, Delivery
from eventbus.typing import DeliveryState
from examples.fastapi_orders.orders import LineItem, Order

__all__ = [
    "DeadLetterOut",
    "DeadLettersOut",
    "DeliveryOut",
    "LineItemIn",
    "LineItemOut",
    "OrderAccepted",
    "OrderIn",
    "OrderOut",
    "OrderStatus",
    "ReplayAccepted",
    "Restock",
    "StockOut",
]

MAX_ITEMS = 50
MAX_QUANTITY = 1000
#: Upper-case letters, digits and dashes: ``KB-101``.
SKU_PATTERN = r"^[A-Z0-9][A-Z0-9-]{0,31}$"
#: Deliberately loose (one ``@``, a dot in the domain): the confirmation email is the real test.
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"

Sku = Annotated[str, Field(pattern=SKU_PATTERN, examples=["KB-101"])]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LineItemIn(_Strict):
    """One line of a new order."""

    sku: Sku
    quantity: int = Field(strict=True, ge=1, le=MAX_QUANTITY)
    price: Decimal = Field(gt=0, max_digits=10, decimal_places=2, examples=["49.90"])

    def to_line_item(self) -> LineItem:
        return LineItem(self.sku, self.quantity, self.price)


class OrderIn(_Strict):
    """``POST /orders``: who orders what."""

    email: str = Field(max_length=254, pattern=EMAIL_PATTERN, examples=["ada@example.com"])
    items: list[LineItemIn] = Field(min_length=1, max_length=MAX_ITEMS)


class OrderAccepted(_Strict):
    """``POST /orders`` answers at once: the handlers of its event run after."""

    order_id: str
    event_id: str
    status_url: str


class LineItemOut(_Strict):
    sku: str
    quantity: int
    price: Decimal

    @classmethod
    def of(cls, item: LineItem) -> LineItemOut:
        return cls(sku=item.sku, quantity=item.quantity, price=item.price)


class OrderOut(_Strict):
    id: str
    email: str
    items: list[LineItemOut]
    total: Decimal
    created_at: datetime

    @classmethod
    def of(cls, order: Order) -> OrderOut:
        return cls(
            id=order.id,
            email=order.email,
            items=[LineItemOut.of(item) for item in order.items],
            total=order.total,
            created_at=order.created_at,
        )


class DeliveryOut(_Strict):
    """Where one handler's delivery of the order's event stands (``bus.status()``)."""

    state: DeliveryState
    attempts: int
    error: str | None

    @classmethod
    def of(cls, delivery: Delivery) -> DeliveryOut:
        return cls(state=delivery.state, attempts=delivery.attempts, error=delivery.error)


class OrderStatus(_Strict):
    """``GET /orders/{id}``: the order, and each handler of its event by name. ``settled``:
    every delivery succeeded or is a dead letter. ``deliveries`` is ``null`` once the bus no
    longer remembers the event (it keeps the last 10,000 settled ones)."""

    order: OrderOut
    event_id: str
    deliveries: dict[str, DeliveryOut] | None
    settled: bool


class DeadLetterOut(_Strict):
    id: str
    handler: str
    event_id: str
    event_name: str
    attempts: int
    error: str
    reason: Literal["exhausted", "not_retryable", "abandoned"]
    failed_at: datetime

    @classmethod
    def of(cls, dead: DeadLetter) -> DeadLetterOut:
        return cls(
            id=dead.id,
            handler=dead.handler,
            event_id=dead.event.id,
            event_name=dead.event.name,
            attempts=dead.attempts,
            error=dead.error,
            reason=dead.reason,
            failed_at=dead.failed_at,
        )


class DeadLettersOut(_Strict):
    dead_letters: list[DeadLetterOut]


class ReplayAccepted(_Strict):
    """The dead letter's delivery is queued again; ``status_url`` shows how it goes."""

    replayed: str
    handler: str
    event_id: str
    status_url: str | None


class Restock(_Strict):
    quantity: int = Field(strict=True, ge=1, le=100_000)


class StockOut(_Strict):
    sku: str
    stock: int
