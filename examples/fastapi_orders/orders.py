"""Orders, the payload of the ``order:created`` event, and an in-memory repository.

No FastAPI and no eventbus here: the HTTP layer (:mod:`.api`) turns requests into
:class:`Order`\\ s and emits :func:`created_payload`; the handlers (:mod:`.handlers`) read it.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Final, TypedDict

__all__ = [
    "ORDER_CREATED",
    "LineItem",
    "Order",
    "OrderCreatedPayload",
    "OrderRepository",
    "PayloadLine",
    "created_payload",
    "new_order_id",
]

#: The event every new order raises.
ORDER_CREATED: Final = "order:created"


@dataclass(frozen=True, slots=True)
class LineItem:
    """One line of an order: how many of which SKU, at what unit price."""

    sku: str
    quantity: int
    price: Decimal


@dataclass(frozen=True, slots=True, kw_only=True)
class Order:
    """An order as stored, with the id of the ``order:created`` event it raised."""

    id: str
    email: str
    items: tuple[LineItem, ...]
    created_at: datetime
    event_id: str

    @property
    def total(self) -> Decimal:
        """The sum of quantity times unit price over the lines."""
        return sum((item.price * item.quantity for item in self.items), Decimal(0))


class PayloadLine(TypedDict):
    """One line of an ``order:created`` payload (prices as decimal strings, as in JSON)."""

    sku: str
    quantity: int
    price: str


class OrderCreatedPayload(TypedDict):
    """What ``order:created`` carries: plain data, so a durable store could keep it as JSON."""

    order_id: str
    email: str
    items: list[PayloadLine]
    total: str


def created_payload(order_id: str, email: str, items: tuple[LineItem, ...]) -> OrderCreatedPayload:
    """The ``order:created`` payload of a new order."""
    total = sum((item.price * item.quantity for item in items), Decimal(0))
    return {
        "order_id": order_id,
        "email": email,
        "items": [
            {"sku": item.sku, "quantity": item.quantity, "price": str(item.price)} for item in items
        ],
        "total": str(total),
    }


def new_order_id() -> str:
    """A fresh order id, ``ord_`` and 12 hex digits."""
    return f"ord_{secrets.token_hex(6)}"


class OrderRepository:
    """Orders by id, in memory. Thread-safe."""

    def __init__(self) -> None:
        self._orders: dict[str, Order] = {}
        self._lock = threading.Lock()

    def add(self, order: Order) -> None:
        """Store a new order."""
        with self._lock:
            self._orders[order.id] = order

    def get(self, order_id: str) -> Order | None:
        """The order with this id, or ``None``."""
        with self._lock:
            return self._orders.get(order_id)
