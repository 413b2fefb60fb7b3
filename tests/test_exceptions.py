"""The error hierarchy: one base class, and the builtin each error is also caught as."""

from __future__ import annotations

import pytest

from eventbus import exceptions
from eventbus.exceptions import (
    BusClosedError,
    CodecError,
    DrainInHandlerError,
    DuplicateHandlerError,
    DuplicateInFlightError,
    EventBusError,
    EventLoopError,
    HandlerTimeoutError,
    InvalidEventError,
    InvalidEventNameError,
    InvalidHandlerError,
    PayloadTooLargeError,
    QueueFullError,
    StoreError,
    TransportError,
    UnknownDeadLetterError,
    UnknownEventError,
    UnknownHandlerError,
)

#: Each error and the builtin exception its docstring promises.
DOCUMENTED_BUILTIN: dict[type[EventBusError], type[Exception]] = {
    InvalidEventNameError: ValueError,
    StoreError: RuntimeError,
    TransportError: RuntimeError,
    DuplicateInFlightError: RuntimeError,
    CodecError: ValueError,
    PayloadTooLargeError: ValueError,
    DuplicateHandlerError: ValueError,
    InvalidHandlerError: TypeError,
    InvalidEventError: TypeError,
    BusClosedError: RuntimeError,
    QueueFullError: RuntimeError,
    DrainInHandlerError: RuntimeError,
    EventLoopError: RuntimeError,
    HandlerTimeoutError: TimeoutError,
    UnknownEventError: KeyError,
    UnknownDeadLetterError: KeyError,
    UnknownHandlerError: KeyError,
}


def test_base_class_is_an_exception() -> None:
    """EventBusError is an ordinary Exception, so `except Exception` catches every error."""
    assert issubclass(EventBusError, Exception)
    assert EventBusError.__bases__ == (Exception,)


@pytest.mark.parametrize(("error", "builtin"), DOCUMENTED_BUILTIN.items())
def test_error_subclasses_the_base_and_its_builtin(
    error: type[EventBusError], builtin: type[Exception]
) -> None:
    """Each error is both an EventBusError and the builtin a caller would already catch."""
    assert issubclass(error, EventBusError)
    assert issubclass(error, builtin)


@pytest.mark.parametrize(("error", "builtin"), DOCUMENTED_BUILTIN.items())
def test_error_is_caught_by_its_builtin(
    error: type[EventBusError], builtin: type[Exception]
) -> None:
    """Raising an error lands in an `except` clause for its builtin."""
    with pytest.raises(builtin):
        raise error("message")


@pytest.mark.parametrize("name", exceptions.__all__)
def test_every_exported_error_has_a_documented_builtin(name: str) -> None:
    """Every error in exceptions.__all__, except the base, has an entry in the table above."""
    error = getattr(exceptions, name)
    assert error is EventBusError or error in DOCUMENTED_BUILTIN


def test_errors_are_distinct_classes() -> None:
    """No two documented errors are the same class or subclass one another."""
    errors = list(DOCUMENTED_BUILTIN)
    for a in errors:
        for b in errors:
            if a is not b:
                assert not issubclass(a, b)
