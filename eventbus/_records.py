"""Where each delivery stands, in memory: one :class:`Dispatch` per event, bounded retention of
settled events, idempotency keys and the in-memory dead letters.

A dispatch is the unit of work: the executor runs it once per handler, and each run claims the
next handler's index from an atomic counter, so an event costs one object (not one per
delivery) and its handlers still run concurrently on idle workers. Per-delivery state is one
``int`` in a list: ``attempts * ATTEMPT + state``. Objects are made only for what is rare: a
failure's error text, a delivery taken over or replayed with its own context.

Thread-safety: a delivery's progress is written only by the thread running it; an event's
bookkeeping (settling its last delivery, reopening one, eviction) is done under the records'
lock, which the success path takes once per event, not per delivery.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from eventbus._admission import LOCK_FREE
from eventbus._event import DeadLetter, Delivery, Event

if TYPE_CHECKING:
    from eventbus._event import DeliveryState
    from eventbus._registry import Subscription

__all__ = [
    "ATTEMPT",
    "DEAD",
    "PENDING",
    "RETRYING",
    "RUNNING",
    "SCHEDULED",
    "SUCCEEDED",
    "Dispatch",
    "Extra",
    "Records",
    "RetryJob",
]

PENDING, RUNNING, RETRYING, SUCCEEDED, DEAD, SCHEDULED = 0, 1, 2, 3, 4, 5
STATES: tuple[DeliveryState, ...] = (
    "pending",
    "running",
    "retrying",
    "succeeded",
    "dead",
    "scheduled",
)
#: ``progress[i] // ATTEMPT`` is the attempts started; ``progress[i] % ATTEMPT`` the state.
ATTEMPT = 8
STATE_MASK = ATTEMPT - 1


class Extra:
    """What only some deliveries have: a last error, their own context (taken over or
    replayed), and when their first attempt started if not with the event."""

    __slots__ = ("context", "error", "first_attempt_at")

    def __init__(self) -> None:
        self.error: str | None = None
        self.context: contextvars.Context | None = None
        self.first_attempt_at: float | None = None


class Dispatch:
    """One event and its deliveries, one per subscription, by index. Calling it runs the next
    delivery not yet started (it is the job the executor runs, once per handler); *run* is the
    attempt, called as ``run(dispatch, index)`` inside the delivery's context."""

    __slots__ = (
        "admitted_at",
        "context",
        "cursor",
        "event",
        "extras",
        "key",
        "progress",
        "run",
        "settled",
        "subs",
        "token",
        "total",
        "verbose",
    )

    def __init__(
        self,
        event: Event,
        subs: Sequence[Subscription],
        context: contextvars.Context | None,
        run: Callable[[Dispatch, int], None],
        *,
        admitted_at: float = 0.0,
        verbose: bool = True,
        key: str | None = None,
        token: str | None = None,
    ) -> None:
        self.event = event
        self.subs = subs
        self.context = context
        self.run = run
        self.admitted_at = admitted_at
        self.verbose = verbose
        self.key = key
        # The transport's id for an event received from it: acknowledged once all settle.
        self.token = token
        self.progress = [PENDING] * len(subs)
        self.total = len(subs)
        self.cursor = itertools.count()  # next() is atomic: each run claims one index
        self.settled = itertools.count(1)
        self.extras: dict[int, Extra] | None = None

    def __call__(self) -> None:
        # The job of each first attempt: one call into the attempt, in a copy of the
        # emitter's context (a Context is entered by one thread at a time, and handlers of one
        # event run concurrently; the copy also keeps their context changes apart).
        context = self.context
        assert context is not None  # dropped only once every delivery settled
        context.copy().run(self.run, self, next(self.cursor))

    def claim(self) -> int:
        """Claim the next index not yet started, as a run would (for a job never run)."""
        return next(self.cursor)

    def extra(self, index: int) -> Extra:
        """The rare per-delivery data of delivery *index*, made on first use."""
        extras = self.extras
        if extras is None:
            extras = self.extras = {}
        found = extras.get(index)
        if found is None:
            found = extras[index] = Extra()
        return found

    def error(self, index: int) -> str | None:
        extras = self.extras
        if extras is None:
            return None
        found = extras.get(index)
        return None if found is None else found.error

    def context_of(self, index: int) -> contextvars.Context | None:
        extras = self.extras
        if extras is not None:
            found = extras.get(index)
            if found is not None and found.context is not None:
                return found.context
        return self.context

    def snapshot(self, index: int) -> Delivery:
        progress = self.progress[index]
        return Delivery(
            self.subs[index].name,
            STATES[progress & STATE_MASK],
            progress // ATTEMPT,
            self.error(index),
        )

    def set_state(self, index: int, state: int) -> None:
        """Move delivery *index* to *state*, keeping its attempt count."""
        progress = self.progress
        progress[index] = progress[index] - (progress[index] & STATE_MASK) + state

    def index_of(self, handler: str) -> int | None:
        for index, sub in enumerate(self.subs):
            if sub.name == handler:
                return index
        return None


class RetryJob:
    """A job that runs one delivery of a dispatch: again (a retry, a replay, a take-over), or
    on its own (a delivery that passes a policy gate or runs on an event loop).

    *not_before* (the bus clock's monotonic time) makes it wait until then first: an event
    emitted with a delay, a retry recovered before its due time."""

    __slots__ = ("dispatch", "index", "not_before")

    def __init__(self, dispatch: Dispatch, index: int, not_before: float | None = None) -> None:
        self.dispatch = dispatch
        self.index = index
        self.not_before = not_before

    def __call__(self) -> None:
        dispatch = self.dispatch
        context = dispatch.context_of(self.index)
        assert context is not None  # an unsettled delivery's context is kept
        context.copy().run(dispatch.run, dispatch, self.index)

    def claim(self) -> int:
        return self.index


class Records:
    """Dispatches by event id, bounded retention of settled ones, idempotency keys and the
    in-memory dead letters. Thread-safe."""

    def __init__(self, retention: int) -> None:
        if isinstance(retention, bool) or not isinstance(retention, int) or retention < 0:
            raise ValueError(f"status_retention must be an int >= 0, got {retention!r}")
        self._retention = retention
        self._lock = threading.Lock()
        self._events: dict[str, Dispatch] = {}
        self._settled: OrderedDict[str, None] = OrderedDict()  # oldest first: evictable
        self._keys: dict[str, Dispatch] = {}
        # A replay finds the event's dispatch by id (adopt), so a letter alone is enough.
        self._dead: dict[str, DeadLetter] = {}

    def add(self, dispatch: Dispatch) -> None:
        """Record a new dispatch (under the admission lock for keyed ones, see find_key)."""
        event_id = dispatch.event.id
        self._events[event_id] = dispatch
        if dispatch.key is not None:
            self._keys[dispatch.key] = dispatch
        if dispatch.total == 0:
            with self._lock:
                self._mark_settled(dispatch)

    def find_key(self, key: str) -> Event | None:
        """The retained event emitted under idempotency *key*, if any."""
        found = self._keys.get(key)
        return None if found is None else found.event

    def get(self, event_id: str) -> Dispatch | None:
        return self._events.get(event_id)

    def event_settled(self, dispatch: Dispatch, count: int) -> bool:
        """The settle counter of *dispatch* reached *count*, its total when read: mark the
        event settled (it is evictable from now on) unless a take-over reopened a delivery
        meanwhile. Returns whether it was marked.

        With the GIL this takes no lock (it runs once per event, on whichever worker settled
        last): a take-over raises the total first and then unmarks the event, so checking
        the total again after marking catches one that came in between, whichever order the
        two threads ran in. Without the GIL it takes the records' lock.
        """
        if not LOCK_FREE:
            with self._lock:
                if count != dispatch.total:
                    return False
                self._mark_settled(dispatch)
            return True
        if count != dispatch.total:
            return False
        self._mark_settled(dispatch)
        if count != dispatch.total:  # reopened meanwhile: not settled after all
            self._settled.pop(dispatch.event.id, None)
            return False
        return True

    def _mark_settled(self, dispatch: Dispatch) -> None:
        # The emitter's context may hold large objects: let it go. Each step is one
        # operation on a dict or OrderedDict, atomic under the GIL; two threads evicting at
        # once may find the oldest entry gone already.
        dispatch.context = None
        settled = self._settled
        settled[dispatch.event.id] = None
        while len(settled) > self._retention:
            try:
                old, _ = settled.popitem(last=False)
            except KeyError:
                break
            evicted = self._events.pop(old, None)
            if evicted is not None and evicted.key is not None:
                self._keys.pop(evicted.key, None)

    def adopt(
        self,
        event: Event,
        subscription: Subscription,
        context: contextvars.Context,
        run: Callable[[Dispatch, int], None],
        *,
        attempts: int = 0,
        error: str | None = None,
        first_attempt_at: float,
    ) -> tuple[Dispatch, int] | None:
        """An unsettled delivery of *event* to *subscription*'s handler, for work taken over
        from a store or replayed: the event's dispatch is reused (re-added if evicted) or made.
        ``None`` if that delivery is already in flight here."""
        with self._lock:
            dispatch = self._events.get(event.id)
            if dispatch is None:
                dispatch = Dispatch(event, [], None, run)
                self._events[event.id] = dispatch
            index = dispatch.index_of(subscription.name)
            subs = list(dispatch.subs)
            if index is None:
                index = len(subs)
                subs.append(subscription)
            elif dispatch.progress[index] & STATE_MASK < SUCCEEDED:
                return None
            else:
                subs[index] = subscription
            # Subscriptions before progress: status() on another thread reads progress's
            # length and then indexes subs, so subs must never be the shorter.
            dispatch.subs = subs
            if index == len(dispatch.progress):
                dispatch.progress.append(PENDING)
            dispatch.progress[index] = attempts * ATTEMPT + PENDING
            extra = dispatch.extra(index)
            extra.context = context
            extra.error = error
            extra.first_attempt_at = first_attempt_at
            # The total first, then unmark: event_settled() on another thread checks the
            # total again after marking, so it undoes a mark that lands in between.
            dispatch.total += 1
            self._settled.pop(event.id, None)  # unsettled again: not evictable
            return dispatch, index

    # -- dead letters (a bus without a store keeps them here) ------------------------------

    def add_dead_letter(self, dead_letter: DeadLetter) -> None:
        """Keep a dead letter (also one taken for a replay that could not go ahead)."""
        with self._lock:
            self._dead[dead_letter.id] = dead_letter

    def take_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        with self._lock:
            return self._dead.pop(dead_letter_id, None)

    def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        with self._lock:
            return self._dead.get(dead_letter_id)

    def dead_letters(self) -> list[DeadLetter]:
        with self._lock:
            return list(self._dead.values())

    def purge_dead_letters(self) -> int:
        with self._lock:
            count = len(self._dead)
            self._dead.clear()
            return count
