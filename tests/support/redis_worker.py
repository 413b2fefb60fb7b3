"""A process for tests/test_redis_processes.py: one bus on a RedisStreamsTransport.

Modes:

* ``consume``: a consumer of the group. Its one handler records its effect idempotently in an
  SQLite file shared by every consumer: ``effects`` gets one row per event id (``INSERT OR
  IGNORE``), ``invocations`` one row per call with the consumer's name, both in one
  transaction, so lost events and duplicates can be counted after a SIGKILL. It prints
  ``consumer <name>``, ``recovered <n>`` (entries taken over at start), ``ready``, then
  ``handled <k>`` after its 1st call and every ``--every`` calls. ``--work`` adds simulated
  work (a wait) to each call. A ``stop`` line on stdin (or
  EOF) closes the bus, which lets running deliveries finish; it then prints
  ``closed handled <k>`` and ``done``. With ``--hold`` every handler call blocks forever
  (printing ``holding <event id>``), so the entries it read stay pending until it is killed.
* ``produce``: publishes ``--count`` events ``job`` with payload ``{"n": i}``, prints
  ``published <n>`` and exits.

Every line goes to stdout flushed at once (the parent's protocol); structlog goes to stderr.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import threading

from eventbus import Event, EventBus
from eventbus.transports import RedisStreamsTransport
from tests.support.children import consume_until_stop, log_to_stderr, out


class Effects:
    """The handler's side effects in the shared SQLite file (thread-safe within a process;
    across processes SQLite's lock serialises writers, ``timeout=30`` waits for it)."""

    def __init__(self, path: str, consumer: str) -> None:
        self._consumer = consumer
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL loses nothing committed when a process is killed (only on power
        # loss), and spares an fsync per commit.
        self._db.execute("PRAGMA synchronous=NORMAL")
        create_tables(self._db)
        self.calls = 0  # this process's invocations

    def record(self, event: Event) -> int:
        """Commit one invocation and the event's effect (once per event id) in one
        transaction; return this process's count of invocations."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO invocations (event_id, consumer) VALUES (?, ?)",
                (event.id, self._consumer),
            )
            self._db.execute(
                "INSERT OR IGNORE INTO effects (event_id, n) VALUES (?, ?)",
                (event.id, event.payload["n"]),
            )
            self._db.execute("COMMIT")
            self.calls += 1
            return self.calls


def create_tables(db: sqlite3.Connection) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS invocations "
        "(id INTEGER PRIMARY KEY, event_id TEXT NOT NULL, consumer TEXT NOT NULL)"
    )
    db.execute("CREATE TABLE IF NOT EXISTS effects (event_id TEXT PRIMARY KEY, n INTEGER)")


def transport_of(args: argparse.Namespace) -> RedisStreamsTransport:
    return RedisStreamsTransport(
        args.url,
        stream=args.stream,
        group=args.group,
        consumer=getattr(args, "consumer", None),
        claim_idle=getattr(args, "claim_idle", 30.0),
        block=0.05,
    )


def consume(args: argparse.Namespace) -> int:
    transport = transport_of(args)
    effects = Effects(args.effects, transport.consumer)
    never = threading.Event()
    bus = EventBus(transport=transport, max_workers=args.workers, name=transport.consumer)

    def effect(event: Event) -> None:
        if args.hold:
            out(f"holding {event.id}")
            never.wait()  # the entry stays pending with this consumer until it is killed
        if args.work:
            threading.Event().wait(args.work)  # simulated work (I/O: no CPU, no GIL)
        calls = effects.record(event)
        if calls == 1 or calls % args.every == 0:
            out(f"handled {calls}")

    bus.subscribe("job", effect, name="effect")
    consume_until_stop(bus, transport.consumer)
    bus.close(timeout=30)
    out(f"closed handled {effects.calls}")
    out("done")
    return 0


def produce(args: argparse.Namespace) -> int:
    bus = EventBus(transport=transport_of(args), max_workers=1, name="producer")
    for i in range(args.count):
        bus.emit("job", {"n": i})
    bus.close(timeout=30)
    out(f"published {args.count}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    for name in ("consume", "produce"):
        mode = modes.add_parser(name)
        mode.add_argument("--url", required=True)
        mode.add_argument("--stream", required=True)
        mode.add_argument("--group", required=True)
    consumer = modes.choices["consume"]
    consumer.add_argument("--effects", required=True, help="the shared SQLite effects file")
    consumer.add_argument("--consumer", help="this consumer's name in the group")
    consumer.add_argument("--claim-idle", type=float, default=1.0)
    consumer.add_argument("--workers", type=int, default=4)
    consumer.add_argument("--every", type=int, default=100, help="print 'handled' every k")
    consumer.add_argument("--work", type=float, default=0.0, help="seconds of work per call")
    consumer.add_argument("--hold", action="store_true", help="handler calls never end")
    modes.choices["produce"].add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    log_to_stderr()
    return consume(args) if args.mode == "consume" else produce(args)


if __name__ == "__main__":
    sys.exit(main())
