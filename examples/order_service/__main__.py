"""Command line: ``python -m examples.order_service {demo,serve} [options]`` (from the repo root).

* ``demo``: place orders, ship some, drain, print a per-handler summary and the dead letters.
* ``serve``: the HTTP API (``--port``, default 8000) until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from examples.order_service.demo import DEMO_BACKOFF, demo_settings, run_demo
from examples.order_service.logging_setup import configure_logging
from examples.order_service.server import serve
from examples.order_service.wiring import VAR_DIR, Settings, build_app


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.order_service",
        description="The eventbus order-service example.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="log JSON lines instead of text")
    common.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    common.add_argument(
        "--db", type=Path, default=VAR_DIR / "orders.sqlite3", help="SQLite file (created)"
    )
    common.add_argument(
        "--outbox", type=Path, default=VAR_DIR / "outbox", help="folder the emails go to"
    )
    common.add_argument(
        "--latency",
        type=float,
        default=1.0,
        help="scale the fake services' latency (0 = instant; default 1)",
    )
    common.add_argument(
        "--tracebacks", action="store_true", help="show the traceback of every failed attempt"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", parents=[common], help="run the demo and print a summary per handler"
    )
    demo.add_argument(
        "--backoff",
        type=float,
        default=DEMO_BACKOFF,
        help=f"seconds between attempts (default {DEMO_BACKOFF})",
    )
    server = commands.add_parser("serve", parents=[common], help="serve the HTTP API")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(json=args.json, level=args.log_level, tracebacks=args.tracebacks)
    if args.command == "demo":
        settings = demo_settings(
            db_path=args.db, outbox_dir=args.outbox, latency=args.latency, backoff=args.backoff
        )
        with build_app(settings) as app:
            result = run_demo(app, sys.stdout)
        return 0 if result.drained else 1
    settings = Settings(db_path=args.db, outbox_dir=args.outbox, latency=args.latency)
    return serve(settings, host=args.host, port=args.port)


if __name__ == "__main__":
    sys.exit(main())
