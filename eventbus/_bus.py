"""EventBus: the one place that composes registry, executor, retry queue, records, outcomes and
signals."""

from __future__ import annotations

import atexit
import contextvars
import enum
import os
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Any, Literal, Self, overload

from eventbus import signals
from eventbus._clock import SystemClock
from eventbus._dispatch import WorkerPool
from eventbus._event import DeadLetter, DeadLetterReason, Delivery, Event, freeze_metadata, new_id
from eventbus._matching import validate_name
from eventbus._outcomes import DEFAULT_REDACT_KEYS, OutcomeRecorder, format_error
from eventbus._records import DeliveryRecord, EventRecord, Records
from eventbus._registry import (
    Registry,
    Subscription,
    check_handler,
    check_target,
    event_name_of,
)
from eventbus._routing import GiveUp, RetryAfter, route
from eventbus.exceptions import (
    BusClosedError,
    DrainInHandlerError,
    InvalidEventError,
    QueueFullError,
    UnknownDeadLetterError,
    UnknownEventError,
    UnknownHandlerError,
)
from eventbus.retry import RetryPolicy, RetryQueue
from eventbus.typing import (
    Cancellable,
    Clock,
    DeliveryState,
    Executor,
    Handler,
    HandlerT,
    Job,
    Store,
    Transport,
)

__all__ = ["EventBus"]

#: The default ``max_pending`` of a bus with a store.
DURABLE_MAX_PENDING = 10_000


class _Default(enum.Enum):
    """A default that depends on other options (so ``None`` keeps its own meaning)."""

    TOKEN = enum.auto()


#: How long the interpreter-exit hook lets a forgotten bus finish its work.
EXIT_TIMEOUT = 10.0

_open_buses: weakref.WeakSet[EventBus] = weakref.WeakSet()


@atexit.register
def _close_open_buses() -> None:
    # Worker threads are daemons, so without this a bus nobody closed would lose its queued
    # deliveries silently at exit. Closing turns whatever cannot finish into dead letters and
    # logs how many.
    for bus in list(_open_buses):
        bus.close(timeout=EXIT_TIMEOUT)


class EventBus:
    """An in-process event bus: handlers subscribe with :meth:`on`, :meth:`emit` returns at
    once, and each (event, handler) delivery runs on its own, retried with backoff on failure
    and kept as a dead letter when it runs out of attempts.

    Every public method is thread-safe. ``emit``, ``on``, ``subscribe``, ``off``, ``status`` and
    ``dead_letters`` never block on handlers; ``drain`` and ``close`` wait for them.

    Options:

    * ``max_workers``: worker threads (default ``min(32, cpu_count + 4)``, as for
      ``ThreadPoolExecutor``). Not allowed together with ``executor``.
    * ``retry``: the default :class:`RetryPolicy` for handlers that do not set their own.
    * ``executor``: where deliveries run, e.g. :class:`eventbus.testing.InlineExecutor`.
    * ``clock``: time source and timer for backoff, e.g. :class:`eventbus.testing.FakeClock`.
    * ``status_retention``: how many settled events :meth:`status` remembers (default 10,000;
      oldest evicted first; events with deliveries still in flight are never evicted).
    * ``max_pending``: bound on deliveries queued or running. Default: unbounded without a
      store or transport; :data:`DURABLE_MAX_PENDING` (10,000) with one, where an unbounded
      queue would hide a backlog that recovery has to replay, or that a consumer reads ahead
      of the others (pass ``None`` to ask for unbounded).
      When the bound is reached, ``emit()`` blocks until there is room, for at most
      ``block_timeout`` seconds (``None``: as long as it takes; ``0``: not at all), then raises
      :class:`~eventbus.exceptions.QueueFullError` having queued nothing. Emits from inside a
      handler never block (the handler might be waiting for itself) and may exceed the bound.
      An event with more handlers than ``max_pending`` is admitted when nothing else is queued.
    * ``log_payloads``: add payloads and metadata, with secrets redacted, to log records.
    * ``redact_keys``: key fragments whose values are redacted when payloads are logged.
    * ``name``: used for thread names and as the structlog logger name.
    * ``store``: a :class:`~eventbus.typing.Store` that keeps every delivery's state, e.g.
      :class:`eventbus.stores.SQLiteStore`, so that work survives a crash (see
      :meth:`recover`). Without one, records live in this process's memory only. The bus
      opens the store and closes it in :meth:`close`; one store serves one open bus.
    """

    def __init__(
        self,
        *,
        max_workers: int | None = None,
        retry: RetryPolicy | None = None,
        executor: Executor | None = None,
        clock: Clock | None = None,
        status_retention: int = 10_000,
        max_pending: int | Literal[_Default.TOKEN] | None = _Default.TOKEN,
        block_timeout: float | None = None,
        log_payloads: bool = False,
        redact_keys: Iterable[str] = DEFAULT_REDACT_KEYS,
        name: str = "eventbus",
        store: Store | None = None,
        transport: Transport | None = None,
    ) -> None:
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
        if block_timeout is not None and block_timeout < 0:
            raise ValueError(f"block_timeout must be >= 0 or None, got {block_timeout!r}")
        if executor is not None and max_workers is not None:
            raise TypeError("pass max_workers or executor, not both")
        if store is not None and transport is not None:
            # The transport keeps undelivered work (an entry is acknowledged only once all its
            # deliveries settled), so a store would be a second record of the same thing.
            raise TypeError("pass store or transport, not both")
        self._retry = retry if retry is not None else RetryPolicy()
        self._records = Records(status_retention)
        self._outcomes = OutcomeRecorder(
            logger_name=name, log_payloads=log_payloads, redact_keys=redact_keys
        )
        self._registry = Registry()
        self._lock = threading.Lock()
        # One condition for every waiter (drain, close, emit blocked on a full queue). It is
        # notified only while someone waits, so the delivery hot path pays one comparison.
        self._changed = threading.Condition(self._lock)
        self._sleepers = 0
        if max_pending is _Default.TOKEN:
            max_pending = None if store is None and transport is None else DURABLE_MAX_PENDING
        self._max_pending = _check_bound(max_pending, "max_pending")
        self._block_timeout = block_timeout
        self._active = 0  # deliveries queued or running
        self._waiting = 0  # deliveries waiting in the retry queue
        self._abandoned = 0  # dead letters made by close()
        self._closed = False  # no more emits
        self._stopped = False  # no more retries: every new failure is a final one
        self._in_handler = threading.local()
        own_clock, own_executor = clock is None, executor is None
        if clock is None:
            system_clock = SystemClock(name=f"{name}-timer")
            system_clock.on_error = lambda exc: self._outcomes.internal_error("timer", exc)
            clock = system_clock
        self._clock = clock
        self._retries: RetryQueue[DeliveryRecord] = RetryQueue(clock, self._retry_due)
        if executor is None:
            workers = max_workers if max_workers is not None else min(32, (os.cpu_count() or 1) + 4)
            executor = WorkerPool(
                workers,
                name=name,
                on_error=lambda exc: self._outcomes.internal_error("worker", exc),
            )
        self._executor = executor
        self._store = store
        self._transport = transport
        if transport is not None:
            transport.on_error = lambda exc: self._outcomes.internal_error("transport", exc)
            transport.on_dead = self._outcomes.stream_dead_lettered
            transport.on_taken_over = self._outcomes.stream_taken_over
        self._warned_unknown: set[str] = set()
        self._poll: Cancellable | None = None
        self._left_in_store = 0  # deliveries close() left unfinished in the store
        if store is not None:
            self._open_store(store, own_executor=own_executor, own_clock=own_clock)
        _open_buses.add(self)

    def _open_store(self, store: Store, *, own_executor: bool, own_clock: bool) -> None:
        store.on_error = lambda exc: self._outcomes.internal_error("store", exc)
        try:
            store.open()  # raises if another bus has it open
        except BaseException:
            # Nothing of this bus may outlive the failed constructor: stop the threads it
            # started (not an executor or clock the caller passed in: those are theirs). No
            # job was ever submitted, so waiting for the idle workers is immediate.
            if own_executor:
                self._executor.shutdown(None)
            if own_clock:
                self._clock.close()
            raise

    # -- subscriptions -------------------------------------------------------------------

    def on(
        self,
        event: str | type[Any],
        *,
        retry: RetryPolicy | None = None,
        priority: int = 0,
        name: str | None = None,
    ) -> Callable[[HandlerT], HandlerT]:
        """Decorator: subscribe the function to *event* and return it unchanged.

        *event* is a name (``"order:created"``), a pattern (``"order:*"``, ``"**"``) or an event
        class. Raises at decoration time: ``InvalidEventNameError`` (``ValueError``) for a
        malformed name or pattern, ``InvalidEventError`` (``TypeError``) for anything else,
        ``InvalidHandlerError`` (``TypeError``) for a handler that cannot take one event,
        ``DuplicateHandlerError`` (``ValueError``) for a name clash.
        """
        target = check_target(event)
        _check_options(retry, priority, name)

        def decorator(handler: HandlerT) -> HandlerT:
            check_handler(handler)
            self._registry.add(target, handler, name=name, priority=priority, retry=retry)
            if isinstance(target, type):
                self._register_type(target)
            return handler

        return decorator

    def subscribe(
        self,
        event: str | type[Any],
        handler: HandlerT,
        *,
        retry: RetryPolicy | None = None,
        priority: int = 0,
        name: str | None = None,
    ) -> HandlerT:
        """Subscribe *handler* to *event*; the non-decorator form of :meth:`on`, which see.
        Returns *handler*."""
        return self.on(event, retry=retry, priority=priority, name=name)(handler)

    def off(self, handler: Handler | str) -> int:
        """Unsubscribe *handler* (a callable or a handler name) from everything; return how many
        subscriptions were removed. Deliveries already accepted still run to their end."""
        return self._registry.remove(handler)

    # -- emitting ------------------------------------------------------------------------

    @overload
    def emit(
        self,
        event: str,
        payload: Any = None,
        *,
        metadata: Mapping[str, str] | None = None,
        key: str | None = None,
    ) -> Event: ...

    @overload
    def emit(
        self, event: object, *, metadata: Mapping[str, str] | None = None, key: str | None = None
    ) -> Event: ...

    def emit(
        self,
        event: object,
        payload: Any = None,
        *,
        metadata: Mapping[str, str] | None = None,
        key: str | None = None,
    ) -> Event:
        """Publish an event and return it at once; handlers run later, on the executor.

        *event* is a name, with an optional *payload*, or an instance of an event class (the
        instance is then the payload). The emitter's context variables are visible in every
        handler of this event. Never blocks on handlers. With a store, returns once the event
        and its deliveries are committed.

        *key* makes the emit idempotent: while the event first emitted under that key is
        retained (``status_retention``, or the store's retention), emitting again with the
        same key delivers nothing and returns that first event.

        Raises ``BusClosedError`` after :meth:`close`, ``InvalidEventNameError`` for a
        malformed name, ``InvalidEventError`` for a payload next to an event instance or for a
        plain value in place of an event, ``TypeError`` for non-string metadata, a non-string
        key or (with a store) a payload the store cannot encode, ``ValueError`` for an empty
        key, and ``QueueFullError`` when ``max_pending`` is reached and ``block_timeout`` runs
        out. In every error case nothing was queued or stored.
        """
        if self._closed:
            raise BusClosedError("emit() after close(): this bus accepts no more events")
        name, cls, payload = _resolve_event(event, payload)
        if key is not None:
            _check_key(key)
        emitted = Event(
            name=name,
            payload=payload,
            metadata=freeze_metadata(metadata),
            id=new_id(),
            occurred_at=datetime.now(UTC),
        )
        if self._transport is not None:
            return self._publish(self._transport, emitted, key)
        record = self._new_record(emitted, cls, key=key if self._store is None else None)
        first = self._admit(record, key)
        if first is not None:
            return first
        self._log_admitted(record)
        if signals.has_receivers(signals.event_emitted):
            self._signal(signals.event_emitted, event=emitted)
        self._submit_all(record)
        return emitted

    def _new_record(
        self,
        event: Event,
        cls: type[Any] | None,
        *,
        key: str | None = None,
        token: str | None = None,
    ) -> EventRecord:
        """The event's record, with one delivery per subscribed handler, in the caller's
        context (not yet counted as active)."""
        subscriptions = self._registry.resolve(event.name, cls)
        context = contextvars.copy_context()
        record = EventRecord(event, key, token)
        for sub in subscriptions:
            record.deliveries[sub.name] = DeliveryRecord(record, sub, self._policy(sub), context)
        record.unsettled = len(subscriptions)
        return record

    def _log_admitted(self, record: EventRecord) -> None:
        # Asked once per event, not per delivery: filtered-out successes then cost nothing.
        record.verbose = self._outcomes.debug_enabled()
        if not record.deliveries:
            self._outcomes.unhandled(record.event)
        elif record.verbose:
            self._outcomes.emitted(record.event, record.unsettled)

    def _submit_all(self, record: EventRecord) -> None:
        submit = self._executor.submit
        for delivery in record.deliveries.values():
            submit(self._job(delivery))

    def _policy(self, subscription: Subscription) -> RetryPolicy:
        return subscription.retry if subscription.retry is not None else self._retry

    def _publish(self, transport: Transport, event: Event, key: str | None) -> Event:
        """emit() with a transport: hand the event over; the buses consuming it deliver it."""
        if key is not None:
            raise ValueError(
                "key= needs a store; with a transport, redeliveries are expected and handlers "
                "deduplicate by event id (see docs/scaling-out.md)"
            )
        if self._closed:
            raise BusClosedError("emit() after close(): this bus accepts no more events")
        transport.publish(event)
        if self._outcomes.debug_enabled():
            self._outcomes.published(event)
        if signals.has_receivers(signals.event_emitted):
            self._signal(signals.event_emitted, event=event)
        return event

    def _receive(self, event: Event, token: str) -> None:
        """The transport's hand-over of one event (on its reader thread): deliver it to the
        local handlers. Blocks while the bus is full (backpressure on the reader); does not
        acknowledge anything when the bus is closing, so the event goes to another consumer."""
        # No local holds the payload: a traceback renderer that shows locals would print it.
        cls = None if type(event.payload).__module__ == "builtins" else type(event.payload)
        record = self._new_record(event, cls, token=token)
        count = record.unsettled
        limit = self._max_pending
        with self._lock:
            if limit is not None:  # no timeout: a full bus holds the reader back
                self._wait(lambda: self._closed or self._has_room(count, limit), None)
            if self._closed:
                return
            self._active += count
            self._records.add(record)
        self._log_admitted(record)
        if not record.deliveries:
            self._acknowledge(token)
        self._submit_all(record)

    def _acknowledge(self, token: str) -> None:
        transport = self._transport
        assert transport is not None
        try:
            transport.settled(token)
        except Exception as exc:  # noqa: BLE001 - not acknowledged: delivered again later
            self._outcomes.internal_error("transport", exc)

    def _admit(self, record: EventRecord, key: str | None) -> Event | None:
        """Count the event's deliveries as active (waiting for room if the bus is full) and
        record it, in the store if there is one. Returns the first event emitted under *key*
        instead, having admitted nothing, when there is one."""
        store = self._store
        count = record.unsettled
        with self._lock:
            if self._closed:  # lost the race with close(): nothing was queued
                raise BusClosedError("emit() after close(): this bus accepts no more events")
            if key is not None and store is None:
                first = self._records.find_key(key)
                if first is not None:
                    return first
            limit = self._max_pending
            if limit is not None and self._active + count > limit:
                self._wait_for_room(count, limit)
                # The lock was let go while waiting: another emit may have taken the key.
                if key is not None and store is None:
                    first = self._records.find_key(key)
                    if first is not None:
                        return first
            self._active += count
            if store is None:
                self._records.add(record)
                return None
        return self._store_event(store, record, key)

    def _store_event(self, store: Store, record: EventRecord, key: str | None) -> Event | None:
        """Commit the event (its deliveries already counted as active), or give the counted
        room back when the store refuses it or already holds the key's first event."""
        count = record.unsettled
        try:
            first = store.add(record.event, list(record.deliveries), key)
        except BaseException:
            self._release_room(count)
            raise
        if first is not None:
            self._release_room(count)
            return first
        with self._lock:
            self._records.add(record)
        return None

    def _release_room(self, count: int) -> None:
        with self._lock:
            self._active -= count
            if self._sleepers:
                self._changed.notify_all()

    def _register_type(self, cls: type[Any]) -> None:
        # A store or transport decodes only classes it knows (it never imports by name), so
        # a class subscribed here is made known to whichever of them encodes payloads.
        for carrier in (self._store, self._transport):
            codec = getattr(carrier, "codec", None)
            if codec is not None:
                codec.register(cls)

    def _wait_for_room(self, count: int, limit: int) -> None:
        """Under self._lock: wait until *count* more deliveries fit under *limit*."""
        if getattr(self._in_handler, "active", False):
            return

        if not self._wait(
            lambda: self._closed or self._has_room(count, limit), self._block_timeout
        ):
            raise QueueFullError(
                f"{self._active} deliveries pending (max_pending={limit}); "
                f"waited {self._block_timeout} s for room"
            )
        if self._closed:
            raise BusClosedError("the bus closed while emit() waited for room")

    def _has_room(self, count: int, limit: int) -> bool:
        # Under self._lock. An event with more handlers than the limit fits an empty bus.
        return self._active == 0 or self._active + count <= limit

    # -- running one delivery ------------------------------------------------------------

    def _job(self, delivery: DeliveryRecord) -> Job:
        # A partial, not a lambda: cheap to call, and close() can tell which delivery a job
        # that never started belongs to.
        return partial(self._run, delivery)

    def _run(self, delivery: DeliveryRecord) -> None:
        context = delivery.context
        assert context is not None  # only settled deliveries drop their context
        # A copy per attempt: handlers of one event run concurrently, and a Context can be
        # entered by one thread at a time; it also keeps handlers' context changes apart.
        # The outcome is recorded inside it too, so the emitter's structlog bindings (a
        # request id) appear on handler.succeeded/failed records as well as in the handler.
        context.copy().run(self._attempt, delivery)

    def _attempt(self, delivery: DeliveryRecord) -> None:
        delivery.attempts += 1
        delivery.state = "running"
        verbose = delivery.owner.verbose
        started = self._clock.monotonic() if verbose or delivery.attempts == 1 else 0.0
        if delivery.attempts == 1:
            delivery.first_attempt_at = started
        store = self._store
        local = self._in_handler
        # Held for the handler and for the outcome's signal receivers after it: both run
        # while this delivery counts as active, so close() or drain() from either would wait
        # for itself, and an emit from either must not block on a full bus.
        outer = getattr(local, "active", False)
        local.active = True
        try:
            try:
                if store is not None:  # committed first: a crash in the handler is an attempt
                    store.started(delivery.event.id, delivery.handler, delivery.attempts)
                delivery.subscription.handler(delivery.event)
            except BaseException as exc:  # noqa: BLE001 - isolation: nothing reaches the emitter
                self._failed(delivery, exc)
            else:
                self._succeeded(delivery, started, verbose)
        finally:
            local.active = outer

    def _succeeded(self, delivery: DeliveryRecord, started: float, verbose: bool) -> None:
        store = self._store
        if store is not None:
            self._persist(store.succeeded, delivery.event.id, delivery.handler)
        # Recorded and signalled before it settles, so that once drain() returns every
        # outcome line has been written and every receiver has run.
        if verbose:
            duration = self._clock.monotonic() - started
            self._outcomes.succeeded(delivery.event, delivery.handler, delivery.attempts, duration)
        if signals.has_receivers(signals.handler_succeeded):
            done = Delivery(delivery.handler, "succeeded", delivery.attempts, delivery.error)
            self._signal(signals.handler_succeeded, event=delivery.event, delivery=done)
        self._settle(delivery, "succeeded")

    def _failed(self, delivery: DeliveryRecord, error: BaseException) -> None:
        delivery.error = format_error(error)
        elapsed = self._clock.monotonic() - delivery.first_attempt_at
        step = route(delivery.policy, delivery.attempts, error, elapsed)
        if isinstance(step, GiveUp) and step.policy_error is not None:
            delivery.error = f"{delivery.error}; the retry policy raised {step.policy_error}"
        self._outcomes.failed(
            delivery.event,
            delivery.handler,
            delivery.attempts,
            error,
            isinstance(step, RetryAfter),
        )
        if signals.has_receivers(signals.handler_failed):
            self._signal(
                signals.handler_failed,
                event=delivery.event,
                delivery=delivery.snapshot(),
                error=error,
            )
        if isinstance(step, GiveUp):
            self._dead_letter(delivery, step.reason, _traceback(error))
            return
        delay = step.delay
        if self._store is not None:
            due_at = time.time() + delay  # wall-clock: the next process reads it too
            self._persist(
                self._store.retrying,
                delivery.event.id,
                delivery.handler,
                delivery.attempts,
                delivery.error,
                due_at,
            )
        with self._lock:
            if self._stopped:  # closed: there is no retry queue to wait in any more
                stopped = True
            else:
                stopped = False
                self._to_retry_queue(delivery, delay)
        if stopped:
            self._abandon([delivery], _traceback(error))
            return
        self._outcomes.retry_scheduled(delivery.event, delivery.handler, delivery.attempts, delay)
        if signals.has_receivers(signals.retry_scheduled):
            self._signal(
                signals.retry_scheduled,
                event=delivery.event,
                delivery=delivery.snapshot(),
                delay=delay,
            )

    def _to_retry_queue(self, delivery: DeliveryRecord, delay: float) -> None:
        """Under self._lock: move an active delivery to the retry queue for *delay* seconds."""
        delivery.state = "retrying"
        self._waiting += 1
        # Queued before the lock is let go: close() takes everything waiting under this lock,
        # and must not find the delivery counted but not yet queued.
        self._retries.schedule(delivery, delay)
        self._finish_one()  # wakes close(), which waits for _active == 0

    def _retry_due(self, delivery: DeliveryRecord) -> None:
        # Called by the retry queue's timer (and by close() for retries already due): back
        # onto the executor, unless the bus stopped.
        with self._lock:
            self._waiting -= 1
            self._active += 1
            stopped = self._stopped
            if not stopped:
                delivery.state = "pending"
        if stopped:
            self._abandon([delivery], None)
        else:
            self._executor.submit(self._job(delivery))

    def _dead_letter(
        self, delivery: DeliveryRecord, reason: DeadLetterReason, trace: str | None
    ) -> None:
        """Settle an active delivery as a dead letter (the caller counted it as active)."""
        dead_letter = DeadLetter(
            id=new_id(),
            event=delivery.event,
            handler=delivery.handler,
            attempts=delivery.attempts,
            error=delivery.error or "abandoned at shutdown before it ran",
            reason=reason,
            traceback=trace,
        )
        store = self._store
        if store is not None:
            self._persist(store.dead, dead_letter)
        with self._lock:
            if store is None:
                self._records.add_dead_letter(dead_letter, delivery)
            if reason == "abandoned":
                self._abandoned += 1
        self._outcomes.dead_lettered(dead_letter)  # before settling: see _attempt
        if signals.has_receivers(signals.dead_lettered):
            self._signal(signals.dead_lettered, event=dead_letter.event, dead_letter=dead_letter)
        self._settle(delivery, "dead")

    def _settle(self, delivery: DeliveryRecord, state: DeliveryState) -> None:
        """Record an active delivery's final state and stop counting it as active."""
        token = delivery.owner.token
        with self._lock:
            finished = self._records.settle(delivery, state)
            if token is None:
                self._finish_one()
                return
        # An event from a transport: acknowledged before the delivery stops counting, so that
        # once drain() returns the transport has been told.
        if finished:
            self._acknowledge(token)
        with self._lock:
            self._finish_one()

    def _abandon(self, deliveries: list[DeliveryRecord], trace: str | None) -> None:
        """Settle active deliveries the stopped bus will not run: dead letters ("abandoned")
        without a store; with one, they stay unfinished in it for the next process."""
        store = self._store
        if store is None and self._transport is None:
            for delivery in deliveries:
                self._dead_letter(delivery, "abandoned", trace)
            return
        if store is not None and deliveries:
            self._persist(store.release, [(d.event.id, d.handler) for d in deliveries])
        # With a transport, the event's entry is simply not acknowledged: another consumer
        # (or this one, restarted) takes it over after the transport's claim_idle.
        left = self._outcomes.left_in_store if store is not None else self._outcomes.left_in_stream
        for delivery in deliveries:
            left(delivery.event, delivery.handler, delivery.state)
        with self._lock:
            self._left_in_store += len(deliveries)
            self._active -= len(deliveries)
            if self._sleepers:
                self._changed.notify_all()

    def _persist(self, write: Callable[..., object], *args: Any) -> None:
        # A store write after the fact (a success, a failure): if it fails the delivery's
        # in-memory outcome stands and the store still holds the earlier state, so a later
        # recovery runs it again (at least once). Say so loudly; never lose the worker.
        try:
            write(*args)
        except Exception as exc:  # noqa: BLE001 - reported, and the delivery goes on
            self._outcomes.internal_error("store", exc)

    def _finish_one(self) -> None:
        # Under self._lock.
        self._active -= 1
        if self._sleepers:
            self._changed.notify_all()

    def _wait(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        # Under self._lock.
        self._sleepers += 1
        try:
            return self._changed.wait_for(predicate, timeout)
        finally:
            self._sleepers -= 1

    def _signal(self, signal: Any, **kwargs: Any) -> None:
        # Receivers run on whichever thread made the outcome (a worker, the timer, close()),
        # often while the outcome's delivery still counts as active: close() or drain() from
        # a receiver would wait for itself, so they raise DrainInHandlerError there.
        local = self._in_handler
        outer = getattr(local, "active", False)
        local.active = True
        try:
            signals.send(signal, self, self._outcomes.receiver_failed, **kwargs)
        finally:
            local.active = outer

    # -- waiting, inspecting, replaying ---------------------------------------------------

    def drain(self, timeout: float | None = None) -> bool:
        """Block until no delivery is queued, running or waiting for a retry, including those
        of events emitted meanwhile (by handlers, too), and, with a store, until their outcomes
        are committed. Returns ``False`` if *timeout* seconds passed first. Raises
        ``DrainInHandlerError`` when called from a handler, where it would wait for itself."""
        if getattr(self._in_handler, "active", False):
            raise DrainInHandlerError("drain() inside a handler would wait for itself forever")
        with self._lock:
            drained = self._wait(lambda: self._active + self._waiting == 0, timeout)
        if drained and self._store is not None:
            self._store.flush()  # so the store, read from anywhere, says what drain() saw
        return drained

    def status(self, event_id: str) -> Mapping[str, Delivery]:
        """Where each delivery of the event stands, by handler name (a snapshot). With a store,
        events of other processes and earlier runs are found there.

        Raises ``UnknownEventError`` (a ``KeyError``) for an id never emitted on this bus (or
        its store) or already evicted by retention."""
        # With a store, its rows are the base (other processes' deliveries, earlier runs) and
        # this bus's in-memory records, fresher for what runs here, are laid over them.
        stored = None if self._store is None else self._store.status(event_id)
        with self._lock:
            record = self._records.get(event_id)
            if record is None and stored is None:
                raise UnknownEventError(event_id)
            here = {} if record is None else record.deliveries
            return {**(stored or {}), **{name: d.snapshot() for name, d in here.items()}}

    def dead_letters(self) -> list[DeadLetter]:
        """The dead letters, oldest first (with a store: all of the store's). They stay until
        replayed or purged."""
        if self._store is not None:
            return self._store.dead_letters()
        with self._lock:
            return self._records.dead_letters()

    def replay(self, dead_letter: DeadLetter | str) -> None:
        """Queue a dead letter's delivery again, with a fresh attempt count, to the handler of
        that name as subscribed now. The handler runs in the caller's context.

        Raises ``UnknownDeadLetterError`` (a ``KeyError``) if it was already replayed or
        purged, ``UnknownHandlerError`` if no handler of that name is subscribed any more
        (the dead letter then stays), and ``BusClosedError`` after close."""
        dead_letter_id = dead_letter if isinstance(dead_letter, str) else dead_letter.id
        context = contextvars.copy_context()
        if self._store is not None:
            self._replay_stored(self._store, dead_letter_id, context)
            return
        with self._lock:
            if self._closed:
                raise BusClosedError("replay() after close()")
            found = self._records.get_dead_letter(dead_letter_id)
            if found is None:
                raise UnknownDeadLetterError(dead_letter_id)
            letter, delivery = found
            subscription = self._registry.find(letter.handler)
            if subscription is None:
                raise UnknownHandlerError(
                    f"no handler named {letter.handler!r} is subscribed; the dead letter stays"
                )
            self._records.pop_dead_letter(dead_letter_id)
            delivery.subscription = subscription
            delivery.policy = self._policy(subscription)
            delivery.context = context
            delivery.attempts = 0
            delivery.error = None
            self._records.reopen(delivery)
            self._active += 1
        self._outcomes.replayed(letter)
        self._executor.submit(self._job(delivery))

    def _replay_stored(
        self, store: Store, dead_letter_id: str, context: contextvars.Context
    ) -> None:
        if self._closed:
            raise BusClosedError("replay() after close()")
        letter = store.dead_letter(dead_letter_id)
        if letter is None:
            raise UnknownDeadLetterError(dead_letter_id)
        subscription = self._registry.find(letter.handler)
        if subscription is None:
            raise UnknownHandlerError(
                f"no handler named {letter.handler!r} is subscribed; the dead letter stays"
            )
        if store.replay_dead_letter(dead_letter_id, claim=True) is None:
            raise UnknownDeadLetterError(dead_letter_id)  # replayed elsewhere meanwhile
        policy = self._policy(subscription)
        with self._lock:
            delivery = self._records.adopt(letter.event, subscription, policy, context)
            assert delivery is not None  # it was dead, so not in flight
            delivery.first_attempt_at = self._clock.monotonic()
            self._active += 1
        self._outcomes.replayed(letter)
        self._executor.submit(self._job(delivery))

    def purge_dead_letters(self) -> int:
        """Delete every dead letter; return how many there were."""
        if self._store is not None:
            return self._store.purge_dead_letters()
        with self._lock:
            return self._records.purge_dead_letters()

    # -- recovering from a store ---------------------------------------------------------

    def recover(self) -> int:
        """Take over the store's unfinished deliveries (those of an earlier run or a crashed
        process) and queue them; return how many. Call it once handlers are subscribed.

        Pending and interrupted deliveries are queued now, retries at their due time. A
        delivery whose process died during its last allowed attempt becomes a dead letter
        (``"exhausted"``), so a handler that kills the process cannot loop across restarts.
        Deliveries for handler names not subscribed here are left pending in the store for
        a process that has the handler, with one ``delivery.unknown_handler`` warning per
        name. Rows that cannot be decoded become dead letters. Afterwards the bus keeps
        looking every ``store.poll_interval`` seconds, so replays made from the command line
        and the work of a process that dies later are picked up while it runs.

        With a transport instead of a store, this is what starts the bus consuming its share
        of the stream (see :class:`eventbus.transports.RedisStreamsTransport`); it returns how
        many events of stopped consumers it took over.

        Raises ``RuntimeError`` without a store or transport, ``BusClosedError`` after close.
        """
        if self._closed:
            raise BusClosedError("recover() after close()")
        if self._transport is not None:
            return self._transport.start(self._receive)
        if self._store is None:
            raise RuntimeError(
                "recover() needs a store or a transport: EventBus(store=SQLiteStore(...))"
            )
        count = self._take_over(self._store)
        with self._lock:
            if self._poll is None and not self._closed:
                self._poll = self._clock.call_later(self._store.poll_interval, self._poll_store)
        return count

    def _poll_store(self) -> None:
        store = self._store
        assert store is not None
        if self._closed:
            return
        try:
            if store.needs_claim():
                self._take_over(store)
        except Exception as exc:  # noqa: BLE001 - keep polling; the next look may work
            self._outcomes.internal_error("store", exc)
        with self._lock:
            if not self._closed:
                self._poll = self._clock.call_later(store.poll_interval, self._poll_store)

    def _take_over(self, store: Store) -> int:
        claim = store.claim(self._registry.names())
        for letter in claim.quarantined:
            self._outcomes.dead_lettered(letter)
        for handler, count in claim.unknown.items():
            if handler not in self._warned_unknown:
                self._warned_unknown.add(handler)
                self._outcomes.unknown_handler(handler, count)
        now = time.time()
        queued = 0
        for stored in claim.deliveries:
            subscription = self._registry.find(stored.handler)
            if subscription is None:  # unsubscribed since the claim: give it back
                store.release([(stored.event.id, stored.handler)])
                continue
            policy = self._policy(subscription)
            with self._lock:
                delivery = self._records.adopt(
                    stored.event, subscription, policy, contextvars.copy_context()
                )
                if delivery is None:
                    continue
                delivery.attempts = stored.attempts
                delivery.error = stored.error
                delivery.first_attempt_at = self._clock.monotonic()
                self._active += 1
            if stored.state == "running" and stored.attempts >= policy.max_attempts:
                delivery.error = (
                    f"ProcessLost: the process stopped during attempt {stored.attempts}"
                )
                self._dead_letter(delivery, "exhausted", None)
                continue
            queued += 1
            delay = 0.0 if stored.due_at is None else stored.due_at - now
            if stored.state == "retrying" and delay > 0:
                with self._lock:
                    self._to_retry_queue(delivery, delay)
            else:
                self._executor.submit(self._job(delivery))
        if claim.deliveries or claim.quarantined:
            self._outcomes.recovered(queued, len(claim.quarantined))
        return queued

    # -- shutting down -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def close(self, timeout: float | None = None) -> None:
        """Stop intake, let queued and running deliveries finish, run retries that are due,
        then stop the workers. Blocks up to *timeout* seconds (``None``: until done).

        Retries not yet due, and (after a timeout) deliveries that never started, become dead
        letters with reason ``"abandoned"``; with a store they stay unfinished in it instead,
        for :meth:`recover` to pick up. A ``bus.closed`` record says how many of each. Handlers
        still running after a timeout finish on their own and are recorded as usual (with a
        store, a handler still running when the store closes is run again after recovery).
        The store is closed last. Idempotent. Raises ``DrainInHandlerError`` when called from
        a handler.
        """
        if getattr(self._in_handler, "active", False):
            raise DrainInHandlerError(
                "close() inside a handler would wait for itself forever; close from outside"
            )
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()  # emits blocked on a full queue give up now
        _open_buses.discard(self)
        deadline = None if timeout is None else time.monotonic() + timeout
        self._settle_due(deadline)
        # Stop the timer before the last pass: once close() returns no callback is running, so
        # a retry the timer was handing over at this moment is settled below, not abandoned.
        # Retries failing from here on stay in the queue (the closed clock never fires them)
        # and are run by _settle_due if they are due, else abandoned.
        self._clock.close()
        self._settle_due(deadline)
        with self._lock:
            self._stopped = True
            waiting = self._retries.take_all()
            self._waiting -= len(waiting)
            self._active += len(waiting)
        not_started = [_delivery_of(job) for job in self._executor.shutdown(_remaining(deadline))]
        self._abandon(waiting + not_started, None)
        with self._lock:
            still_running = self._active
            abandoned = self._abandoned
            left_in_store = None if self._store is None else self._left_in_store
        if self._store is not None:
            self._persist(self._store.close)
        if self._transport is not None:
            self._persist(self._transport.close)
        self._outcomes.closed(abandoned, still_running, left_in_store)
        if signals.has_receivers(signals.bus_closed):
            self._signal(signals.bus_closed, abandoned=abandoned)

    def _settle_due(self, deadline: float | None) -> None:
        """Wait for the queue and running handlers to finish, and run due retries, until only
        retries that are not yet due remain (or the deadline passes)."""
        while True:
            with self._lock:
                if not self._wait(lambda: self._active == 0, _remaining(deadline)):
                    return
            due = self._retries.take_due(self._clock.monotonic())
            if not due:
                return
            for delivery in due:
                self._retry_due(delivery)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<EventBus {state} active={self._active} retrying={self._waiting}>"


def _delivery_of(job: Job) -> DeliveryRecord:
    assert isinstance(job, partial)  # the bus submits nothing else
    delivery = job.args[0]
    assert isinstance(delivery, DeliveryRecord)
    return delivery


def _resolve_event(event: object, payload: Any) -> tuple[str, type[Any] | None, Any]:
    """emit()'s arguments as (event name, event class or None, payload); raises as emit() says."""
    if isinstance(event, str):
        return validate_name(event), None, payload
    cls = type(event)
    if payload is not None:
        raise InvalidEventError(
            "an event instance is its own payload: call emit(instance), not emit(instance, payload)"
        )
    if isinstance(event, type) or cls.__module__ == "builtins":
        raise InvalidEventError(f"emit() takes an event name or an event instance, got {event!r}")
    return event_name_of(cls), cls, event


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    if not key:
        raise ValueError("key must not be empty")


def _check_bound(value: int | None, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{what} must be at least 1, got {value!r}")
    return value


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _traceback(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))


def _check_options(retry: object, priority: object, name: object) -> None:
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise TypeError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int, got {type(priority).__name__}")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name must be a non-empty str, got {name!r}")
