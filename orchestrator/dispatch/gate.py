"""Whether this driver runs a job now: the gate a run asks, job by job.

Another driver sharing the store may be building the same artifact, or a job may be held for
another's result (a family's follower for its head's): the gate defers such a job, and resolves
the deferred jobs when :meth:`JobGate.poll` asks. The default admits everything.
"""

from __future__ import annotations

from orchestrator.records import Job, ResultRecord


class JobGate:
    """Admits every job; a store-backed gate claims keys and waits for other drivers' results."""

    def admit(self, job: Job) -> bool:
        return True

    def holds(self, job: Job) -> bool:
        """Whether a build job is held from the start (it would not be admitted before a
        :meth:`poll` lets it run): it waits among the deferred, not in the queues."""
        return False

    def poll(self, deferred: list[Job]) -> tuple[list[ResultRecord], list[Job]]:
        """(results now available for deferred jobs, deferred jobs this driver should now run)."""
        return [], list(deferred)

    def speculate(self, deferred: list[Job], classes: set[str]) -> list[Job]:
        """Deferred jobs that a worker of one of ``classes`` with nothing else to do may run
        now, ahead of what they wait for (they are then admitted); none by default."""
        return []
