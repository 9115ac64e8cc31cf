"""One sweep from spec to report, as a short pipeline.

    prepare (store, models: before Ray starts) -> start workers -> plan (jobs and their keys)
    -> partition by what the store holds -> run (re-check on the driver; evaluate and build on
    workers, claiming keys other drivers may share) -> select -> deploy -> report

Every step is a function below; ``run_sweep`` only strings them together.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from aitune.decision import Rounds
from orchestrator import records as R
from orchestrator.deploy.install import deploy_winners
from orchestrator.dispatch.progress import Progress
from orchestrator.dispatch.scheduler import JobGate, Limits, Scheduler
from orchestrator.error_text import summarize
from orchestrator.outcome.diff import SweepDiff, diff_sweeps
from orchestrator.outcome.report import decisions_line, render, write_reports
from orchestrator.outcome.selection import Answer, Ask, Group, choose_winners
from orchestrator.planning.candidates import Toolchains, candidate_specs, identify_models
from orchestrator.planning.families import NARROWED, FamilyGate, Waves
from orchestrator.planning.forecast import job_estimator
from orchestrator.planning.keys import EVALUATE, RECHECK, REUSE, Decision, Policy, decide, expand, recheck
from orchestrator.records import DeployRecord, Job, ResultRecord, SelectionRecord, WorkerInfo
from orchestrator.spec.schema import SweepSpec, parse_spec
from orchestrator.store import DB_NAME, ResultStore, SqliteStore
from orchestrator.worker.ray_pool import RayPool

log = logging.getLogger(__name__)


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

    @property
    def problems(self) -> list[str]:
        """What the user asked for that did not happen (non-empty: the CLI exits non-zero)."""
        out = [f"{d.model} b{d.batch_size} on {d.target}: deploy {d.status}: {d.reason}"
               for d in self.deployments if d.status != "deployed"]
        out += [f"{s.model} b{s.batch_size}: no correct candidate, nothing to deploy"
                for s in self.selections if s.winner_key is None]
        skipped = [r for r in self.results if r.status == R.SKIPPED]
        if skipped:  # the winners were chosen without them
            out.append(f"{len(skipped)} candidate(s) skipped: {R.BUDGET_RAN_OUT} (budgets.total_s) before they "
                       "started; the same command again runs them and reuses what finished")
        return out


class Heartbeat:
    """Renews the sweep's heartbeat and its claims while the driver lives (a thread of its own)."""

    def __init__(self, store: ResultStore, sweep_id: str) -> None:
        self.store, self.sweep_id = store, sweep_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{sweep_id}", daemon=True)

    def _beat(self) -> None:
        interval = max(self.store.lease_s / 3, 0.2)
        while not self._stop.wait(interval):
            try:
                self.store.heartbeat(self.sweep_id)
            except Exception as exc:  # a busy store: the next beat tries again
                log.warning("heartbeat of sweep %s failed: %s", self.sweep_id, exc)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class StoreGate(JobGate):
    """Claims each artifact key before it is built; defers keys another live driver holds.

    A key another driver built after this sweep was planned (its claim already released) is not
    built again either: the result is taken as any stored result.
    """

    def __init__(self, store: ResultStore, sweep_id: str, resolve, known: dict[str, set], events) -> None:
        self.store, self.sweep_id, self.resolve, self.events = store, sweep_id, resolve, events
        self.known = known  # artifact key -> the result ids the plan already took into account
        self.waiting: set[str] = set()

    def _news(self, keys) -> dict[str, list[ResultRecord]]:
        """Results other drivers stored for ``keys`` since they were planned."""
        found = self.store.results_for(keys)
        return {key: fresh for key, records in found.items()
                if (fresh := [r for r in records if r.sweep_id != self.sweep_id
                              and r.result_id not in self.known.get(key, set())
                              and r.status not in (R.INFRA, R.SKIPPED)])}

    def admit(self, job: Job) -> bool:
        owner = self.store.claim(job.key, self.sweep_id)
        if owner is not None:  # another driver is building it
            if job.key not in self.waiting:
                self.waiting.add(job.key)
                self.events.waiting(job, owner)
            return False
        if self._news([job.key]):
            self.store.release(job.key, self.sweep_id)
            return False  # another driver built it meanwhile: poll takes it
        return True

    def poll(self, deferred: list[Job]) -> tuple[list[ResultRecord], list[Job]]:
        done, runnable = [], []
        news = self._news([j.key for j in deferred])
        for job in deferred:
            fresh = news.get(job.key)
            if fresh:  # the other driver finished it: take it as any stored result
                self.known.setdefault(job.key, set()).update(r.result_id for r in fresh)
                outcome = self.resolve(job, fresh)
                (done if isinstance(outcome, ResultRecord) else runnable).append(outcome)
            elif self.store.claim(job.key, self.sweep_id) is None:
                runnable.append(job)  # its driver gave up or died: the claim expired, it is ours now
        return done, runnable


def open_store(root: str | Path) -> SqliteStore:
    return SqliteStore(Path(root))


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what creating it would make), if any."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


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
    store: ResultStore | None = None,
) -> SweepOutcome:
    from cluster import Inventory, connect, plan_deploy_targets, plan_worker_slots

    console = console or Console()
    # Everything that can be refused is refused before Ray starts: the store, then the models.
    own_store = store is None
    root = Path(store_root or spec.store)
    new_root = _first_missing(root) if own_store else None
    new_db = own_store and not (root / DB_NAME).exists()
    store = store or open_store(root)
    try:
        identities = identify_models(spec)
        handle = connect(address, **(ray_init or {}))
    except BaseException:
        if own_store:
            store.close()
            # a refused run leaves no store behind that it made itself
            if new_root is not None:
                shutil.rmtree(new_root, ignore_errors=True)
            elif new_db:
                for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
                    (root / name).unlink(missing_ok=True)
        raise
    scheduler = None
    sweep_id = None
    try:
        inventory = Inventory.from_ray()
        slots = plan_worker_slots(inventory, cpu_slots=spec.workers.cpu_slots,
                                  threads_per_slot=spec.workers.threads_per_slot, use_gpus=spec.workers.use_gpus)
        if deploy and spec.deploy.targets:
            try:  # targets the cluster can't satisfy: refused before any worker starts
                plan_deploy_targets(inventory, spec.deploy.targets)
            except ValueError as exc:
                raise ValueError(f"deploy.targets: {exc}") from None
        from cluster.node_share import start_node_shares

        # Owned by the driver: they hand out core blocks and the measure lock for the whole sweep.
        node_shares = start_node_shares([n.node_id for n in inventory.alive_nodes])  # noqa: F841
        sweep_id = store.begin_sweep(spec.name, spec.model_dump(mode="json"))
        console.print(f"sweep {sweep_id}: {len(slots)} worker slot(s) on {len(inventory.nodes)} node(s); "
                      f"store {store.root or 'in memory'}", markup=False, highlight=False)
        progress = Progress(console, live=live)
        with Heartbeat(store, sweep_id):
            asks = ReferenceAsks(store)
            scheduler = Scheduler(slots, spec.model_dump(mode="json"), _limits(spec),
                                  on_result=_committer(store, sweep_id, asks), events=progress, pool=RayPool(),
                                  toolchain=Toolchains())
            workers = Workers(scheduler, slots, local=handle.embedded)
            with progress:
                jobs = _plan(spec, identities, workers.classes())
                priors = _priors(store, jobs)
                decisions = [decide(j, p, Policy(force, retry_failed), store.checkpoint_problem) for j, p in priors]
                known = {j.key: {r.result_id for r in p} for j, p in priors}
                waves = Waves.split(spec, decisions)
                progress.total = len(decisions)
                start = time.monotonic()
                # One run: followers (reuse: decisions) wait, in the gate, for their own family head.
                results = _run(spec, store, sweep_id, workers, waves.first + waves.followers(), progress, asks, known, waves)
                more = waves.fallback(results)  # followers none of whose top-k was correct
                if more:
                    left = None
                    if spec.budgets.total_s is not None:  # the fallback shares the sweep's one budget
                        left = max(spec.budgets.total_s - (time.monotonic() - start), 1e-3)
                    results += _run(spec, store, sweep_id, workers, more, progress, asks, known, budget_s=left)
                tune_s = time.monotonic() - start
            decide_start = time.monotonic()
            selections = choose_winners(results, spec.strategy(), decide=_decider(workers, store, spec),
                                        previous=None if force else _previous_selection(store, spec, sweep_id),
                                        rule=spec.decision.rule(), rank=_ranker(spec))
            decide_s = time.monotonic() - decide_start
            waves.annotate(selections, results)
            for s in selections:
                store.put_selection(sweep_id, s)
            scheduler.shutdown()
            scheduler = None
            deployments = (deploy_winners(spec, store, sweep_id, selections, results, inventory)
                           if deploy and spec.deploy.targets else [])
        store.finish_sweep(sweep_id, "done")
        how = Counter(r.how for r in results if r.status != R.SKIPPED)  # skipped: neither built nor reused
        outcome = SweepOutcome(sweep_id, store.root, results, selections, deployments, tune_s=tune_s, decide_s=decide_s,
                               reused=sum(v for k, v in how.items() if k != R.BUILT), ran=how.get(R.BUILT, 0), how=dict(how))
        try:
            outcome.diff = diff_sweeps(store, sweep_id)
        except Exception as exc:  # the diff is a view on the history: the sweep itself stands
            log.warning("no diff against the previous sweep: %s", exc)
        if write_report:
            swept = store.sweep_results(sweep_id)
            render(console, swept, selections, deployments)
            line = decisions_line(selections, decide_s, tune_s)
            if line:
                console.print(line, markup=False, highlight=False)
            for line in outcome.diff.lines() if outcome.diff else []:
                console.print(line, markup=False, highlight=False)
            if store.root is not None:
                out = store.root / "reports" / sweep_id
                outcome.reports = write_reports(out, store.sweep_info(sweep_id).to_dict(), swept, selections, deployments,
                                                diff=outcome.diff.to_dict() if outcome.diff else None)
                console.print(f"reports: {', '.join(str(p) for p in outcome.reports.values())}", markup=False, highlight=False)
        return outcome
    except BaseException as exc:
        if sweep_id is not None:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed: {type(exc).__name__}"
            try:
                store.finish_sweep(sweep_id, status)
            except Exception as inner:  # the original error matters more
                log.warning("could not mark sweep %s as %s: %s", sweep_id, status, inner)
        raise
    finally:
        if scheduler is not None:
            scheduler.shutdown()
        if own_store:
            store.close()
        handle.shutdown()


class Workers:
    """The sweep's workers, started when first needed.

    Job keys need each worker's device class. On an embedded local Ray whose slots are all CPU
    slots, the workers would run this very interpreter on this very machine, so the driver knows
    their device class without starting them; a sweep the store answers entirely then starts none.
    Anywhere else (a cluster, GPUs) the workers start first and report it.
    """

    def __init__(self, scheduler: Scheduler, slots, local: bool) -> None:
        self.scheduler, self.slots = scheduler, slots
        self.local = local and all(slot.kind == "cpu" for slot in slots)
        self._infos = None
        self._planned: set[str] = set()

    def classes(self) -> list:
        if not self.local:
            self._infos = self.scheduler.start_workers()
            return self._infos
        from aitune.canonical import sha256_of
        from aitune.environment import describe_environment
        device_class = describe_environment("cpu").device_class()
        key = sha256_of(device_class)
        self._planned = {key}
        return [WorkerInfo(slot.label, "", "", 0, "cpu", device_class, key, slot.threads) for slot in self.slots]

    def started(self) -> Scheduler:
        if self._infos is None:
            self._infos = self.scheduler.start_workers()
            odd = {i.device_class_key for i in self._infos} - self._planned
            if odd:  # a worker that is not what the driver planned for: its jobs would never run
                raise RuntimeError(f"workers report device class(es) {sorted(k[:12] for k in odd)}, not the "
                                   f"driver's own {sorted(k[:12] for k in self._planned)}: run with --address to a cluster")
        return self.scheduler


def _limits(spec: SweepSpec) -> Limits:
    return Limits(spec.budgets.build_timeout_s, spec.budgets.measure_timeout_s, spec.budgets.total_s)


def _plan(spec: SweepSpec, identities: dict[str, tuple[str, str]], infos) -> list[Job]:
    device_classes = {i.device_class_key: i.device_class for i in infos}
    threads = {i.device_class_key: i.threads for i in infos}
    return expand(spec, {n: fp for n, (fp, _) in identities.items()}, device_classes, threads,
                  structures={n: st for n, (_, st) in identities.items()})


def _priors(store: ResultStore, jobs: list[Job]):
    stored = store.results_for(j.key for j in jobs)
    return [(j, stored.get(j.key, [])) for j in jobs]


class ReferenceAsks:
    """Which job is asked to send the eager fp32 reference of each (model, shape, samples, device class).

    One job at a time is asked; if it finishes without sending it, the next one is.
    """

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self.asked: dict[str, str] = {}  # reference key -> the job asked to send it

    def want(self, job: Job) -> bool:
        key = job.reference_key
        holder = self.asked.get(key)
        if holder is not None and holder != job.key or self.store.has_reference(key):
            return False
        self.asked[key] = job.key
        return True

    def answered(self, record: ResultRecord, sent: bool) -> None:
        if not sent and self.asked.get(record.reference_key) == record.key:
            del self.asked[record.reference_key]


def _committer(store: ResultStore, sweep_id: str, asks: ReferenceAsks):
    def commit(record: ResultRecord, checkpoint: bytes | None, outputs: bytes | None, reference: bytes | None) -> ResultRecord:
        asks.answered(record, reference is not None)
        if record.status in (R.OK, R.INCORRECT) and checkpoint is None and record.source is None:
            record.status, record.error = R.ERROR, "the worker returned no checkpoint"
            record.measurement = None
        # The reference first: a driver killed between the two writes then loses nothing a
        # later run (which reuses the result and asks for no reference) would need.
        if reference is not None and record.reference_key:
            store.put_reference(record.reference_key, reference)
        return store.add_result(sweep_id, record, checkpoint, outputs)

    return commit


def _run(spec: SweepSpec, store: ResultStore, sweep_id: str, workers: "Workers", decisions: list[Decision],
         progress: Progress, asks: ReferenceAsks, known: dict[str, set], waves: Waves | None = None,
         budget_s: float | None = None) -> list[ResultRecord]:
    """Reuse and re-check what the store holds; evaluate and build the rest on the workers
    (``budget_s``: the seconds they may take; None: the sweep's ``total_s``)."""
    results: list[ResultRecord] = []
    to_run: list[Job] = []
    priors: dict[str, ResultRecord] = {}

    def settle(decision: Decision) -> ResultRecord | Job:
        """A result now (reused, or re-checked on the driver) or a job for the workers."""
        job, prior = decision.job, decision.prior
        if decision.action == REUSE:
            return store.add_reuse(sweep_id, prior)
        if decision.action == RECHECK:
            outputs, reference = store.outputs_bytes(prior), store.reference_bytes(job.reference_key)
            if outputs is not None and reference is not None:
                return store.add_result(sweep_id, recheck(job, prior, outputs, reference, spec))
            decision = Decision(job, EVALUATE, prior, ["check"], "stored outputs unreadable")
        if decision.action == EVALUATE:
            job.mode, job.redo = "evaluate", list(decision.redo)
            priors[job.key] = prior
            return job
        job.mode, job.redo = "build", []
        return job

    for decision in decisions:
        outcome = settle(decision)
        (results if isinstance(outcome, ResultRecord) else to_run).append(outcome)
    if results:
        progress.reused(len(results), dict(Counter(r.how for r in results)))

    def resolve(job: Job, stored: list[ResultRecord]) -> ResultRecord | Job:
        return settle(decide(job, stored, Policy(), store.checkpoint_problem))

    def payload(job: Job) -> tuple[bytes, dict]:
        prior = priors[job.key]
        return store.checkpoint_bytes(prior), prior.to_dict()

    gate = StoreGate(store, sweep_id, resolve, known, progress)
    if waves is not None and waves.held:
        gate = FamilyGate(gate, waves, store, sweep_id, to_run, results)
    if not to_run:
        return results  # everything came from the store: no worker needs to start
    # Longest first, by the store's phase history: a long build that starts last holds up the end.
    ran = workers.started().run(to_run, asks.want, gate=gate, payload=payload, estimate=job_estimator(store),
                                budget_s=budget_s)
    return results + [r for r in ran if r.error_class != NARROWED]


def _decider(workers: "Workers", store: ResultStore, spec: SweepSpec, clock=time.monotonic):
    """Each group's decision rounds on an idle worker of its device class (groups side by side),
    read only when a worker is free for them; answers are read back with checks."""

    def decide(asks: dict[Group, Ask]) -> dict[Group, Answer | str]:
        scheduler = workers.started()
        start, sent = clock(), {}

        def call(group: Group, ask: Ask):
            model, batch, _ = group

            def make():  # read from the store only when a worker is free for it
                sent[group] = clock()
                checkpoints = {r.key: (r.backend, r.manifest_sha256, store.checkpoint_bytes(r)) for r in ask.records}
                return "decide", (checkpoints, model, batch, ask.rule.to_dict(), ask.keys)

            # the worker that ran most of them holds the model already
            ran = Counter(r.worker.worker_id for r in ask.records if r.worker is not None)
            return group[2], (ran.most_common(1)[0][0] if ran else None), make

        # the cap and min_rounds bound the rounds; warm-up and loading the checkpoints come on top
        longest = max((a.rule.cap_s + 2 * a.estimate_s + 2.0 * len(a.records) for a in asks.values()), default=0.0)
        answers = scheduler.call_idle({g: call(g, a) for g, a in asks.items()}, spec.budgets.measure_timeout_s + longest)
        out: dict[Group, Answer | str] = {}
        where: dict[Group, tuple[str, float, float]] = {}
        for group, answer in answers.items():
            if isinstance(answer, BaseException):  # deciding is a refinement: the first measurements stand
                log.warning("no decision rounds for %s b%s: %s", group[0], group[1], summarize(str(answer), 300))
                out[group] = f"{type(answer).__name__}: {summarize(str(answer), 200) or 'no message'}"
                continue
            try:  # a worker's answer is read back like anything else: checked
                rounds = Rounds.from_dict(answer)
            except Exception as exc:
                log.warning("no decision rounds for %s b%s: the worker's answer is not rounds (%s)", group[0], group[1], exc)
                out[group] = f"the worker's answer is not rounds ({exc})"
                continue
            load_s = answer.get("load_s") if isinstance(answer, dict) else None
            out[group] = Answer(rounds, wait_s=max(0.0, sent.get(group, start) - start),
                                load_s=float(load_s) if isinstance(load_s, (int, float)) and load_s >= 0 else 0.0)
            window = answer.get("window") if isinstance(answer, dict) else None
            if isinstance(window, list) and len(window) == 2 and all(isinstance(t, (int, float)) for t in window):
                where[group] = (str(answer.get("node")), float(window[0]), float(window[1]))
        for group, (node, a, b) in where.items():  # what else ran on that node meanwhile
            out[group].beside = [f"rounds of {g[0]} b{g[1]}, {min(b, e) - max(a, s):.1f} s"
                                 for g, (n, s, e) in where.items() if g != group and n == node and s < b and e > a]
        return out

    return decide


def _ranker(spec: SweepSpec):
    """A candidate's place in the spec's list (the default set's where the spec has none): the
    fixed tie rule's second key."""
    from aitune.torch.backend.registry import display_name
    places: dict[str, dict[str, int]] = {}

    def rank(record: ResultRecord) -> int:
        device_type = (record.worker.device_class or {}).get("device_type", "cpu") if record.worker else "cpu"
        if device_type not in places:
            names: dict[str, int] = {}
            for i, c in enumerate(candidate_specs(spec, device_type)):
                try:
                    names.setdefault(display_name(c.backend, dict(c.config)), i)
                except Exception:  # a candidate that can't be made here has no name to match
                    continue
            places[device_type] = names
        return places[device_type].get(record.candidate, len(places[device_type]))

    return rank


def _origin(record: ResultRecord) -> tuple[int | None, str]:
    """The stored measurement a record stands for (its source unless it was measured here), and its status."""
    if record.how in (R.REUSED, R.RECHECKED) and record.source:
        return record.source.get("result"), record.status
    return record.result_id, record.status


def _previous_selection(store: ResultStore, spec: SweepSpec, this_sweep: str):
    """An earlier sweep's decision for a group whose results all come from the store unchanged."""
    strategy = spec.strategy().describe()
    origins_by_sweep: dict[str, dict] = {}

    def group_origins(sweep_id: str, group) -> set:
        if sweep_id not in origins_by_sweep:
            grouped: dict = {}
            for r in store.sweep_results(sweep_id):
                grouped.setdefault((r.model, r.batch_size, r.device_class_key), set()).add(_origin(r))
            origins_by_sweep[sweep_id] = grouped
        return origins_by_sweep[sweep_id].get(group, set())

    def objective_of(sweep) -> str | None:
        try:
            return parse_spec(sweep.spec).strategy().describe()
        except Exception:  # an older or foreign spec: don't reuse its decisions
            return None

    def previous(group, records: list[ResultRecord]) -> SelectionRecord | None:
        # Same measurements and the same verdicts as an earlier decision: it stands (re-checked
        # results that kept their status change nothing the selection looks at).
        if not records or not all(r.how in (R.REUSED, R.RECHECKED) for r in records):
            return None
        origins = {_origin(r) for r in records}
        for sweep in reversed(store.list_sweeps()):
            if sweep.id == this_sweep or sweep.status != "done" or objective_of(sweep) != strategy:
                continue
            for sel in store.selections(sweep.id):
                if (sel.model, sel.batch_size, sel.device_class_key) == group and group_origins(sweep.id, group) == origins:
                    sel.decided_in = sel.decided_in or sweep.id  # keep the sweep that really decided
                    return sel
        return None

    return previous
