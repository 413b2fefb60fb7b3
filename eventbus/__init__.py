"""eventbus: in-process domain events with isolated, retried, recorded deliveries."""

from eventbus._bus import EventBus
from eventbus._event import DeadLetter, Delivery, Event
from eventbus.exceptions import (
    BusClosedError,
    CodecError,
    DrainInHandlerError,
    DuplicateHandlerError,
    EventBusError,
    InvalidEventError,
    InvalidEventNameError,
    InvalidHandlerError,
    QueueFullError,
    UnknownDeadLetterError,
    UnknownEventError,
    UnknownHandlerError,
)
from eventbus.retry import RetryPolicy

__all__ = [
    "BusClosedError",
    "CodecError",
    "DeadLetter",
    "Delivery",
    "DrainInHandlerError",
    "DuplicateHandlerError",
    "Event",
    "EventBus",
    "EventBusError",
    "InvalidEventError",
    "InvalidEventNameError",
    "InvalidHandlerError",
    "QueueFullError",
    "RetryPolicy",
    "UnknownDeadLetterError",
    "UnknownEventError",
    "UnknownHandlerError",
]
