"""Group commit: writes from many threads share one transaction, and each writer still
returns only once its own write is committed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["GroupCommit", "Write"]

C = TypeVar("C")  # the connection a write runs on


class Write(Generic[C]):
    """One thread's write and, once its batch ran, its result or error."""

    __slots__ = ("done", "error", "lead", "result", "several_statements", "waiter", "write")

    def __init__(
        self, write: Callable[[C], Any], several_statements: bool, waiter: threading.Lock | None
    ) -> None:
        self.write = write
        # Several statements must succeed or fail together inside the shared transaction.
        self.several_statements = several_statements
        # Held while its thread waits; released to wake that thread (done, or its turn to lead).
        self.waiter = waiter
        self.lead = False
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommit(Generic[C]):
    """Queues writes and lets one thread at a time, the leader, commit every queued write in
    one transaction through *run_batch*; the others wait for their write to be done.

    Why: a commit costs far more than a statement (it writes the log), so eight workers each
    recording an attempt pay for one commit between them. After a batch the leader wakes
    exactly the writers it finished and hands leadership to the oldest waiting one, so no
    thread commits for the others forever, and no waiter wakes just to wait again (a
    thundering herd would keep the leader from getting the GIL back between statements). A
    writer alone leads at once, with no hand-off. Thread-safe.

    *run_batch* runs the writes in one transaction, storing each write's result or error; if
    the transaction fails it stores that error in every write and may raise.
    """

    def __init__(self, run_batch: Callable[[list[Write[C]]], None]) -> None:
        self._run_batch = run_batch
        self._mutex = threading.Lock()
        self._queue: list[Write[C]] = []
        self._leading = False
        self._local = threading.local()

    def commit(self, write: Callable[[C], Any], *, several_statements: bool = False) -> Any:
        """Run *write* in a committed transaction; return its result or raise its error.
        Blocks until the transaction that carried it is committed."""
        op = Write(write, several_statements, self._waiter())
        with self._mutex:
            self._queue.append(op)
            if not self._leading:
                self._leading = op.lead = True
        if not op.lead:
            assert op.waiter is not None
            op.waiter.acquire()  # until the leader says: done, or lead now
        if not op.done:
            self._lead()
        if op.error is not None:
            raise op.error
        return op.result

    def defer(self, write: Callable[[C], Any]) -> None:
        """Queue *write* for the next transaction, whoever runs it; do not wait."""
        with self._mutex:
            self._queue.append(Write(write, several_statements=False, waiter=None))

    def flush(self) -> None:
        """Commit whatever is queued, and wait for a batch being committed now (it may hold
        a deferred write queued before this call); return once both are committed."""
        with self._mutex:
            busy = bool(self._queue) or self._leading
        if busy:
            # Queued behind the batch in flight: a leader takes it only after that commit.
            self.commit(_nothing)

    def _waiter(self) -> threading.Lock:
        # One lock per thread, kept acquired: a waiter blocks acquiring it again until the
        # leader releases it (cheaper than an Event per write).
        waiter: threading.Lock | None = getattr(self._local, "waiter", None)
        if waiter is None:
            waiter = self._local.waiter = threading.Lock()
            waiter.acquire()
        return waiter

    def _lead(self) -> None:
        with self._mutex:
            batch, self._queue = self._queue, []
        try:
            self._run_batch(batch)
        finally:
            with self._mutex:
                for op in batch:
                    op.done = True
                successor = next((op for op in self._queue if op.waiter is not None), None)
                if successor is None:
                    self._leading = False
                else:
                    successor.lead = True
            for op in batch:
                if op.waiter is not None and not op.lead:
                    op.waiter.release()
            if successor is not None:
                assert successor.waiter is not None
                successor.waiter.release()


def _nothing(connection: object) -> None:
    """A write that writes nothing: lets flush() carry the queued writes."""
