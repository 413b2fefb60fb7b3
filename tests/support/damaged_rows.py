"""Stored events with one field damaged, as a hand edit or a faulty writer would leave them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

__all__ = ["DAMAGE", "damage"]

#: (column, stored text, words the dead letter's error must contain): one damaged field each.
DAMAGE = [
    pytest.param("occurred_at", "yesterday", "occurred_at is not an ISO 8601", id="bad-time"),
    pytest.param("occurred_at", "2024-05-01T12:00:00", "no time zone", id="naive-time"),
    pytest.param("metadata", "[]", "metadata must be a JSON object", id="metadata-list"),
    pytest.param("metadata", '{"a": 1}', "metadata 'a' is not a string", id="metadata-int"),
    pytest.param("name", "no spaces allowed", "event name", id="bad-name"),
    pytest.param("payload", "{not json", "not valid JSON", id="bad-payload"),
]


def damage(path: Path, event_id: str, column: str, text: str) -> None:
    """Overwrite one column of one stored event."""
    with sqlite3.connect(path) as db:
        db.execute(f"UPDATE events SET {column} = ? WHERE id = ?", (text, event_id))
    db.close()
