"""A consumer process for tests/test_redis_resilience.py whose handler dies on a poison event.

One bus on a RedisStreamsTransport (``--claim-idle``, ``--max-deliveries``). Its handler of
``job`` events prints ``handled <n>`` for a normal event (payload ``{"n": n}``); for a poison
event (payload ``{"n": n, "poison": true}``) it prints ``poison <event id>`` and then kills its
own process with SIGKILL, so the entry stays pending, as after a crash.

It prints ``consumer <name>``, ``recovered <k>`` (entries taken over at start), ``ready``, and
``dead <entry id> <deliveries>`` when its transport moves an entry to the dead-letter stream.
A ``stop`` line on stdin (or EOF) closes the bus; it then prints ``done``.

Every line goes to stdout flushed at once (the parent's protocol); structlog goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping

from eventbus import Event, EventBus
from eventbus.transports import RedisStreamsTransport
from tests.support.children import consume_until_stop, log_to_stderr, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--consumer", required=True)
    parser.add_argument("--claim-idle", type=float, required=True)
    parser.add_argument("--max-deliveries", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    log_to_stderr()
    transport = RedisStreamsTransport(
        args.url,
        stream=args.stream,
        group=args.group,
        consumer=args.consumer,
        claim_idle=args.claim_idle,
        max_deliveries=args.max_deliveries,
        block=0.05,
    )
    bus = EventBus(transport=transport, max_workers=args.workers, name=args.consumer)
    # The bus logs dead-lettered entries through on_dead; keep that and tell the parent too.
    logged = transport.on_dead

    def on_dead(entry_id: str, fields: Mapping[str, str], reason: str) -> None:
        logged(entry_id, fields, reason)
        out(f"dead {entry_id} {fields['deliveries']}")

    transport.on_dead = on_dead

    def job(event: Event) -> None:
        if event.payload.get("poison"):
            out(f"poison {event.id}")
            os.kill(os.getpid(), signal.SIGKILL)  # a crash: no ack, nothing cleaned up
        out(f"handled {event.payload['n']}")

    bus.subscribe("job", job, name="job")
    consume_until_stop(bus, args.consumer)
    bus.close(timeout=30)
    out("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
