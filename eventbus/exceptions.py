"""Every error eventbus raises, under one base class.

Each error also subclasses the built-in exception a caller would already catch for that kind of
mistake (``ValueError`` for bad values, ``TypeError`` for wrong types, ``RuntimeError`` for calls
made in the wrong state, ``KeyError`` for unknown ids), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "BusClosedError",
    "CodecError",
    "DrainInHandlerError",
    "DuplicateHandlerError",
    "DuplicateInFlightError",
    "EventBusError",
    "EventLoopError",
    "HandlerTimeoutError",
    "InvalidEventError",
    "InvalidEventNameError",
    "InvalidHandlerError",
    "PayloadTooLargeError",
    "QueueFullError",
    "StoreError",
    "TransportError",
    "UnknownDeadLetterError",
    "UnknownEventError",
    "UnknownHandlerError",
]


class EventBusError(Exception):
    """Base class of every error raised by eventbus."""


class InvalidEventNameError(EventBusError, ValueError):
    """An event name or subscription pattern is empty or malformed."""


class InvalidHandlerError(EventBusError, TypeError):
    """A handler is not callable, is a coroutine function, or cannot take one argument."""


class InvalidEventError(EventBusError, TypeError):
    """``emit()`` or ``on()`` got something that is neither a name nor an event class/instance."""


class DuplicateHandlerError(EventBusError, ValueError):
    """Two different handlers share a name, or one handler is subscribed twice to one pattern."""


class BusClosedError(EventBusError, RuntimeError):
    """The bus was closed; it accepts no more events."""


class QueueFullError(EventBusError, RuntimeError):
    """``max_pending`` deliveries are pending and ``emit()`` could not wait longer for room."""


class TransportError(EventBusError, RuntimeError):
    """The transport (Redis) could not be reached, or the connection broke during
    ``emit()``: the event was not published, or (if the break came after Redis ran the
    command) it was, and a retry may publish it twice."""


class StoreError(EventBusError, RuntimeError):
    """The store (PostgreSQL) could not be reached, or stayed out of reach while a write was
    retried; the call that raised it wrote nothing."""


class DuplicateInFlightError(EventBusError, RuntimeError):
    """A handler wrapped with ``RedisStreamsTransport.once`` is running the same event in
    another consumer right now; the bus retries it later (a retryable failure)."""


class DrainInHandlerError(EventBusError, RuntimeError):
    """``drain()`` or ``close()`` was called from inside a handler, where it would wait for
    itself forever."""


class EventLoopError(EventBusError, RuntimeError):
    """A call would block the event loop the bus's async handlers run on (``drain()`` or
    ``close()`` there: await ``adrain()`` or ``aclose()``), or would bind the bus to a second
    running loop."""


class HandlerTimeoutError(EventBusError, TimeoutError):
    """An attempt ran longer than its handler's ``timeout``: the attempt failed (and is retried
    per the handler's policy). An async handler was cancelled; a thread cannot be, so its late
    result is discarded and logged as ``handler.late_result``."""


class CodecError(EventBusError, ValueError):
    """A stored payload cannot be decoded: bad JSON, an unknown type name, or a failed rebuild
    (raised by :class:`eventbus.codec.JsonCodec`; a store quarantines such rows)."""


class PayloadTooLargeError(EventBusError, ValueError):
    """A payload's JSON text is larger than the codec's ``max_size``; nothing was stored or
    sent (raised by ``emit()`` with a store or transport that encodes payloads)."""


class UnknownEventError(EventBusError, KeyError):
    """No delivery records exist for this event id (never emitted, or evicted by retention)."""


class UnknownDeadLetterError(EventBusError, KeyError):
    """The dead letter was already replayed or purged."""


class UnknownHandlerError(EventBusError, KeyError):
    """No handler with this name is subscribed (e.g. it was removed before a replay)."""
