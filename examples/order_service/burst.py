"""The ``burst`` and ``check`` commands: a crash and recovery you can watch.

* ``burst`` places a burst of orders through a running server's HTTP API and saves each
  order's id and event id to a file (default ``var/burst.json``). Every fifth order asks for
  an unknown SKU (a dead letter), every fifth hits the hot stock row (retries).
* ``check`` reads that file and the event store (the orders database, read as a file, so it
  works while the server is down) and prints where each order's handlers stand. With
  ``--wait SECONDS`` it looks again until every delivery has settled (succeeded or dead) or
  the time is up; it exits 0 once everything has settled, 1 otherwise.

The story: ``serve --latency 10`` (slow fakes), ``burst``, ``kill -9`` the server while the
handlers run, ``check`` (deliveries stuck ``running``/``pending``), start ``serve`` again
(``app.recovered`` says how many it took over), ``check --wait 60``, then
``.venv/bin/python -m eventbus dead-letters list --store
examples/order_service/var/orders.sqlite3``.

Problems are exceptions with a one-line message for the command line: :class:`BurstError`
when the server cannot be reached or refuses an order, ``FileNotFoundError`` or
``ValueError`` when ``check`` has no burst file or event store to read.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from eventbus import Delivery
from eventbus.stores import SQLiteStore
from examples.order_service.handlers import ALL_HANDLERS
from examples.order_service.wiring import display_path, python_command

__all__ = [
    "BurstError",
    "BurstOrder",
    "check",
    "load_burst",
    "order_body",
    "place_burst",
    "save_burst",
]

_SETTLED = frozenset({"succeeded", "dead"})
#: The burst cycles through these carts: clean, hot stock row, clean, unknown SKU, clean.
_CARTS: tuple[tuple[tuple[str, int], ...], ...] = (
    (("KB-101", 1), ("MS-202", 1)),
    (("MN-303", 1),),
    (("CB-404", 2),),
    (("ZZ-999", 1),),
    (("MS-202", 3),),
)
#: Seconds between two looks at the store while ``check --wait`` waits.
POLL_INTERVAL = 0.2


@dataclass(frozen=True, slots=True)
class BurstOrder:
    """One order the burst placed, and the event its handlers are following."""

    order_id: str
    event_id: str


class BurstError(Exception):
    """The burst stopped: the server could not be reached or did not accept an order.
    ``placed`` holds the orders placed before that."""

    def __init__(self, message: str, placed: Sequence[BurstOrder]) -> None:
        super().__init__(message)
        self.placed = list(placed)


def order_body(index: int) -> dict[str, Any]:
    """The JSON body of the burst's *index*-th order."""
    cart = _CARTS[index % len(_CARTS)]
    return {
        "email": f"burst-{index + 1}@example.com",
        "items": [{"sku": sku, "quantity": quantity} for sku, quantity in cart],
    }


def place_burst(url: str, count: int, out: TextIO | None = None) -> list[BurstOrder]:
    """POST *count* orders to the server at *url*, one after the other; return them.

    Raises :class:`BurstError` if the server cannot be reached or answers anything but 201.
    """
    placed: list[BurstOrder] = []
    for index in range(count):
        request = urllib.request.Request(
            f"{url.rstrip('/')}/api/orders",
            data=json.dumps(order_body(index)).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "X-Request-ID": f"burst-{index + 1}"},
        )
        which = f"order {index + 1} of {count}"
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                reason = _error_message(exc.read())
            raise BurstError(f"{which}: {url} answered {exc.code}: {reason}", placed) from None
        except OSError as exc:  # URLError, refused or reset connections, timeouts
            reason = getattr(exc, "reason", None) or exc
            raise BurstError(
                f"{which}: cannot reach the server at {url} ({reason}); is `serve` running?",
                placed,
            ) from None
        except ValueError as exc:
            raise BurstError(
                f"{which}: {url} answered something not JSON ({exc})", placed
            ) from None
        order = BurstOrder(body["order"]["id"], body["event_id"])
        placed.append(order)
        if out is not None:
            skus = ", ".join(item["sku"] for item in body["order"]["items"])
            _say(out, f"  {order.order_id}  event {order.event_id}  {skus}")
    return placed


def save_burst(path: Path, orders: Sequence[BurstOrder]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"order_id": o.order_id, "event_id": o.event_id} for o in orders]
    path.write_text(json.dumps(rows, indent=1) + "\n")


def load_burst(path: Path) -> list[BurstOrder]:
    """The orders :func:`save_burst` wrote to *path*. Raises ``FileNotFoundError`` and
    ``ValueError`` (not a burst file) with a message that says what to do."""
    try:
        rows = json.loads(path.read_text())
        return [BurstOrder(str(row["order_id"]), str(row["event_id"])) for row in rows]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no burst file at {display_path(path)}: run `burst` first, or pass --burst FILE"
        ) from None
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{display_path(path)} is not a file `burst` saved ({exc!r})") from None


def _error_message(body: bytes) -> str:
    """The ``error`` of one of the API's JSON error bodies, else the body's start."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, TypeError, KeyError):
        return body[:200].decode(errors="replace").strip() or "(no body)"


def check(
    events_path: Path, orders: Sequence[BurstOrder], out: TextIO, *, wait: float = 0.0
) -> bool:
    """Print where each order's handlers stand in the event store at *events_path*; with
    *wait* > 0, first look again every ``POLL_INTERVAL`` s until all have settled or *wait*
    seconds passed. Returns whether every delivery has settled."""
    if not events_path.is_file():
        raise FileNotFoundError(
            f"no event store at {display_path(events_path)}: `serve` creates it; "
            "pass --events FILE if yours is elsewhere"
        )
    # Never opened for a bus, so it claims nothing; create=False: a database without the
    # store's tables (``serve --no-store``'s) is a ValueError, not a store created in it.
    store = SQLiteStore(events_path, create=False)
    try:
        deadline = time.monotonic() + wait
        pause = threading.Event()  # never set: wait() is an interruptible sleep between looks
        statuses = _statuses(store, orders)
        # Bounded polling of another process's progress, through the shared SQLite file.
        while not _all_settled(statuses) and time.monotonic() < deadline:
            pause.wait(POLL_INTERVAL)
            statuses = _statuses(store, orders)
        ours = {o.event_id for o in orders}
        dead_letters = [d for d in store.dead_letters() if d.event.id in ours]
    finally:
        store.close()
    _report(out, orders, statuses, len(dead_letters), events_path)
    return _all_settled(statuses)


def _statuses(
    store: SQLiteStore, orders: Sequence[BurstOrder]
) -> dict[str, Mapping[str, Delivery]]:
    return {o.event_id: store.status(o.event_id) or {} for o in orders}


def _all_settled(statuses: Mapping[str, Mapping[str, Delivery]]) -> bool:
    return all(
        deliveries and all(d.state in _SETTLED for d in deliveries.values())
        for deliveries in statuses.values()
    )


def _report(
    out: TextIO,
    orders: Sequence[BurstOrder],
    statuses: Mapping[str, Mapping[str, Delivery]],
    dead_letters: int,
    events_path: Path,
) -> None:
    totals: Counter[str] = Counter()
    rank = {name: i for i, name in enumerate(ALL_HANDLERS)}
    for order in orders:
        deliveries = statuses[order.event_id]
        totals.update(d.state for d in deliveries.values())
        if not deliveries:
            _say(out, f"  {order.order_id}  (no event in the store)")
            continue
        ok = sum(d.state == "succeeded" for d in deliveries.values())
        # Only what is worth a look: deliveries not settled, dead, or retried.
        notes = "  ".join(
            f"{name}={_short(d)}"
            for name, d in sorted(deliveries.items(), key=lambda kv: rank.get(kv[0], 99))
            if d.state != "succeeded" or d.attempts > 1
        )
        _say(out, f"  {order.order_id}  {ok}/{len(deliveries)} succeeded  {notes}".rstrip())
    summary = ", ".join(f"{totals[s]} {s}" for s in sorted(totals))
    settled = "all settled" if _all_settled(statuses) else "NOT all settled"
    _say(out, f"{len(orders)} orders, {sum(totals.values())} deliveries: {summary} ({settled})")
    hint = f"{python_command()} -m eventbus dead-letters list --store {display_path(events_path)}"
    _say(out, f"{dead_letters} dead letters, listed by: {hint}")


def _short(delivery: Delivery) -> str:
    state = {"succeeded": "ok", "dead": "DEAD"}.get(delivery.state, delivery.state)
    return state if delivery.attempts <= 1 else f"{state}({delivery.attempts})"


def _say(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()
