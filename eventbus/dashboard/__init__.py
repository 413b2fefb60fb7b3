"""A web dashboard for an eventbus store: deliveries per handler, a searchable list of events,
each event with its deliveries and dead letters, and replay and purge of dead letters.

``create_app(store)`` returns a Flask app (a WSGI app) to mount in an existing service, or to
serve with ``python -m eventbus dashboard --store PATH_OR_DSN``. Flask is an optional extra:
``pip install 'eventbus[dashboard]'``.

Safe by default: pages are rendered on the server with Jinja's autoescaping (every stored value
is text from the application or its callers); payloads and metadata are shown through the logs'
redaction; replay and purge are POST requests carrying a token signed with a secret made for
each app, so another site cannot make a browser send them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

from flask import Flask, Response, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from jinja2 import DictLoader
from werkzeug.exceptions import BadRequest, HTTPException, NotFound

from eventbus._event import DeadLetter
from eventbus.dashboard._queries import (
    STATES,
    DeadLetterFilter,
    EventFilter,
    Minute,
    Queries,
)
from eventbus.dashboard._templates import TEMPLATES
from eventbus.stores.sqlite import SQLiteStore

__all__ = ["PAGE_SIZE", "create_app"]

#: Rows per page of the event search and the dead letter list.
PAGE_SIZE = 50
#: The highest page number accepted (deeper paging is a narrower search away).
MAX_PAGE = 10_000
#: The longest text accepted in a search field.
MAX_FIELD = 200

_CHART_WIDTH = 600
_CHART_HEIGHT = 130
_CHART_MARGIN = 16

#: Sent with every page: no scripts, no framing, forms post to this dashboard only.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class DashboardStore(Protocol):
    """What the dashboard changes in a store (SQLiteStore and PostgresStore have it)."""

    def replay_dead_letter(self, dead_letter_id: str) -> DeadLetter | None: ...

    def purge_dead_letters(self, ids: Collection[str] | None = None) -> int: ...


def create_app(store: DashboardStore | str | os.PathLike[str]) -> Flask:
    """The dashboard of *store*: an :class:`~eventbus.stores.SQLiteStore` or
    :class:`~eventbus.stores.PostgresStore` (the caller keeps it, and closes it), or the path
    of an SQLite store file, opened here without creating anything. A path that is not an
    eventbus store gives an app whose every page says why (status 503).

    Replay makes the delivery pending again, unowned: a service that called ``recover()``
    runs it within its ``poll_interval``, otherwise its next start does."""
    app = Flask("eventbus.dashboard")
    app.jinja_env.loader = DictLoader(TEMPLATES)
    app.jinja_env.filters["utc"] = _utc
    secret = secrets.token_bytes(32)

    def csrf_token() -> str:
        nonce = secrets.token_urlsafe(16)
        return f"{nonce}.{_sign(secret, nonce)}"

    app.jinja_env.globals["csrf_token"] = csrf_token
    _register_csrf_check(app, secret)
    _register_common(app)

    opened = _open(store)
    if isinstance(opened, str):
        _register_unavailable(app, opened)
        return app
    target, name = opened
    queries = Queries(target)
    app.jinja_env.globals.update(store_name=name, available=True)

    @app.get("/")
    def overview() -> ResponseReturnValue:
        return render_template(
            "overview.html",
            handlers=queries.handler_counts(),
            states=STATES,
            chart=_chart(queries.per_minute()),
            history=queries.history,
        )

    @app.get("/events")
    def events() -> ResponseReturnValue:
        state = _field("state")
        if state and state not in STATES:
            raise BadRequest(f"unknown state {state!r}: one of {', '.join(STATES)}")
        since, until = _field("since"), _field("until")
        where = EventFilter(
            # "event_id" too: the dead letters page's name for the same filter.
            id_prefix=_field("id") or _field("event_id"),
            name=_field("name"),
            handler=_field("handler"),
            state=state,
            since=_time(since, "since"),
            until=_time(until, "until"),
        )
        page = _page()
        rows = queries.search(where, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        query = _query(id=where.id_prefix, name=where.name, handler=where.handler, state=state)
        query.update(_query(since=since, until=until))
        return render_template(
            "events.html",
            f=where,
            since=since,
            until=until,
            states=STATES,
            rows=rows[:PAGE_SIZE],
            more=len(rows) > PAGE_SIZE,
            page=page,
            query=query,
        )

    @app.get("/events/<event_id>")
    def event(event_id: str) -> ResponseReturnValue:
        found = queries.event(event_id)
        if found is None:
            raise NotFound(f"no event with id {event_id} in this store")
        return render_template("event.html", e=found)

    @app.get("/dead-letters")
    def dead_letters() -> ResponseReturnValue:
        where = _letter_filter(request.args)
        page = _page()
        rows = queries.dead_letters(where, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        query = _query(handler=where.handler, name=where.name, event_id=where.event_id_prefix)
        return render_template(
            "dead_letters.html",
            f=where,
            rows=rows[:PAGE_SIZE],
            more=len(rows) > PAGE_SIZE,
            page=page,
            query=query,
            message=_done_message(),
        )

    @app.get("/dead-letters/<letter_id>")
    def dead_letter(letter_id: str) -> ResponseReturnValue:
        found = queries.dead_letter(letter_id)
        if found is None:
            raise NotFound(f"no dead letter with id {letter_id} (replayed or purged?)")
        return render_template("dead_letter.html", x=found)

    @app.post("/actions/replay")
    def replay() -> ResponseReturnValue:
        ids = _targets(queries)
        replayed = sum(target.replay_dead_letter(i) is not None for i in ids)
        return _back(replayed=replayed, missing=len(ids) - replayed)

    @app.post("/actions/purge")
    def purge() -> ResponseReturnValue:
        ids = _targets(queries)
        purged = target.purge_dead_letters(ids) if ids else 0
        return _back(purged=purged, missing=len(ids) - purged)

    return app


# -- the store ---------------------------------------------------------------------------------


def _open(store: DashboardStore | str | os.PathLike[str]) -> tuple[DashboardStore, str] | str:
    """The store to show and how pages name it; or why a path cannot be shown."""
    if not isinstance(store, str | os.PathLike):
        # An SQLite store by its file; a PostgreSQL one by its repr, which hides the password.
        path = getattr(store, "path", None)
        return store, str(path) if path is not None else repr(store)
    path = Path(store)
    if not path.exists():
        return f"no store at {path}: the file does not exist"
    if path.is_dir():
        return f"cannot open {path} as an eventbus store: it is a directory"
    try:
        opened = SQLiteStore(path, create=False)
    except (sqlite3.Error, OSError) as exc:
        return f"cannot open {path} as an eventbus store: {exc}"
    except (ValueError, RuntimeError) as exc:  # the store's own refusals, naming the file
        return str(exc)
    return opened, str(path)


# -- requests ----------------------------------------------------------------------------------


def _field(name: str, source: Any = None) -> str:
    """A text field of the query string (or *source*), stripped; 400 when too long."""
    value = (request.args if source is None else source).get(name, "")
    value = value.strip() if isinstance(value, str) else ""
    if len(value) > MAX_FIELD:
        raise BadRequest(f"{name} is longer than {MAX_FIELD} characters")
    return value


def _page() -> int:
    text = request.args.get("page", "1")
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        raise BadRequest(f"page must be a whole number from 1 to {MAX_PAGE}")
    return int(text)


def _time(text: str, name: str) -> float | None:
    """A time from a ``datetime-local`` field (or any ISO 8601 time), taken as UTC when it
    has no zone, as Unix seconds; ``None`` when empty."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{name} is not a time like 2024-05-01T12:30") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _letter_filter(source: Any) -> DeadLetterFilter:
    return DeadLetterFilter(
        handler=_field("handler", source),
        name=_field("name", source),
        event_id_prefix=_field("event_id", source),
    )


def _targets(queries: Queries) -> list[str]:
    """The dead letters a replay or purge form names: checked ids, or every one matching the
    form's filter (``all=1``)."""
    if request.form.get("all") == "1":
        return queries.dead_letter_ids(_letter_filter(request.form))
    ids = list(dict.fromkeys(i for i in request.form.getlist("id") if i))
    if not ids:
        raise BadRequest("no dead letter selected")
    return ids


def _back(**counts: int) -> ResponseReturnValue:
    """After a replay or purge: back to the dead letters, saying what was done (by numbers
    only, so that a link cannot put words on the page)."""
    return redirect(f"{url_for('dead_letters')}?{urlencode(counts)}", code=303)


def _done_message() -> str | None:
    parts = []
    for key, verb in (("replayed", "replayed"), ("purged", "purged")):
        text = request.args.get(key, "")
        if text.isdigit():
            parts.append(f"{text} dead letter(s) {verb}.")
    missing = request.args.get("missing", "")
    if parts and missing.isdigit() and int(missing):
        parts.append(f"{missing} not found (already replayed or purged?).")
    if request.args.get("replayed", "").isdigit():
        parts.append(
            "A service that called recover() runs replays within its poll_interval, "
            "otherwise its next start does."
        )
    return " ".join(parts) or None


def _query(**fields: str) -> dict[str, str]:
    """The non-empty fields, for links to other pages of the same search."""
    return {k: v for k, v in fields.items() if v}


def _sign(secret: bytes, nonce: str) -> str:
    return hmac.new(secret, nonce.encode(), hashlib.sha256).hexdigest()


# -- pages -------------------------------------------------------------------------------------


def _register_common(app: Flask) -> None:
    app.jinja_env.globals.update(store_name="", available=False)

    @app.errorhandler(HTTPException)
    def error_page(error: HTTPException) -> ResponseReturnValue:
        return (
            render_template(
                "error.html",
                title=f"{error.code} {error.name}",
                detail=error.description,
            ),
            error.code or 500,
        )

    @app.after_request
    def safety_headers(response: Response) -> Response:
        response.headers.update(_HEADERS)
        return response


def _register_csrf_check(app: Flask, secret: bytes) -> None:
    """Every POST carries a token this app signed (a random nonce and its HMAC): another
    site's page cannot read one, so it cannot make a browser replay or purge."""

    @app.before_request
    def check_csrf() -> None:
        if request.method == "POST":
            given = request.form.get("csrf_token", "")
            nonce, _, signature = given.partition(".")
            if not nonce or not hmac.compare_digest(signature, _sign(secret, nonce)):
                raise BadRequest("missing or wrong CSRF token: reload the page and try again")


def _register_unavailable(app: Flask, why: str) -> None:
    """Every page says why the store cannot be shown."""

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST"])
    @app.route("/<path:path>", methods=["GET", "POST"])
    def unavailable(path: str) -> ResponseReturnValue:
        return render_template("error.html", title="Store not available", detail=why), 503


@dataclass(frozen=True, slots=True)
class _Bar:
    x: int
    y: int
    w: int
    h: int
    fy: int
    fh: int
    label: str


@dataclass(frozen=True, slots=True)
class _Chart:
    width: int
    height: int
    peak: int
    first: str
    last: str
    bars: list[_Bar]


def _chart(minutes: list[Minute]) -> _Chart:
    """Bar geometry for the overview's SVG: one bar per minute, failures drawn over it."""
    peak = max((max(m.deliveries, m.failures) for m in minutes), default=0)
    room = _CHART_HEIGHT - 2 * _CHART_MARGIN
    step = _CHART_WIDTH // max(len(minutes), 1)
    bars = []
    for i, minute in enumerate(minutes):
        h = round(minute.deliveries / peak * room) if peak else 0
        fh = round(minute.failures / peak * room) if peak else 0
        base = _CHART_HEIGHT - _CHART_MARGIN
        when = datetime.fromtimestamp(minute.start, UTC).strftime("%H:%M")
        bars.append(
            _Bar(
                x=i * step + 1,
                y=base - h,
                w=step - 2,
                h=h,
                fy=base - fh,
                fh=fh,
                label=f"{when} UTC: {minute.deliveries} deliveries, {minute.failures} failures",
            )
        )
    first = _hhmm(minutes[0].start) if minutes else ""
    last = _hhmm(minutes[-1].start) if minutes else ""
    return _Chart(_CHART_WIDTH, _CHART_HEIGHT, peak, first, last, bars)


def _hhmm(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%H:%M")


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")
