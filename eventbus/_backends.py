"""Where a bus keeps what outlives a delivery, chosen once when the bus is built.

* :class:`LocalBackend`: this process's memory only (the default).
* :class:`DurableBackend`: a :class:`~eventbus.typing.Store` is told of every step, answers
  for what is not in memory, and keeps unfinished work for the next process.
* :class:`StreamedBackend`: a :class:`~eventbus.typing.Transport` carries events between
  processes; an event is acknowledged once its local deliveries settled, and unfinished ones
  are left in the stream for another consumer.

The pipeline talks to each through :class:`Backend` and never asks which one it has. Stores
and transports report their background errors through a :class:`Reporter` they are given,
rather than through attributes the bus overwrites.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from eventbus._event import DeadLetter, Delivery, Event
from eventbus._policies import order_keys

if TYPE_CHECKING:
    from eventbus._observe import Observer
    from eventbus._records import Dispatch, Records
    from eventbus.typing import Store, Transport

__all__ = ["Backend", "DurableBackend", "LocalBackend", "StreamedBackend"]


class Backend(Protocol):
    """What the pipeline needs of a backend. Implementations are thread-safe and never raise
    from the per-delivery calls (a failed write is reported, and the delivery goes on)."""

    #: Whether ``started``/``succeeded``/``retrying`` are to be called for every attempt.
    records_attempts: bool
    #: Whether idempotency keys are answered from memory (else ``add`` answers for them).
    keeps_keys_in_memory: bool
    #: Whether deliveries a stopped bus will not run stay for another process (else they
    #: become ``"abandoned"`` dead letters).
    leaves_unfinished: bool

    def add(self, dispatch: Dispatch, key: str | None, due_at: float | None = None) -> Event | None:
        """Keep a newly admitted event beyond memory (its deliveries to start at wall-clock
        *due_at*, if given); or return the event already kept under *key*, keeping nothing.
        Raises (``TypeError``, ``PayloadTooLargeError``) having kept nothing."""

    def started(self, event_id: str, handler: str, attempts: int) -> None:
        """Attempt *attempts* starts now. May raise: the attempt then fails."""

    def succeeded(self, event_id: str, handler: str) -> None: ...

    def retrying(
        self, event_id: str, handler: str, attempts: int, error: str | None, due_at: float
    ) -> None: ...

    def dead(self, dead_letter: DeadLetter, dispatch: Dispatch, index: int) -> None: ...

    def event_settled(self, dispatch: Dispatch) -> None:
        """Every delivery of an event received from a transport has settled."""

    def leave(self, deliveries: Sequence[tuple[Dispatch, int]]) -> None:
        """Leave unfinished deliveries for another process (only if ``leaves_unfinished``)."""

    def status(self, event_id: str) -> Mapping[str, Delivery] | None: ...

    def dead_letters(self) -> list[DeadLetter]: ...

    def purge_dead_letters(self) -> int: ...

    def close(self) -> None: ...


class LocalBackend:
    """Dead letters and idempotency keys in this process's memory."""

    records_attempts = False
    keeps_keys_in_memory = True
    leaves_unfinished = False

    def __init__(self, records: Records) -> None:
        self._records = records

    def add(self, dispatch: Dispatch, key: str | None, due_at: float | None = None) -> Event | None:
        return None  # the records (in memory) are all there is

    def started(self, event_id: str, handler: str, attempts: int) -> None:
        pass

    def succeeded(self, event_id: str, handler: str) -> None:
        pass

    def retrying(
        self, event_id: str, handler: str, attempts: int, error: str | None, due_at: float
    ) -> None:
        pass

    def dead(self, dead_letter: DeadLetter, dispatch: Dispatch, index: int) -> None:
        self._records.add_dead_letter(dead_letter)

    def event_settled(self, dispatch: Dispatch) -> None:
        pass

    def leave(self, deliveries: Sequence[tuple[Dispatch, int]]) -> None:
        raise AssertionError("a local backend leaves nothing unfinished")

    def status(self, event_id: str) -> Mapping[str, Delivery] | None:
        return None

    def dead_letters(self) -> list[DeadLetter]:
        return self._records.dead_letters()

    def purge_dead_letters(self) -> int:
        return self._records.purge_dead_letters()

    def close(self) -> None:
        pass


class DurableBackend:
    """Every step committed to a store; the store answers for keys, status and dead letters."""

    records_attempts = True
    keeps_keys_in_memory = False
    leaves_unfinished = True

    def __init__(self, store: Store, observer: Observer) -> None:
        self.store = store
        self._observer = observer
        # Whether the store keeps a delayed event's start time itself (stores written before
        # emit(delay=) do not take due_at).
        try:
            parameters = set(inspect.signature(store.add).parameters)
        except (TypeError, ValueError):  # no signature to read: assume delays, nothing more
            parameters = {"due_at"}
        self._delays = "due_at" in parameters
        # Whether the store keeps ordered_by keys, to run one key's deliveries one process at
        # a time when processes share it (PostgresStore).
        self._order_keys = "order_keys" in parameters

    def _persist(self, write: Callable[..., object], *args: Any) -> None:
        # A write after the fact (a success, a failure): if it fails, the delivery's
        # in-memory outcome stands and the store still holds the earlier state, so a later
        # recovery runs it again (at least once). Said loudly; never lost on a worker.
        try:
            write(*args)
        except Exception as exc:  # noqa: BLE001 - reported, and the delivery goes on
            self._observer.log.internal_error("store", exc)

    def add(self, dispatch: Dispatch, key: str | None, due_at: float | None = None) -> Event | None:
        names = [sub.name for sub in dispatch.subs]
        if self._order_keys:
            keys = order_keys(((sub.name, sub.policy) for sub in dispatch.subs), dispatch.event)
            if keys:
                add: Callable[..., Event | None] = self.store.add
                return add(dispatch.event, names, key, due_at=due_at, order_keys=keys)
        if due_at is None:
            return self.store.add(dispatch.event, names, key)
        if self._delays:
            return self.store.add(dispatch.event, names, key, due_at=due_at)
        # A store written before delays: the event, then each delivery as due later.
        first = self.store.add(dispatch.event, names, key)
        if first is None:
            for name in names:
                self.store.retrying(dispatch.event.id, name, 0, "", due_at)
        return first

    def started(self, event_id: str, handler: str, attempts: int) -> None:
        self.store.started(event_id, handler, attempts)

    def succeeded(self, event_id: str, handler: str) -> None:
        self._persist(self.store.succeeded, event_id, handler)

    def retrying(
        self, event_id: str, handler: str, attempts: int, error: str | None, due_at: float
    ) -> None:
        self._persist(self.store.retrying, event_id, handler, attempts, error, due_at)

    def dead(self, dead_letter: DeadLetter, dispatch: Dispatch, index: int) -> None:
        self._persist(self.store.dead, dead_letter)

    def event_settled(self, dispatch: Dispatch) -> None:
        pass

    def leave(self, deliveries: Sequence[tuple[Dispatch, int]]) -> None:
        pairs = [(d.event.id, d.subs[i].name) for d, i in deliveries]
        self._persist(self.store.release, pairs)
        for dispatch, index in deliveries:
            delivery = dispatch.snapshot(index)
            self._observer.log.left_in_store(dispatch.event, delivery.handler, delivery.state)

    def status(self, event_id: str) -> Mapping[str, Delivery] | None:
        return self.store.status(event_id)

    def dead_letters(self) -> list[DeadLetter]:
        return self.store.dead_letters()

    def purge_dead_letters(self) -> int:
        return self.store.purge_dead_letters()

    def close(self) -> None:
        self._persist(self.store.close)


class StreamedBackend(LocalBackend):
    """Events come from a transport; dead letters of local deliveries stay in memory."""

    leaves_unfinished = True

    def __init__(self, records: Records, transport: Transport, observer: Observer) -> None:
        super().__init__(records)
        self.transport = transport
        self._observer = observer

    def event_settled(self, dispatch: Dispatch) -> None:
        token = dispatch.token
        assert token is not None  # only events received from the transport have one
        try:
            self.transport.settled(token)
        except Exception as exc:  # noqa: BLE001 - not acknowledged: delivered again later
            self._observer.log.internal_error("transport", exc)

    def leave(self, deliveries: Sequence[tuple[Dispatch, int]]) -> None:
        # The event's entry is simply not acknowledged: another consumer (or this one,
        # restarted) takes it over after the transport's claim_idle.
        for dispatch, index in deliveries:
            delivery = dispatch.snapshot(index)
            self._observer.log.left_in_stream(dispatch.event, delivery.handler, delivery.state)

    def close(self) -> None:
        try:
            self.transport.close()
        except Exception as exc:  # noqa: BLE001 - closing is best effort; say so
            self._observer.log.internal_error("transport", exc)
