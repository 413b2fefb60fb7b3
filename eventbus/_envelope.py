"""An event as text fields, the same for every store and transport (JSON, never pickle)."""

from __future__ import annotations

import json
from datetime import datetime
from types import MappingProxyType
from typing import NamedTuple

from eventbus._event import Event
from eventbus.codec import JsonCodec

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
    """*event* as text. Raises ``TypeError`` for a payload *codec* cannot encode."""
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
    """The event again. Raises ``CodecError`` (or ``ValueError``) for text it cannot decode."""
    return Event(
        name=envelope.name,
        payload=codec.decode(envelope.payload_type, envelope.payload),
        metadata=MappingProxyType(json.loads(envelope.metadata)),
        id=envelope.id,
        occurred_at=datetime.fromisoformat(envelope.occurred_at),
    )
