"""The order-service example's HTTP API, through Flask's test client, on a real worker pool."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import tenacity
from flask import Flask
from flask.testing import FlaskClient

from eventbus.stores import SQLiteStore
from eventbus.testing import EventRecorder
from examples.order_service.fakes import Mailer, OutboxMailer
from examples.order_service.handlers import (
    AUDIT_LOG,
    NOTIFY_WAREHOUSE,
    RESERVE_INVENTORY,
    SEND_CONFIRMATION_EMAIL,
    SEND_SHIPPING_NOTIFICATION,
    TRACK_ANALYTICS,
    UPDATE_ORDER_STATUS,
)
from examples.order_service.web import MAX_BODY_BYTES, MAX_JSON_DEPTH, create_app
from examples.order_service.wiring import OrderApp, Settings, build_app
from tests.support.net import free_port

DRAIN = 5.0  # seconds: generous; a healthy run drains in milliseconds
ADA = {"email": "ada@example.com", "items": [{"sku": "KB-101", "quantity": 1}]}
CREATED_HANDLERS = {
    AUDIT_LOG,
    SEND_CONFIRMATION_EMAIL,
    RESERVE_INVENTORY,
    NOTIFY_WAREHOUSE,
    TRACK_ANALYTICS,
}


def make_settings(tmp_path: Path) -> Settings:
    """Zero latency, no backoff, everything under *tmp_path*."""
    return Settings(
        db_path=tmp_path / "orders.sqlite3",
        outbox_dir=tmp_path / "outbox",
        latency=0.0,
        retry_wait=tenacity.wait_none(),
        max_workers=4,
        close_timeout=5.0,
    )


class GatedMailer:
    """A mailer that blocks in ``send`` until the test sets ``release``."""

    def __init__(self, inner: Mailer) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def send(self, *, to: str, subject: str, body: str, key: str) -> None:
        self.entered.set()
        if not self.release.wait(timeout=10):
            raise TimeoutError("the test never released the mailer")
        self.inner.send(to=to, subject=subject, body=body, key=key)


@pytest.fixture
def orders_app(tmp_path: Path) -> Iterator[OrderApp]:
    """A fresh order service in a temporary folder; closed (bus included) afterwards."""
    app = build_app(make_settings(tmp_path))
    yield app
    app.close()


@pytest.fixture
def web(orders_app: OrderApp) -> Flask:
    """The Flask app over ``orders_app``, with the fake controls on."""
    return create_app(orders_app, fake_controls=True)


@pytest.fixture
def client(web: Flask) -> FlaskClient:
    """A test client of ``web``."""
    return web.test_client()


def handlers_of(client: FlaskClient, status_url: str) -> dict[str, dict[str, Any]]:
    """GET a status URL and return its ``handlers`` object."""
    response = client.get(status_url)
    assert response.status_code == 200
    body = response.get_json()
    assert isinstance(body, dict)
    handlers: dict[str, dict[str, Any]] = body["handlers"]
    return handlers


def test_create_order_answers_while_a_handler_is_blocked(tmp_path: Path) -> None:
    """POST /api/orders returns 201 while the email handler is blocked, which status shows as
    running, and then as succeeded once released."""
    settings = make_settings(tmp_path)
    gate = GatedMailer(OutboxMailer(settings.outbox_dir))
    app = build_app(settings, mailer=gate)
    try:
        client = create_app(app).test_client()
        response = client.post("/api/orders", json=ADA)
        assert response.status_code == 201
        assert not gate.release.is_set()  # answered while the handler cannot finish
        body = response.get_json()
        assert body["order"]["status"] == "placed"
        assert body["status_url"] == f"/api/events/{body['event_id']}"
        assert response.headers["Location"] == f"/api/orders/{body['order']['id']}"

        assert gate.entered.wait(timeout=DRAIN)
        running = handlers_of(client, body["status_url"])
        assert running[SEND_CONFIRMATION_EMAIL] == {
            "state": "running",
            "attempts": 1,
            "error": None,
        }
        assert client.get(body["status_url"]).get_json()["settled"] is False

        gate.release.set()
        assert app.bus.drain(timeout=DRAIN)
        settled = handlers_of(client, body["status_url"])
        assert set(settled) == CREATED_HANDLERS
        assert {h["state"] for h in settled.values()} == {"succeeded"}
        assert (settings.outbox_dir / f"{body['order']['id']}-confirmation.eml").is_file()
    finally:
        gate.release.set()
        app.close()


def test_flaky_inventory_is_retried_then_succeeds(
    client: FlaskClient, orders_app: OrderApp
) -> None:
    """An order of the contended SKU fails inventory twice, is retried and ends succeeded."""
    response = client.post(
        "/api/orders",
        json={"email": "grace@example.com", "items": [{"sku": "MN-303", "quantity": 2}]},
    )
    assert response.status_code == 201
    body = response.get_json()
    assert orders_app.bus.drain(timeout=DRAIN)

    inventory = handlers_of(client, body["status_url"])[RESERVE_INVENTORY]
    assert inventory["state"] == "succeeded"
    assert inventory["attempts"] == 3
    assert inventory["error"].startswith("InventoryBusyError:")  # the last failure, kept
    assert orders_app.inventory.reserved(body["order"]["id"]) is not None
    assert client.get("/api/dead-letters").get_json() == {"dead_letters": []}


def test_warehouse_outage_ends_as_dead_letter_and_replay_delivers_it(
    client: FlaskClient, orders_app: OrderApp
) -> None:
    """With the warehouse down the notification is dead-lettered after 3 attempts; after
    warehouse.up() a replay through the API delivers it."""
    orders_app.warehouse.down()
    body = client.post("/api/orders", json=ADA, headers={"X-Request-ID": "req-outage"}).get_json()
    order_id = body["order"]["id"]
    assert orders_app.bus.drain(timeout=DRAIN)

    handlers = handlers_of(client, body["status_url"])
    assert handlers[NOTIFY_WAREHOUSE]["state"] == "dead"
    assert handlers[NOTIFY_WAREHOUSE]["attempts"] == 3
    assert {h["state"] for n, h in handlers.items() if n != NOTIFY_WAREHOUSE} == {"succeeded"}
    dead_letters = client.get("/api/dead-letters").get_json()["dead_letters"]
    assert len(dead_letters) == 1
    (dead,) = dead_letters
    assert dead["handler"] == NOTIFY_WAREHOUSE
    assert dead["reason"] == "exhausted"
    assert dead["attempts"] == 3
    assert dead["error"].startswith("WarehouseUnavailableError:")
    assert dead["event"] == {
        "id": body["event_id"],
        "name": "order:created",
        "occurred_at": dead["event"]["occurred_at"],
        "order_id": order_id,
        "metadata": {"request_id": "req-outage"},  # the request id stays with the event
    }
    assert orders_app.warehouse.notified() == []

    orders_app.warehouse.up()
    replay = client.post(dead["replay_url"])
    assert replay.status_code == 202
    assert replay.get_json()["status_url"] == body["status_url"]
    assert orders_app.bus.drain(timeout=DRAIN)

    delivered = handlers_of(client, body["status_url"])[NOTIFY_WAREHOUSE]
    assert delivered["state"] == "succeeded"
    assert delivered["attempts"] == 1  # a replay starts a fresh attempt count
    assert orders_app.warehouse.notified() == [order_id]
    assert client.get("/api/dead-letters").get_json() == {"dead_letters": []}
    assert client.post(dead["replay_url"]).status_code == 404  # already replayed


def test_unknown_sku_is_dead_lettered_at_once(client: FlaskClient, orders_app: OrderApp) -> None:
    """An unknown SKU is a non-retryable inventory error: one attempt, then a dead letter."""
    body = client.post(
        "/api/orders",
        json={"email": "linus@example.com", "items": [{"sku": "ZZ-999", "quantity": 1}]},
    ).get_json()
    assert orders_app.bus.drain(timeout=DRAIN)

    inventory = handlers_of(client, body["status_url"])[RESERVE_INVENTORY]
    assert inventory == {
        "state": "dead",
        "attempts": 1,
        "error": "UnknownSkuError: SKU 'ZZ-999' is not in the catalog",
    }
    (dead,) = client.get("/api/dead-letters").get_json()["dead_letters"]
    assert (dead["handler"], dead["reason"]) == (RESERVE_INVENTORY, "not_retryable")


def test_ship_order_emails_the_customer_and_updates_the_status(
    client: FlaskClient, orders_app: OrderApp
) -> None:
    """POST /api/orders/<id>/ship answers 202; its handlers send the email and mark it shipped."""
    order_id = client.post("/api/orders", json=ADA).get_json()["order"]["id"]
    response = client.post(f"/api/orders/{order_id}/ship")
    assert response.status_code == 202
    body = response.get_json()
    assert body["order"]["status"] == "shipping"
    assert body["order"]["tracking_number"].startswith("TRK")
    assert orders_app.bus.drain(timeout=DRAIN)

    handlers = handlers_of(client, body["status_url"])
    assert set(handlers) == {AUDIT_LOG, SEND_SHIPPING_NOTIFICATION, UPDATE_ORDER_STATUS}
    assert {h["state"] for h in handlers.values()} == {"succeeded"}
    order = client.get(f"/api/orders/{order_id}").get_json()
    assert order["order"]["status"] == "shipped"
    assert order["order"]["shipped_at"] is not None
    assert [a["event_name"] for a in order["audit"]] == ["order:created", "order:shipped"]
    email = orders_app.settings.outbox_dir / f"{order_id}-shipped.eml"
    assert body["order"]["tracking_number"] in email.read_text()


def test_shipping_twice_is_a_conflict_and_emits_once(
    client: FlaskClient, orders_app: OrderApp
) -> None:
    """A second ship request for the same order gets 409 and emits no second event."""
    order_id = client.post("/api/orders", json=ADA).get_json()["order"]["id"]
    with EventRecorder(orders_app.bus) as recorder:
        assert client.post(f"/api/orders/{order_id}/ship").status_code == 202
        second = client.post(f"/api/orders/{order_id}/ship")
    assert second.status_code == 409
    # "shipping", or "shipped" if update_order_status already ran: both are conflicts.
    assert re.search(r"is already shipp(ing|ed)$", second.get_json()["error"])
    assert recorder.names == ["order:shipped"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"data": '{"email": "ada@example.com",', "content_type": "application/json"},
            "not valid JSON",
        ),
        ({"data": b"\xff\xfe", "content_type": "application/json"}, "not valid JSON"),
        ({"data": "email=ada@example.com"}, "Content-Type: application/json"),
        ({"json": [ADA]}, "body: must be a JSON object"),
        ({"json": {"items": ADA["items"]}}, "email: is required"),
        ({"json": {"email": "ada@example.com"}}, "items: is required"),
        ({"json": {"email": "ada@example.com", "items": []}}, "items: must be a non-empty list"),
        ({"json": {"email": "not-an-email", "items": ADA["items"]}}, "email: must be an email"),
        (
            {"json": {"email": "a@example.com", "items": [{"sku": "KB-101", "quantity": True}]}},
            "items[0].quantity: is required: a whole number",
        ),
        (
            {"json": {"email": "a@example.com", "items": [{"quantity": 1}]}},
            "items[0].sku: is required",
        ),
    ],
    ids=[
        "malformed-json",
        "not-utf8",
        "form-encoded",
        "json-array",
        "missing-email",
        "missing-items",
        "empty-items",
        "bad-email",
        "bool-quantity",
        "missing-sku",
    ],
)
def test_bad_order_requests_get_400_and_emit_nothing(
    client: FlaskClient, orders_app: OrderApp, kwargs: dict[str, Any], message: str
) -> None:
    """A body that is not a JSON object, or misses or garbles a field, gets a 400 that says
    what is wrong, and no order is saved and no event emitted."""
    with EventRecorder(orders_app.bus) as recorder:
        response = client.post("/api/orders", **kwargs)
    assert response.status_code == 400
    assert message in response.get_json()["error"]
    assert recorder.events == []
    assert orders_app.repository.count() == 0


def test_unknown_ids_get_404_and_emit_nothing(client: FlaskClient, orders_app: OrderApp) -> None:
    """Unknown orders, events and dead letters are 404s with a message, and emit nothing."""
    with EventRecorder(orders_app.bus) as recorder:
        responses = {
            "ship": client.post("/api/orders/ord_missing/ship"),
            "order": client.get("/api/orders/ord_missing"),
            "event": client.get("/api/events/no-such-event"),
            "replay": client.post("/api/dead-letters/no-such-letter/replay"),
            "route": client.get("/api/no-such-route"),
        }
    assert {name: r.status_code for name, r in responses.items()} == dict.fromkeys(responses, 404)
    assert "ord_missing" in responses["ship"].get_json()["error"]
    assert "no-such-event" in responses["event"].get_json()["error"]
    assert "no-such-letter" in responses["replay"].get_json()["error"]
    assert recorder.events == []


def test_request_id_reaches_handler_log_lines_and_the_audit_trail(
    client: FlaskClient, orders_app: OrderApp
) -> None:
    """The X-Request-ID bound in the web layer shows up in the handlers' log lines and audit
    rows, and is echoed in the response."""
    capture = structlog.testing.LogCapture()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    response = client.post("/api/orders", json=ADA, headers={"X-Request-ID": "req-42"})
    assert response.headers["X-Request-ID"] == "req-42"
    order_id = response.get_json()["order"]["id"]
    assert orders_app.bus.drain(timeout=DRAIN)

    handler_lines = [
        e for e in capture.entries if e["event"] in {"email.sent", "inventory.reserved"}
    ]
    assert len(handler_lines) == 2
    assert {e["request_id"] for e in handler_lines} == {"req-42"}
    (audit,) = orders_app.repository.audit_trail(order_id)
    assert audit.request_id == "req-42"

    other = client.post("/api/orders", json=ADA, headers={"X-Request-ID": "bad id!"})
    assert other.headers["X-Request-ID"] not in {"bad id!", "req-42"}  # replaced, not trusted


def test_fake_warehouse_controls_exist_only_when_enabled(orders_app: OrderApp) -> None:
    """The fake-warehouse routes toggle the outage when enabled and are 404s otherwise."""
    with_controls = create_app(orders_app, fake_controls=True).test_client()
    assert with_controls.post("/api/fakes/warehouse/down").get_json() == {"warehouse": "down"}
    assert not orders_app.warehouse.is_up
    assert with_controls.post("/api/fakes/warehouse/up").get_json() == {"warehouse": "up"}
    assert orders_app.warehouse.is_up
    assert create_app(orders_app).test_client().post("/api/fakes/warehouse/down").status_code == 404


def test_a_closed_service_answers_503(client: FlaskClient, orders_app: OrderApp) -> None:
    """Once the app is closed (bus included), health and new orders answer 503."""
    assert client.get("/api/health").get_json() == {"status": "ok"}
    orders_app.close()
    assert client.get("/api/health").status_code == 503
    assert client.post("/api/orders", json=ADA).status_code == 503


def _nested(depth: int) -> str:
    """An order whose email is wrapped in *depth* - 1 arrays: *depth* levels in all."""
    arrays = depth - 1
    return '{"email": ' + "[" * arrays + '"a@example.com"' + "]" * arrays + ', "items": []}'


@pytest.mark.parametrize(
    "body",
    [
        "[" * 30_000 + "]" * 30_000,  # 60,000 bytes: within the size limit
        _nested(MAX_JSON_DEPTH + 1),
        '{"email": "a@example.com", "items": [' + '{"x": ' * 8_000 + "}" * 8_000 + "]}",
    ],
    ids=["30000-deep-array", "one-level-too-deep", "deep-objects"],
)
def test_too_deeply_nested_bodies_get_400_and_save_nothing(
    client: FlaskClient, orders_app: OrderApp, body: str
) -> None:
    """A JSON body nested deeper than MAX_JSON_DEPTH gets a 400 naming the limit (not a 500
    from the parser's recursion), and no order is saved and no event emitted."""
    with EventRecorder(orders_app.bus) as recorder:
        response = client.post("/api/orders", data=body, content_type="application/json")
    assert response.status_code == 400
    assert f"nested more than {MAX_JSON_DEPTH} levels" in response.get_json()["error"]
    assert recorder.events == []
    assert orders_app.repository.count() == 0


def test_nesting_up_to_the_limit_and_brackets_in_strings_reach_validation(
    client: FlaskClient,
) -> None:
    """A body exactly MAX_JSON_DEPTH deep is parsed (and fails validation, 400 for a field),
    and brackets inside strings do not count as nesting."""
    deepest = client.post(
        "/api/orders", data=_nested(MAX_JSON_DEPTH), content_type="application/json"
    )
    assert deepest.status_code == 400
    assert deepest.get_json()["fields"]["email"].startswith("must be an email")
    bracketed = {"email": "ada@example.com", "items": [{"sku": "[" * 40 + "{", "quantity": 1}]}
    response = client.post("/api/orders", json=bracketed)
    assert response.status_code == 400
    assert set(response.get_json()["fields"]) == {"items[0].sku"}  # too long, not too deep


PREFIX = '{"email": "ada@example.com", "items": [{"sku": "KB-101", "quantity": 1}], "pad": "'


def _padded(size: int) -> str:
    """A valid order of exactly *size* bytes, padded with an extra field."""
    return PREFIX + "x" * (size - len(PREFIX) - 2) + '"}'


@pytest.mark.parametrize(
    "body",
    [_padded(MAX_BODY_BYTES + 1), _padded(20 * 1024 * 1024), "[" * 100_000 + "]" * 100_000],
    ids=["one-byte-over", "20MB-order", "100000-deep-array"],
)
def test_bodies_over_the_size_limit_get_413_and_save_nothing(
    client: FlaskClient, orders_app: OrderApp, body: str
) -> None:
    """A body larger than MAX_BODY_BYTES gets a 413 with a JSON error naming the limit, even
    when the order in it is valid, and nothing is saved or emitted."""
    with EventRecorder(orders_app.bus) as recorder:
        response = client.post("/api/orders", data=body, content_type="application/json")
    assert response.status_code == 413
    assert response.get_json() == {"error": f"request body is larger than {MAX_BODY_BYTES} bytes"}
    assert recorder.events == []
    assert orders_app.repository.count() == 0
    fits = _padded(MAX_BODY_BYTES)
    assert client.post("/api/orders", data=fits, content_type="application/json").status_code == 201


def test_redis_mode_with_redis_down_takes_orders_and_keeps_their_events_in_the_outbox(
    tmp_path: Path,
) -> None:
    """In redis mode with nothing listening at the Redis URL, a new order (201) and a shipment
    (202) are committed with their events; /api/health answers 200 "degraded" naming the
    unreachable transport; and at shutdown the unpublished events stay in the outbox (the
    event store in the orders database), pending for the next start's relay."""
    settings = Settings(
        db_path=tmp_path / "orders.sqlite3",
        outbox_dir=tmp_path / "outbox",
        latency=0.0,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    with build_app(settings) as app:
        client = create_app(app).test_client()
        created = client.post("/api/orders", json=ADA)
        assert created.status_code == 201
        order_id = created.get_json()["order"]["id"]
        assert app.orders.get_order(order_id).status == "placed"
        shipped = client.post(f"/api/orders/{order_id}/ship")
        assert shipped.status_code == 202
        assert app.orders.get_order(order_id).status == "shipping"

        health = client.get("/api/health")
        assert health.status_code == 200
        body = health.get_json()
        assert body["status"] == "degraded"
        assert body["transport"].startswith("unreachable: ")

    outbox = SQLiteStore(settings.db_path, create=False)
    try:
        for response in (created, shipped):
            deliveries = outbox.status(response.get_json()["event_id"])
            assert deliveries is not None
            assert {d.state for d in deliveries.values()} == {"pending"}
    finally:
        outbox.close()
