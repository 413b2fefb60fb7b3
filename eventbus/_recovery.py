"""Taking over what a store holds unfinished: an earlier run's or a crashed process's work,
and replays made from the command line, found by polling while the bus runs."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eventbus._observe import Observer
    from eventbus._pipeline import Pipeline
    from eventbus._registry import Registry
    from eventbus.typing import Cancellable, Clock, Store

__all__ = ["StoreRecovery"]


class StoreRecovery:
    """Claims a store's unfinished deliveries for one bus and queues them. Thread-safe."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        pipeline: Pipeline,
        observer: Observer,
        clock: Clock,
    ) -> None:
        self._store = store
        self._registry = registry
        self._pipeline = pipeline
        self._observer = observer
        self._log = observer.log
        self._clock = clock
        self._wall: Callable[[], float] = getattr(clock, "time", time.time)
        self._lock = threading.Lock()
        self._poll: Cancellable | None = None
        self._stopped = False
        self._warned_unknown: set[str] = set()

    def take_over(self) -> int:
        """Claim and queue what the store holds unfinished for our handlers; return how many
        were queued (retries at their due time). Blocks on the store."""
        store, pipeline = self._store, self._pipeline
        claim = store.claim(self._registry.names())
        for letter in claim.quarantined:
            self._observer.dead_lettered(letter)
        for handler, count in claim.unknown.items():
            if handler not in self._warned_unknown:
                self._warned_unknown.add(handler)
                self._log.unknown_handler(handler, count)
        now = self._wall()  # due times are wall-clock: another process wrote them
        queued = 0
        for stored in claim.deliveries:
            subscription = self._registry.find(stored.handler)
            if subscription is None:  # unsubscribed since the claim: give it back
                store.release([(stored.event.id, stored.handler)])
                continue
            policy = subscription.retry if subscription.retry is not None else pipeline.policy
            adopted = pipeline.adopt(
                stored.event,
                subscription,
                contextvars.copy_context(),
                attempts=stored.attempts,
                error=stored.error,
            )
            if adopted is None:
                continue
            dispatch, index = adopted
            if stored.state == "running" and stored.attempts >= policy.max_attempts:
                # Its process died during its last allowed attempt: a handler that kills the
                # process must not loop across restarts.
                dispatch.extra(
                    index
                ).error = f"ProcessLost: the process stopped during attempt {stored.attempts}"
                pipeline.dead_letter(dispatch, index, "exhausted", None)
                continue
            queued += 1
            delay = 0.0 if stored.due_at is None else stored.due_at - now
            pipeline.queue(dispatch, index, delay if stored.state == "retrying" else 0.0)
        if claim.deliveries or claim.quarantined:
            self._log.recovered(queued, len(claim.quarantined))
        return queued

    def start_polling(self) -> None:
        """Look again every ``store.poll_interval`` seconds until :meth:`stop`."""
        with self._lock:
            if self._poll is None and not self._stopped:
                self._poll = self._clock.call_later(self._store.poll_interval, self._look)

    def _look(self) -> None:
        with self._lock:
            if self._stopped:
                return
        try:
            if self._store.needs_claim():
                self.take_over()
        except Exception as exc:  # noqa: BLE001 - keep polling; the next look may work
            self._log.internal_error("store", exc)
        with self._lock:
            if not self._stopped:
                self._poll = self._clock.call_later(self._store.poll_interval, self._look)

    def stop(self) -> None:
        """Stop polling (the clock is closed right after, so a look in progress ends)."""
        with self._lock:
            self._stopped = True
