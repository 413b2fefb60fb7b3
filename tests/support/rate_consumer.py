"""A process for tests/test_redis_rate_processes.py: one consumer of a Redis Streams group whose
one handler is rate-limited, the limit shared by every consumer of the group.

It runs ``EventBus(transport=RedisStreamsTransport(...), max_workers=--workers)`` with
``@bus.on("job", rate_limit=--rate)``; each call prints ``call <wall-clock time> <event id>``
(``time.time()``, as ``repr``) when it starts. The protocol of tests/support/children.py:
``consumer <name>``, ``recovered <n>``, ``ready``; a ``stop`` line on stdin (or EOF) closes the
bus, which lets running deliveries finish, then ``done``.

Every line goes to stdout flushed at once (the parent's protocol); structlog goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from eventbus import Event, EventBus
from eventbus.transports import RedisStreamsTransport
from tests.support.children import consume_until_stop, log_to_stderr, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--consumer", required=True, help="this consumer's name in the group")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rate", default="50/s", help="the handler's rate_limit")
    args = parser.parse_args()
    log_to_stderr()

    transport = RedisStreamsTransport(
        args.url, stream=args.stream, group=args.group, consumer=args.consumer, block=0.05
    )
    bus = EventBus(transport=transport, max_workers=args.workers, name=args.consumer)

    @bus.on("job", rate_limit=args.rate)
    def job(event: Event) -> None:
        out(f"call {time.time()!r} {event.id}")

    consume_until_stop(bus, transport.consumer)
    bus.close(timeout=30)
    out("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
