"""Command line: ``.venv/bin/python -m examples.order_service COMMAND [options]``, from the
repository root (``make example`` creates ``.venv``).

* ``demo``: place orders, ship some, drain, print a per-handler summary and the dead letters.
  ``demo --trace`` (and ``serve --trace``) also writes OpenTelemetry spans to stderr, one
  trace per order (needs ``opentelemetry-sdk``; see ``tracing.py``).
* ``serve``: the HTTP API (``--port``, default 8000) until Ctrl-C or SIGTERM; durable: its
  event store is in the orders database, ``var/orders.sqlite3`` (each order is committed with
  its event), and a restart picks up what a crash left.
* ``burst``: place a burst of orders through a running server (``--orders``, ``--url``).
* ``check``: where the burst's handlers stand, read from the event store (``--wait``).
* ``serve --redis URL`` and ``worker --redis URL``: the API and the handlers as separate
  processes sharing one Redis stream (and the orders database); the API commits each event
  to its outbox with the order and relays it to Redis; see ``worker.py``.
* ``serve --amqp URL`` and ``worker --amqp URL``: the same through RabbitMQ (a topic
  exchange, ``--exchange``, and one queue shared by the workers' ``--group``). One transport
  at a time: ``--redis`` and ``--amqp`` together are refused.

A command that cannot do its job prints one line, ``<prog> <command>: error: <what to do>``,
on stderr and exits with :data:`EXIT_USAGE` (2: a bad option, a missing file) or
:data:`EXIT_FAILURE` (1: the server, Redis or RabbitMQ cannot be reached).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from eventbus import TransportError
from examples.order_service.burst import BurstError, check, load_burst, place_burst, save_burst
from examples.order_service.demo import (
    DEMO_BACKOFF,
    DEMO_DB,
    demo_settings,
    remove_database,
    run_demo,
)
from examples.order_service.logging_setup import configure_logging
from examples.order_service.server import serve
from examples.order_service.tracing import TracingUnavailableError, console_tracer_provider
from examples.order_service.wiring import (
    VAR_DIR,
    Settings,
    build_app,
    display_path,
    display_url,
    python_command,
)
from examples.order_service.worker import run_worker

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

BURST_FILE = VAR_DIR / "burst.json"
#: The orders database of ``serve``, ``worker`` and ``check``: orders and events in one file.
ORDERS_DB = VAR_DIR / "orders.sqlite3"
#: Exit statuses besides 0: a usage or configuration problem, and a failure to do the job.
EXIT_USAGE = 2
EXIT_FAILURE = 1
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_AMQP_SCHEMES = ("amqp", "amqps")


class CommandError(Exception):
    """A command cannot do its job: a one-line message for stderr, and the exit status."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def _prog() -> str:
    return f"{python_command()} -m examples.order_service"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="The eventbus order-service example.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="log JSON lines instead of text")
    common.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    common.add_argument(
        "--db",
        type=Path,
        default=None,
        help="the SQLite file of the orders and their events (created; default: "
        f"{display_path(ORDERS_DB)}, the demo's {display_path(DEMO_DB)}, emptied before each run)",
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
    traced = argparse.ArgumentParser(add_help=False)
    traced.add_argument(
        "--trace",
        action="store_true",
        help="write OpenTelemetry spans to stderr, one trace per order (needs opentelemetry-sdk)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", parents=[common, traced], help="run the demo and print a summary per handler"
    )
    demo.add_argument(
        "--backoff",
        type=float,
        default=DEMO_BACKOFF,
        help=f"seconds between attempts (default {DEMO_BACKOFF})",
    )
    split = argparse.ArgumentParser(add_help=False)
    split.add_argument(
        "--redis",
        metavar="URL",
        default=None,
        help="the Redis the events go through (redis://host:port/db)",
    )
    split.add_argument(
        "--amqp",
        metavar="URL",
        default=None,
        help="the RabbitMQ the events go through, instead of Redis "
        "(amqp://user:password@host:5672/)",
    )
    split.add_argument(
        "--stream", default="orders", help="the Redis stream (with --redis; default orders)"
    )
    split.add_argument(
        "--exchange",
        default="orders",
        help="the RabbitMQ topic exchange (with --amqp; default orders)",
    )
    split.add_argument(
        "--group",
        default="order-service",
        help="the workers' consumer group: with --amqp, their queue is <exchange>.<group> "
        "(default order-service)",
    )
    split.add_argument(
        "--claim-idle",
        type=float,
        default=30.0,
        help="seconds before a stopped worker's entries are taken over (with --redis; default 30)",
    )
    server = commands.add_parser(
        "serve",
        parents=[common, split, traced],
        help="serve the HTTP API (with --redis or --amqp: publish only; workers run the handlers)",
    )
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    server.add_argument(
        "--no-store",
        action="store_true",
        help="no event store: deliveries live in memory and a crash loses them",
    )
    worker = commands.add_parser(
        "worker",
        parents=[common, split],
        help="run the handlers, consuming a Redis stream (--redis) or a RabbitMQ queue (--amqp)",
    )
    worker.add_argument(
        "--workers", type=int, default=8, help="handler threads in this process (default 8)"
    )
    burst = commands.add_parser("burst", help="place a burst of orders through a running server")
    burst.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    burst.add_argument("--orders", type=int, default=20, help="how many (default 20)")
    burst.add_argument(
        "--save", type=Path, default=BURST_FILE, help="where the order and event ids go"
    )
    checker = commands.add_parser(
        "check", help="where the handlers of the burst's orders stand, from the event store"
    )
    checker.add_argument(
        "--events",
        type=Path,
        default=ORDERS_DB,
        help="the event store: the orders database of `serve` (its --db)",
    )
    checker.add_argument("--burst", type=Path, default=BURST_FILE, help="the file burst saved")
    checker.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="look again until every delivery settled, up to SECONDS (default: look once)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command *argv* names (default: ``sys.argv``); return the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except CommandError as error:
        print(f"{_prog()} {args.command}: error: {error}", file=sys.stderr, flush=True)
        return error.exit_status


def _run(args: argparse.Namespace) -> int:
    if args.command == "burst":
        return _burst(args)
    if args.command == "check":
        try:
            orders = load_burst(args.burst)
            settled = check(args.events, orders, sys.stdout, wait=args.wait)
        except (FileNotFoundError, ValueError) as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
        return 0 if settled else EXIT_FAILURE
    if args.command in ("serve", "worker"):
        _check_transport(args)
    tracer_provider = None
    if getattr(args, "trace", False):
        try:
            tracer_provider = console_tracer_provider()
        except TracingUnavailableError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None
    configure_logging(json=args.json, level=args.log_level, tracebacks=args.tracebacks)
    try:
        return _run_app(args, tracer_provider)
    finally:
        if tracer_provider is not None:
            tracer_provider.shutdown()


def _run_app(args: argparse.Namespace, tracer_provider: TracerProvider | None) -> int:
    """``demo``, ``worker`` and ``serve``."""
    if args.command == "demo":
        settings = demo_settings(
            db_path=args.db, outbox_dir=args.outbox, latency=args.latency, backoff=args.backoff
        )
        remove_database(settings)  # each run starts from an empty database: same story
        with build_app(settings, tracer_provider=tracer_provider) as app:
            result = run_demo(app, sys.stdout)
        return 0 if result.drained else 1
    if args.command == "worker":
        return _worker(
            Settings(
                db_path=args.db or ORDERS_DB,
                outbox_dir=args.outbox,
                latency=args.latency,
                max_workers=args.workers,
                redis_url=args.redis,
                redis_stream=args.stream,
                redis_group=args.group,
                claim_idle=args.claim_idle,
                amqp_url=args.amqp,
                amqp_exchange=args.exchange,
                amqp_group=args.group,
            )
        )
    settings = Settings(
        db_path=args.db or ORDERS_DB,
        outbox_dir=args.outbox,
        latency=args.latency,
        durable=not args.no_store,
        redis_url=args.redis,
        redis_stream=args.stream,
        redis_group=args.group,
        claim_idle=args.claim_idle,
        amqp_url=args.amqp,
        amqp_exchange=args.exchange,
        amqp_group=args.group,
    )
    return serve(settings, host=args.host, port=args.port, tracer_provider=tracer_provider)


def _burst(args: argparse.Namespace) -> int:
    print(f"Placing {args.orders} orders through {args.url}:", flush=True)
    try:
        orders = place_burst(args.url, args.orders, sys.stdout)
    except BurstError as exc:
        if exc.placed:
            save_burst(args.save, exc.placed)
        raise CommandError(str(exc), EXIT_FAILURE) from None
    save_burst(args.save, orders)
    print(f"{len(orders)} orders placed; their ids are in {display_path(args.save)}", flush=True)
    return 0


def _worker(settings: Settings) -> int:
    try:
        return run_worker(settings)
    except TransportError as exc:
        message = str(exc).rstrip(". :")  # pika's connection errors may add nothing after ":"
        server = "redis-server" if settings.redis_url is not None else "rabbitmq-server"
        raise CommandError(f"{message} (is {server} running?)", EXIT_FAILURE) from None


def _check_transport(args: argparse.Namespace) -> None:
    """``serve`` and ``worker``: at most one transport (a worker needs one), each with a URL
    of its kind; the API's outbox is the event store, so no ``--no-store`` with one."""
    if args.redis is not None and args.amqp is not None:
        raise CommandError(
            "--redis and --amqp: the events go through one transport; pick one", EXIT_USAGE
        )
    if args.redis is not None:
        _check_redis_url(args.redis)
    if args.amqp is not None:
        _check_amqp_url(args.amqp)
    option = "--redis" if args.redis is not None else "--amqp" if args.amqp is not None else None
    if args.command == "worker" and option is None:
        raise CommandError(
            "a worker consumes a transport: pass --redis URL or --amqp URL", EXIT_USAGE
        )
    if args.command == "serve" and option is not None and args.no_store:
        raise CommandError(
            f"--no-store: with {option} the API keeps its outbox in the event store "
            "(the orders database); leave --no-store out",
            EXIT_USAGE,
        )


def _check_amqp_url(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in _AMQP_SCHEMES:
        raise CommandError(
            f"--amqp {display_url(url)!r}: not an AMQP URL (expected amqp:// or amqps://, "
            "e.g. amqp://guest:guest@localhost:5672/)",
            EXIT_USAGE,
        )
    if importlib.util.find_spec("pika") is None:
        raise CommandError(
            "--amqp needs pika, the RabbitMQ client: pip install 'eventbus[rabbitmq]'",
            EXIT_USAGE,
        )


def _check_redis_url(url: str) -> None:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in _REDIS_SCHEMES:
        expected = ", ".join(f"{s}://" for s in _REDIS_SCHEMES)
        raise CommandError(
            f"--redis {url!r}: not a Redis URL (expected {expected}, e.g. "
            "redis://localhost:6379/0)",
            EXIT_USAGE,
        )


if __name__ == "__main__":
    sys.exit(main())
