"""Live progress of a sweep: a rich table on a terminal, plain log lines otherwise."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from orchestrator import records as R


class Progress:
    def __init__(self, console: Console | None = None, total: int = 0, live: bool | None = None) -> None:
        self.console = console or Console()
        self.total = total
        self.done = 0
        self.failed = 0
        self.reused = 0
        self.current: dict[str, str] = {}  # worker id -> what it is doing
        self.started = time.monotonic()
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
        elapsed = time.monotonic() - self.started
        if self._live is not None:
            self._live.update(self._render())
        else:
            self.console.print(f"[{elapsed:7.1f}s] {text}", highlight=False, soft_wrap=True)

    def _render(self) -> Table:
        elapsed = time.monotonic() - self.started
        table = Table(title=f"sweep: {self.done}/{self.total} done, {self.failed} failed, {self.reused} from store, {elapsed:.0f} s")
        table.add_column("worker")
        table.add_column("current candidate")
        for worker, what in sorted(self.current.items()):
            table.add_row(worker, what)
        return table

    def reused_results(self, n: int) -> None:
        self.reused = n
        self.done += n
        self._line(f"{n} candidates reused from the store")

    def event(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "started":
            job = payload["job"]
            self.current[payload["worker"]] = f"{job.model} b{job.batch_size} {job.candidate} (build)"
            self._line(f"{payload['worker']}: building {job.model} b{job.batch_size} {job.candidate}")
        elif kind == "phase":
            job = payload["job"]
            self.current[payload["worker"]] = f"{job.model} b{job.batch_size} {job.candidate} ({payload['phase']})"
            if self._live is not None:
                self._live.update(self._render())
        elif kind == "result":
            rec = payload["record"]
            self.done += 1
            if rec.status != R.OK:
                self.failed += 1
            worker = (rec.worker or {}).get("worker_id")
            if worker:
                self.current[worker] = "idle"
            timing = f"{rec.median_ms:.3f} ms" if rec.median_ms is not None else (rec.error or "").splitlines()[-1][:100] if rec.error else ""
            self._line(f"[{self.done}/{self.total}] {rec.model} b{rec.batch_size} {rec.candidate}: {rec.status} {timing}")
        elif kind == "worker_ready":
            self.current[payload["worker"]] = "idle"
            self._line(f"worker {payload['worker']} ready on {payload['device']}")
        elif kind == "worker_lost":
            self.current.pop(payload["worker"], None)
            self._line(f"worker {payload['worker']} {payload['why']}; replaced by {payload['replacement']}")
        elif kind == "retry":
            self._line(f"retrying {payload['job'].candidate} on another worker ({payload['why']})")
        else:
            self._line(f"{kind}: {payload}")
