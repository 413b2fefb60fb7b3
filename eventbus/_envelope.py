"""An event as text fields, the same for every store and transport (JSON, never pickle)."""

from __future__ import annotations

import json
from datetime import datetime
from types import MappingProxyType
from typing import NamedTuple

from eventbus._event import Event
from eventbus._matching import validate_name
from eventbus.codec import JsonCodec
from eventbus.exceptions import CodecError

__all__ = ["Envelope", "from_envelope", "to_envelope"]


class Envelope(NamedTuple):
    """What is stored or sent of an event; ``payload_type`` is ``None`` for plain JSON."""

    id: str
    name: str
    payload_type: str | None
    payload: str
    metadata: str
    occurred_at: str


def to_envelope(codec: JsonCodec, event: Event) -> Envelope:
    """*event* as text. Raises ``TypeError`` for a payload *codec* cannot encode and
    ``PayloadTooLargeError`` (a ``ValueError``) for one above the codec's ``max_size``."""
    payload_type, payload = codec.encode(event.payload)
    return Envelope(
        event.id,
        event.name,
        payload_type,
        payload,
        json.dumps(dict(event.metadata)),
        event.occurred_at.isoformat(),
    )


def from_envelope(codec: JsonCodec, envelope: Envelope) -> Event:
    """The event again. Raises ``CodecError`` (a ``ValueError``) for anything it cannot decode:
    a malformed name, metadata that is not an object of strings, a time that is not an
    ISO 8601 timestamp with a time zone, or a payload the codec refuses. Every field is
    checked, because the text may come from another process, an older version or a hand edit."""
    for field in ("id", "name", "payload", "metadata", "occurred_at"):
        if not isinstance(getattr(envelope, field), str):
            raise CodecError(f"event {field} is not text")
    if not envelope.id:
        raise CodecError("event id is empty")
    try:
        name = validate_name(envelope.name)
    except ValueError as exc:
        raise CodecError(f"event name: {exc}") from None
    return Event(
        name=name,
        payload=codec.decode(envelope.payload_type, envelope.payload),
        metadata=_metadata(envelope.metadata),
        id=envelope.id,
        occurred_at=_occurred_at(envelope.occurred_at),
    )


def _metadata(text: str) -> MappingProxyType[str, str]:
    try:
        value = json.loads(text)
    except ValueError:
        raise CodecError(f"event metadata is not JSON: {text[:80]!r}") from None
    except RecursionError:
        raise CodecError("event metadata is nested too deeply") from None
    if not isinstance(value, dict):
        raise CodecError(f"event metadata must be a JSON object, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise CodecError(f"event metadata {key!r} is not a string")
    return MappingProxyType(value)


def _occurred_at(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise CodecError(f"event occurred_at is not an ISO 8601 timestamp: {text[:40]!r}") from None
    if when.tzinfo is None:
        raise CodecError(f"event occurred_at has no time zone: {text[:40]!r}")
    return when
