"""Per-key order (``ordered_by``) across a SIGKILL and ``recover()``.

A process running tests/support/ordered_worker.py emits 10,000 events over 500 order ids into
an SQLiteStore and handles them with ``@bus.on("order:*", ordered_by="order_id")`` on 8
workers, about one attempt in ten failing. Retries run at once, or (the second case) after
0.5 s: the retry queue's timer, a key held through a backoff, and retries not yet due when
recovery queues them. The test kills the process once 4,000 calls were made (it acts on the
lines the handler prints; nothing here sleeps), then a second process on the same store
recovers and drains. Every call of both runs was printed, so for each key the sequence of
event numbers it was called with can be read back: it must be in emit order, where a delivery
may be called again right after itself (a failed attempt's retry, or an attempt the kill
interrupted), but nothing may go backwards.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.support.children import ChildProcess, Children

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess]

EVENTS = 10_000
KEYS = 500
WORKERS = 8
#: Calls of the first process before the kill: a good share of the 11,000 or so.
KILL_AT = 4_000


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(sql).fetchall()


def states(db: Path) -> dict[str, int]:
    return dict(query(db, "SELECT state, count(*) FROM deliveries GROUP BY state"))


def calls(child: ChildProcess) -> list[tuple[int, int, bool]]:
    """(order id, n, succeeded) for each ``call`` line, in the order the calls began."""
    found = []
    for line in child.lines:
        if line.startswith("call "):
            _, key, n, outcome = line.split()
            found.append((int(key), int(n), outcome == "ok"))
    return found


@pytest.mark.parametrize("wait", ["0", "0.5"], ids=["retry-at-once", "retry-after-0.5s"])
def test_per_key_order_holds_across_sigkill_and_recover(
    tmp_path: Path, children: Children, wait: str
) -> None:
    """Killed mid-run and recovered, every event is handled, and each key's calls across both
    processes are in emit order (a call repeated right after itself allowed)."""
    db = tmp_path / "bus.db"
    common = ["--db", str(db), "--workers", str(WORKERS), "--keys", str(KEYS), "--wait", wait]

    first = children.script(
        "ordered_worker", *common, "--emit", str(EVENTS), "--fail-attempts", "2", name="first"
    )
    assert first.expect("emitted ") == str(EVENTS)
    made = 0
    while made < KILL_AT:
        if first.next_line(waiting_for=f"call {made + 1} of {KILL_AT}").startswith("call "):
            made += 1
    first.kill()
    first.wait()  # its reader has every line the process wrote
    assert "done" not in first.lines, "the first process finished before the kill"
    left = states(db)
    open_at_kill = EVENTS - left.get("succeeded", 0)
    assert sum(left.values()) == EVENTS, f"deliveries in the store at the kill: {left}"
    assert open_at_kill > 0, f"the kill did not land mid-run: {left}"
    assert left.get("retrying", 0) > 0, f"no retry in flight at the kill: {left}"

    second = children.script(
        "ordered_worker", *common, "--recover", "--fail-attempts", "1", name="second"
    )
    recovered = int(second.expect("recovered "))
    assert second.wait() == 0, second.stderr()
    assert "done" in second.lines, second.output()
    assert recovered == open_at_kill, f"recover() queued {recovered}, {left} at the kill"

    before, after = calls(first), calls(second)
    overlaps = [line for line in first.lines + second.lines if line.startswith("overlap ")]
    assert not overlaps, f"calls of one key ran at once: {overlaps[:5]}"
    assert all(n % KEYS == key for key, n, _ in before + after), "a call with a foreign key"
    handled = {n for _, n, ok in before + after if ok}
    missing = sorted(set(range(EVENTS)) - handled)
    assert not missing, f"{len(missing)} events never handled successfully: {missing[:10]}"
    assert states(db) == {"succeeded": EVENTS}, states(db)

    sequences: dict[int, list[int]] = defaultdict(list)
    for key, n, _ in before + after:
        sequences[key].append(n)
    backwards = []  # (key, its sequence, the index of the first call that went back)
    for key, seq in sorted(sequences.items()):
        back = next((i for i in range(1, len(seq)) if seq[i] < seq[i - 1]), None)
        if back is not None:
            backwards.append((key, seq, back))
    assert len(sequences) == KEYS, f"calls for {len(sequences)} of {KEYS} keys"
    if backwards:
        key, seq, i = backwards[0]
        lo, hi = max(0, i - 3), min(i + 3, len(seq) - 1)
        pytest.fail(
            f"{len(backwards)} of {KEYS} keys called out of emit order; key {key}, its calls "
            f"{lo}..{hi} of {len(seq)} (of all calls, {len(before)} before the kill): "
            f"{seq[lo : hi + 1]}"
        )
    spanning = {key for key, _, _ in before} & {key for key, _, _ in after}
    assert len(spanning) >= KEYS // 2, f"only {len(spanning)} keys had calls in both runs"
    for key, seq in sequences.items():
        assert list(dict.fromkeys(seq)) == list(range(key, EVENTS, KEYS)), f"key {key}: {seq}"
