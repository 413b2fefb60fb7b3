"""A process for tests/test_ordered_crash.py to SIGKILL: a bus on an SQLiteStore whose one
handler is subscribed with ``ordered_by="order_id"``, retried at once (or after ``--wait`` s).

Its handler prints one line per call on stdout (flushed before it returns or raises), so the
parent sees every call in the order the calls began, and nothing is lost when the process is
killed: ``call <order_id> <n> ok|fail``. Two calls of one key must never overlap: a call that
finds another call of its key still running prints ``overlap <order_id> <n> <other n>``.

About one attempt in ten fails, deterministically: an attempt fails when a hash of (n, its
attempt number in this process) ends in 0 and that number is at most ``--fail-attempts``. The
attempt count is kept per process (the handler cannot see the store's), so the parent gives
the first process 2 and the recovering one 1: with the attempt interrupted by the kill, a
delivery uses at most 2 + 1 + 1 + 1 = 5 attempts, and ``max_attempts=5`` never dead-letters.

Order of work: subscribe; ``--recover`` (print ``recovered <k>``); emit ``--emit`` events
``order:placed`` with payload ``{"order_id": n % keys, "n": n}`` from this one thread, handler
calls held until the last one is committed (then ``emitted <count>``); drain, close, print
``done``. The first process is killed before it gets there.
"""

from __future__ import annotations

import argparse
import sys
import threading
import zlib
from collections import Counter
from collections.abc import MutableMapping
from typing import Any

import structlog
import tenacity

from eventbus import Event, EventBus, RetryPolicy
from eventbus.stores import SQLiteStore
from tests.support.children import log_to_stderr, out

MAX_ATTEMPTS = 5
#: One attempt in FAIL_ONE_IN (of those allowed to fail) raises.
FAIL_ONE_IN = 10


class Flaky(RuntimeError):
    """What a failing attempt raises."""


def fails(n: int, attempt: int, fail_attempts: int) -> bool:
    """Whether this process's *attempt* (from 1) of event *n* fails (the same in every run)."""
    return attempt <= fail_attempts and zlib.crc32(f"{n}:{attempt}".encode()) % FAIL_ONE_IN == 0


def _errors_only(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
    # About a thousand failed attempts are expected: only errors (dead letters, internal
    # errors of the bus) reach stderr.
    if method not in ("error", "critical"):
        raise structlog.DropEvent
    return event_dict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--db", required=True, help="the SQLiteStore file")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--recover", action="store_true")
    parser.add_argument("--emit", type=int, default=0, help="events to emit")
    parser.add_argument("--keys", type=int, default=500, help="distinct order ids")
    parser.add_argument("--fail-attempts", type=int, default=2, help="attempts that may fail")
    parser.add_argument("--wait", type=float, default=0.0, help="retry backoff (0: wait_none)")
    args = parser.parse_args()

    log_to_stderr(_errors_only)
    # Calls wait until every event is emitted (a recovering process opens it at once), so that
    # each key has a line of deliveries waiting behind its holder.
    emitted = threading.Event()
    lock = threading.Lock()
    attempts: Counter[int] = Counter()  # attempts per n in this process
    running: dict[object, int] = {}  # order id -> n of the call running for it

    wait = tenacity.wait_fixed(args.wait) if args.wait else tenacity.wait_none()
    bus = EventBus(
        store=SQLiteStore(args.db),
        max_workers=args.workers,
        retry=RetryPolicy(max_attempts=MAX_ATTEMPTS, wait=wait),
    )

    @bus.on("order:*", ordered_by="order_id")
    def project_order(event: Event) -> None:
        emitted.wait()
        key, n = event.payload["order_id"], event.payload["n"]
        with lock:
            attempts[n] += 1
            attempt = attempts[n]
            other = running.get(key)
            running[key] = n
        if other is not None:
            out(f"overlap {key} {n} {other}")
        failing = fails(n, attempt, args.fail_attempts)
        out(f"call {key} {n} {'fail' if failing else 'ok'}")
        with lock:
            if running.get(key) == n:
                del running[key]
        if failing:
            raise Flaky(f"attempt {attempt} of event {n} fails")

    if args.recover:
        emitted.set()
        out(f"recovered {bus.recover()}")
    for n in range(args.emit):
        bus.emit("order:placed", {"order_id": n % args.keys, "n": n})
    out(f"emitted {args.emit}")
    emitted.set()
    bus.drain()
    bus.close()
    out("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
