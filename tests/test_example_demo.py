"""The order-service demo: its summary agrees with the bus's own records, and the command runs.
The example's README, the story users read first, is held to the commands that work."""

from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import pytest

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
from examples.order_service.wiring import build_app, display_path
from tests.support.children import run_order_service

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
    completed = run_order_service(
        "demo",
        "--db",
        str(tmp_path / "orders.sqlite3"),
        "--outbox",
        str(tmp_path / "outbox"),
        "--latency",
        "0",
        "--backoff",
        "0",
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


EXAMPLE_DIR = ROOT / "examples" / "order_service"
README = EXAMPLE_DIR / "README.md"


def _console_commands(text: str) -> list[str]:
    """The commands (after ``$ ``) of a Markdown text's ``console`` blocks."""
    blocks = re.findall(r"```console\n(.*?)```", text, flags=re.DOTALL)
    return [line[2:] for block in blocks for line in block.splitlines() if line.startswith("$ ")]


def test_readme_runs_python_from_the_virtual_environment() -> None:
    """Every Python command the example's README shows, in its console blocks and in its
    text, runs the virtual environment's interpreter (.venv/bin/python or .venv/bin/pytest),
    never a bare `python` that has no eventbus outside that environment."""
    text = README.read_text()
    commands = [c for c in _console_commands(text) if re.search(r"\b(python|pytest)\b", c)]
    assert len(commands) > 10
    bare = [c for c in commands if not c.startswith((".venv/bin/python -m ", ".venv/bin/pytest "))]
    # A one-off script to make a test body is plain python3, outside the example's commands.
    assert [c for c in bare if not c.startswith("python3 -c ")] == []
    assert re.findall(r"(?<![/\w])(?:python|pytest) (?:-m )?[\w.]+", text) == []


def test_readme_starts_from_a_clean_var_directory() -> None:
    """The README gives the command that empties examples/order_service/var before a run."""
    assert "rm -rf examples/order_service/var" in _console_commands(README.read_text())


def test_example_text_speaks_of_the_product_only() -> None:
    """The example's README and sources name no local absolute path, no issue number and no
    host name of a machine a run happened on (consumer names use the placeholder myhost)."""
    texts = {path: path.read_text() for path in sorted(EXAMPLE_DIR.glob("*.py"))}
    texts[README] = README.read_text()
    for path, text in texts.items():
        assert not re.search(r"(?<![\w.])/(?:work|home|root|Users|tmp)/", text), path
        assert not re.search(r"\bissues? ?#?\d+", text, flags=re.IGNORECASE), path
    hosts = re.findall(r"(?:name  |consumer=)([\w.-]+):\d+:", texts[README])
    assert hosts
    assert set(hosts) == {"myhost"}


def test_commands_print_paths_relative_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paths under the current directory are printed relative to it (what the README shows
    when run from the repository root); others stay as they are."""
    monkeypatch.chdir(tmp_path)
    assert display_path(tmp_path / "var" / "orders.sqlite3") == "var/orders.sqlite3"
    assert display_path("/elsewhere/orders.sqlite3") == "/elsewhere/orders.sqlite3"
    assert display_path(":memory:") == ":memory:"
