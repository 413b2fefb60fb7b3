"""The parts of delivery policies on their own (eventbus._policies): option parsing, the token
bucket as a function of time, and a gate's three stages with recording callbacks."""

from __future__ import annotations

import contextvars
from datetime import timedelta
from typing import Any

import pytest

from eventbus._event import Event
from eventbus._matching import compile_pattern
from eventbus._policies import (
    Gate,
    Policy,
    Rate,
    TokenBucket,
    check_delay,
    check_seconds,
    key_function,
    make_policy,
    parse_rate,
)
from eventbus._records import Dispatch, RetryJob
from eventbus._registry import Subscription
from eventbus.testing import FakeClock


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("10/s", Rate(10, 1.0)),
        ("100/m", Rate(100, 60.0)),
        ("5/h", Rate(5, 3600.0)),
        (" 3 / sec ", Rate(3, 1.0)),
        ("7/minute", Rate(7, 60.0)),
    ],
)
def test_rates_in_celerys_syntax_are_parsed(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "10", "10/d", "0/s", "-1/s", "1.5/s", ""])
def test_malformed_rates_are_value_errors(text):
    with pytest.raises(ValueError, match="rate_limit"):
        parse_rate(text)


def test_a_rate_that_is_not_text_is_a_type_error():
    with pytest.raises(TypeError, match="rate_limit"):
        parse_rate(10)


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf")])
def test_timeouts_must_be_positive_seconds(value):
    with pytest.raises(ValueError, match="timeout"):
        check_seconds(value, "timeout")


@pytest.mark.parametrize("value", ["5", True, [1]])
def test_timeouts_must_be_numbers(value):
    with pytest.raises(TypeError, match="timeout"):
        check_seconds(value, "timeout")


def test_delays_take_seconds_or_timedeltas_and_refuse_negatives():
    assert check_delay(0) == 0.0
    assert check_delay(1.5) == 1.5
    assert check_delay(timedelta(minutes=5)) == 300.0
    with pytest.raises(ValueError, match="delay"):
        check_delay(-1)
    with pytest.raises(ValueError, match="delay"):
        check_delay(timedelta(seconds=-1))
    with pytest.raises(TypeError, match="delay"):
        check_delay("30")


def test_concurrency_must_be_a_positive_int():
    options: dict[str, Any] = {
        "ordered_by": None,
        "rate_limit": None,
        "timeout": None,
        "stall_warning": None,
    }
    with pytest.raises(ValueError, match="concurrency"):
        make_policy(concurrency=0, **options)
    with pytest.raises(TypeError, match="concurrency"):
        make_policy(concurrency=2.0, **options)
    assert make_policy(concurrency=None, **options) is None


def test_ordered_by_a_name_reads_a_payload_key_or_attribute():
    key_of = key_function("order_id")
    assert key_of(Event(name="a", payload={"order_id": 7})) == 7

    class Order:
        order_id = 9

    assert key_of(Event(name="a", payload=Order())) == 9
    with pytest.raises(KeyError, match="order_id"):
        key_of(Event(name="a", payload={"other": 1}))
    with pytest.raises(KeyError, match="order_id"):
        key_of(Event(name="a", payload=None))


def test_ordered_by_must_be_a_name_or_a_function():
    with pytest.raises(TypeError, match="ordered_by"):
        key_function(42)
    with pytest.raises(TypeError, match="ordered_by"):
        key_function("")


def test_token_bucket_allows_a_burst_then_one_token_per_interval():
    """A pure function of time: 2/s gives two at once, then one every half second."""
    now = [0.0]
    bucket = TokenBucket(Rate(2, 1.0), lambda: now[0])
    assert (bucket.acquire(), bucket.acquire()) == (0.0, 0.0)
    assert bucket.acquire() == pytest.approx(0.5)
    now[0] = 0.25
    assert bucket.acquire() == pytest.approx(0.25)
    now[0] = 0.5
    assert bucket.acquire() == 0.0
    now[0] = 100.0  # a long quiet spell refills up to the burst, no more
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]


# -- a gate's stages ---------------------------------------------------------------------


class Recorder:
    """A gate wired to recording callbacks."""

    def __init__(self, policy: Policy, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.started: list[RetryJob] = []
        self.failed: list[tuple[RetryJob, BaseException]] = []
        self.parked = 0
        limiter = None if policy.rate is None else TokenBucket(policy.rate, self.clock.monotonic)
        self.gate = Gate(
            policy,
            clock=self.clock,
            limiter=limiter,
            pass_on=self.started.append,
            hold=lambda job: False,
            key_failed=lambda job, error: self.failed.append((job, error)),
            limiter_failed=lambda error: None,
            parked=self._park,
        )

    def _park(self, count: int) -> None:
        self.parked += count

    def offer(self, j: RetryJob) -> None:
        """Offer *j*, starting it as the pipeline does when the gate says it may start now
        (later turns are handed on through pass_on)."""
        if self.gate.offer(j):
            self.started.append(j)


def job(payload: object = None) -> RetryJob:
    def handler(event: Event) -> None:
        pass

    sub = Subscription(handler, "h", compile_pattern("a"), 0, None, 1)
    dispatch = Dispatch(
        Event(name="a", payload=payload), (sub,), contextvars.copy_context(), lambda d, i: None
    )
    return RetryJob(dispatch, 0)


def test_a_key_runs_one_delivery_at_a_time_in_the_order_offered():
    r = Recorder(Policy(ordered_by=key_function("k")))
    first, second, other = job({"k": 1}), job({"k": 1}), job({"k": 2})
    for j in (first, second, other):
        r.offer(j)
    assert r.started == [first, other]
    assert r.parked == 1  # the second waits, counted as waiting
    r.offer(first)  # its retry: the holder passes again
    assert r.started == [first, other, first]
    r.gate.settled(first.dispatch, 0)
    assert r.started == [first, other, first, second]
    assert r.parked == 0


def test_a_key_function_that_raises_fails_the_delivery_and_holds_no_key():
    r = Recorder(Policy(ordered_by=key_function("k")))
    broken, fine = job({"no k": 1}), job({"k": 1})
    r.offer(broken)
    r.offer(fine)
    assert [j for j, _ in r.failed] == [broken]
    assert isinstance(r.failed[0][1], KeyError)
    assert r.started == [fine]


def test_slots_bound_running_attempts_and_free_as_attempts_end():
    r = Recorder(Policy(concurrency=2))
    jobs = [job() for _ in range(4)]
    for j in jobs:
        r.offer(j)
    assert r.started == jobs[:2]
    assert r.parked == 0  # waiting for a slot is active work, not waiting
    r.gate.attempt_ended()
    assert r.started == jobs[:3]
    r.gate.attempt_ended()
    r.gate.attempt_ended()
    assert r.started == jobs


def test_tokens_start_at_most_the_rate_and_the_rest_when_the_clock_moves():
    r = Recorder(Policy(rate=Rate(2, 1.0)))
    jobs = [job() for _ in range(5)]
    for j in jobs:
        r.offer(j)
    assert r.started == jobs[:2]
    assert r.parked == 3
    r.clock.advance(0.5)
    assert r.started == jobs[:3]
    r.clock.advance(1.0)
    assert r.started == jobs
    assert r.parked == 0


def test_close_returns_everything_waiting_and_hands_nothing_on_afterwards():
    r = Recorder(Policy(ordered_by=key_function("k"), concurrency=1))
    first, behind_key, behind_slot = job({"k": 1}), job({"k": 1}), job({"k": 2})
    for j in (first, behind_key, behind_slot):
        r.offer(j)
    assert r.started == [first]
    waiting = r.gate.close()
    assert {id(j) for j in waiting} == {id(behind_key), id(behind_slot)}
    assert r.parked == 0
    r.gate.settled(first.dispatch, 0)
    r.gate.attempt_ended()
    assert r.started == [first]
