"""The order service split into processes through a real Redis: one API process that only
publishes, two worker processes that compete for the stream. Every order's handlers run exactly
once in total across the workers. While Redis is down the API still takes orders: each event is
committed with its order to the API's outbox and published once Redis is back, in order, and
then handled by a worker. A worker started without Redis exits with one line.

Needs ``redis-server`` (Debian: ``apt-get install redis-server``); skipped without it, unless
the ``CI`` environment variable is set, where a missing server is a failure.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
import tenacity

from eventbus import Event
from examples.order_service.__main__ import main
from examples.order_service.burst import order_body
from examples.order_service.handlers import (
    AUDIT_LOG,
    NOTIFY_WAREHOUSE,
    RESERVE_INVENTORY,
    SEND_CONFIRMATION_EMAIL,
    SEND_SHIPPING_NOTIFICATION,
    TRACK_ANALYTICS,
    UPDATE_ORDER_STATUS,
)
from examples.order_service.web import create_app
from examples.order_service.wiring import Settings, build_app, build_worker
from tests.support.children import ChildProcess, Children, order_service
from tests.support.net import call, free_port, wait_until_listening
from tests.support.redis import RedisServer

pytestmark = pytest.mark.integration

LINE_DEADLINE = 20.0  # seconds for an expected log line to appear
ORDERS = 6  # the burst's carts: clean, hot stock row, clean, unknown SKU, clean, clean
CREATED_HANDLERS = {
    AUDIT_LOG,
    SEND_CONFIRMATION_EMAIL,
    RESERVE_INVENTORY,
    NOTIFY_WAREHOUSE,
    TRACK_ANALYTICS,
}
SHIPPED_HANDLERS = {AUDIT_LOG, SEND_SHIPPING_NOTIFICATION, UPDATE_ORDER_STATUS}


Sink = queue.Queue[tuple[str, dict[str, Any]]]


def _spawn(children: Children, name: str, sink: Sink | None, *args: str) -> ChildProcess:
    """``python -m examples.order_service <args>``, its stderr read by lines: every JSON log
    line also goes, tagged with *name*, to the shared *sink*."""

    def forward(line: str) -> None:
        if sink is not None and line.startswith("{"):
            sink.put((name, json.loads(line)))

    return children.start(
        order_service(*args), name=name, read="stderr", stdin=False, on_line=forward
    )


def _collect_settled(
    sink: queue.Queue[tuple[str, dict[str, Any]]], expected: int
) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """Read the workers' log lines until *expected* deliveries have settled; return
    (event id, handler) -> [(worker, "succeeded" or "dead"), ...]."""
    settled: dict[tuple[str, str], list[tuple[str, str]]] = {}
    deadline = time.monotonic() + LINE_DEADLINE
    while sum(map(len, settled.values())) < expected:
        left = deadline - time.monotonic()
        try:
            name, line = sink.get(timeout=max(left, 0.001))
        except queue.Empty:
            raise AssertionError(f"only {settled} settled within {LINE_DEADLINE} s") from None
        state = {"handler.succeeded": "succeeded", "handler.dead_lettered": "dead"}.get(
            line["event"]
        )
        if state is not None:
            settled.setdefault((line["event_id"], line["handler"]), []).append((name, state))
    return settled


@pytest.mark.multiprocess
def test_api_and_two_workers_handle_every_order_exactly_once(
    tmp_path: Path, own_redis: RedisServer, children: Children
) -> None:
    """Orders posted to the API process are handled by the two worker processes: each of an
    order's handlers settles exactly once in total, and the API process runs none of them."""
    shared = [
        "--json",
        "--latency",
        "0",
        "--db",
        str(tmp_path / "orders.sqlite3"),
        "--outbox",
        str(tmp_path / "outbox"),
        "--redis",
        own_redis.url,
    ]
    sink: Sink = queue.Queue()
    # Debug level: the bus logs one handler.succeeded line per delivery.
    workers = [
        _spawn(
            children,
            f"worker-{n}",
            sink,
            "worker",
            *shared,
            "--log-level",
            "debug",
            "--workers",
            "4",
        )
        for n in (1, 2)
    ]
    port = free_port()
    api = _spawn(children, "api", None, "serve", *shared, "--port", str(port))
    try:
        for worker in workers:
            assert worker.expect_event("worker.started", LINE_DEADLINE)["taken_over"] == 0
        wait_until_listening(api, port)
        url = f"http://127.0.0.1:{port}"

        orders: dict[str, str] = {}  # event id -> order id, in the order they were placed
        for index in range(ORDERS):
            status, body = call(
                "POST",
                f"{url}/api/orders",
                json.dumps(order_body(index)).encode(),
                {"Content-Type": "application/json", "X-Request-ID": f"redis-{index + 1}"},
            )
            assert status == 201, body
            orders[body["event_id"]] = body["order"]["id"]
        first_order = next(iter(orders.values()))
        status, body = call("POST", f"{url}/api/orders/{first_order}/ship")
        assert status == 202, body
        shipped_event = body["event_id"]

        # In redis mode the API has no handler status: it says where the handlers are.
        status, event = call("GET", f"{url}/api/events/{shipped_event}")
        assert status == 200
        assert event["handlers"] == {}
        assert "worker" in event["note"]

        expected = len(orders) * len(CREATED_HANDLERS) + len(SHIPPED_HANDLERS)
        settled = _collect_settled(sink, expected)
        status, order = call("GET", f"{url}/api/orders/{first_order}")
        assert status == 200
        assert "worker" in order["note"]
    finally:
        codes = {p.name: p.terminate() for p in (api, *workers)}

    assert codes == {"api": 0, "worker-1": 0, "worker-2": 0}
    # Every (event, handler) settled exactly once in total across the two workers...
    assert {key: len(outcomes) for key, outcomes in settled.items() if len(outcomes) != 1} == {}
    per_event = Counter(event_id for event_id, _ in settled)
    assert {per_event[e] for e in orders} == {len(CREATED_HANDLERS)}
    assert per_event[shipped_event] == len(SHIPPED_HANDLERS)
    # ... and ended as expected: the fourth cart's unknown SKU is a (local) dead letter.
    unknown_sku = list(orders)[3]
    dead = {key for key, [(_, state)] in settled.items() if state == "dead"}
    assert dead == {(unknown_sku, RESERVE_INVENTORY)}
    # Nothing settled a second time (no redelivery) up to the workers' exit.
    logged = [
        line
        for worker in workers
        for line in worker.json_lines()
        if line["event"] in {"handler.succeeded", "handler.dead_lettered"}
    ]
    assert len(logged) == expected
    # The API process ran no handler.
    assert not any(line["event"].startswith("handler.") for line in api.json_lines())
    # The effects: one email per order (plus the shipment's), each file written once.
    emails = sorted(path.name for path in (tmp_path / "outbox").glob("*.eml"))
    assert emails == sorted(
        [f"{o}-confirmation.eml" for o in orders.values()] + [f"{first_order}-shipped.eml"]
    )
    sent = [
        line for worker in workers for line in worker.json_lines() if line["event"] == "email.sent"
    ]
    assert len(sent) == len(emails)
    # The request id travelled in the event's metadata into the workers' log lines.
    confirmations = {line["request_id"] for line in sent if line["kind"] == "confirmation"}
    assert confirmations == {f"redis-{i + 1}" for i in range(ORDERS)}
    for worker in workers:
        assert worker.json_lines()[-1]["event"] == "worker.stopped"
        assert worker.json_lines()[-1]["still_running"] is False
    # Competing consumers: how the work was shared (printed with -s; both may not get work
    # in a burst this small, so it is not asserted).
    shares = Counter(name for outcomes in settled.values() for name, _ in outcomes)
    print(f"deliveries per worker: {dict(shares)}")


def _published(url: str, stream: str) -> list[str]:
    """The event ids in *stream*, oldest first."""
    reader = redis.Redis.from_url(url, decode_responses=True)
    try:
        return [fields["id"] for _, fields in reader.xrange(stream)]
    finally:
        reader.close()


def _wait_published(url: str, stream: str, expected: list[str]) -> list[str]:
    """The stream's event ids once it holds *expected* many (a bounded poll of Redis: the
    relay publishes from a thread of the API's bus)."""
    deadline = time.monotonic() + LINE_DEADLINE
    pause = threading.Event()  # never set: an interruptible pause between looks
    published = _published(url, stream)
    while len(published) < len(expected) and time.monotonic() < deadline:
        pause.wait(0.02)
        published = _published(url, stream)
    return published


def test_orders_placed_while_redis_is_down_are_published_in_order_once_it_is_back(
    tmp_path: Path,
) -> None:
    """While Redis is stopped the API still answers 201 to a new order and 202 to a shipment
    (both committed with their events to its outbox), and /api/health says "degraded" with
    200; once Redis is back the relay publishes them, and the stream holds every event
    exactly once, in the order they were committed."""
    settings = Settings(
        db_path=tmp_path / "orders.sqlite3", outbox_dir=tmp_path / "outbox", latency=0.0
    )
    with RedisServer(persistent=True) as server:  # what Redis acknowledged survives the stop
        settings = dataclasses.replace(settings, redis_url=server.url)
        with build_app(settings) as app:
            client = create_app(app).test_client()
            assert client.get("/api/health").get_json() == {
                "status": "ok",
                "transport": "reachable",
            }
            first = client.post("/api/orders", json=order_body(0))
            assert first.status_code == 201
            committed = [first.get_json()["event_id"]]
            assert _wait_published(server.url, settings.redis_stream, committed) == committed

            server.stop()
            down = client.post("/api/orders", json=order_body(1))
            assert down.status_code == 201
            shipped = client.post(f"/api/orders/{first.get_json()['order']['id']}/ship")
            assert shipped.status_code == 202
            committed += [down.get_json()["event_id"], shipped.get_json()["event_id"]]
            assert app.repository.count() == 2
            health = client.get("/api/health")
            assert health.status_code == 200
            assert health.get_json()["status"] == "degraded"
            assert health.get_json()["transport"].startswith("unreachable: ")

            server.start()
            assert client.get("/api/health").get_json()["status"] == "ok"
            again = client.post("/api/orders", json=order_body(2))
            assert again.status_code == 201
            committed.append(again.get_json()["event_id"])
            published = _wait_published(server.url, settings.redis_stream, committed)
            assert app.bus.drain(timeout=LINE_DEADLINE)
            assert app.repository.count() == 3
        assert published == committed
        assert _published(server.url, settings.redis_stream) == committed  # none twice


def test_an_order_placed_while_redis_is_down_reaches_a_worker_once_redis_is_back(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    """With a worker consuming and Redis stopped, POST /api/orders still answers 201 and the
    order is saved; nothing reaches the worker during the outage; once Redis is started
    again (empty: no persistence), the API's relay publishes the event and the worker runs
    its handlers (the confirmation email, the audit entry)."""
    settings = Settings(
        db_path=tmp_path / "orders.sqlite3",
        outbox_dir=tmp_path / "outbox",
        latency=0.0,
        retry_wait=tenacity.wait_none(),
        max_workers=2,
        redis_url=own_redis.url,
    )
    arrived: queue.Queue[str] = queue.Queue()

    def order_arrived(event: Event) -> None:
        arrived.put(event.id)

    with build_worker(settings) as worker, build_app(settings) as api:
        worker.bus.subscribe("order:created", order_arrived)
        client = create_app(api).test_client()

        own_redis.stop()
        response = client.post("/api/orders", json=order_body(0))
        assert response.status_code == 201
        order_id, event_id = response.get_json()["order"]["id"], response.get_json()["event_id"]
        assert api.orders.get_order(order_id).status == "placed"
        # The outage: for half a second nothing can be published, so nothing arrives.
        with pytest.raises(queue.Empty):
            arrived.get(timeout=0.5)

        own_redis.start()
        assert arrived.get(timeout=LINE_DEADLINE) == event_id
        assert worker.bus.drain(timeout=LINE_DEADLINE)  # the event's other handlers too
        assert api.bus.drain(timeout=LINE_DEADLINE)  # the relay published it
        assert (settings.outbox_dir / f"{order_id}-confirmation.eml").is_file()
        assert [a.event_id for a in api.repository.audit_trail(order_id)] == [event_id]
    assert arrived.empty()  # handled once


def test_worker_with_redis_down_prints_one_line_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`worker --redis URL` with nothing listening there prints one error line on stderr,
    naming the URL, and exits 1; a URL that is not a Redis URL exits 2."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    files = ["--db", str(tmp_path / "orders.sqlite3"), "--outbox", str(tmp_path / "outbox")]
    assert main(["worker", "--redis", url, *files]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "-m examples.order_service worker: error: " in lines[0]
    assert "127.0.0.1" in lines[0]
    assert lines[0].endswith("(is redis-server running?)")

    assert main(["worker", "--redis", "http://localhost:6379", *files]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "not a Redis URL" in lines[0]
