"""The order-service demo: its summary agrees with the bus's own records, and the command runs."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from examples.order_service.demo import HandlerStats, demo_settings, run_demo
from examples.order_service.handlers import (
    AUDIT_LOG,
    NOTIFY_WAREHOUSE,
    RESERVE_INVENTORY,
    SEND_CONFIRMATION_EMAIL,
    SEND_SHIPPING_NOTIFICATION,
    TRACK_ANALYTICS,
    UPDATE_ORDER_STATUS,
)
from examples.order_service.wiring import build_app

ROOT = Path(__file__).resolve().parents[1]

#: handler -> (deliveries, succeeded, retried, dead-lettered, attempts), as the story goes.
EXPECTED = {
    AUDIT_LOG: (6, 6, 0, 0, 6),
    SEND_CONFIRMATION_EMAIL: (4, 4, 0, 0, 4),
    RESERVE_INVENTORY: (4, 3, 1, 1, 6),
    NOTIFY_WAREHOUSE: (4, 3, 1, 1, 6),
    TRACK_ANALYTICS: (4, 4, 0, 0, 4),
    SEND_SHIPPING_NOTIFICATION: (2, 2, 0, 0, 2),
    UPDATE_ORDER_STATUS: (2, 2, 0, 0, 2),
}


def parse_table(report: str) -> dict[str, tuple[int, ...]]:
    """The per-handler rows of the printed table."""
    rows = re.findall(r"^\s+([a-z_]+)((?:\s+\d+){5})$", report, flags=re.MULTILINE)
    return {name: tuple(int(n) for n in numbers.split()) for name, numbers in rows}


def test_demo_summary_matches_the_bus_records(tmp_path: Path) -> None:
    """The counts the demo prints and returns are those of bus.status and bus.dead_letters."""
    settings = demo_settings(
        db_path=tmp_path / "orders.sqlite3", outbox_dir=tmp_path / "outbox", latency=0, backoff=0
    )
    out = io.StringIO()
    with build_app(settings) as app:
        result = run_demo(app, out)
        bus = app.bus
        # Recount from the bus, independently of the demo's own summarise().
        recount: dict[str, Counter[str]] = {}
        for event_id in result.event_ids:
            for handler, delivery in bus.status(event_id).items():
                c = recount.setdefault(handler, Counter())
                c["deliveries"] += 1
                c[delivery.state] += 1
                c["retried"] += delivery.attempts > 1
                c["attempts"] += delivery.attempts
        dead_letters = bus.dead_letters()

    assert result.drained
    assert len(result.event_ids) == 6
    assert {name: row[1:] for name, row in _rows(result.stats).items()} == EXPECTED
    for name, counts in recount.items():
        assert _rows(result.stats)[name][1:] == (
            counts["deliveries"],
            counts["succeeded"],
            counts["retried"],
            counts["dead"],
            counts["attempts"],
        )
    assert sorted((d.handler, d.reason) for d in dead_letters) == [
        (NOTIFY_WAREHOUSE, "exhausted"),
        (RESERVE_INVENTORY, "not_retryable"),
    ]
    assert result.dead_letters == dead_letters
    for name, stats in result.stats.items():
        assert stats.dead_lettered == sum(d.handler == name for d in dead_letters)

    report = out.getvalue()
    assert parse_table(report) == EXPECTED
    assert "Dead letters (2)" in report
    assert f"Emails (6) written to {settings.outbox_dir}" in report
    assert len(result.emails) == 6
    assert all(path.is_file() and path.parent == settings.outbox_dir for path in result.emails)


def test_demo_command_exits_zero_and_prints_the_summary(tmp_path: Path) -> None:
    """`python -m examples.order_service demo` exits 0 and prints the table and dead letters."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.order_service",
            "demo",
            "--db",
            str(tmp_path / "orders.sqlite3"),
            "--outbox",
            str(tmp_path / "outbox"),
            "--latency",
            "0",
            "--backoff",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert parse_table(completed.stdout) == EXPECTED
    assert "handler.dead_lettered" in completed.stderr
    assert "request_id=demo-" in completed.stderr
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 6


def _rows(stats: dict[str, HandlerStats]) -> dict[str, tuple[str | int, ...]]:
    return {
        name: (s.handler, s.deliveries, s.succeeded, s.retried, s.dead_lettered, s.attempts)
        for name, s in stats.items()
    }
