"""Orders and the audit trail in an embedded SQLite database (stdlib ``sqlite3``).

One connection guarded by a lock: the web server's request threads and the bus's worker
threads share it. State changes are single conditional ``UPDATE``\\ s, so two concurrent
requests to ship one order cannot both win, and handlers that run twice (a retry after a
failure that happened *after* the write, a replay) change nothing the second time.

The same file holds the bus's event store (``eventbus.stores.SQLiteStore`` creates its tables
beside these). :meth:`SqliteOrderRepository.transaction` yields the connection of one
transaction, and ``bus.emit(..., within=connection)`` writes the event in it: the order's row
and its event are committed together when the block completes, and neither exists if it
raises.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from examples.order_service.domain import LineItem, Order, OrderStatus

__all__ = ["AuditEntry", "SqliteOrderRepository"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id              TEXT PRIMARY KEY,
    customer_email  TEXT NOT NULL,
    items           TEXT NOT NULL,            -- JSON: [{"sku": ..., "quantity": ...}]
    status          TEXT NOT NULL,
    created_at      TEXT NOT NULL,            -- ISO 8601, UTC
    tracking_number TEXT,
    shipped_at      TEXT
);
CREATE TABLE IF NOT EXISTS audit_log (
    event_id    TEXT PRIMARY KEY,             -- one row per event, however often it is handled
    event_name  TEXT NOT NULL,
    order_id    TEXT,
    occurred_at TEXT NOT NULL,
    request_id  TEXT
);
CREATE INDEX IF NOT EXISTS audit_log_order ON audit_log (order_id, occurred_at);
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One order event as the audit handler recorded it."""

    event_id: str
    event_name: str
    order_id: str | None
    occurred_at: datetime
    request_id: str | None


class SqliteOrderRepository:
    """Orders and audit entries in one SQLite file, created (with its folder) on first use.

    Thread-safe. Pass ``":memory:"`` for a throwaway database (without an event store: the
    bus's store needs a file it can share).
    """

    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Re-entrant: the methods called inside transaction() take it again.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run the block in one transaction and yield its connection, for
        ``bus.emit(..., within=connection)``: the writes made in the block (through this
        repository, or through the connection, on this thread) are committed when it
        completes and rolled back if it raises.

        Other threads wait for the block to end (the connection is shared), so keep it short:
        one write and the emit of its event.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- orders --------------------------------------------------------------------------

    def add(self, order: Order) -> None:
        """Insert a new order."""
        items = json.dumps([{"sku": i.sku, "quantity": i.quantity} for i in order.items])
        with self._lock:
            self._db.execute(
                "INSERT INTO orders (id, customer_email, items, status, created_at,"
                " tracking_number, shipped_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    order.id,
                    order.customer_email,
                    items,
                    order.status,
                    order.created_at.isoformat(),
                    order.tracking_number,
                    _iso(order.shipped_at),
                ),
            )

    def get(self, order_id: str) -> Order | None:
        """The order with this id, or ``None``."""
        with self._lock:
            row = self._db.execute("SELECT * FROM orders WHERE id = ?", (order_id,)).fetchone()
        return None if row is None else _order(row)

    def mark_shipping(self, order_id: str, tracking_number: str) -> bool:
        """Book a shipment: ``placed`` -> ``shipping``. False if the order was not ``placed``."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE orders SET status = 'shipping', tracking_number = ?"
                " WHERE id = ? AND status = 'placed'",
                (tracking_number, order_id),
            )
        return cursor.rowcount == 1

    def mark_shipped(self, order_id: str, shipped_at: datetime) -> bool:
        """``shipping`` -> ``shipped``. False if the order was not ``shipping`` (e.g. already
        ``shipped``: running this twice is harmless)."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE orders SET status = 'shipped', shipped_at = ?"
                " WHERE id = ? AND status = 'shipping'",
                (shipped_at.isoformat(), order_id),
            )
        return cursor.rowcount == 1

    def count(self) -> int:
        """How many orders are stored."""
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM orders").fetchone()
        return int(row[0])

    # -- audit trail ---------------------------------------------------------------------

    def record_audit(self, entry: AuditEntry) -> bool:
        """Append *entry*; False if this event was already recorded (idempotent)."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO audit_log"
                " (event_id, event_name, order_id, occurred_at, request_id)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    entry.event_id,
                    entry.event_name,
                    entry.order_id,
                    entry.occurred_at.isoformat(),
                    entry.request_id,
                ),
            )
        return cursor.rowcount == 1

    def audit_trail(self, order_id: str) -> list[AuditEntry]:
        """The audit entries of one order, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM audit_log WHERE order_id = ? ORDER BY occurred_at, rowid",
                (order_id,),
            ).fetchall()
        return [
            AuditEntry(
                event_id=row["event_id"],
                event_name=row["event_name"],
                order_id=row["order_id"],
                occurred_at=datetime.fromisoformat(row["occurred_at"]),
                request_id=row["request_id"],
            )
            for row in rows
        ]

    def close(self) -> None:
        """Close the connection. Idempotent."""
        with self._lock:
            self._db.close()


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _order(row: sqlite3.Row) -> Order:
    items: list[dict[str, Any]] = json.loads(row["items"])
    shipped_at = row["shipped_at"]
    return Order(
        id=row["id"],
        customer_email=row["customer_email"],
        items=tuple(LineItem(sku=str(i["sku"]), quantity=int(i["quantity"])) for i in items),
        status=cast(OrderStatus, row["status"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        tracking_number=row["tracking_number"],
        shipped_at=None if shipped_at is None else datetime.fromisoformat(shipped_at),
    )
