"""The outbox relay: events a bus emits with both a store and a transport are committed to the
store first (inside the application's transaction with ``within=``), and this relay publishes
them to the transport afterwards, in order, marking each published in the store.

Why: ``emit()`` then never depends on the transport being up. A Redis outage delays events
instead of failing the request that emitted them, and a crash between the business commit and
the publish leaves the event in the store, where the next relay (this process restarted, or
another process of the same store) finds it.

One thread per bus publishes one event at a time, oldest first, so events reach the stream in
the order they were committed: emitted by this bus in emit order, and those committed by other
connections (``within=``) in the order the store's claims found them. A publish that fails is
retried with backoff, keeping its place; nothing behind it overtakes it. Delivery is at least
once: a crash after a publish and before its mark is committed publishes it again, and
consumers deduplicate by event id as for any redelivery.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from eventbus.stores._model import StoredDelivery

if TYPE_CHECKING:
    from eventbus._event import Event
    from eventbus._observe import Observer
    from eventbus.typing import Store, Transport

__all__ = ["RELAY", "Relay"]

#: The one "handler" an outbox event has in the store: the relay's publish.
RELAY = "eventbus.relay"
#: Pauses between publishes while the transport is failing (seconds); the last one repeats.
BACKOFF = (0.05, 0.1, 0.25, 0.5, 1.0)


class Relay:
    """Publishes a store's outbox to a transport. Thread-safe: ``add``, ``wake`` and
    ``wait_idle`` may be called from any thread; one thread of its own publishes."""

    def __init__(
        self, store: Store, transport: Transport, observer: Observer, *, name: str
    ) -> None:
        self._store = store
        self._transport = transport
        self._observer = observer
        self._log = observer.log
        self._lock = threading.Condition()
        self._queue: deque[StoredDelivery] = deque()  # claimed or emitted here, not published
        self._queued: set[str] = set()  # their event ids
        self._claim_wanted = True  # the first round looks for what earlier runs left
        # A store shared by several processes (PostgreSQL) lets one relay of them all publish,
        # so that events reach the transport in commit order whichever process emitted them.
        self._lead: Callable[[str], bool] | None = getattr(store, "lead", None)
        self._leading = False
        self._next_ask = 0.0
        self._publishing = False
        self._failing = False  # the transport failed the last publish
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-relay", daemon=True)
        self._thread.start()

    # -- fed by the bus ------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        """Whether the store is shared by processes with one relay among them: the bus then
        writes its events claimable by any (:meth:`add` only wakes the relay)."""
        return self._lead is not None

    def add(self, event: Event, due_at: float | None) -> None:
        """An event this bus just committed to the store: publish it next (or, with a shared
        store, claim it with whatever else is committed, if this relay leads)."""
        with self._lock:
            if self._lead is not None:
                self._claim_wanted = True
            else:
                self._append(StoredDelivery(event, RELAY, "pending", 0, None, due_at))
            self._lock.notify_all()

    def wake(self) -> None:
        """The store heard of outbox rows committed elsewhere: claim them now."""
        with self._lock:
            self._claim_wanted = True
            self._lock.notify_all()

    def look_now(self) -> None:
        """Claim what is committed now, on the caller's thread (``drain()`` does, so that it
        also waits for events committed with ``within=`` before it was called). Nothing
        once stopped (the store is closed then)."""
        with self._lock:
            if self._stopping:
                return
        self._claim()
        with self._lock:
            self._lock.notify_all()

    def wait_idle(self, timeout: float | None) -> bool:
        """Block until every event handed to the relay so far is published (``False`` if
        *timeout* seconds passed first, e.g. while the transport is down)."""
        with self._lock:
            return self._lock.wait_for(
                lambda: not self._queue and not self._publishing, timeout=timeout
            )

    def stop(self, timeout: float | None) -> int:
        """Stop publishing once the queue is empty, the transport is failing, or *timeout*
        seconds passed, whichever comes first; what is left is released in the store for the
        next relay (this process restarted, or another one), and logged. Returns how many
        events were left."""
        with self._lock:
            self._lock.wait_for(
                lambda: (not self._queue and not self._publishing) or self._failing,
                timeout=timeout,
            )
            self._stopping = True
            self._lock.notify_all()
        self._thread.join()
        left = list(self._queue)
        self._queue.clear()
        if left:
            try:
                self._store.release([(item.event.id, RELAY) for item in left])
            except Exception as exc:  # noqa: BLE001 - still owned: taken over after the lease
                self._log.internal_error("store", exc)
            for item in left:
                self._log.left_in_store(item.event, RELAY, "unpublished")
        return len(left)

    # -- the relay's thread --------------------------------------------------------------

    def _append(self, item: StoredDelivery) -> None:
        if item.event.id not in self._queued:
            self._queued.add(item.event.id)
            self._queue.append(item)

    def _run(self) -> None:
        failures = 0
        while True:
            with self._lock:
                self._lock.wait_for(
                    lambda: self._stopping or self._queue or self._claim_wanted,
                    timeout=self._store.poll_interval,
                )
                if self._stopping:
                    return
                # Claim when told of new rows, and on every idle poll (rows of processes that
                # never told us: crashed ones, SQLite writers elsewhere).
                claim = self._claim_wanted or not self._queue
                self._claim_wanted = False
            if claim and not failures:
                self._claim()
            with self._lock:
                head = self._queue[0] if self._queue else None
                self._publishing = head is not None
            if head is None:
                continue
            if self._publish(head, failures):
                if failures:
                    self._log.relay_resumed(failures)
                    with self._lock:
                        self._failing = False
                failures = 0
                continue
            failures += 1
            with self._lock:  # keep its place; wait before trying again (close() ends it)
                self._publishing = False
                self._failing = True
                self._lock.notify_all()
                self._lock.wait_for(
                    lambda: self._stopping, timeout=BACKOFF[min(failures, len(BACKOFF)) - 1]
                )

    def _claim(self) -> None:
        """Take over outbox rows nobody alive owns: committed by other connections
        (``within=``), released by a closed bus, left by a crashed one. With a shared store,
        only while this relay leads (what it claimed before losing the lead it still
        publishes: those rows are its own)."""
        if self._lead is not None and not self._leads():
            return
        try:
            found = self._store.claim([RELAY])
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            self._log.internal_error("store", exc)
            return
        for letter in found.quarantined:
            self._observer.dead_lettered(letter)
        if found.deliveries:
            with self._lock:
                for item in found.deliveries:
                    self._append(item)

    def _leads(self) -> bool:
        """Whether this relay leads; a relay that does not asks again once per poll
        interval, not at every wake (asking opens a connection)."""
        assert self._lead is not None
        now = time.monotonic()
        if not self._leading and now < self._next_ask:
            return False
        self._leading = self._lead("relay")
        if not self._leading:
            self._next_ask = now + self._store.poll_interval
        return self._leading

    def _publish(self, item: StoredDelivery, failures: int) -> bool:
        """Publish *item*, then mark it published; ``False`` if the transport failed."""
        event = item.event
        try:
            if item.due_at is not None:
                self._transport.publish(event, not_before=item.due_at)
            else:
                self._transport.publish(event)
        except Exception as exc:  # noqa: BLE001 - kept, and tried again after a pause
            if not failures:
                self._log.relay_failed(event, exc, len(self._queue))
            return False
        try:
            self._store.succeeded(event.id, RELAY)
        except Exception as exc:  # noqa: BLE001 - published; at worst published again later
            self._log.internal_error("store", exc)
        self._observer.published(event)
        with self._lock:
            self._queue.popleft()
            self._queued.discard(event.id)
            self._publishing = False
            self._lock.notify_all()
        return True
