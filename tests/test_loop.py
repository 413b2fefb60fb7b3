"""The event loops async deliveries run on (eventbus._loop), without a bus: jobs are handed to
a loop from any thread, at most ``limit`` run at once, and every job ends somewhere: run,
taken back at shutdown, or reported as cancelled."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from eventbus._event import Event
from eventbus._loop import EventLoops, LoopRunner
from eventbus._matching import compile_pattern
from eventbus._records import RUNNING, Dispatch, RetryJob
from eventbus._registry import Subscription
from eventbus.exceptions import EventLoopError

pytestmark = pytest.mark.anyio


def make_job() -> RetryJob:
    async def handler(event: Event) -> None:
        pass

    sub = Subscription(handler, "h", compile_pattern("x"), 0, None, 1, True)
    dispatch = Dispatch(Event(name="x"), (sub,), contextvars.copy_context(), lambda d, i: None)
    return RetryJob(dispatch, 0)


class Calls:
    """The callbacks a runner is given, recording what they were called with."""

    def __init__(self) -> None:
        self.ran: list[RetryJob] = []
        self.cancelled: list[Dispatch] = []
        self.errors: list[BaseException] = []
        self.gate = asyncio.Event()
        self.block = False
        self.fail = False

    async def run(self, dispatch: Dispatch, index: int) -> None:
        dispatch.set_state(index, RUNNING)
        self.ran.append(RetryJob(dispatch, index))
        if self.fail:
            raise RuntimeError("a bug in the attempt")
        if self.block:
            await self.gate.wait()

    def on_cancelled(self, dispatch: Dispatch, index: int) -> None:
        self.cancelled.append(dispatch)

    def runner(self, loop: asyncio.AbstractEventLoop, limit: int = 10) -> LoopRunner:
        return LoopRunner(
            loop,
            limit=limit,
            run=self.run,
            cancelled=self.on_cancelled,
            on_error=self.errors.append,
        )

    def loops(self) -> EventLoops:
        return EventLoops(
            name="eventbus-test",
            limit=10,
            run=self.run,
            cancelled=self.on_cancelled,
            on_error=self.errors.append,
        )


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def closed_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.close()
    return loop


def test_submit_to_a_closed_loop_is_refused_and_keeps_nothing(calls, closed_loop):
    runner = calls.runner(closed_loop)
    assert not runner.usable()
    assert runner.submit(make_job()) is False
    assert not runner.has_backlog()


async def test_jobs_past_the_limit_wait_in_the_inbox_and_run_in_turn(calls):
    calls.block = True
    runner = calls.runner(asyncio.get_running_loop(), limit=2)
    jobs = [make_job() for _ in range(5)]
    for job in jobs:
        assert runner.submit(job)
    await asyncio.sleep(0)
    assert len(calls.ran) == 2
    assert runner.has_backlog()
    calls.gate.set()
    await runner.idle()
    assert [job.dispatch for job in calls.ran] == [job.dispatch for job in jobs]
    assert not runner.has_backlog()


async def test_a_job_submitted_from_another_thread_runs_on_the_loop(calls):
    runner = calls.runner(asyncio.get_running_loop())
    thread = threading.Thread(target=runner.submit, args=(make_job(),))
    thread.start()
    thread.join()
    await runner.idle()
    assert len(calls.ran) == 1


async def test_an_attempt_that_raises_is_reported_as_an_internal_error(calls):
    calls.fail = True
    runner = calls.runner(asyncio.get_running_loop())
    runner.submit(make_job())
    await runner.idle()
    [error] = calls.errors
    assert str(error) == "a bug in the attempt"


def test_shutdown_after_the_loop_ended_takes_back_queued_and_unfinished_jobs(calls):
    """A loop that stopped with a job queued and one mid-attempt: shutdown returns both."""
    calls.block = True
    loop = asyncio.new_event_loop()
    runner = calls.runner(loop, limit=1)
    first, second = make_job(), make_job()

    async def start_both() -> None:
        runner.submit(first)
        runner.submit(second)
        await asyncio.sleep(0)  # the first one starts and waits on the gate

    loop.run_until_complete(start_both())
    taken = runner.shutdown()
    assert {id(job.dispatch) for job in taken} == {id(first.dispatch), id(second.dispatch)}
    # The pending task of the first one is cancelled for the loop to close cleanly.
    for task in asyncio.all_tasks(loop):
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()


async def test_a_job_cancelled_before_its_first_step_is_reported(calls):
    runner = calls.runner(asyncio.get_running_loop())
    job = make_job()
    runner.submit(job)
    [task] = runner._tasks  # created, not yet started
    task.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert calls.ran == []
    assert calls.cancelled == [job.dispatch]


def test_event_loops_start_a_loop_of_their_own_and_stop_it_at_shutdown(calls):
    loops = calls.loops()
    job = make_job()
    loops.submit(job)
    runner = loops.runner()
    assert runner.owned
    asyncio.run_coroutine_threadsafe(runner.idle(), runner.loop).result(10)
    assert len(calls.ran) == 1
    assert loops.shutdown() == []
    assert runner.loop.is_closed()
    assert not runner.thread.is_alive()  # type: ignore[union-attr]


def test_after_shutdown_a_submitted_job_is_reported_cancelled(calls):
    loops = calls.loops()
    assert loops.shutdown() == []
    job = make_job()
    loops.submit(job)
    assert calls.cancelled == [job.dispatch]
    with pytest.raises(EventLoopError):
        loops.runner()


async def test_binding_retires_the_loop_of_its_own_which_shutdown_stops(calls):
    loops = calls.loops()
    loops.submit(make_job())
    own = loops.runner()
    await loops.idle()  # awaited from this loop, for the other
    loops.bind(asyncio.get_running_loop())
    loops.bind(asyncio.get_running_loop())  # again on the same loop: nothing changes
    assert loops.bound_to(asyncio.get_running_loop())
    assert loops.runner() is not own
    loops.submit(make_job())
    await loops.idle()
    assert len(calls.ran) == 2
    await asyncio.to_thread(loops.shutdown)
    assert own.loop.is_closed()


async def test_idle_with_nothing_bound_returns_at_once(calls):
    await calls.loops().idle()
