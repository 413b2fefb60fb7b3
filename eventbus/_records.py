"""Delivery records in memory: where each delivery stands, retention of settled events, and
the dead letters. Not thread-safe by itself: the bus calls it under its own lock."""

from __future__ import annotations

import contextvars
from collections import OrderedDict
from typing import TYPE_CHECKING

from eventbus._event import DeadLetter, Delivery, Event
from eventbus.typing import DeliveryState

if TYPE_CHECKING:
    from eventbus._registry import Subscription
    from eventbus.retry import RetryPolicy

__all__ = ["DeliveryRecord", "EventRecord", "Records"]


class DeliveryRecord:
    """One event's delivery to one handler, as it moves through its attempts (mutable).

    Only the thread running the delivery writes to it, except the settle steps, which the bus
    does under its lock.
    """

    __slots__ = (
        "attempts",
        "context",
        "error",
        "event",
        "first_attempt_at",
        "owner",
        "policy",
        "state",
        "subscription",
    )

    def __init__(
        self,
        owner: EventRecord,
        subscription: Subscription,
        policy: RetryPolicy,
        context: contextvars.Context,
    ) -> None:
        self.owner = owner
        self.event = owner.event
        self.subscription = subscription
        self.policy = policy
        self.context: contextvars.Context | None = context
        self.state: DeliveryState = "pending"
        self.attempts = 0
        self.error: str | None = None
        self.first_attempt_at = 0.0

    @property
    def handler(self) -> str:
        return self.subscription.name

    def snapshot(self) -> Delivery:
        return Delivery(self.subscription.name, self.state, self.attempts, self.error)


class EventRecord:
    """An event and its deliveries; *unsettled* counts those not yet succeeded or dead."""

    __slots__ = ("deliveries", "event", "key", "token", "unsettled", "verbose")

    def __init__(self, event: Event, key: str | None = None, token: str | None = None) -> None:
        self.event = event
        self.key = key
        # The transport's id for an event received from it: acknowledged once all settle.
        self.token = token
        self.deliveries: dict[str, DeliveryRecord] = {}
        self.unsettled = 0
        # Whether debug-level outcomes (emitted, succeeded) are logged for this event.
        self.verbose = True


class Records:
    """Event records by id, bounded retention of settled ones, and the dead letters."""

    def __init__(self, retention: int) -> None:
        if isinstance(retention, bool) or not isinstance(retention, int) or retention < 0:
            raise ValueError(f"status_retention must be an int >= 0, got {retention!r}")
        self._retention = retention
        self._events: dict[str, EventRecord] = {}
        # Settled events, oldest first: the ones retention may evict.
        self._settled: OrderedDict[str, None] = OrderedDict()
        # The delivery record rides along so that a replay continues the same status entry.
        self._dead: dict[str, tuple[DeadLetter, DeliveryRecord]] = {}
        # Idempotency keys of retained events (a bus without a store answers for them).
        self._keys: dict[str, EventRecord] = {}

    def add(self, record: EventRecord) -> None:
        self._events[record.event.id] = record
        if record.key is not None:
            self._keys[record.key] = record
        if record.unsettled == 0:
            self._mark_settled(record.event.id)

    def find_key(self, key: str) -> Event | None:
        """The retained event emitted under idempotency *key*, if any."""
        record = self._keys.get(key)
        return None if record is None else record.event

    def adopt(
        self,
        event: Event,
        subscription: Subscription,
        policy: RetryPolicy,
        context: contextvars.Context,
    ) -> DeliveryRecord | None:
        """An unsettled delivery record for *event* to *subscription*'s handler, for work taken
        over from a store: the event's record is reused (re-added if evicted) or created.
        ``None`` if that delivery is already in flight here."""
        record = self._events.get(event.id)
        if record is None:
            record = EventRecord(event)
        delivery = record.deliveries.get(subscription.name)
        if delivery is not None and delivery.state not in ("succeeded", "dead"):
            return None
        self._unsettle(record)
        delivery = DeliveryRecord(record, subscription, policy, context)
        record.deliveries[subscription.name] = delivery
        return delivery

    def get(self, event_id: str) -> EventRecord | None:
        return self._events.get(event_id)

    def settle(self, delivery: DeliveryRecord, state: DeliveryState) -> bool:
        """Move *delivery* to a final state; its event becomes evictable once all are final.
        Returns True if this was the event's last unsettled delivery."""
        delivery.state = state
        delivery.context = None  # the emitter's context may hold large objects: let them go
        owner = delivery.owner
        owner.unsettled -= 1
        if owner.unsettled == 0:
            self._mark_settled(owner.event.id)
            return True
        return False

    def reopen(self, delivery: DeliveryRecord) -> None:
        """Make a settled *delivery* pending again (a replay), re-adding its event if evicted."""
        self._unsettle(delivery.owner)
        delivery.state = "pending"

    def _unsettle(self, record: EventRecord) -> None:
        """*record* gains an unsettled delivery: it is retained again, and not evictable."""
        if record.unsettled == 0:
            self._settled.pop(record.event.id, None)
        record.unsettled += 1
        self._events[record.event.id] = record

    def _mark_settled(self, event_id: str) -> None:
        self._settled[event_id] = None
        while len(self._settled) > self._retention:
            old, _ = self._settled.popitem(last=False)
            record = self._events.pop(old)
            if record.key is not None:
                self._keys.pop(record.key, None)
            # Break the record <-> delivery reference cycle so the evicted event is freed at
            # once rather than by the cyclic collector (which was half of emit's cost under
            # load). Dead deliveries keep their record: a replay re-adds it.
            if not any(d.state == "dead" for d in record.deliveries.values()):
                record.deliveries = {}

    def add_dead_letter(self, dead_letter: DeadLetter, delivery: DeliveryRecord) -> None:
        self._dead[dead_letter.id] = (dead_letter, delivery)

    def get_dead_letter(self, dead_letter_id: str) -> tuple[DeadLetter, DeliveryRecord] | None:
        return self._dead.get(dead_letter_id)

    def pop_dead_letter(self, dead_letter_id: str) -> None:
        del self._dead[dead_letter_id]

    def dead_letters(self) -> list[DeadLetter]:
        return [dead_letter for dead_letter, _ in self._dead.values()]

    def purge_dead_letters(self) -> int:
        count = len(self._dead)
        self._dead.clear()
        return count
