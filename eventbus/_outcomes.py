"""Outcome recording: one structlog record per outcome (the only module that imports structlog).

Levels are chosen so that a production filter at INFO drops the per-delivery chatter. The
table of every record, its level and its keys is docs/logging-and-signals.md (a test keeps
it equal to the records this module can write).

Every handler record carries ``event_id``, ``event_name``, ``handler`` and ``attempt``.
Payloads are never logged unless the bus is built with ``log_payloads=True``, and then with
secret-looking keys redacted (see :func:`redact`); the local variables of a logged
exception's finished frames are cleared first, so renderers that show locals cannot print a
payload either. No method raises, whatever the log sink does. The library never configures
structlog.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec

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


def _redact(value: Any, fragments: tuple[str, ...], depth: int) -> Any:  # noqa: PLR0911
    if depth > 20:  # a cyclic or absurdly deep structure: do not risk logging it
        return "[TOO DEEP]"
    if isinstance(value, Mapping):
        return {
            k: REDACTED
            if isinstance(k, str) and any(f in k.lower() for f in fragments)
            else _redact(v, fragments, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple: by field name
        fields = dict(zip(value._fields, value, strict=False))
        return {"__type__": type(value).__name__, **_redact(fields, fragments, depth + 1)}
    if isinstance(value, list | tuple):
        return [_redact(v, fragments, depth + 1) for v in value]
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return {"__type__": type(value).__name__, **_redact(vars(value), fragments, depth + 1)}
    if hasattr(value, "__slots__") and hasattr(value, "__dataclass_fields__"):
        fields = {name: getattr(value, name) for name in value.__dataclass_fields__}
        return {"__type__": type(value).__name__, **_redact(fields, fragments, depth + 1)}
    return value


P = ParamSpec("P")


def _never_raises(
    method: Callable[Concatenate[OutcomeRecorder, P], None],
) -> Callable[Concatenate[OutcomeRecorder, P], None]:
    """Make an outcome method swallow its own failures (see :class:`OutcomeRecorder`)."""

    def guarded(self: OutcomeRecorder, /, *args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a log sink never decides whether work happens
            self._sink_failed(method.__name__, exc)

    return guarded


def _without_locals(error: BaseException) -> BaseException:
    """*error*, with the local variables of its finished frames cleared.

    Renderers that show a traceback's locals (``dict_tracebacks``, rich) would print the
    payload a handler or receiver held in a variable, whatever ``log_payloads`` says. The
    frames still running (the bus's own, which hold no payload) cannot be cleared and are
    skipped; file names, line numbers and source lines are kept.
    """
    traceback.clear_frames(error.__traceback__)
    return error


def format_error(error: BaseException) -> str:
    """``"TypeName: message"``, the form used in logs, delivery records and dead letters."""
    try:
        message = str(error)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the outcome
        message = f"<unprintable {type(error).__name__} object>"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class OutcomeRecorder:
    """Turns delivery outcomes into structlog records. Thread-safe (structlog loggers are).

    No method ever raises: a log sink that fails (a full disk, a closed socket, a processor
    with a bug) must not decide whether a delivery happens, so a failed write drops that one
    record, and the first failure of each recorder is reported on ``sys.stderr`` (``warnings``
    would turn into errors under ``-W error`` and may itself log). Blocks only as long as the
    configured sink blocks.
    """

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
        self._sink_reported = False
        self._debug_check: Callable[[int], object] | None = None

    def _sink_failed(self, outcome: str, error: Exception) -> None:
        if self._sink_reported:
            return
        self._sink_reported = True
        with contextlib.suppress(Exception):  # stderr is gone too: nobody is left to tell
            sys.stderr.write(
                f"eventbus: cannot write log record {outcome!r} ({format_error(error)}); "
                "deliveries go on, later log failures are not reported\n"
            )

    def _event_keys(self, event: Event) -> dict[str, Any]:
        keys: dict[str, Any] = {"event_id": event.id, "event_name": event.name}
        if self._log_payloads:
            keys["payload"] = redact(event.payload, self._redact_keys)
            keys["metadata"] = redact(event.metadata, self._redact_keys)
        return keys

    def debug_enabled(self) -> bool:
        """True unless the configured logger filters out debug records.

        Asked once per event so that successes cost nothing when they are filtered out. With
        ``structlog.configure(cache_logger_on_first_use=True)`` structlog freezes the logger on
        first use; the recorder then keeps that logger's check and asks it directly (about
        0.1 us). Without caching, structlog builds a logger per call (about 1.5 us), and a
        reconfiguration is seen at once.
        """
        try:
            check = self._debug_check
            if check is None:
                log = self._log
                check = getattr(log, "is_enabled_for", None)
                if check is None:
                    return True
                if "bind" in vars(log):  # structlog's proxy has cached its logger: so may we
                    self._debug_check = check
            return bool(check(_DEBUG))
        except Exception as exc:  # noqa: BLE001 - a broken configuration: log as if enabled
            self._sink_failed("debug_enabled", exc)
            return True

    @_never_raises
    def emitted(self, event: Event, handlers: int) -> None:
        self._log.debug("event.emitted", handlers=handlers, **self._event_keys(event))

    @_never_raises
    def unhandled(self, event: Event) -> None:
        self._log.info("event.unhandled", **self._event_keys(event))

    @_never_raises
    def succeeded(self, event: Event, handler: str, attempt: int, duration: float) -> None:
        self._log.debug(
            "handler.succeeded",
            event_id=event.id,
            event_name=event.name,
            handler=handler,
            attempt=attempt,
            duration_ms=round(duration * 1000, 3),
        )

    @_never_raises
    def failed(
        self, event: Event, handler: str, attempt: int, error: BaseException, will_retry: bool
    ) -> None:
        # The traceback only with the last attempt (the one a dead letter follows), as Celery
        # does: a retried attempt says what failed in one line, so a retry storm does not
        # render a traceback per attempt, and the traceback that explains the dead letter is
        # still logged once.
        if will_retry:
            self._log.warning(
                "handler.failed",
                handler=handler,
                attempt=attempt,
                error=format_error(error),
                will_retry=True,
                **self._event_keys(event),
            )
            return
        self._log.warning(
            "handler.failed",
            handler=handler,
            attempt=attempt,
            error=format_error(error),
            will_retry=False,
            exc_info=_without_locals(error),
            **self._event_keys(event),
        )

    @_never_raises
    def retry_scheduled(self, event: Event, handler: str, attempt: int, delay: float) -> None:
        self._log.info(
            "handler.retry_scheduled",
            event_id=event.id,
            event_name=event.name,
            handler=handler,
            attempt=attempt,
            delay=round(delay, 3),
        )

    @_never_raises
    def stalled(
        self, event: Event, handler: str, attempt: int, elapsed: float, *, where: str, stack: str
    ) -> None:
        self._log.warning(
            "handler.stalled",
            event_id=event.id,
            event_name=event.name,
            handler=handler,
            attempt=attempt,
            elapsed=round(elapsed, 3),
            where=where,
            stack=stack,
        )

    @_never_raises
    def late_result(
        self, event: Event, handler: str, attempt: int, error: BaseException | None
    ) -> None:
        # The attempt was failed by its timeout already: what it did at last changes nothing.
        self._log.warning(
            "handler.late_result",
            event_id=event.id,
            event_name=event.name,
            handler=handler,
            attempt=attempt,
            outcome="succeeded" if error is None else format_error(error),
        )

    @_never_raises
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

    @_never_raises
    def replayed(self, dead_letter: DeadLetter) -> None:
        self._log.info(
            "handler.replayed",
            event_id=dead_letter.event.id,
            event_name=dead_letter.event.name,
            handler=dead_letter.handler,
            dead_letter_id=dead_letter.id,
        )

    @_never_raises
    def left_in_store(self, event: Event, handler: str, state: str) -> None:
        self._left("handler.left_in_store", event, handler, state)

    @_never_raises
    def left_in_stream(self, event: Event, handler: str, state: str) -> None:
        self._left("handler.left_in_stream", event, handler, state)

    def _left(self, record: str, event: Event, handler: str, state: str) -> None:
        self._log.info(
            record, event_id=event.id, event_name=event.name, handler=handler, state=state
        )

    @_never_raises
    def published(self, event: Event) -> None:
        self._log.debug("event.published", **self._event_keys(event))

    @_never_raises
    def relay_failed(self, event: Event, error: BaseException, waiting: int) -> None:
        self._log.warning(
            "relay.publish_failed",
            event_id=event.id,
            event_name=event.name,
            error=format_error(error),
            waiting=waiting,
            action="kept in the store; retried with backoff until the transport answers",
        )

    @_never_raises
    def relay_resumed(self, failures: int) -> None:
        self._log.info("relay.resumed", failed_attempts=failures)

    @_never_raises
    def stream_dead_lettered(self, entry_id: str, fields: Mapping[str, str], reason: str) -> None:
        self._log.error(
            "stream.dead_lettered",
            entry_id=entry_id,
            event_id=fields.get("id"),
            event_name=fields.get("name"),
            deliveries=fields.get("deliveries"),
            reason=reason,
        )

    @_never_raises
    def stream_taken_over(self, count: int) -> None:
        self._log.warning("stream.taken_over", events=count)

    @_never_raises
    def unknown_handler(self, handler: str, deliveries: int) -> None:
        self._log.warning(
            "delivery.unknown_handler",
            handler=handler,
            deliveries=deliveries,
            action="left pending in the store for a process that subscribes it",
        )

    @_never_raises
    def recovered(self, queued: int, quarantined: int) -> None:
        self._log.info("bus.recovered", queued=queued, quarantined=quarantined)

    @_never_raises
    def claimed(self, queued: int) -> None:
        self._log.debug("bus.claimed", queued=queued)

    @_never_raises
    def closed(self, abandoned: int, still_running: int, left_in_store: int | None) -> None:
        """*left_in_store* is ``None`` for a bus without a store (the key is then left out)."""
        level = self._log.warning if abandoned or still_running else self._log.info
        extra = {} if left_in_store is None else {"left_in_store": left_in_store}
        level("bus.closed", abandoned=abandoned, still_running=still_running, **extra)

    @_never_raises
    def receiver_failed(self, signal: str, error: BaseException) -> None:
        self._log.error(
            "signal.receiver_failed",
            signal=signal,
            error=format_error(error),
            exc_info=_without_locals(error),
        )

    @_never_raises
    def internal_error(self, where: str, error: BaseException) -> None:
        self._log.critical(
            "eventbus.internal_error",
            where=where,
            error=format_error(error),
            exc_info=_without_locals(error),
        )
