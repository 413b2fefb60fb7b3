"""An executor that holds jobs until the test runs them (for tests of recovery and close)."""

from __future__ import annotations

from eventbus._dispatch import Job

__all__ = ["QueueingExecutor"]


class QueueingExecutor:
    """Collects jobs instead of running them; the test runs them with :meth:`run_all`.

    A bus on it waits in close() for jobs that never run: close it with ``timeout=0``, which
    hands the jobs back (a store keeps them pending)."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def submit(self, job: Job) -> None:
        self.jobs.append(job)

    def shutdown(self, timeout: float | None) -> list[Job]:
        jobs, self.jobs = self.jobs, []
        return jobs

    def run_all(self) -> None:
        while self.jobs:
            self.jobs.pop(0)()
