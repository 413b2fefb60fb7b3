"""The outside world, faked: an async mailer, async analytics, and a blocking inventory.

* :class:`FakeMailer` and :class:`FakeAnalytics` are asyncio clients, as an HTTP API client
  or an async SMTP library would be. Their methods are coroutines that the bus awaits on its
  event loop; they keep what they were sent in lists for the tests to read. Being used from
  one event loop only, they need no lock.
* :class:`Inventory` is a blocking client, as a database driver would be: its handler runs
  on one of the bus's worker threads, so it is thread-safe. A reservation of an unknown SKU,
  or of more than is in stock, raises; :meth:`Inventory.restock` fixes the latter.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_STOCK",
    "FakeAnalytics",
    "FakeMailer",
    "Inventory",
    "InventoryError",
    "Mail",
    "OutOfStockError",
    "Services",
    "UnknownSkuError",
]

#: What the shop has in stock at startup. The monitor is sold out until someone restocks it.
DEFAULT_STOCK: Mapping[str, int] = {
    "KB-101": 25,  # mechanical keyboard
    "MS-202": 40,  # wireless mouse
    "MN-303": 0,  # 27-inch monitor: sold out
    "CB-404": 100,  # USB-C cable
}


class InventoryError(Exception):
    """A reservation the inventory refused."""


class UnknownSkuError(InventoryError):
    """The inventory does not know this SKU."""


class OutOfStockError(InventoryError):
    """Fewer items are in stock than the order asks for."""


@dataclass(frozen=True, slots=True)
class Mail:
    """One email, as the fake mailer recorded it."""

    to: str
    subject: str
    body: str
    key: str


class FakeMailer:
    """Records emails instead of sending them. ``send`` is idempotent per ``key``: a
    delivery that runs again (a retry, a replay) does not send the same email twice."""

    def __init__(self, *, latency: float = 0.0) -> None:
        self.sent: list[Mail] = []
        self._keys: set[str] = set()
        self._latency = latency

    async def send(self, *, to: str, subject: str, body: str, key: str) -> bool:
        """Send one email, unless one with this *key* was sent; return whether it was sent."""
        if key in self._keys:
            return False
        self._keys.add(key)
        if self._latency:
            await asyncio.sleep(self._latency)  # the round trip to the mail server
        self.sent.append(Mail(to=to, subject=subject, body=body, key=key))
        return True


class FakeAnalytics:
    """Records tracked events instead of sending them to an analytics service."""

    def __init__(self, *, latency: float = 0.0) -> None:
        self.tracked: list[tuple[str, dict[str, Any]]] = []
        self._latency = latency

    async def track(self, name: str, properties: Mapping[str, Any]) -> None:
        """Record one analytics event."""
        if self._latency:
            await asyncio.sleep(self._latency)
        self.tracked.append((name, dict(properties)))


class Inventory:
    """Stock per SKU, with one reservation per order. Thread-safe; ``reserve`` blocks for
    ``latency`` seconds, as a call to a database would."""

    def __init__(self, stock: Mapping[str, int] = DEFAULT_STOCK, *, latency: float = 0.0) -> None:
        self._stock = dict(stock)
        self._reserved: dict[str, tuple[tuple[str, int], ...]] = {}
        self._latency = latency
        self._lock = threading.Lock()

    def reserve(self, order_id: str, lines: Sequence[tuple[str, int]]) -> bool:
        """Reserve every ``(sku, quantity)`` line of an order, all or nothing; return
        ``False`` if this order was already reserved. Raises :class:`UnknownSkuError` or
        :class:`OutOfStockError` and reserves nothing."""
        if self._latency:
            time.sleep(self._latency)  # the round trip to the database
        with self._lock:
            if order_id in self._reserved:
                return False
            wanted: dict[str, int] = {}
            for sku, quantity in lines:
                wanted[sku] = wanted.get(sku, 0) + quantity
            for sku, quantity in wanted.items():
                if sku not in self._stock:
                    raise UnknownSkuError(f"SKU {sku!r} is not in the catalog")
                if self._stock[sku] < quantity:
                    raise OutOfStockError(
                        f"SKU {sku!r}: {quantity} wanted, {self._stock[sku]} in stock"
                    )
            for sku, quantity in wanted.items():
                self._stock[sku] -= quantity
            self._reserved[order_id] = tuple(lines)
            return True

    def restock(self, sku: str, quantity: int) -> int:
        """Add *quantity* items of *sku* (a new SKU joins the catalog); return the stock."""
        if quantity < 1:
            raise ValueError(f"quantity must be at least 1, got {quantity}")
        with self._lock:
            self._stock[sku] = self._stock.get(sku, 0) + quantity
            return self._stock[sku]

    def stock(self, sku: str) -> int:
        """Items of *sku* in stock (0 for an unknown SKU)."""
        with self._lock:
            return self._stock.get(sku, 0)

    def is_reserved(self, order_id: str) -> bool:
        """Whether the order's items are reserved."""
        with self._lock:
            return order_id in self._reserved


@dataclass(slots=True, kw_only=True)
class Services:
    """The fakes the handlers talk to. Tests build their own to look inside them."""

    mailer: FakeMailer = field(default_factory=FakeMailer)
    analytics: FakeAnalytics = field(default_factory=FakeAnalytics)
    inventory: Inventory = field(default_factory=Inventory)

    @classmethod
    def with_latency(cls, seconds: float) -> Services:
        """Fakes that take about *seconds* per call, as the server uses them."""
        return cls(
            mailer=FakeMailer(latency=seconds),
            analytics=FakeAnalytics(latency=seconds / 5),
            inventory=Inventory(latency=seconds),
        )
