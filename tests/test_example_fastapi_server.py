"""The FastAPI example as a real uvicorn process, spoken to over real HTTP."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from examples.fastapi_orders.handlers import HANDLERS, RESERVE_INVENTORY
from tests.support.children import ChildProcess, Children
from tests.support.http import poll_json
from tests.support.net import free_port, wait_until_listening

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess]

ADA = {"email": "ada@example.com", "items": [{"sku": "KB-101", "quantity": 1, "price": "89.90"}]}
#: The monitor is sold out: its reservation ends as a dead letter.
GRACE = {"email": "grace@example.com", "items": [{"sku": "MN-303", "quantity": 1, "price": 299}]}


@dataclass
class Server:
    """A running ``python -m examples.fastapi_orders`` (its JSON log lines read from stderr)
    and a client for it."""

    child: ChildProcess
    client: httpx.Client

    def settled(self, status_url: str) -> dict[str, Any]:
        """Poll the order until every delivery of its event succeeded or is a dead letter."""
        body: dict[str, Any] = poll_json(
            self.client, status_url, lambda body: body["settled"], child=self.child
        )
        return body

    def stop(self, signum: int) -> tuple[int, list[dict[str, Any]]]:
        """Send *signum*, wait for the exit, and return the exit code and JSON log lines."""
        self.child.send_signal(signum)
        returncode = self.child.wait(15)
        return returncode, self.child.json_lines()


@pytest.fixture
def server(children: Children) -> Iterator[Server]:
    """The example on a free port with JSON logs; killed at the end if it still runs."""
    port = free_port()
    argv = [sys.executable, "-m", "examples.fastapi_orders", "--port", str(port), "--json"]
    child = children.start(argv, name="fastapi", read="stderr", stdin=False)
    wait_until_listening(child, port)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield Server(child, client)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_server_runs_the_handlers_replays_and_shuts_down_cleanly(
    server: Server, signum: int
) -> None:
    """Over real HTTP: an order's handlers all succeed; a sold-out order's reservation is
    listed as a dead letter and, once restocked, replayed to success; bad input is 422; the
    signal closes the bus, logs the shutdown and exits 0."""
    client = server.client
    response = client.post("/orders", json=ADA, headers={"X-Request-ID": "e2e-1"})
    assert response.status_code == 201
    ada = response.json()
    body = server.settled(ada["status_url"])
    assert body["deliveries"] == {
        name: {"state": "succeeded", "attempts": 1, "error": None} for name in HANDLERS
    }

    grace = client.post("/orders", json=GRACE).json()
    body = server.settled(grace["status_url"])
    assert body["deliveries"][RESERVE_INVENTORY]["state"] == "dead"
    [dead] = client.get("/dead-letters").json()["dead_letters"]
    assert (dead["handler"], dead["event_id"]) == (RESERVE_INVENTORY, grace["event_id"])
    assert (dead["attempts"], dead["reason"]) == (2, "exhausted")

    assert client.post("/inventory/MN-303/restock", json={"quantity": 1}).status_code == 200
    assert client.post(f"/dead-letters/{dead['id']}/replay").status_code == 202
    body = server.settled(grace["status_url"])
    assert body["deliveries"][RESERVE_INVENTORY]["state"] == "succeeded"
    assert client.get("/dead-letters").json() == {"dead_letters": []}
    assert client.post(f"/dead-letters/{dead['id']}/replay").status_code == 404
    assert client.post("/orders", json={"email": "x"}).status_code == 422

    returncode, logs = server.stop(signum)
    assert returncode == 0, server.child.output()
    events = [line["event"] for line in logs]
    assert events[-1] == "server.stopped"
    assert logs[-1]["signal"] == signal.Signals(signum).name
    assert events.index("app.stopping") < events.index("bus.closed") < events.index("app.stopped")
    stopped = logs[events.index("app.stopped")]
    assert (stopped["dead_letters"], stopped["abandoned"]) == (0, 0)
    # The handlers' lines carry the request id of the POST that emitted their event.
    ada_lines = [line for line in logs if line.get("order_id") == ada["order_id"]]
    assert {line["event"] for line in ada_lines} == {
        "email.sent",
        "analytics.recorded",
        "inventory.reserved",
    }
    assert {line["request_id"] for line in ada_lines} == {"e2e-1"}
