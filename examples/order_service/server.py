"""The ``serve`` command: the HTTP API on a threaded WSGI server, with a clean shutdown.

SIGINT (Ctrl-C) or SIGTERM stops the server from taking requests, then closes the app: the bus
stops intake, lets running handlers finish (up to ``Settings.close_timeout``), leaves retries
still waiting for their backoff in the event store for the next start (with ``--no-store`` they
become "abandoned" dead letters), and the last log lines say what was left. A second signal
during shutdown is not caught (Ctrl-C twice aborts it).

With ``Settings.redis_url`` it is the API process only: it commits each event with its order
to its outbox (the event store in the orders database), its bus's relay publishes them to the
Redis stream, and it runs no handlers (``worker.py`` does); the fake warehouse's controls are
left out, since the warehouse the handlers talk to lives in the workers. It starts, and takes
orders, even when Redis does not answer (``server.redis_unreachable`` says so): their events
wait in the outbox and are published once Redis is back; meanwhile ``GET /api/health`` says
``"degraded"``. Events still unpublished at shutdown stay in the outbox for the next start.
With ``Settings.amqp_url`` the same holds with RabbitMQ in Redis's place
(``server.amqp_unreachable``).
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import TYPE_CHECKING

import structlog
from werkzeug.serving import make_server

from eventbus import TransportError
from examples.order_service.web import create_app
from examples.order_service.wiring import Settings, build_app, display_path, display_url

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

__all__ = ["serve"]

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("order_service.server")

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StopRequested(BaseException):
    """Raised in the main thread by the signal handler to leave ``serve_forever``.

    A ``BaseException`` (like ``KeyboardInterrupt``) so the server's request loop, which
    catches ``Exception``, cannot swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal_name = signal.Signals(signum).name


def _request_stop(signum: int, _: FrameType | None) -> None:
    for sig in _STOP_SIGNALS:  # a second signal is not caught: it aborts the shutdown
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    raise _StopRequested(signum)


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    tracer_provider: TracerProvider | None = None,
) -> int:
    """Serve the API until SIGINT or SIGTERM, then shut down cleanly; return the exit code.

    Must run in the main thread (signal handlers live there). ``port=0`` picks a free port.
    With a *tracer_provider* (``serve --trace``), each request is a span and its events'
    spans join its trace (see ``tracing.py``).
    """
    app = build_app(settings, tracer_provider=tracer_provider)
    try:
        web = create_app(app, fake_controls=settings.transport_url is None)
        server = make_server(host, port, web, threaded=True)
    except BaseException:
        app.close()
        raise
    previous = {sig: signal.signal(sig, _request_stop) for sig in _STOP_SIGNALS}
    log.info(
        "server.started",
        url=f"http://{host}:{server.server_port}",
        pid=os.getpid(),
        database=display_path(settings.db_path),
        outbox=display_path(settings.outbox_dir),
        **_transport_fields(settings),
    )
    if app.transport is not None:
        try:
            app.transport.ping()
        except TransportError as exc:
            unreachable = (
                "server.redis_unreachable" if settings.redis_url else "server.amqp_unreachable"
            )
            log.warning(unreachable, error=str(exc), health="/api/health")
    stopped_by = "none"
    try:
        server.serve_forever()
    except _StopRequested as stop:
        stopped_by = stop.signal_name
        log.info("server.stopping", signal=stopped_by)
    finally:
        server.server_close()
        report = app.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info(
        "server.stopped",
        signal=stopped_by,
        abandoned=len(report.abandoned),
        dead_letters=len(report.dead_letters),
        still_running=report.still_running,
    )
    return 0


def _transport_fields(settings: Settings) -> dict[str, object]:
    """What the ``server.started`` line says about the transport (nothing in one process)."""
    if settings.redis_url is not None:
        return {"redis": display_url(settings.redis_url), "handlers": 0}
    if settings.amqp_url is not None:
        return {"amqp": display_url(settings.amqp_url), "handlers": 0}
    return {}
