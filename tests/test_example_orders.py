"""The order-service example below the web layer: validation, OrderService, handlers and
shutdown, on an inline bus whose backoff waits on a fake clock (no threads, no sleeping)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import tenacity

from eventbus import Event, RetryPolicy
from eventbus.testing import EventRecorder, FakeClock, inline_bus
from examples.order_service import fakes, orders
from examples.order_service.domain import (
    LineItem,
    OrderCreated,
    OrderShipped,
    ValidationError,
    parse_new_order,
)
from examples.order_service.handlers import (
    RESERVE_INVENTORY,
    TRACK_ANALYTICS,
    payload,
)
from examples.order_service.orders import OrderNotFoundError, OrderStateError
from examples.order_service.repository import SqliteOrderRepository
from examples.order_service.wiring import OrderApp, Settings, build_app

BACKOFF = 30.0  # seconds of fake time between attempts
MONITOR = {"email": "grace@example.com", "items": [{"sku": "MN-303", "quantity": 1}]}


@pytest.fixture
def inline_app(tmp_path: Path) -> Iterator[tuple[OrderApp, FakeClock]]:
    """The service on an inline bus (handlers run inside emit) with a fake clock."""
    bus, clock = inline_bus(retry=RetryPolicy(max_attempts=3, wait=tenacity.wait_fixed(BACKOFF)))
    settings = Settings(
        db_path=tmp_path / "orders.sqlite3",
        outbox_dir=tmp_path / "outbox",
        latency=0.0,
        retry_wait=tenacity.wait_fixed(BACKOFF),
    )
    app = build_app(settings, bus=bus)
    yield app, clock
    app.close()


def test_parse_new_order_accepts_a_valid_order() -> None:
    """Valid order data becomes a NewOrder with stripped SKUs."""
    order = parse_new_order(
        {"email": "a@example.com", "items": [{"sku": " KB-101 ", "quantity": 2}]}
    )
    assert order.customer_email == "a@example.com"
    assert order.items == (LineItem("KB-101", 2),)


def test_parse_new_order_names_every_bad_field() -> None:
    """Validation reports all bad fields at once, by path."""
    with pytest.raises(ValidationError) as info:
        parse_new_order({"email": 7, "items": [{"sku": "KB-101", "quantity": 0}, "x"]})
    assert set(info.value.errors) == {"email", "items[0].quantity", "items[1]"}


def test_flaky_inventory_waits_on_the_clock_between_attempts(
    inline_app: tuple[OrderApp, FakeClock],
) -> None:
    """The contended SKU's reservation is retried only as the (fake) backoff elapses, while
    the other handlers of the event have already succeeded."""
    app, clock = inline_app
    event = app.orders.create_order(MONITOR).event
    status = app.bus.status(event.id)
    assert (status[RESERVE_INVENTORY].state, status[RESERVE_INVENTORY].attempts) == ("retrying", 1)
    assert {d.state for n, d in status.items() if n != RESERVE_INVENTORY} == {"succeeded"}

    clock.advance(BACKOFF - 1)
    assert app.bus.status(event.id)[RESERVE_INVENTORY].attempts == 1
    clock.advance(1)
    assert app.bus.status(event.id)[RESERVE_INVENTORY].attempts == 2
    clock.advance(BACKOFF)
    final = app.bus.status(event.id)[RESERVE_INVENTORY]
    assert (final.state, final.attempts) == ("succeeded", 3)
    assert app.bus.drain(timeout=0)


def test_analytics_is_best_effort(inline_app: tuple[OrderApp, FakeClock]) -> None:
    """A failing analytics call is dead-lettered after one attempt (its policy has no retry)."""
    app, _ = inline_app

    def broken(name: str, properties: object) -> None:
        raise ConnectionError("analytics collector unreachable")

    app.analytics.track = broken  # type: ignore[method-assign]
    event = app.orders.create_order(MONITOR).event
    assert app.bus.status(event.id)[TRACK_ANALYTICS].state == "dead"
    (dead,) = app.bus.dead_letters()
    assert (dead.handler, dead.attempts, dead.reason) == (TRACK_ANALYTICS, 1, "exhausted")


def test_order_service_emits_typed_events(inline_app: tuple[OrderApp, FakeClock]) -> None:
    """create_order and ship_order save first, then emit OrderCreated and OrderShipped."""
    app, _ = inline_app
    with EventRecorder(app.bus) as recorder:
        created = app.orders.create_order(MONITOR)
        shipped = app.orders.ship_order(created.order.id)
    assert recorder.names == ["order:created", "order:shipped"]
    assert isinstance(recorder.events[0].payload, OrderCreated)
    assert recorder.events[1].payload == OrderShipped(
        order_id=created.order.id,
        customer_email="grace@example.com",
        tracking_number=shipped.order.tracking_number or "",
    )
    assert app.orders.get_order(created.order.id).status == "shipped"  # inline: already handled


def test_order_service_rejects_unknown_and_already_shipped_orders(
    inline_app: tuple[OrderApp, FakeClock],
) -> None:
    """Shipping an unknown order or one already shipped raises and emits nothing."""
    app, _ = inline_app
    order_id = app.orders.create_order(MONITOR).order.id
    app.orders.ship_order(order_id)
    with EventRecorder(app.bus) as recorder:
        with pytest.raises(OrderNotFoundError):
            app.orders.ship_order("ord_missing")
        with pytest.raises(OrderStateError, match="already shipped"):
            app.orders.ship_order(order_id)
    assert recorder.events == []


def test_every_order_event_is_audited_once(inline_app: tuple[OrderApp, FakeClock]) -> None:
    """The order:* audit handler records each event once, even if it is handled again."""
    app, _ = inline_app
    created = app.orders.create_order(MONITOR)
    app.orders.ship_order(created.order.id)
    trail = app.repository.audit_trail(created.order.id)
    assert [entry.event_name for entry in trail] == ["order:created", "order:shipped"]
    assert trail[0].event_id == created.event.id
    assert app.repository.record_audit(trail[0]) is False  # a second delivery changes nothing


def test_payload_rejects_the_wrong_event_type() -> None:
    """payload() refuses an event whose payload is not the expected class."""
    event = Event(name="order:created", payload={"order_id": "x"})
    with pytest.raises(TypeError, match="carries dict, not OrderCreated"):
        payload(event, OrderCreated)


def test_close_reports_retries_abandoned_at_shutdown(
    inline_app: tuple[OrderApp, FakeClock],
) -> None:
    """Closing with a retry still waiting makes it an abandoned dead letter, reported and
    logged with what was left."""
    app, _ = inline_app
    app.orders.create_order(MONITOR)  # inventory now waits 30 s of fake time for attempt 2
    with structlog.testing.capture_logs() as logs:
        report = app.close()
    assert [d.handler for d in report.abandoned] == [RESERVE_INVENTORY]
    assert report.still_running is False
    (closed,) = [e for e in logs if e["event"] == "app.closed"]
    assert closed["log_level"] == "warning"
    assert (closed["abandoned"], closed["dead_letters"]) == (1, 1)
    assert app.close() is report  # idempotent


def test_repository_creates_its_folder_and_survives_reopening(tmp_path: Path) -> None:
    """The SQLite file (and its folder) is created on first use and keeps orders."""
    path = tmp_path / "nested" / "orders.sqlite3"
    first = SqliteOrderRepository(path)
    assert first.count() == 0
    first.close()
    assert path.is_file()
    second = SqliteOrderRepository(path)
    assert second.get("ord_missing") is None
    second.close()


def test_modules_are_named_for_what_they_hold() -> None:
    """The use cases live in orders.py and the fakes of the outside world in fakes.py; no
    service.py / services.py pair remains for readers to confuse."""
    package = Path(orders.__file__).parent
    assert orders.OrderService.__module__ == "examples.order_service.orders"
    assert fakes.OutboxMailer.__module__ == "examples.order_service.fakes"
    assert not (package / "service.py").exists()
    assert not (package / "services.py").exists()
