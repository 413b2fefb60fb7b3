"""StoreRecovery: taking over what a store holds unfinished, and polling for more."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import pytest
import tenacity
from structlog.testing import capture_logs

from eventbus import signals
from eventbus._admission import Admission
from eventbus._backends import DurableBackend
from eventbus._event import DeadLetter, Delivery, Event
from eventbus._matching import compile_pattern
from eventbus._observe import InDelivery, Observer
from eventbus._outcomes import OutcomeRecorder
from eventbus._pipeline import Pipeline
from eventbus._records import Records, RetryJob
from eventbus._recovery import StoreRecovery
from eventbus._registry import Registry
from eventbus._retry_queue import RetryQueue
from eventbus.retry import RetryPolicy
from eventbus.stores import Claim, MemoryStore, StoredDelivery
from eventbus.testing import FakeClock
from eventbus.typing import Store
from tests.support.executors import QueueingExecutor

NAME = "order:created"
POLL = 2.0


class ScriptedStore(MemoryStore):
    """A MemoryStore whose claims hand over scripted deliveries (as after a crash, which a
    store in memory cannot outlive), and which counts its looks."""

    def __init__(self, *claims: Claim, on_claim: Callable[[], None] = lambda: None) -> None:
        super().__init__(poll_interval=POLL)
        self.open()
        self.claims = list(claims)
        self.on_claim = on_claim
        self.looks = 0
        self.released: list[tuple[str, str]] = []
        self.fail_looks: Exception | None = None

    def keep(self, event: Event, *handlers: str) -> None:
        """Hold *event* with a row per handler, so that later writes find it."""
        self.add(event, handlers)

    def claim(self, handlers: Collection[str]) -> Claim:
        self.on_claim()
        return self.claims.pop(0) if self.claims else Claim()

    def release(self, deliveries: Collection[tuple[str, str]]) -> None:
        self.released.extend(deliveries)
        super().release(deliveries)

    def needs_claim(self) -> bool:
        self.looks += 1
        if self.fail_looks is not None:
            raise self.fail_looks
        return bool(self.claims)


class Harness:
    """A durable pipeline over *store* with its recovery; jobs wait in a QueueingExecutor."""

    def __init__(self, store: Store, policy: RetryPolicy | None = None) -> None:
        self.store = store
        self.clock = FakeClock()
        self.executor = QueueingExecutor()
        self.registry = Registry()
        self.records = Records(100)
        self.admission = Admission(None, None)
        self.log = OutcomeRecorder()
        observer = Observer(self.log, object(), InDelivery())
        self.observer = observer
        self.retries: RetryQueue[RetryJob] = RetryQueue(self.clock, self._retry_due)
        self.pipeline = Pipeline(
            registry=self.registry,
            records=self.records,
            admission=self.admission,
            observer=observer,
            backend=DurableBackend(store, observer),
            executor=self.executor,
            clock=self.clock,
            retries=self.retries,
            policy=policy or RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(1)),
            guard=InDelivery(),
        )
        self.recovery = StoreRecovery(store, self.registry, self.pipeline, observer, self.clock)
        self.calls: list[tuple[str, Event]] = []

    def _retry_due(self, job: RetryJob) -> None:
        self.pipeline.retry_due(job)

    def subscribe(self, name: str, retry: RetryPolicy | None = None) -> None:
        def handler(event: Event) -> None:
            self.calls.append((name, event))

        self.registry.add(compile_pattern(NAME), handler, name=name, priority=0, retry=retry)

    def queued(self) -> list[tuple[str, str]]:
        """(event id, handler) of each job waiting for the executor."""
        out = []
        for job in self.executor.jobs:
            assert isinstance(job, RetryJob)
            out.append((job.dispatch.event.id, job.dispatch.subs[job.index].name))
        return out


def _left_by_a_closed_owner(store: MemoryStore, event: Event, *handlers: str) -> None:
    """Another bus kept *event* for *handlers* in *store* and closed; then ours opens it."""
    store.open()
    store.add(event, handlers)
    store.close()
    store.open()


def _event() -> Event:
    return Event(name=NAME, payload={"id": 1})


# -- take_over -----------------------------------------------------------------------------


def test_take_over_queues_a_closed_owner_unfinished_deliveries() -> None:
    """Pending deliveries of a closed owner are claimed and queued, one job each."""
    store = MemoryStore()
    event = _event()
    _left_by_a_closed_owner(store, event, "a", "b")
    h = Harness(store)
    h.subscribe("a")
    h.subscribe("b")
    assert h.recovery.take_over() == 2
    assert sorted(h.queued()) == [(event.id, "a"), (event.id, "b")]
    assert h.admission.active == 2


def test_queued_deliveries_run_and_settle_in_the_store() -> None:
    """The taken-over deliveries run their handlers and are recorded as succeeded."""
    store = MemoryStore()
    event = _event()
    _left_by_a_closed_owner(store, event, "a")
    h = Harness(store)
    h.subscribe("a")
    h.recovery.take_over()
    h.executor.run_all()
    assert h.calls == [("a", event)]
    assert store.status(event.id) == {"a": Delivery("a", "succeeded", 1)}
    assert h.admission.wait_idle(0)


def test_take_over_logs_how_many_it_recovered() -> None:
    """An explicit take-over (recover()) that found work logs bus.recovered with the counts."""
    store = MemoryStore()
    _left_by_a_closed_owner(store, _event(), "a")
    h = Harness(store)
    h.subscribe("a")
    with capture_logs() as logs:
        h.recovery.take_over(explicit=True)
    assert [(r["event"], r["queued"], r["quarantined"]) for r in logs] == [("bus.recovered", 1, 0)]


def test_a_poll_that_finds_only_new_work_logs_bus_claimed_at_debug() -> None:
    """A poll claiming deliveries never attempted (committed elsewhere) logs bus.claimed at
    debug, not bus.recovered: it is the ordinary path of emit(within=)."""
    store = MemoryStore()
    _left_by_a_closed_owner(store, _event(), "a")
    h = Harness(store)
    h.subscribe("a")
    with capture_logs() as logs:
        h.recovery.take_over()
    assert [(r["event"], r["log_level"], r["queued"]) for r in logs] == [
        ("bus.claimed", "debug", 1)
    ]


def test_a_poll_that_takes_over_an_interrupted_attempt_logs_bus_recovered() -> None:
    """A poll that takes over a delivery already attempted elsewhere logs bus.recovered."""
    store = MemoryStore()
    event = _event()
    store.open()
    store.add(event, ["a"])
    store.started(event.id, "a", 1)
    store.close()
    store.open()
    h = Harness(store)
    h.subscribe("a")
    with capture_logs() as logs:
        h.recovery.take_over()
    assert [r["event"] for r in logs] == ["bus.recovered"]


def test_take_over_of_nothing_logs_nothing() -> None:
    """An empty store yields 0 and no record."""
    store = MemoryStore()
    store.open()
    h = Harness(store)
    h.subscribe("a")
    with capture_logs() as logs:
        assert h.recovery.take_over() == 0
    assert logs == []


def _left_retrying(store: MemoryStore, event: Event, due_at: float) -> None:
    """A closed owner's delivery of *event* to "a" failed once and waits until *due_at*."""
    store.open()
    store.add(event, ["a"])
    store.started(event.id, "a", 1)
    store.retrying(event.id, "a", 1, "RuntimeError: down", due_at)
    store.close()
    store.open()


def test_retrying_delivery_is_scheduled_at_its_due_time() -> None:
    """A delivery that was waiting for its retry runs when its wall-clock due time comes."""
    store = MemoryStore()
    h = Harness(store)
    h.subscribe("a")
    event = _event()
    _left_retrying(store, event, h.clock.time() + 30)
    assert h.recovery.take_over() == 1
    assert h.queued() == []
    assert h.admission.waiting == 1
    h.clock.advance(29.9)
    assert h.queued() == []
    h.clock.advance(0.2)
    assert h.queued() == [(event.id, "a")]
    h.executor.run_all()
    assert store.status(event.id) == {"a": Delivery("a", "succeeded", 2)}


def test_retry_already_due_is_queued_at_once() -> None:
    """A retry whose due time has passed is queued now, not scheduled."""
    store = MemoryStore()
    h = Harness(store)
    h.subscribe("a")
    event = _event()
    _left_retrying(store, event, h.clock.time() - 60)
    h.recovery.take_over()
    assert h.queued() == [(event.id, "a")]
    assert h.admission.waiting == 0


def test_unknown_handler_is_warned_about_once() -> None:
    """Deliveries for a handler not subscribed here are left, with one warning per name."""
    store = MemoryStore()
    _left_by_a_closed_owner(store, _event(), "gone")
    store.close()
    _left_by_a_closed_owner(store, _event(), "gone")
    h = Harness(store)
    h.subscribe("a")
    with capture_logs() as logs:
        assert h.recovery.take_over() == 0
        assert h.recovery.take_over() == 0
    warnings = [r for r in logs if r["event"] == "delivery.unknown_handler"]
    assert [(r["handler"], r["deliveries"]) for r in warnings] == [("gone", 2)]
    assert h.queued() == []


def test_interrupted_last_attempt_becomes_a_process_lost_dead_letter() -> None:
    """A delivery whose process died during its last allowed attempt is dead, not run again."""
    event = _event()
    store = ScriptedStore(Claim(deliveries=[StoredDelivery(event, "a", "running", 3)]))
    store.keep(event, "a")
    h = Harness(store)
    h.subscribe("a")
    with capture_logs() as logs:
        assert h.recovery.take_over() == 0
    assert h.queued() == []
    assert h.calls == []
    [letter] = store.dead_letters()
    assert (letter.handler, letter.attempts, letter.reason) == ("a", 3, "exhausted")
    assert letter.error == "ProcessLost: the process stopped during attempt 3"
    assert [r["event"] for r in logs] == ["handler.dead_lettered", "bus.recovered"]
    assert h.admission.wait_idle(0)


def test_interrupted_attempt_with_attempts_left_is_queued() -> None:
    """A delivery interrupted before its last allowed attempt is run again."""
    event = _event()
    store = ScriptedStore(Claim(deliveries=[StoredDelivery(event, "a", "running", 2)]))
    store.keep(event, "a")
    h = Harness(store)
    h.subscribe("a")
    assert h.recovery.take_over() == 1
    h.executor.run_all()
    assert store.status(event.id) == {"a": Delivery("a", "succeeded", 3)}


def test_attempt_cut_short_by_a_clean_close_is_run_again() -> None:
    """A store closed while an attempt ran makes it pending again: it is queued, not dead."""
    store = MemoryStore()
    event = _event()
    store.open()
    store.add(event, ["a"])
    store.started(event.id, "a", 3)
    store.close()
    store.open()
    h = Harness(store)
    h.subscribe("a")
    assert h.recovery.take_over() == 1
    assert store.dead_letters() == []
    h.executor.run_all()
    assert h.calls == [("a", event)]


def test_handler_policy_decides_whether_the_process_was_lost() -> None:
    """The handler's own max_attempts, not the default, bounds an interrupted delivery."""
    event = _event()
    store = ScriptedStore(Claim(deliveries=[StoredDelivery(event, "a", "running", 3)]))
    store.keep(event, "a")
    h = Harness(store)
    h.subscribe("a", retry=RetryPolicy(max_attempts=5))
    assert h.recovery.take_over() == 1
    assert store.dead_letters() == []


def _quarantined() -> DeadLetter:
    """A dead letter a store made of a row it could not decode."""
    return DeadLetter(
        id="dl-1",
        event=_event(),
        handler="a",
        attempts=0,
        error="CodecError: bad payload",
        reason="not_retryable",
    )


def test_quarantined_rows_are_logged_as_dead_letters() -> None:
    """Rows the store could not decode are reported as dead letters and counted."""
    letter = _quarantined()
    h = Harness(ScriptedStore(Claim(quarantined=[letter])))
    h.subscribe("a")
    with capture_logs() as logs:
        assert h.recovery.take_over() == 0
    assert [(r["event"], r.get("dead_letter_id")) for r in logs] == [
        ("handler.dead_lettered", "dl-1"),
        ("bus.recovered", None),
    ]
    assert logs[1]["quarantined"] == 1


def test_quarantined_rows_are_signalled_as_dead_letters() -> None:
    """A dead_lettered receiver hears of rows the store quarantined, as of any dead letter."""
    letter = _quarantined()
    h = Harness(ScriptedStore(Claim(quarantined=[letter])))
    heard: list[DeadLetter] = []

    def receiver(sender: object, **kwargs: Any) -> None:
        heard.append(kwargs["dead_letter"])

    with signals.dead_lettered.connected_to(receiver), capture_logs():
        h.recovery.take_over()
    assert heard == [letter]


def test_delivery_of_a_handler_unsubscribed_during_the_claim_is_given_back() -> None:
    """A claimed delivery whose handler is gone by now is released to the store."""
    event = _event()
    store = ScriptedStore(Claim(deliveries=[StoredDelivery(event, "a", "pending", 0)]))
    store.keep(event, "a")
    h = Harness(store)
    h.subscribe("a")
    store.on_claim = lambda: h.registry.remove("a")
    assert h.recovery.take_over() == 0
    assert store.released == [(event.id, "a")]
    assert h.admission.wait_idle(0)


def test_delivery_already_in_flight_here_is_not_queued_twice() -> None:
    """A claimed delivery this bus is already running is skipped, and not counted."""
    event = _event()
    store = ScriptedStore(Claim(deliveries=[StoredDelivery(event, "a", "pending", 0)]))
    h = Harness(store)
    h.subscribe("a")
    h.pipeline.accept(event, None, None)
    assert h.recovery.take_over() == 0
    assert len(h.executor.jobs) == 1  # the accepted event's own job
    assert h.admission.active == 1


def test_take_over_after_close_queues_nothing() -> None:
    """Once admission is closed, claimed deliveries are not queued."""
    store = MemoryStore()
    _left_by_a_closed_owner(store, _event(), "a")
    h = Harness(store)
    h.subscribe("a")
    h.admission.close()
    assert h.recovery.take_over() == 0
    assert h.queued() == []


# -- polling -------------------------------------------------------------------------------


def test_polling_takes_over_work_that_appears_later() -> None:
    """A delivery made claimable while the bus runs (a replay) is picked up by the next look."""
    store = MemoryStore(poll_interval=POLL)
    event = _event()
    store.open()
    store.add(event, ["a"])
    letter = DeadLetter(
        id="dl-1", event=event, handler="a", attempts=3, error="E", reason="exhausted"
    )
    store.dead(letter)
    h = Harness(store)
    h.subscribe("a")
    h.recovery.start_polling()
    store.replay_dead_letter("dl-1")  # as from the command line: unowned, pending
    h.clock.advance(POLL)
    assert h.queued() == [(event.id, "a")]
    h.recovery.stop()


def test_polling_looks_again_every_interval() -> None:
    """Each look schedules the next one, poll_interval later."""
    store = ScriptedStore()
    h = Harness(store)
    h.recovery.start_polling()
    h.recovery.start_polling()  # a second start adds no second timer
    assert h.clock.pending == 1
    h.clock.advance(POLL)
    h.clock.advance(POLL)
    assert store.looks == 2
    assert h.clock.pending == 1
    h.recovery.stop()


def test_polling_stops_after_stop() -> None:
    """After stop() the pending look does nothing and no further look is scheduled."""
    event = _event()
    store = ScriptedStore(Claim(deliveries=[StoredDelivery(event, "a", "pending", 0)]))
    store.keep(event, "a")
    h = Harness(store)
    h.subscribe("a")
    h.recovery.start_polling()
    h.recovery.stop()
    h.clock.advance(POLL)
    assert store.looks == 0
    assert h.clock.pending == 0
    assert h.queued() == []
    h.recovery.start_polling()
    assert h.clock.pending == 0


def test_failing_look_is_reported_and_polling_goes_on() -> None:
    """A store error during a look is logged as internal_error and the next look is scheduled."""
    store = ScriptedStore()
    store.fail_looks = OSError("disk gone")
    h = Harness(store)
    h.recovery.start_polling()
    with capture_logs() as logs:
        h.clock.advance(POLL)
    assert [(r["event"], r["where"], r["error"]) for r in logs] == [
        ("eventbus.internal_error", "store", "OSError: disk gone")
    ]
    assert h.clock.pending == 1
    h.recovery.stop()


@pytest.mark.parametrize("state", ["pending", "running"])
def test_claimed_delivery_keeps_its_attempts_and_error(state: Any) -> None:
    """A taken-over delivery carries on from the attempts and error the store had."""
    event = _event()
    stored = StoredDelivery(event, "a", state, 1, "RuntimeError: down")
    store = ScriptedStore(Claim(deliveries=[stored]))
    store.keep(event, "a")
    h = Harness(store)
    h.subscribe("a")
    h.recovery.take_over()
    dispatch = h.records.get(event.id)
    assert dispatch is not None
    assert dispatch.snapshot(0) == Delivery("a", "pending", 1, "RuntimeError: down")
