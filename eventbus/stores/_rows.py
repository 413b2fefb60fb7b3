"""Reading rows back, the same for every store that keeps events as text: what a status
shows, whether a stored delivery's columns can be used, and what can be shown of an event
that cannot be decoded any more (never raising: a damaged row must not block anything)."""

from __future__ import annotations

import json
import sys
import traceback
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TypeGuard, cast

from eventbus._envelope import Envelope, from_envelope
from eventbus._event import DeadLetter, DeliveryState, Event, new_id
from eventbus.codec import JsonCodec
from eventbus.stores._model import StoredDelivery

__all__ = [
    "EPOCH",
    "RowReader",
    "delivery_problem",
    "is_count",
    "print_error",
    "readable_metadata",
    "readable_time",
    "shown",
    "undecoded_event",
]

#: What a dead letter shows for a stored time that cannot be read.
EPOCH = datetime.fromtimestamp(0, UTC)


def print_error(error: BaseException) -> None:
    traceback.print_exception(error, file=sys.stderr)


def undecoded_event(codec: JsonCodec, row: Any) -> Event:
    """The event of a row that cannot be decoded, for its dead letter: each field that can be
    read as it is stored, the others replaced (payload ``None``, metadata empty, time the
    Unix epoch; a time without a zone is taken as UTC). Never raises."""
    event_id, name, payload_type, payload, metadata, occurred_at = row
    try:
        value = codec.decode(payload_type, payload)
    except Exception:  # noqa: BLE001 - an unreadable payload is shown as None
        value = None
    return Event(
        name=name if isinstance(name, str) else repr(name),
        payload=value,
        metadata=readable_metadata(metadata),
        id=event_id if isinstance(event_id, str) else repr(event_id),
        occurred_at=readable_time(occurred_at),
    )


def readable_metadata(text: object) -> MappingProxyType[str, str]:
    """Stored metadata if it is a JSON object of strings, else empty."""
    try:
        value = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict) and all(isinstance(item, str) for item in value.values()):
        return MappingProxyType(value)
    return MappingProxyType({})


def readable_time(text: object) -> datetime:
    """A stored timestamp (UTC if it has no zone), or the Unix epoch if it is not one."""
    try:
        when = datetime.fromisoformat(text) if isinstance(text, str) else EPOCH
    except ValueError:
        return EPOCH
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def is_count(value: object) -> TypeGuard[int]:
    """Whether a stored attempt count is one: an int (not a bool), zero or more."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def shown(state: DeliveryState, attempts: int) -> DeliveryState:
    """The state status() shows: waiting with no attempt yet is a delayed start."""
    return "scheduled" if state == "retrying" and attempts == 0 else state


def delivery_problem(attempts: object, error: object, due_at: object) -> str | None:
    """What is wrong with a delivery row's own columns, or ``None`` if they can be used."""
    if not is_count(attempts):
        return f"attempts is not a whole number: {attempts!r:.40}"
    if due_at is not None and (isinstance(due_at, bool) or not isinstance(due_at, int | float)):
        return f"due_at is not a time: {due_at!r:.40}"
    if error is not None and not isinstance(error, str):
        return f"error is not text: {error!r:.40}"
    return None


class RowReader:
    """What a store that keeps events as text (SQLite, PostgreSQL) does with the rows it reads
    back. A store sets ``codec``; an event row is (id, name, payload_type, payload, metadata,
    occurred_at), a dead letter row (id, handler, attempts, error, reason, traceback,
    failed_at, *event row)."""

    codec: JsonCodec

    def _event_from_row(self, row: Any) -> Event:
        return from_envelope(self.codec, Envelope(*row))

    def _event_or_undecoded(self, row: Any) -> Event:
        """The event of *row*, or what can be read of it (see :func:`undecoded_event`)."""
        try:
            return self._event_from_row(row)
        except Exception:  # noqa: BLE001 - whatever the codec raises, show what can be read
            return undecoded_event(self.codec, row)

    def _dead_letter_from_row(self, row: Any) -> DeadLetter:
        letter_id, handler, attempts, error, reason, trace, failed_at, *event_row = row
        return DeadLetter(
            id=letter_id,
            event=self._event_or_undecoded(event_row),
            handler=handler,
            attempts=attempts,
            error=error,
            reason=reason,
            traceback=trace,
            failed_at=readable_time(failed_at),
        )

    def _quarantine_letter(
        self, event_row: Any, handler: str, attempts: object, why: str
    ) -> DeadLetter:
        """The dead letter of a claimed delivery that cannot be run, saying *why* (the store
        writes it; the stored event is left as it is, for a person to repair)."""
        return DeadLetter(
            id=new_id(),
            event=self._event_or_undecoded(event_row),
            handler=handler,
            attempts=attempts if is_count(attempts) else 0,
            error=why,
            reason="not_retryable",
        )

    def _claimed(
        self,
        event_row: Any,
        handler: str,
        *,
        state: DeliveryState,
        attempts: object,
        error: object,
        due_at: object,
    ) -> StoredDelivery | str:
        """A claimed row as the delivery to run, or why it cannot be run (any decoding error
        of the event, or a damaged column of the delivery): the store then quarantines it."""
        try:
            event = self._event_from_row(event_row)
        except Exception as exc:  # noqa: BLE001 - any decoding error quarantines
            return f"cannot decode the stored event: {type(exc).__name__}: {exc}"
        problem = delivery_problem(attempts, error, due_at)
        if problem is not None:
            return f"cannot decode the stored delivery: {problem}"
        # Checked by delivery_problem(): a count, text or None, a number or None.
        return StoredDelivery(
            event,
            handler,
            state,
            cast(int, attempts),
            cast("str | None", error),
            cast("float | None", due_at),
        )
