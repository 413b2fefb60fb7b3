"""``python -m examples.fastapi_orders [--host HOST] [--port PORT] [--json] [--log-level L]``:
the orders API under uvicorn, from the repository root; ``127.0.0.1:8000`` by default.

Ctrl-C or SIGTERM: uvicorn stops taking connections, lets the open requests finish and runs
the lifespan's exit, which closes the bus (running handlers finish, retries not yet due become
"abandoned" dead letters, and ``app.stopped`` says how many); then ``server.stopped`` is
logged and the process exits 0. A second Ctrl-C during shutdown forces the exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import structlog
import uvicorn

from examples.fastapi_orders.app import create_app, default_bus
from examples.fastapi_orders.logging_setup import configure_logging

__all__ = ["main"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("fastapi_orders.server")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{os.path.basename(sys.executable) or 'python'} -m examples.fastapi_orders",
        description="The eventbus orders API on FastAPI and uvicorn (async handlers).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument("--json", action="store_true", help="log JSON lines instead of text")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM, then shut down cleanly; return the exit status."""
    args = _parser().parse_args(argv)
    configure_logging(json=args.json, level=args.log_level)
    bus = default_bus()
    config = uvicorn.Config(
        create_app(bus),
        host=args.host,
        port=args.port,
        lifespan="on",
        log_config=None,  # uvicorn's records go to the handler configure_logging installed
        access_log=False,  # the app logs each request itself (http.request)
        server_header=False,
    )
    server = uvicorn.Server(config)
    stopped_by: list[str] = []

    def remember(signum: int, _: FrameType | None) -> None:
        # While it serves, uvicorn handles SIGINT and SIGTERM itself. After its shutdown it
        # raises the signal again for the handler it found installed: this one, so that the
        # process ends with status 0 rather than being killed by the signal.
        stopped_by.append(signal.Signals(signum).name)
        server.should_exit = True

    previous = {sig: signal.signal(sig, remember) for sig in _STOP_SIGNALS}
    log.info("server.starting", url=f"http://{args.host}:{args.port}", pid=os.getpid())
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not bus.closed:  # startup failed (port in use): the lifespan never closed it
            bus.close(timeout=0)
    log.info("server.stopped", signal=stopped_by[0] if stopped_by else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
