"""EventBus: a facade that composes the parts of a bus and owns none of their logic.

The registry keeps subscriptions, admission counts and bounds, the pipeline runs deliveries
(runner, routing, observer), and a backend chosen once here keeps what must outlive the
process. See docs/architecture.md for how an event flows through them.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import enum
import functools
import inspect
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from datetime import timedelta
from functools import partial
from types import TracebackType
from typing import Any, Literal, Self, cast, overload

from eventbus._admission import Admission, remaining
from eventbus._backends import Backend, DurableBackend, LocalBackend, StreamedBackend
from eventbus._clock import SystemClock
from eventbus._dispatch import WorkerPool
from eventbus._event import DeadLetter, Delivery, Event, freeze_metadata, make_event
from eventbus._loop import MAX_ASYNC
from eventbus._matching import validate_name
from eventbus._observe import InDelivery, Observer
from eventbus._offload import Offload, in_thread
from eventbus._outcomes import DEFAULT_REDACT_KEYS, OutcomeRecorder
from eventbus._pipeline import Pipeline, job_delivery
from eventbus._policies import (
    Gate,
    Policy,
    check_delay,
    check_seconds,
    make_policy,
    order_keys,
)
from eventbus._records import Records, RetryJob
from eventbus._recovery import BusReporter, StoreRecovery
from eventbus._registry import (
    Registry,
    check_handler,
    check_target,
    event_name_of,
    handler_name,
)
from eventbus._relay import RELAY, Relay
from eventbus._retry_queue import RetryQueue
from eventbus._tracing import Tracing
from eventbus.exceptions import (
    BusClosedError,
    DrainInHandlerError,
    EventLoopError,
    InvalidEventError,
    QueueFullError,
    UnknownDeadLetterError,
    UnknownEventError,
    UnknownHandlerError,
)
from eventbus.retry import RetryPolicy
from eventbus.typing import Clock, Executor, Handler, HandlerT, Store, Transport

__all__ = ["EventBus"]

#: The default ``max_pending`` of a bus with a store or a transport.
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

    * ``max_workers``: worker threads for plain handlers (default ``min(32, cpu_count + 4)``,
      as for ``ThreadPoolExecutor``). Not allowed together with ``executor``.
    * ``max_async``: how many deliveries to ``async def`` handlers run at once on the bus's
      event loop (default :data:`MAX_ASYNC`, 1,000); the others wait in line, so a burst of
      events never becomes a burst of tasks. See docs/asyncio.md for which loop that is.
    * ``stall_warning``: seconds after which a still-running attempt is reported once
      (``handler.stalled``, with its stack, and the ``handler_stalled`` signal), for handlers
      that do not set their own; default ``None`` (never). See docs/policies.md.
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
    * ``transport``: a :class:`~eventbus.typing.Transport` that carries events between
      processes (see :meth:`start`). With a ``store`` too, the store is the transport's
      outbox: ``emit()`` commits the event there (inside the application's transaction with
      ``within=``) and returns; a relay publishes it afterwards, in order, retrying while the
      transport is down. :meth:`status` and :meth:`dead_letters` then describe the deliveries
      this bus runs as a consumer, as with a transport alone.
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
        max_async: int = MAX_ASYNC,
        stall_warning: float | None = None,
    ) -> None:
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
        if block_timeout is not None and block_timeout < 0:
            raise ValueError(f"block_timeout must be >= 0 or None, got {block_timeout!r}")
        if executor is not None and max_workers is not None:
            raise TypeError("pass max_workers or executor, not both")
        outbox = None
        if store is not None and transport is not None:
            # Both: the store is the transport's outbox (events are committed there first and
            # relayed to the transport), not a record of deliveries: the transport keeps those.
            outbox, store = store, None
        max_async = _check_bound(max_async, "max_async") or MAX_ASYNC
        self._stall_warning = check_seconds(stall_warning, "stall_warning")
        if max_pending is _Default.TOKEN:
            max_pending = None if store is None and transport is None else DURABLE_MAX_PENDING
        records = Records(status_retention)
        outcomes = OutcomeRecorder(
            logger_name=name, log_payloads=log_payloads, redact_keys=redact_keys
        )
        self._guard = InDelivery()
        self._observer = observer = Observer(outcomes, self, self._guard)
        self._admission = Admission(_check_bound(max_pending, "max_pending"), block_timeout)
        self._registry = Registry()
        self._records = records
        self._store = store
        self._transport = transport
        self._outbox = outbox
        own_clock, own_executor = clock is None, executor is None
        if clock is None:
            system_clock = SystemClock(name=f"{name}-timer")
            system_clock.on_error = lambda exc: outcomes.internal_error("timer", exc)
            clock = system_clock
        if executor is None:
            workers = max_workers if max_workers is not None else min(32, (os.cpu_count() or 1) + 4)
            executor = WorkerPool(
                workers, name=name, on_error=lambda exc: outcomes.internal_error("worker", exc)
            )
        self._clock = clock
        self._executor = executor
        if isinstance(executor, WorkerPool):
            self._admission.backlog = executor.has_backlog
        self._backend = self._choose_backend(records, observer)
        retries: RetryQueue[RetryJob] = RetryQueue(clock, self._retry_due)
        self._retries = retries
        self._name = name
        self._offload = Offload(name)
        self._pipeline = Pipeline(
            registry=self._registry,
            records=records,
            admission=self._admission,
            observer=observer,
            backend=self._backend,
            executor=executor,
            clock=clock,
            retries=retries,
            policy=retry if retry is not None else RetryPolicy(),
            guard=self._guard,
            offload=self._offload,
            max_async=max_async,
            name=name,
        )
        self._recovery: StoreRecovery | None = None
        self._relay: Relay | None = None
        self._tracing: Tracing | None = None  # eventbus.otel.instrument() sets it
        self._open_stores(outcomes, own_executor=own_executor, own_clock=own_clock)
        _open_buses.add(self)

    def _open_stores(
        self, outcomes: OutcomeRecorder, *, own_executor: bool, own_clock: bool
    ) -> None:
        """Open the store (with its recovery) or the outbox (with its relay); each reports
        news of work committed elsewhere to the part that claims it."""
        reporter = BusReporter(outcomes)
        store, outbox, transport = self._store, self._outbox, self._transport
        if store is not None:
            self._open_store(store, reporter, own_executor=own_executor, own_clock=own_clock)
            self._recovery = StoreRecovery(
                store, self._registry, self._pipeline, self._observer, self._clock
            )
            reporter.on_work = self._recovery.wake  # news of work from now on wakes it
        elif outbox is not None and transport is not None:
            self._open_store(outbox, reporter, own_executor=own_executor, own_clock=own_clock)
            self._relay = Relay(outbox, transport, self._observer, name=self._name)
            reporter.on_work = self._relay.wake

    def _set_tracing(self, tracing: Tracing | None) -> None:
        """Spans around emits and attempts from now on (``eventbus.otel.instrument``)."""
        self._tracing = tracing
        self._pipeline.set_tracing(tracing)

    def _counts(self) -> tuple[int, int]:
        """Deliveries queued or running, and waiting for their backoff (a snapshot)."""
        admission = self._admission
        return admission.active, admission.waiting

    def _retry_due(self, job: RetryJob) -> None:
        self._pipeline.retry_due(job)

    def _choose_backend(self, records: Records, observer: Observer) -> Backend:
        if self._store is not None:
            return DurableBackend(self._store, observer)
        transport = self._transport
        if transport is None:
            return LocalBackend(records)
        return StreamedBackend(records, transport, observer)

    def _open_store(
        self, store: Store, reporter: BusReporter, *, own_executor: bool, own_clock: bool
    ) -> None:
        try:
            # The store reports its background errors to the bus's log through the reporter,
            # and news of work committed elsewhere to the bus's recovery.
            if _takes_reporter(store.open, 0):
                store.open(reporter)  # raises if another bus has it open
            else:  # a store written before Reporter: its on_error hook
                log = self._observer.log
                store.on_error = partial(log.internal_error, "store")  # type: ignore[attr-defined]
                store.open()
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
        ordered_by: str | Callable[[Event], Hashable] | None = None,
        concurrency: int | None = None,
        rate_limit: str | None = None,
        timeout: float | None = None,
        stall_warning: float | None = None,
    ) -> Callable[[HandlerT], HandlerT]:
        """Decorator: subscribe the function to *event* and return it unchanged.

        A plain function runs on a worker thread; an ``async def`` one is awaited on the
        bus's event loop (see :meth:`astart`). *event* is a name (``"order:created"``), a
        pattern (``"order:*"``, ``"**"``) or an event class. Raises at decoration time:
        ``InvalidEventNameError`` (``ValueError``) for a malformed name or pattern,
        ``InvalidEventError`` (``TypeError``) for anything else, ``InvalidHandlerError``
        (``TypeError``) for a handler that cannot take one event or is an async generator
        function, ``DuplicateHandlerError`` (``ValueError``) for a name clash, and
        ``TypeError``/``ValueError`` for a malformed delivery option.

        Delivery options (docs/policies.md): ``ordered_by`` (a payload key or attribute
        name, or a function of the event) runs deliveries of one key one at a time, in emit
        order, retries included; ``concurrency`` bounds this handler's running attempts;
        ``rate_limit`` (``"10/s"``, ``"100/m"``, ``"5/h"``) bounds how many start per period
        (across every consumer of a transport's group, with a transport that shares limits);
        ``timeout`` (seconds) fails an attempt that runs longer with ``HandlerTimeoutError``;
        ``stall_warning`` (seconds) reports an attempt still running then. Deliveries that
        wait for a key, a slot or a token hold no worker thread.
        """
        target = check_target(event)
        _check_options(retry, priority, name)
        policy = make_policy(
            ordered_by=ordered_by,
            concurrency=concurrency,
            rate_limit=rate_limit,
            timeout=timeout,
            stall_warning=stall_warning if stall_warning is not None else self._stall_warning,
        )

        def decorator(handler: HandlerT) -> HandlerT:
            is_async = check_handler(handler)
            sub_name = handler_name(handler) if name is None else name
            gate = None if policy is None else self._gate(policy, sub_name)
            self._registry.add(
                target,
                handler,
                name=sub_name,
                priority=priority,
                retry=retry,
                is_async=is_async,
                policy=policy,
                gate=gate,
            )
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
        ordered_by: str | Callable[[Event], Hashable] | None = None,
        concurrency: int | None = None,
        rate_limit: str | None = None,
        timeout: float | None = None,
        stall_warning: float | None = None,
    ) -> HandlerT:
        """Subscribe *handler* to *event*; the non-decorator form of :meth:`on`, which see.
        Returns *handler*."""
        return self.on(
            event,
            retry=retry,
            priority=priority,
            name=name,
            ordered_by=ordered_by,
            concurrency=concurrency,
            rate_limit=rate_limit,
            timeout=timeout,
            stall_warning=stall_warning,
        )(handler)

    def _gate(self, policy: Policy, name: str) -> Gate | None:
        """The gate of a subscription whose deliveries may have to wait; ``None`` for a
        policy that only times attempts. A rate limit is shared through the transport when
        it offers one (``rate_limiter``), so it holds across all of the group's consumers."""
        if not policy.gated:
            return None
        limiter = None
        shared = getattr(self._transport, "rate_limiter", None)
        if policy.rate is not None and shared is not None:
            limiter = shared(name, policy.rate.limit, policy.rate.period)
        return self._pipeline.new_gate(policy, limiter)

    def off(self, handler: Handler | str) -> int:
        """Unsubscribe *handler* (a callable or a handler name) from everything; return how many
        subscriptions were removed. Deliveries already accepted still run to their end."""
        return self._registry.remove(handler)

    def _register_type(self, cls: type[Any]) -> None:
        # A store or transport decodes only classes it knows (it never imports by name), so
        # a class subscribed here is made known to whichever of them encodes payloads.
        for carrier in (self._store, self._transport, self._outbox):
            codec = getattr(carrier, "codec", None)
            if codec is not None:
                codec.register(cls)

    # -- emitting ------------------------------------------------------------------------

    @overload
    def emit(
        self,
        event: str,
        payload: Any = None,
        *,
        metadata: Mapping[str, str] | None = None,
        key: str | None = None,
        delay: float | timedelta | None = None,
        within: object = None,
    ) -> Event: ...

    @overload
    def emit(
        self,
        event: object,
        *,
        metadata: Mapping[str, str] | None = None,
        key: str | None = None,
        delay: float | timedelta | None = None,
        within: object = None,
    ) -> Event: ...

    def emit(
        self,
        event: object,
        payload: Any = None,
        *,
        metadata: Mapping[str, str] | None = None,
        key: str | None = None,
        delay: float | timedelta | None = None,
        within: object = None,
    ) -> Event:
        """Publish an event and return it at once; handlers run later, on the executor.

        *event* is a name, with an optional *payload*, or an instance of an event class (the
        instance is then the payload). The emitter's context variables are visible in every
        handler of this event. Never blocks on handlers. With a store, returns once the event
        and its deliveries are committed; with a transport, once it is published.

        *key* makes the emit idempotent: while the event first emitted under that key is
        retained (``status_retention``, or the store's retention), emitting again with the
        same key delivers nothing and returns that first event.

        *delay* (seconds or a ``timedelta``) makes its deliveries start no earlier than that
        from now; :meth:`status` shows them as ``"scheduled"`` meanwhile, and a store keeps
        the time across a restart.

        *within* is the application's own database connection, in a transaction: the event
        and its deliveries are written in that transaction (a psycopg 3 connection for a
        :class:`~eventbus.stores.PostgresStore`, an ``sqlite3.Connection`` to the store's file
        for a :class:`~eventbus.stores.SQLiteStore`). Nothing runs until it commits; a
        rollback leaves no trace. After the commit this bus (or any bus of the store that
        recovered) claims and runs the deliveries: this bus starts looking for committed work
        as :meth:`recover` does. Blocks only for the one write on that connection.

        Raises ``BusClosedError`` after :meth:`close`, ``InvalidEventNameError`` for a
        malformed name, ``InvalidEventError`` for a payload next to an event instance or for a
        plain value in place of an event, ``TypeError`` for non-string metadata, a non-string
        key or (with a store or transport) a payload that cannot be encoded,
        ``PayloadTooLargeError`` (a ``ValueError``) for one above the codec's size bound,
        ``ValueError`` for an empty key or a negative delay, ``QueueFullError`` when
        ``max_pending`` is reached and ``block_timeout`` runs out, and ``TransportError`` when
        the transport cannot be reached. With *within*: ``TypeError`` for a connection of
        the wrong kind (or a store that cannot write through one), ``ValueError`` for a
        closed one, one to another database, one outside a transaction, or a bus without a
        store. In every error case nothing was queued or stored.
        """
        tracing = self._tracing
        if tracing is not None:  # instrumented (eventbus.otel): the emit in a span of its own
            with tracing.produce(event) as span:
                emitted = self._emit(event, payload, span.inject(metadata), key, delay, within)
                span.sent(emitted)
                return emitted
        return self._emit(event, payload, metadata=metadata, key=key, delay=delay, within=within)

    def _emit(  # noqa: PLR0917 - positional: one call on the path of every emit
        self,
        event: object,
        payload: Any,
        metadata: Mapping[str, str] | None,
        key: str | None,
        delay: float | timedelta | None,
        within: object,
    ) -> Event:
        emitted, cls = self._prepare(event, payload, metadata, key)
        seconds = 0.0 if delay is None else check_delay(delay)
        if within is not None:
            return self._emit_within(within, emitted, cls, key, seconds)
        transport = self._transport
        if transport is not None:
            return self._publish(transport, emitted, key, seconds)
        admission = self._admission
        # On a thread running an event loop, a full bus raises rather than block the loop.
        block = admission.max_pending is None or asyncio._get_running_loop() is None
        return self._pipeline.accept(emitted, cls, key, block=block, delay=seconds)

    def _prepare(
        self, event: object, payload: Any, metadata: Mapping[str, str] | None, key: str | None
    ) -> tuple[Event, type[Any] | None]:
        """emit()'s checks, and the event it emits (with its class, for a typed event)."""
        if self._admission.closed:
            raise BusClosedError("emit() after close(): this bus accepts no more events")
        if event.__class__ is str:
            name: str = validate_name(event)
            cls = None
        else:
            name, cls, payload = _resolve_typed(event, payload)
        if key is not None:
            _check_key(key)
        return make_event(name, payload, freeze_metadata(metadata)), cls

    def _emit_within(
        self, connection: object, event: Event, cls: type[Any] | None, key: str | None, delay: float
    ) -> Event:
        """emit(within=...): the store writes the event through the caller's connection;
        this bus claims its deliveries (or, with a transport, relays the event) once the store
        hears of the commit."""
        if self._outbox is not None:
            add = self._check_within_store(self._outbox)
            due_at = time.time() + delay if delay else None
            first = cast("Event | None", add(connection, event, [RELAY], key, due_at=due_at))
            return event if first is None else first
        store, recovery = self._store, self._recovery
        if store is None or recovery is None:
            raise ValueError(
                "within= needs a bus with a store in the application's database: "
                "EventBus(store=PostgresStore(dsn)) or EventBus(store=SQLiteStore(path))"
            )
        add_within = self._check_within_store(store)
        subs = self._registry.resolve(event.name, cls)
        names = [sub.name for sub in subs]
        due_at = time.time() + delay if delay else None
        options: dict[str, object] = {"due_at": due_at}
        if _takes_order_keys(getattr(add_within, "__func__", add_within)):
            keys = order_keys(((sub.name, sub.policy) for sub in subs), event)
            if keys:
                options["order_keys"] = keys
        recovery.start_polling()  # before the write: its commit may wake the bus at once
        first = cast("Event | None", add_within(connection, event, names, key, **options))
        if first is not None:
            return first
        self._observer.emitted(event, len(names), verbose=self._observer.verbose())
        return event

    @staticmethod
    def _check_within_store(store: Store) -> Callable[..., object]:
        add_within: Callable[..., object] | None = getattr(store, "add_within", None)
        if add_within is None:
            raise TypeError(
                f"{type(store).__name__} cannot write within the application's transaction; "
                "PostgresStore and SQLiteStore can"
            )
        return add_within

    def _publish(
        self, transport: Transport, event: Event, key: str | None, delay: float = 0.0
    ) -> Event:
        """emit() with a transport: hand the event over; the buses consuming it deliver it.
        With an outbox store too: commit it there; the relay publishes it."""
        outbox, relay = self._outbox, self._relay
        if outbox is not None and relay is not None:
            due_at = time.time() + delay if delay else None
            if relay.shared:  # one relay of all processes publishes it, in commit order
                add: Callable[..., Event | None] = outbox.add
                first = add(event, [RELAY], key, due_at=due_at, claimable=True)
            else:
                first = outbox.add(event, [RELAY], key, due_at=due_at)
            if first is not None:
                return first
            relay.add(event, due_at)
            return event
        if key is not None:
            raise ValueError(
                "key= needs a store; with a transport, redeliveries are expected and handlers "
                "deduplicate by event id (see docs/scaling-out.md)"
            )
        if delay:
            # Wall-clock: the consumer that delivers it may be another process.
            transport.publish(event, not_before=time.time() + delay)
        else:
            transport.publish(event)
        self._observer.published(event)
        return event

    # -- waiting, inspecting, replaying ---------------------------------------------------

    def drain(self, timeout: float | None = None) -> bool:
        """Block until no delivery is queued, running or waiting for a retry, including those
        of events emitted meanwhile (by handlers, too), and, with a store, until their outcomes
        are committed. A bus that claims committed work (after :meth:`recover` or an
        ``emit(..., within=conn)``) first claims what is committed now, so events whose
        transaction committed before this call are waited for too. Returns ``False`` if
        *timeout* seconds passed first. Raises ``DrainInHandlerError`` when called from a
        handler, where it would wait for itself."""
        self._check_may_wait("drain", "adrain")
        return self._drain(timeout)

    def _drain(self, timeout: float | None, stop: threading.Event | None = None) -> bool:
        if self._recovery is not None:
            # Work committed with within= before this call, too (within the timeout).
            deadline = _deadline(timeout)
            self._recovery.look_now(timeout)
            timeout = remaining(deadline)
        if self._relay is not None and self._outbox is not None and not self._admission.closed:
            deadline = _deadline(timeout)
            self._relay.look_now()  # events committed with within= before this call, too
            if not self._relay.wait_idle(timeout):
                return False
            self._outbox.flush()  # so the store, read from anywhere, shows them relayed
            timeout = remaining(deadline)
        drained = self._admission.wait_idle(timeout, stop)
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
        stored = self._backend.status(event_id)
        dispatch = self._records.get(event_id)
        if dispatch is None and stored is None:
            raise UnknownEventError(event_id)
        here = {}
        if dispatch is not None:
            for index in range(len(dispatch.progress)):
                delivery = dispatch.snapshot(index)
                here[delivery.handler] = delivery
        return {**(stored or {}), **here}

    def dead_letters(self) -> list[DeadLetter]:
        """The dead letters, oldest first (with a store: all of the store's). They stay until
        replayed or purged."""
        return self._backend.dead_letters()

    def replay(self, dead_letter: DeadLetter | str) -> None:
        """Queue a dead letter's delivery again, with a fresh attempt count, to the handler of
        that name as subscribed now. The handler runs in the caller's context.

        Raises ``UnknownDeadLetterError`` (a ``KeyError``) if it was already replayed or
        purged, ``UnknownHandlerError`` if no handler of that name is subscribed any more
        (the dead letter then stays), and ``BusClosedError`` after close."""
        dead_letter_id = dead_letter if isinstance(dead_letter, str) else dead_letter.id
        if self._admission.closed:
            raise BusClosedError("replay() after close()")
        store = self._store
        letter = (
            self._records.get_dead_letter(dead_letter_id)
            if store is None
            else store.dead_letter(dead_letter_id)
        )
        if letter is None:
            raise UnknownDeadLetterError(dead_letter_id)
        subscription = self._registry.find(letter.handler)
        if subscription is None:
            raise UnknownHandlerError(
                f"no handler named {letter.handler!r} is subscribed; the dead letter stays"
            )
        taken = (
            self._records.take_dead_letter(dead_letter_id)
            if store is None
            else store.replay_dead_letter(dead_letter_id, claim=True)
        )
        if taken is None:
            raise UnknownDeadLetterError(dead_letter_id)  # replayed elsewhere meanwhile
        adopted = self._pipeline.adopt(letter.event, subscription, contextvars.copy_context())
        if adopted is None:  # close() came in between: the dead letter stays
            if store is None:
                self._records.add_dead_letter(letter)
            # With a store the row is pending and ours: close() releases it for recovery.
            raise BusClosedError("replay() after close()")
        self._observer.log.replayed(letter)
        self._pipeline.queue(*adopted)

    def purge_dead_letters(self) -> int:
        """Delete every dead letter; return how many there were."""
        return self._backend.purge_dead_letters()

    # -- taking work over from a store or a transport --------------------------------------

    def start(self) -> int:
        """Start consuming the transport's stream: call it once handlers are subscribed.
        Returns how many events of stopped consumers this bus took over at once (see
        :class:`eventbus.transports.RedisStreamsTransport`). A bus that only emits never
        starts. Raises ``RuntimeError`` without a transport, ``BusClosedError`` after close."""
        if self._admission.closed:
            raise BusClosedError("start() after close()")
        if self._transport is None:
            raise RuntimeError(
                "start() consumes a transport: EventBus(transport=RedisStreamsTransport(...))"
            )
        transport, log = self._transport, self._observer.log
        bind = getattr(transport, "bind", None)
        if bind is not None:  # a broker that routes by name (RabbitMQ): what we subscribe to
            bind(self._registry.patterns())
        if _takes_reporter(transport.start, 1):
            return transport.start(self._pipeline.receive, BusReporter(log))
        # A transport written before Reporter: its hooks.
        transport.on_error = partial(log.internal_error, "transport")  # type: ignore[attr-defined]
        transport.on_dead = log.stream_dead_lettered  # type: ignore[attr-defined]
        transport.on_taken_over = log.stream_taken_over  # type: ignore[attr-defined]
        return transport.start(self._pipeline.receive)

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

        With a transport instead of a store, this is :meth:`start` (kept for code written
        before it).

        Raises ``RuntimeError`` without a store or transport, ``BusClosedError`` after close.
        """
        if self._admission.closed:
            raise BusClosedError("recover() after close()")
        if self._transport is not None:
            return self.start()
        recovery = self._recovery
        if recovery is None:
            raise RuntimeError(
                "recover() needs a store or a transport: EventBus(store=SQLiteStore(...))"
            )
        count = recovery.take_over(explicit=True)
        recovery.start_polling()
        return count

    # -- shutting down -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._admission.closed

    def close(self, timeout: float | None = None) -> None:
        """Stop intake, let queued and running deliveries finish, run retries that are due,
        then stop the workers. Blocks up to *timeout* seconds (``None``: until done).

        Retries not yet due, and (after a timeout) deliveries that never started, become dead
        letters with reason ``"abandoned"``; with a store they stay unfinished in it instead,
        for :meth:`recover` to pick up (with a transport, in the stream for another consumer).
        A ``bus.closed`` record says how many of each. Handlers still running after a timeout
        finish on their own and are recorded as usual (with a store, a handler still running
        when the store closes is run again after recovery); ``async def`` handlers still
        running then are cancelled and settled as abandoned like deliveries never started.
        The store is closed last. Idempotent. Raises ``DrainInHandlerError`` when called from
        a handler or a signal receiver, and ``EventLoopError`` on the event loop the bus is
        bound to (``await bus.aclose()`` there).
        """
        self._check_may_wait("close", "aclose")
        self._close(timeout)

    def _check_may_wait(self, method: str, twin: str) -> None:
        if self._guard.inside():
            raise DrainInHandlerError(
                f"{method}() inside a handler would wait for itself forever; call it from "
                "outside the bus's handlers"
            )
        if self._pipeline.loops.bound_to(asyncio._get_running_loop()):
            raise EventLoopError(
                f"{method}() would block the event loop this bus's async handlers run on: "
                f"`await bus.{twin}(...)` instead"
            )

    def _close(self, timeout: float | None) -> None:
        if not self._admission.close():
            return
        _open_buses.discard(self)
        if self._recovery is not None:
            self._recovery.stop()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._settle_due(deadline)
        # Stop the timer before the last pass: once close() returns no callback is running, so
        # a retry the timer was handing over at this moment is settled below, not abandoned.
        # Retries failing from here on stay in the queue (the closed clock never fires them)
        # and are run by _settle_due if they are due, else abandoned.
        self._clock.close()
        self._settle_due(deadline)
        pipeline = self._pipeline
        waiting = pipeline.stop()
        not_started = [job_delivery(job) for job in self._executor.shutdown(remaining(deadline))]
        # Async deliveries still running now are past the deadline: cancelled, each settles
        # itself as abandoned (a thread cannot be stopped; a task can).
        not_started += [job_delivery(job) for job in pipeline.loops.shutdown()]
        pipeline.abandon(waiting + not_started, None)
        self._offload.shutdown()  # commits of async deliveries end before the store closes
        still_running = self._admission.active
        left = None if self._store is None else pipeline.left_behind
        if self._relay is not None and self._outbox is not None:
            # Before the transport closes; what it could not publish stays in the store.
            left = self._relay.stop(remaining(deadline))
            self._outbox.close()
        self._backend.close()
        self._observer.closed(pipeline.abandoned, still_running, left)

    def _settle_due(self, deadline: float | None) -> None:
        """Wait for the queue and running handlers to finish, and run due retries, until only
        retries that are not yet due remain (or the deadline passes)."""
        while True:
            if not self._admission.wait_inactive(remaining(deadline)):
                return
            due = self._retries.take_due(self._clock.monotonic())
            if not due:
                return
            for job in due:
                self._pipeline.retry_due(job)

    def __enter__(self) -> Self:
        return self

    # -- asyncio -----------------------------------------------------------------------------

    async def astart(self) -> None:
        """Bind the bus to the running event loop: ``async def`` handlers of events emitted
        from now on run there, as tasks. Without it they run on a loop of the bus's own, on a
        thread it starts when first needed and stops in :meth:`close`. ``async with bus:``
        calls this on entry and :meth:`aclose` on exit.

        Idempotent on the same loop. Raises ``BusClosedError`` after close and
        ``EventLoopError`` if the bus is bound to another loop that still runs. With a
        transport, consuming it is still :meth:`start`'s job (``await
        asyncio.to_thread(bus.start)``, as it talks to the server).
        """
        if self._admission.closed:
            raise BusClosedError("astart() after close()")
        self._pipeline.loops.bind(asyncio.get_running_loop())

    @overload
    async def aemit(
        self,
        event: str,
        payload: Any = None,
        *,
        metadata: Mapping[str, str] | None = None,
        key: str | None = None,
        delay: float | timedelta | None = None,
    ) -> Event: ...

    @overload
    async def aemit(
        self,
        event: object,
        *,
        metadata: Mapping[str, str] | None = None,
        key: str | None = None,
        delay: float | timedelta | None = None,
    ) -> Event: ...

    async def aemit(
        self,
        event: object,
        payload: Any = None,
        *,
        metadata: Mapping[str, str] | None = None,
        key: str | None = None,
        delay: float | timedelta | None = None,
    ) -> Event:
        """:meth:`emit` for coroutines: never blocks the event loop. Same arguments, result
        and errors.

        A full bus (``max_pending``) is awaited, for at most ``block_timeout`` seconds, not
        blocked on; with a store or a transport, the commit or publish runs on a thread. On
        an inline bus (:func:`eventbus.testing.inline_bus`) it returns once the event's
        deliveries ran, async ones included (those waiting for a retry excepted). Cancelling
        it while it waits for room emits nothing.
        """
        tracing = self._tracing
        if tracing is not None:  # instrumented (eventbus.otel): the emit in a span of its own
            with tracing.produce(event) as span:
                emitted = await self._aemit(event, payload, span.inject(metadata), key, delay)
                span.sent(emitted)
                return emitted
        return await self._aemit(event, payload, metadata, key, delay)

    async def _aemit(
        self,
        event: object,
        payload: Any,
        metadata: Mapping[str, str] | None,
        key: str | None,
        delay: float | timedelta | None,
    ) -> Event:
        emitted, cls = self._prepare(event, payload, metadata, key)
        seconds = 0.0 if delay is None else check_delay(delay)
        durable = self._store is not None or self._transport is not None
        deadline = _deadline(self._admission.block_timeout)
        while True:
            try:
                if durable:
                    result = await self._offload.run(self._accept, emitted, cls, key, seconds)
                else:
                    result = self._accept(emitted, cls, key, seconds)
                break
            except QueueFullError:
                left = remaining(deadline)
                count = len(self._registry.resolve(emitted.name, cls))
                room = left != 0 and await in_thread(
                    self._admission.wait_room, count, left, name=f"{self._name}-aemit"
                )
                if not room:
                    raise
        pipeline = self._pipeline
        if pipeline.waits_inline and not self._guard.inside():
            await pipeline.loops.idle()
        return result

    def _accept(self, event: Event, cls: type[Any] | None, key: str | None, delay: float) -> Event:
        """emit() past its checks, never waiting for room (QueueFullError instead)."""
        transport = self._transport
        if transport is not None:
            return self._publish(transport, event, key, delay)
        return self._pipeline.accept(event, cls, key, block=False, delay=delay)

    async def adrain(self, timeout: float | None = None) -> bool:
        """:meth:`drain` for coroutines: awaits, without blocking the event loop, until no
        delivery (thread or async) is queued, running or waiting for a retry. Returns
        ``False`` if *timeout* seconds passed first. Raises ``DrainInHandlerError`` from
        inside a handler."""
        if self._guard.inside():
            raise DrainInHandlerError("adrain() inside a handler would wait for itself forever")
        if self._store is None and self._admission.wait_idle(0):
            return True  # idle already: no thread to start (a store would want its flush)
        stop = threading.Event()
        try:
            return await in_thread(self._drain, timeout, stop, name=f"{self._name}-drain")
        finally:
            stop.set()  # cancelled: the waiting thread gives up at its next look

    async def aclose(self, timeout: float | None = None) -> None:
        """:meth:`close` for coroutines: awaits, without blocking the event loop, what
        :meth:`close` waits for. Same timeout and outcomes. Raises ``DrainInHandlerError``
        from inside a handler."""
        if self._guard.inside():
            raise DrainInHandlerError("aclose() inside a handler would wait for itself forever")
        await in_thread(self._close, timeout, name=f"{self._name}-close")

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._admission.closed else "open"
        admission = self._admission
        return f"<EventBus {state} active={admission.active} retrying={admission.waiting}>"


def _resolve_typed(event: object, payload: Any) -> tuple[str, type[Any] | None, Any]:
    """emit()'s arguments for anything but a plain name: (name, class or None, payload)."""
    if isinstance(event, str):  # a str subclass
        return validate_name(event), None, payload
    cls = type(event)
    if payload is not None:
        raise InvalidEventError(
            "an event instance is its own payload: call emit(instance), not emit(instance, payload)"
        )
    if isinstance(event, type) or cls.__module__ == "builtins":
        raise InvalidEventError(f"emit() takes an event name or an event instance, got {event!r}")
    return event_name_of(cls), cls, event


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


@functools.lru_cache(maxsize=16)
def _takes_order_keys(method: Callable[..., object]) -> bool:
    """Whether a store's ``add_within`` (the function, not bound to a store, so that the
    cache holds no store) keeps ``ordered_by`` keys: read once per store class."""
    try:
        return "order_keys" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def _takes_reporter(method: Callable[..., object], before: int) -> bool:
    """Whether *method* accepts a reporter after its *before* positional arguments (stores
    and transports written before the Reporter protocol do not)."""
    try:
        parameters = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):  # no signature to read: assume the current protocol
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) > before


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


def _check_options(retry: object, priority: object, name: object) -> None:
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise TypeError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int, got {type(priority).__name__}")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ValueError(f"name must be a non-empty str, got {name!r}")
