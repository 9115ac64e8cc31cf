"""Live progress of a sweep: a rich table on a terminal, plain log lines otherwise.

Model names, candidate names and errors are data, never markup: everything printed is escaped.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from orchestrator import records as R
from orchestrator.dispatch.events import SweepEvents
from orchestrator.error_text import summarize


def _what(job) -> str:
    return f"{job.model} b{job.batch_size} {job.candidate}"


class Progress(SweepEvents):
    def __init__(self, console: Console | None = None, total: int = 0, live: bool | None = None) -> None:
        self.console = console or Console()
        self.total = total
        self.done = 0
        self.failed = 0
        self.reused_count = 0
        self.current: dict[str, str] = {}  # worker id -> what it is doing
        self.started_at = time.monotonic()
        self._live_enabled = self.console.is_terminal if live is None else live
        self._live: Live | None = None

    def __enter__(self) -> "Progress":
        if self._live_enabled:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None

    def _line(self, text: str) -> None:
        elapsed = time.monotonic() - self.started_at
        if self._live is not None:
            self._live.update(self._render())
        else:
            self.console.print(f"[{elapsed:7.1f}s] {text}", markup=False, highlight=False, soft_wrap=True)

    def _render(self) -> Table:
        elapsed = time.monotonic() - self.started_at
        table = Table(title=f"sweep: {self.done}/{self.total} done, {self.failed} failed, "
                            f"{self.reused_count} from store, {elapsed:.0f} s")
        table.add_column("worker")
        table.add_column("current candidate")
        for worker, what in sorted(self.current.items()):
            table.add_row(escape(worker), escape(what))
        return table

    # -- the hooks ------------------------------------------------------------------------------
    def reused(self, count: int, how: dict[str, int]) -> None:
        self.reused_count = count
        self.done += count
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(how.items()))
        self._line(f"{count} candidates from the store ({kinds})")

    def started(self, worker: str, job) -> None:
        verb = "re-judging" if job.mode == "evaluate" else "building"
        self.current[worker] = f"{_what(job)} ({'evaluate' if job.mode == 'evaluate' else 'build'})"
        self._line(f"{worker}: {verb} {_what(job)}")

    def phase(self, worker: str, job, phase: str) -> None:
        self.current[worker] = f"{_what(job)} ({phase})"
        if self._live is not None:
            self._live.update(self._render())

    def result(self, record) -> None:
        self.done += 1
        if record.status != R.OK:
            self.failed += 1
        if record.worker_id:
            self.current[record.worker_id] = "idle"
        if record.median_ms is not None:
            detail = f"{record.median_ms:.3f} ms"
        else:
            detail = summarize(record.error, 100) or ""
        origin = f" ({record.how})" if record.how != R.BUILT else ""
        self._line(f"[{self.done}/{self.total}] {record.model} b{record.batch_size} {record.candidate}: "
                   f"{record.status}{origin} {detail}")

    def worker_ready(self, worker: str, device: str, node: str) -> None:
        self.current[worker] = "idle"
        self._line(f"worker {worker} ready on {device}")

    def worker_lost(self, worker: str, replacement: str | None, why: str) -> None:
        self.current.pop(worker, None)
        self._line(f"worker {worker} {why}; replaced by {replacement}")

    def retry(self, job, why: str) -> None:
        self._line(f"retrying {job.candidate} on another worker ({why})")

    def waiting(self, job, owner: str) -> None:
        self._line(f"{_what(job)} is being built by sweep {owner}; taking it from the store when done")
