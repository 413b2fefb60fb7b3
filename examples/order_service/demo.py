"""The ``demo`` command: place orders, ship some, drain the bus, and report what happened.

The story, in three steps:

1. Three orders are placed. Ada's goes through cleanly. Grace's monitor sits on a hot stock
   row: the inventory times out twice and the third attempt succeeds. Linus orders a SKU the
   inventory does not know: a permanent error, dead-lettered at once (``retry_on``).
2. The warehouse API goes down; Margaret's order is placed; its warehouse notification fails
   three times and becomes a dead letter. The warehouse comes back up.
3. Ada's and Grace's orders are shipped.

Then a table per handler (succeeded / retried / dead-lettered), computed from the bus's own
records (``bus.status(event_id)`` for every event emitted, ``bus.dead_letters()``), the dead
letters, and the emails written to the outbox. Log lines go to stderr, the report to stdout.

The backoff between attempts is a short ``tenacity.wait_fixed(0.1)`` so the demo finishes in
a couple of seconds; the server uses an exponential backoff instead (see ``wiring.Settings``).

The demo's bus is durable like the server's: its event store is in the demo's own database,
``demo.sqlite3`` (orders, audit trail and events in one file, each order committed with its
event), which the command empties before each run (``remove_database``) so every run tells the
same story; afterwards ``.venv/bin/python -m eventbus dead-letters list --store`` on that file
shows the demo's dead letters. It recovers nothing: that is the ``serve``, ``burst`` and
``check`` story (README).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any, TextIO

import structlog
import tenacity

from eventbus import DeadLetter, EventBus
from examples.order_service.handlers import ALL_HANDLERS
from examples.order_service.tracing import span
from examples.order_service.wiring import (
    VAR_DIR,
    OrderApp,
    Settings,
    display_path,
    python_command,
)

__all__ = [
    "DEMO_BACKOFF",
    "DEMO_DB",
    "DemoResult",
    "HandlerStats",
    "demo_settings",
    "format_table",
    "remove_database",
    "run_demo",
    "summarise",
]

#: Seconds between attempts in the demo.
DEMO_BACKOFF = 0.1
#: The demo's own database (orders and events), apart from the server's ``orders.sqlite3``.
DEMO_DB = VAR_DIR / "demo.sqlite3"


@dataclass(frozen=True, slots=True)
class _DemoOrder:
    email: str
    items: tuple[tuple[str, int], ...]
    story: str

    def as_json(self) -> dict[str, Any]:
        return {
            "email": self.email,
            "items": [{"sku": sku, "quantity": qty} for sku, qty in self.items],
        }


ADA = _DemoOrder("ada@example.com", (("KB-101", 1), ("MS-202", 1)), "goes through cleanly")
GRACE = _DemoOrder(
    "grace@example.com", (("MN-303", 2),), "inventory: hot stock row, retried until it succeeds"
)
LINUS = _DemoOrder(
    "linus@example.com", (("ZZ-999", 1),), "inventory: unknown SKU, not retryable: dead letter"
)
MARGARET = _DemoOrder(
    "margaret@example.com", (("CB-404", 3),), "warehouse: down, retried, then a dead letter"
)


@dataclass(frozen=True, slots=True)
class HandlerStats:
    """One handler's deliveries in the demo, counted from ``bus.status``."""

    handler: str
    deliveries: int = 0
    succeeded: int = 0
    #: Deliveries that needed more than one attempt (whether they then succeeded or not).
    retried: int = 0
    dead_lettered: int = 0
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class DemoResult:
    """What the demo did and saw."""

    order_ids: list[str]
    event_ids: list[str]
    stats: dict[str, HandlerStats]
    dead_letters: list[DeadLetter]
    emails: list[Path]
    drained: bool
    seconds: float
    #: Event id -> the id of the order it is about.
    order_of: dict[str, str] = field(default_factory=dict)


def demo_settings(
    *,
    db_path: Path | str | None = None,
    outbox_dir: Path | None = None,
    latency: float = 1.0,
    backoff: float = DEMO_BACKOFF,
) -> Settings:
    """The demo's settings: the server's, with a short fixed backoff and a database of its own
    (default :data:`DEMO_DB`; orders and events), from which it recovers nothing. An in-memory
    database (``":memory:"``) runs without an event store."""
    db = db_path or DEMO_DB
    return Settings(
        db_path=db,
        outbox_dir=outbox_dir or Settings().outbox_dir,
        durable=str(db) != ":memory:",
        recover=False,
        latency=latency,
        retry_wait=tenacity.wait_fixed(backoff),
    )


def remove_database(settings: Settings) -> None:
    """Delete the demo's database (orders and event store, with SQLite's ``-wal`` and ``-shm``
    files), so that the next app starts from an empty one. Only for a file no process has
    open."""
    path = settings.db_path
    if str(path) == ":memory:":
        return
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def run_demo(app: OrderApp, out: TextIO, *, timeout: float = 30.0) -> DemoResult:
    """Run the demo's story on *app*, print the report to *out*, and return what it counted.

    Leaves *app* open (its bus still answers ``status`` and ``dead_letters``): the caller
    closes it.
    """
    bus, orders, warehouse = app.bus, app.orders, app.warehouse
    started = time.monotonic()
    order_ids: list[str] = []
    event_ids: list[str] = []
    order_of: dict[str, str] = {}  # event id -> order id
    # With tracing on (demo --trace): each order's "place order" span, the root of its trace.
    tracer_provider = app.tracer_provider
    trace_of: dict[str, Any] = {}  # order id -> the SpanContext of its "place order" span

    def as_request() -> AbstractContextManager[None]:
        # What the web layer does per request: bind a request id that every log line,
        # handler lines included, will carry.
        return structlog.contextvars.bound_contextvars(request_id=f"demo-{len(event_ids) + 1}")

    def place(order: _DemoOrder) -> None:
        with as_request(), span(tracer_provider, "place order") as current:
            accepted = orders.create_order(order.as_json(), metadata=_request_metadata())
            if current is not None:
                current.set_attribute("order.id", accepted.order.id)
                trace_of[accepted.order.id] = current.get_span_context()
        order_ids.append(accepted.order.id)
        event_ids.append(accepted.event.id)
        order_of[accepted.event.id] = accepted.order.id
        items = ", ".join(f"{qty} x {sku}" for sku, qty in order.items)
        _say(out, f"  {accepted.order.id}  {order.email:<21} {items:<22}  {order.story}")

    _header(out, app)
    _say(out, "1. Placing orders (create_order returns at once; handlers run on the bus):")
    for order in (ADA, GRACE, LINUS):
        place(order)
    drained = bus.drain(timeout)

    _say(out, "2. The warehouse API goes down. One more order:")
    warehouse.down()
    place(MARGARET)
    drained = bus.drain(timeout) and drained
    warehouse.up()
    _say(out, "   The warehouse API is back up.")

    _say(out, "3. Shipping the first two orders:")
    for order_id in order_ids[:2]:
        # Shipping joins the order's trace: one trace per order, placement to shipping.
        with (
            as_request(),
            span(
                tracer_provider,
                "ship order",
                parent=trace_of.get(order_id),
                attributes={"order.id": order_id},
            ),
        ):
            accepted = orders.ship_order(order_id, metadata=_request_metadata())
        event_ids.append(accepted.event.id)
        order_of[accepted.event.id] = order_id
        _say(out, f"  {order_id}  tracking {accepted.order.tracking_number}")
    _say(out, "   Waiting for the bus to drain ...")
    drained = bus.drain(timeout) and drained
    seconds = time.monotonic() - started
    _say(out, f"   {'drained' if drained else 'NOT drained'} after {seconds:.1f} s")

    stats = summarise(bus, event_ids)
    ours = set(event_ids)
    dead_letters = [d for d in bus.dead_letters() if d.event.id in ours]
    emails = sorted(p for oid in order_ids for p in app.settings.outbox_dir.glob(f"{oid}-*.eml"))
    _report(
        out,
        bus=bus,
        stats=stats,
        order_of=order_of,
        dead_letters=dead_letters,
        emails=emails,
        outbox=app.settings.outbox_dir,
        events=app.events_path,
    )
    _say(out, "")
    _say(out, "Orders, as stored in SQLite:")
    for order_id in order_ids:
        stored = orders.get_order(order_id)
        _say(out, f"  {stored.id}  {stored.status:<8}  {stored.customer_email}")
    return DemoResult(order_ids, event_ids, stats, dead_letters, emails, drained, seconds, order_of)


def _header(out: TextIO, app: OrderApp) -> None:
    _say(out, "eventbus order-service demo")
    events = (
        "in memory (no store)"
        if app.events_path is None
        else "in the same file, each one committed with its order"
    )
    _say(out, f"  database  {display_path(app.settings.db_path)}")
    _say(out, f"  events    {events}")
    _say(out, f"  outbox    {display_path(app.settings.outbox_dir)}")
    _say(out, f"  backoff   {_describe(app.settings.retry_wait)} between attempts")
    _say(out, "")


def summarise(bus: EventBus, event_ids: Iterable[str]) -> dict[str, HandlerStats]:
    """Count each handler's deliveries of these events by final state, from ``bus.status``."""
    counts: dict[str, dict[str, int]] = {}
    for event_id in event_ids:
        for handler, delivery in bus.status(event_id).items():
            c = counts.setdefault(
                handler, dict.fromkeys(("n", "ok", "retried", "dead", "tries"), 0)
            )
            c["n"] += 1
            c["ok"] += delivery.state == "succeeded"
            c["dead"] += delivery.state == "dead"
            c["retried"] += delivery.attempts > 1
            c["tries"] += delivery.attempts
    order = {name: i for i, name in enumerate(ALL_HANDLERS)}
    return {
        name: HandlerStats(name, c["n"], c["ok"], c["retried"], c["dead"], c["tries"])
        for name, c in sorted(counts.items(), key=lambda kv: order.get(kv[0], len(order)))
    }


def format_table(stats: Mapping[str, HandlerStats]) -> str:
    """The per-handler table, as printed."""
    header = ("handler", "deliveries", "succeeded", "retried", "dead-lettered", "attempts")
    rows = [
        (s.handler, s.deliveries, s.succeeded, s.retried, s.dead_lettered, s.attempts)
        for s in stats.values()
    ]
    width = max([len(header[0]), *(len(r[0]) for r in rows)])
    lines = [f"  {header[0]:<{width}}  " + "  ".join(header[1:])]
    lines.append("  " + "-" * (len(lines[0]) - 2))
    for name, *numbers in rows:
        cells = "  ".join(f"{n:>{len(h)}}" for n, h in zip(numbers, header[1:], strict=True))
        lines.append(f"  {name:<{width}}  {cells}")
    return "\n".join(lines)


def _report(
    out: TextIO,
    *,
    bus: EventBus,
    stats: Mapping[str, HandlerStats],
    order_of: Mapping[str, str],
    dead_letters: list[DeadLetter],
    emails: list[Path],
    outbox: Path,
    events: Path | str | None,
) -> None:
    _say(out, "")
    _say(out, "Deliveries per handler (from bus.status; retried = needed more than one attempt):")
    _say(out, format_table(stats))
    _say(out, "")
    for event_id, order_id in order_of.items():
        for name, delivery in bus.status(event_id).items():
            if delivery.state == "succeeded" and delivery.attempts > 1:
                _say(
                    out,
                    f"Retried, then succeeded: {name} for {order_id} after {delivery.attempts}"
                    f" attempts (last error: {delivery.error})",
                )
    _say(out, "")
    _say(out, f"Dead letters ({len(dead_letters)}), from bus.dead_letters():")
    for d in dead_letters:
        order_id = getattr(d.event.payload, "order_id", "?")
        tries = f"{d.attempts} attempt{'s' if d.attempts != 1 else ''}"
        _say(out, f"  {d.handler:<17} {order_id}  {tries:<10}  {d.reason:<13}  {d.error}")
    if dead_letters:
        _say(out, "  Replay one through the API: POST /api/dead-letters/<id>/replay (README).")
    if dead_letters and events is not None and str(events) != ":memory:":
        command = f"{python_command()} -m eventbus dead-letters list --store"
        _say(out, f"  Or from the command line: {command} {display_path(events)}")
    _say(out, "")
    _say(out, f"Emails ({len(emails)}) written to {display_path(outbox)}:")
    parser = BytesParser(policy=policy.default)
    for path in emails:
        with path.open("rb") as file:
            message = parser.parse(file, headersonly=True)
        _say(out, f"  {path.name:<36}  to {message['To']:<21} {message['Subject']}")


def _request_metadata() -> dict[str, str]:
    # The bound request id also travels with the event itself (and so with its dead letters).
    return {"request_id": str(structlog.contextvars.get_contextvars()["request_id"])}


def _describe(wait: object) -> str:
    if isinstance(wait, tenacity.wait_fixed):
        return f"tenacity.wait_fixed({wait.wait_fixed:g})"
    return type(wait).__name__


def _say(out: TextIO, line: str) -> None:
    # Flushed line by line, so the report and the log lines (stderr) interleave in order.
    out.write(line + "\n")
    out.flush()
