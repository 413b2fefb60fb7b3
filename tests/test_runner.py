"""run_attempt(): one call of a handler, turned into an outcome; it never raises."""

from __future__ import annotations

import pytest

from eventbus._event import Event
from eventbus._runner import run_attempt


class Shutdown(SystemExit):
    """A SystemExit subclass, as a framework might raise to stop a worker."""


class Interrupted(KeyboardInterrupt):
    """A KeyboardInterrupt subclass."""


class Custom(BaseException):
    """A BaseException that is not an Exception."""


def test_returning_handler_gives_none() -> None:
    """A handler that returns makes the attempt a success (None), whatever it returned."""
    assert run_attempt(lambda event: "ignored", Event(name="order:created")) is None


def test_handler_is_called_with_the_event() -> None:
    """The handler receives the very event object."""
    received: list[Event] = []
    event = Event(name="order:created", payload={"id": 1})
    run_attempt(received.append, event)
    assert received == [event]
    assert received[0] is event


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("down"),
        ValueError("bad"),
        KeyboardInterrupt(),
        SystemExit(3),
        Shutdown(),
        Interrupted(),
        GeneratorExit(),
        Custom("stop"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_raised_error_is_returned_not_raised(error: BaseException) -> None:
    """Whatever the handler raises, Exception or BaseException, is returned as the outcome."""

    def handler(event: Event) -> None:
        raise error

    assert run_attempt(handler, Event(name="order:created")) is error


def test_returned_error_keeps_its_traceback() -> None:
    """The returned error's traceback reaches into the handler that raised it."""

    def failing_handler(event: Event) -> None:
        raise RuntimeError("down")

    error = run_attempt(failing_handler, Event(name="order:created"))
    assert error is not None
    tb = error.__traceback__
    names = []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert names[-1] == "failing_handler"
