"""The dashboard against the order-service example's own store: the demo's database (orders,
audit trail and events in one SQLite file) after a real demo run, through Flask's test client
and through `python -m eventbus dashboard` as a real process."""

from __future__ import annotations

import dataclasses
import io
import re
import sys
import urllib.request
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from eventbus.dashboard import create_app
from eventbus.stores import SQLiteStore
from examples.order_service.demo import DemoResult, demo_settings, run_demo
from examples.order_service.handlers import (
    AUDIT_LOG,
    NOTIFY_WAREHOUSE,
    RESERVE_INVENTORY,
    SEND_CONFIRMATION_EMAIL,
    SEND_SHIPPING_NOTIFICATION,
    TRACK_ANALYTICS,
    UPDATE_ORDER_STATUS,
)
from examples.order_service.wiring import Settings, build_app
from tests.support.children import Children
from tests.support.dashboard import page, token
from tests.support.net import free_port, wait_until_listening

#: handler -> (succeeded, dead) deliveries after the demo, as its story goes.
AFTER_DEMO = {
    AUDIT_LOG: (6, 0),
    SEND_CONFIRMATION_EMAIL: (4, 0),
    RESERVE_INVENTORY: (3, 1),
    NOTIFY_WAREHOUSE: (3, 1),
    TRACK_ANALYTICS: (4, 0),
    SEND_SHIPPING_NOTIFICATION: (2, 0),
    UPDATE_ORDER_STATUS: (2, 0),
}


@pytest.fixture
def demo(tmp_path: Path) -> tuple[Settings, DemoResult]:
    """The demo run once into a database of its own; the app is closed again."""
    settings = demo_settings(
        db_path=tmp_path / "demo.sqlite3", outbox_dir=tmp_path / "outbox", latency=0, backoff=0
    )
    with build_app(settings) as app:
        result = run_demo(app, io.StringIO())
    assert result.drained
    return settings, result


@pytest.fixture
def client(demo: tuple[Settings, DemoResult]) -> FlaskClient:
    """The dashboard of the demo's database, opened by path as the command does."""
    settings, _ = demo
    return create_app(settings.db_path).test_client()


def totals(html: str) -> dict[str, tuple[int, int]]:
    """handler -> (succeeded, dead) in total, from the overview's table (per handler: pending,
    running, retrying, succeeded, dead in the last hour, then the same in total)."""
    found = {}
    for row in re.finditer(r"<tr>\s*<td><a href=\"/events\?handler=(\w+)\">.*?</tr>", html, re.S):
        numbers = re.findall(r"<td class=\"n [a-z]+\">\s*(?:<a[^>]*>)?(\d+)", row.group(0))
        assert len(numbers) == 10, row.group(0)
        found[row.group(1)] = (int(numbers[8]), int(numbers[9]))
    return found


def letter_of(client: FlaskClient, handler: str) -> str:
    """The id of *handler*'s one dead letter, as the dead-letter page links it."""
    html = page(client, f"/dead-letters?handler={handler}")
    ids = re.findall(r'href="/dead-letters/([0-9a-f]+)"', html)
    assert len(ids) == 1, html
    return ids[0]


def test_overview_counts_every_handler_of_the_demo(client: FlaskClient) -> None:
    assert totals(page(client, "/")) == AFTER_DEMO


def test_every_event_of_the_demo_is_listed(
    client: FlaskClient, demo: tuple[Settings, DemoResult]
) -> None:
    _, result = demo
    listed = re.findall(r'href="/events/([0-9a-f]+)"', page(client, "/events"))
    assert sorted(set(listed)) == sorted(result.event_ids)
    shipped = re.findall(r'href="/events/([0-9a-f]+)"', page(client, "/events?name=order:shipped"))
    assert len(set(shipped)) == 2


def test_search_by_an_event_id_finds_the_event(
    client: FlaskClient, demo: tuple[Settings, DemoResult]
) -> None:
    _, result = demo
    event_id = result.event_ids[0]
    html = page(client, f"/events?id={event_id}")
    assert set(re.findall(r'href="/events/([0-9a-f]+)"', html)) == {event_id}


def test_dead_letters_are_the_demos_two(client: FlaskClient) -> None:
    warehouse = page(client, f"/dead-letters/{letter_of(client, NOTIFY_WAREHOUSE)}")
    assert "exhausted" in warehouse
    assert "WarehouseUnavailableError: warehouse API answered 503 Service Unavailable" in warehouse
    assert "Traceback (most recent call last)" in warehouse
    inventory = page(client, f"/dead-letters/{letter_of(client, RESERVE_INVENTORY)}")
    assert "not_retryable" in inventory
    assert "UnknownSkuError: SKU &#39;ZZ-999&#39; is not in the catalog" in inventory


def test_event_page_shows_every_delivery_of_margarets_order(
    client: FlaskClient, demo: tuple[Settings, DemoResult]
) -> None:
    """Margaret's order:created went to five handlers; the warehouse one is dead after 3
    attempts, with its traceback."""
    _, result = demo
    letter = page(client, f"/dead-letters/{letter_of(client, NOTIFY_WAREHOUSE)}")
    event_id = next(i for i in result.event_ids if f'href="/events/{i}"' in letter)
    html = page(client, f"/events/{event_id}")
    assert f'{NOTIFY_WAREHOUSE}</td><td class="dead">dead' in html
    for handler in (AUDIT_LOG, SEND_CONFIRMATION_EMAIL, RESERVE_INVENTORY, TRACK_ANALYTICS):
        assert f'{handler}</td><td class="succeeded">succeeded' in html
    assert "Traceback (most recent call last)" in html
    assert result.order_of[event_id] in html  # the payload, redacted only where it must be


def test_a_dead_letter_replayed_from_the_dashboard_succeeds_at_the_next_start(
    demo: tuple[Settings, DemoResult], client: FlaskClient
) -> None:
    """The warehouse is up again in a new process: the replayed notification succeeds once the
    service starts and recovers it, and the dashboard shows it."""
    settings, _ = demo
    letter = letter_of(client, NOTIFY_WAREHOUSE)
    response = client.post("/actions/replay", data={"csrf_token": token(client), "id": letter})
    assert response.status_code == 303
    assert totals(page(client, "/"))[NOTIFY_WAREHOUSE] == (3, 0)

    with build_app(dataclasses.replace(settings, recover=True)) as app:
        assert app.bus.drain(timeout=30)

    assert totals(page(client, "/")) == {**AFTER_DEMO, NOTIFY_WAREHOUSE: (4, 0)}
    store = SQLiteStore(settings.db_path, create=False)
    try:
        assert [d.handler for d in store.dead_letters()] == [RESERVE_INVENTORY]
    finally:
        store.close()


@pytest.mark.multiprocess
def test_the_dashboard_command_serves_the_demos_database(
    demo: tuple[Settings, DemoResult], children: Children
) -> None:
    settings, _ = demo
    port = free_port()
    server = children.start(
        [
            *(sys.executable, "-m", "eventbus", "dashboard"),
            *("--store", str(settings.db_path), "--port", str(port)),
        ],
        name="dashboard",
        stdin=False,
    )
    wait_until_listening(server, port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        assert response.status == 200
        assert totals(response.read().decode()) == AFTER_DEMO
