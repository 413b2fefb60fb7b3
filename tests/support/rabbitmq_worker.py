"""A consumer process for tests/test_rabbitmq_processes.py: one bus on a RabbitMQTransport.

``--url``, ``--exchange``, ``--group``, ``--workers`` (the bus's ``max_workers``),
``--prefetch`` and ``--max-deliveries`` (the transport's). Its one handler, of ``job`` events,
prints ``handled <event id> <n>`` for a normal event (payload ``{"n": n}``), after ``--work``
seconds of simulated work; for a poison event (payload ``{"n": n, "poison": true}``) it prints
``poison <event id>`` and kills its own process with SIGKILL (a crash: nothing acknowledged,
nothing cleaned up), so the broker gets the message back and counts a delivery.

It also prints ``got <event id>`` when its transport hands a message to the bus (the message
is unacknowledged from then until its delivery settles), ``dead <message id> <reason>`` when its
transport moves a message to the dead-letter queue, and ``error <text>`` for each error the
transport reports (a lost connection, each failed reconnect).

It prints ``consumer <name>``, ``recovered <k>``, ``ready`` once it consumes; a ``stop`` line on
stdin (or EOF) closes the bus, which lets running deliveries finish; it then prints ``done``.

Every line goes to stdout flushed at once (the parent's protocol); structlog goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any

from eventbus import Event, EventBus
from eventbus.transports.rabbitmq import Deliver, RabbitMQTransport
from eventbus.typing import Reporter
from tests.support.children import consume_until_stop, log_to_stderr, out


class _Telling:
    """The bus's reporter, which also tells the parent about dead letters and errors."""

    def __init__(self, reporter: Reporter) -> None:
        self._reporter = reporter

    def stream_dead_lettered(self, entry_id: str, fields: Mapping[str, str], reason: str) -> None:
        self._reporter.stream_dead_lettered(entry_id, fields, reason)
        out(f"dead {fields.get('id', '')} {reason}")

    def internal_error(self, where: str, error: BaseException) -> None:
        self._reporter.internal_error(where, error)
        text = f"{type(error).__name__}: {error}".replace("\n", " ")
        out(f"error {text[:200]}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reporter, name)


class ObservedTransport(RabbitMQTransport):
    """A RabbitMQTransport that prints ``got <id>`` for each message it hands to the bus."""

    def start(self, deliver: Deliver, reporter: Reporter | None = None) -> int:
        def observed(event: Event, token: str, *rest: float) -> None:
            out(f"got {event.id}")
            deliver(event, token, *rest)

        telling = _Telling(reporter) if reporter is not None else None
        return super().start(observed, telling)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--name", default=f"consumer-{os.getpid()}")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument("--max-deliveries", type=int, default=5)
    parser.add_argument("--work", type=float, default=0.0, help="seconds of work per call")
    args = parser.parse_args()
    log_to_stderr()
    transport = ObservedTransport(
        args.url,
        exchange=args.exchange,
        group=args.group,
        prefetch=args.prefetch,
        max_deliveries=args.max_deliveries,
        timeout=5.0,
    )
    bus = EventBus(transport=transport, max_workers=args.workers, name=args.name)

    def job(event: Event) -> None:
        if event.payload.get("poison"):
            out(f"poison {event.id}")
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: no ack, nothing cleaned up
        if args.work:
            threading.Event().wait(args.work)  # simulated work (I/O: no CPU, no GIL)
        out(f"handled {event.id} {event.payload['n']}")

    bus.subscribe("job", job, name="job")
    consume_until_stop(bus, args.name)
    bus.close(timeout=30)
    out("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
