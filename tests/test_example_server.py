"""The order-service HTTP API as a real server process, spoken to over real HTTP."""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from examples.order_service.handlers import (
    AUDIT_LOG,
    NOTIFY_WAREHOUSE,
    RESERVE_INVENTORY,
    SEND_CONFIRMATION_EMAIL,
    TRACK_ANALYTICS,
)
from tests.support.children import ChildProcess, Children, order_service
from tests.support.net import call, free_port, wait_until_listening

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess]

CREATED_HANDLERS = {
    AUDIT_LOG,
    SEND_CONFIRMATION_EMAIL,
    RESERVE_INVENTORY,
    NOTIFY_WAREHOUSE,
    TRACK_ANALYTICS,
}


@dataclass
class Server:
    """A running ``serve`` process (its JSON log lines read from stderr) and where to reach
    it."""

    child: ChildProcess
    base_url: str
    outbox: Path

    def stop(self, signum: int) -> tuple[int, list[dict[str, Any]]]:
        """Send *signum*, wait for the exit, and return the exit code and JSON log lines."""
        self.child.send_signal(signum)
        returncode = self.child.wait(15)
        return returncode, self.child.json_lines()


@pytest.fixture
def server(tmp_path: Path, children: Children) -> Server:
    """``python -m examples.order_service serve`` on a free port with JSON logs; killed at
    the end if it still runs."""
    port = free_port()
    outbox = tmp_path / "outbox"
    args = ["serve", "--port", str(port), "--json", "--latency", "0"]
    args += ["--db", str(tmp_path / "orders.sqlite3"), "--outbox", str(outbox)]
    child = children.start(order_service(*args), name="serve", read="stderr", stdin=False)
    wait_until_listening(child, port)
    return Server(child, f"http://127.0.0.1:{port}", outbox)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_server_serves_the_api_and_shuts_down_cleanly(server: Server, signum: int) -> None:
    """A real server creates an order (201), reports its handlers, rejects bad requests, and
    on SIGTERM/SIGINT closes the bus, finishing the handlers, and logs what was left."""
    assert call("GET", f"{server.base_url}/api/health") == (200, {"status": "ok"})
    order = json.dumps({"email": "ada@example.com", "items": [{"sku": "KB-101", "quantity": 1}]})
    json_headers = {"Content-Type": "application/json", "X-Request-ID": "e2e-1"}
    status, created = call("POST", f"{server.base_url}/api/orders", order.encode(), json_headers)
    assert status == 201
    order_id = created["order"]["id"]

    status, event = call("GET", server.base_url + created["status_url"])
    assert status == 200
    assert set(event["handlers"]) == CREATED_HANDLERS
    assert call("POST", f"{server.base_url}/api/orders", b"{oops", json_headers)[0] == 400
    assert call("POST", f"{server.base_url}/api/orders/ord_missing/ship")[0] == 404
    assert call("GET", f"{server.base_url}/api/events/unknown")[0] == 404
    assert call("GET", f"{server.base_url}/api/dead-letters") == (200, {"dead_letters": []})

    returncode, logs = server.stop(signum)
    assert returncode == 0
    events = [line["event"] for line in logs]
    assert events[-1] == "server.stopped"
    stopped = logs[-1]
    assert stopped["signal"] == signal.Signals(signum).name
    assert (stopped["abandoned"], stopped["dead_letters"], stopped["still_running"]) == (
        0,
        0,
        False,
    )
    assert "bus.closed" in events
    # The handlers finished before the exit, and their lines carry the request's id.
    assert (server.outbox / f"{order_id}-confirmation.eml").is_file()
    handler_lines = [line for line in logs if line["event"] in {"email.sent", "inventory.reserved"}]
    assert len(handler_lines) == 2
    assert {line["request_id"] for line in handler_lines} == {"e2e-1"}
