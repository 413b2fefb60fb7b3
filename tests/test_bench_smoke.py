"""Smoke test of the benchmark suite: `python -m bench --quick` runs every scenario and reports
a complete, well-formed result. No timing assertions: only structure and counts."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.postgres import find_postgres_bin
from tests.support.rabbitmq import find_rabbitmq_server
from tests.support.redis import find_redis_server

# `python -m bench --quick` runs every scenario: real redis-server, PostgreSQL and RabbitMQ
# servers and consumer processes.
pytestmark = [pytest.mark.integration, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parent.parent

SCENARIOS = (
    "thread dispatch, 1 handler",
    "thread dispatch, 4 handlers",
    "instrumentation, 4 handlers",
    "instrumentation off, one emit() call, no handlers",
    "emit() latency p50, 4 handlers, workers busy",
    "emit() latency p99, 4 handlers, workers busy",
    "emit cost vs subscriptions, 4 matching",
    "inline (sync), 4 handlers",
    "keyed dispatch, 500 keys, 4 handlers",
    "concurrency=16, 4 handlers",
    "1,000 async handlers, each awaiting asyncio.sleep(0.1)",
    "async dispatch, 4 handlers",
    "aemit() latency p50, 4 async handlers, loop busy",
    "aemit() latency p99, 4 async handlers, loop busy",
    "retry storm, 4 handlers, zero backoff",
    "durable (SQLite), 4 handlers",
    "durable (SQLite) emit() latency p50, 4 handlers",
    "durable (SQLite) emit() latency p99, 4 handlers",
    "PostgresStore, 4 handlers",
    "emit(within=) round trips",
    "commit -> handler start latency (within=) p50",
    "multi-process (Redis), 4 handlers",
    "multi-process (Redis), 4 handlers waiting 2 ms (I/O-like)",
    "RabbitMQ transport, 1 handler",
    "memory, 20,000 events x 4 handlers",
    "info: thread dispatch, 4 handlers taking a lock",
)
THREAD_DISPATCHERS = {
    "plain loop (sync floor)",
    "pyee EventEmitter.emit (sync)",
    "blinker Signal.send (sync)",
    "SimpleQueue + 8 threads (thread floor)",
    "ThreadPoolExecutor.submit per handler",
    "pyee ExecutorEventEmitter",
    "eventbus EventBus(max_workers=8)",
}
#: Whether the multi-process (Redis) scenario can run here (else its rows say "skipped").
REDIS = find_redis_server() is not None and importlib.util.find_spec("redis") is not None
REDIS_SCENARIOS = (
    "multi-process (Redis), 4 handlers",
    "multi-process (Redis), 4 handlers waiting 2 ms (I/O-like)",
)
#: Whether the PostgreSQL scenarios can run here (else each has one "skipped" row).
POSTGRES = find_postgres_bin() is not None and all(
    importlib.util.find_spec(name) is not None for name in ("psycopg", "psycopg_pool")
)
POSTGRES_SCENARIOS = (
    "PostgresStore, 4 handlers",
    "emit(within=) round trips",
    "commit -> handler start latency (within=) p50",
)
#: Whether the RabbitMQ transport scenario can run here (else its one row says "skipped").
RABBITMQ = find_rabbitmq_server() is not None and importlib.util.find_spec("pika") is not None
RABBITMQ_SCENARIO = "RabbitMQ transport, 1 handler"


def _available(scenario: str) -> bool:
    """Whether the server *scenario* needs can run here."""
    if scenario in POSTGRES_SCENARIOS:
        return POSTGRES
    if scenario == RABBITMQ_SCENARIO:
        return RABBITMQ
    return REDIS


def _bench(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    code = f"{prelude}import sys\nfrom bench.__main__ import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("bench")
    result_path, chart_path = out / "results.json", out / "chart.png"
    proc = _bench("--quick", "--json", str(result_path), "--chart", str(chart_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(result_path.read_text()), proc.stdout, chart_path


def test_every_scenario_is_reported(quick: tuple[dict[str, Any], str, Path]) -> None:
    """Every scenario, and every thread dispatcher in the dispatch ones, is in the report."""
    doc, stdout, _ = quick
    assert doc["quick"] is True
    scenarios = {row["scenario"] for row in doc["results"]}
    for scenario in SCENARIOS:
        assert scenario in scenarios
        assert scenario in stdout
    for k in (1, 4):
        name = f"thread dispatch, {k} handler{'s' if k > 1 else ''}"
        assert {r["dispatcher"] for r in doc["results"] if r["scenario"] == name} == (
            THREAD_DISPATCHERS
        )


def test_instrumentation_rows(quick: tuple[dict[str, Any], str, Path]) -> None:
    """The instrumentation scenario reports the untraced body, off, off again and on, each
    as a ratio to the untraced body; then one emit() call against one untraced call, and the
    difference as a share of the untraced body's dispatch."""
    doc, _, _ = quick
    rows = [r for r in doc["results"] if r["scenario"] == "instrumentation, 4 handlers"]
    reference = "eventbus, emit's untraced body (no tracing code on the path)"
    assert [r["dispatcher"] for r in rows] == [
        reference,
        "eventbus emit(), never instrumented",
        "eventbus emit(), instrumented then uninstrumented",
        "info: eventbus emit(), instrumented, no-op providers",
        "info: eventbus emit(), instrumented, SDK providers (no exporter)",
    ]
    assert {r["ratio_to"] for r in rows} == {reference}
    assert rows[0]["ratio"] == 1.0
    calls = [
        r
        for r in doc["results"]
        if r["scenario"] == "instrumentation off, one emit() call, no handlers"
    ]
    assert [(r["dispatcher"], r["unit"]) for r in calls] == [
        ("eventbus, emit's untraced body", "ns/call"),
        ("eventbus emit(), never instrumented", "ns/call"),
        (f"the difference, as a share of '{reference}' above", "% of us/event"),
    ]
    detail = calls[2]["detail"]
    assert detail["extra_ns_per_emit"] == pytest.approx(calls[1]["value"] - calls[0]["value"])
    assert detail["dispatch_us_per_event"] == rows[0]["value"]
    share = detail["extra_ns_per_emit"] / (rows[0]["value"] * 1e3) * 100
    assert calls[2]["value"] == pytest.approx(share)


def test_numbers_are_positive_and_counts_match(quick: tuple[dict[str, Any], str, Path]) -> None:
    """Every measured value is finite and positive, and every scenario handled what it sent."""
    doc, _, _ = quick
    for row in doc["results"]:
        if row["dispatcher"].startswith("skipped:"):
            assert not _available(row["scenario"]), row
            continue
        assert math.isfinite(row["value"]), row
        if row["unit"] == "% of us/event":  # a difference: below zero when noise wins
            continue
        assert row["value"] > 0, row
        assert row["ok"] is True, row
        if row["ratio"] is not None:
            assert math.isfinite(row["ratio"]), row
            assert row["ratio"] > 0, row
        detail = row["detail"]
        if "expected" in detail:
            assert detail["handled"] == detail["expected"] > 0, row
    memory = next(r for r in doc["results"] if r["scenario"].startswith("memory"))["detail"]
    assert memory["emitted"] == memory["events"] == 20_000
    assert memory["handled_deliveries"] == memory["expected_deliveries"] == 4 * 20_000
    assert memory["mode"] in {"max_pending", "batches+drain"}
    subs = next(
        r
        for r in doc["results"]
        if r["scenario"].startswith("emit cost vs") and "400 subscriptions" in r["dispatcher"]
    )
    assert subs["detail"]["non_matching_handler_calls"] == 0
    storm = next(r for r in doc["results"] if r["dispatcher"].endswith("fails once"))
    assert storm["detail"]["dead_letters"] == 0
    durable = [r for r in doc["results"] if r["scenario"] == "durable (SQLite), 4 handlers"]
    assert len(durable) == 3
    for row in durable:
        detail = row["detail"]
        assert detail["stored_events"] * 4 == detail["stored_succeeded_deliveries"]
        assert detail["stored_succeeded_deliveries"] == detail["expected"]
    _check_postgres_rows(doc["results"])
    _check_rabbitmq_rows(doc["results"])
    redis_rows = [r for r in doc["results"] if r["scenario"] in REDIS_SCENARIOS]
    if not REDIS:
        assert len(redis_rows) == 2
        assert all(r["dispatcher"].startswith("skipped: ") for r in redis_rows)
        return
    assert len(redis_rows) == 8
    for row in redis_rows:
        detail = row["detail"]
        processes = 3 if "3 consumer processes" in row["dispatcher"] else 1
        assert all(len(trial) == processes for trial in detail["handled_per_consumer"]), row
        assert sum(map(sum, detail["handled_per_consumer"])) == detail["expected"], row
        assert detail["expected"] == 4 * detail["events_per_trial"], row  # 1 round when quick


def _check_rabbitmq_rows(results: list[dict[str, Any]]) -> None:
    """The RabbitMQ rows: one "skipped" row without RabbitMQ, else eventbus and the raw pika
    loop with 1 and 3 consumer processes, every event handled exactly once, split over the
    processes each trial used."""
    rows = [r for r in results if r["scenario"] == RABBITMQ_SCENARIO]
    if not RABBITMQ:
        assert len(rows) == 1, rows
        assert rows[0]["dispatcher"].startswith("skipped: "), rows
        return
    assert len(rows) == 4, rows
    assert sum(r["dispatcher"].startswith("eventbus RabbitMQTransport") for r in rows) == 2
    for row in rows:
        detail = row["detail"]
        processes = 3 if "3 consumer processes" in row["dispatcher"] else 1
        assert all(len(trial) == processes for trial in detail["handled_per_consumer"]), row
        assert sum(map(sum, detail["handled_per_consumer"])) == detail["expected"], row
        assert detail["expected"] == detail["events_per_trial"], row  # 1 round when quick
        assert row["ratio_to"] == (
            f"raw pika confirm-publish / basic_consume+ack loop, {processes} consumer process"
            + ("es" if processes > 1 else "")
        ), row


def _check_postgres_rows(results: list[dict[str, Any]]) -> None:
    """The PostgreSQL rows: one "skipped" row per scenario without PostgreSQL, else the store's
    three rows read back complete, the round trips counted for every traced emit, and each
    commit's handler timed."""
    rows = [r for r in results if r["scenario"] in POSTGRES_SCENARIOS]
    if not POSTGRES:
        assert len(rows) == 3, rows
        assert all(r["dispatcher"].startswith("skipped: ") for r in rows), rows
        return
    store = [r for r in rows if r["scenario"] == "PostgresStore, 4 handlers"]
    assert len(store) == 3
    for row in store:
        detail = row["detail"]
        assert detail["stored_events"] * 4 == detail["stored_succeeded_deliveries"]
        assert detail["stored_succeeded_deliveries"] == detail["expected"]
    counted = {r["dispatcher"]: r for r in rows if r["scenario"] == "emit(within=) round trips"}
    assert len(counted) == 2
    for row in counted.values():
        assert len(row["samples"]) == row["detail"].get("emits", row["detail"].get("inserts"))
    timed = [r for r in results if r["scenario"].startswith("emit(within=) latency")]
    assert len(timed) == 3
    assert all(r["ratio_to"] == "SELECT 1 in the same transaction" for r in timed)
    latency = [r for r in results if r["scenario"].startswith("commit -> handler start")]
    assert len(latency) == 4  # p50 and p99, PostgreSQL and SQLite
    for row in latency:
        assert len(row["samples"]) == row["detail"]["commits"] == row["detail"]["handled"]


def test_machine_and_logging_set_up_are_reported(
    quick: tuple[dict[str, Any], str, Path],
) -> None:
    """The report names the machine and the structlog configuration the numbers were taken with."""
    doc, stdout, _ = quick
    machine = doc["machine"]
    assert machine["nproc"] >= 1
    assert machine["cpu"]
    assert machine["python"]
    assert machine["date"]
    assert "make_filtering_bound_logger(logging.WARNING)" in machine["structlog"]
    assert "WARNING" in stdout


def test_report_holds_measurements_only(quick: tuple[dict[str, Any], str, Path]) -> None:
    """The printed report and the JSON hold results and ratios, with no pass/fail verdicts."""
    doc, stdout, _ = quick
    assert set(doc) == {"quick", "machine", "results"}
    for word in ("PASS", "MISS", "target", "Target"):
        assert word not in stdout


def test_chart_is_written_or_skipped_with_a_message(
    quick: tuple[dict[str, Any], str, Path],
) -> None:
    """The chart is a PNG file, or its absence is explained by a missing matplotlib."""
    _, stdout, chart = quick
    if "chart skipped" in stdout:
        assert "matplotlib" in stdout
        assert not chart.exists()
    else:
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chart_without_matplotlib_is_skipped(tmp_path: Path) -> None:
    """Without matplotlib the quick run still exits 0, writes no chart and says why."""
    chart = tmp_path / "chart.png"
    # The quick run again, with matplotlib made unimportable.
    proc = _bench(
        "--quick", "--chart", str(chart), prelude="import sys\nsys.modules['matplotlib'] = None\n"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "chart skipped: matplotlib is not installed" in proc.stdout
    assert not chart.exists()


def test_redis_scenario_without_redis_server_is_skipped_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without redis-server on PATH the Redis rows say "skipped" and stderr says so loudly."""
    from bench._harness import QUICK
    from bench.redis_streams import multi_process

    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on it
    section = multi_process(QUICK)
    assert {r.scenario for r in section.rows} == set(REDIS_SCENARIOS)
    for row in section.rows:
        assert row.dispatcher == "skipped: redis-server not installed"
        assert row.ok is True
    assert "multi-process (Redis) scenario SKIPPED: redis-server not installed" in (
        capsys.readouterr().err
    )


def test_postgres_scenarios_without_postgresql_are_skipped_loudly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without PostgreSQL each PostgreSQL scenario is one "skipped" row, stderr says so once,
    and the SQLite half of the commit -> handler scenario is still measured."""
    import bench.postgres
    import tests.support.postgres
    from bench._harness import QUICK

    monkeypatch.setattr(tests.support.postgres, "find_postgres_bin", lambda: None)
    monkeypatch.setattr(bench.postgres, "_warned", set())
    skipped = "skipped: PostgreSQL (initdb, postgres) not installed"
    for scenario, run in (
        ("PostgresStore, 4 handlers", bench.postgres.postgres_store),
        ("emit(within=) round trips", bench.postgres.within_round_trips),
    ):
        (row,) = run(QUICK).rows
        assert (row.scenario, row.dispatcher, row.ok) == (scenario, skipped, True)
    rows = bench.postgres.commit_to_handler(QUICK).rows
    assert rows[0].dispatcher == skipped
    assert rows[0].scenario == "commit -> handler start latency (within=) p50"
    sqlite = rows[1:]
    assert {r.dispatcher for r in sqlite} == {bench.postgres.SQLITE_WITHIN}
    assert all(r.ok and r.value > 0 for r in sqlite)
    assert capsys.readouterr().err.count("PostgreSQL scenarios SKIPPED") == 1


def test_rabbitmq_scenario_without_rabbitmq_is_skipped_loudly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without rabbitmq-server the RabbitMQ scenario is one "skipped" row and stderr says so."""
    import tests.support.rabbitmq
    from bench._harness import QUICK
    from bench.rabbitmq import rabbitmq_transport

    monkeypatch.setattr(tests.support.rabbitmq, "find_rabbitmq_server", lambda: None)
    (row,) = rabbitmq_transport(QUICK).rows
    assert (row.scenario, row.dispatcher, row.ok) == (
        RABBITMQ_SCENARIO,
        "skipped: rabbitmq-server not installed",
        True,
    )
    assert "RabbitMQ transport scenario SKIPPED: rabbitmq-server not installed" in (
        capsys.readouterr().err
    )
