"""EventBus: the one place that composes registry, executor, retry queue, records, outcomes and
signals."""

from __future__ import annotations

import atexit
import contextvars
import os
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Any, Self, overload

from eventbus import signals
from eventbus._clock import SystemClock
from eventbus._dispatch import WorkerPool
from eventbus._event import DeadLetter, DeadLetterReason, Delivery, Event, freeze_metadata, new_id
from eventbus._matching import validate_name
from eventbus._outcomes import DEFAULT_REDACT_KEYS, OutcomeRecorder, format_error
from eventbus._records import DeliveryRecord, EventRecord, Records
from eventbus._registry import Registry, check_handler, check_target, event_name_of
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
from eventbus.typing import Clock, Executor, Handler, HandlerT, Job

__all__ = ["EventBus"]

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
    * ``max_pending``: bound on deliveries queued or running (default ``None``: unbounded).
      When the bound is reached, ``emit()`` blocks until there is room, for at most
      ``block_timeout`` seconds (``None``: as long as it takes; ``0``: not at all), then raises
      :class:`~eventbus.exceptions.QueueFullError` having queued nothing. Emits from inside a
      handler never block (the handler might be waiting for itself) and may exceed the bound.
      An event with more handlers than ``max_pending`` is admitted when nothing else is queued.
    * ``log_payloads``: add payloads and metadata, with secrets redacted, to log records.
    * ``redact_keys``: key fragments whose values are redacted when payloads are logged.
    * ``name``: used for thread names and as the structlog logger name.
    """

    def __init__(
        self,
        *,
        max_workers: int | None = None,
        retry: RetryPolicy | None = None,
        executor: Executor | None = None,
        clock: Clock | None = None,
        status_retention: int = 10_000,
        max_pending: int | None = None,
        block_timeout: float | None = None,
        log_payloads: bool = False,
        redact_keys: Iterable[str] = DEFAULT_REDACT_KEYS,
        name: str = "eventbus",
    ) -> None:
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
        if block_timeout is not None and block_timeout < 0:
            raise ValueError(f"block_timeout must be >= 0 or None, got {block_timeout!r}")
        if executor is not None and max_workers is not None:
            raise TypeError("pass max_workers or executor, not both")
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
        self._max_pending = _check_bound(max_pending, "max_pending")
        self._block_timeout = block_timeout
        self._active = 0  # deliveries queued or running
        self._waiting = 0  # deliveries waiting in the retry queue
        self._abandoned = 0  # dead letters made by close()
        self._closed = False  # no more emits
        self._stopped = False  # no more retries: every new failure is a final one
        self._in_handler = threading.local()
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
        _open_buses.add(self)

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
        self, event: str, payload: Any = None, *, metadata: Mapping[str, str] | None = None
    ) -> Event: ...

    @overload
    def emit(self, event: object, *, metadata: Mapping[str, str] | None = None) -> Event: ...

    def emit(
        self, event: object, payload: Any = None, *, metadata: Mapping[str, str] | None = None
    ) -> Event:
        """Publish an event and return it at once; handlers run later, on the executor.

        *event* is a name, with an optional *payload*, or an instance of an event class (the
        instance is then the payload). The emitter's context variables are visible in every
        handler of this event. Never blocks on handlers.

        Raises ``BusClosedError`` after :meth:`close`, ``InvalidEventNameError`` for a
        malformed name, ``InvalidEventError`` for a payload next to an event instance or for a
        plain value in place of an event, ``TypeError`` for non-string metadata, and
        ``QueueFullError`` when ``max_pending`` is reached and ``block_timeout`` runs out. In
        every error case nothing was queued.
        """
        if self._closed:
            raise BusClosedError("emit() after close(): this bus accepts no more events")
        if isinstance(event, str):
            cls = None
            name = validate_name(event)
        else:
            cls = type(event)
            if payload is not None:
                raise InvalidEventError(
                    "an event instance is its own payload: call emit(instance), not "
                    "emit(instance, payload)"
                )
            if isinstance(event, type) or cls.__module__ == "builtins":
                raise InvalidEventError(
                    f"emit() takes an event name or an event instance, got {event!r}"
                )
            name = event_name_of(cls)
            payload = event
        emitted = Event(
            name=name,
            payload=payload,
            metadata=freeze_metadata(metadata),
            id=new_id(),
            occurred_at=datetime.now(UTC),
        )
        subscriptions = self._registry.resolve(name, cls)
        context = contextvars.copy_context()
        record = EventRecord(emitted)
        for sub in subscriptions:
            policy = sub.retry if sub.retry is not None else self._retry
            record.deliveries[sub.name] = DeliveryRecord(record, sub, policy, context)
        count = record.unsettled = len(subscriptions)
        with self._lock:
            if self._closed:  # lost the race with close(): nothing was queued
                raise BusClosedError("emit() after close(): this bus accepts no more events")
            limit = self._max_pending
            if limit is not None and self._active + count > limit:
                self._wait_for_room(count, limit)
            self._active += count
            self._records.add(record)
        # Asked once per event, not per delivery: filtered-out successes then cost nothing.
        record.verbose = self._outcomes.debug_enabled()
        if not subscriptions:
            self._outcomes.unhandled(emitted)
        elif record.verbose:
            self._outcomes.emitted(emitted, count)
        if signals.has_receivers(signals.event_emitted):
            self._signal(signals.event_emitted, event=emitted)
        submit = self._executor.submit
        for delivery in record.deliveries.values():
            submit(self._job(delivery))
        return emitted

    def _wait_for_room(self, count: int, limit: int) -> None:
        """Under self._lock: wait until *count* more deliveries fit under *limit*."""
        if getattr(self._in_handler, "active", False):
            return

        def fits() -> bool:
            return self._active == 0 or self._active + count <= limit

        if not self._wait(lambda: self._closed or fits(), self._block_timeout):
            raise QueueFullError(
                f"{self._active} deliveries pending (max_pending={limit}); "
                f"waited {self._block_timeout} s for room"
            )
        if self._closed:
            raise BusClosedError("the bus closed while emit() waited for room")

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
        local = self._in_handler
        local.active = True
        try:
            delivery.subscription.handler(delivery.event)
        except BaseException as exc:  # noqa: BLE001 - isolation: nothing reaches the emitter
            local.active = False
            self._failed(delivery, exc)
        else:
            local.active = False
            with self._lock:
                self._records.settle(delivery, "succeeded")
                self._finish_one()
            if verbose:
                duration = self._clock.monotonic() - started
                self._outcomes.succeeded(
                    delivery.event, delivery.handler, delivery.attempts, duration
                )
            if signals.has_receivers(signals.handler_succeeded):
                self._signal(
                    signals.handler_succeeded, event=delivery.event, delivery=delivery.snapshot()
                )

    def _failed(self, delivery: DeliveryRecord, error: BaseException) -> None:
        delivery.error = format_error(error)
        elapsed = self._clock.monotonic() - delivery.first_attempt_at
        delay = delivery.policy.next_delay(delivery.attempts, error, elapsed=elapsed)
        self._outcomes.failed(
            delivery.event, delivery.handler, delivery.attempts, error, delay is not None
        )
        if signals.has_receivers(signals.handler_failed):
            self._signal(
                signals.handler_failed,
                event=delivery.event,
                delivery=delivery.snapshot(),
                error=error,
            )
        if delay is None:
            reason: DeadLetterReason = (
                "exhausted" if delivery.policy.is_retryable(error) else "not_retryable"
            )
            self._dead_letter(delivery, reason, _traceback(error))
            return
        with self._lock:
            if self._stopped:  # closed: there is no retry queue to wait in any more
                stopped = True
            else:
                stopped = False
                delivery.state = "retrying"
                self._waiting += 1
                self._finish_one()  # wakes close(), which waits for _active == 0
        if stopped:
            self._dead_letter(delivery, "abandoned", _traceback(error))
            return
        self._retries.schedule(delivery, delay)
        self._outcomes.retry_scheduled(delivery.event, delivery.handler, delivery.attempts, delay)
        if signals.has_receivers(signals.retry_scheduled):
            self._signal(
                signals.retry_scheduled,
                event=delivery.event,
                delivery=delivery.snapshot(),
                delay=delay,
            )

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
            self._dead_letter(delivery, "abandoned", None)
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
        with self._lock:
            self._records.settle(delivery, "dead")
            self._records.add_dead_letter(dead_letter, delivery)
            if reason == "abandoned":
                self._abandoned += 1
            self._finish_one()
        self._outcomes.dead_lettered(dead_letter)
        if signals.has_receivers(signals.dead_lettered):
            self._signal(signals.dead_lettered, event=dead_letter.event, dead_letter=dead_letter)

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
        signals.send(signal, self, self._outcomes.receiver_failed, **kwargs)

    # -- waiting, inspecting, replaying ---------------------------------------------------

    def drain(self, timeout: float | None = None) -> bool:
        """Block until no delivery is queued, running or waiting for a retry, including those
        of events emitted meanwhile (by handlers, too). Returns ``False`` if *timeout* seconds
        passed first. Raises ``DrainInHandlerError`` when called from a handler, where it would
        wait for itself."""
        if getattr(self._in_handler, "active", False):
            raise DrainInHandlerError("drain() inside a handler would wait for itself forever")
        with self._lock:
            return self._wait(lambda: self._active + self._waiting == 0, timeout)

    def status(self, event_id: str) -> Mapping[str, Delivery]:
        """Where each delivery of the event stands, by handler name (a snapshot).

        Raises ``UnknownEventError`` (a ``KeyError``) for an id never emitted on this bus or
        already evicted by ``status_retention``."""
        with self._lock:
            record = self._records.get(event_id)
            if record is None:
                raise UnknownEventError(event_id)
            return {name: d.snapshot() for name, d in record.deliveries.items()}

    def dead_letters(self) -> list[DeadLetter]:
        """The dead letters, oldest first. They stay until replayed or purged."""
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
            delivery.policy = subscription.retry if subscription.retry else self._retry
            delivery.context = context
            delivery.attempts = 0
            delivery.error = None
            self._records.reopen(delivery)
            self._active += 1
        self._outcomes.replayed(letter)
        self._executor.submit(self._job(delivery))

    def purge_dead_letters(self) -> int:
        """Delete every dead letter; return how many there were."""
        with self._lock:
            return self._records.purge_dead_letters()

    # -- shutting down -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def close(self, timeout: float | None = None) -> None:
        """Stop intake, let queued and running deliveries finish, run retries that are due,
        then stop the workers. Blocks up to *timeout* seconds (``None``: until done).

        Retries not yet due, and (after a timeout) deliveries that never started, become dead
        letters with reason ``"abandoned"``; a ``bus.closed`` warning says how many. Handlers
        still running after a timeout finish on their own and are recorded as usual. Idempotent.
        Raises ``DrainInHandlerError`` when called from a handler.
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
        for delivery in waiting + not_started:
            self._dead_letter(delivery, "abandoned", None)
        with self._lock:
            still_running = self._active
            abandoned = self._abandoned
        self._outcomes.closed(abandoned, still_running)
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
