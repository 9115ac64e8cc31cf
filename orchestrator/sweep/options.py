"""What a sweep is asked to do beyond its spec (``SweepOptions``), and what it did (``SweepOutcome``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from orchestrator import records as R
from orchestrator.outcome.diff import SweepDiff
from orchestrator.records import DeployRecord, ResultRecord, SelectionRecord
from orchestrator.store import ResultStore


@dataclass
class SweepOptions:
    """How to run a spec: where (``address``), against which store, and what to skip or redo."""

    #: a Ray cluster address; None: RAY_ADDRESS, else an embedded local Ray
    address: str | None = None
    #: the store directory (None: the spec's ``store``); ignored when ``store`` is given
    store_root: str | Path | None = None
    #: build every candidate again, ignoring stored results
    force: bool = False
    #: run stored failures again (successes are reused)
    retry_failed: bool = False
    #: deploy the winners to the spec's targets
    deploy: bool = True
    console: Console | None = None
    #: a live progress display (None: when the console is a terminal)
    live: bool | None = None
    #: extra keyword arguments for ``ray.init`` on an embedded Ray
    ray_init: dict[str, Any] | None = None
    #: print the tables and write JSON/CSV/Markdown/PNG reports into the store
    write_report: bool = True
    #: an open store to use (the caller closes it); None: open ``store_root``
    store: ResultStore | None = None


@dataclass
class SweepOutcome:
    sweep_id: str
    store: Path | None
    results: list[ResultRecord]
    selections: list[SelectionRecord]
    deployments: list[DeployRecord]
    reports: dict[str, Path] = field(default_factory=dict)
    #: seconds of the run phase: re-checks, worker start-up (when any is needed) and dispatch to the last result
    tune_s: float = 0.0
    reused: int = 0
    ran: int = 0
    #: seconds of choosing the winners: screening and every group's decision rounds (side by side)
    decide_s: float = 0.0
    #: how each result came about: built, reused, re-checked, re-measured
    how: dict[str, int] = field(default_factory=dict)
    #: against the previous sweep of the same models (None: there was none)
    diff: SweepDiff | None = None
    #: ``batch_sizes: auto``: per (model, device class), the sizes tuned, their throughput, why the search stopped
    batch_search: list[dict] = field(default_factory=list)
    #: static buckets against a dynamic-shape artifact (orchestrator.outcome.shape_strategy)
    shape_strategies: list[dict] = field(default_factory=list)
    #: ``latency_target``: per (model, device class), the serving search's points and choice (orchestrator.sweep.serving)
    serving: list[dict] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """What the user asked for that did not happen (non-empty: the CLI exits non-zero)."""
        out = [f"{d.model} b{d.batch_size} on {d.target}: deploy {d.status}: {d.reason}"
               for d in self.deployments if d.status != R.DeployStatus.DEPLOYED]
        out += [f"{s.model} b{s.batch_size}: no correct candidate, nothing to deploy"
                for s in self.selections if s.winner_key is None]
        out += [f"{g['model']}: serving settings not searched: {g['error']}" for g in self.serving if g.get("error")]
        skipped = [r for r in self.results if r.status == R.SKIPPED]
        if skipped:  # the winners were chosen without them
            out.append(f"{len(skipped)} candidate(s) skipped: {R.BUDGET_RAN_OUT} (budgets.total_s) before they "
                       "started; the same command again runs them and reuses what finished")
        return out
