"""The order service is durable: a server killed with SIGKILL mid-burst is restarted, and every
order's handlers end succeeded or as dead letters. Also: an order and its event are committed
together or not at all (the event store is the orders database), an event committed by a
process that died before running it is run at the next start, the events survive the store's
JSON codec, and the ``burst`` and ``check`` helpers fail with one clear line and an exit status
instead of a traceback."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
import tenacity

from eventbus import Event, UnknownEventError
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
from examples.order_service.wiring import OrderApp, Settings, build_app
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
    events_path = tmp_path / "orders.sqlite3"  # the event store is the orders database
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
    # Every event was committed with its order, before its 201. The deliveries left open are
    # queued again, except one killed during its last allowed attempt (e.g. the
    # single-attempt analytics call), which becomes a dead letter at once.
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


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        db_path=tmp_path / "orders.sqlite3",
        outbox_dir=tmp_path / "outbox",
        latency=0.0,
        retry_wait=tenacity.wait_none(),
    )


MONITOR = {"email": "grace@example.com", "items": [{"sku": "MN-303", "quantity": 1}]}


def test_an_order_and_its_event_are_committed_together_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order's row and its event are written in one transaction: when something raises
    after the emit, before the commit, neither the order (or its shipment) nor the event nor
    any delivery exists, and no handler runs; without the failure both are committed."""
    settings = _settings(tmp_path)
    with build_app(settings) as app:
        kept = app.orders.create_order(MONITOR)
        emit = app.bus.emit
        emitted: list[Event] = []

        def emit_then_fail(*args: Any, **kwargs: Any) -> Event:
            event = emit(*args, **kwargs)  # written through the transaction's connection
            emitted.append(event)
            raise RuntimeError("failed after the emit, before the commit")

        monkeypatch.setattr(app.bus, "emit", emit_then_fail)
        with pytest.raises(RuntimeError, match="before the commit"):
            app.orders.create_order(MONITOR)
        with pytest.raises(RuntimeError, match="before the commit"):
            app.orders.ship_order(kept.order.id)
        monkeypatch.undo()
        assert app.bus.drain(timeout=10)  # claims whatever was committed, and runs it

        lost_created, lost_shipped = emitted
        assert isinstance(lost_shipped.payload, OrderShipped)
        assert lost_shipped.payload.order_id == kept.order.id
        lost_order = lost_created.payload.order_id
        assert app.repository.get(lost_order) is None
        assert app.repository.count() == 1
        shipped_not = app.orders.get_order(kept.order.id)
        assert (shipped_not.status, shipped_not.tracking_number) == ("placed", None)
        for event in emitted:
            with pytest.raises(UnknownEventError):
                app.bus.status(event.id)
        assert app.repository.audit_trail(lost_order) == []
        assert not (settings.outbox_dir / f"{lost_order}-confirmation.eml").exists()
        assert not (settings.outbox_dir / f"{kept.order.id}-shipped.eml").exists()

        # The order that was committed has its event, and its handlers ran after the commit.
        assert set(app.bus.status(kept.event.id)) == CREATED_HANDLERS
        assert {d.state for d in app.bus.status(kept.event.id).values()} == {"succeeded"}
        assert [a.event_id for a in app.repository.audit_trail(kept.order.id)] == [kept.event.id]
    with sqlite3.connect(settings.db_path) as db:  # one file: the orders and the events
        assert db.execute("SELECT id FROM events").fetchall() == [(kept.event.id,)]
        assert db.execute("SELECT count(*) FROM deliveries").fetchone() == (len(CREATED_HANDLERS),)
    db.close()


def test_an_event_committed_before_a_crash_runs_at_the_next_start(tmp_path: Path) -> None:
    """A process that died right after committing an order leaves the order, its event and the
    event's deliveries in the database, owned by no bus; the next start's recover() runs them,
    once: a second start finds nothing to do."""
    settings = _settings(tmp_path)
    order = Order(
        id="ord_committed",
        customer_email="ada@example.com",
        items=(LineItem("KB-101", 1),),
        status="placed",
        created_at=datetime.now(UTC),
    )
    event = Event(
        name="order:created",
        payload=OrderCreated(
            order_id=order.id, customer_email=order.customer_email, items=[*order.items]
        ),
    )
    # What create_order commits, written as the process that died did: no bus ever claimed it.
    store = SQLiteStore(settings.db_path)
    repository = SqliteOrderRepository(settings.db_path)
    with repository.transaction() as connection:
        repository.add(order)
        store.add_within(connection, event, sorted(CREATED_HANDLERS))
    repository.close()
    store.close()

    assert _recovered_at_start(settings, check=lambda app: None) == len(CREATED_HANDLERS)

    def handled(app: OrderApp) -> None:
        deliveries = app.bus.status(event.id)
        assert {name: d.state for name, d in deliveries.items()} == dict.fromkeys(
            CREATED_HANDLERS, "succeeded"
        )
        assert [a.event_id for a in app.repository.audit_trail(order.id)] == [event.id]

    assert _recovered_at_start(settings, check=handled) == 0  # nothing run twice
    assert (settings.outbox_dir / f"{order.id}-confirmation.eml").is_file()


def _recovered_at_start(settings: Settings, check: Callable[[OrderApp], None]) -> int:
    """Start the app, let it finish what it recovered, run *check*, close it; return the
    ``recovered`` count its ``app.recovered`` line logged."""
    with structlog.testing.capture_logs() as logs, build_app(settings) as app:
        assert app.bus.drain(timeout=10)
        check(app)
    (recovered,) = [line for line in logs if line["event"] == "app.recovered"]
    assert recovered["events"] == str(settings.db_path)
    count: int = recovered["recovered"]
    return count


def test_the_event_store_is_the_orders_database(tmp_path: Path) -> None:
    """By default the store's tables live in the orders database; durable=False runs without
    one (deliveries in memory, retries abandoned at close as before), and an in-memory
    database cannot hold a store another connection shares."""
    assert Settings(db_path=tmp_path / "o.sqlite3").store_path() == tmp_path / "o.sqlite3"
    assert Settings(db_path=":memory:", durable=False).store_path() is None
    with pytest.raises(ValueError, match="needs a database file"):
        Settings(db_path=":memory:").store_path()
    for durable in (True, False):
        db = tmp_path / f"durable-{durable}.sqlite3"
        settings = Settings(db_path=db, outbox_dir=tmp_path / "outbox", durable=durable)
        with build_app(settings) as app:
            assert app.events_path == (db if durable else None)
            app.orders.create_order(
                {"email": "a@example.com", "items": [{"sku": "KB-101", "quantity": 1}]}
            )
            assert app.bus.drain(timeout=10)
        with sqlite3.connect(db) as conn:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        conn.close()
        assert {"orders", "audit_log"} <= tables
        assert ("events" in tables) is durable
    assert list(tmp_path.glob("events*")) == []


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
