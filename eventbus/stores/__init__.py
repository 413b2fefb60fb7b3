"""Stores: where a bus keeps its deliveries' state. ``SQLiteStore`` survives crashes and
restarts; ``MemoryStore`` keeps the same contract in memory (for tests, or to share state
between buses of one process)."""

from eventbus.stores._model import Claim, StoredDelivery
from eventbus.stores.memory import MemoryStore
from eventbus.stores.sqlite import SQLiteStore

__all__ = ["Claim", "MemoryStore", "SQLiteStore", "StoredDelivery"]
