"""Stores: where a bus keeps its deliveries' state. ``SQLiteStore`` survives crashes and
restarts; ``PostgresStore`` does too, for several processes sharing one PostgreSQL database
(the ``postgres`` extra); ``MemoryStore`` keeps the same contract in memory (for tests, or to
share state between buses of one process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from eventbus.stores._model import Claim, StoredDelivery
from eventbus.stores.memory import MemoryStore
from eventbus.stores.sqlite import SQLiteStore

if TYPE_CHECKING:
    from eventbus.stores.postgres import PostgresStore

__all__ = ["Claim", "MemoryStore", "PostgresStore", "SQLiteStore", "StoredDelivery"]


def __getattr__(name: str) -> object:
    # Imported on first use: psycopg is an optional extra (pip install 'eventbus[postgres]').
    if name == "PostgresStore":
        try:
            from eventbus.stores.postgres import PostgresStore  # noqa: PLC0415
        except ModuleNotFoundError as exc:
            if exc.name not in ("psycopg", "psycopg_pool"):
                raise
            raise ModuleNotFoundError(
                "PostgresStore needs psycopg 3 and psycopg_pool: pip install 'eventbus[postgres]'",
                name=exc.name,
            ) from None
        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
