"""A process for tests/test_durable_crash.py to SIGKILL: a bus on an SQLiteStore, one handler.

It prints one line per step to stdout (flushed), so the test can act on exactly the moment it
wants (``recovered <n>``, ``emitted <id>``, ``effects <k>``, ``ready``, ``done`` ...), and it
records what its handler did in a separate SQLite "effects" file: ``invocations`` gets a row
per call, ``effects`` one row per event id (``INSERT OR IGNORE``), so duplicates can be
counted after any number of crashes.

Handlers (``--handler``), all subscribed as ``effect`` so every process runs the same one:

* ``record``: waits for the gate (``--gate``: opened once every event is emitted), does
  ``--work`` seconds of simulated work, records its effect, prints ``effects <k>`` with
  ``--progress``. With ``--hold``, calls made after recovery block forever instead (the
  delivery stays unfinished in the store until the process is killed).
* ``kill``: waits for the gate, records the invocation, then SIGKILLs its own process.
* ``flaky``: fails the first attempt of each event, succeeds the second; records nothing.

Order of work: subscribe, ``--recover`` (then drain), ``--ready`` (print ``ready``, wait for a
``go`` line on stdin), emit ``--threads`` x ``--emit`` events, then either ``--hang`` (wait to
be killed) or drain, close and print ``done``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog
import tenacity

from eventbus import Event, EventBus, RetryPolicy
from eventbus.stores import SQLiteStore
from tests.support.children import log_to_stderr, out

_counts_lock = threading.Lock()
_log_counts: collections.Counter[str] = collections.Counter()


def _count_logs(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
    with _counts_lock:
        _log_counts[event_dict.get("event", "?")] += 1
    if method not in ("error", "critical"):
        raise structlog.DropEvent
    return event_dict


def _configure_logging() -> None:
    # Count every record, and write errors (dead letters, internal errors) to stderr only.
    log_to_stderr(_count_logs)


class Effects:
    """The handler's side effects, in their own SQLite file (thread-safe)."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS invocations "
            "(id INTEGER PRIMARY KEY, event_id TEXT NOT NULL, pid INTEGER NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS effects (event_id TEXT PRIMARY KEY)")
        self.recorded = 0  # effects this process recorded

    def invoked(self, event: Event, *, effect: bool) -> int:
        """Commit one invocation (and the event's effect, once); return this process's count."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO invocations (event_id, pid) VALUES (?, ?)", (event.id, os.getpid())
            )
            if effect:
                self._db.execute("INSERT OR IGNORE INTO effects VALUES (?)", (event.id,))
            self._db.execute("COMMIT")
            if effect:
                self.recorded += 1
            return self.recorded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--db", required=True, help="the SQLiteStore file")
    parser.add_argument("--effects", help="the effects file (record and kill handlers)")
    parser.add_argument("--handler", choices=["record", "kill", "flaky"], required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--no-wait", action="store_true", help="retry at once (wait_none)")
    parser.add_argument("--recover", action="store_true")
    parser.add_argument("--ready", action="store_true", help="wait for 'go' before emitting")
    parser.add_argument("--emit", type=int, default=0, help="events per emitting thread")
    parser.add_argument("--threads", type=int, default=1, help="emitting threads")
    parser.add_argument("--print-ids", action="store_true", help="print 'emitted <id>' each")
    parser.add_argument("--gate", action="store_true", help="handlers start once all emitted")
    parser.add_argument("--work", type=float, default=0.0, help="seconds of work per call")
    parser.add_argument("--progress", action="store_true", help="print 'effects <k>' per effect")
    parser.add_argument("--hold", action="store_true", help="calls after recovery never end")
    parser.add_argument("--hang", action="store_true", help="after emitting, wait to be killed")
    args = parser.parse_args()

    _configure_logging()
    effects = Effects(args.effects) if args.effects else None
    gate = threading.Event()
    if not args.gate:
        gate.set()
    holding = threading.Event()
    never = threading.Event()
    seen: set[str] = set()
    seen_lock = threading.Lock()
    calls = [0]

    def record(event: Event) -> None:
        gate.wait()
        if holding.is_set():
            never.wait()  # stays 'running' in the store until the process is killed
        if args.work:
            threading.Event().wait(args.work)  # simulated work
        assert effects is not None
        count = effects.invoked(event, effect=True)
        if args.progress:
            out(f"effects {count}")

    def kill(event: Event) -> None:
        gate.wait()
        assert effects is not None
        effects.invoked(event, effect=False)
        os.kill(os.getpid(), signal.SIGKILL)

    def flaky(event: Event) -> None:
        with seen_lock:
            calls[0] += 1
            first = event.id not in seen
            seen.add(event.id)
        if first:
            raise RuntimeError(f"first attempt of {event.id} fails")

    handlers = {"record": record, "kill": kill, "flaky": flaky}
    wait = tenacity.wait_none() if args.no_wait else RetryPolicy().wait
    store = SQLiteStore(args.db)
    bus = EventBus(
        store=store,
        max_workers=args.workers,
        retry=RetryPolicy(max_attempts=args.max_attempts, wait=wait),
    )
    bus.subscribe("job", handlers[args.handler], name="effect")

    if args.recover:
        out(f"recovered {bus.recover()}")
        bus.drain()
        out("drained")
    if args.hold:
        holding.set()
    if args.ready:
        out("ready")
        if sys.stdin.readline().strip() != "go":
            return 2

    errors: list[str] = []

    def emit_some(thread: int) -> None:
        for i in range(args.emit):
            try:
                event = bus.emit("job", {"n": i, "thread": thread})
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                with seen_lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if args.print_ids:
                out(f"emitted {event.id}")

    if args.threads == 1:
        emit_some(0)
    else:
        threads = [threading.Thread(target=emit_some, args=(t,)) for t in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    out(f"emit-errors {len(errors)} {json.dumps(errors[:3])}")
    gate.set()
    if args.hang:
        out("hanging")
        sys.stdin.read()  # until the parent kills us (or goes away)
        os._exit(3)
    bus.drain()
    bus.close()
    if effects is not None:
        out(f"effects-recorded {effects.recorded}")
    out(f"calls {calls[0]}")
    out(f"logs {json.dumps(dict(_log_counts))}")
    out("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
