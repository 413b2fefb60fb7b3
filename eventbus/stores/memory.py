"""MemoryStore: the store contract kept in memory, for tests and for buses of one process.

It holds objects as they are (nothing is encoded) and is lost with the process; a bus without
a store keeps its records in memory too, more cheaply. What MemoryStore adds is the durable
contract: a second bus on the same store can claim what a closed one left unfinished.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from eventbus._event import DeadLetter, Delivery, DeliveryState, Event, new_id
from eventbus.stores._model import Claim, StoredDelivery
from eventbus.typing import Reporter

__all__ = ["MemoryStore"]

_OPEN: frozenset[DeliveryState] = frozenset({"pending", "running", "retrying"})


@dataclass(slots=True)
class _Row:
    state: DeliveryState
    owner: str | None
    attempts: int = 0
    error: str | None = None
    due_at: float | None = None


def _release(row: _Row) -> None:
    """Give a delivery up: unowned, and an interrupted attempt is pending again."""
    row.owner = None
    if row.state == "running":
        row.state = "pending"


class MemoryStore:
    """Deliveries, dead letters and idempotency keys in memory. Thread-safe.

    ``retention`` bounds how many events are kept once all their deliveries succeeded
    (oldest pruned first); events with a dead letter or unfinished work stay.
    """

    def __init__(self, *, retention: int = 100_000, poll_interval: float = 1.0) -> None:
        self.poll_interval = poll_interval
        #: Background errors: MemoryStore does no background work, so it is never called.
        self.on_error: Callable[[BaseException], None] = lambda exc: None
        self._retention = retention
        self._lock = threading.Lock()
        self._owner: str | None = None
        self._events: dict[str, tuple[Event, str | None]] = {}
        self._keys: dict[str, str] = {}
        self._rows: dict[str, dict[str, _Row]] = {}
        self._dead: dict[str, DeadLetter] = {}
        self._dirty = False  # something became claimable since the last claim

    def open(self, reporter: Reporter | None = None) -> str:
        """Start a bus's session; ``RuntimeError`` if one is open already. (A memory store
        has no background work, so *reporter* is never called.)"""
        with self._lock:
            if self._owner is not None:
                raise RuntimeError("this store is already used by an open bus")
            self._owner = owner = f"memory:{new_id()}"
        return owner

    def close(self) -> None:
        """End the session; its unfinished deliveries become claimable. Idempotent."""
        with self._lock:
            owner, self._owner = self._owner, None
            self._dirty = True
            for rows in self._rows.values():
                for row in rows.values():
                    if row.state in _OPEN and row.owner == owner and owner is not None:
                        _release(row)

    def add(
        self,
        event: Event,
        handlers: Collection[str],
        key: str | None = None,
        *,
        due_at: float | None = None,
    ) -> Event | None:
        """Keep *event* with a pending delivery per handler (with *due_at*: waiting to start
        then, as a retry waits), or return the event kept under *key* (then nothing
        changes)."""
        with self._lock:
            owner = self._require_owner()
            if key is not None and key in self._keys:
                return self._events[self._keys[key]][0]
            self._events[event.id] = (event, key)
            if key is not None:
                self._keys[key] = event.id
            if due_at is None:
                self._rows[event.id] = {h: _Row("pending", owner) for h in handlers}
            else:
                self._rows[event.id] = {h: _Row("retrying", owner, due_at=due_at) for h in handlers}
            self._prune()
        return None

    def started(self, event_id: str, handler: str, attempts: int) -> None:
        """Record that attempt *attempts* starts."""
        with self._lock:
            row = self._rows[event_id][handler]
            row.state, row.attempts = "running", attempts

    def succeeded(self, event_id: str, handler: str) -> None:
        """Record a success."""
        with self._lock:
            row = self._rows[event_id][handler]
            row.state, row.error, row.due_at, row.owner = "succeeded", None, None, None

    def retrying(
        self, event_id: str, handler: str, attempts: int, error: str, due_at: float
    ) -> None:
        """Record a failure to be retried at wall-clock time *due_at*."""
        with self._lock:
            row = self._rows[event_id][handler]
            row.state, row.attempts, row.error, row.due_at = "retrying", attempts, error, due_at

    def dead(self, dead_letter: DeadLetter) -> None:
        """Keep a dead letter and mark its delivery dead."""
        with self._lock:
            self._dead[dead_letter.id] = dead_letter
            row = self._rows[dead_letter.event.id][dead_letter.handler]
            row.state, row.attempts, row.error = "dead", dead_letter.attempts, dead_letter.error
            row.due_at = row.owner = None

    def release(self, deliveries: Collection[tuple[str, str]]) -> None:
        """Leave the deliveries unfinished and unowned."""
        with self._lock:
            self._dirty = True
            for event_id, handler in deliveries:
                _release(self._rows[event_id][handler])

    def needs_claim(self) -> bool:
        """Whether anything became claimable since the last claim (a release, a replay)."""
        return self._dirty

    def flush(self) -> None:
        """Nothing is deferred in memory: a no-op."""

    def claim(self, handlers: Collection[str]) -> Claim:
        """Take over unowned unfinished deliveries of the given handlers (nothing in memory
        can fail to decode, so nothing is quarantined)."""
        claim = Claim()
        with self._lock:
            owner = self._require_owner()
            self._dirty = False
            for event_id, rows in self._rows.items():
                for handler, row in rows.items():
                    if row.state not in _OPEN or row.owner is not None:
                        continue
                    if handler not in handlers:
                        claim.unknown[handler] = claim.unknown.get(handler, 0) + 1
                        continue
                    row.owner = owner
                    event = self._events[event_id][0]
                    claim.deliveries.append(
                        StoredDelivery(
                            event, handler, row.state, row.attempts, row.error, row.due_at
                        )
                    )
        return claim

    def status(self, event_id: str) -> Mapping[str, Delivery] | None:
        """Each delivery of the event, or ``None`` if it is unknown."""
        with self._lock:
            rows = self._rows.get(event_id)
            if rows is None:
                return None
            return {
                h: Delivery(
                    h,
                    "scheduled" if r.state == "retrying" and not r.attempts else r.state,
                    r.attempts,
                    r.error,
                )
                for h, r in rows.items()
            }

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        with self._lock:
            return sorted(self._dead.values(), key=lambda letter: letter.failed_at)

    def dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """One dead letter, or ``None``."""
        with self._lock:
            return self._dead.get(dead_letter_id)

    def replay_dead_letter(self, dead_letter_id: str, *, claim: bool = False) -> DeadLetter | None:
        """Remove the dead letter and make its delivery pending, fresh."""
        with self._lock:
            owner = self._require_owner() if claim else None
            letter = self._dead.pop(dead_letter_id, None)
            if letter is not None:
                row = self._rows[letter.event.id][letter.handler]
                row.state, row.attempts, row.error, row.due_at = "pending", 0, None, None
                row.owner = owner
                self._dirty = self._dirty or owner is None
            return letter

    def purge_dead_letters(self, ids: Collection[str] | None = None) -> int:
        """Delete dead letters (all when *ids* is ``None``); return how many."""
        with self._lock:
            if ids is None:
                count = len(self._dead)
                self._dead.clear()
                return count
            return sum(self._dead.pop(i, None) is not None for i in ids)

    def _require_owner(self) -> str:
        if self._owner is None:
            raise RuntimeError("the store is not open: pass it to an EventBus first")
        return self._owner

    def _prune(self) -> None:
        # Under self._lock. Dicts keep insertion order: the oldest events come first.
        excess = len(self._events) - self._retention
        if excess <= 0:
            return
        for event_id in list(itertools.islice(self._events, excess)):
            if all(row.state == "succeeded" for row in self._rows[event_id].values()):
                _, key = self._events.pop(event_id)
                del self._rows[event_id]
                if key is not None:
                    del self._keys[key]
