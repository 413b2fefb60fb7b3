"""The order service is durable: a server killed with SIGKILL mid-burst is restarted, and every
order's handlers end succeeded or as dead letters. Also: the events survive the store's JSON
codec, orders saved without their event get it at the next start, and the ``burst`` and
``check`` helpers fail with one clear line and an exit status instead of a traceback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
import tenacity

from eventbus.codec import JsonCodec
from eventbus.stores import SQLiteStore
from examples.order_service.__main__ import main
from examples.order_service.burst import BurstOrder, order_body, place_burst, save_burst
from examples.order_service.domain import LineItem, Order, OrderCreated, OrderShipped
from examples.order_service.handlers import (
    AUDIT_LOG,
    NOTIFY_WAREHOUSE,
    RESERVE_INVENTORY,
    SEND_CONFIRMATION_EMAIL,
    TRACK_ANALYTICS,
)
from examples.order_service.repository import SqliteOrderRepository
from examples.order_service.wiring import Settings, build_app
from tests.support.children import ChildProcess, Children, order_service
from tests.support.net import call, free_port, wait_until_listening

ROOT = Path(__file__).resolve().parents[1]
CREATED_HANDLERS = {
    AUDIT_LOG,
    SEND_CONFIRMATION_EMAIL,
    RESERVE_INVENTORY,
    NOTIFY_WAREHOUSE,
    TRACK_ANALYTICS,
}
BURST = 10  # orders; every fourth of the burst's carts asks for the unknown SKU ZZ-999
LINE_DEADLINE = 20.0  # seconds for an expected log line to appear
SETTLE_DEADLINE = 30.0  # seconds for the restarted server to settle everything
OPEN_STATES = {"pending", "running", "retrying"}


@dataclass
class ServerProcess:
    """A ``serve`` process whose JSON log lines (stderr) are read as they come."""

    child: ChildProcess
    url: str

    def wait_for(self, event: str) -> dict[str, Any]:
        """The next log line whose ``event`` is *event* (earlier lines are skipped)."""
        return self.child.expect_event(event, LINE_DEADLINE)


@pytest.fixture
def start_server(tmp_path: Path, children: Children) -> Any:
    """Start ``serve`` processes on one database, event store and outbox; killed at the end."""

    def start(latency: float) -> ServerProcess:
        port = free_port()
        args = ["serve", "--json", "--port", str(port), "--latency", str(latency)]
        args += ["--db", str(tmp_path / "orders.sqlite3"), "--outbox", str(tmp_path / "outbox")]
        child = children.start(
            order_service(*args), name=f"serve-{port}", read="stderr", stdin=False
        )
        wait_until_listening(child, port)
        return ServerProcess(child, f"http://127.0.0.1:{port}")

    return start


@pytest.mark.integration
@pytest.mark.multiprocess
def test_a_server_killed_mid_burst_finishes_every_order_after_a_restart(
    tmp_path: Path, start_server: Any
) -> None:
    """SIGKILL while the slow handlers of a burst run; the restarted server recovers the
    unfinished deliveries, and every order's handlers end succeeded or as a dead letter, which
    ``python -m eventbus dead-letters list`` shows."""
    events_path = tmp_path / "events.sqlite3"  # the default: beside the orders database
    first = start_server(latency=5.0)  # handlers take 0.1 to 1 s each
    assert first.wait_for("app.recovered")["recovered"] == 0
    orders = place_burst(first.url, BURST)
    first.wait_for("email.sent")  # handlers are done for some orders, not for most
    first.child.send_signal(signal.SIGKILL)
    assert first.child.wait(15) == -signal.SIGKILL

    before = _states(events_path, orders)
    unfinished = sum(state in OPEN_STATES for state in before.values())
    assert unfinished > 0, "the kill came too late to interrupt anything"

    second = start_server(latency=0.0)
    recovered = second.wait_for("app.recovered")
    # Every event was stored before its 201, so nothing needs emitting again; the deliveries
    # left open are queued again, except one killed during its last allowed attempt (e.g. the
    # single-attempt analytics call), which becomes a dead letter at once.
    assert recovered["resent"] == 0
    assert 0 < recovered["recovered"] <= unfinished

    burst_file = tmp_path / "burst.json"
    save_burst(burst_file, orders)
    checked = _run(
        "examples.order_service",
        "check",
        "--events",
        str(events_path),
        "--burst",
        str(burst_file),
        "--wait",
        str(SETTLE_DEADLINE),
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{BURST} orders, {BURST * 5} deliveries" in checked.stdout
    assert "(all settled)" in checked.stdout

    after = _states(events_path, orders)
    assert set(after.values()) <= {"succeeded", "dead"}
    dead = {key for key, state in after.items() if state == "dead"}
    unknown_sku = {
        (o.event_id, RESERVE_INVENTORY)
        for i, o in enumerate(orders)
        if order_body(i)["items"][0]["sku"] == "ZZ-999"
    }
    assert unknown_sku
    assert unknown_sku <= dead

    listed = _run("eventbus", "dead-letters", "list", "--json", "--store", str(events_path))
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert {(d["event"]["id"], d["handler"]) for d in letters} == dead
    for letter in letters:
        key = (letter["event"]["id"], letter["handler"])
        if key not in unknown_sku:  # the only other way to die here: killed on its last try
            assert letter["error"].startswith("ProcessLost"), letter
    status, body = call("GET", f"{second.url}/api/dead-letters")
    assert status == 200
    assert {d["id"] for d in body["dead_letters"]} == {d["id"] for d in letters}

    second.child.send_signal(signal.SIGTERM)
    assert second.child.wait(15) == 0
    stopped = second.wait_for("bus.closed")
    assert stopped["left_in_store"] == 0


def test_order_events_survive_the_store_codec() -> None:
    """OrderCreated and OrderShipped come back from JSON equal, LineItems included."""
    codec = JsonCodec()
    created = OrderCreated(
        order_id="ord_1", customer_email="a@example.com", items=[LineItem("KB-101", 2)]
    )
    shipped = OrderShipped(order_id="ord_1", customer_email="a@example.com", tracking_number="T1")
    for event in (created, shipped):
        assert codec.decode(*codec.encode(event)) == event


def test_an_order_saved_without_its_event_gets_it_at_the_next_start(tmp_path: Path) -> None:
    """An order the last process saved but did not emit (it died in between) is emitted at
    startup, once: the idempotency key keeps a second start from emitting it again."""
    settings = Settings(
        db_path=tmp_path / "orders.sqlite3",
        outbox_dir=tmp_path / "outbox",
        latency=0.0,
        retry_wait=tenacity.wait_none(),
    )
    repository = SqliteOrderRepository(settings.db_path)
    order = Order(
        id="ord_saved_only",
        customer_email="ada@example.com",
        items=(LineItem("KB-101", 1),),
        status="placed",
        created_at=datetime.now(UTC),
    )
    repository.add(order)
    repository.close()

    with structlog.testing.capture_logs() as logs, build_app(settings) as app:
        assert app.bus.drain(timeout=10)
        trail = app.repository.audit_trail(order.id)
    assert [entry.event_name for entry in trail] == ["order:created"]
    (recovered,) = [line for line in logs if line["event"] == "app.recovered"]
    assert (recovered["recovered"], recovered["resent"]) == (0, 1)
    assert (settings.outbox_dir / f"{order.id}-confirmation.eml").is_file()

    with structlog.testing.capture_logs() as logs, build_app(settings) as app:
        assert app.bus.drain(timeout=10)
        assert app.bus.status(trail[0].event_id)[RESERVE_INVENTORY].state == "succeeded"
    (recovered,) = [line for line in logs if line["event"] == "app.recovered"]
    assert (recovered["recovered"], recovered["resent"]) == (0, 0)


def test_settings_put_the_event_store_beside_the_orders(tmp_path: Path) -> None:
    """By default the store is events.sqlite3 beside the orders database; durable=False
    runs without one (deliveries in memory, retries abandoned at close as before)."""
    assert Settings(db_path=tmp_path / "o.sqlite3").events_file() == tmp_path / "events.sqlite3"
    assert Settings(db_path=":memory:").events_file() == ":memory:"
    assert Settings(events_path=tmp_path / "e.db").events_file() == tmp_path / "e.db"
    settings = Settings(
        db_path=tmp_path / "orders.sqlite3", outbox_dir=tmp_path / "outbox", durable=False
    )
    assert settings.events_file() is None
    with build_app(settings) as app:
        assert app.events_path is None
        app.orders.create_order(
            {"email": "a@example.com", "items": [{"sku": "KB-101", "quantity": 1}]}
        )
        assert app.bus.drain(timeout=10)
    assert not (tmp_path / "events.sqlite3").exists()


def _states(events_path: Path, orders: list[BurstOrder]) -> dict[tuple[str, str], str]:
    """(event id, handler) -> state, read from the store file (no bus opens it)."""
    store = SQLiteStore(events_path)
    try:
        states: dict[tuple[str, str], str] = {}
        for order in orders:
            deliveries = store.status(order.event_id)
            assert deliveries is not None, f"{order.event_id} is not in the store"
            assert set(deliveries) == CREATED_HANDLERS
            states.update({(order.event_id, h): d.state for h, d in deliveries.items()})
        return states
    finally:
        store.close()


def _run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SETTLE_DEADLINE + 30,
        check=False,
    )


def _one_error_line(stderr: str, command: str) -> str:
    """The single line a failing command printed on stderr, checked to be no traceback."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert f"-m examples.order_service {command}: error: " in lines[0]
    return lines[0]


def test_burst_at_a_stopped_server_prints_one_line_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`burst` against a URL where no server listens prints one error line on stderr that
    names the URL and suggests starting `serve`, and exits 1."""
    url = f"http://127.0.0.1:{free_port()}"
    status = main(["burst", "--url", url, "--orders", "2", "--save", str(tmp_path / "b.json")])
    assert status == 1
    line = _one_error_line(capsys.readouterr().err, "burst")
    assert f"cannot reach the server at {url}" in line
    assert "serve" in line
    assert not (tmp_path / "b.json").exists()


def test_check_without_a_burst_file_or_event_store_prints_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` without the file `burst` saves, or with it but no event store, prints one
    error line saying what to run or pass, and exits 2 (a usage problem)."""
    burst_file = tmp_path / "burst.json"
    events = tmp_path / "events.sqlite3"
    args = ["check", "--burst", str(burst_file), "--events", str(events)]
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err, "check")
    assert f"no burst file at {burst_file}" in line
    assert "run `burst` first" in line

    burst_file.write_text("{not json")
    assert main(args) == 2
    assert "is not a file `burst` saved" in _one_error_line(capsys.readouterr().err, "check")

    save_burst(burst_file, [BurstOrder("ord_1", "event-1")])
    assert main(args) == 2
    line = _one_error_line(capsys.readouterr().err, "check")
    assert f"no event store at {events}" in line
