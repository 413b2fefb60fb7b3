"""The use cases: validate, save, emit, return. Side effects belong to the handlers.

``create_order`` and ``ship_order`` return as soon as the event is emitted: the caller gets
the saved order and the event (whose id it can use to follow the handlers through
``bus.status``) while emails, stock and the warehouse are still being dealt with.

How saving and emitting stay together depends on where the events go:

* **A bus with an event store** (``keyed=True``, the default): saving and emitting are two
  steps, in two SQLite files (the orders, the bus's event store). If the process dies between
  them the order exists but its event does not. :meth:`OrderService.resend_unsent` closes that
  gap at startup: it emits again the events of orders the audit trail has not seen. Every emit
  carries an idempotency key derived from the order (``order-<id>-created``,
  ``order-<id>-shipped``), so an event the store already holds is not delivered a second time.
* **A bus with a Redis transport** (``keyed=False``): there is no store to remember keys
  (``emit()`` refuses ``key=``), so nothing could be resent safely. The write and the publish
  are one unit instead: the order's row is written in a transaction that is committed only
  once Redis has taken the event, and rolled back when ``emit()`` raises (``TransportError``:
  Redis is unreachable). The caller then gets the error and nothing is saved. The stream
  delivers at least once, so duplicates are handled where the effects happen: the workers'
  handlers are idempotent per event id (see ``handlers.register_handlers(once=...)``).
  ``resend_unsent`` is refused.

The service also refuses to save when the bus is already closed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
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
    """Places and ships orders. Thread-safe (the repository and the bus are)."""

    def __init__(
        self,
        repository: SqliteOrderRepository,
        bus: EventBus,
        *,
        now: Callable[[], datetime] = _utcnow,
        keyed: bool = True,
    ) -> None:
        self._repository = repository
        self._bus = bus
        self._now = now
        #: Emit with idempotency keys (a bus with a store); ``False`` with a transport.
        self._keyed = keyed

    def create_order(self, data: object, *, metadata: Mapping[str, str] | None = None) -> Accepted:
        """Validate *data* (decoded JSON), save the order, emit :class:`OrderCreated` with
        *metadata* (e.g. the request id, which then stays with the event, dead letters too).

        Raises :class:`~examples.order_service.domain.ValidationError` (nothing is saved or
        emitted), ``BusClosedError`` while shutting down, and, with a Redis transport,
        ``TransportError`` when Redis is unreachable (the order is not saved).
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
        with self._saving():
            self._repository.add(order)
            event = self._emit_created(order, metadata)
        log.info("order.created", order_id=order.id, event_id=event.id)
        return Accepted(order, event)

    def ship_order(self, order_id: str, *, metadata: Mapping[str, str] | None = None) -> Accepted:
        """Book the shipment of a placed order and emit :class:`OrderShipped` (with *metadata*).

        Raises :class:`OrderNotFoundError`, :class:`OrderStateError` if it is not ``placed``
        (already shipping or shipped), ``BusClosedError`` while shutting down, and, with a
        Redis transport, ``TransportError`` when Redis is unreachable (the order stays
        ``placed``).
        """
        self._refuse_if_closed()
        tracking_number = new_tracking_number()
        with self._saving():
            if not self._repository.mark_shipping(order_id, tracking_number):
                order = self._repository.get(order_id)
                if order is None:
                    raise OrderNotFoundError(order_id)
                raise OrderStateError(f"order {order_id} is already {order.status}")
            order = self.get_order(order_id)
            event = self._emit_shipped(order, metadata)
        log.info("order.shipping", order_id=order.id, event_id=event.id)
        return Accepted(order, event)

    def resend_unsent(self) -> int:
        """Emit the events of orders whose event was never emitted (the process died between
        saving and emitting); return how many were emitted now.

        Candidates are the orders whose event the audit trail lacks. The idempotency key makes
        the emit a no-op for every event the bus's store still holds (one whose audit entry is
        merely pending, retrying or dead-lettered): ``emit`` then returns that earlier event,
        so only events that were really lost fan out. Call it at startup, after
        ``bus.recover()``. Raises ``RuntimeError`` without idempotency keys (``keyed=False``):
        each resend would then be a new event, delivered a second time.
        """
        if not self._keyed:
            raise RuntimeError("resend_unsent() needs idempotency keys (a bus with a store)")
        started = datetime.now(UTC)  # the bus's clock for occurred_at, not self._now
        created, shipping = self._repository.unaudited()
        events = [self._emit_created(order, None) for order in created]
        events += [self._emit_shipped(order, None) for order in shipping]
        # An event the store already held was emitted by an earlier process, before we started.
        resent = [event for event in events if event.occurred_at >= started]
        for event in resent:
            order_id = getattr(event.payload, "order_id", None)
            log.warning("order.event_resent", order_id=order_id, event_id=event.id, name=event.name)
        return len(resent)

    def _emit_created(self, order: Order, metadata: Mapping[str, str] | None) -> Event:
        return self._bus.emit(
            OrderCreated(
                order_id=order.id, customer_email=order.customer_email, items=list(order.items)
            ),
            metadata=metadata,
            key=self._key(f"order-{order.id}-created"),
        )

    def _emit_shipped(self, order: Order, metadata: Mapping[str, str] | None) -> Event:
        assert order.tracking_number is not None  # booked by mark_shipping
        return self._bus.emit(
            OrderShipped(
                order_id=order.id,
                customer_email=order.customer_email,
                tracking_number=order.tracking_number,
            ),
            metadata=metadata,
            key=self._key(f"order-{order.id}-shipped"),
        )

    def _key(self, key: str) -> str | None:
        return key if self._keyed else None

    def _saving(self) -> AbstractContextManager[None]:
        """Around a write and the emit of its event. With keys (a store) the write commits at
        once and ``resend_unsent`` covers a crash before the emit; without them (a
        transport) both are one transaction, rolled back if the emit raises."""
        return nullcontext() if self._keyed else self._repository.transaction()

    def get_order(self, order_id: str) -> Order:
        """The order with this id; raises :class:`OrderNotFoundError`."""
        order = self._repository.get(order_id)
        if order is None:
            raise OrderNotFoundError(order_id)
        return order

    def _refuse_if_closed(self) -> None:
        if self._bus.closed:
            raise BusClosedError("the service is shutting down")
