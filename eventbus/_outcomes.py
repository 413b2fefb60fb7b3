"""Outcome recording: one structlog record per outcome (the only module that imports structlog).

Levels are chosen so that a production filter at INFO drops the per-delivery chatter:

=========================== ======== ==========================================================
event                       level    extra keys
=========================== ======== ==========================================================
``event.emitted``           debug    ``handlers``
``event.unhandled``         info     (nobody listens to this name)
``handler.succeeded``       debug    ``duration_ms``
``handler.failed``          warning  ``error``, ``exc_info`` (the traceback), ``will_retry``
``handler.retry_scheduled`` info     ``delay``
``handler.dead_lettered``   error    ``error``, ``reason``, ``dead_letter_id``
``handler.replayed``        info     ``dead_letter_id`` (no ``attempt``: the count restarts)
``bus.closed``              info     ``abandoned``, ``still_running`` (warning if either > 0)
=========================== ======== ==========================================================

Every handler record carries ``event_id``, ``event_name``, ``handler`` and ``attempt``.
Payloads are never logged unless the bus is built with ``log_payloads=True``, and then with
secret-looking keys redacted (see :func:`redact`). The library never configures structlog.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from eventbus._event import DeadLetter, Event

__all__ = ["DEFAULT_REDACT_KEYS", "OutcomeRecorder", "format_error", "redact"]

#: Keys whose values are replaced by ``"[REDACTED]"`` wherever they appear in a logged payload
#: or metadata (matched case-insensitively as substrings, so ``"X-Api-Key"`` and
#: ``"stripe_secret"`` are caught too).
DEFAULT_REDACT_KEYS: frozenset[str] = frozenset(
    {
        "password",
        "passwd",
        "secret",
        "token",
        "api_key",
        "apikey",
        "api-key",
        "authorization",
        "cookie",
        "credit_card",
        "card_number",
        "cvv",
        "ssn",
        "private_key",
    }
)
REDACTED = "[REDACTED]"
_DEBUG = 10  # logging.DEBUG, the level structlog's filtering loggers compare against


def redact(value: Any, keys: Iterable[str] = DEFAULT_REDACT_KEYS) -> Any:
    """Return a copy of *value* with the values of secret-looking keys replaced, recursively
    through mappings, lists and tuples, and through dataclass-like objects' ``__dict__``."""
    fragments = tuple(k.lower() for k in keys)
    return _redact(value, fragments, depth=0)


def _redact(value: Any, fragments: tuple[str, ...], depth: int) -> Any:
    if depth > 20:  # a cyclic or absurdly deep structure: do not risk logging it
        return "[TOO DEEP]"
    if isinstance(value, Mapping):
        return {
            k: REDACTED
            if isinstance(k, str) and any(f in k.lower() for f in fragments)
            else _redact(v, fragments, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, fragments, depth + 1) for v in value]
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return {"__type__": type(value).__name__, **_redact(vars(value), fragments, depth + 1)}
    if hasattr(value, "__slots__") and hasattr(value, "__dataclass_fields__"):
        fields = {name: getattr(value, name) for name in value.__dataclass_fields__}
        return {"__type__": type(value).__name__, **_redact(fields, fragments, depth + 1)}
    return value


def format_error(error: BaseException) -> str:
    """``"TypeName: message"``, the form used in logs, delivery records and dead letters."""
    try:
        message = str(error)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the outcome
        message = f"<unprintable {type(error).__name__} object>"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class OutcomeRecorder:
    """Turns delivery outcomes into structlog records. Thread-safe (structlog loggers are)."""

    def __init__(
        self,
        *,
        logger_name: str = "eventbus",
        log_payloads: bool = False,
        redact_keys: Iterable[str] = DEFAULT_REDACT_KEYS,
    ) -> None:
        self._log = structlog.get_logger(logger_name)
        self._log_payloads = log_payloads
        self._redact_keys = frozenset(redact_keys)

    def _event_keys(self, event: Event) -> dict[str, Any]:
        keys: dict[str, Any] = {"event_id": event.id, "event_name": event.name}
        if self._log_payloads:
            keys["payload"] = redact(event.payload, self._redact_keys)
            keys["metadata"] = redact(event.metadata, self._redact_keys)
        return keys

    def debug_enabled(self) -> bool:
        """True unless the configured logger filters out debug records.

        Asked once per event so that successes cost nothing when they are filtered out. With
        ``structlog.configure(cache_logger_on_first_use=True)`` the question costs about
        0.5 us; without it, structlog builds a logger per call (about 1.5 us).
        """
        is_enabled_for = getattr(self._log, "is_enabled_for", None)
        return True if is_enabled_for is None else bool(is_enabled_for(_DEBUG))

    def emitted(self, event: Event, handlers: int) -> None:
        self._log.debug("event.emitted", handlers=handlers, **self._event_keys(event))

    def unhandled(self, event: Event) -> None:
        self._log.info("event.unhandled", **self._event_keys(event))

    def succeeded(self, event: Event, handler: str, attempt: int, duration: float) -> None:
        self._log.debug(
            "handler.succeeded",
            event_id=event.id,
            event_name=event.name,
            handler=handler,
            attempt=attempt,
            duration_ms=round(duration * 1000, 3),
        )

    def failed(
        self, event: Event, handler: str, attempt: int, error: BaseException, will_retry: bool
    ) -> None:
        self._log.warning(
            "handler.failed",
            handler=handler,
            attempt=attempt,
            error=format_error(error),
            will_retry=will_retry,
            exc_info=error,
            **self._event_keys(event),
        )

    def retry_scheduled(self, event: Event, handler: str, attempt: int, delay: float) -> None:
        self._log.info(
            "handler.retry_scheduled",
            event_id=event.id,
            event_name=event.name,
            handler=handler,
            attempt=attempt,
            delay=round(delay, 3),
        )

    def dead_lettered(self, dead_letter: DeadLetter) -> None:
        self._log.error(
            "handler.dead_lettered",
            handler=dead_letter.handler,
            attempt=dead_letter.attempts,
            error=dead_letter.error,
            reason=dead_letter.reason,
            dead_letter_id=dead_letter.id,
            **self._event_keys(dead_letter.event),
        )

    def replayed(self, dead_letter: DeadLetter) -> None:
        self._log.info(
            "handler.replayed",
            event_id=dead_letter.event.id,
            event_name=dead_letter.event.name,
            handler=dead_letter.handler,
            dead_letter_id=dead_letter.id,
        )

    def left_in_store(self, event: Event, handler: str, state: str) -> None:
        self._left("handler.left_in_store", event, handler, state)

    def left_in_stream(self, event: Event, handler: str, state: str) -> None:
        self._left("handler.left_in_stream", event, handler, state)

    def _left(self, record: str, event: Event, handler: str, state: str) -> None:
        self._log.info(
            record, event_id=event.id, event_name=event.name, handler=handler, state=state
        )

    def published(self, event: Event) -> None:
        self._log.debug("event.published", **self._event_keys(event))

    def stream_dead_lettered(self, entry_id: str, fields: Mapping[str, str], reason: str) -> None:
        self._log.error(
            "stream.dead_lettered",
            entry_id=entry_id,
            event_id=fields.get("id"),
            event_name=fields.get("name"),
            deliveries=fields.get("deliveries"),
            reason=reason,
        )

    def stream_taken_over(self, count: int) -> None:
        self._log.warning("stream.taken_over", events=count)

    def unknown_handler(self, handler: str, deliveries: int) -> None:
        self._log.warning(
            "delivery.unknown_handler",
            handler=handler,
            deliveries=deliveries,
            action="left pending in the store for a process that subscribes it",
        )

    def recovered(self, queued: int, quarantined: int) -> None:
        self._log.info("bus.recovered", queued=queued, quarantined=quarantined)

    def closed(self, abandoned: int, still_running: int, left_in_store: int | None) -> None:
        """*left_in_store* is ``None`` for a bus without a store (the key is then left out)."""
        level = self._log.warning if abandoned or still_running else self._log.info
        extra = {} if left_in_store is None else {"left_in_store": left_in_store}
        level("bus.closed", abandoned=abandoned, still_running=still_running, **extra)

    def receiver_failed(self, signal: str, error: BaseException) -> None:
        self._log.error(
            "signal.receiver_failed", signal=signal, error=format_error(error), exc_info=error
        )

    def internal_error(self, where: str, error: BaseException) -> None:
        self._log.critical(
            "eventbus.internal_error", where=where, error=format_error(error), exc_info=error
        )
