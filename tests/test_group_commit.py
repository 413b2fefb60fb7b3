"""GroupCommit (eventbus/stores/_group_commit.py): writes of many threads share a batch."""

from __future__ import annotations

import threading

from eventbus.stores._group_commit import GroupCommit, Write

WAIT = 10.0


class HeldBatches:
    """A batch runner that records each batch's writes and holds the first one until
    released, as a slow commit would."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, batch: list[Write[None]]) -> None:
        first = not self.batches
        self.batches.append([op.write(None) for op in batch])
        if first:
            self.entered.set()
            assert self.release.wait(WAIT)


def test_flush_waits_for_the_batch_being_committed() -> None:
    """A write deferred before flush() and taken into a batch still committing is committed
    when flush() returns (flush does not see an empty queue and return early)."""
    batches = HeldBatches()
    writes = GroupCommit(batches)
    writes.defer(lambda conn: "deferred")
    leader = threading.Thread(target=writes.flush)
    leader.start()
    assert batches.entered.wait(WAIT)  # the deferred write is in the batch now committing
    flushed = threading.Event()
    flusher = threading.Thread(target=lambda: (writes.flush(), flushed.set()))
    flusher.start()
    # A short negative wait: the flush must still be waiting for the held batch.
    assert not flushed.wait(0.2)
    batches.release.set()
    assert flushed.wait(WAIT)
    leader.join(WAIT)
    flusher.join(WAIT)
    # The deferred write rode in the held batch; the second flush waited for a batch after it.
    assert batches.batches[0][0] == "deferred"
    assert len(batches.batches) == 2


def test_flush_with_nothing_queued_or_committing_returns_at_once() -> None:
    """flush() on an idle GroupCommit runs no batch."""
    batches = HeldBatches()
    GroupCommit(batches).flush()
    assert batches.batches == []
