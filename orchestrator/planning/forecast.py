"""``python -m orchestrator plan SPEC...``: what a sweep would do and cost, running nothing.

No Ray starts, so the device classes can't come from workers. The plan is made for the device
classes the store's latest sweep ran on (with their threads: the evaluation key holds them);
where the store has none, for this machine's CPU, computed in-process
(``aitune.environment.describe_environment('cpu')``) with the CPU slots the sweep would make
here. ``--local`` asks for the local CPU whatever the store holds.

The estimate is the store's phase history: per backend, the median build and the median
check+measure of the results it built; re-checks and re-measures count their own phases only.
It is divided by the worker slots, as a sweep would run them in parallel.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aitune.accuracy import GATE_SIGNS
from aitune.canonical import sha256_of
from orchestrator import records as R
from orchestrator.planning.candidates import identify_models
from orchestrator.planning.families import Waves
from orchestrator.planning.keys import BUILD, EVALUATE, RECHECK, REUSE, Policy, decide, expand
from orchestrator.planning.shape_plans import settle_shapes
from orchestrator.spec.schema import SweepSpec
from orchestrator.store import ResultStore


@dataclass
class Forecast:
    device_classes: dict[str, dict[str, Any]]
    source: str  # "store" or "local"
    slots: int
    #: model -> device class name -> {"jobs", "reuse", "recheck", "remeasure", "new"}
    counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    estimate_s: float = 0.0
    #: jobs the workers would run (built, or evaluated from a stored checkpoint)
    worker_jobs: int = 0
    #: of those, jobs whose backend has no history in the store (not in the estimate)
    unestimated: int = 0
    #: jobs held for ``reuse: decisions`` (only their family's top-k are counted)
    narrowed: int = 0
    #: candidate -> the accuracy gates it is judged by (with or instead of its tolerance)
    gates: dict[str, str] = field(default_factory=dict)
    #: model -> max_batch, for the models whose batch sizes are searched (``batch_sizes: auto``)
    searched: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        t = self.totals
        out = [f"plan: {t.get('jobs', 0)} job(s) on {len(self.device_classes)} device class(es) "
               f"({'from the store' if self.source == 'store' else 'this machine CPU'}), {self.slots} worker slot(s)",
               f"  {t.get('reuse', 0)} reused, {t.get('recheck', 0)} re-checked, {t.get('remeasure', 0)} re-measured, "
               f"{t.get('new', 0)} new" + (f"; {self.narrowed} skipped by reuse: decisions" if self.narrowed else "")]
        for model, per_dc in self.counts.items():
            for dc, c in per_dc.items():
                out.append(f"  {model} on {dc}: {c['jobs']} job(s): {c['reuse']} reused, {c['recheck']} re-checked, "
                           f"{c['remeasure']} re-measured, {c['new']} new")
        if self.unestimated and self.unestimated >= self.worker_jobs:
            out.append(f"  estimate: none: the store has no phase history for the backends of the {self.unestimated} "
                       "job(s) to run (a sweep on this store makes one)")
        else:
            est = (f"  estimate: {'at least ' if self.unestimated else ''}{self.estimate_s:.1f} s on {self.slots} slot(s) "
                   "from the store's phase history")
            if self.unestimated:
                est += f" ({self.unestimated} job(s) with no history for their backend not counted)"
            out.append(est)
        for candidate, gates in sorted(self.gates.items()):
            out.append(f"  accuracy: {candidate}: {gates}")
        for model, most in self.searched.items():
            out.append(f"  {model}: batch sizes searched (auto, up to {most}): counted here at batch 1 only; "
                       "the sweep adds a size at a time, with the three fastest candidates of the size before")
        return out

    def markdown(self) -> str:
        lines = ["# Plan", "", *[f"- {line.strip()}" for line in self.lines()], "",
                 "| model | device | jobs | reused | re-checked | re-measured | new |", "|---|---|---|---|---|---|---|"]
        for model, per_dc in self.counts.items():
            for dc, c in per_dc.items():
                lines.append(f"| {model} | {dc} | {c['jobs']} | {c['reuse']} | {c['recheck']} | {c['remeasure']} | {c['new']} |")
        return "\n".join(lines) + "\n"


def _gates_line(evaluation: dict[str, Any]) -> str | None:
    """``cosine >= 0.999, sqnr_db >= 30 (instead of the tolerance)``; None: a tolerance alone."""
    check = evaluation.get("check") or {}
    gates = check.get("gates")
    if not gates:
        return None
    said = [f"{name} {GATE_SIGNS[name]} {limit:g}" for name, limit in gates.items()
            if name in GATE_SIGNS and limit is not None]
    task = check.get("task")
    if task:  # the gate on the user's evaluation batches
        bound = f">= {task['min']:g}" if task.get("min") is not None else f"<= {task['max']:g}"
        said.append(f"task {task['metric']} {bound} on {task['samples']}")
    return ", ".join(said) + (" (instead of the tolerance)" if check.get("elementwise") is False else " (and the tolerance)")


def _stored_device_classes(store: ResultStore) -> tuple[dict[str, dict], dict[str, int], int]:
    """The device classes, threads and worker slots of the latest sweep that ran on workers."""
    for sweep in reversed(store.list_sweeps()):
        classes, threads, slots = {}, {}, set()
        for r in store.sweep_results(sweep.id):
            if r.worker is not None and r.worker.device_class:
                classes[r.device_class_key] = dict(r.worker.device_class)
                threads[r.device_class_key] = r.worker.threads
                slots.add(r.worker.worker_id.rsplit("-", 1)[0])  # a replacement keeps its slot's label
        if classes:
            return classes, threads, len(slots)
    return {}, {}, 0


def local_slots(spec: SweepSpec) -> tuple[int, int]:
    """(slots, threads per slot) the sweep would make on this machine's CPUs (as cluster.placement does)."""
    total = os.cpu_count() or 1
    slots = spec.workers.cpu_slots or max(1, min(total // (spec.workers.threads_per_slot or 1), 4))
    return slots, spec.workers.threads_per_slot or max(1, total // slots)


def _local_device_class(spec: SweepSpec) -> tuple[dict[str, dict], dict[str, int]]:
    from aitune.environment import describe_environment

    dc = describe_environment("cpu").device_class()
    key = sha256_of(dc)
    return {key: dc}, {key: local_slots(spec)[1]}


def phase_history(store: ResultStore, last: int | None = None) -> dict[str, dict[str, float]]:
    """Per backend, the median seconds of each phase over the results the store built
    (in its ``last`` sweeps only, when given)."""
    seen: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    sweeps = store.list_sweeps()
    for sweep in sweeps[-last:] if last else sweeps:
        for r in store.sweep_results(sweep.id):
            for phase, seconds in (r.phases or {}).items():
                if isinstance(seconds, (int, float)) and (r.how == R.BUILT or phase == "load_checkpoint"):
                    seen[r.backend][phase].append(float(seconds))
    return {b: {p: statistics.median(v) for p, v in phases.items()} for b, phases in seen.items()}


def forecast(spec: SweepSpec, store: ResultStore, local: bool = False) -> Forecast:
    identities = identify_models(spec)
    classes, threads, stored_slots = ({}, {}, 0) if local else _stored_device_classes(store)
    source = "store"
    if not classes:
        classes, threads, source = *_local_device_class(spec), "local"
    jobs = expand(spec, {n: fp for n, (fp, _) in identities.items()}, classes, threads,
                  structures={n: st for n, (_, st) in identities.items()}, shapes=settle_shapes(spec))
    stored = store.results_for(j.key for j in jobs)
    decisions = [decide(j, stored.get(j.key, []), Policy(), store.checkpoint_problem) for j in jobs]
    waves = Waves.split(spec, decisions)
    # Followers run only their family's top-k: known from the store where it holds the head's
    # results; otherwise the plan can't know which k, and counts the first k of each group.
    head_results = [d.prior for d in waves.first if d.action == REUSE and d.prior is not None]
    kept = list(waves.first)
    per_group: Counter = Counter()
    for d in waves.second(head_results):
        group = d.job.group
        if group in waves.sources or per_group[group] < spec.reuse_top_k:
            per_group[group] += 1
            kept.append(d)
    history = phase_history(store)
    slots = local_slots(spec)[0] if source == "local" else max(1, stored_slots)
    fc = Forecast(classes, source, slots, narrowed=len(decisions) - len(kept),
                  searched={m.name: spec.max_batch_of(m) for m in spec.models if spec.searches_batches(m)})
    totals: Counter = Counter()
    serial = 0.0
    for d in kept:
        fc.gates.setdefault(d.job.candidate, _gates_line(d.job.evaluation)) or fc.gates.pop(d.job.candidate)
        name = str(classes[d.job.device_class_key].get("device_name") or "?")
        c = fc.counts.setdefault(d.job.model, {}).setdefault(name, {"jobs": 0, "reuse": 0, "recheck": 0, "remeasure": 0, "new": 0})
        what = {REUSE: "reuse", RECHECK: "recheck", BUILD: "new"}.get(d.action)
        if d.action == EVALUATE:
            what = "remeasure" if "measure" in d.redo else "recheck"
        for bucket in (c, totals):
            bucket["jobs"] += 1
            bucket[what] += 1
        if d.action in (BUILD, EVALUATE):
            fc.worker_jobs += 1
            h = history.get(d.job.backend)
            if not h:
                fc.unestimated += 1
                continue
            phases = ("build", "check+measure", "save") if d.action == BUILD else ("load_checkpoint", "check+measure")
            serial += sum(h.get(p, 0.0) for p in phases)
    fc.totals = dict(totals)
    fc.estimate_s = serial / slots
    return fc


def write_plan(fc: Forecast, out_dir: str | Path) -> dict[str, Path]:
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"plan.json": out / "plan.json", "plan.md": out / "plan.md"}
    paths["plan.json"].write_text(json.dumps(fc.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
    paths["plan.md"].write_text(fc.markdown())
    return paths


def job_estimator(store: ResultStore, last: int = 20):
    """A job's expected seconds from the store's recent phase history, for longest-first dispatch;
    None when the store has no history yet (then jobs go first in, first out)."""
    history = phase_history(store, last)
    totals = {b: sum(h.get(p, 0.0) for p in ("build", "check+measure", "save")) for b, h in history.items()}
    if not totals:
        return None
    typical = statistics.median(totals.values())

    def estimate(job) -> float:
        h = history.get(job.backend)
        if h is not None and job.mode == "evaluate":
            return h.get("load_checkpoint", 0.0) + h.get("check+measure", 0.0)
        return totals.get(job.backend, typical)

    return estimate
