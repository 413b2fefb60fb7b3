"""The use cases: validate, save, emit, return. Side effects belong to the handlers.

``create_order`` and ``ship_order`` return as soon as the event is emitted: the caller gets
the saved order and the event (whose id it can use to follow the handlers through
``bus.status``) while emails, stock and the warehouse are still being dealt with.

**The order and its event are committed together.** The bus's event store is the orders
database itself (``eventbus.stores.SQLiteStore`` on the same file), so each use case writes
its row and emits its event in one SQLite transaction, ``bus.emit(..., within=connection)``
(a transactional outbox): both are committed, or, if anything in the block raises, neither.
The handlers run only after the commit. A crash after it loses nothing: the event's
deliveries are in the store, and ``bus.recover()`` at the next start runs them. A crash
before it leaves neither the order nor the event.

This holds in both layouts:

* **One process** (``serve``, ``demo``): the bus runs the handlers once the commit is seen.
* **Redis** (``serve --redis``): the API's bus has the store *and* the transport. Its relay
  publishes each committed event to the stream afterwards and keeps retrying while Redis is
  down, so an outage delays events instead of failing orders. The stream delivers at least
  once; the workers' handlers are idempotent per event id (``handlers.register_handlers(
  once=...)``).
* **RabbitMQ** (``serve --amqp``): the same, with the relay publishing to a topic exchange.

``transactional=False`` is for a bus without a store (``serve --no-store``, the tests'
in-memory buses): the row is committed first and the event emitted right after, so a crash
in between loses the event (as a crash loses every delivery of such a bus).

The service also refuses to save when the bus is already closed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from eventbus import BusClosedError, Event, EventBus
from examples.order_service.domain import (
    Order,
    OrderCreated,
    OrderShipped,
    new_order_id,
    new_tracking_number,
    parse_new_order,
)
from examples.order_service.repository import SqliteOrderRepository

__all__ = ["Accepted", "OrderNotFoundError", "OrderService", "OrderStateError"]

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("order_service.orders")


class OrderNotFoundError(LookupError):
    """No order has this id."""


class OrderStateError(Exception):
    """The order is not in a state that allows this (e.g. shipping it twice)."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """An order as saved, and the event emitted about it."""

    order: Order
    event: Event


def _utcnow() -> datetime:
    return datetime.now(UTC)


class OrderService:
    """Places and ships orders. Thread-safe (the repository and the bus are).

    *transactional* (the default): the bus's store, or its outbox, is the repository's
    database, and every event is emitted within the transaction that writes its order.
    ``False`` for a bus without a store, which cannot write through the repository's
    connection: the event is emitted after the commit.
    """

    def __init__(
        self,
        repository: SqliteOrderRepository,
        bus: EventBus,
        *,
        now: Callable[[], datetime] = _utcnow,
        transactional: bool = True,
    ) -> None:
        self._repository = repository
        self._bus = bus
        self._now = now
        self._transactional = transactional

    def create_order(self, data: object, *, metadata: Mapping[str, str] | None = None) -> Accepted:
        """Validate *data* (decoded JSON), then save the order and emit :class:`OrderCreated`
        (with *metadata*, e.g. the request id, which then stays with the event, dead letters
        too) in one transaction.

        Raises :class:`~examples.order_service.domain.ValidationError` and
        ``BusClosedError`` while shutting down; in both cases nothing is saved or emitted.
        """
        request = parse_new_order(data)
        self._refuse_if_closed()
        order = Order(
            id=new_order_id(),
            customer_email=request.customer_email,
            items=request.items,
            status="placed",
            created_at=self._now(),
        )
        with self._saving() as within:
            self._repository.add(order)
            event = self._bus.emit(
                OrderCreated(
                    order_id=order.id, customer_email=order.customer_email, items=list(order.items)
                ),
                metadata=metadata,
                within=within,
            )
        log.info("order.created", order_id=order.id, event_id=event.id)
        return Accepted(order, event)

    def ship_order(self, order_id: str, *, metadata: Mapping[str, str] | None = None) -> Accepted:
        """Book the shipment of a placed order and emit :class:`OrderShipped` (with
        *metadata*), in one transaction.

        Raises :class:`OrderNotFoundError`, :class:`OrderStateError` if it is not ``placed``
        (already shipping or shipped), and ``BusClosedError`` while shutting down; the order
        is unchanged and nothing is emitted then.
        """
        self._refuse_if_closed()
        tracking_number = new_tracking_number()
        with self._saving() as within:
            if not self._repository.mark_shipping(order_id, tracking_number):
                order = self._repository.get(order_id)
                if order is None:
                    raise OrderNotFoundError(order_id)
                raise OrderStateError(f"order {order_id} is already {order.status}")
            order = self.get_order(order_id)
            event = self._bus.emit(
                OrderShipped(
                    order_id=order.id,
                    customer_email=order.customer_email,
                    tracking_number=tracking_number,
                ),
                metadata=metadata,
                within=within,
            )
        log.info("order.shipping", order_id=order.id, event_id=event.id)
        return Accepted(order, event)

    @contextmanager
    def _saving(self) -> Iterator[sqlite3.Connection | None]:
        """Around a write and the emit of its event: one transaction, whose connection is
        the emit's ``within=`` (committed if the block completes, rolled back if it raises).
        Without a store: no transaction, and ``within=None`` (a plain emit)."""
        if not self._transactional:
            yield None
            return
        with self._repository.transaction() as connection:
            yield connection

    def get_order(self, order_id: str) -> Order:
        """The order with this id; raises :class:`OrderNotFoundError`."""
        order = self._repository.get(order_id)
        if order is None:
            raise OrderNotFoundError(order_id)
        return order

    def _refuse_if_closed(self) -> None:
        if self._bus.closed:
            raise BusClosedError("the service is shutting down")
