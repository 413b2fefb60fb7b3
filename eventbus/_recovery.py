"""Taking over what a store holds unfinished: an earlier run's or a crashed process's work,
replays made from the command line, and events committed with ``emit(..., within=conn)``,
found by polling while the bus runs and, at once, when the store hears of new work."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eventbus._observe import Observer
    from eventbus._outcomes import OutcomeRecorder
    from eventbus._pipeline import Pipeline
    from eventbus._registry import Registry
    from eventbus.typing import Cancellable, Clock, Store

__all__ = ["BusReporter", "StoreRecovery"]


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
        self._taking = threading.Lock()
        self._poll: Cancellable | None = None
        self._polling = False
        self._looking = False
        self._again = False  # told of new work during a look: look once more right after
        self._turn = 0  # the one scheduled look that may run (a cancelled one may still fire)
        self._stopped = False
        self._warned_unknown: set[str] = set()

    def take_over(self, *, explicit: bool = False) -> int:
        """Claim and queue what the store holds unfinished for our handlers; return how many
        were queued (retries at their due time). Blocks on the store. Logged as
        ``bus.recovered`` when *explicit* (:meth:`EventBus.recover`) or when it took over
        work that had begun elsewhere; new work committed elsewhere and never attempted
        (``emit(..., within=conn)``) is the ordinary case, logged as ``bus.claimed`` (debug)."""
        # One take-over at a time: drain()'s look waits for a background look to have queued
        # what it claimed, so that drain() then waits for those deliveries too.
        with self._taking:
            return self._take_over(explicit=explicit)

    def _take_over(self, *, explicit: bool) -> int:
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
        fresh = all(d.state == "pending" and not d.attempts for d in claim.deliveries)
        if claim.quarantined or (claim.deliveries and (explicit or not fresh)):
            self._log.recovered(queued, len(claim.quarantined))
        elif claim.deliveries:
            self._log.claimed(queued)
        return queued

    def start_polling(self) -> None:
        """Look again every ``store.poll_interval`` seconds until :meth:`stop`, and at once
        whenever the store hears of new work (:meth:`wake`). Idempotent."""
        with self._lock:
            if not self._polling and not self._stopped:
                self._polling = True
                self._schedule(self._store.poll_interval)

    def wake(self) -> None:
        """The store heard of new work (a commit of another connection): look now rather than
        at the next poll. Ignored until polling started. Thread-safe; never blocks."""
        with self._lock:
            if not self._polling or self._stopped:
                return
            if self._looking:
                self._again = True
                return
            if self._poll is not None:
                self._poll.cancel()
            self._schedule(0.0)

    def look_now(self, timeout: float | None) -> None:
        """If polling: claim what is committed now and queue it (``drain()`` does, so that it
        also waits for work committed with ``within=`` before it was called). Waits at most
        *timeout* seconds: a store may be locked by the application's open transaction (SQLite);
        the look then finishes on its own thread, and the next look finds the rest. A failure
        is logged, not raised."""
        with self._lock:
            if not self._polling or self._stopped:
                return
        look = threading.Thread(target=self._look_logged, name="eventbus-drain-look", daemon=True)
        look.start()
        look.join(timeout)

    def _look_logged(self) -> None:
        try:
            self.take_over()
        except Exception as exc:  # noqa: BLE001 - drain goes on; the next look may work
            self._log.internal_error("store", exc)

    def _schedule(self, delay: float) -> None:
        """Under the lock: the next look, *delay* seconds from now (and no other)."""
        self._turn += 1
        turn = self._turn
        self._poll = self._clock.call_later(delay, lambda: self._look(turn))

    def _look(self, turn: int) -> None:
        with self._lock:
            if self._stopped or self._looking or turn != self._turn:
                return
            self._looking, self._again = True, False
        try:
            if self._store.needs_claim():
                self.take_over()
        except Exception as exc:  # noqa: BLE001 - keep polling; the next look may work
            self._log.internal_error("store", exc)
        with self._lock:
            self._looking = False
            if not self._stopped:
                self._schedule(0.0 if self._again else self._store.poll_interval)

    def stop(self) -> None:
        """Stop polling (the clock is closed right after, so a look in progress ends)."""
        with self._lock:
            self._stopped = True
            if self._poll is not None:
                self._poll.cancel()


class BusReporter:
    """The :class:`~eventbus.typing.Reporter` a bus hands its store or transport: background
    errors go to the bus's log, news of work to whoever claims it (the bus's recovery, or its
    outbox relay), once there is one."""

    def __init__(self, log: OutcomeRecorder) -> None:
        self._log = log
        #: Called when the store hears of work (the bus's recovery, or its outbox relay).
        self.on_work: Callable[[], None] | None = None

    def internal_error(self, where: str, error: BaseException) -> None:
        self._log.internal_error(where, error)

    def stream_dead_lettered(self, entry_id: str, fields: Mapping[str, str], reason: str) -> None:
        self._log.stream_dead_lettered(entry_id, fields, reason)

    def stream_taken_over(self, count: int) -> None:
        self._log.stream_taken_over(count)

    def work_available(self) -> None:
        on_work = self.on_work
        if on_work is not None:
            on_work()
