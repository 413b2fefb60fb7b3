"""What the dashboard reads from a store, in SQL that runs on both stores' tables (SQLite's and
PostgreSQL's differ only in placeholders, the schema prefix and rounding to the minute).

The stores keep one row per delivery (state, attempt count, last error) and one per failed
attempt (its number, error and time; stores of schema version 2 and later); successful attempts
are not kept one by one. The times of a delivery are its event's (``events.created``, the
wall-clock time it was stored) and its failures'. So "in the last hour" means "of an event
stored in the last hour", and the chart counts deliveries by the minute their event was stored
and failed attempts by the minute they failed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from eventbus._outcomes import redact
from eventbus.stores.sqlite import SQLiteStore

__all__ = [
    "STATES",
    "DeadLetterFilter",
    "EventFilter",
    "Queries",
    "shown_json",
]

#: Delivery states as the store keeps them, in the order the overview shows them.
STATES = ("pending", "running", "retrying", "succeeded", "dead")
#: The chart's span and bucket, in seconds.
HOUR = 3600
MINUTE = 60


class _Dialect(Protocol):
    """How one store runs a statement written with ``?`` placeholders and ``{t}`` before
    each table name."""

    minute: str  # SQL: minutes since the first ? (a start time) of e.created, rounded down

    def rows(self, statement: str, params: Sequence[Any]) -> list[Any]: ...


class _SQLite:
    minute = "CAST((e.created - ?) / 60 AS INTEGER)"

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    def rows(self, statement: str, params: Sequence[Any]) -> list[Any]:
        with self._store._lock:
            return self._store._read().execute(statement.format(t=""), tuple(params)).fetchall()


class _Postgres:
    minute = "CAST(floor((e.created - ?) / 60) AS integer)"

    def __init__(self, store: Any) -> None:
        self._store = store

    def rows(self, statement: str, params: Sequence[Any]) -> list[Any]:
        # PostgresStore._read composes "{s}" as its quoted schema; "?" becomes psycopg's "%s".
        text = statement.format(t="{s}.").replace("?", "%s")
        return list(self._store._read(text, tuple(params)))


def _dialect(store: object) -> _Dialect:
    if isinstance(store, SQLiteStore):
        return _SQLite(store)
    if type(store).__name__ == "PostgresStore" and hasattr(store, "_read"):
        return _Postgres(store)  # not imported here: that would import psycopg
    raise TypeError(
        f"the dashboard reads an SQLiteStore or a PostgresStore, got {type(store).__name__}"
    )


@dataclass(frozen=True, slots=True)
class HandlerCounts:
    """One handler's deliveries by state: of events stored in the last hour, and in total."""

    handler: str
    hour: dict[str, int]
    total: dict[str, int]


@dataclass(frozen=True, slots=True)
class Minute:
    """One bar of the chart: deliveries of events stored in that minute, and the attempts
    that failed in it (without an attempt history: how many of those deliveries are now
    retrying or dead)."""

    start: float
    deliveries: int
    failures: int


@dataclass(frozen=True, slots=True)
class EventFilter:
    """The event search; empty fields match everything. Times are Unix seconds."""

    id_prefix: str = ""
    name: str = ""
    handler: str = ""
    state: str = ""
    since: float | None = None
    until: float | None = None


@dataclass(frozen=True, slots=True)
class EventRow:
    id: str
    name: str
    stored_at: float
    states: dict[str, int]


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    handler: str
    state: str
    attempts: int
    error: str | None


@dataclass(frozen=True, slots=True)
class FailureRow:
    """One failed attempt (or a dead letter made without one: attempt 0)."""

    handler: str
    attempt: int
    error: str
    failed_at: float


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    id: str
    event_id: str
    event_name: str | None
    handler: str
    attempts: int
    reason: str
    error: str
    failed_at: str
    traceback: str | None = None


@dataclass(frozen=True, slots=True)
class EventDetail:
    """One event as stored, its payload and metadata redacted and shown as JSON text."""

    id: str
    name: str
    payload_type: str | None
    payload: str
    metadata: str
    occurred_at: str
    stored_at: float
    deliveries: list[DeliveryRow] = field(default_factory=list)
    dead_letters: list[DeadLetterRow] = field(default_factory=list)
    #: Every failed attempt, by handler then time; empty without a history (``history``).
    failures: list[FailureRow] = field(default_factory=list)
    #: Whether the store keeps failed attempts (a store of schema version 1 does not).
    history: bool = True


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """The dead letter list's filter; empty fields match everything."""

    handler: str = ""
    name: str = ""
    event_id_prefix: str = ""


def _like_prefix(text: str) -> str:
    """A LIKE pattern matching what starts with *text* (its wildcards taken literally)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def shown_json(text: object) -> str:
    """Stored JSON text, redacted with the logs' keys and indented; text that is not JSON is
    not shown (it could hold anything)."""
    if not isinstance(text, str):
        return "(not readable)"
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return "(stored text is not JSON; not shown)"
    return json.dumps(redact(value), indent=2, ensure_ascii=False, default=str)


_LETTER_COLUMNS = "x.id, x.event_id, e.name, x.handler, x.attempts, x.reason, x.error, x.failed_at"


class Queries:
    """The dashboard's reads of one store (SQLiteStore or PostgresStore)."""

    def __init__(self, store: object) -> None:
        self._db = _dialect(store)
        # Both stores know on opening whether their schema has the attempts table.
        self._history = bool(getattr(store, "_history", False))

    def handler_counts(self, now: float | None = None) -> list[HandlerCounts]:
        since = (time.time() if now is None else now) - HOUR
        rows = self._db.rows(
            "SELECT d.handler, d.state, count(*), "
            "sum(CASE WHEN e.created >= ? THEN 1 ELSE 0 END) "
            "FROM {t}deliveries d JOIN {t}events e ON e.id = d.event_id "
            "GROUP BY d.handler, d.state ORDER BY d.handler",
            (since,),
        )
        found: dict[str, HandlerCounts] = {}
        for handler, state, total, hour in rows:
            counts = found.setdefault(handler, HandlerCounts(handler, {}, {}))
            counts.total[state] = counts.total.get(state, 0) + int(total)
            counts.hour[state] = counts.hour.get(state, 0) + int(hour or 0)
        return list(found.values())

    @property
    def history(self) -> bool:
        """Whether the store keeps failed attempts (schema version 2 and later)."""
        return self._history

    def per_minute(self, now: float | None = None) -> list[Minute]:
        """The last hour, minute by minute, oldest first (60 bars, zeros included):
        deliveries of the events stored in each minute, and the attempts that failed in it
        (without an attempt history: how many of those deliveries are now retrying or
        dead)."""
        end = (time.time() if now is None else now) // MINUTE * MINUTE + MINUTE
        start = end - HOUR
        rows = self._db.rows(
            f"SELECT {self._db.minute} AS m, count(*), "
            "sum(CASE WHEN d.state IN ('retrying', 'dead') THEN 1 ELSE 0 END) "
            "FROM {t}deliveries d JOIN {t}events e ON e.id = d.event_id "
            "WHERE e.created >= ? AND e.created < ? GROUP BY m",
            (start, start, end),
        )
        deliveries = {int(m): int(n) for m, n, _ in rows}
        failures = {int(m): int(failed or 0) for m, _, failed in rows}
        if self._history:
            failures = {
                int(m): int(n)
                for m, n in self._db.rows(
                    f"SELECT {self._db.minute.replace('e.created', 'a.failed_at')} AS m, "
                    "count(*) FROM {t}attempts a "
                    "WHERE a.failed_at >= ? AND a.failed_at < ? GROUP BY m",
                    (start, start, end),
                )
            }
        return [
            Minute(start + i * MINUTE, deliveries.get(i, 0), failures.get(i, 0))
            for i in range(HOUR // MINUTE)
        ]

    def search(self, where: EventFilter, *, limit: int, offset: int) -> list[EventRow]:
        """Events matching *where*, newest first; up to *limit* + 1 (to tell if there are
        more). A handler and a state together match events with a delivery of that handler
        in that state."""
        clauses: list[str] = []
        params: list[Any] = []
        if where.id_prefix:
            clauses.append("e.id LIKE ? ESCAPE '\\'")
            params.append(_like_prefix(where.id_prefix))
        if where.name:
            clauses.append("e.name = ?")
            params.append(where.name)
        if where.handler or where.state:
            inner = ["d.event_id = e.id"]
            if where.handler:
                inner.append("d.handler = ?")
                params.append(where.handler)
            if where.state:
                inner.append("d.state = ?")
                params.append(where.state)
            clauses.append(f"EXISTS (SELECT 1 FROM {{t}}deliveries d WHERE {' AND '.join(inner)})")
        if where.since is not None:
            clauses.append("e.created >= ?")
            params.append(where.since)
        if where.until is not None:
            clauses.append("e.created < ?")
            params.append(where.until)
        condition = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        events = self._db.rows(
            f"SELECT e.id, e.name, e.created FROM {{t}}events e {condition}"
            "ORDER BY e.created DESC, e.id LIMIT ? OFFSET ?",
            (*params, limit + 1, offset),
        )
        rows = {i: EventRow(i, n, float(c), {}) for i, n, c in events}
        if rows:
            marks = ", ".join("?" * len(rows))
            for event_id, state, count in self._db.rows(
                "SELECT event_id, state, count(*) FROM {t}deliveries "
                f"WHERE event_id IN ({marks}) GROUP BY event_id, state",
                list(rows),
            ):
                rows[event_id].states[state] = int(count)
        return list(rows.values())

    def event(self, event_id: str) -> EventDetail | None:
        found = self._db.rows(
            "SELECT e.id, e.name, e.payload_type, e.payload, e.metadata, e.occurred_at, "
            "e.created FROM {t}events e WHERE e.id = ?",
            (event_id,),
        )
        if not found:
            return None
        [(found_id, name, payload_type, payload, metadata, occurred_at, created)] = found
        deliveries = [
            DeliveryRow(h, s, a, err)
            for h, s, a, err in self._db.rows(
                "SELECT handler, state, attempts, error FROM {t}deliveries "
                "WHERE event_id = ? ORDER BY handler",
                (event_id,),
            )
        ]
        letters = [
            DeadLetterRow(*row)
            for row in self._db.rows(
                f"SELECT {_LETTER_COLUMNS}, x.traceback FROM {{t}}dead_letters x "
                "LEFT JOIN {t}events e ON e.id = x.event_id "
                "WHERE x.event_id = ? ORDER BY x.failed_at, x.id",
                (event_id,),
            )
        ]
        return EventDetail(
            id=found_id,
            name=name,
            payload_type=payload_type,
            payload=shown_json(payload),
            metadata=shown_json(metadata),
            occurred_at=str(occurred_at),
            stored_at=float(created),
            deliveries=deliveries,
            dead_letters=letters,
            failures=self._failures(event_id),
            history=self._history,
        )

    def _failures(self, event_id: str) -> list[FailureRow]:
        if not self._history:
            return []
        return [
            FailureRow(handler, int(attempt), error, float(failed_at))
            for handler, attempt, error, failed_at in self._db.rows(
                "SELECT handler, attempt, error, failed_at FROM {t}attempts "
                "WHERE event_id = ? ORDER BY handler, failed_at, attempt",
                (event_id,),
            )
        ]

    def _letter_condition(self, where: DeadLetterFilter) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if where.handler:
            clauses.append("x.handler = ?")
            params.append(where.handler)
        if where.name:
            clauses.append("e.name = ?")
            params.append(where.name)
        if where.event_id_prefix:
            clauses.append("x.event_id LIKE ? ESCAPE '\\'")
            params.append(_like_prefix(where.event_id_prefix))
        return (f"WHERE {' AND '.join(clauses)} " if clauses else ""), params

    def dead_letters(
        self, where: DeadLetterFilter, *, limit: int, offset: int
    ) -> list[DeadLetterRow]:
        """Dead letters matching *where*, newest first; up to *limit* + 1."""
        condition, params = self._letter_condition(where)
        return [
            DeadLetterRow(*row)
            for row in self._db.rows(
                f"SELECT {_LETTER_COLUMNS} FROM {{t}}dead_letters x "
                f"LEFT JOIN {{t}}events e ON e.id = x.event_id {condition}"
                "ORDER BY x.failed_at DESC, x.id LIMIT ? OFFSET ?",
                (*params, limit + 1, offset),
            )
        ]

    def dead_letter_ids(self, where: DeadLetterFilter) -> list[str]:
        """The ids of every dead letter matching *where*."""
        condition, params = self._letter_condition(where)
        return [
            letter_id
            for (letter_id,) in self._db.rows(
                "SELECT x.id FROM {t}dead_letters x "
                f"LEFT JOIN {{t}}events e ON e.id = x.event_id {condition}ORDER BY x.id",
                params,
            )
        ]

    def dead_letter(self, letter_id: str) -> DeadLetterRow | None:
        rows = self._db.rows(
            f"SELECT {_LETTER_COLUMNS}, x.traceback FROM {{t}}dead_letters x "
            "LEFT JOIN {t}events e ON e.id = x.event_id WHERE x.id = ?",
            (letter_id,),
        )
        return DeadLetterRow(*rows[0]) if rows else None
