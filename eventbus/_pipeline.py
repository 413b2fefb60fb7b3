"""The delivery pipeline: take an event in, run each delivery's attempts, and bring every one
to exactly one end (succeeded, dead letter, or left to a store or stream for another process).

Each step is a part of its own: :mod:`_admission` counts and bounds, :mod:`_runner` runs one
attempt, :mod:`_routing` decides what a failure leads to, :mod:`_observe` reports, and a
backend (:mod:`_backends`) keeps what must outlive the process. This module only sequences
them. Locks are held for bookkeeping only, never while a handler, a log call or a signal
receiver runs.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from eventbus._clock import SystemClock
from eventbus._dispatch import InlineExecutor, Job, RetireWorker, WorkerPool
from eventbus._event import DeadLetter, DeadLetterReason, Delivery, Event, new_id
from eventbus._loop import MAX_ASYNC, EventLoops
from eventbus._offload import Offload
from eventbus._outcomes import format_error
from eventbus._policies import Gate, Policy, TokenBucket
from eventbus._records import (
    ATTEMPT,
    DEAD,
    PENDING,
    RETRYING,
    RUNNING,
    SCHEDULED,
    STATE_MASK,
    STATES,
    SUCCEEDED,
    Dispatch,
    RetryJob,
)
from eventbus._routing import GiveUp, route
from eventbus._runner import arun_attempt, run_attempt
from eventbus._watchdog import Watchdog, timeout_error
from eventbus.signals import handler_succeeded as _succeeded_signal

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from eventbus._admission import Admission
    from eventbus._backends import Backend
    from eventbus._observe import InDelivery, Observer
    from eventbus._records import Records
    from eventbus._registry import Registry, Subscription
    from eventbus._retry_queue import RetryQueue
    from eventbus._tracing import AttemptSpan, Tracing
    from eventbus.exceptions import HandlerTimeoutError
    from eventbus.retry import RetryPolicy
    from eventbus.typing import Clock, Executor, RateLimiter

__all__ = ["Pipeline", "job_delivery"]


class _KeyTaken(Exception):
    """Raised inside admission when an idempotency key already has its event."""

    def __init__(self, event: Event) -> None:
        self.event = event


def job_delivery(job: Job) -> tuple[Dispatch, int]:
    """The delivery a job that never ran stood for (every job the pipeline submits is a
    :class:`Dispatch` or a :class:`RetryJob`; claiming its index keeps the count exact)."""
    assert isinstance(job, Dispatch | RetryJob)  # the pipeline submits nothing else
    dispatch = job if isinstance(job, Dispatch) else job.dispatch
    return dispatch, job.claim()


class Pipeline:
    """Runs the deliveries of one bus. Thread-safe; see the module docstring."""

    def __init__(
        self,
        *,
        registry: Registry,
        records: Records,
        admission: Admission,
        observer: Observer,
        backend: Backend,
        executor: Executor,
        clock: Clock,
        retries: RetryQueue[RetryJob],
        policy: RetryPolicy,
        guard: InDelivery,
        offload: Offload | None = None,
        max_async: int = MAX_ASYNC,
        name: str = "eventbus",
    ) -> None:
        self.registry = registry
        self.records = records
        self.admission = admission
        self.observer = observer
        self.backend = backend
        self.executor = executor
        self.clock = clock
        self.retries = retries
        self.policy = policy
        self.guard = guard
        self.offload = offload if offload is not None else Offload(name)
        #: Where ``async def`` handlers run (see :mod:`eventbus._loop`).
        self.loops = EventLoops(
            name=name,
            limit=max_async,
            run=self._arun_job,
            cancelled=self.cancelled,
            on_error=lambda exc: observer.log.internal_error("event loop", exc),
        )
        self._inline = isinstance(executor, InlineExecutor)
        #: Spans around attempts (eventbus.otel), or None. The job handed to the executor is
        #: chosen by it, so that an untraced bus pays nothing for tracing.
        self.tracing: Tracing | None = None
        self._job: Callable[[Dispatch, int], None] = self.run
        self.watchdog = Watchdog(clock, observer, executor, self._timed_out)
        self.gates: list[Gate] = []  # every gate ever made: close() empties them all
        self._lock = threading.Lock()  # stopped, and the hand-over to the retry queue
        self.stopped = False  # no more retries: every new failure is a final one
        self.abandoned = 0  # dead letters made because the bus stopped
        self.left_behind = 0  # deliveries left unfinished to a store or stream
        # Chosen once: a backend that records attempts is told of each start and success.
        self._records_attempts = backend.records_attempts
        # A retry without backoff skips the timer when nothing can observe the difference:
        # real time (a fake clock holds every retry until the test advances it) and a pool
        # whose submit never runs the job on the caller's thread.
        self._resubmit_at_once = isinstance(clock, SystemClock) and isinstance(executor, WorkerPool)
        # One Python call per event instead of one per delivery, on a worker pool.
        self._submit_copies: Callable[[Job, int], None] = (
            executor.submit_copies if isinstance(executor, WorkerPool) else self._submit_each
        )
        # Wall-clock time through the clock when it has it (a fake clock moves it too).
        self._wall: Callable[[], float] = getattr(clock, "time", time.time)

    # -- taking events in ------------------------------------------------------------------

    def accept(
        self,
        event: Event,
        cls: type[Any] | None,
        key: str | None,
        *,
        block: bool = True,
        delay: float = 0.0,
    ) -> Event:
        """Admit *event* and queue its deliveries; return it (or, for an idempotency *key*
        already used, the first event emitted under it, having admitted nothing).

        A full bus is waited on when *block* is true; otherwise it raises ``QueueFullError``
        at once. An emit from one of this bus's deliveries never waits (it might be waiting
        for itself) and may pass the bound. With a *delay* (seconds) its deliveries start no
        earlier than that (and a store keeps that time)."""
        dispatch = self._dispatch(event, cls, key=key)
        count = dispatch.total
        local_key = key is not None and self.backend.keeps_keys_in_memory
        try:
            self.admission.admit(
                count,
                wait=not self.guard.inside(),
                block=block,
                check=(lambda: self._claim_key(dispatch)) if local_key else None,
            )
        except _KeyTaken as taken:
            return taken.event
        if not local_key:
            try:
                first = self.backend.add(dispatch, key, self._wall() + delay if delay else None)
            except BaseException:
                self.admission.release(count)
                raise
            if first is not None:
                self.admission.release(count)
                return first
            self.records.add(dispatch)
        self._queue_all(dispatch, self.clock.monotonic() + delay if delay else None)
        return event

    def _dispatch(
        self,
        event: Event,
        cls: type[Any] | None,
        *,
        key: str | None = None,
        token: str | None = None,
    ) -> Dispatch:
        """A new event's dispatch, in the caller's context (not yet admitted)."""
        return Dispatch(
            event,
            self.registry.resolve(event.name, cls),
            contextvars.copy_context(),
            self._job,
            admitted_at=self.clock.monotonic(),
            verbose=self.observer.verbose(),
            key=key,
            token=token,
        )

    def _queue_all(self, dispatch: Dispatch, not_before: float | None = None) -> None:
        """Report an admitted event and queue one job per delivery (to start no earlier than
        the clock's *not_before*, if given)."""
        count = dispatch.total
        self.observer.emitted(dispatch.event, count, verbose=dispatch.verbose)
        if not_before is None and not getattr(dispatch.subs, "special", True):
            self._submit_copies(dispatch, count)
            return
        # One job per delivery (a dispatch's shared cursor cannot tell the pool's deliveries
        # from the loop's or a gate's), each to where it runs or waits, in start order; those
        # that may start now are handed to the pool together, under one lock.
        ready: list[RetryJob] = []
        for index, sub in enumerate(dispatch.subs):
            job = RetryJob(dispatch, index, not_before)
            gate = sub.gate
            if gate is not None:
                if gate.offer(job):
                    ready.append(job)
            elif not_before is None or not self.hold(job):
                ready.append(job)
        if ready:
            self._start_all(ready)
        if self._inline and self.registry.has_special and not self.guard.inside():
            self._settle_inline()

    @property
    def waits_inline(self) -> bool:
        """Whether an emit waits for its async deliveries (an inline executor's promise)."""
        return self._inline and self.registry.has_special

    def _settle_inline(self) -> None:
        """With an inline executor, an emit returns once its deliveries ran: wait for the
        async ones too, unless that would block the loop they run on (then the caller awaits
        ``adrain()``)."""
        if asyncio._get_running_loop() is not None or not self.loops.has_runner():
            return
        runner = self.loops.runner()
        asyncio.run_coroutine_threadsafe(runner.idle(), runner.loop).result()

    def submit(self, job: RetryJob) -> None:
        """Queue one delivery: through its handler's gate if it has one, after its
        ``not_before`` time if it has one, then where its handler runs."""
        gate = job.dispatch.subs[job.index].gate
        if gate is not None:
            if gate.offer(job):  # else it waits in the gate, which starts it in its turn
                self.start(job)
        elif not self.hold(job):
            self.start(job)

    def hold(self, job: RetryJob) -> bool:
        """If *job* must wait for its ``not_before`` time, schedule it (as a retry is) and
        return True; it comes back through :meth:`submit` when due."""
        not_before = job.not_before
        if not_before is None:
            return False
        job.not_before = None
        delay = not_before - self.clock.monotonic()
        if delay <= 0:
            return False
        self._schedule(job.dispatch, job.index, delay, None)
        return True

    def start(self, job: RetryJob) -> None:
        """Hand one delivery to the event loop (an ``async def`` handler) or the executor."""
        self._start_all([job])

    def _start_all(self, jobs: list[RetryJob]) -> None:
        """Hand deliveries to the event loop or the executor, with one hand-over to the pool;
        abandon them instead if the bus stopped."""
        pooled = []
        for job in jobs:
            if job.dispatch.subs[job.index].is_async:
                self.loops.submit(job)
            else:
                pooled.append(job)
        if not pooled:
            return
        if self._inline:  # runs each job here and now: never under a lock it may take
            for job in pooled:
                if self.stopped:
                    self.abandon([(job.dispatch, job.index)], None)
                else:
                    self.executor.submit(job)
            return
        submit = self.executor.submit
        with self._lock:
            stopped = self.stopped
            if not stopped:
                for job in pooled:
                    submit(job)
        if stopped:
            self.abandon([(job.dispatch, job.index) for job in pooled], None)

    def new_gate(self, policy: Policy, limiter: RateLimiter | None) -> Gate:
        """The gate of a new subscription with *policy* (see :mod:`eventbus._policies`)."""
        if limiter is None and policy.rate is not None:
            limiter = TokenBucket(policy.rate, self.clock.monotonic)
        gate = Gate(
            policy,
            clock=self.clock,
            limiter=limiter,
            pass_on=cast(Any, self.start),
            # Gates hold these very jobs; they name them structurally (see _policies).
            hold=cast(Any, self.hold),
            key_failed=cast(Any, self._key_failed),
            limiter_failed=lambda exc: self.observer.log.internal_error("rate limiter", exc),
            parked=self._parked,
        )
        with self._lock:
            self.gates.append(gate)
        return gate

    def _parked(self, count: int) -> None:
        # Waiting for a key or a token counts as waiting (like a backoff), not as active.
        if count > 0:
            self.admission.to_retry(count)
        else:
            self.admission.from_retry(-count)

    def _key_failed(self, job: RetryJob, error: BaseException) -> None:
        dispatch, index = job.dispatch, job.index
        dispatch.extra(index).error = f"ordered_by failed: {format_error(error)}"
        self.dead_letter(dispatch, index, "not_retryable", _traceback(error))

    def _submit_each(self, job: Job, copies: int) -> None:
        submit = self.executor.submit
        for _ in range(copies):
            submit(job)

    def _claim_key(self, dispatch: Dispatch) -> None:
        # Under the admission lock, after any wait for room: the key's first event wins.
        key = dispatch.key
        assert key is not None
        first = self.records.find_key(key)
        if first is not None:
            raise _KeyTaken(first)
        self.records.add(dispatch)

    def receive(self, event: Event, token: str, not_before: float | None = None) -> None:
        """A transport's hand-over of one event (on its reader thread): deliver it here, no
        earlier than the wall-clock time *not_before* if given. Blocks while the bus is full
        (backpressure on the reader); admits nothing once the bus is closing, so the event
        goes to another consumer."""
        # No local holds the payload: a traceback renderer that shows locals would print it.
        cls = None if type(event.payload).__module__ == "builtins" else type(event.payload)
        dispatch = self._dispatch(event, cls, token=token)
        if not self.admission.wait_for_room(dispatch.total):
            return
        self.records.add(dispatch)
        if not dispatch.total:
            self.backend.event_settled(dispatch)
        start = None
        if not_before is not None:
            start = self.clock.monotonic() + max(0.0, not_before - self._wall())
        self._queue_all(dispatch, start)

    def adopt(
        self,
        event: Event,
        subscription: Subscription,
        context: contextvars.Context,
        *,
        attempts: int = 0,
        error: str | None = None,
    ) -> tuple[Dispatch, int] | None:
        """Count a delivery taken over or replayed as pending, for the caller to queue or
        settle; ``None`` if it is in flight here already or the bus is closed."""
        if not self.admission.admit_unbounded(1):
            return None
        adopted = self.records.adopt(
            event,
            subscription,
            context,
            self._job,
            attempts=attempts,
            error=error,
            first_attempt_at=self.clock.monotonic(),
        )
        if adopted is None:
            self.admission.release(1)
        return adopted

    # -- one attempt -----------------------------------------------------------------------

    def run(self, dispatch: Dispatch, index: int) -> None:
        """Run delivery *index* of *dispatch* once: a job's body, called on an executor's
        thread inside the delivery's context (so the emitter's structlog bindings, a request
        id, are on the bus's own records too).

        Written out in one function with :meth:`_finish` on purpose: it runs once per
        delivery, and each call it saves is a measurable share of dispatch cost.
        """
        progress = dispatch.progress
        value = progress[index] + ATTEMPT
        progress[index] = value - (value & STATE_MASK) + RUNNING
        sub = dispatch.subs[index]
        started = self.clock.monotonic() if dispatch.verbose else 0.0
        guard = self.guard
        # Held for the handler and for the outcome's signal receivers after it: both run
        # while this delivery counts as pending.
        outer = guard.active
        guard.active = True
        try:
            error: BaseException | None
            policy = sub.policy
            if policy is not None and policy.watched:
                self._run_watched(dispatch, index, value, started)
                return
            if self._records_attempts:
                error = self._record_start(dispatch.event, sub.name, value // ATTEMPT)
                if error is None:
                    error = run_attempt(sub.handler, dispatch.event)
            else:
                error = run_attempt(sub.handler, dispatch.event)
            self._finish(dispatch, index, value, started, error)
        finally:
            guard.active = outer

    def set_tracing(self, tracing: Tracing | None) -> None:
        """Trace attempts from now on (events admitted before keep their job)."""
        self.tracing = tracing
        self._job = self.run if tracing is None else self._run_traced

    def _run_traced(self, dispatch: Dispatch, index: int) -> None:
        """:meth:`run` inside the attempt's span (see :mod:`eventbus.otel`)."""
        tracing = self.tracing
        if tracing is None:  # switched off since the event was admitted
            self.run(dispatch, index)
            return
        with self._attempt_span(tracing, dispatch, index) as span:
            try:
                self.run(dispatch, index)
            finally:  # also when a timed-out worker retires (RetireWorker)
                span.ended(STATES[dispatch.progress[index] & STATE_MASK])

    async def _arun_job(self, dispatch: Dispatch, index: int) -> None:
        """What the event loops run: :meth:`arun`, inside the attempt's span if traced."""
        tracing = self.tracing
        if tracing is None:
            await self.arun(dispatch, index)
            return
        with self._attempt_span(tracing, dispatch, index) as span:
            try:
                await self.arun(dispatch, index)
            finally:  # also when close() cancels it
                span.ended(STATES[dispatch.progress[index] & STATE_MASK])

    def _attempt_span(
        self, tracing: Tracing, dispatch: Dispatch, index: int
    ) -> AbstractContextManager[AttemptSpan]:
        """The span of the attempt about to start: its number, and for a first attempt the
        time since the emit."""
        number = dispatch.progress[index] // ATTEMPT + 1
        waited = self.clock.monotonic() - dispatch.admitted_at if number == 1 else None
        return tracing.attempt(dispatch.event, dispatch.subs[index].name, number, waited)

    def _run_watched(self, dispatch: Dispatch, index: int, value: int, started: float) -> None:
        """run() for a handler with a timeout or a stall warning (see :mod:`_watchdog`)."""
        sub = dispatch.subs[index]
        watched = self.watchdog.watch_thread(dispatch, index)
        error: BaseException | None = None
        if self._records_attempts:
            error = self._record_start(dispatch.event, sub.name, value // ATTEMPT)
        if error is None:
            error = run_attempt(sub.handler, dispatch.event)
        if watched.end():
            self._finish(dispatch, index, value, started, error)
            return
        # Failed by its timeout already (and retried or dead-lettered): too late to count.
        self.observer.late_result(dispatch.event, sub.name, value // ATTEMPT, error)
        if watched.replaced:
            raise RetireWorker  # a fresh worker took this one's place

    def _timed_out(self, dispatch: Dispatch, index: int, error: HandlerTimeoutError) -> None:
        """A thread's attempt outlived its timeout (on the clock's thread): fail it now."""
        context = dispatch.context_of(index)
        assert context is not None
        value = dispatch.progress[index]
        context.copy().run(self._finish_guarded, dispatch, index, value, 0.0, error)

    async def arun(self, dispatch: Dispatch, index: int) -> None:
        """The async twin of :meth:`run`, for an ``async def`` handler: the body of the
        delivery's own task on the bus's event loop, in the delivery's context.

        Store commits run on the offload threads, never on the loop. Cancelling the task
        (close() past its timeout, the loop shutting down) settles the delivery as abandoned:
        a dead letter, or left unfinished in the store or stream.
        """
        self.guard.enter_task()  # this task's context: emit/drain/close know who calls
        progress = dispatch.progress
        value = progress[index] + ATTEMPT
        progress[index] = value - (value & STATE_MASK) + RUNNING
        sub = dispatch.subs[index]
        event = dispatch.event
        started = self.clock.monotonic() if dispatch.verbose else 0.0
        policy = sub.policy
        watched = None
        if policy is not None and policy.watched:
            watched = self.watchdog.watch_task(dispatch, index)
        try:
            error: BaseException | None = None
            if self._records_attempts:
                error = await self.offload.run(
                    self._record_start, event, sub.name, value // ATTEMPT
                )
            if error is None:
                timed_out = None if watched is None else (lambda: watched.watch.timed_out)
                error = await arun_attempt(sub.handler, event, timed_out)
        except asyncio.CancelledError:
            if watched is not None:
                watched.end()
            self.cancelled(dispatch, index)
            raise
        if watched is not None and not watched.end():
            assert policy is not None
            error = timeout_error(sub.name, policy.timeout or 0.0)
        if self._records_attempts:
            # Shielded: if the task is cancelled now, the commit and the outcome still end.
            await asyncio.shield(
                self.offload.run(self._finish_guarded, dispatch, index, value, started, error)
            )
        else:
            self._finish_guarded(dispatch, index, value, started, error)

    def _record_start(self, event: Event, handler: str, attempts: int) -> BaseException | None:
        try:  # committed first: a crash in the handler counts as an attempt
            self.backend.started(event.id, handler, attempts)
        except BaseException as exc:  # noqa: BLE001 - the attempt fails, nothing escapes
            return exc
        return None

    def _finish_guarded(
        self,
        dispatch: Dispatch,
        index: int,
        value: int,
        started: float,
        error: BaseException | None,
    ) -> None:
        guard = self.guard
        outer = guard.active
        guard.active = True  # signal receivers run with the delivery still pending
        try:
            self._finish(dispatch, index, value, started, error)
        finally:
            guard.active = outer

    def _finish(
        self,
        dispatch: Dispatch,
        index: int,
        value: int,
        started: float,
        error: BaseException | None,
    ) -> None:
        """An attempt ended (*value*: its progress when it began, *error*: what it raised)."""
        sub = dispatch.subs[index]
        attempts = value // ATTEMPT
        gate = sub.gate
        if gate is not None:
            gate.attempt_ended()
        if error is not None:
            self._failed(dispatch, index, sub, attempts, error)
            return
        event = dispatch.event
        if self._records_attempts:
            self.backend.succeeded(event.id, sub.name)
        # Reported before it settles, so that once drain() returns every outcome record
        # has been written and every receiver has run.
        verbose = dispatch.verbose
        if verbose or _succeeded_signal.receivers:
            duration = self.clock.monotonic() - started if verbose else None
            self.observer.succeeded(event, sub.name, attempts, dispatch.error(index), duration)
        dispatch.progress[index] = value - (value & STATE_MASK) + SUCCEEDED
        if gate is not None:
            gate.settled(dispatch, index)
        count = next(dispatch.settled)
        if count >= dispatch.total:
            self._last_settled(dispatch, count)
        self.admission.settled()

    def cancelled(self, dispatch: Dispatch, index: int) -> None:
        """An async delivery's task was cancelled by the bus or its loop's shutdown, during
        its attempt or before it began: settle it as abandoned."""
        extra = dispatch.extra(index)
        began = dispatch.progress[index] & STATE_MASK == RUNNING
        gate = dispatch.subs[index].gate
        if gate is not None:  # it passed the gate's slot stage on its way to the loop
            gate.attempt_ended()
        why = "the bus closed" if self.stopped else "its event loop stopped"
        extra.error = f"cancelled {'while running' if began else 'before it ran'}: {why}"
        self.abandon([(dispatch, index)], None)

    def _failed(
        self,
        dispatch: Dispatch,
        index: int,
        sub: Subscription,
        attempts: int,
        error: BaseException,
    ) -> None:
        extra = dispatch.extra(index)
        extra.error = format_error(error)
        first = extra.first_attempt_at
        elapsed = self.clock.monotonic() - (dispatch.admitted_at if first is None else first)
        policy = sub.retry if sub.retry is not None else self.policy
        step = route(policy, attempts, error, elapsed)
        if isinstance(step, GiveUp) and step.policy_error is not None:
            extra.error = f"{extra.error}; the retry policy raised {step.policy_error}"
        event = dispatch.event
        self.observer.failed(
            event, dispatch.snapshot(index), error, will_retry=not isinstance(step, GiveUp)
        )
        if isinstance(step, GiveUp):
            self.dead_letter(dispatch, index, step.reason, _traceback(error))
            return
        delay = step.delay
        if self._records_attempts:
            # Wall-clock: the next process reads it too.
            due_at = self._wall() + delay
            self.backend.retrying(event.id, sub.name, attempts, extra.error, due_at)
        if delay <= 0 and self._resubmit_at_once:
            self._retry_at_once(dispatch, index, error)
            return
        if self._schedule(dispatch, index, delay, error):
            self.observer.retry_scheduled(event, dispatch.snapshot(index), delay)

    def _schedule(
        self, dispatch: Dispatch, index: int, delay: float, error: BaseException | None
    ) -> bool:
        """Put a pending delivery in the retry queue for *delay* seconds; False if the bus
        stopped, in which case it is abandoned (with *error*'s traceback) instead."""
        with self._lock:
            stopped = self.stopped
            if not stopped:
                first = dispatch.progress[index] < ATTEMPT  # no attempt yet: a delayed start
                dispatch.set_state(index, SCHEDULED if first else RETRYING)
                # Counted as waiting and queued under one lock: close() takes everything
                # waiting under it, and must not find the delivery counted but not queued.
                self.admission.to_retry()
                self.retries.schedule(RetryJob(dispatch, index), delay)
        if stopped:  # closed: there is no retry queue to wait in any more
            trace = None if error is None else _traceback(error)
            self.abandon([(dispatch, index)], trace)
        return not stopped

    def _retry_at_once(self, dispatch: Dispatch, index: int, error: BaseException) -> None:
        # A zero backoff on the real clock and a worker pool: back of the queue directly. A
        # trip through the timer thread costs a GIL hand-off per retry, which in a storm of
        # transient errors made each failure about a hundred times the cost of a success.
        sub = dispatch.subs[index]
        attempts = dispatch.progress[index] // ATTEMPT
        self.observer.retry_scheduled(
            dispatch.event, Delivery(sub.name, "retrying", attempts, dispatch.error(index)), 0.0
        )
        if self.stopped:
            self.abandon([(dispatch, index)], _traceback(error))
            return
        dispatch.set_state(index, PENDING)
        # Through its gate, if any; start() hands it over under the lock stop() takes, and
        # abandons it if the bus stopped meanwhile.
        self.submit(RetryJob(dispatch, index))

    def retry_due(self, job: RetryJob) -> None:
        """A retry's backoff ended (the retry queue's timer, or close() for one already due):
        back onto the executor, unless the bus stopped."""
        with self._lock:
            stopped = self.stopped
            self.admission.from_retry()
            if not stopped:
                job.dispatch.set_state(job.index, PENDING)
        if stopped:
            self.abandon([(job.dispatch, job.index)], None)
        else:
            self.submit(job)

    def queue(self, dispatch: Dispatch, index: int, delay: float = 0.0) -> None:
        """Queue an adopted delivery now, or after *delay* seconds of backoff (through its
        gate first, so a recovered delivery keeps its place in its key's order)."""
        not_before = self.clock.monotonic() + delay if delay > 0 else None
        self.submit(RetryJob(dispatch, index, not_before))

    # -- ends ------------------------------------------------------------------------------

    def dead_letter(
        self, dispatch: Dispatch, index: int, reason: DeadLetterReason, trace: str | None
    ) -> None:
        """Settle a pending delivery as a dead letter."""
        letter = DeadLetter(
            id=new_id(),
            event=dispatch.event,
            handler=dispatch.subs[index].name,
            attempts=dispatch.progress[index] // ATTEMPT,
            error=dispatch.error(index) or "abandoned at shutdown before it ran",
            reason=reason,
            traceback=trace,
        )
        self.backend.dead(letter, dispatch, index)
        if reason == "abandoned":
            with self._lock:
                self.abandoned += 1
        self.observer.dead_lettered(letter)  # before settling: see run()
        self._settle(dispatch, index, DEAD)

    def _settle(self, dispatch: Dispatch, index: int, state: int) -> None:
        dispatch.set_state(index, state)
        gate = dispatch.subs[index].gate
        if gate is not None:
            gate.settled(dispatch, index)
        count = next(dispatch.settled)
        if count >= dispatch.total:
            self._last_settled(dispatch, count)
        self.admission.settled()

    def _last_settled(self, dispatch: Dispatch, count: int) -> None:
        # An event from a transport is acknowledged before its last delivery stops counting,
        # so that once drain() returns the transport has been told.
        if self.records.event_settled(dispatch, count) and dispatch.token is not None:
            self.backend.event_settled(dispatch)

    def abandon(self, deliveries: Iterable[tuple[Dispatch, int]], trace: str | None) -> None:
        """Settle pending deliveries the stopped bus will not run: dead letters
        (``"abandoned"``), or, with a store or a stream, left there for another process."""
        deliveries = list(deliveries)
        if not deliveries:
            return
        if not self.backend.leaves_unfinished:
            for dispatch, index in deliveries:
                self.dead_letter(dispatch, index, "abandoned", trace)
            return
        self.backend.leave(deliveries)
        for dispatch, index in deliveries:
            gate = dispatch.subs[index].gate
            if gate is not None:
                gate.settled(dispatch, index)
        with self._lock:
            self.left_behind += len(deliveries)
        self.admission.settled(len(deliveries))

    def stop(self) -> list[tuple[Dispatch, int]]:
        """No more retries: take every delivery waiting for one (now active again)."""
        with self._lock:
            self.stopped = True
            waiting = self.retries.take_all()
            for _ in waiting:
                self.admission.from_retry()
            gates = list(self.gates)
        parked = [job for gate in gates for job in gate.close()]
        return [(job.dispatch, job.index) for job in [*waiting, *parked]]


def _traceback(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))
