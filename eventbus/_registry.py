"""Subscriptions and the cached resolution of an event to its handlers. Thread-safe.

Like pyee, one lock guards the registry and is held only for bookkeeping. Resolution of an
(event name, event class) to its subscriptions is cached; every change replaces the cache under
the lock, so a concurrent ``emit()`` sees either the old or the new set, never a torn one.
"""

from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eventbus._matching import Pattern, compile_pattern, validate_name
from eventbus.exceptions import DuplicateHandlerError, InvalidEventError, InvalidHandlerError

if TYPE_CHECKING:
    from eventbus._policies import Gate, Policy
    from eventbus.retry import RetryPolicy
    from eventbus.typing import Handler

__all__ = ["Registry", "Subscription", "event_name_of", "handler_name"]

# An unbounded cache would grow with every distinct name an application makes up
# (e.g. "user:123:updated"); past this many entries it starts again.
_CACHE_LIMIT = 10_000


@dataclass(frozen=True, slots=True, eq=False)
class Subscription:
    """One handler subscribed to one target (a pattern or an event class)."""

    handler: Handler
    name: str
    target: Pattern | type[Any]
    priority: int
    retry: RetryPolicy | None
    order: int
    #: An ``async def`` handler: its deliveries run as tasks on the bus's event loop.
    is_async: bool = False
    #: Its delivery options (``ordered_by``, ``concurrency``, ...), if any.
    policy: Policy | None = None
    #: Where its deliveries wait before they start, for a policy that makes them wait.
    gate: Gate | None = None

    @property
    def sort_key(self) -> tuple[int, int]:
        return (-self.priority, self.order)


def handler_name(handler: Handler) -> str:
    """The default name of a handler: ``module.qualname`` (of the function, for a method; of
    the wrapped function, for a ``functools.partial``)."""
    while isinstance(handler, functools.partial):
        handler = handler.func
    module = getattr(handler, "__module__", None) or type(handler).__module__
    qualname = getattr(handler, "__qualname__", None) or type(handler).__qualname__
    return f"{module}.{qualname}"


def event_name_of(cls: type[Any]) -> str:
    """The name a typed event class is emitted under: its ``event_name`` or the class name."""
    name = getattr(cls, "event_name", None)
    return validate_name(cls.__name__ if name is None else name)


def check_handler(handler: object) -> bool:
    """Raise ``InvalidHandlerError`` unless *handler* can be called with one event; return
    whether it is a coroutine function (awaited on the bus's loop) rather than a plain one."""
    if not callable(handler):
        raise InvalidHandlerError(f"handler must be callable, got {type(handler).__name__}")
    call = getattr(handler, "__call__", None)  # noqa: B004 - a callable object's own method
    if inspect.isasyncgenfunction(handler) or inspect.isasyncgenfunction(call):
        raise InvalidHandlerError(
            f"{handler_name(handler)} is an async generator function: a handler is a plain "
            "function or an `async def` coroutine function, and nothing would consume what "
            "it yields"
        )
    is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):  # some builtins have no signature: trust them
        return is_async
    try:
        signature.bind(None)
    except TypeError as exc:
        raise InvalidHandlerError(
            f"{handler_name(handler)} must accept exactly one positional argument (the Event): "
            f"{exc}"
        ) from None
    return is_async


def check_target(event: object) -> Pattern | type[Any]:
    """Compile a subscription target: a name/pattern string or an event class."""
    if isinstance(event, str):
        return compile_pattern(event)
    if isinstance(event, type) and (event.__module__ != "builtins" or event is object):
        event_name_of(event)  # a class with a malformed event_name fails here, not at emit
        return event
    raise InvalidEventError(
        f"subscribe to an event name, a pattern or an event class, got {event!r}"
    )


class Registry:
    """Handlers by name, pattern and class, with cached resolution. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: list[Subscription] = []
        self._by_name: dict[str, Handler] = {}
        self._order = 0
        self._cache: dict[tuple[str, type[Any] | None], tuple[Subscription, ...]] = {}
        #: Whether an ``async def`` handler or one with a gate was ever subscribed (until
        #: then, no event needs its deliveries sorted between the pool, the event loop and
        #: the gates).
        self.has_special = False

    def add(
        self,
        target: Pattern | type[Any],
        handler: Handler,
        *,
        name: str | None,
        priority: int,
        retry: RetryPolicy | None,
        is_async: bool = False,
        policy: Policy | None = None,
        gate: Gate | None = None,
    ) -> Subscription:
        """Subscribe *handler*; raise ``DuplicateHandlerError`` on a name or target clash."""
        name = handler_name(handler) if name is None else name
        with self._lock:
            existing = self._by_name.get(name)
            if existing is not None and existing != handler:
                raise DuplicateHandlerError(
                    f"another handler is already subscribed as {name!r}; pass name= to tell "
                    "them apart"
                )
            for sub in self._subscriptions:
                if sub.handler == handler and sub.name != name:
                    raise DuplicateHandlerError(
                        f"this handler is already subscribed as {sub.name!r}; one handler has "
                        "one name"
                    )
                if sub.name == name and _same_target(sub.target, target):
                    raise DuplicateHandlerError(
                        f"{name!r} is already subscribed to {_describe(target)}"
                    )
            self._order += 1
            sub = Subscription(
                handler, name, target, priority, retry, self._order, is_async, policy, gate
            )
            # Deliveries to such a handler are queued one by one, each to where it waits.
            self.has_special = self.has_special or is_async or gate is not None
            self._subscriptions.append(sub)
            self._by_name[name] = handler
            self._cache = {}
        return sub

    def remove(self, handler: Handler | str) -> int:
        """Unsubscribe a handler (or a handler name) from everything; return how many
        subscriptions were removed (0 if it was not subscribed)."""
        with self._lock:
            keep = [s for s in self._subscriptions if not _is(s, handler)]
            removed = len(self._subscriptions) - len(keep)
            if removed:
                self._subscriptions = keep
                self._by_name = {s.name: s.handler for s in keep}
                self._cache = {}
        return removed

    def find(self, name: str) -> Subscription | None:
        """The first subscription of the handler called *name* (for replays), if any."""
        with self._lock:
            return next((s for s in self._subscriptions if s.name == name), None)

    def patterns(self) -> frozenset[str]:
        """The names and patterns subscribed to; ``"**"`` when a class is (its subclasses'
        events have names of their own), or when nothing is."""
        with self._lock:
            targets = {s.target for s in self._subscriptions}
        if not targets or any(not isinstance(t, Pattern) for t in targets):
            return frozenset({"**"})
        return frozenset(t.text for t in targets if isinstance(t, Pattern))

    def names(self) -> frozenset[str]:
        """The names of every subscribed handler."""
        with self._lock:
            return frozenset(self._by_name)

    def resolve(self, name: str, cls: type[Any] | None) -> tuple[Subscription, ...]:
        """Subscriptions that receive event *name* (of class *cls*, for a typed event), in
        start order (higher priority first, then registration order), one per handler."""
        key = (name, cls)
        found = self._cache.get(key)
        if found is not None:
            return found
        with self._lock:
            found = self._resolve(name, cls)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache = {}
            self._cache[key] = found
        return found

    def _resolve(self, name: str, cls: type[Any] | None) -> tuple[Subscription, ...]:
        mro = cls.__mro__ if cls is not None else ()
        matching = sorted(
            (
                s
                for s in self._subscriptions
                if (s.target.matches(name) if isinstance(s.target, Pattern) else s.target in mro)
            ),
            key=lambda s: s.sort_key,
        )
        seen: set[str] = set()
        unique = []
        for sub in matching:  # a handler subscribed twice over receives the event once
            if sub.name not in seen:
                seen.add(sub.name)
                unique.append(sub)
        return _route(unique)


class Route(tuple):  # type: ignore[type-arg]
    """The subscriptions an event resolves to, and whether any of them needs its deliveries
    queued one by one (an ``async def`` handler, or one with a gate): decided once per
    resolution, not once per event."""

    special: bool


def _route(subs: list[Subscription]) -> tuple[Subscription, ...]:
    route = Route(subs)
    route.special = any(sub.is_async or sub.gate is not None for sub in subs)
    return route


def _is(sub: Subscription, handler: Handler | str) -> bool:
    return sub.name == handler if isinstance(handler, str) else sub.handler == handler


def _same_target(a: Pattern | type[Any], b: Pattern | type[Any]) -> bool:
    if isinstance(a, Pattern) and isinstance(b, Pattern):
        return a.text == b.text
    return a is b


def _describe(target: Pattern | type[Any]) -> str:
    return repr(target.text) if isinstance(target, Pattern) else target.__qualname__
