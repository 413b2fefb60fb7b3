"""The FastAPI example's API, through httpx's ASGI transport with the app's lifespan entered:
async handlers on the test's event loop, the sync one on a real worker thread."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
import structlog
import tenacity
from fastapi import FastAPI

from eventbus import EventBus, RetryPolicy
from eventbus.testing import EventRecorder
from examples.fastapi_orders.app import MAX_BODY_BYTES, create_app
from examples.fastapi_orders.fakes import FakeMailer, Services
from examples.fastapi_orders.handlers import (
    HANDLERS,
    RECORD_ANALYTICS,
    RESERVE_INVENTORY,
    SEND_CONFIRMATION,
)

pytestmark = pytest.mark.anyio

DRAIN = 10.0  # seconds: generous; a healthy run drains in milliseconds
ADA = {
    "email": "ada@example.com",
    "items": [
        {"sku": "KB-101", "quantity": 1, "price": "89.90"},
        {"sku": "MS-202", "quantity": 2, "price": 24.5},
    ],
}
#: The monitor is sold out: its reservation fails on every attempt.
GRACE = {"email": "grace@example.com", "items": [{"sku": "MN-303", "quantity": 2, "price": 299}]}
DEAD_LETTER_FIELDS = {
    "id",
    "handler",
    "event_id",
    "event_name",
    "attempts",
    "error",
    "reason",
    "failed_at",
}


class GatedMailer(FakeMailer):
    """A mailer whose ``send`` waits until the test sets ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, *, to: str, subject: str, body: str, key: str) -> bool:
        self.entered.set()
        await self.release.wait()
        return await super().send(to=to, subject=subject, body=body, key=key)


@dataclass
class Shop:
    """The app under test, its bus and fakes, and a client that calls it in process."""

    app: FastAPI
    bus: EventBus
    services: Services
    client: httpx.AsyncClient

    async def create(self, order: dict[str, Any], **headers: str) -> dict[str, Any]:
        """POST an order; assert 201 and return the body."""
        response = await self.client.post("/orders", json=order, headers=headers)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def get(self, url: str) -> dict[str, Any]:
        """GET *url*; assert 200 and return the body."""
        response = await self.client.get(url)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def settle(self) -> None:
        """Wait until no delivery is queued, running or waiting for a retry."""
        assert await self.bus.adrain(timeout=DRAIN)


def make_bus() -> EventBus:
    """Two attempts, no backoff: a failing handler is a dead letter at once."""
    return EventBus(
        max_workers=2, max_async=10, retry=RetryPolicy(max_attempts=2, wait=tenacity.wait_none())
    )


@asynccontextmanager
async def running(services: Services | None = None) -> AsyncIterator[Shop]:
    """The app on a fresh bus, its lifespan entered (so the bus is bound to this loop) and
    left at the end (so the bus is closed), with a client."""
    bus = make_bus()
    services = services if services is not None else Services()
    app = create_app(bus, services=services, close_timeout=5.0)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client,
    ):
        yield Shop(app, bus, services, client)


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    """The app with default fakes, running for the test."""
    async with running() as started:
        yield started


async def test_create_order_runs_the_async_and_the_sync_handlers(shop: Shop) -> None:
    """POST /orders answers 201 with the ids; after a drain the mailer, analytics and the
    inventory saw the order and GET /orders/{id} shows every handler succeeded."""
    with EventRecorder(shop.bus) as recorder:
        response = await shop.client.post("/orders", json=ADA)
    assert response.status_code == 201
    created = response.json()
    order_id, event_id = created["order_id"], created["event_id"]
    [event] = recorder.events
    assert (event.id, event.name) == (event_id, "order:created")
    assert created["status_url"] == f"/orders/{order_id}"
    assert response.headers["Location"] == f"/orders/{order_id}"

    await shop.settle()
    [mail] = shop.services.mailer.sent
    assert (mail.to, mail.key) == ("ada@example.com", f"{order_id}-confirmation")
    assert shop.services.analytics.tracked == [
        ("order_created", {"order_id": order_id, "lines": 2, "total": "138.90"})
    ]
    assert shop.services.inventory.is_reserved(order_id)
    assert shop.services.inventory.stock("MS-202") == 38

    body = await shop.get(f"/orders/{order_id}")
    assert body["event_id"] == event_id
    assert body["settled"] is True
    assert body["deliveries"] == {
        name: {"state": "succeeded", "attempts": 1, "error": None} for name in HANDLERS
    }
    assert body["order"]["email"] == "ada@example.com"
    assert body["order"]["total"] == "138.90"
    assert body["order"]["items"][1] == {"sku": "MS-202", "quantity": 2, "price": "24.5"}


async def test_async_handlers_run_on_the_loop_and_the_sync_one_on_a_worker(shop: Shop) -> None:
    """The async handlers log from the test's own (event loop) thread, the sync one from a
    worker thread, and every handler line carries the request id of the POST."""
    merge_context = structlog.contextvars.merge_contextvars
    with structlog.testing.capture_logs(processors=[merge_context]) as logs:
        created = await shop.create(ADA, **{"X-Request-ID": "req-42"})
        await shop.settle()
    handler_lines = {
        line["event"]: line for line in logs if line.get("order_id") == created["order_id"]
    }
    loop_thread = threading.current_thread().name
    assert handler_lines["email.sent"]["thread"] == loop_thread
    assert handler_lines["analytics.recorded"]["thread"] == loop_thread
    assert handler_lines["inventory.reserved"]["thread"] != loop_thread
    assert {line["request_id"] for line in handler_lines.values()} == {"req-42"}


async def test_create_order_answers_while_an_async_handler_still_runs() -> None:
    """POST /orders returns while the confirmation email waits; GET /orders/{id} shows that
    delivery running and the others settled, then succeeded once the mailer goes on."""
    mailer = GatedMailer()
    async with running(Services(mailer=mailer)) as shop:
        created = await shop.create(ADA)
        with anyio.fail_after(DRAIN):
            await mailer.entered.wait()
        body = await shop.get(created["status_url"])
        assert body["settled"] is False
        assert body["deliveries"][SEND_CONFIRMATION]["state"] == "running"

        mailer.release.set()
        await shop.settle()
        body = await shop.get(created["status_url"])
        assert body["settled"] is True
        assert body["deliveries"][SEND_CONFIRMATION]["state"] == "succeeded"


async def test_out_of_stock_order_ends_as_a_dead_letter(shop: Shop) -> None:
    """An order for a sold-out SKU: the reservation fails twice and is listed in
    GET /dead-letters (no payload), while the async handlers of the same event succeed."""
    created = await shop.create(GRACE)
    await shop.settle()

    body = await shop.get(created["status_url"])
    reservation = body["deliveries"][RESERVE_INVENTORY]
    assert reservation["state"] == "dead"
    assert reservation["attempts"] == 2
    assert reservation["error"] == "OutOfStockError: SKU 'MN-303': 2 wanted, 0 in stock"
    assert body["deliveries"][SEND_CONFIRMATION]["state"] == "succeeded"
    assert body["deliveries"][RECORD_ANALYTICS]["state"] == "succeeded"
    assert body["settled"] is True

    response = await shop.client.get("/dead-letters")
    assert response.status_code == 200
    [dead] = response.json()["dead_letters"]
    assert set(dead) == DEAD_LETTER_FIELDS
    assert dead["handler"] == RESERVE_INVENTORY
    assert (dead["event_id"], dead["event_name"]) == (created["event_id"], "order:created")
    assert (dead["attempts"], dead["reason"]) == (2, "exhausted")
    assert dead["error"] == reservation["error"]
    assert "grace@example.com" not in response.text


async def test_replay_after_restocking_succeeds(shop: Shop) -> None:
    """After the SKU is restocked, replaying the dead letter reserves the items; the dead
    letter is gone and only the failed handler ran again (one email, not two)."""
    created = await shop.create(GRACE)
    await shop.settle()
    [dead] = (await shop.get("/dead-letters"))["dead_letters"]

    response = await shop.client.post("/inventory/MN-303/restock", json={"quantity": 5})
    assert response.status_code == 200
    assert response.json() == {"sku": "MN-303", "stock": 5}
    response = await shop.client.post(f"/dead-letters/{dead['id']}/replay")
    assert response.status_code == 202
    assert response.json() == {
        "replayed": dead["id"],
        "handler": RESERVE_INVENTORY,
        "event_id": created["event_id"],
        "status_url": created["status_url"],
    }
    await shop.settle()

    assert (await shop.get("/dead-letters"))["dead_letters"] == []
    body = await shop.get(created["status_url"])
    assert body["deliveries"][RESERVE_INVENTORY]["state"] == "succeeded"
    assert body["settled"] is True
    assert shop.services.inventory.stock("MN-303") == 3
    assert len(shop.services.mailer.sent) == 1


async def test_replay_of_an_unknown_dead_letter_is_404(shop: Shop) -> None:
    """POST /dead-letters/{id}/replay answers 404 for an id that is not a dead letter,
    including one already replayed."""
    response = await shop.client.post("/dead-letters/no-such-id/replay")
    assert response.status_code == 404
    assert response.json() == {"detail": "no dead letter 'no-such-id'"}

    await shop.create(GRACE)
    await shop.settle()
    [dead] = (await shop.get("/dead-letters"))["dead_letters"]
    assert (await shop.client.post(f"/dead-letters/{dead['id']}/replay")).status_code == 202
    assert (await shop.client.post(f"/dead-letters/{dead['id']}/replay")).status_code == 404
    await shop.settle()


async def test_unknown_order_is_404(shop: Shop) -> None:
    """GET /orders/{id} answers 404 for an order that does not exist."""
    response = await shop.client.get("/orders/ord_missing")
    assert response.status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"items": ADA["items"]}, id="no-email"),
        pytest.param({**ADA, "email": "not-an-email"}, id="bad-email"),
        pytest.param({**ADA, "items": []}, id="no-items"),
        pytest.param({**ADA, "items": [{"sku": "KB-101", "quantity": 0, "price": 1}]}, id="qty-0"),
        pytest.param(
            {**ADA, "items": [{"sku": "KB-101", "quantity": "2", "price": 1}]}, id="qty-str"
        ),
        pytest.param({**ADA, "items": [{"sku": "KB-101", "quantity": 1, "price": -5}]}, id="price"),
        pytest.param({**ADA, "items": [{"sku": "KB-101", "quantity": 1}]}, id="no-price"),
        pytest.param({**ADA, "items": [{"sku": "kb 101", "quantity": 1, "price": 1}]}, id="sku"),
        pytest.param({**ADA, "coupon": "FREE"}, id="unknown-field"),
        pytest.param(["not", "an", "object"], id="not-an-object"),
    ],
)
async def test_bad_input_is_422_and_emits_nothing(shop: Shop, body: object) -> None:
    """A body that does not validate answers 422 and no handler runs."""
    with EventRecorder(shop.bus) as recorder:
        response = await shop.client.post("/orders", json=body)
        await shop.settle()
    assert response.status_code == 422
    assert "detail" in response.json()
    assert recorder.events == []
    assert shop.services.mailer.sent == []


async def test_malformed_json_is_422(shop: Shop) -> None:
    """A body that is not JSON answers 422."""
    response = await shop.client.post(
        "/orders", content=b"{oops", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422


async def test_a_body_above_the_bound_is_413(shop: Shop) -> None:
    """A body larger than MAX_BODY_BYTES answers 413 and emits nothing, while the largest
    valid order (50 lines) is well within the bound."""
    largest = {
        "email": "ada@example.com",
        "items": [{"sku": "CB-404", "quantity": 1000, "price": "99999999.99"}] * 50,
    }
    assert len(json.dumps(largest)) < MAX_BODY_BYTES // 8
    padded = json.dumps(ADA).replace("{", "{" + " " * MAX_BODY_BYTES, 1).encode()
    with EventRecorder(shop.bus) as recorder:
        response = await shop.client.post(
            "/orders", content=padded, headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 413
    assert recorder.events == []


async def test_leaving_the_lifespan_closes_the_bus() -> None:
    """Leaving the lifespan awaits bus.aclose(): the handlers of an order placed just before
    have run, and an order placed afterwards is refused with 503."""
    async with running() as shop:
        created = await shop.create(ADA)
    assert shop.bus.closed
    assert [mail.key for mail in shop.services.mailer.sent] == [
        f"{created['order_id']}-confirmation"
    ]
    assert shop.services.inventory.is_reserved(created["order_id"])
    transport = httpx.ASGITransport(app=shop.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
        response = await client.post("/orders", json=ADA)
    assert response.status_code == 503
