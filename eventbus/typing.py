"""Protocols and aliases shared by eventbus's parts; of ours it imports only the data records."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Protocol, TypeAlias, TypeVar

# The one name of ours needed at run time: it is defined with the records it describes, so
# that they import nothing from here and the arrows point one way (records <- typing).
from eventbus._event import DeliveryState

if TYPE_CHECKING:
    from eventbus._event import DeadLetter, Delivery, Event
    from eventbus.stores._model import Claim

__all__ = [
    "Cancellable",
    "Clock",
    "DeliveryState",
    "Executor",
    "Handler",
    "HandlerT",
    "RateLimiter",
    "Reporter",
    "Store",
    "Transport",
]

#: A handler takes the :class:`~eventbus.Event` and returns nothing useful.
Handler: TypeAlias = "Callable[[Event], object]"
#: The type a decorator hands back unchanged.
HandlerT = TypeVar("HandlerT", bound="Callable[[Event], object]")


class Executor(Protocol):
    """Runs jobs. ``submit`` must never run a job that raises into the caller's frame."""

    def submit(self, job: Callable[[], None]) -> None:
        """Queue *job* (or run it now, for an inline executor). Thread-safe; never blocks long."""

    def shutdown(self, timeout: float | None) -> list[Callable[[], None]]:
        """Stop taking jobs; return those never started; wait up to *timeout* for running ones."""


class Cancellable(Protocol):
    """A scheduled callback that may still be called off."""

    def cancel(self) -> None:
        """Call off the callback; a no-op if it already ran."""


class Clock(Protocol):
    """The time source and timer behind retry backoff (swap in a fake one in tests).

    A clock may also have ``time() -> float``, wall-clock seconds since the epoch, which the
    bus reads for what another process must understand (a stored retry's due time); without
    it the bus reads :func:`time.time`. Both clocks eventbus ships have it.
    """

    def monotonic(self) -> float:
        """Seconds on a monotonic scale."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable:
        """Call *callback* once, *delay* seconds from now, on a thread of the clock's choosing."""

    def close(self) -> None:
        """Stop the clock's timer: once this returns, no callback runs or ever will (callbacks
        scheduled afterwards are accepted and never called; their owner collects them)."""


class RateLimiter(Protocol):
    """A token bucket for one handler's ``rate_limit``: local to a bus, or shared by every
    consumer of a transport's group (``Transport.rate_limiter``). Thread-safe."""

    def acquire(self) -> float:
        """Take one token and return ``0.0``; or, if there is none, take nothing and return
        the seconds until the next one. May raise (a shared limiter's server is down): the
        bus then reports it and asks again a second later."""


class Reporter(Protocol):
    """How a store or transport tells its bus what happened in its background work. The bus
    hands one to :meth:`Store.open` and :meth:`Transport.start`; every method is thread-safe
    and never raises."""

    def internal_error(self, where: str, error: BaseException) -> None:
        """Background work failed (*where*: ``"store"`` or ``"transport"``); it goes on."""

    def stream_dead_lettered(self, entry_id: str, fields: Mapping[str, str], reason: str) -> None:
        """An event was moved to the transport's dead letters (fields made safe to log)."""

    def stream_taken_over(self, count: int) -> None:
        """*count* events of stopped consumers were taken over."""

    def work_available(self) -> None:
        """The store heard of work to claim that another connection committed (an
        ``emit(..., within=conn)``, a replay, a release): the bus looks now instead of at its
        next poll. Cheap; the store may call it from any thread."""


class Store(Protocol):
    """Where a bus keeps every delivery's state so that it survives the process.

    The bus keeps in-flight deliveries in memory either way; a store is told of each state
    change and answers for what is not in memory (another process's work, dead letters, old
    events). Implementations are thread-safe. Writes return once they are committed, except
    :meth:`succeeded`, which may be committed later but in order (see :meth:`flush`). See
    :class:`eventbus.stores.SQLiteStore` and :class:`eventbus.stores.MemoryStore`.
    """

    #: Seconds between a recovered bus's looks for deliveries to take over.
    poll_interval: float

    def open(self, reporter: Reporter | None = None) -> str:
        """Start one bus's session; return its owner id. ``RuntimeError`` if already open.
        Background errors go to *reporter* when given (else to ``on_error``)."""

    def close(self) -> None:
        """End the session: this owner's unfinished deliveries become claimable by others."""

    def add(
        self,
        event: Event,
        handlers: Collection[str],
        key: str | None = None,
        *,
        due_at: float | None = None,
    ) -> Event | None:
        """Commit the event with a pending delivery per handler (with *due_at*, a wall-clock
        time: each waiting to start then, kept as ``"retrying"`` with no attempt, which
        :meth:`status` shows as ``"scheduled"``); or return the event already stored under
        *key* and write nothing. ``TypeError`` for an unstorable payload."""

    def started(self, event_id: str, handler: str, attempts: int) -> None:
        """Commit that attempt *attempts* starts now (before the handler runs)."""

    def succeeded(self, event_id: str, handler: str) -> None:
        """Record a success: committed before any later write of the same thread is (a
        worker's next attempt), or by :meth:`flush`."""

    def retrying(
        self, event_id: str, handler: str, attempts: int, error: str, due_at: float
    ) -> None:
        """Commit a failure to be retried at wall-clock time *due_at*."""

    def dead(self, dead_letter: DeadLetter) -> None:
        """Commit a dead letter."""

    def release(self, deliveries: Collection[tuple[str, str]]) -> None:
        """Leave (event id, handler) deliveries unfinished and unowned, for the next claim."""

    def needs_claim(self) -> bool:
        """Cheap: whether :meth:`claim` might find anything new (asked before each poll)."""

    def flush(self) -> None:
        """Commit deferred writes (successes) now; return once they are committed."""

    def claim(self, handlers: Collection[str]) -> Claim:
        """Take over unfinished deliveries for *handlers* that no live session owns."""

    def status(self, event_id: str) -> Mapping[str, Delivery] | None:
        """Each delivery of the event by handler, or ``None`` for an unknown event."""

    def dead_letters(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""

    def dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """One dead letter, or ``None``."""

    def replay_dead_letter(self, dead_letter_id: str, *, claim: bool = False) -> DeadLetter | None:
        """Remove the dead letter and make its delivery pending (owned by the open bus with
        *claim*, else by whoever claims next). ``None`` if there is no such letter."""

    def purge_dead_letters(self, ids: Collection[str] | None = None) -> int:
        """Delete dead letters (all when *ids* is ``None``); return how many."""


class Transport(Protocol):
    """Carries events between processes: ``emit()`` publishes, and each bus consumes its share
    (see :class:`eventbus.transports.RedisStreamsTransport`). Thread-safe."""

    def publish(self, event: Event, *, not_before: float | None = None) -> str:
        """Send *event*; return its id in the transport. ``TypeError`` for a payload that
        cannot be encoded, ``TransportError`` when the transport cannot be reached. With
        *not_before* (wall-clock seconds since the epoch; the bus passes it only for
        ``emit(..., delay=...)``) the consumer receives it as ``deliver(event, token,
        not_before)`` and holds the event until then."""

    def start(self, deliver: Callable[[Event, str], None], reporter: Reporter | None = None) -> int:
        """Start consuming: call *deliver(event, token)* for each event received (blocking in
        it is backpressure); return how many stopped consumers' events were taken over.
        Background errors, dead-lettered and taken-over events go to *reporter* when given."""

    def settled(self, token: str) -> None:
        """Every local delivery of the event received with *token* has settled."""

    def close(self) -> None:
        """Stop consuming; what was received but not settled goes to another consumer."""


def __getattr__(name: str) -> object:
    # Job (a job handed to an executor: Callable[[], None]) is no longer part of the public
    # API; the old name still resolves so that code written against it keeps working.
    if name == "Job":
        return Callable[[], None]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
