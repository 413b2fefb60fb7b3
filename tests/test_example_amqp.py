"""The order service split into processes through a real RabbitMQ: an API in AMQP mode that
only publishes (each event committed with its order to its outbox, relayed to the topic
exchange) and a worker in AMQP mode that consumes the group's queue and runs the handlers.
One transport at a time: ``--amqp`` with ``--redis`` is refused, and a worker whose RabbitMQ
does not answer exits with one line.

Needs ``rabbitmq-server`` (Debian: ``apt-get install rabbitmq-server``); the tests that talk to
it are skipped without it, unless the ``CI`` environment variable is set, where a missing server
is a failure. Each test uses an exchange of its own on the session's server.
"""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest
import tenacity

from eventbus import Delivery, Event, EventBus
from eventbus.transports import RabbitMQTransport
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
from tests.support.children import Children, order_service
from tests.support.net import call, free_port, wait_until_listening

pytestmark = pytest.mark.integration

DEADLINE = 20.0  # seconds for an event to reach the worker, or its handlers to settle
CREATED_HANDLERS = {
    AUDIT_LOG,
    SEND_CONFIRMATION_EMAIL,
    RESERVE_INVENTORY,
    NOTIFY_WAREHOUSE,
    TRACK_ANALYTICS,
}
SHIPPED_HANDLERS = {AUDIT_LOG, SEND_SHIPPING_NOTIFICATION, UPDATE_ORDER_STATUS}


def _settings(tmp_path: Path, amqp_url: str) -> Settings:
    """AMQP mode on an exchange of the test's own, with instant fakes and retries."""
    return Settings(
        db_path=tmp_path / "orders.sqlite3",
        outbox_dir=tmp_path / "outbox",
        latency=0.0,
        retry_wait=tenacity.wait_none(),
        max_workers=2,
        amqp_url=amqp_url,
        amqp_exchange=f"orders-{uuid.uuid4().hex[:12]}",
    )


def _arrivals(worker_bus: EventBus) -> queue.Queue[str]:
    """The ids of the order events the worker receives, in the order they arrive."""
    arrived: queue.Queue[str] = queue.Queue()

    def order_event_arrived(event: Event) -> None:
        arrived.put(event.id)

    worker_bus.subscribe("order:*", order_event_arrived)
    return arrived


def _states(status: Mapping[str, Delivery] | None) -> dict[str, str]:
    """Each order handler's state in one event's status (``{}`` for an event the bus never
    had), the test's own subscriber left out."""
    if status is None:
        return {}
    return {
        handler: d.state for handler, d in status.items() if "order_event_arrived" not in handler
    }


def test_an_order_created_through_the_api_reaches_the_workers_handlers(
    tmp_path: Path, rabbitmq_url: str
) -> None:
    """The API's bus commits the order's event to its outbox and relays it to the exchange;
    the worker, consuming the group's queue, runs every handler of it: the confirmation email
    is written and the audit row recorded. A shipment goes the same way."""
    settings = _settings(tmp_path, rabbitmq_url)
    # The worker first: its start() declares the group's queue and binds it, so the API's
    # events are routed to it (what no queue is bound for waits in <exchange>.unrouted).
    with build_worker(settings) as worker, build_app(settings) as api:
        assert isinstance(worker.transport, RabbitMQTransport)
        assert worker.transport.queue == f"{settings.amqp_exchange}.order-service"
        assert worker.taken_over == 0
        arrived = _arrivals(worker.bus)
        client = create_app(api).test_client()
        assert client.get("/api/health").get_json() == {"status": "ok", "transport": "reachable"}

        created = client.post("/api/orders", json=order_body(0), headers={"X-Request-ID": "amqp-1"})
        assert created.status_code == 201
        order_id, event_id = created.get_json()["order"]["id"], created.get_json()["event_id"]
        assert arrived.get(timeout=DEADLINE) == event_id
        assert worker.bus.drain(timeout=DEADLINE)
        assert _states(worker.bus.status(event_id)) == dict.fromkeys(CREATED_HANDLERS, "succeeded")
        assert (settings.outbox_dir / f"{order_id}-confirmation.eml").is_file()
        assert [a.event_id for a in api.repository.audit_trail(order_id)] == [event_id]
        assert api.repository.audit_trail(order_id)[0].request_id == "amqp-1"

        shipped = client.post(f"/api/orders/{order_id}/ship")
        assert shipped.status_code == 202
        shipped_id = shipped.get_json()["event_id"]
        assert arrived.get(timeout=DEADLINE) == shipped_id
        assert worker.bus.drain(timeout=DEADLINE)
        assert _states(worker.bus.status(shipped_id)) == dict.fromkeys(
            SHIPPED_HANDLERS, "succeeded"
        )
        assert (settings.outbox_dir / f"{order_id}-shipped.eml").is_file()
        assert api.orders.get_order(order_id).status == "shipped"
        assert api.bus.drain(timeout=DEADLINE)  # the relay published both
    assert arrived.empty()  # each delivered once


@pytest.mark.multiprocess
def test_serve_amqp_publishes_to_an_in_process_worker(
    tmp_path: Path, rabbitmq_url: str, children: Children
) -> None:
    """`serve --amqp URL` (a real API process) relays each order's event to the exchange; an
    in-process worker in AMQP mode on the same exchange and database runs its handlers. The
    API's log names the broker without its password, and it runs no handler."""
    settings = _settings(tmp_path, rabbitmq_url)
    port = free_port()
    with build_worker(settings) as worker:
        arrived = _arrivals(worker.bus)
        api = children.start(
            order_service(
                "serve",
                "--json",
                "--latency",
                "0",
                "--db",
                str(settings.db_path),
                "--outbox",
                str(settings.outbox_dir),
                "--amqp",
                rabbitmq_url,
                "--exchange",
                settings.amqp_exchange,
                "--port",
                str(port),
            ),
            name="api",
            read="stderr",
            stdin=False,
        )
        try:
            started = api.expect_event("server.started", DEADLINE)
            wait_until_listening(api, port)
            url = f"http://127.0.0.1:{port}"
            status, body = call(
                "POST",
                f"{url}/api/orders",
                json.dumps(order_body(0)).encode(),
                {"Content-Type": "application/json", "X-Request-ID": "amqp-serve-1"},
            )
            assert status == 201, body
            order_id, event_id = body["order"]["id"], body["event_id"]
            assert arrived.get(timeout=DEADLINE) == event_id
            assert worker.bus.drain(timeout=DEADLINE)
            status, health = call("GET", f"{url}/api/health")
            assert (status, health) == (200, {"status": "ok", "transport": "reachable"})
        finally:
            code = api.terminate()
    assert code == 0
    assert started["handlers"] == 0
    assert "guest:***@" in started["amqp"]
    assert "guest:guest" not in "\n".join(api.lines)
    assert (settings.outbox_dir / f"{order_id}-confirmation.eml").is_file()
    assert not any(line["event"].startswith("handler.") for line in api.json_lines())
    assert api.json_lines()[-1]["event"] == "server.stopped"


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "-m examples.order_service " in lines[0]
    assert ": error: " in lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_amqp_and_redis_together_are_refused_with_one_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--amqp` with `--redis` exits 2 with one line naming both, before anything is built."""
    argv = [
        command,
        "--redis",
        "redis://localhost:6379/0",
        "--amqp",
        "amqp://guest:guest@localhost:5672/",
        "--db",
        str(tmp_path / "orders.sqlite3"),
    ]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "--redis and --amqp" in line
    assert not (tmp_path / "orders.sqlite3").exists()


def test_worker_amqp_usage_errors_and_a_broker_that_does_not_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker needs one transport (2), an AMQP URL for --amqp (2), and `serve --amqp` keeps
    its outbox in the store (--no-store: 2); a worker whose RabbitMQ does not answer prints one
    line naming it, without the password, and exits 1."""
    files = ["--db", str(tmp_path / "orders.sqlite3"), "--outbox", str(tmp_path / "outbox")]
    assert main(["worker", *files]) == 2
    assert "pass --redis URL or --amqp URL" in _one_error_line(capsys)

    assert main(["worker", "--amqp", "redis://localhost:6379/0", *files]) == 2
    assert "not an AMQP URL" in _one_error_line(capsys)

    amqp = "amqp://guest:secret@localhost:5672/"
    assert main(["serve", "--amqp", amqp, "--no-store", *files]) == 2
    assert "--no-store: with --amqp" in _one_error_line(capsys)

    nobody = f"amqp://guest:secret@127.0.0.1:{free_port()}/"
    assert main(["worker", "--amqp", nobody, *files]) == 1
    line = _one_error_line(capsys)
    assert "127.0.0.1" in line
    assert "secret" not in line
    assert line.endswith("(is rabbitmq-server running?)")
