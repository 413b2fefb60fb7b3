"""The order-service HTTP API as a real server process, spoken to over real HTTP."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
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

ROOT = Path(__file__).resolve().parents[1]
STARTUP_DEADLINE = 15.0  # seconds for the process to import Flask and listen
CREATED_HANDLERS = {
    AUDIT_LOG,
    SEND_CONFIRMATION_EMAIL,
    RESERVE_INVENTORY,
    NOTIFY_WAREHOUSE,
    TRACK_ANALYTICS,
}


@dataclass
class Server:
    """A running ``serve`` process and where to reach it."""

    process: subprocess.Popen[str]
    base_url: str
    outbox: Path

    def stop(self, signum: int) -> tuple[int, list[dict[str, Any]]]:
        """Send *signum*, wait for the exit, and return the exit code and JSON log lines."""
        self.process.send_signal(signum)
        _, stderr = self.process.communicate(timeout=15)
        lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
        return self.process.returncode, lines


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_listening(process: subprocess.Popen[str], port: int) -> None:
    """Try to connect until the server accepts, the process dies, or the deadline passes.

    Between attempts the loop waits on the process itself (briefly), which also notices a
    server that exited instead of starting.
    """
    deadline = time.monotonic() + STARTUP_DEADLINE
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        try:
            process.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        _, stderr = process.communicate()
        raise AssertionError(f"the server exited with {process.returncode}:\n{stderr}")
    raise AssertionError(f"the server did not listen on port {port} within {STARTUP_DEADLINE} s")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """``python -m examples.order_service serve`` on a free port with JSON logs."""
    port = free_port()
    outbox = tmp_path / "outbox"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "examples.order_service",
            "serve",
            "--port",
            str(port),
            "--json",
            "--latency",
            "0",
            "--db",
            str(tmp_path / "orders.sqlite3"),
            "--outbox",
            str(outbox),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_listening(process, port)
        yield Server(process, f"http://127.0.0.1:{port}", outbox)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=15)


def call(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """One HTTP request; returns the status and the decoded JSON body, errors included."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


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
