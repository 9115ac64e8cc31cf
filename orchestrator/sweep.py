"""One sweep from spec to report: connect, start workers, expand, dedupe, run, select, deploy, report."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from rich.console import Console

from aitune.measure import Measurement
from cluster import Inventory, connect, plan_deploy_targets, plan_worker_slots
from orchestrator import records as R
from orchestrator.candidates import expand, load_model, model_fingerprint
from orchestrator.deploy import DeployWorker
from orchestrator.progress import Progress
from orchestrator.records import DeployRecord, Job, ResultRecord, SelectionRecord
from orchestrator.report import render, write_reports
from orchestrator.scheduler import Limits, Scheduler
from orchestrator.selection import choose_winners
from orchestrator.spec import SweepSpec
from orchestrator.store import Store
from orchestrator.transfer import pack_dir

log = logging.getLogger(__name__)

#: statuses worth running again in a later sweep: they say nothing about the candidate itself
NOT_REUSABLE = (R.INFRA, R.SKIPPED)


@dataclass
class SweepOutcome:
    sweep_id: str
    store: Path
    results: list[ResultRecord]
    selections: list[SelectionRecord]
    deployments: list[DeployRecord]
    reports: dict[str, Path] = field(default_factory=dict)
    #: seconds from the first job dispatched to the last result (Ray start-up excluded)
    tune_s: float = 0.0
    reused: int = 0
    ran: int = 0


def run_sweep(
    spec: SweepSpec,
    *,
    address: str | None = None,
    store_root: str | Path | None = None,
    force: bool = False,
    retry_failed: bool = False,
    deploy: bool = True,
    console: Console | None = None,
    live: bool | None = None,
    ray_init: dict[str, Any] | None = None,
    write_report: bool = True,
) -> SweepOutcome:
    console = console or Console()
    handle = connect(address, **(ray_init or {}))
    store = Store(Path(store_root or spec.store))
    scheduler = None
    sweep_id = None
    try:
        inventory = Inventory.from_ray()
        slots = plan_worker_slots(
            inventory, cpu_slots=spec.workers.cpu_slots, threads_per_slot=spec.workers.threads_per_slot,
            use_gpus=spec.workers.use_gpus,
        )
        sweep_id = store.begin_sweep(spec.name, spec.model_dump(mode="json"))
        console.print(f"sweep {sweep_id}: {len(slots)} worker slot(s) on {len(inventory.nodes)} node(s); store {store.root}")
        fingerprints = {m.name: model_fingerprint(load_model(m)) for m in spec.models}

        def commit(record: ResultRecord, checkpoint: bytes | None, reference: bytes | None) -> None:
            if record.status == R.OK and checkpoint is None:
                record.status, record.error = R.ERROR, "the worker returned no checkpoint"
            # The reference first: a driver killed between the two writes then loses nothing a
            # later run (which reuses the result and asks for no reference) would need.
            ref_key = jobs_by_key[record.key].reference_key
            if reference is not None:
                store.put_reference(ref_key, reference)
            elif asked.get(ref_key) == record.key:
                del asked[ref_key]  # the job asked for it failed before sending it: ask the next
            store.put_result(sweep_id, record, checkpoint)

        asked: dict[str, str] = {}  # reference key -> the job asked to send it
        limits = Limits(spec.budgets.build_timeout_s, spec.budgets.measure_timeout_s, spec.budgets.total_s)
        progress = Progress(console, live=live)
        scheduler = Scheduler(slots, spec.model_dump(mode="json"), limits, on_result=commit, on_event=progress.event)
        with progress:
            infos = scheduler.start_workers()
            device_classes = {i.device_class_key: i.device_class for i in infos}
            jobs = expand(spec, fingerprints, device_classes)
            jobs_by_key = {j.key: j for j in jobs}
            stored = {} if force else store.get_results(jobs_by_key)
            reused, to_run = [], []
            for job in jobs:
                rec = stored.get(job.key)
                if rec is not None and rec.status not in NOT_REUSABLE and not (retry_failed and rec.status != R.OK) \
                        and (rec.status != R.OK or store.checkpoint_dir(rec) is not None):
                    store.mark_reused(sweep_id, rec)
                    rec.from_store = True
                    reused.append(rec)
                else:
                    to_run.append(job)
            progress.total = len(jobs)
            if reused:
                progress.reused_results(len(reused))
            def want_reference(job: Job) -> bool:
                # One job at a time is asked; if it fails before sending it, the next one is.
                key = job.reference_key
                if key in asked or store.reference_path(key) is not None:
                    return False
                asked[key] = job.key
                return True

            start = time.monotonic()
            ran = scheduler.run(to_run, want_reference)
            tune_s = time.monotonic() - start
        results = reused + ran
        selections = choose_winners(
            results, spec.strategy(), remeasure=_remeasurer(scheduler, store, spec),
            previous=None if force else _previous_selection(store, spec),
        )
        for s in selections:
            store.put_selection(sweep_id, s)
        scheduler.shutdown()
        scheduler = None
        deployments = _deploy(spec, store, sweep_id, selections, results, inventory, console) if deploy else []
        store.finish_sweep(sweep_id, "done")
        outcome = SweepOutcome(sweep_id, store.root, results, selections, deployments, tune_s=tune_s, reused=len(reused), ran=len(ran))
        if write_report:
            swept = store.sweep_results(sweep_id)
            render(console, swept, selections, deployments)
            out = store.root / "reports" / sweep_id
            outcome.reports = write_reports(out, store.sweep_info(sweep_id), swept, selections, deployments)
            console.print(f"reports: {', '.join(str(p) for p in outcome.reports.values())}")
        return outcome
    except BaseException as exc:
        if sweep_id is not None:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {type(exc).__name__}"
            store.finish_sweep(sweep_id, status)
        raise
    finally:
        if scheduler is not None:
            scheduler.shutdown()
        store.close()
        handle.shutdown()


def _remeasurer(scheduler: Scheduler, store: Store, spec: SweepSpec):
    def remeasure(group, records: list[ResultRecord]) -> dict[str, Measurement]:
        model, batch, dc = group
        worker = scheduler.live_worker(dc)
        if worker is None:
            return {}
        checkpoints = {}
        for r in records:
            path = store.checkpoint_dir(r)
            if path is None:
                return {}
            checkpoints[r.key] = pack_dir(path)
        budget = max(spec.measure.budget_s, 0.5)
        try:
            ref = worker.actor.remeasure.remote(checkpoints, model, batch, budget)
            fresh = ray.get(ref, timeout=spec.budgets.measure_timeout_s)
        except Exception as exc:  # remeasuring is a refinement: the first measurements still stand
            log.warning("re-measuring %s b%s failed: %s", model, batch, exc)
            return {}
        return {k: Measurement.from_dict(v) for k, v in fresh.items()}

    return remeasure


def _previous_selection(store: Store, spec: SweepSpec):
    """An earlier sweep's decision for a group whose results all come from the store unchanged."""
    strategy = spec.strategy().describe()
    keys_by_sweep: dict[str, dict] = {}  # sweep id -> group -> its result keys, read once

    def group_keys(sweep_id: str, group) -> set[str]:
        if sweep_id not in keys_by_sweep:
            grouped: dict = {}
            for r in store.sweep_results(sweep_id):
                grouped.setdefault((r.model, r.batch_size, r.device_class_key), set()).add(r.key)
            keys_by_sweep[sweep_id] = grouped
        return keys_by_sweep[sweep_id].get(group, set())

    def previous(group, records: list[ResultRecord]) -> SelectionRecord | None:
        if not records or not all(r.from_store for r in records):
            return None
        keys = {r.key for r in records}
        for sweep in reversed(store.list_sweeps()):
            if sweep.get("status") != "done" or _objective_of(sweep) != strategy:
                continue
            for sel in store.selections(sweep["id"]):
                if (sel.model, sel.batch_size, sel.device_class_key) != group:
                    continue
                if group_keys(sweep["id"], group) == keys:
                    if "(decided in sweep " not in sel.reason:  # keep the sweep that really decided
                        sel.reason = f"{sel.reason} (decided in sweep {sweep['id']})"
                    return sel
        return None

    return previous


def _objective_of(sweep: dict) -> str | None:
    try:
        from orchestrator.spec import parse_spec

        return parse_spec(sweep["spec"]).strategy().describe()
    except Exception:  # an older or foreign spec: don't reuse its decisions
        return None


def _deploy(spec, store: Store, sweep_id: str, selections, results, inventory, console) -> list[DeployRecord]:
    if not spec.deploy.targets:
        return []
    slots = plan_deploy_targets(inventory, spec.deploy.targets)
    by_key = {r.key: r for r in results}
    actor_class = ray.remote(max_restarts=0)(DeployWorker)
    actors = []
    for slot in slots:
        options = dict(slot.actor_options())
        if slot.env():
            options["runtime_env"] = {"env_vars": slot.env()}
        actors.append((slot, actor_class.options(**options).remote({"kind": slot.kind, "threads": slot.threads}, slot.label)))
    records: list[DeployRecord] = []
    try:
        calls = []
        for sel in selections:
            if sel.winner_key is None:
                continue
            winner = by_key[sel.winner_key]
            ckpt_dir = store.checkpoint_dir(winner)
            if ckpt_dir is None:
                for slot, _ in actors:
                    rec = DeployRecord(sel.model, sel.batch_size, slot.label, "refused", sel.winner_key,
                                       reason=f"the winner's checkpoint is missing from the store ({store.root})")
                    store.put_deploy(sweep_id, rec)
                    records.append(rec)
                continue
            ref_path = store.reference_path(winner.reference_key) if winner.reference_key else None
            reference = ref_path.read_bytes() if ref_path else None
            checkpoint = pack_dir(ckpt_dir)
            ckpt_ref, refs_ref = ray.put(checkpoint), ray.put(reference)
            for slot, actor in actors:
                calls.append((sel, slot, actor.deploy.remote(
                    ckpt_ref, refs_ref, sel.to_dict(), winner.config.get("precision", "float32"),
                    spec.tolerance_overrides(), spec.deploy.latency_check_s)))
        for sel, slot, ref in calls:
            try:
                rec = DeployRecord.from_dict(ray.get(ref, timeout=spec.budgets.build_timeout_s))
            except Exception as exc:
                rec = DeployRecord(sel.model, sel.batch_size, slot.label, "failed", sel.winner_key, reason=f"{type(exc).__name__}: {exc}")
            store.put_deploy(sweep_id, rec)
            records.append(rec)
    finally:
        for _, actor in actors:
            ray.kill(actor, no_restart=True)
    return records
