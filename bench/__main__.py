"""``python -m bench``: every scenario, in one process and one run; prints the results table,
each result with its ratio to a reference in the same run. See ``docs/benchmarks.md``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from bench._harness import FULL, QUICK, Row, Section, Sizes, configure_structlog


def scenarios() -> list[tuple[str, Callable[[Sizes], Section]]]:
    """Every scenario, in the order of the report."""
    from bench import (
        asyncio_dispatch,
        dispatch,
        durable,
        latency,
        memory,
        policies,
        postgres,
        rabbitmq,
        redis_streams,
        retry_storm,
        subscriptions,
        tracing,
    )

    return [
        ("thread dispatch, 1 handler", lambda s: dispatch.thread_dispatch(s, 1)),
        ("thread dispatch, 4 handlers", lambda s: dispatch.thread_dispatch(s, 4)),
        ("thread dispatch, 2 workers", dispatch.thread_dispatch_two_workers),
        ("instrumentation (OpenTelemetry)", tracing.instrumentation),
        ("emit() latency", latency.emit_latency),
        ("emit cost vs subscriptions", subscriptions.subscription_growth),
        ("inline mode", dispatch.inline),
        ("keyed dispatch, 500 keys", policies.keyed),
        ("concurrency=16", policies.concurrency),
        ("asyncio: 1,000 sleeping handlers", asyncio_dispatch.sleepers),
        ("asyncio dispatch, 4 handlers", asyncio_dispatch.async_dispatch),
        ("aemit() latency", asyncio_dispatch.aemit_latency),
        ("retry storm", retry_storm.retry_storm),
        ("durable (SQLite)", durable.durable),
        ("PostgresStore", postgres.postgres_store),
        ("emit(within=) round trips", postgres.within_round_trips),
        ("commit -> handler start (within=)", postgres.commit_to_handler),
        ("multi-process (Redis)", redis_streams.multi_process),
        ("RabbitMQ transport", rabbitmq.rabbitmq_transport),
        ("memory", memory.memory),
        ("handler weight (info)", dispatch.latch_sensitivity),
    ]


#: Run first, while this process is small (its child's ru_maxrss starts at our RSS).
RUN_FIRST = ("memory",)


def run(sizes: Sizes, progress: Callable[[str], None]) -> list[Row]:
    configure_structlog()
    ordered = scenarios()
    order = sorted(range(len(ordered)), key=lambda i: ordered[i][0] not in RUN_FIRST)
    sections: dict[int, Section] = {}
    for i in order:
        title, scenario = ordered[i]
        start = time.perf_counter()
        sections[i] = scenario(sizes)
        progress(f"  {title}: {time.perf_counter() - start:.1f} s")
    rows: list[Row] = []
    for i in range(len(ordered)):
        rows += sections[i].rows
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (< 30 s)")
    parser.add_argument("--json", metavar="PATH", help="write machine-readable results here")
    parser.add_argument("--chart", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    args = parser.parse_args(argv)

    from bench import report

    sizes = QUICK if args.quick else FULL
    info = report.machine()
    mode = "quick smoke run: numbers are NOT meaningful" if args.quick else "full run"
    print(f"running every scenario ({mode}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    rows = run(sizes, lambda line: print(line, file=sys.stderr, flush=True))
    info["seconds"] = round(time.perf_counter() - start, 1)
    info["sizes"] = vars(sizes)
    print(report.text_report(info, rows))
    print(f"\n{mode}; took {info['seconds']} s")
    if args.json:
        report.write_json(args.json, info, rows, args.quick)
    if args.markdown:
        report.write_markdown(args.markdown, info, rows)
    if args.chart:
        skipped = report.write_chart(args.chart, rows)
        print(skipped or f"chart written to {args.chart}")
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
