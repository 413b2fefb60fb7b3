"""Fakes of the outside world the handlers talk to: a mailer, inventory, warehouse, analytics.

They behave like the real thing where it matters for the demo: they take time (``latency``,
in seconds, randomised by +/-30 %; zero in tests), they fail the way remote systems fail, and
their effects can be inspected. Every one is thread-safe: handlers run on a worker pool.

* :class:`OutboxMailer` writes each email as an ``.eml`` file into an outbox folder.
* :class:`InventoryService` reserves stock. SKUs listed in ``contended_skus`` fail
  transiently (row lock timeouts) a given number of times per order before succeeding;
  an unknown SKU is a permanent error.
* :class:`WarehouseService` takes shipment notifications; :meth:`~WarehouseService.down`
  makes it answer "503" until :meth:`~WarehouseService.up`.
* :class:`AnalyticsService` keeps tracked events in memory.

Errors split into :class:`TransientServiceError` (worth retrying) and the rest
(:class:`ServiceError`): retry policies use that split in ``retry_on``.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any, Protocol

from examples.order_service.domain import LineItem

__all__ = [
    "CATALOG",
    "AnalyticsService",
    "InventoryBusyError",
    "InventoryService",
    "Mailer",
    "OutboxMailer",
    "ServiceError",
    "Services",
    "TransientServiceError",
    "UnknownSkuError",
    "WarehouseService",
    "WarehouseUnavailableError",
]

#: What the shop sells: SKU -> product name.
CATALOG: Mapping[str, str] = {
    "KB-101": "Mechanical keyboard",
    "MS-202": "Wireless mouse",
    "MN-303": "27-inch monitor",
    "CB-404": "USB-C cable",
}


class ServiceError(Exception):
    """A call to an outside service failed in a way retrying will not fix."""


class TransientServiceError(ServiceError):
    """A call to an outside service failed in a way that may succeed if tried again."""


class UnknownSkuError(ServiceError):
    """The inventory does not know this SKU."""


class InventoryBusyError(TransientServiceError):
    """The inventory database timed out on a row lock."""


class WarehouseUnavailableError(TransientServiceError):
    """The warehouse API is down."""


class _Latency:
    """Sleeps for roughly *seconds* (+/-30 %) per call; a no-op for zero."""

    def __init__(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"latency must be >= 0, got {seconds}")
        self.seconds = seconds

    def __call__(self) -> None:
        if self.seconds > 0:
            time.sleep(self.seconds * random.uniform(0.7, 1.3))


class Mailer(Protocol):
    """Sends one email. *key* identifies the message: sending the same key again (a retry)
    replaces it rather than sending a second copy."""

    def send(self, *, to: str, subject: str, body: str, key: str) -> None: ...


class OutboxMailer:
    """A mailer that writes each message to ``<outbox>/<key>.eml`` (created on first use).

    Files are written to a temporary name and renamed, so a reader never sees half a message
    and a retry overwrites instead of duplicating.
    """

    def __init__(
        self, outbox: Path, *, sender: str = "orders@shop.example", latency: float = 0.0
    ) -> None:
        self.outbox = outbox
        self.sender = sender
        self._latency = _Latency(latency)
        self._lock = threading.Lock()
        self._sent: list[Path] = []

    def send(self, *, to: str, subject: str, body: str, key: str) -> None:
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = to
        message["Subject"] = subject
        message["Date"] = format_datetime(datetime.now(UTC))
        message["Message-ID"] = make_msgid(idstring=key, domain="shop.example")
        message.set_content(body)
        self._latency()  # talking to the SMTP relay
        self.outbox.mkdir(parents=True, exist_ok=True)
        path = self.outbox / f"{key}.eml"
        fd, tmp = tempfile.mkstemp(dir=self.outbox, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "wb") as file:
            file.write(message.as_bytes())
        Path(tmp).replace(path)
        with self._lock:
            if path not in self._sent:
                self._sent.append(path)

    @property
    def sent(self) -> list[Path]:
        """The files written by this mailer, in order."""
        with self._lock:
            return list(self._sent)


class InventoryService:
    """Stock reservations, idempotent per order.

    ``contended_skus`` maps a SKU to how many times a reservation touching it fails with
    :class:`InventoryBusyError` (per order) before it goes through: a hot row under lock
    contention. An unknown SKU raises :class:`UnknownSkuError`.
    """

    def __init__(
        self,
        *,
        catalog: Mapping[str, str] = CATALOG,
        contended_skus: Mapping[str, int] | None = None,
        latency: float = 0.0,
    ) -> None:
        self.catalog = dict(catalog)
        self.contended_skus = dict(contended_skus or {})
        self._latency = _Latency(latency)
        self._lock = threading.Lock()
        self._tries: dict[str, int] = {}
        self._reservations: dict[str, tuple[LineItem, ...]] = {}

    def reserve(self, order_id: str, items: Iterable[LineItem]) -> None:
        """Reserve stock for every line of an order, or raise and reserve nothing."""
        items = tuple(items)
        self._latency()
        for item in items:
            if item.sku not in self.catalog:
                raise UnknownSkuError(f"SKU {item.sku!r} is not in the catalog")
        with self._lock:
            if order_id in self._reservations:
                return
            tries = self._tries[order_id] = self._tries.get(order_id, 0) + 1
            for item in items:
                if tries <= self.contended_skus.get(item.sku, 0):
                    raise InventoryBusyError(
                        f"lock wait timeout on stock row {item.sku} (try {tries}); try again"
                    )
            self._reservations[order_id] = items

    def reserved(self, order_id: str) -> tuple[LineItem, ...] | None:
        """The lines reserved for an order, or ``None``."""
        with self._lock:
            return self._reservations.get(order_id)


class WarehouseService:
    """Shipment notifications to the warehouse, which can be taken down and brought back."""

    def __init__(self, *, latency: float = 0.0) -> None:
        self._latency = _Latency(latency)
        self._lock = threading.Lock()
        self._outage: str | None = None
        self._notified: dict[str, tuple[LineItem, ...]] = {}

    def down(self, reason: str = "503 Service Unavailable") -> None:
        """Every call fails with :class:`WarehouseUnavailableError` until :meth:`up`."""
        with self._lock:
            self._outage = reason

    def up(self) -> None:
        """End the outage."""
        with self._lock:
            self._outage = None

    @property
    def is_up(self) -> bool:
        with self._lock:
            return self._outage is None

    def notify(self, order_id: str, items: Iterable[LineItem]) -> None:
        """Tell the warehouse to pick an order (idempotent per order)."""
        self._latency()
        with self._lock:
            if self._outage is not None:
                raise WarehouseUnavailableError(f"warehouse API answered {self._outage}")
            self._notified.setdefault(order_id, tuple(items))

    def notified(self) -> list[str]:
        """The order ids the warehouse has received, in order."""
        with self._lock:
            return list(self._notified)


class AnalyticsService:
    """A product-analytics sink that keeps what it is sent in memory."""

    def __init__(self, *, latency: float = 0.0) -> None:
        self._latency = _Latency(latency)
        self._lock = threading.Lock()
        self._events: list[tuple[str, dict[str, Any]]] = []

    def track(self, name: str, properties: Mapping[str, Any]) -> None:
        self._latency()
        with self._lock:
            self._events.append((name, dict(properties)))

    def tracked(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return list(self._events)


@dataclass(frozen=True, slots=True, kw_only=True)
class Services:
    """The outside world, as the handlers see it."""

    mailer: Mailer
    inventory: InventoryService
    warehouse: WarehouseService
    analytics: AnalyticsService
