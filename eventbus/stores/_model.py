"""What a store hands back to the bus, and who owns a delivery (shared by every store)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from eventbus._event import DeadLetter, DeliveryState, Event, new_id

__all__ = ["Claim", "StoredDelivery", "new_owner", "owner_is_dead"]


@dataclass(frozen=True, slots=True)
class StoredDelivery:
    """One delivery as a store keeps it: enough to run it again in another process.

    ``due_at`` is wall-clock time (``time.time()``) for a delivery waiting for its retry, since
    a monotonic clock means nothing to the next process.
    """

    event: Event
    handler: str
    state: DeliveryState
    attempts: int
    error: str | None = None
    due_at: float | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """What :meth:`~eventbus.typing.Store.claim` found.

    ``deliveries`` now belong to the claiming bus; ``quarantined`` are rows that could not be
    decoded, already turned into dead letters; ``unknown`` counts deliveries left unclaimed
    because no handler of that name is subscribed, by handler name.
    """

    deliveries: list[StoredDelivery] = field(default_factory=list)
    quarantined: list[DeadLetter] = field(default_factory=list)
    unknown: dict[str, int] = field(default_factory=dict)


_HOST = socket.gethostname()


def new_owner() -> str:
    """A claim owner id, ``host:pid:unique``, so a crashed owner on this host can be spotted."""
    return f"{_HOST}:{os.getpid()}:{new_id()}"


def owner_is_dead(owner: str) -> bool:
    """True if *owner* names a process on this host that no longer exists.

    An owner on another host, or a pid that is alive (perhaps reused), is only given up when
    its heartbeat lease runs out.
    """
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != _HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False
