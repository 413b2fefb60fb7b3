"""Pipeline: accept, run, retry on the clock, dead-letter, abandon; built from real parts with an
inline or recording executor and a fake clock."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import pytest
import tenacity
from structlog.testing import capture_logs

from eventbus import signals
from eventbus._admission import Admission
from eventbus._backends import Backend, DurableBackend, LocalBackend, StreamedBackend
from eventbus._event import Delivery, Event
from eventbus._matching import compile_pattern
from eventbus._observe import InDelivery, Observer
from eventbus._outcomes import OutcomeRecorder
from eventbus._pipeline import Pipeline, job_delivery
from eventbus._records import Records, RetryJob
from eventbus._registry import Registry, Subscription
from eventbus._retry_queue import RetryQueue
from eventbus.exceptions import QueueFullError
from eventbus.retry import RetryPolicy
from eventbus.stores import MemoryStore
from eventbus.testing import FakeClock, InlineExecutor
from eventbus.typing import Executor
from tests.support.executors import QueueingExecutor

NAME = "order:created"
DELAY = 5.0
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


class FakeTransport:
    """Records acknowledged tokens."""

    def __init__(self) -> None:
        self.acknowledged: list[str] = []

    def settled(self, token: str) -> None:
        self.acknowledged.append(token)

    def close(self) -> None:
        pass


class Harness:
    """A pipeline and its parts."""

    def __init__(
        self,
        *,
        executor: Executor | None = None,
        backend: Callable[[Records, Observer], Backend] = lambda r, o: LocalBackend(r),
        max_pending: int | None = None,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.clock = FakeClock()
        self.executor = executor if executor is not None else InlineExecutor()
        self.registry = Registry()
        self.records = Records(100)
        self.admission = Admission(max_pending, 0)
        self.guard = InDelivery()
        self.observer = Observer(OutcomeRecorder(), object(), self.guard)
        self.backend = backend(self.records, self.observer)
        self.retries: RetryQueue[RetryJob] = RetryQueue(self.clock, self._retry_due)
        self.pipeline = Pipeline(
            registry=self.registry,
            records=self.records,
            admission=self.admission,
            observer=self.observer,
            backend=self.backend,
            executor=self.executor,
            clock=self.clock,
            retries=self.retries,
            policy=policy or RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(DELAY)),
            guard=self.guard,
        )

    def _retry_due(self, job: RetryJob) -> None:
        self.pipeline.retry_due(job)

    def subscribe(
        self, name: str, handler: Callable[[Event], object], retry: RetryPolicy | None = None
    ) -> Subscription:
        return self.registry.add(compile_pattern(NAME), handler, name=name, priority=0, retry=retry)

    def emit(self, payload: Any = None, key: str | None = None) -> Event:
        return self.pipeline.accept(Event(name=NAME, payload=payload), None, key)

    def status(self, event: Event) -> dict[str, Delivery]:
        dispatch = self.records.get(event.id)
        assert dispatch is not None
        snapshots = [dispatch.snapshot(i) for i in range(len(dispatch.progress))]
        return {d.handler: d for d in snapshots}


class Flaky:
    """Fails its first *failures* calls, then succeeds; counts every call."""

    def __init__(self, failures: int, error: Callable[[], BaseException] = RuntimeError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self, event: Event) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error()


def _store_backend(store: MemoryStore) -> Callable[[Records, Observer], Backend]:
    store.open()
    return lambda records, observer: DurableBackend(store, observer)


# -- accept, run, settle -------------------------------------------------------------------


def test_accepted_event_runs_every_delivery_and_settles() -> None:
    """On an inline executor each handler runs once and the event ends settled and idle."""
    h = Harness()
    to_a: list[Event] = []
    to_b: list[Event] = []
    h.subscribe("a", to_a.append)
    h.subscribe("b", to_b.append)
    event = h.emit({"id": 1})
    assert to_a == to_b == [event]
    assert h.status(event) == {
        "a": Delivery("a", "succeeded", 1),
        "b": Delivery("b", "succeeded", 1),
    }
    assert h.admission.wait_idle(0)
    dispatch = h.records.get(event.id)
    assert dispatch is not None
    assert dispatch.context is None  # settled: the emitter's context is let go


def test_accept_logs_emitted_and_each_success() -> None:
    """Acceptance and each success are recorded."""
    h = Harness()
    h.subscribe("a", lambda event: None)
    with capture_logs() as logs:
        h.emit()
    assert [r["event"] for r in logs] == ["event.emitted", "handler.succeeded"]


def test_event_without_handlers_settles_at_once() -> None:
    """An unhandled event is logged as such and leaves nothing pending."""
    h = Harness()
    with capture_logs() as logs:
        h.emit()
    assert [r["event"] for r in logs] == ["event.unhandled"]
    assert h.admission.wait_idle(0)


def test_handlers_run_in_the_emitter_context() -> None:
    """A handler sees the context variables set where the event was accepted."""
    h = Harness()
    seen: list[str] = []
    h.subscribe("a", lambda event: seen.append(request_id.get()))
    token = request_id.set("r-1")
    try:
        h.emit()
    finally:
        request_id.reset(token)
    assert seen == ["r-1"]


def test_guard_is_set_while_a_handler_runs() -> None:
    """The in-delivery guard is active inside the handler and cleared after it."""
    h = Harness()
    seen: list[bool] = []
    h.subscribe("a", lambda event: seen.append(h.guard.active))
    h.emit()
    assert seen == [True]
    assert h.guard.active is False


def test_emit_from_a_handler_does_not_wait_on_a_full_bus() -> None:
    """An event accepted inside a handler is admitted past max_pending instead of refused."""
    h = Harness(max_pending=1)
    inner: list[Event] = []

    def outer(event: Event) -> None:
        if event.payload == "outer":
            inner.append(h.emit("inner"))

    h.subscribe("a", outer)
    h.emit("outer")
    assert len(inner) == 1
    assert h.status(inner[0])["a"].state == "succeeded"


def test_full_bus_refuses_an_emit_from_outside_a_handler() -> None:
    """With max_pending reached and no wait allowed, accept raises and records nothing."""
    h = Harness(executor=QueueingExecutor(), max_pending=1)
    h.subscribe("a", lambda event: None)
    h.emit()
    with pytest.raises(QueueFullError):
        h.emit()
    assert h.admission.active == 1


def test_success_is_reported_before_its_delivery_settles() -> None:
    """A handler_succeeded receiver runs while the delivery still counts as pending."""
    h = Harness()
    idle_in_receiver: list[bool] = []
    h.subscribe("a", lambda event: None)

    def receiver(sender: object, **kwargs: Any) -> None:
        idle_in_receiver.append(h.admission.wait_idle(0))

    with signals.handler_succeeded.connected_to(receiver):
        h.emit()
    assert idle_in_receiver == [False]
    assert h.admission.wait_idle(0)


# -- idempotency keys ----------------------------------------------------------------------


def test_key_used_again_returns_the_first_event_and_runs_nothing() -> None:
    """A second accept under the same key returns the first event and admits nothing."""
    h = Harness()
    calls: list[Event] = []
    h.subscribe("a", calls.append)
    first = h.emit(1, key="order-1")
    assert h.emit(2, key="order-1") is first
    assert calls == [first]
    assert h.admission.wait_idle(0)


def test_key_held_by_the_store_returns_its_event_and_releases_admission() -> None:
    """With a store answering for keys, a taken key gives back the admitted count."""
    h = Harness(backend=_store_backend(MemoryStore()))
    calls: list[Event] = []
    h.subscribe("a", calls.append)
    first = h.emit(1, key="order-1")
    assert h.emit(2, key="order-1") is first
    assert calls == [first]
    assert h.admission.wait_idle(0)


def test_store_refusing_the_event_admits_nothing() -> None:
    """When the store cannot keep the event, accept raises and nothing stays pending."""
    store = MemoryStore()
    h = Harness(backend=_store_backend(store))
    h.subscribe("a", lambda event: None)

    def refuse(*args: object) -> None:
        raise TypeError("payload cannot be stored")

    store.add = refuse  # type: ignore[method-assign]
    with pytest.raises(TypeError):
        h.emit(object())
    assert h.admission.wait_idle(0)


# -- failures and retries ------------------------------------------------------------------


def test_failure_schedules_a_retry_on_the_clock() -> None:
    """A failed attempt with attempts left waits on the clock, pending but not active."""
    h = Harness()
    h.subscribe("a", Flaky(1))
    with capture_logs() as logs:
        event = h.emit()
    assert h.status(event)["a"] == Delivery("a", "retrying", 1, "RuntimeError")
    assert (h.admission.active, h.admission.waiting) == (0, 1)
    assert h.clock.pending == 1
    assert [(r["event"], r.get("delay")) for r in logs][-2:] == [
        ("handler.failed", None),
        ("handler.retry_scheduled", DELAY),
    ]


def test_due_retry_runs_again_and_succeeds() -> None:
    """When the backoff passes the delivery runs again and settles as a success."""
    h = Harness()
    handler = Flaky(1)
    h.subscribe("a", handler)
    event = h.emit()
    h.clock.advance(DELAY - 0.1)
    assert handler.calls == 1
    h.clock.advance(0.1)
    assert handler.calls == 2
    assert h.status(event)["a"] == Delivery("a", "succeeded", 2, "RuntimeError")
    assert h.admission.wait_idle(0)


def test_exhausted_delivery_becomes_a_dead_letter() -> None:
    """After max_attempts failures the delivery is dead, with a dead letter in the records."""
    h = Harness()
    h.subscribe("a", Flaky(10))
    event = h.emit()
    h.clock.advance(DELAY)
    h.clock.advance(DELAY)
    assert h.status(event)["a"] == Delivery("a", "dead", 3, "RuntimeError")
    [letter] = h.records.dead_letters()
    assert (letter.reason, letter.attempts, letter.handler) == ("exhausted", 3, "a")
    assert letter.traceback is not None
    assert "RuntimeError" in letter.traceback
    assert h.admission.wait_idle(0)


def test_error_the_policy_does_not_retry_is_dead_at_once() -> None:
    """An error outside retry_on becomes a not_retryable dead letter after one attempt."""
    h = Harness(policy=RetryPolicy(max_attempts=3, retry_on=(ValueError,)))
    h.subscribe("a", Flaky(1, TypeError))
    h.emit()
    [letter] = h.records.dead_letters()
    assert (letter.reason, letter.attempts) == ("not_retryable", 1)
    assert h.clock.pending == 0


def test_subscription_policy_overrides_the_default() -> None:
    """A handler's own retry policy decides, not the pipeline's default."""
    h = Harness()
    h.subscribe("a", Flaky(10), retry=RetryPolicy(max_attempts=1))
    h.emit()
    [letter] = h.records.dead_letters()
    assert (letter.reason, letter.attempts) == ("exhausted", 1)


def test_base_exception_from_a_handler_is_isolated() -> None:
    """A handler raising KeyboardInterrupt fails its delivery; nothing reaches the emitter."""
    h = Harness()
    h.subscribe("a", Flaky(1, KeyboardInterrupt))
    h.emit()
    [letter] = h.records.dead_letters()
    assert (letter.reason, letter.error) == ("not_retryable", "KeyboardInterrupt")


def test_elapsed_time_counts_from_admission() -> None:
    """A stop_after_delay policy sees the time since the event was admitted."""
    policy = RetryPolicy(
        max_attempts=10, wait=tenacity.wait_fixed(DELAY), stop=tenacity.stop_after_delay(8)
    )
    h = Harness(policy=policy)
    h.subscribe("a", Flaky(10))
    h.emit()
    h.clock.advance(DELAY)  # second attempt at 5 s: retried
    h.clock.advance(DELAY)  # third attempt at 10 s: past 8 s
    [letter] = h.records.dead_letters()
    assert letter.attempts == 3


# -- stopping ------------------------------------------------------------------------------


def test_stopped_pipeline_abandons_a_failure_instead_of_retrying() -> None:
    """A failure after stop() is a dead letter abandoned, with no retry scheduled."""
    executor = QueueingExecutor()
    h = Harness(executor=executor)
    h.subscribe("a", Flaky(1))
    event = h.emit()
    assert h.pipeline.stop() == []
    executor.run_all()
    [letter] = h.records.dead_letters()
    assert (letter.reason, letter.error) == ("abandoned", "RuntimeError")
    assert h.pipeline.abandoned == 1
    assert h.status(event)["a"].state == "dead"
    assert h.clock.pending == 0
    assert h.admission.wait_idle(0)


def test_stop_hands_back_waiting_retries_as_active() -> None:
    """stop() takes every retry off the clock and counts it active again."""
    h = Harness()
    handler = Flaky(1)
    h.subscribe("a", handler)
    event = h.emit()
    dispatch = h.records.get(event.id)
    assert h.pipeline.stop() == [(dispatch, 0)]
    assert (h.admission.active, h.admission.waiting) == (1, 0)
    h.clock.advance(DELAY)
    assert handler.calls == 1


def test_abandoned_retries_become_dead_letters_without_a_store() -> None:
    """Deliveries handed back by stop() and abandoned are abandoned dead letters."""
    h = Harness()
    h.subscribe("a", Flaky(1))
    h.emit()
    h.pipeline.abandon(h.pipeline.stop(), None)
    [letter] = h.records.dead_letters()
    assert (letter.reason, letter.attempts, letter.error) == ("abandoned", 1, "RuntimeError")
    assert h.admission.wait_idle(0)


def test_retry_due_after_stop_is_abandoned() -> None:
    """A retry the timer hands over after stop() is abandoned rather than run."""
    h = Harness()
    handler = Flaky(1)
    h.subscribe("a", handler)
    h.emit()
    [job] = h.retries.take_all()  # the timer took it, and stop() found nothing waiting
    assert h.pipeline.stop() == []
    h.pipeline.retry_due(job)
    assert handler.calls == 1
    [letter] = h.records.dead_letters()
    assert letter.reason == "abandoned"
    assert (h.admission.waiting, h.admission.active) == (0, 0)


def test_unstarted_jobs_abandoned_get_the_default_error() -> None:
    """A delivery that never ran is dead-lettered as abandoned before it ran, 0 attempts."""
    executor = QueueingExecutor()
    h = Harness(executor=executor)
    h.subscribe("a", lambda event: None)
    h.emit()
    h.pipeline.stop()
    h.pipeline.abandon([job_delivery(job) for job in executor.shutdown(None)], None)
    [letter] = h.records.dead_letters()
    assert (letter.attempts, letter.error) == (0, "abandoned at shutdown before it ran")
    assert h.admission.wait_idle(0)


def test_abandon_with_a_store_leaves_the_deliveries_there() -> None:
    """With a store, abandoned deliveries are released to it and counted as left behind."""
    store = MemoryStore()
    executor = QueueingExecutor()
    h = Harness(executor=executor, backend=_store_backend(store))
    h.subscribe("a", lambda event: None)
    h.subscribe("b", lambda event: None)
    event = h.emit()
    h.pipeline.stop()
    with capture_logs() as logs:
        h.pipeline.abandon([job_delivery(job) for job in executor.shutdown(None)], None)
    assert [r["event"] for r in logs] == ["handler.left_in_store"] * 2
    assert h.pipeline.left_behind == 2
    assert h.pipeline.abandoned == 0
    assert h.admission.wait_idle(0)
    claimed = store.claim(["a", "b"]).deliveries
    assert sorted((d.event.id, d.handler) for d in claimed) == [(event.id, "a"), (event.id, "b")]
    assert store.dead_letters() == []


# -- jobs ----------------------------------------------------------------------------------


def test_job_delivery_maps_unstarted_jobs_back_to_deliveries() -> None:
    """Each queued Dispatch job stands for the next index; a RetryJob for its own."""
    executor = QueueingExecutor()
    h = Harness(executor=executor)
    h.subscribe("a", lambda event: None)
    h.subscribe("b", lambda event: None)
    event = h.emit()
    dispatch = h.records.get(event.id)
    assert dispatch is not None
    assert [job_delivery(job) for job in executor.jobs] == [(dispatch, 0), (dispatch, 1)]
    assert job_delivery(RetryJob(dispatch, 1)) == (dispatch, 1)


# -- with a store --------------------------------------------------------------------------


def test_store_is_told_of_each_attempt() -> None:
    """A durable pipeline records the retry and the success in the store."""
    store = MemoryStore()
    h = Harness(backend=_store_backend(store))
    h.subscribe("a", Flaky(1))
    event = h.emit()
    assert store.status(event.id) == {"a": Delivery("a", "retrying", 1, "RuntimeError")}
    h.clock.advance(DELAY)
    assert store.status(event.id) == {"a": Delivery("a", "succeeded", 2)}


def test_store_due_time_is_the_clock_wall_time_plus_the_delay() -> None:
    """A retry's due time in the store is wall-clock time read through the bus's clock."""
    store = MemoryStore()
    h = Harness(backend=_store_backend(store))
    h.subscribe("a", Flaky(1))
    h.clock.advance(100)
    h.emit()
    store.close()  # as if this bus stopped: the row is claimable, due time and all
    store.open()
    [stored] = store.claim(["a"]).deliveries
    assert stored.state == "retrying"
    assert stored.due_at == pytest.approx(h.clock.time() + DELAY)


def test_retried_failure_logs_no_traceback_and_the_last_one_does() -> None:
    """Only the handler.failed record a dead letter follows carries exc_info."""
    h = Harness(policy=RetryPolicy(max_attempts=2, wait=tenacity.wait_fixed(DELAY)))
    h.subscribe("a", Flaky(10))
    with capture_logs() as logs:
        h.emit()
        h.clock.advance(DELAY)
    failed = [r for r in logs if r["event"] == "handler.failed"]
    assert [(r["will_retry"], "exc_info" in r) for r in failed] == [(True, False), (False, True)]


def test_failed_start_write_fails_the_attempt_without_running_the_handler() -> None:
    """If the store cannot record the start, the handler is not called and the attempt fails."""
    store = MemoryStore()
    h = Harness(backend=_store_backend(store))
    handler = Flaky(0)
    h.subscribe("a", handler)

    def refuse(*args: object) -> None:
        raise OSError("disk full")

    store.started = refuse  # type: ignore[method-assign]
    event = h.emit()
    assert handler.calls == 0
    assert h.status(event)["a"] == Delivery("a", "retrying", 1, "OSError: disk full")


# -- from a transport ----------------------------------------------------------------------


def _streamed(transport: FakeTransport) -> Callable[[Records, Observer], Backend]:
    return lambda records, observer: StreamedBackend(records, transport, observer)  # type: ignore[arg-type]


def test_received_event_is_acknowledged_once_all_deliveries_settle() -> None:
    """An event from a transport is acknowledged after its last delivery, not before."""
    transport = FakeTransport()
    executor = QueueingExecutor()
    h = Harness(executor=executor, backend=_streamed(transport))
    h.subscribe("a", lambda event: None)
    h.subscribe("b", lambda event: None)
    h.pipeline.receive(Event(name=NAME), "1-0")
    executor.jobs.pop(0)()
    assert transport.acknowledged == []
    executor.jobs.pop(0)()
    assert transport.acknowledged == ["1-0"]


def test_received_event_without_handlers_is_acknowledged_at_once() -> None:
    """An event nobody here handles is acknowledged on receipt."""
    transport = FakeTransport()
    h = Harness(backend=_streamed(transport))
    h.pipeline.receive(Event(name=NAME), "1-0")
    assert transport.acknowledged == ["1-0"]


def test_closed_pipeline_receives_nothing() -> None:
    """Once admission is closed a received event is neither run nor acknowledged."""
    transport = FakeTransport()
    h = Harness(backend=_streamed(transport))
    calls: list[Event] = []
    h.subscribe("a", calls.append)
    h.admission.close()
    h.pipeline.receive(Event(name=NAME), "1-0")
    assert calls == []
    assert transport.acknowledged == []


# -- adopted work --------------------------------------------------------------------------


def test_adopted_delivery_runs_in_its_own_context_when_queued() -> None:
    """A delivery adopted with a context runs there, with its attempt count carried on."""
    h = Harness()
    seen: list[str] = []
    sub = h.subscribe("a", lambda event: seen.append(request_id.get()))
    context = contextvars.Context()
    context.run(request_id.set, "replayer")
    event = Event(name=NAME)
    adopted = h.pipeline.adopt(event, sub, context, attempts=1)
    assert adopted is not None
    h.pipeline.queue(*adopted)
    assert seen == ["replayer"]
    assert h.status(event)["a"] == Delivery("a", "succeeded", 2)
    assert h.admission.wait_idle(0)


def test_adopting_a_delivery_in_flight_counts_nothing() -> None:
    """A second adopt of a queued delivery returns None and leaves the count as it was."""
    h = Harness(executor=QueueingExecutor())
    sub = h.subscribe("a", lambda event: None)
    event = Event(name=NAME)
    assert h.pipeline.adopt(event, sub, contextvars.copy_context()) is not None
    assert h.pipeline.adopt(event, sub, contextvars.copy_context()) is None
    assert h.admission.active == 1


def test_adopt_after_close_returns_none() -> None:
    """A closed admission adopts nothing."""
    h = Harness()
    sub = h.subscribe("a", lambda event: None)
    h.admission.close()
    assert h.pipeline.adopt(Event(name=NAME), sub, contextvars.copy_context()) is None
    assert h.admission.wait_idle(0)


def test_queue_with_a_delay_waits_on_the_clock() -> None:
    """A delivery queued with a delay (before its first attempt: scheduled) waits on the
    clock as a retry does, then runs when due."""
    h = Harness()
    calls: list[Event] = []
    sub = h.subscribe("a", calls.append)
    event = Event(name=NAME)
    adopted = h.pipeline.adopt(event, sub, contextvars.copy_context())
    assert adopted is not None
    h.pipeline.queue(*adopted, delay=DELAY)
    assert h.status(event)["a"].state == "scheduled"
    assert h.admission.waiting == 1
    h.clock.advance(DELAY)
    assert calls == [event]
    assert h.admission.wait_idle(0)


def test_delivery_queued_with_a_delay_after_stop_is_abandoned() -> None:
    """A taken-over retry queued after stop() (recover racing close) is abandoned, not lost."""
    h = Harness()
    sub = h.subscribe("a", lambda event: None)
    adopted = h.pipeline.adopt(Event(name=NAME), sub, contextvars.copy_context(), attempts=1)
    assert adopted is not None
    h.pipeline.stop()
    h.pipeline.queue(*adopted, delay=DELAY)
    assert [letter.reason for letter in h.records.dead_letters()] == ["abandoned"]
    assert h.admission.wait_idle(0)


def test_dead_letter_settles_a_pending_delivery() -> None:
    """dead_letter() on an adopted delivery records it, logs it and settles it."""
    h = Harness(executor=QueueingExecutor())
    sub = h.subscribe("a", lambda event: None)
    event = Event(name=NAME)
    adopted = h.pipeline.adopt(event, sub, contextvars.copy_context(), attempts=3, error="E: x")
    assert adopted is not None
    with capture_logs() as logs:
        h.pipeline.dead_letter(*adopted, "exhausted", None)
    assert [r["event"] for r in logs] == ["handler.dead_lettered"]
    assert h.status(event)["a"] == Delivery("a", "dead", 3, "E: x")
    assert h.admission.wait_idle(0)
