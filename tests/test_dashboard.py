"""The web dashboard (eventbus.dashboard) through Flask's test client, against real stores
filled by a real bus; and the `python -m eventbus dashboard` command."""

from __future__ import annotations

import io
import itertools
import re
import sqlite3
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import tenacity
from flask import Flask
from flask.testing import FlaskClient

from eventbus import Event, EventBus, RetryPolicy
from eventbus._cli import main
from eventbus.dashboard import create_app
from eventbus.dashboard._queries import Queries
from eventbus.stores import SQLiteStore
from eventbus.testing import FakeClock, InlineExecutor
from tests.support.children import Children
from tests.support.dashboard import page, token
from tests.support.net import free_port, wait_until_listening

SECRET = "hunter2-do-not-show"
SCRIPT = "<script>alert(1)</script>"


def fill(store: Any) -> list[str]:
    """Two events through a bus on *store*: "order:created" goes to `audit` (succeeds) and to
    `send_email` (fails with a `<script>` in its error, one attempt: a dead letter); the
    payload and metadata hold secrets. Returns the event ids."""

    def send_email(event: Event) -> None:
        raise ConnectionError(f"SMTP down {SCRIPT}")

    def audit(event: Event) -> None:
        pass

    bus = EventBus(
        store=store,
        executor=InlineExecutor(),
        clock=FakeClock(),
        retry=RetryPolicy(max_attempts=1),
    )
    bus.subscribe("order:created", send_email, name="send_email")
    bus.subscribe("order:created", audit, name="audit")
    ids = [
        bus.emit(
            "order:created",
            {"order_id": n, "password": SECRET},
            metadata={"request_id": f"req-{n}", "api_token": SECRET},
        ).id
        for n in (1, 2)
    ]
    bus.drain()
    bus.close()
    return ids


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A store file filled by `fill`."""
    file = tmp_path / "events.sqlite3"
    fill(SQLiteStore(file))
    return file


@pytest.fixture
def store(path: Path) -> Iterator[SQLiteStore]:
    opened = SQLiteStore(path, create=False)
    yield opened
    opened.close()


@pytest.fixture
def app(store: SQLiteStore) -> Flask:
    return create_app(store)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def event_ids(html: str) -> list[str]:
    return re.findall(r'href="/events/([0-9a-f]+)"', html)


def letter_ids(store: Any) -> list[str]:
    return [letter.id for letter in store.dead_letters()]


# -- overview ------------------------------------------------------------------------------------


def test_overview_lists_handlers_with_counts_and_refreshes(client: FlaskClient) -> None:
    html = page(client, "/")
    assert '<meta http-equiv="refresh" content="10">' in html
    rows = {
        m.group(1): re.findall(r"<td class=\"n [a-z]+\">\s*(?:<a[^>]*>)?(\d+)", m.group(0))
        for m in re.finditer(r"<tr>\s*<td><a href=\"/events\?handler=(\w+)\">.*?</tr>", html, re.S)
    }
    # pending, running, retrying, succeeded, dead: last hour, then total.
    assert rows["audit"] == ["0", "0", "0", "2", "0"] * 2
    assert rows["send_email"] == ["0", "0", "0", "0", "2"] * 2
    assert "<svg" in html
    assert "<script" not in html


def test_overview_of_an_empty_store(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "empty.sqlite3")
    try:
        html = page(create_app(store).test_client(), "/")
    finally:
        store.close()
    assert "No deliveries stored yet." in html


# -- search ----------------------------------------------------------------------------------------


def test_search_by_event_id_prefix(path: Path, client: FlaskClient, store: SQLiteStore) -> None:
    first, second = event_ids(page(client, "/events"))[::-1]
    assert event_ids(page(client, f"/events?id={first}")) == [first]
    assert event_ids(page(client, f"/events?event_id={first}")) == [first]
    assert second in event_ids(page(client, f"/events?id={second[:-1]}"))
    assert event_ids(page(client, "/events?id=zz")) == []
    assert event_ids(page(client, "/events?id=%25")) == []  # a LIKE wildcard taken literally


def test_search_by_name_handler_and_state(client: FlaskClient) -> None:
    assert len(event_ids(page(client, "/events?name=order:created"))) == 2
    assert event_ids(page(client, "/events?name=order:shipped")) == []
    assert len(event_ids(page(client, "/events?handler=audit&state=succeeded"))) == 2
    assert event_ids(page(client, "/events?handler=audit&state=dead")) == []
    assert len(event_ids(page(client, "/events?state=dead"))) == 2
    assert event_ids(page(client, "/events?handler=nobody")) == []


def test_search_by_time(client: FlaskClient) -> None:
    assert len(event_ids(page(client, "/events?since=2000-01-01T00:00"))) == 2
    assert event_ids(page(client, "/events?until=2000-01-01T00:00")) == []


@pytest.mark.parametrize(
    "query",
    [
        "state=exploded",
        "page=0",
        "page=x",
        "since=yesterday",
        "until=2024-13-01",
        "id=" + "x" * 201,
    ],
)
def test_search_rejects_bad_input(client: FlaskClient, query: str) -> None:
    html = page(client, f"/events?{query}", 400)
    assert "400 Bad Request" in html


def test_search_pages(app: Flask, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("eventbus.dashboard.PAGE_SIZE", 1)
    client = app.test_client()
    first = page(client, "/events")
    assert len(event_ids(first)) == 1
    assert "older &rarr;" in first
    second = page(client, "/events?page=2")
    assert len(event_ids(second)) == 1
    assert event_ids(first) != event_ids(second)
    assert event_ids(page(client, "/events?page=3")) == []


# -- one event -----------------------------------------------------------------------------------


def test_event_page_shows_deliveries_error_and_traceback(client: FlaskClient) -> None:
    event_id = event_ids(page(client, "/events"))[0]
    html = page(client, f"/events/{event_id}")
    assert 'audit</td><td class="succeeded">succeeded' in html
    assert 'send_email</td><td class="dead">dead' in html
    assert "ConnectionError: SMTP down &lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Traceback (most recent call last)" in html
    assert "in send_email" in html
    assert SCRIPT not in html


def test_payload_and_metadata_are_redacted(client: FlaskClient) -> None:
    event_id = event_ids(page(client, "/events"))[0]
    html = page(client, f"/events/{event_id}")
    assert "[REDACTED]" in html
    assert "&#34;order_id&#34;" in html
    assert "req-" in html
    assert SECRET not in html


def test_stored_text_is_escaped_everywhere(path: Path, client: FlaskClient) -> None:
    """An event name written by another program (the bus refuses such names) and a handler
    name with markup are shown as text on every page."""
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE events SET name = ?", (SCRIPT,))
        db.execute("UPDATE deliveries SET handler = '<b>x</b>' WHERE handler = 'audit'")
    event_id = event_ids(page(client, "/events"))[0]
    letter = re.findall(r'href="/dead-letters/([0-9a-f]+)"', page(client, "/dead-letters"))[0]
    for url in ("/", "/events", f"/events/{event_id}", "/dead-letters", f"/dead-letters/{letter}"):
        html = page(client, url)
        assert "<script>" not in html, url
        assert "<b>x</b>" not in html, url
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page(client, f"/events/{event_id}")
    assert "&lt;b&gt;x&lt;/b&gt;" in page(client, "/")


def test_unknown_event_and_dead_letter_are_404(client: FlaskClient) -> None:
    assert "no event with id nope" in page(client, "/events/nope", 404)
    assert "no dead letter with id nope" in page(client, "/dead-letters/nope", 404)
    assert "&lt;i&gt;" in page(client, "/events/%3Ci%3E", 404)


def test_pages_forbid_scripts_and_framing(client: FlaskClient) -> None:
    response = client.get("/")
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"


FAILURE_ROW = re.compile(
    r'<tr><td>(\w+)</td><td class="n">(\d+)</td>\s*<td>[^<]* UTC</td><td>([^<]*)</td></tr>'
)


def failures(html: str) -> list[tuple[str, int, str]]:
    """(handler, attempt, error) of the event page's failed attempts table."""
    section = html.split("<h2>Failed attempts</h2>", 1)[1].split("<h2>", 1)[0]
    return [(h, int(n), error) for h, n, error in FAILURE_ROW.findall(section)]


def fill_with_retries(store: Any) -> str:
    """One event: `flaky` fails twice then succeeds, `broken` fails all 3 attempts (a dead
    letter), `fine` succeeds. Returns its id."""
    tries = itertools.count(1)

    def flaky(event: Event) -> None:
        if (n := next(tries)) < 3:
            raise TimeoutError(f"slow <b>{n}</b>")

    def broken(event: Event) -> None:
        raise ValueError("bad")

    # The real clock: retries due at once go through the bus's retry queue.
    bus = EventBus(
        store=store,
        executor=InlineExecutor(),
        retry=RetryPolicy(max_attempts=3, wait=tenacity.wait_none()),
    )
    for handler in (flaky, broken, lambda event: None):
        bus.subscribe("order:created", handler, name=getattr(handler, "__name__", "fine"))
    event_id = bus.emit("order:created", {"order_id": 1}).id
    bus.drain()
    bus.close()
    return event_id


def test_event_page_lists_every_failed_attempt(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "history.sqlite3")
    event_id = fill_with_retries(store)
    html = page(create_app(store).test_client(), f"/events/{event_id}")
    store.close()
    assert failures(html) == [
        ("broken", 1, "ValueError: bad"),
        ("broken", 2, "ValueError: bad"),
        ("broken", 3, "ValueError: bad"),
        ("flaky", 1, "TimeoutError: slow &lt;b&gt;1&lt;/b&gt;"),
        ("flaky", 2, "TimeoutError: slow &lt;b&gt;2&lt;/b&gt;"),
    ]
    assert 'flaky</td><td class="succeeded">succeeded' in html


def test_event_page_of_an_event_that_never_failed(client: FlaskClient) -> None:
    """fill()'s events each have one failure (send_email, dead at once) and none for audit."""
    event_id = event_ids(page(client, "/events"))[0]
    html = page(client, f"/events/{event_id}")
    assert [(h, n) for h, n, _ in failures(html)] == [("send_email", 1)]


def test_chart_counts_deliveries_and_failed_attempts(tmp_path: Path) -> None:
    """Over the last hour: 3 deliveries of the one event, 5 failed attempts (2 of `flaky`,
    3 of `broken`), whichever minutes they fell in."""
    store = SQLiteStore(tmp_path / "chart.sqlite3")
    fill_with_retries(store)
    minutes = Queries(store).per_minute()
    html = page(create_app(store).test_client(), "/")
    store.close()
    assert len(minutes) == 60
    assert (sum(m.deliveries for m in minutes), sum(m.failures for m in minutes)) == (3, 5)
    assert "failed attempts (by the minute they" in html


def test_a_store_from_before_the_attempt_history_says_so(tmp_path: Path) -> None:
    """A schema version 1 file opened without create (as the dashboard command does) has no
    attempts table: the event page says how to add it instead of failing."""
    file = tmp_path / "v1.sqlite3"
    event_id = fill(SQLiteStore(file))[0]
    with closing(sqlite3.connect(file)) as db:
        db.execute("DROP TABLE attempts")
        db.execute("PRAGMA user_version = 1")
        db.commit()
    html = page(create_app(file).test_client(), f"/events/{event_id}")
    assert "predates the attempt history" in html
    assert failures(html) == []
    # The chart's failures are then the deliveries now dead: send_email's, one per event.
    store = SQLiteStore(file, create=False)
    minutes = Queries(store).per_minute()
    overview = page(create_app(store).test_client(), "/")
    store.close()
    assert (sum(m.deliveries for m in minutes), sum(m.failures for m in minutes)) == (4, 2)
    assert "of them now retrying or dead" in overview


# -- dead letters: replay and purge ----------------------------------------------------------------


def test_dead_letters_list_and_one_letter(client: FlaskClient, store: SQLiteStore) -> None:
    html = page(client, "/dead-letters")
    ids = letter_ids(store)
    assert all(f'value="{i}"' in html for i in ids)
    one = page(client, f"/dead-letters/{ids[0]}")
    assert "Traceback (most recent call last)" in one
    assert "exhausted" in one
    assert page(client, "/dead-letters?handler=audit").count('type="checkbox"') == 0
    assert page(client, "/dead-letters?handler=send_email").count('type="checkbox"') == 2


@pytest.mark.parametrize("action", ["replay", "purge"])
def test_replay_and_purge_are_post_only(
    client: FlaskClient, store: SQLiteStore, action: str
) -> None:
    before = letter_ids(store)
    assert client.get(f"/actions/{action}?id={before[0]}").status_code == 405
    assert letter_ids(store) == before


@pytest.mark.parametrize("action", ["replay", "purge"])
@pytest.mark.parametrize("given", [None, "", "abc.def", "forged"])
def test_post_without_the_right_token_changes_nothing(
    app: Flask, client: FlaskClient, store: SQLiteStore, action: str, given: str | None
) -> None:
    before = letter_ids(store)
    form: dict[str, Any] = {"id": before, "all": "1"}
    if given == "forged":  # a token from another app (another secret)
        given = token(create_app(store).test_client())
    if given is not None:
        form["csrf_token"] = given
    response = client.post(f"/actions/{action}", data=form)
    assert response.status_code == 400
    assert "CSRF" in response.get_data(as_text=True)
    assert letter_ids(store) == before
    status = store.status(_event_of(store, before[0]))
    assert status is not None
    assert {d.state for d in status.values()} == {"succeeded", "dead"}


def _event_of(store: SQLiteStore, letter_id: str) -> str:
    letter = store.dead_letter(letter_id)
    assert letter is not None
    return letter.event.id


def test_replay_one_makes_its_delivery_pending(client: FlaskClient, store: SQLiteStore) -> None:
    first, second = letter_ids(store)
    event_id = _event_of(store, first)
    response = client.post("/actions/replay", data={"csrf_token": token(client), "id": first})
    assert response.status_code == 303
    assert letter_ids(store) == [second]
    status = store.status(event_id)
    assert status is not None
    assert status["send_email"].state == "pending"
    assert "1 dead letter(s) replayed." in page(client, response.headers["Location"])


def test_purge_a_selection(client: FlaskClient, store: SQLiteStore) -> None:
    ids = letter_ids(store)
    response = client.post(
        "/actions/purge", data={"csrf_token": token(client), "id": [*ids, "gone"]}
    )
    assert response.status_code == 303
    assert letter_ids(store) == []
    status = store.status(_event_of_any(store))
    assert status is not None
    assert status["send_email"].state == "dead"  # purged letters' deliveries stay dead
    html = page(client, response.headers["Location"])
    assert "2 dead letter(s) purged." in html
    assert "1 not found" in html


def _event_of_any(store: SQLiteStore) -> str:
    with store._lock:
        return str(store._read().execute("SELECT id FROM events").fetchone()[0])


def test_replay_all_matching_a_filter(client: FlaskClient, store: SQLiteStore) -> None:
    keep, replay = letter_ids(store)
    prefix = _event_of(store, replay)
    data = {"csrf_token": token(client), "all": "1", "event_id": prefix, "handler": "send_email"}
    assert client.post("/actions/replay", data=data).status_code == 303
    assert letter_ids(store) == [keep]
    data = {"csrf_token": token(client), "all": "1", "handler": "audit"}
    assert client.post("/actions/purge", data=data).status_code == 303
    assert letter_ids(store) == [keep]
    data = {"csrf_token": token(client), "all": "1"}
    assert client.post("/actions/purge", data=data).status_code == 303
    assert letter_ids(store) == []


def test_replay_with_nothing_selected_is_400(client: FlaskClient, store: SQLiteStore) -> None:
    before = letter_ids(store)
    response = client.post("/actions/replay", data={"csrf_token": token(client)})
    assert response.status_code == 400
    assert letter_ids(store) == before


def test_done_message_takes_numbers_only(client: FlaskClient) -> None:
    html = page(client, "/dead-letters?replayed=<b>hi</b>&purged=2")
    assert "2 dead letter(s) purged." in html
    assert "<b>hi" not in html
    assert "&lt;b&gt;hi" not in html


# -- a store that is not there ------------------------------------------------------------


def _make_foreign(tmp_path: Path) -> Path:
    file = tmp_path / "orders.sqlite3"
    with closing(sqlite3.connect(file)) as db, db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    return file


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: d / "typo.sqlite3", "the file does not exist"),
        (lambda d: d, "it is a directory"),
        (_make_foreign, "not an eventbus store"),
        (lambda d: (d / "empty.sqlite3").touch() or d / "empty.sqlite3", "empty database"),
    ],
)
def test_a_path_that_is_not_a_store_gives_an_error_page(
    tmp_path: Path, make: Callable[[Path], Path], says: str
) -> None:
    target = make(tmp_path)
    client = create_app(target).test_client()
    for url in ("/", "/events", "/dead-letters/x"):
        response = client.get(url)
        assert response.status_code == 503
        assert says in response.get_data(as_text=True)
    assert not (tmp_path / "typo.sqlite3").exists()


def test_a_path_that_is_a_store_is_opened(path: Path) -> None:
    app = create_app(path)
    assert "send_email" in page(app.test_client(), "/")


# -- the command line ----------------------------------------------------------------------------


def run(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in args], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--port", "http"), "--port must be a whole number from 1 to 65535, got 'http'"),
        (("--port", "0"), "--port must be a whole number"),
        (("--port", "70000"), "--port must be a whole number"),
        (("--host", " "), "--host must not be empty"),
    ],
)
def test_dashboard_argument_errors_are_one_line(
    path: Path, args: tuple[str, ...], says: str
) -> None:
    code, out, err = run("dashboard", "--store", path, *args)
    assert (code, out) == (2, "")
    assert err == f"eventbus: error: {says}\n" or (err.count("\n") == 1 and says in err)


def test_dashboard_on_a_missing_or_foreign_store_is_one_line(tmp_path: Path) -> None:
    code, out, err = run("dashboard", "--store", tmp_path / "typo.sqlite3")
    assert (code, out) == (2, "")
    assert (
        err
        == f"eventbus: error: no store at {tmp_path / 'typo.sqlite3'}: the file does not exist\n"
    )
    code, out, err = run("dashboard", "--store", _make_foreign(tmp_path))
    assert (code, out, err.count("\n")) == (2, "", 1)
    assert "not an eventbus store" in err


def test_dashboard_without_flask_names_the_extra(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [
        m for m in sys.modules if m == "eventbus.dashboard" or m.startswith("eventbus.dashboard.")
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flask", None)
    code, out, err = run("dashboard", "--store", path)
    assert (code, out, err.count("\n")) == (2, "", 1)
    assert "pip install 'eventbus[dashboard]'" in err


@pytest.mark.multiprocess
def test_dashboard_serves_the_overview_over_http(path: Path, children: Children) -> None:
    port = free_port()
    server = children.start(
        [sys.executable, "-m", "eventbus", "dashboard", "--store", str(path), "--port", str(port)],
        name="dashboard",
        stdin=False,
    )
    wait_until_listening(server, port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        assert response.status == 200
        html = response.read().decode()
    assert "send_email" in html
    assert '<meta http-equiv="refresh" content="10">' in html
    first = server.next_line(waiting_for="the dashboard's address")
    assert first.startswith(f"eventbus dashboard of {path} on http://127.0.0.1:{port}/")


# -- PostgresStore --------------------------------------------------------------------------


@pytest.fixture
def pg_store(postgres_dsn: str) -> Iterator[Any]:
    from eventbus.stores import PostgresStore

    fill(PostgresStore(postgres_dsn))
    opened = PostgresStore(postgres_dsn, create=False)
    yield opened
    opened.close()


@pytest.mark.integration
def test_postgres_overview_search_event_and_replay(pg_store: Any) -> None:
    client = create_app(pg_store).test_client()
    html = page(client, "/")
    assert "send_email" in html
    assert "<svg" in html
    ids = event_ids(page(client, "/events?handler=send_email&state=dead"))
    assert len(ids) == 2
    assert event_ids(page(client, f"/events?id={ids[0]}")) == [ids[0]]
    assert event_ids(page(client, "/events?name=order:created&since=2000-01-01T00:00")) != []
    event_html = page(client, f"/events/{ids[0]}")
    assert [(h, n) for h, n, _ in failures(event_html)] == [("send_email", 1)]
    assert "Traceback (most recent call last)" in event_html
    assert SECRET not in event_html
    assert SCRIPT not in event_html
    first, second = letter_ids(pg_store)
    event_id = pg_store.dead_letter(first).event.id
    assert client.post("/actions/replay", data={"id": first}).status_code == 400
    response = client.post("/actions/replay", data={"csrf_token": token(client), "id": first})
    assert response.status_code == 303
    assert letter_ids(pg_store) == [second]
    assert pg_store.status(event_id)["send_email"].state == "pending"
    data = {"csrf_token": token(client), "all": "1", "handler": "send_email"}
    assert client.post("/actions/purge", data=data).status_code == 303
    assert letter_ids(pg_store) == []
