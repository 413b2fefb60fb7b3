"""Lifecycle signals: isolated sending and the documented signal set."""

from __future__ import annotations

from typing import Any

import pytest
from blinker import NamedSignal

from eventbus import signals

ISSUE_SIGNALS = [
    "event_emitted",
    "handler_succeeded",
    "handler_failed",
    "retry_scheduled",
    "dead_lettered",
]


class _Abort(BaseException):
    """A BaseException that is not an Exception, like KeyboardInterrupt but harmless."""


@pytest.fixture
def signal() -> NamedSignal:
    """A fresh signal, so no test leaves receivers on the module's shared signals."""
    return NamedSignal("probe")


@pytest.fixture
def errors() -> list[tuple[str, BaseException]]:
    """What send() reported to on_error."""
    return []


def _report(errors: list[tuple[str, BaseException]]) -> Any:
    return lambda name, exc: errors.append((name, exc))


def test_send_calls_receivers_with_sender_and_kwargs(
    signal: NamedSignal, errors: list[tuple[str, BaseException]]
) -> None:
    """Each receiver is called with the sender and the keyword arguments."""
    calls: list[tuple[object, dict[str, Any]]] = []
    sender = object()

    def receiver(sender: object, **kwargs: Any) -> None:
        calls.append((sender, kwargs))

    signal.connect(receiver)
    signals.send(signal, sender, _report(errors), event="e", delay=1.5)
    assert calls == [(sender, {"event": "e", "delay": 1.5})]
    assert errors == []


def test_raising_receiver_does_not_stop_the_others(
    signal: NamedSignal, errors: list[tuple[str, BaseException]]
) -> None:
    """A receiver that raises is isolated: every other receiver is still called."""
    called: list[str] = []

    def first(sender: object) -> None:
        called.append("first")

    def broken(sender: object) -> None:
        raise RuntimeError("metrics down")

    def last(sender: object) -> None:
        called.append("last")

    for receiver in (first, broken, last):
        signal.connect(receiver)
    signals.send(signal, None, _report(errors))
    assert sorted(called) == ["first", "last"]


def test_raising_receiver_is_reported_with_the_signal_name(
    signal: NamedSignal, errors: list[tuple[str, BaseException]]
) -> None:
    """A receiver's exception goes to on_error together with the signal's name."""
    error = RuntimeError("metrics down")

    def broken(sender: object) -> None:
        raise error

    signal.connect(broken)
    signals.send(signal, None, _report(errors))
    assert errors == [("probe", error)]


def test_each_raising_receiver_is_reported(
    signal: NamedSignal, errors: list[tuple[str, BaseException]]
) -> None:
    """Two raising receivers produce two reports."""

    def broken_a(sender: object) -> None:
        raise ValueError("a")

    def broken_b(sender: object) -> None:
        raise KeyError("b")

    signal.connect(broken_a)
    signal.connect(broken_b)
    signals.send(signal, None, _report(errors))
    assert sorted(type(exc).__name__ for _, exc in errors) == ["KeyError", "ValueError"]


def test_receiver_raising_a_base_exception_is_isolated(
    signal: NamedSignal, errors: list[tuple[str, BaseException]]
) -> None:
    """A receiver raising a BaseException is isolated like a handler: reported, not raised."""
    error = _Abort()
    called: list[str] = []

    def broken(sender: object) -> None:
        raise error

    def other(sender: object) -> None:
        called.append("other")

    signal.connect(broken)
    signal.connect(other)
    signals.send(signal, None, _report(errors))
    assert errors == [("probe", error)]
    assert called == ["other"]


def test_send_respects_sender_filtering(
    signal: NamedSignal, errors: list[tuple[str, BaseException]]
) -> None:
    """A receiver connected for one sender is not called for another."""
    mine, theirs = object(), object()
    calls: list[object] = []

    def receiver(sender: object) -> None:
        calls.append(sender)

    signal.connect(receiver, sender=mine)
    signals.send(signal, theirs, _report(errors))
    assert calls == []
    signals.send(signal, mine, _report(errors))
    assert calls == [mine]


def test_receiver_for_any_sender_hears_every_sender(
    signal: NamedSignal, errors: list[tuple[str, BaseException]]
) -> None:
    """A receiver connected without a sender is called for every sender."""
    a, b = object(), object()
    calls: list[object] = []

    def receiver(sender: object) -> None:
        calls.append(sender)

    signal.connect(receiver)
    signals.send(signal, a, _report(errors))
    signals.send(signal, b, _report(errors))
    assert calls == [a, b]


def test_send_without_receivers_does_nothing(
    signal: NamedSignal, errors: list[tuple[str, BaseException]]
) -> None:
    """Sending a signal nobody listens to calls nothing and reports nothing."""
    signals.send(signal, None, _report(errors), event="e")
    assert errors == []


def test_disconnected_receiver_is_not_called(
    signal: NamedSignal, errors: list[tuple[str, BaseException]]
) -> None:
    """A receiver disconnected before send() is not called."""
    calls: list[object] = []

    def receiver(sender: object) -> None:
        calls.append(sender)

    signal.connect(receiver)
    signal.disconnect(receiver)
    signals.send(signal, None, _report(errors))
    assert calls == []


def test_has_receivers_follows_connections(signal: NamedSignal) -> None:
    """has_receivers is False for a fresh signal, True once connected, False after disconnect."""

    def receiver(sender: object) -> None:
        pass

    assert not signals.has_receivers(signal)
    signal.connect(receiver)
    assert signals.has_receivers(signal)
    signal.disconnect(receiver)
    assert not signals.has_receivers(signal)


@pytest.mark.parametrize("name", ISSUE_SIGNALS)
def test_lifecycle_signals_exist(name: str) -> None:
    """Each documented lifecycle signal is a blinker signal of that name."""
    signal = getattr(signals, name)
    assert isinstance(signal, NamedSignal)
    assert signal.name == name


@pytest.mark.parametrize("name", signals.__all__)
def test_every_exported_signal_is_named_after_its_attribute(name: str) -> None:
    """Every signal in signals.__all__ carries its attribute name, as on_error reports it."""
    assert getattr(signals, name).name == name
