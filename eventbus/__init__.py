"""eventbus: in-process domain events with isolated, retried, recorded deliveries."""

from eventbus._bus import EventBus
from eventbus._event import DeadLetter, Delivery, Event
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
from eventbus.retry import RetryPolicy

__all__ = [
    "BusClosedError",
    "CodecError",
    "DeadLetter",
    "Delivery",
    "DrainInHandlerError",
    "DuplicateHandlerError",
    "DuplicateInFlightError",
    "Event",
    "EventBus",
    "EventBusError",
    "EventLoopError",
    "HandlerTimeoutError",
    "InvalidEventError",
    "InvalidEventNameError",
    "InvalidHandlerError",
    "PayloadTooLargeError",
    "QueueFullError",
    "RetryPolicy",
    "StoreError",
    "TransportError",
    "UnknownDeadLetterError",
    "UnknownEventError",
    "UnknownHandlerError",
]
