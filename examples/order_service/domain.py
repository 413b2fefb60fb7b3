"""Orders, the typed domain events they raise, and validation of incoming order data.

Pure: no I/O, no eventbus import. The events are plain frozen dataclasses; ``event_name`` is
what name- and pattern-subscribers (``"order:created"``, ``"order:*"``) see. They are stored as
JSON by the event store (``eventbus.codec.JsonCodec``) and rebuilt from their annotations after
a restart, so every field is annotated with a type the codec rebuilds (``str``, ``int``,
dataclasses, ``list[...]``).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Literal

__all__ = [
    "LineItem",
    "NewOrder",
    "Order",
    "OrderCreated",
    "OrderEvent",
    "OrderShipped",
    "OrderStatus",
    "ValidationError",
    "new_order_id",
    "new_tracking_number",
    "parse_new_order",
]

#: ``placed`` -> ``shipping`` (shipment booked by ``ship_order``) -> ``shipped`` (set by the
#: ``update_order_status`` handler once the shipment event is processed).
OrderStatus = Literal["placed", "shipping", "shipped"]

MAX_ITEMS = 50
MAX_QUANTITY = 1000
MAX_SKU_LENGTH = 32
MAX_EMAIL_LENGTH = 254
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


@dataclass(frozen=True, slots=True)
class LineItem:
    """One line of an order: how many of which stock-keeping unit."""

    sku: str
    quantity: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Order:
    """An order as stored."""

    id: str
    customer_email: str
    items: tuple[LineItem, ...]
    status: OrderStatus
    created_at: datetime
    tracking_number: str | None = None
    shipped_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderCreated:
    """An order was placed and saved.

    ``items`` is a ``list``, not a tuple like ``Order.items``: the event store's JSON codec
    rebuilds ``list[LineItem]`` from JSON, while a ``tuple[...]`` field would come back from
    the store as a list of plain dicts.
    """

    event_name: ClassVar[str] = "order:created"

    order_id: str
    customer_email: str
    items: list[LineItem]


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderShipped:
    """A shipment was booked for an order."""

    event_name: ClassVar[str] = "order:shipped"

    order_id: str
    customer_email: str
    tracking_number: str


#: Every event this service emits.
OrderEvent = OrderCreated | OrderShipped


@dataclass(frozen=True, slots=True)
class NewOrder:
    """A validated request to place an order."""

    customer_email: str
    items: tuple[LineItem, ...]


class ValidationError(ValueError):
    """Order data is missing a field or has a bad value; ``errors`` maps field to message."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        super().__init__("; ".join(f"{field}: {message}" for field, message in errors.items()))


def new_order_id() -> str:
    """A fresh, unguessable order id such as ``ord_3f9c1a7b2e4d``."""
    return f"ord_{secrets.token_hex(6)}"


def new_tracking_number() -> str:
    """A fresh carrier tracking number such as ``TRK8F3A19C2D0``."""
    return f"TRK{secrets.token_hex(5).upper()}"


def parse_new_order(data: object) -> NewOrder:
    """Validate order data as it arrives from a client (decoded JSON).

    Expects ``{"email": "a@example.com", "items": [{"sku": "KB-101", "quantity": 2}, ...]}``.
    Only the shape is checked here: whether a SKU exists is the inventory's business, so an
    unknown SKU is accepted and fails later, in the inventory handler.

    Raises :class:`ValidationError` naming every bad field.
    """
    if not isinstance(data, Mapping):
        raise ValidationError({"body": "must be a JSON object"})
    errors: dict[str, str] = {}
    email = data.get("email")
    if email is None:
        errors["email"] = "is required"
    elif not isinstance(email, str) or len(email) > MAX_EMAIL_LENGTH or not _EMAIL.fullmatch(email):
        errors["email"] = "must be an email address such as ada@example.com"
    items: list[LineItem] = []
    raw_items = data.get("items")
    if raw_items is None:
        errors["items"] = "is required"
    elif not isinstance(raw_items, list) or not raw_items:
        errors["items"] = "must be a non-empty list of {sku, quantity} objects"
    elif len(raw_items) > MAX_ITEMS:
        errors["items"] = f"must have at most {MAX_ITEMS} lines"
    else:
        for index, raw in enumerate(raw_items):
            item = _parse_item(raw, f"items[{index}]", errors)
            if item is not None:
                items.append(item)
    if errors:
        raise ValidationError(errors)
    assert isinstance(email, str)
    return NewOrder(customer_email=email, items=tuple(items))


def _parse_item(raw: object, where: str, errors: dict[str, str]) -> LineItem | None:
    if not isinstance(raw, Mapping):
        errors[where] = "must be an object with sku and quantity"
        return None
    sku = raw.get("sku")
    quantity = raw.get("quantity")
    ok = True
    if not isinstance(sku, str) or not sku.strip() or len(sku) > MAX_SKU_LENGTH:
        errors[f"{where}.sku"] = f"is required: a non-empty string of at most {MAX_SKU_LENGTH}"
        ok = False
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        errors[f"{where}.quantity"] = "is required: a whole number"
        ok = False
    elif not 1 <= quantity <= MAX_QUANTITY:
        errors[f"{where}.quantity"] = f"must be between 1 and {MAX_QUANTITY}"
        ok = False
    if not ok:
        return None
    assert isinstance(sku, str)
    assert isinstance(quantity, int)
    return LineItem(sku=sku.strip(), quantity=quantity)
