"""Outcome records through structlog, and redaction of secrets in logged payloads."""

from __future__ import annotations

import copy
import io
import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pytest
import structlog
from structlog.testing import capture_logs

from eventbus import RetryPolicy, signals
from eventbus._event import DeadLetter, Event
from eventbus._outcomes import REDACTED, OutcomeRecorder, format_error, redact
from eventbus.testing import inline_bus

HANDLER_KEYS = {"event", "log_level", "event_id", "event_name", "handler", "attempt"}


@pytest.fixture
def event() -> Event:
    """An event whose payload and metadata hold a secret."""
    return Event(
        name="order:created",
        payload={"id": 42, "password": "hunter2"},
        metadata={"request_id": "r-1", "Authorization": "Bearer abc"},
    )


@pytest.fixture
def recorder() -> OutcomeRecorder:
    """A recorder with the default options (payloads not logged)."""
    return OutcomeRecorder()


def _one(logs: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(logs) == 1, logs
    return logs[0]


# -- redact -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "PASSWORD",
        "user_password",
        "token",
        "access_token",
        "Refresh-Token",
        "secret",
        "client_secret",
        "api_key",
        "STRIPE_API_KEY",
        "X-Api-Key",
        "authorization",
        "Authorization",
    ],
)
def test_redact_replaces_secret_looking_keys(key: str) -> None:
    """A key containing a secret-looking word, in any case, has its value replaced."""
    assert redact({key: "s3cr3t"}) == {key: REDACTED}


@pytest.mark.parametrize("key", ["id", "email", "amount", "name", "items"])
def test_redact_leaves_other_keys(key: str) -> None:
    """A key that does not look secret keeps its value."""
    assert redact({key: "value"}) == {key: "value"}


def test_redact_recurses_into_nested_mappings() -> None:
    """Secrets in nested dictionaries are replaced."""
    value = {"user": {"name": "ada", "credentials": {"token": "t", "kind": "oauth"}}}
    assert redact(value) == {
        "user": {"name": "ada", "credentials": {"token": REDACTED, "kind": "oauth"}}
    }


def test_redact_recurses_into_lists() -> None:
    """Secrets in dictionaries inside lists are replaced."""
    value = {"accounts": [{"id": 1, "password": "a"}, {"id": 2, "password": "b"}]}
    assert redact(value) == {
        "accounts": [{"id": 1, "password": REDACTED}, {"id": 2, "password": REDACTED}]
    }


def test_redact_recurses_into_tuples() -> None:
    """Secrets in dictionaries inside tuples are replaced."""
    assert redact(({"secret": "x"}, 1)) == [{"secret": REDACTED}, 1]


def test_redact_replaces_a_whole_secret_subtree() -> None:
    """A secret key whose value is a structure has the whole value replaced."""
    assert redact({"secrets": {"a": 1, "b": [2]}}) == {"secrets": REDACTED}


@dataclass
class Login:
    """A plain dataclass payload."""

    user: str
    password: str


@dataclass(frozen=True, slots=True)
class ApiCall:
    """A frozen, slotted dataclass payload."""

    url: str
    api_key: str
    headers: dict[str, str] = field(default_factory=dict)


def test_redact_reads_dataclass_instances() -> None:
    """A dataclass instance's secret fields are replaced and the others kept."""
    assert redact(Login("ada", "hunter2")) == {
        "__type__": "Login",
        "user": "ada",
        "password": REDACTED,
    }


def test_redact_reads_slotted_dataclass_instances() -> None:
    """A slots dataclass instance is redacted field by field, nested values included."""
    call = ApiCall("https://x", "k-123", {"Authorization": "Bearer t", "Accept": "json"})
    assert redact(call) == {
        "__type__": "ApiCall",
        "url": "https://x",
        "api_key": REDACTED,
        "headers": {"Authorization": REDACTED, "Accept": "json"},
    }


def test_redact_reads_dataclasses_inside_structures() -> None:
    """A dataclass nested in a dictionary is redacted too."""
    assert redact({"login": Login("ada", "pw")})["login"]["password"] == REDACTED


def test_redact_does_not_mutate_its_input() -> None:
    """The value passed to redact is left exactly as it was."""
    value = {"password": "pw", "nested": {"token": "t", "items": [{"secret": "s"}]}}
    before = copy.deepcopy(value)
    redact(value)
    assert value == before


def test_redact_does_not_mutate_a_dataclass() -> None:
    """A dataclass passed to redact keeps its secret field."""
    login = Login("ada", "hunter2")
    redact(login)
    assert login.password == "hunter2"


@pytest.mark.parametrize("value", [None, 42, 1.5, "password", b"token", True])
def test_redact_returns_scalars_unchanged(value: object) -> None:
    """Scalars, even secret-looking strings, are returned as they are."""
    assert redact(value) == value


def test_redact_leaves_non_string_keys() -> None:
    """A non-string key is kept with its value."""
    assert redact({1: "one", (2, 3): "pair"}) == {1: "one", (2, 3): "pair"}


def test_redact_with_custom_keys() -> None:
    """Custom keys replace the default list."""
    assert redact({"email": "a@b.c", "password": "pw"}, keys={"EMAIL"}) == {
        "email": REDACTED,
        "password": "pw",
    }


def test_redact_stops_on_cycles() -> None:
    """A cyclic structure is cut off instead of recursing forever."""
    value: dict[str, Any] = {"id": 1}
    value["self"] = value
    result = redact(value)
    depth = 0
    while isinstance(result, dict):
        result = result["self"]
        depth += 1
    assert result == "[TOO DEEP]"
    assert depth > 1


def test_redact_reads_event_metadata() -> None:
    """An event's read-only metadata mapping is redacted like a dictionary."""
    event = Event(name="a", metadata={"token": "t", "request_id": "r"})
    assert redact(event.metadata) == {"token": REDACTED, "request_id": "r"}


# -- format_error -------------------------------------------------------------------------


def test_format_error_with_message() -> None:
    """An error with a message is formatted as 'Type: message'."""
    assert format_error(ValueError("bad id")) == "ValueError: bad id"


def test_format_error_without_message() -> None:
    """An error with an empty message is formatted as its bare type name."""
    assert format_error(TimeoutError()) == "TimeoutError"


def test_format_error_uses_the_concrete_type() -> None:
    """A subclass is named by its own type, not its base."""

    class InventoryUnavailable(ConnectionError):
        pass

    assert format_error(InventoryUnavailable("down")) == "InventoryUnavailable: down"


def test_format_error_survives_a_failing_str() -> None:
    """An error whose __str__ raises is still formatted, led by its type name."""

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str for you")

    assert format_error(Unprintable()).startswith("Unprintable")


# -- OutcomeRecorder ----------------------------------------------------------------------


def test_emitted_record(recorder: OutcomeRecorder, event: Event) -> None:
    """event.emitted is a debug record with the event's id, name and handler count."""
    with capture_logs() as logs:
        recorder.emitted(event, 3)
    assert _one(logs) == {
        "event": "event.emitted",
        "log_level": "debug",
        "event_id": event.id,
        "event_name": "order:created",
        "handlers": 3,
    }


def test_unhandled_record(recorder: OutcomeRecorder, event: Event) -> None:
    """event.unhandled is an info record with the event's id and name."""
    with capture_logs() as logs:
        recorder.unhandled(event)
    assert _one(logs) == {
        "event": "event.unhandled",
        "log_level": "info",
        "event_id": event.id,
        "event_name": "order:created",
    }


def test_succeeded_record(recorder: OutcomeRecorder, event: Event) -> None:
    """handler.succeeded is a debug record with the handler keys and duration_ms."""
    with capture_logs() as logs:
        recorder.succeeded(event, "app.send", 2, 0.0123456)
    assert _one(logs) == {
        "event": "handler.succeeded",
        "log_level": "debug",
        "event_id": event.id,
        "event_name": "order:created",
        "handler": "app.send",
        "attempt": 2,
        "duration_ms": 12.346,
    }


def test_failed_record_of_a_last_attempt(recorder: OutcomeRecorder, event: Event) -> None:
    """handler.failed of an attempt not retried is a warning with the error, the exception for
    the traceback, and will_retry False."""
    error = ConnectionError("down")
    with capture_logs() as logs:
        recorder.failed(event, "app.send", 3, error, False)
    record = _one(logs)
    assert set(record) == HANDLER_KEYS | {"error", "exc_info", "will_retry"}
    assert record["event"] == "handler.failed"
    assert record["log_level"] == "warning"
    assert record["handler"] == "app.send"
    assert record["attempt"] == 3
    assert record["error"] == "ConnectionError: down"
    assert record["exc_info"] is error
    assert record["will_retry"] is False


def test_failed_record_of_a_retried_attempt_has_no_traceback(
    recorder: OutcomeRecorder, event: Event
) -> None:
    """handler.failed of an attempt that will be retried names the error in one line, without
    exc_info, so a retry storm renders no traceback per attempt."""
    with capture_logs() as logs:
        recorder.failed(event, "app.send", 1, ConnectionError("down"), True)
    record = _one(logs)
    assert set(record) == HANDLER_KEYS | {"error", "will_retry"}
    assert record["error"] == "ConnectionError: down"
    assert record["will_retry"] is True


def test_retry_scheduled_record(recorder: OutcomeRecorder, event: Event) -> None:
    """handler.retry_scheduled is an info record with the handler keys and the delay."""
    with capture_logs() as logs:
        recorder.retry_scheduled(event, "app.send", 1, 0.51234)
    assert _one(logs) == {
        "event": "handler.retry_scheduled",
        "log_level": "info",
        "event_id": event.id,
        "event_name": "order:created",
        "handler": "app.send",
        "attempt": 1,
        "delay": 0.512,
    }


def test_dead_lettered_record(recorder: OutcomeRecorder, event: Event) -> None:
    """handler.dead_lettered is an error record with the error, reason and dead letter id."""
    dead_letter = DeadLetter(
        id="dl-1",
        event=event,
        handler="app.send",
        attempts=3,
        error="ConnectionError: down",
        reason="exhausted",
    )
    with capture_logs() as logs:
        recorder.dead_lettered(dead_letter)
    assert _one(logs) == {
        "event": "handler.dead_lettered",
        "log_level": "error",
        "event_id": event.id,
        "event_name": "order:created",
        "handler": "app.send",
        "attempt": 3,
        "error": "ConnectionError: down",
        "reason": "exhausted",
        "dead_letter_id": "dl-1",
    }


def test_clean_close_is_info(recorder: OutcomeRecorder) -> None:
    """bus.closed with nothing abandoned or still running is an info record."""
    with capture_logs() as logs:
        recorder.closed(0, 0, None)
    assert _one(logs) == {
        "event": "bus.closed",
        "log_level": "info",
        "abandoned": 0,
        "still_running": 0,
    }


@pytest.mark.parametrize(("abandoned", "still_running"), [(2, 0), (0, 1), (3, 4)])
def test_unclean_close_is_a_warning(
    recorder: OutcomeRecorder, abandoned: int, still_running: int
) -> None:
    """bus.closed is a warning when deliveries were abandoned or are still running."""
    with capture_logs() as logs:
        recorder.closed(abandoned, still_running, None)
    assert _one(logs) == {
        "event": "bus.closed",
        "log_level": "warning",
        "abandoned": abandoned,
        "still_running": still_running,
    }


def test_receiver_failed_record(recorder: OutcomeRecorder) -> None:
    """signal.receiver_failed is an error record naming the signal and the error."""
    error = RuntimeError("metrics down")
    with capture_logs() as logs:
        recorder.receiver_failed("handler_succeeded", error)
    assert _one(logs) == {
        "event": "signal.receiver_failed",
        "log_level": "error",
        "signal": "handler_succeeded",
        "error": "RuntimeError: metrics down",
        "exc_info": error,
    }


def test_internal_error_record(recorder: OutcomeRecorder) -> None:
    """eventbus.internal_error is a critical record naming where it happened."""
    error = RuntimeError("bug")
    with capture_logs() as logs:
        recorder.internal_error("worker", error)
    assert _one(logs) == {
        "event": "eventbus.internal_error",
        "log_level": "critical",
        "where": "worker",
        "error": "RuntimeError: bug",
        "exc_info": error,
    }


def _every_event_record(recorder: OutcomeRecorder, event: Event) -> None:
    dead_letter = DeadLetter(
        id="dl", event=event, handler="h", attempts=1, error="E", reason="not_retryable"
    )
    recorder.emitted(event, 1)
    recorder.unhandled(event)
    recorder.succeeded(event, "h", 1, 0.0)
    recorder.failed(event, "h", 1, ValueError(), False)
    recorder.retry_scheduled(event, "h", 1, 1.0)
    recorder.dead_lettered(dead_letter)


def test_payloads_are_not_logged_by_default(recorder: OutcomeRecorder, event: Event) -> None:
    """Without log_payloads, no record carries the payload or metadata."""
    with capture_logs() as logs:
        _every_event_record(recorder, event)
    assert len(logs) == 6
    for record in logs:
        assert "payload" not in record
        assert "metadata" not in record
        assert "hunter2" not in repr(record)


def test_logged_payloads_are_redacted(event: Event) -> None:
    """With log_payloads=True, payload and metadata are logged with secrets redacted."""
    recorder = OutcomeRecorder(log_payloads=True)
    with capture_logs() as logs:
        recorder.emitted(event, 1)
    record = _one(logs)
    assert record["payload"] == {"id": 42, "password": REDACTED}
    assert record["metadata"] == {"request_id": "r-1", "Authorization": REDACTED}


def test_logged_payloads_never_leak_secrets(event: Event) -> None:
    """With log_payloads=True, no record contains a secret value."""
    recorder = OutcomeRecorder(log_payloads=True)
    with capture_logs() as logs:
        _every_event_record(recorder, event)
    assert len(logs) == 6
    for record in logs:
        assert "hunter2" not in repr(record)
        assert "Bearer abc" not in repr(record)


def test_custom_redact_keys(event: Event) -> None:
    """redact_keys replaces the keys redacted in logged payloads."""
    recorder = OutcomeRecorder(log_payloads=True, redact_keys={"id"})
    with capture_logs() as logs:
        recorder.unhandled(event)
    assert _one(logs)["payload"] == {"id": REDACTED, "password": "hunter2"}


def test_debug_enabled_by_default(recorder: OutcomeRecorder) -> None:
    """With structlog's defaults, debug records are enabled."""
    assert recorder.debug_enabled()


def test_debug_disabled_by_a_filtering_logger(recorder: OutcomeRecorder) -> None:
    """A logger filtering at INFO reports debug records as disabled."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    assert not recorder.debug_enabled()


def test_recorder_never_configures_structlog(event: Event) -> None:
    """Building a recorder and logging through it leaves structlog's configuration alone."""
    before = structlog.get_config()
    recorder = OutcomeRecorder(log_payloads=True)
    with capture_logs():
        _every_event_record(recorder, event)
    assert structlog.get_config() == before


# --- secrets never reach a record ------------------------------------------------------------

SECRET = "4111-1111-1111-1111"


def _json_logs() -> io.StringIO:
    """Configure the JSON chain the docs recommend (dict_tracebacks, JSONRenderer); return
    the text stream the records are written to."""
    out = io.StringIO()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.WriteLoggerFactory(file=out),
    )
    return out


def test_failed_handler_locals_do_not_reach_json_logs() -> None:
    """A failing handler's local variables (holding payload values) are not rendered."""
    out = _json_logs()
    bus, _ = inline_bus(retry=RetryPolicy(max_attempts=1))
    with bus:

        @bus.on("order:paid")
        def charge(event: Event) -> None:
            card = event.payload["card"]
            raise RuntimeError(f"declined ({len(card)} digits)")

        bus.emit("order:paid", {"card": SECRET})
    text = out.getvalue()
    assert '"handler.failed"' in text
    assert '"frames"' in text  # the traceback is there, only its locals are not
    assert SECRET not in text


def test_failing_signal_receiver_locals_do_not_reach_json_logs() -> None:
    """A raising signal receiver's locals (the event's payload) are not rendered either."""
    out = _json_logs()
    bus, _ = inline_bus()

    def receiver(sender: object, event: Event, **kwargs: Any) -> None:
        card = event.payload["card"]
        raise ValueError(f"cannot count {len(card)}")

    signals.handler_succeeded.connect(receiver, sender=bus)
    try:
        with bus:
            bus.subscribe("order:paid", lambda event: None, name="noop")
            bus.emit("order:paid", {"card": SECRET})
    finally:
        signals.handler_succeeded.disconnect(receiver, sender=bus)
    text = out.getvalue()
    assert '"signal.receiver_failed"' in text
    assert SECRET not in text


class Card(NamedTuple):
    """A named tuple whose field names say which values are secret."""

    holder: str
    card_number: str


def test_redact_reads_named_tuples_by_field_name() -> None:
    """A NamedTuple is redacted by field name, not logged by position."""
    assert redact(Card("Ada", SECRET)) == {
        "__type__": "Card",
        "holder": "Ada",
        "card_number": REDACTED,
    }


def test_logged_named_tuple_payload_is_redacted() -> None:
    """With log_payloads=True, a NamedTuple payload's secret field is redacted in records."""
    recorder = OutcomeRecorder(log_payloads=True)
    with capture_logs() as logs:
        recorder.unhandled(Event(name="card:added", payload=Card("Ada", SECRET)))
    assert SECRET not in repr(logs)
    assert _one(logs)["payload"]["card_number"] == REDACTED


class BrokenSink:
    """A logger that fails on every write."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> None:
            raise OSError("sink gone")

        return fail


def test_every_outcome_method_survives_a_failing_sink() -> None:
    """No outcome method raises when the configured sink does."""
    structlog.configure(processors=[], logger_factory=lambda *args: BrokenSink())
    recorder = OutcomeRecorder(log_payloads=True)
    event = Event(name="order:created", payload={"id": 1})
    letter = DeadLetter(
        id="d1", event=event, handler="h", attempts=1, error="E", reason="exhausted"
    )
    error = RuntimeError("boom")
    recorder.emitted(event, 1)
    recorder.unhandled(event)
    recorder.succeeded(event, "h", 1, 0.1)
    recorder.failed(event, "h", 1, error, will_retry=True)
    recorder.retry_scheduled(event, "h", 1, 0.5)
    recorder.dead_lettered(letter)
    recorder.replayed(letter)
    recorder.left_in_store(event, "h", "pending")
    recorder.left_in_stream(event, "h", "pending")
    recorder.published(event)
    recorder.stream_dead_lettered("1-0", {"id": "x"}, "bad")
    recorder.stream_taken_over(1)
    recorder.unknown_handler("h", 1)
    recorder.recovered(1, 0)
    recorder.closed(0, 0, None)
    recorder.receiver_failed("handler_failed", error)
    recorder.internal_error("worker", error)
    assert recorder.debug_enabled() is True
