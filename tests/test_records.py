"""Records: dispatches by event id, retention of settled events, keys, adopting, dead letters."""

from __future__ import annotations

import contextvars

import pytest

from eventbus._event import DeadLetter, Delivery, Event
from eventbus._matching import compile_pattern
from eventbus._records import (
    ATTEMPT,
    DEAD,
    PENDING,
    RETRYING,
    RUNNING,
    SUCCEEDED,
    Dispatch,
    Records,
    RetryJob,
)
from eventbus._registry import Subscription

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


def _handler(event: Event) -> None:
    pass


def _sub(name: str) -> Subscription:
    return Subscription(_handler, name, compile_pattern("order:created"), 0, None, 1)


def _run(dispatch: Dispatch, index: int) -> None:
    pass


def _dispatch(*handlers: str, key: str | None = None) -> Dispatch:
    event = Event(name="order:created", payload={"id": 1})
    subs = [_sub(name) for name in handlers]
    return Dispatch(event, subs, contextvars.copy_context(), _run, key=key)


def _settle(records: Records, dispatch: Dispatch, *indexes: int, state: int = SUCCEEDED) -> bool:
    """Settle deliveries (all by default) as the pipeline does; True if the event settled."""
    settled = False
    for index in indexes or range(len(dispatch.progress)):
        dispatch.progress[index] = dispatch.progress[index] // ATTEMPT * ATTEMPT + state
        count = next(dispatch.settled)
        if count >= dispatch.total:
            settled = records.event_settled(dispatch, count)
    return settled


def _adopt(records: Records, event: Event, handler: str, **options: object):
    context = options.pop("context", contextvars.copy_context())
    return records.adopt(
        event,
        _sub(handler),
        context,  # type: ignore[arg-type]
        _run,
        first_attempt_at=options.pop("first_attempt_at", 0.0),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


def _letter(dispatch: Dispatch, handler: str = "a") -> DeadLetter:
    return DeadLetter(
        id=f"dl-{handler}-{dispatch.event.id}",
        event=dispatch.event,
        handler=handler,
        attempts=3,
        error="RuntimeError: down",
        reason="exhausted",
    )


# -- retention -----------------------------------------------------------------------------


@pytest.mark.parametrize("retention", [-1, True, 1.5, "10"])
def test_retention_must_be_a_non_negative_int(retention: object) -> None:
    """A negative, boolean or non-int retention is refused."""
    with pytest.raises(ValueError, match="status_retention"):
        Records(retention)  # type: ignore[arg-type]


def test_added_dispatch_is_found_by_event_id() -> None:
    """get() returns the dispatch recorded for an event id, None for an unknown one."""
    records = Records(10)
    dispatch = _dispatch("a")
    records.add(dispatch)
    assert records.get(dispatch.event.id) is dispatch
    assert records.get("unknown") is None


def test_retention_evicts_the_oldest_settled_events() -> None:
    """Past the retention, the events settled first are forgotten."""
    records = Records(2)
    first, second, third = _dispatch("a"), _dispatch("a"), _dispatch("a")
    for dispatch in (first, second, third):
        records.add(dispatch)
        assert _settle(records, dispatch)
    assert records.get(first.event.id) is None
    assert records.get(second.event.id) is second
    assert records.get(third.event.id) is third


def test_eviction_follows_settling_order_not_adding_order() -> None:
    """The event that settled first is evicted first, even if it was added later."""
    records = Records(1)
    older, newer = _dispatch("a"), _dispatch("a")
    records.add(older)
    records.add(newer)
    _settle(records, newer)
    _settle(records, older)
    assert records.get(newer.event.id) is None
    assert records.get(older.event.id) is older


def test_retention_never_evicts_events_in_flight() -> None:
    """An event with a delivery not yet settled stays, however many others settle."""
    records = Records(1)
    in_flight = _dispatch("a")
    records.add(in_flight)
    for _ in range(3):
        dispatch = _dispatch("a")
        records.add(dispatch)
        _settle(records, dispatch)
    assert records.get(in_flight.event.id) is in_flight


def test_event_without_handlers_is_settled_when_added() -> None:
    """A dispatch with no deliveries is settled at once (its context let go, evictable)."""
    records = Records(0)
    dispatch = _dispatch()
    records.add(dispatch)
    assert dispatch.context is None
    assert records.get(dispatch.event.id) is None


def test_settled_event_lets_its_context_go() -> None:
    """Once every delivery settled, the emitter's context is dropped."""
    records = Records(10)
    dispatch = _dispatch("a")
    records.add(dispatch)
    assert _settle(records, dispatch)
    assert dispatch.context is None
    assert records.get(dispatch.event.id) is dispatch


# -- idempotency keys ----------------------------------------------------------------------


def test_key_finds_the_event_emitted_under_it() -> None:
    """find_key returns the retained event of a key, None for another key."""
    records = Records(10)
    dispatch = _dispatch("a", key="order-1")
    records.add(dispatch)
    assert records.find_key("order-1") is dispatch.event
    assert records.find_key("order-2") is None


def test_key_is_dropped_with_its_evicted_event() -> None:
    """When retention evicts a keyed event, its key is free again."""
    records = Records(1)
    keyed = _dispatch("a", key="order-1")
    records.add(keyed)
    _settle(records, keyed)
    later = _dispatch("a")
    records.add(later)
    _settle(records, later)
    assert records.find_key("order-1") is None


def test_key_is_kept_while_its_event_is_in_flight() -> None:
    """An unsettled keyed event keeps its key, whatever the retention."""
    records = Records(0)
    keyed = _dispatch("a", key="order-1")
    records.add(keyed)
    other = _dispatch("a")
    records.add(other)
    _settle(records, other)
    assert records.find_key("order-1") is keyed.event


# -- event_settled -------------------------------------------------------------------------


def test_event_settled_refuses_while_a_delivery_is_unsettled() -> None:
    """A settle count below the event's total does not settle it."""
    records = Records(0)
    dispatch = _dispatch("a", "b")
    records.add(dispatch)
    assert not _settle(records, dispatch, 0)
    assert not records.event_settled(dispatch, 1)
    assert dispatch.context is not None
    assert records.get(dispatch.event.id) is dispatch


def test_event_settled_refuses_when_a_take_over_reopened_a_delivery() -> None:
    """A last settle drawn before a delivery was reopened does not settle the event; the
    reopened delivery's settle does."""
    records = Records(10)
    dispatch = _dispatch("a", "b")
    records.add(dispatch)
    _settle(records, dispatch, 0, state=DEAD)
    dispatch.progress[1] = ATTEMPT + SUCCEEDED
    count = next(dispatch.settled)  # b's settle: the last, as far as it can tell
    assert _adopt(records, dispatch.event, "a") == (dispatch, 0)
    assert not records.event_settled(dispatch, count)
    assert dispatch.context is not None
    assert _settle(records, dispatch, 0)
    assert dispatch.context is None


def test_event_settled_accepts_dead_and_succeeded_deliveries() -> None:
    """Dead letters and successes are both final: the event settles."""
    records = Records(10)
    dispatch = _dispatch("a", "b")
    records.add(dispatch)
    assert not _settle(records, dispatch, 0, state=DEAD)
    assert _settle(records, dispatch, 1)


# -- adopt ---------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [PENDING, RUNNING, RETRYING])
def test_adopt_refuses_a_delivery_in_flight(state: int) -> None:
    """A delivery that is queued, running or waiting for a retry is not adopted twice."""
    records = Records(10)
    dispatch = _dispatch("a")
    records.add(dispatch)
    dispatch.progress[0] = ATTEMPT + state
    assert _adopt(records, dispatch.event, "a") is None
    assert dispatch.total == 1


def test_adopt_reopens_a_settled_delivery() -> None:
    """A settled delivery is reopened in the same dispatch, pending, with the given history."""
    records = Records(10)
    dispatch = _dispatch("a")
    records.add(dispatch)
    _settle(records, dispatch, state=DEAD)
    adopted = _adopt(records, dispatch.event, "a", attempts=2, error="RuntimeError: down")
    assert adopted == (dispatch, 0)
    assert dispatch.snapshot(0) == Delivery("a", "pending", 2, "RuntimeError: down")
    assert dispatch.total == 2


def test_reopened_delivery_settles_its_event_again() -> None:
    """The settle of a reopened delivery is counted as its event's last one."""
    records = Records(10)
    dispatch = _dispatch("a")
    records.add(dispatch)
    _settle(records, dispatch, state=DEAD)
    _adopt(records, dispatch.event, "a")
    assert _settle(records, dispatch)


def test_reopened_event_is_not_evicted_until_it_settles_again() -> None:
    """Adopting takes a settled event off the eviction list."""
    records = Records(1)
    dispatch = _dispatch("a")
    records.add(dispatch)
    _settle(records, dispatch, state=DEAD)
    _adopt(records, dispatch.event, "a")
    for _ in range(3):
        other = _dispatch("a")
        records.add(other)
        _settle(records, other)
    assert records.get(dispatch.event.id) is dispatch


def test_adopt_re_adds_an_evicted_event() -> None:
    """An event no longer in memory gets a new dispatch holding just the adopted delivery."""
    records = Records(0)
    dispatch = _dispatch("a", "b")
    records.add(dispatch)
    _settle(records, dispatch)
    assert records.get(dispatch.event.id) is None
    adopted = _adopt(records, dispatch.event, "b", attempts=1)
    assert adopted is not None
    again, index = adopted
    assert records.get(dispatch.event.id) is again
    assert again.event is dispatch.event
    assert (index, again.total) == (0, 1)
    assert again.snapshot(0) == Delivery("b", "pending", 1)


def test_adopt_appends_a_handler_the_dispatch_lacked() -> None:
    """A delivery to a handler the event was not dispatched to is added at the end."""
    records = Records(10)
    dispatch = _dispatch("a")
    records.add(dispatch)
    adopted = _adopt(records, dispatch.event, "b")
    assert adopted == (dispatch, 1)
    assert [sub.name for sub in dispatch.subs] == ["a", "b"]
    assert dispatch.snapshot(1) == Delivery("b", "pending", 0)
    assert dispatch.total == 2


def test_adopted_delivery_keeps_its_own_context_and_start_time() -> None:
    """The adopted delivery runs in the context it was adopted with, not the event's."""
    records = Records(10)
    dispatch = _dispatch("a")
    records.add(dispatch)
    context = contextvars.copy_context()
    adopted = _adopt(records, dispatch.event, "b", context=context, first_attempt_at=7.5)
    assert adopted is not None
    assert dispatch.context_of(1) is context
    assert dispatch.context_of(0) is dispatch.context
    assert dispatch.extra(1).first_attempt_at == 7.5


def test_snapshot_during_adopt_never_indexes_past_the_handlers() -> None:
    """A status snapshot taken while a handler is being appended sees a consistent dispatch."""
    records = Records(10)
    dispatch = _dispatch("a")
    records.add(dispatch)
    seen: list[list[Delivery]] = []

    class SnapshotOnAppend(list[int]):
        def append(self, value: int) -> None:
            super().append(value)
            # What bus.status() on another thread could read at this moment.
            seen.append([dispatch.snapshot(i) for i in range(len(dispatch.progress))])

    dispatch.progress = SnapshotOnAppend(dispatch.progress)
    _adopt(records, dispatch.event, "b")
    assert len(seen) == 1


# -- dead letters --------------------------------------------------------------------------


def test_dead_letter_is_listed_and_found_until_taken() -> None:
    """An added dead letter is listed and found by id; take() removes it once."""
    records = Records(10)
    dispatch = _dispatch("a")
    letter = _letter(dispatch)
    records.add_dead_letter(letter)
    assert records.dead_letters() == [letter]
    assert records.get_dead_letter(letter.id) is letter
    assert records.take_dead_letter(letter.id) is letter
    assert records.take_dead_letter(letter.id) is None
    assert records.get_dead_letter(letter.id) is None
    assert records.dead_letters() == []


def test_purge_dead_letters_removes_all_and_counts_them() -> None:
    """purge_dead_letters() empties the dead letters and says how many there were."""
    records = Records(10)
    dispatch = _dispatch("a", "b")
    records.add_dead_letter(_letter(dispatch, "a"))
    records.add_dead_letter(_letter(dispatch, "b"))
    assert records.purge_dead_letters() == 2
    assert records.dead_letters() == []
    assert records.purge_dead_letters() == 0


# -- Dispatch and RetryJob -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "name"),
    [
        (PENDING, "pending"),
        (RUNNING, "running"),
        (RETRYING, "retrying"),
        (SUCCEEDED, "succeeded"),
        (DEAD, "dead"),
    ],
)
def test_snapshot_decodes_state_and_attempts_from_progress(state: int, name: str) -> None:
    """progress = attempts * ATTEMPT + state reads back as a Delivery."""
    dispatch = _dispatch("a")
    dispatch.progress[0] = 3 * ATTEMPT + state
    assert dispatch.snapshot(0) == Delivery("a", name, 3, None)  # type: ignore[arg-type]


def test_snapshot_carries_the_last_error() -> None:
    """A delivery's recorded error is part of its snapshot; others have none."""
    dispatch = _dispatch("a", "b")
    dispatch.progress[1] = ATTEMPT + RETRYING
    dispatch.extra(1).error = "RuntimeError: down"
    assert dispatch.snapshot(1) == Delivery("b", "retrying", 1, "RuntimeError: down")
    assert dispatch.error(0) is None


def test_each_call_of_a_dispatch_runs_the_next_delivery() -> None:
    """Calling the dispatch once per handler runs indexes 0, 1, ... in order."""
    ran: list[int] = []
    event = Event(name="order:created")
    dispatch = Dispatch(
        event, [_sub("a"), _sub("b")], contextvars.copy_context(), lambda d, i: ran.append(i)
    )
    dispatch()
    dispatch()
    assert ran == [0, 1]


def test_claim_takes_the_index_a_run_would_have() -> None:
    """claim() uses up the next index, so a later run starts at the one after."""
    ran: list[int] = []
    dispatch = Dispatch(
        Event(name="x"),
        [_sub("a"), _sub("b")],
        contextvars.copy_context(),
        lambda d, i: ran.append(i),
    )
    assert dispatch.claim() == 0
    dispatch()
    assert ran == [1]


def test_dispatch_runs_in_a_copy_of_the_emitter_context() -> None:
    """A run sees the emitter's context variables, and its own changes stay in the run."""
    seen: list[str] = []

    def run(dispatch: Dispatch, index: int) -> None:
        seen.append(request_id.get())
        request_id.set("changed")

    token = request_id.set("r-1")
    try:
        context = contextvars.copy_context()
    finally:
        request_id.reset(token)
    dispatch = Dispatch(Event(name="x"), [_sub("a"), _sub("b")], context, run)
    dispatch()
    dispatch()
    assert seen == ["r-1", "r-1"]
    assert context[request_id] == "r-1"


def test_retry_job_runs_its_delivery_in_the_delivery_context() -> None:
    """A RetryJob runs its index in the adopted context when there is one, else the event's."""
    seen: list[tuple[int, str]] = []

    def run(dispatch: Dispatch, index: int) -> None:
        seen.append((index, request_id.get()))

    emitter = contextvars.Context()
    emitter.run(request_id.set, "emitter")
    replayer = contextvars.Context()
    replayer.run(request_id.set, "replayer")
    dispatch = Dispatch(Event(name="x"), [_sub("a"), _sub("b")], emitter, run)
    dispatch.extra(1).context = replayer
    RetryJob(dispatch, 0)()
    RetryJob(dispatch, 1)()
    assert seen == [(0, "emitter"), (1, "replayer")]
    assert RetryJob(dispatch, 1).claim() == 1


def test_index_of_finds_a_handler_by_name() -> None:
    """index_of returns a handler's position, None for a handler the event lacks."""
    dispatch = _dispatch("a", "b")
    assert dispatch.index_of("b") == 1
    assert dispatch.index_of("c") is None
