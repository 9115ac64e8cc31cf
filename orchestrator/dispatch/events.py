"""Named hooks for what happens during a sweep; the live progress log is one listener."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.records import Job, ResultRecord


class SweepEvents:
    """Every hook does nothing by default: a listener overrides the ones it cares about."""

    def worker_ready(self, worker: str, device: str, node: str) -> None: ...

    def worker_lost(self, worker: str, replacement: str | None, why: str) -> None: ...

    def started(self, worker: str, job: "Job") -> None: ...

    def phase(self, worker: str, job: "Job", phase: str) -> None: ...

    def result(self, record: "ResultRecord") -> None: ...

    def retry(self, job: "Job", why: str) -> None: ...

    def waiting(self, job: "Job", owner: str) -> None:
        """Another driver (``owner``'s sweep) is building ``job``'s artifact; this one takes it when done."""

    def reused(self, count: int, how: dict[str, int]) -> None:
        """``count`` results came from the store before dispatch (``how``: per kind of reuse)."""
