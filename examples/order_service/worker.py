"""The ``worker`` command: the order handlers in a process of their own, fed by Redis or
RabbitMQ.

``.venv/bin/python -m examples.order_service worker --redis URL`` builds the worker app
(:func:`~examples.order_service.wiring.build_worker`): the handlers on a bus whose
``RedisStreamsTransport`` consumes the stream as one consumer of the group. Several workers
are competing consumers: each event goes to one of them. The ``worker.started`` line says
which consumer this is and how many entries of stopped workers it took over.

``worker --amqp URL`` does the same through RabbitMQ: the bus's ``RabbitMQTransport``
consumes the group's queue (``orders.order-service``), bound for what the handlers subscribe
to; the broker hands each message to one worker, and gives a dead worker's unacknowledged
messages to another at once (``worker.started`` names the exchange and the queue).

SIGINT (Ctrl-C) or SIGTERM closes the bus: it stops reading, lets running handlers finish (up
to ``Settings.close_timeout``), and leaves the entries it has not fully settled (retries
waiting for their backoff) unacknowledged in the stream, for another worker to take over after
``claim_idle`` seconds (``handler.left_in_stream`` lines). ``kill -9`` leaves the same: the
entries it held are taken over by the others after ``claim_idle``. With RabbitMQ, what a
stopped or killed worker held unacknowledged goes back to the queue when its connection
closes, for another worker.

When Redis (or RabbitMQ) does not answer at startup, nothing is built: ``build_worker`` raises
``TransportError`` and the command prints one line and exits 1. Once running, the transport's
reader reconnects by itself.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

import structlog

from eventbus.transports import RedisStreamsTransport
from examples.order_service.wiring import OrderApp, Settings, build_worker

__all__ = ["run_worker"]

log: structlog.typing.FilteringBoundLogger = structlog.get_logger("order_service.worker")

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_worker(settings: Settings) -> int:
    """Consume the stream until SIGINT or SIGTERM, then close cleanly; return the exit code.

    Must run in the main thread (signal handlers live there).
    """
    stop = threading.Event()
    stopped_by: list[str] = []

    def request_stop(signum: int, _: FrameType | None) -> None:
        stopped_by.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in _STOP_SIGNALS}
    try:
        app = build_worker(settings)
        log.info(
            "worker.started",
            pid=os.getpid(),
            **_where(app),
            taken_over=app.taken_over,
            threads=settings.max_workers,
        )
        # Event.wait in a loop, not pause(): the signal handler sets it; the timeout only
        # keeps the main thread responsive to signals on every platform.
        while not stop.wait(1.0):
            pass
        log.info("worker.stopping", signal=stopped_by[0])
        report = app.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info(
        "worker.stopped",
        signal=stopped_by[0],
        dead_letters=len(report.dead_letters),
        still_running=report.still_running,
    )
    return 0


def _where(app: OrderApp) -> dict[str, object]:
    """What the ``worker.started`` line says about where this worker consumes from."""
    transport = app.transport
    assert transport is not None
    if isinstance(transport, RedisStreamsTransport):
        return {
            "consumer": transport.consumer,
            "stream": transport.stream,
            "group": transport.group,
            "claim_idle": app.settings.claim_idle,
        }
    return {"exchange": transport.exchange, "queue": transport.queue, "group": transport.group}
