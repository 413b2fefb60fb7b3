"""Lifecycle signals, for metrics and tracing hooks (the only module that imports blinker).

Every signal is sent with the :class:`~eventbus.EventBus` as sender, so connect with
``sender=bus`` to hear one bus only::

    from eventbus import signals

    @signals.dead_lettered.connect_via(bus)
    def page_someone(bus, dead_letter):
        ...

Keyword arguments, by signal:

* ``event_emitted``: ``event``
* ``handler_succeeded``: ``event``, ``delivery``
* ``handler_failed``: ``event``, ``delivery``, ``error`` (the exception)
* ``retry_scheduled``: ``event``, ``delivery``, ``delay`` (seconds)
* ``dead_lettered``: ``event``, ``dead_letter``
* ``handler_stalled``: ``event``, ``delivery``, ``elapsed`` (seconds), ``stack`` (text)
* ``bus_closed``: ``abandoned`` (how many deliveries became dead letters at shutdown)

Receivers run on the thread where the outcome happened (a worker, for handler outcomes) and
should be quick. A receiver that raises is isolated like a handler: the error is logged as
``signal.receiver_failed`` and the other receivers still run. blinker holds receivers weakly
by default: connect a lambda or closure with ``weak=False`` or it may vanish.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blinker import NamedSignal, Namespace, Signal

__all__ = [
    "bus_closed",
    "dead_lettered",
    "event_emitted",
    "handler_failed",
    "handler_stalled",
    "handler_succeeded",
    "retry_scheduled",
]

_signals = Namespace()

event_emitted = _signals.signal("event_emitted", doc="An event was accepted by emit().")
handler_succeeded = _signals.signal("handler_succeeded", doc="A delivery succeeded.")
handler_failed = _signals.signal("handler_failed", doc="One attempt of a delivery raised.")
retry_scheduled = _signals.signal("retry_scheduled", doc="A failed delivery will be retried.")
dead_lettered = _signals.signal("dead_lettered", doc="A delivery became a dead letter.")
bus_closed = _signals.signal("bus_closed", doc="A bus finished closing.")
handler_stalled = _signals.signal(
    "handler_stalled", doc="An attempt has run past its handler's stall_warning."
)


def has_receivers(signal: Signal) -> bool:
    """True if anyone listens to *signal*: lets the bus skip building its arguments."""
    return bool(signal.receivers)


def send(
    signal: NamedSignal,
    sender: object,
    on_error: Callable[[str, BaseException], None],
    **kwargs: Any,
) -> None:
    """Call each receiver of *signal* for *sender*; a receiver that raises is reported to
    *on_error* (with the signal's name) and does not stop the others.

    Unlike ``Signal.send``, which lets the first failing receiver stop the rest.
    """
    if not signal.receivers:
        return
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - isolated like a handler, BaseException too
            on_error(signal.name, exc)
