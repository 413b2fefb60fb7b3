"""The registry: subscriptions, priorities, typed lookup and cached resolution."""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from eventbus import _registry as registry_module
from eventbus._event import Event
from eventbus._matching import Pattern
from eventbus._registry import (
    Registry,
    Subscription,
    check_handler,
    check_target,
    event_name_of,
    handler_name,
)
from eventbus.exceptions import (
    DuplicateHandlerError,
    InvalidEventError,
    InvalidEventNameError,
    InvalidHandlerError,
)
from eventbus.retry import RetryPolicy


def _handler(label: str) -> Callable[[Event], None]:
    """A distinct handler function per label."""

    def handle(event: Event) -> None:
        pass

    handle.__qualname__ = f"handle_{label}"
    return handle


def _add(
    registry: Registry,
    target: str | type[Any],
    handler: Callable[[Event], object],
    *,
    priority: int = 0,
    name: str | None = None,
    retry: RetryPolicy | None = None,
) -> Subscription:
    return registry.add(check_target(target), handler, name=name, priority=priority, retry=retry)


def _names(subs: tuple[Subscription, ...]) -> list[str]:
    return [s.name for s in subs]


@dataclass(frozen=True)
class OrderEvent:
    """A base typed event."""

    order_id: int


@dataclass(frozen=True)
class OrderCreated(OrderEvent):
    """A typed event with a declared name."""

    event_name: ClassVar[str] = "order:created"


class Anonymous:
    """A typed event without a declared name."""


class CallableHandler:
    """A callable object handler."""

    def __call__(self, event: Event) -> None:
        pass


class Service:
    """An object whose methods are handlers."""

    def on_event(self, event: Event) -> None:
        pass


def module_handler(event: Event) -> None:
    """A plain module-level handler."""


# -- resolution order ---------------------------------------------------------------------


def test_resolve_orders_by_priority_descending() -> None:
    """Higher priority subscriptions come first."""
    registry = Registry()
    low, high, mid = _handler("low"), _handler("high"), _handler("mid")
    _add(registry, "order:created", low, priority=-5)
    _add(registry, "order:created", high, priority=10)
    _add(registry, "order:*", mid, priority=0)
    assert [s.handler for s in registry.resolve("order:created", None)] == [high, mid, low]


def test_resolve_keeps_registration_order_within_a_priority() -> None:
    """Subscriptions of equal priority come in registration order."""
    registry = Registry()
    handlers = [_handler(str(i)) for i in range(5)]
    for handler in handlers:
        _add(registry, "**", handler)
    assert [s.handler for s in registry.resolve("a:b", None)] == handlers


def test_resolve_returns_only_matching_subscriptions() -> None:
    """A subscription whose pattern does not match the name is left out."""
    registry = Registry()
    _add(registry, "order:*", _handler("orders"), name="orders")
    _add(registry, "user:*", _handler("users"), name="users")
    assert _names(registry.resolve("user:created", None)) == ["users"]


def test_resolve_of_unknown_name_is_empty() -> None:
    """A name nobody subscribed to resolves to an empty tuple."""
    registry = Registry()
    _add(registry, "order:created", _handler("a"))
    assert registry.resolve("user:created", None) == ()


def test_handler_matching_twice_appears_once() -> None:
    """A handler subscribed to two matching patterns is resolved once."""
    registry = Registry()
    handler = _handler("twice")
    _add(registry, "order:created", handler)
    _add(registry, "order:*", handler)
    _add(registry, "**", handler)
    assert [s.handler for s in registry.resolve("order:created", None)] == [handler]


def test_deduplicated_handler_keeps_its_highest_priority_subscription() -> None:
    """Of a handler's matching subscriptions, the highest-priority one is kept, in its place."""
    registry = Registry()
    handler, other = _handler("twice"), _handler("other")
    _add(registry, "order:created", handler, priority=1)
    _add(registry, "order:*", other, priority=5)
    policy = RetryPolicy(max_attempts=7)
    _add(registry, "**", handler, priority=9, retry=policy)
    subs = registry.resolve("order:created", None)
    assert [s.handler for s in subs] == [handler, other]
    assert subs[0].priority == 9
    assert subs[0].retry is policy


def test_resolve_is_cached_until_a_change() -> None:
    """Resolving the same name twice without changes returns the same tuple."""
    registry = Registry()
    _add(registry, "order:*", _handler("a"))
    assert registry.resolve("order:created", None) is registry.resolve("order:created", None)


def test_add_invalidates_the_cache() -> None:
    """A handler added after a resolution is seen by the next resolution."""
    registry = Registry()
    first, second = _handler("first"), _handler("second")
    _add(registry, "order:*", first)
    assert [s.handler for s in registry.resolve("order:created", None)] == [first]
    _add(registry, "**", second)
    assert [s.handler for s in registry.resolve("order:created", None)] == [first, second]


def test_remove_invalidates_the_cache() -> None:
    """A handler removed after a resolution is gone from the next resolution."""
    registry = Registry()
    first, second = _handler("first"), _handler("second")
    _add(registry, "order:*", first)
    _add(registry, "**", second)
    assert len(registry.resolve("order:created", None)) == 2
    registry.remove(first)
    assert [s.handler for s in registry.resolve("order:created", None)] == [second]


def test_resolution_stays_correct_past_the_cache_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the cache is full it starts again, and every name still resolves correctly."""
    monkeypatch.setattr(registry_module, "_CACHE_LIMIT", 2)
    registry = Registry()
    orders, users = _handler("orders"), _handler("users")
    _add(registry, "order:*", orders)
    _add(registry, "user:*", users)
    for _ in range(2):
        for i in range(5):
            assert [s.handler for s in registry.resolve(f"order:{i}", None)] == [orders]
            assert [s.handler for s in registry.resolve(f"user:{i}", None)] == [users]


# -- typed events -------------------------------------------------------------------------


def test_class_subscription_receives_subclass_events() -> None:
    """A handler subscribed to a base class receives events of its subclasses (via __mro__)."""
    registry = Registry()
    handler = _handler("base")
    _add(registry, OrderEvent, handler)
    assert [s.handler for s in registry.resolve("order:created", OrderCreated)] == [handler]


def test_subclass_subscription_does_not_receive_base_events() -> None:
    """A handler subscribed to a subclass does not receive events of its base class."""
    registry = Registry()
    _add(registry, OrderCreated, _handler("sub"))
    assert registry.resolve("OrderEvent", OrderEvent) == ()


def test_class_subscription_ignores_untyped_events() -> None:
    """A class subscription does not receive a plain named event of the same name."""
    registry = Registry()
    _add(registry, OrderCreated, _handler("typed"))
    assert registry.resolve("order:created", None) == ()


def test_typed_event_reaches_class_and_name_subscribers_in_priority_order() -> None:
    """A typed event resolves to class and matching name subscribers, ordered together."""
    registry = Registry()
    by_class, by_name, by_base = _handler("class"), _handler("name"), _handler("base")
    _add(registry, OrderCreated, by_class, priority=1)
    _add(registry, "order:*", by_name, priority=2)
    _add(registry, OrderEvent, by_base, priority=0)
    subs = registry.resolve("order:created", OrderCreated)
    assert [s.handler for s in subs] == [by_name, by_class, by_base]


def test_handler_on_class_and_name_receives_typed_event_once() -> None:
    """A handler subscribed to both a class and its event name is resolved once."""
    registry = Registry()
    handler = _handler("both")
    _add(registry, OrderCreated, handler)
    _add(registry, "order:created", handler)
    assert len(registry.resolve("order:created", OrderCreated)) == 1


def test_object_subscription_receives_every_typed_event() -> None:
    """A handler subscribed to ``object`` receives every typed event."""
    registry = Registry()
    handler = _handler("all")
    _add(registry, object, handler)
    assert [s.handler for s in registry.resolve("Anonymous", Anonymous)] == [handler]


# -- duplicates ---------------------------------------------------------------------------


def test_same_handler_twice_on_one_pattern_is_rejected() -> None:
    """Subscribing one handler twice to the same pattern raises DuplicateHandlerError."""
    registry = Registry()
    handler = _handler("a")
    _add(registry, "order:*", handler)
    with pytest.raises(DuplicateHandlerError, match="already subscribed to 'order:\\*'"):
        _add(registry, "order:*", handler)


def test_same_handler_twice_on_one_class_is_rejected() -> None:
    """Subscribing one handler twice to the same class raises DuplicateHandlerError."""
    registry = Registry()
    handler = _handler("a")
    _add(registry, OrderCreated, handler)
    with pytest.raises(DuplicateHandlerError, match="OrderCreated"):
        _add(registry, OrderCreated, handler)


def test_two_handlers_with_one_name_are_rejected() -> None:
    """Two different handlers under the same name raise DuplicateHandlerError."""
    registry = Registry()
    _add(registry, "a", _handler("x"), name="shared")
    with pytest.raises(DuplicateHandlerError, match="another handler"):
        _add(registry, "b", _handler("y"), name="shared")


def test_one_handler_under_two_names_is_rejected() -> None:
    """One handler subscribed under a second name raises DuplicateHandlerError."""
    registry = Registry()
    handler = _handler("x")
    _add(registry, "a", handler, name="first")
    with pytest.raises(DuplicateHandlerError, match="one handler has one name"):
        _add(registry, "b", handler, name="second")


def test_duplicate_handler_error_is_a_value_error() -> None:
    """A duplicate subscription is reported as a ValueError."""
    assert issubclass(DuplicateHandlerError, ValueError)


def test_rejected_subscription_leaves_the_registry_unchanged() -> None:
    """A subscription rejected as a duplicate is not added."""
    registry = Registry()
    _add(registry, "a", _handler("x"), name="shared")
    with pytest.raises(DuplicateHandlerError):
        _add(registry, "a", _handler("y"), name="shared")
    assert len(registry.resolve("a", None)) == 1


def test_equal_bound_methods_count_as_one_handler() -> None:
    """Two bound-method objects of the same instance and method are the same handler."""
    registry = Registry()
    service = Service()
    _add(registry, "a", service.on_event)
    with pytest.raises(DuplicateHandlerError):
        _add(registry, "a", service.on_event)


# -- removal ------------------------------------------------------------------------------


def test_remove_by_callable_returns_the_number_removed() -> None:
    """Removing a handler by callable removes all its subscriptions and returns their count."""
    registry = Registry()
    handler = _handler("x")
    _add(registry, "a", handler)
    _add(registry, "b:*", handler)
    _add(registry, OrderCreated, handler)
    assert registry.remove(handler) == 3
    assert registry.resolve("a", None) == ()
    assert registry.resolve("b:c", None) == ()
    assert registry.resolve("order:created", OrderCreated) == ()


def test_remove_by_name_returns_the_number_removed() -> None:
    """Removing a handler by name removes all its subscriptions and returns their count."""
    registry = Registry()
    handler = _handler("x")
    _add(registry, "a", handler, name="svc.x")
    _add(registry, "c", handler, name="svc.x")
    _add(registry, "b", _handler("y"), name="svc.y")
    assert registry.remove("svc.x") == 2
    assert _names(registry.resolve("b", None)) == ["svc.y"]


def test_remove_of_unknown_handler_returns_zero() -> None:
    """Removing a handler that was never subscribed returns 0."""
    registry = Registry()
    _add(registry, "a", _handler("x"))
    assert registry.remove(_handler("y")) == 0
    assert registry.remove("no.such.handler") == 0
    assert len(registry.resolve("a", None)) == 1


def test_removed_name_can_be_reused_by_another_handler() -> None:
    """After a handler is removed, its name is free for a different handler."""
    registry = Registry()
    _add(registry, "a", _handler("x"), name="shared")
    registry.remove("shared")
    replacement = _handler("y")
    _add(registry, "a", replacement, name="shared")
    assert [s.handler for s in registry.resolve("a", None)] == [replacement]


def test_remove_by_bound_method_removes_that_instance_only() -> None:
    """Removing a bound method leaves another instance's handler subscribed."""
    registry = Registry()
    first, second = Service(), Service()
    _add(registry, "a", first.on_event, name="first")
    _add(registry, "a", second.on_event, name="second")
    assert registry.remove(first.on_event) == 1
    assert _names(registry.resolve("a", None)) == ["second"]


def test_find_returns_the_named_subscription() -> None:
    """find() returns a subscription of the handler with that name, or None."""
    registry = Registry()
    handler = _handler("x")
    _add(registry, "a", handler, name="svc.x")
    found = registry.find("svc.x")
    assert found is not None
    assert found.handler is handler
    assert registry.find("svc.missing") is None


# -- concurrency --------------------------------------------------------------------------


def test_concurrent_adds_and_resolves_stay_consistent() -> None:
    """Threads adding while others resolve never see a shrinking or duplicated handler set."""
    registry = Registry()
    adders, per_adder, resolvers, rounds = 4, 50, 4, 300
    barrier = threading.Barrier(adders + resolvers)
    errors: list[str] = []

    def add(index: int) -> None:
        barrier.wait(timeout=10)
        for i in range(per_adder):
            _add(registry, "order:*", _handler(f"{index}-{i}"), name=f"h{index}-{i}")

    def resolve() -> None:
        barrier.wait(timeout=10)
        seen = 0
        for _ in range(rounds):
            names = _names(registry.resolve("order:created", None))
            if len(names) < seen:
                errors.append(f"shrank from {seen} to {len(names)}")
            if len(set(names)) != len(names):
                errors.append("duplicate handler in one resolution")
            seen = len(names)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(adders)]
    threads += [threading.Thread(target=resolve) for _ in range(resolvers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert len(registry.resolve("order:created", None)) == adders * per_adder


def test_concurrent_adds_and_removes_end_consistent() -> None:
    """After concurrent adds and removes, resolution reflects exactly the survivors."""
    registry = Registry()
    workers, per_worker = 4, 50
    barrier = threading.Barrier(workers)
    removed: list[int] = []

    def churn(index: int) -> None:
        barrier.wait(timeout=10)
        for i in range(per_worker):
            name = f"h{index}-{i}"
            _add(registry, "**", _handler(name), name=name)
            registry.resolve("x:y", None)
            if i % 2:
                removed.append(registry.remove(name))

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert removed == [1] * (workers * per_worker // 2)
    expected = {f"h{w}-{i}" for w in range(workers) for i in range(0, per_worker, 2)}
    assert set(_names(registry.resolve("x:y", None))) == expected


# -- handler_name -------------------------------------------------------------------------


def test_handler_name_of_a_function() -> None:
    """A function is named module.qualname."""
    assert handler_name(module_handler) == f"{__name__}.module_handler"


def test_handler_name_of_a_nested_function() -> None:
    """A nested function's name includes its enclosing function."""

    def inner(event: Event) -> None:
        pass

    assert handler_name(inner) == (
        f"{__name__}.test_handler_name_of_a_nested_function.<locals>.inner"
    )


def test_handler_name_of_a_bound_method() -> None:
    """A bound method is named after its function: module.Class.method."""
    assert handler_name(Service().on_event) == f"{__name__}.Service.on_event"


def test_handler_name_of_a_callable_object() -> None:
    """A callable object is named after its class."""
    assert handler_name(CallableHandler()) == f"{__name__}.CallableHandler"


def test_handler_name_of_a_partial() -> None:
    """A functools.partial is named after the function it wraps, however deeply."""
    wrapped = functools.partial(functools.partial(module_handler))
    assert handler_name(wrapped) == handler_name(module_handler)


# -- check_handler ------------------------------------------------------------------------


@pytest.mark.parametrize("handler", [None, 42, "order:created", object()])
def test_check_handler_rejects_non_callables(handler: object) -> None:
    """A non-callable handler raises InvalidHandlerError, a TypeError."""
    with pytest.raises(InvalidHandlerError, match="must be callable") as info:
        check_handler(handler)
    assert isinstance(info.value, TypeError)


def test_check_handler_tells_coroutine_functions_from_plain_ones() -> None:
    """An async def handler is accepted and reported as async; a plain one as not."""

    async def handler(event: Event) -> None:
        pass

    def plain(event: Event) -> None:
        pass

    assert check_handler(handler) is True
    assert check_handler(functools.partial(handler)) is True
    assert check_handler(plain) is False


def test_check_handler_reports_async_callable_objects_as_async() -> None:
    """An object whose __call__ is async is an async handler too."""

    class AsyncHandler:
        async def __call__(self, event: Event) -> None:
            pass

    assert check_handler(AsyncHandler()) is True


def test_check_handler_rejects_async_generator_functions() -> None:
    """An async generator function (nothing would consume what it yields) is rejected."""

    async def handler(event: Event) -> AsyncIterator[None]:
        yield

    class AsyncGenHandler:
        async def __call__(self, event: Event) -> AsyncIterator[None]:
            yield

    for rejected in (handler, AsyncGenHandler()):
        with pytest.raises(InvalidHandlerError, match="async generator function") as info:
            check_handler(rejected)
        assert isinstance(info.value, TypeError)


def test_check_handler_rejects_zero_argument_functions() -> None:
    """A handler that takes no argument cannot receive the event."""

    def handler() -> None:
        pass

    with pytest.raises(InvalidHandlerError, match="exactly one positional argument"):
        check_handler(handler)


def test_check_handler_rejects_two_required_arguments() -> None:
    """A handler that requires two arguments cannot be called with the event alone."""

    def handler(event: Event, other: object) -> None:
        pass

    with pytest.raises(InvalidHandlerError, match="exactly one positional argument"):
        check_handler(handler)


def test_check_handler_rejects_required_keyword_only_arguments() -> None:
    """A handler with a required keyword-only argument cannot be called with the event alone."""

    def handler(event: Event, *, other: object) -> None:
        pass

    with pytest.raises(InvalidHandlerError):
        check_handler(handler)


def _defaults(event: Event, extra: int = 1) -> None:
    pass


def _star_args(*args: object) -> None:
    pass


def _event_and_kwargs(event: Event, **kwargs: object) -> None:
    pass


@pytest.mark.parametrize(
    "handler",
    [
        module_handler,
        _defaults,
        _star_args,
        _event_and_kwargs,
        lambda event: None,
        Service().on_event,
        CallableHandler(),
        functools.partial(_defaults, extra=2),
        functools.partial(lambda a, b: None, 1),
        print,
    ],
)
def test_check_handler_accepts_one_argument_callables(handler: object) -> None:
    """Callables that can take one positional argument are accepted."""
    check_handler(handler)


def test_check_handler_trusts_builtins_without_a_signature() -> None:
    """A builtin whose signature cannot be read (such as vars) is accepted."""
    check_handler(vars)


# -- event_name_of / check_target ---------------------------------------------------------


def test_event_name_of_uses_the_declared_name() -> None:
    """A class with event_name is emitted under that name."""
    assert event_name_of(OrderCreated) == "order:created"


def test_event_name_of_defaults_to_the_class_name() -> None:
    """A class without event_name is emitted under its class name."""
    assert event_name_of(Anonymous) == "Anonymous"


def test_event_name_of_rejects_a_malformed_declared_name() -> None:
    """A class whose event_name is malformed raises InvalidEventNameError."""

    class Bad:
        event_name = "order created"

    with pytest.raises(InvalidEventNameError):
        event_name_of(Bad)


def test_check_target_compiles_strings() -> None:
    """A string target becomes a compiled pattern."""
    target = check_target("order:*")
    assert isinstance(target, Pattern)
    assert target.matches("order:created")


def test_check_target_keeps_classes() -> None:
    """A user-defined class target is returned as is."""
    assert check_target(OrderCreated) is OrderCreated


def test_check_target_rejects_a_malformed_pattern() -> None:
    """A malformed pattern target raises InvalidEventNameError."""
    with pytest.raises(InvalidEventNameError):
        check_target("order:")


def test_check_target_rejects_a_class_with_malformed_event_name() -> None:
    """A class target with a malformed event_name fails at subscription time."""

    class Bad:
        event_name = "a::b"

    with pytest.raises(InvalidEventNameError):
        check_target(Bad)


@pytest.mark.parametrize("target", [42, None, 1.5, b"order", ["order"], OrderCreated(1)])
def test_check_target_rejects_non_name_non_class(target: object) -> None:
    """A target that is neither a string nor a class raises InvalidEventError, a TypeError."""
    with pytest.raises(InvalidEventError) as info:
        check_target(target)
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("target", [int, str, dict, list, Exception, type])
def test_check_target_rejects_builtin_classes(target: type) -> None:
    """A builtin class is not an event class and raises InvalidEventError."""
    with pytest.raises(InvalidEventError):
        check_target(target)
