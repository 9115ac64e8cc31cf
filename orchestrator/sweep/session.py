"""One sweep after Ray is up: ``tune`` (store partition, then the workers), ``select``, ``deploy``,
``report``. The session holds what every stage shares: the spec, the store, the sweep id, the
workers and the progress display."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter

from rich.console import Console

from orchestrator import records as R
from orchestrator.deploy.install import deploy_winners
from orchestrator.dispatch.progress import Progress
from orchestrator.outcome import frontier
from orchestrator.outcome.buckets import bucket_figures, bucket_lines
from orchestrator.outcome.diff import SweepDiff, diff_sweeps
from orchestrator.outcome.report import decisions_line, render, write_reports
from orchestrator.outcome.selection import choose_winners
from orchestrator.outcome.shape_strategy import choose_strategies, strategy_lines
from orchestrator.planning.families import NARROWED, FamilyGate, Waves
from orchestrator.planning.forecast import job_estimator
from orchestrator.planning.keys import EVALUATE, RECHECK, REUSE, Decision, Policy, decide, jobs_for, recheck
from orchestrator.records import DeployRecord, Job, ResultRecord, SelectionRecord
from orchestrator.spec.schema import SweepSpec
from orchestrator.store import ResultStore
from orchestrator.sweep.batch_search import BatchSearch, search_lines
from orchestrator.sweep.deciding import EarlierDecisions, RoundsOnWorkers, SpecOrder
from orchestrator.sweep.options import SweepOptions, SweepOutcome
from orchestrator.sweep.workers import ReferenceAsks, StoreGate, Workers

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Tuned:
    """What ``tune`` leaves for the later stages."""

    results: list[ResultRecord]
    waves: Waves
    tune_s: float
    #: ``batch_sizes: auto``: each (model, device class)'s sizes tuned and why its search stopped
    batch_search: list[dict] = dataclasses.field(default_factory=list)
    #: static buckets against a dynamic-shape artifact, per (model, batch size, device class)
    shape_strategies: list[dict] = dataclasses.field(default_factory=list)


class SweepSession:
    def __init__(self, spec: SweepSpec, options: SweepOptions, store: ResultStore, sweep_id: str,
                 identities: dict[str, tuple[str, str]], workers: Workers, progress: Progress,
                 asks: ReferenceAsks, console: Console, shapes: dict | None = None) -> None:
        self.spec, self.options, self.store, self.sweep_id = spec, options, store, sweep_id
        self.identities = identities
        self.shapes = shapes or {}  # model -> planning.shape_plans.ShapePlan
        self.workers, self.progress, self.asks, self.console = workers, progress, asks, console
        self.known: dict[str, set] = {}  # artifact key -> the stored result ids the plan took into account
        self._stored: dict[str, ResultRecord] = {}  # job key -> the stored result an evaluate job judges again

    # -- tune ---------------------------------------------------------------------------------------
    def tune(self) -> Tuned:
        """Plan every job, take what the store answers, run the rest on the workers."""
        with self.progress:
            decisions = self._decide(jobs_for(self.spec, self.identities, self.workers.classes(), self.shapes))
            waves = Waves.split(self.spec, decisions)
            self.progress.total = len(decisions)
            start = time.monotonic()
            # One run: followers (reuse: decisions) wait, in the gate, for their own family head.
            results = self._run(waves.first + waves.followers(), waves)
            more = waves.fallback(results)  # followers none of whose top-k was correct
            if more:
                results += self._run(more, budget_s=self._left(start))  # the fallback shares the sweep's one budget
            search = BatchSearch(self.spec)
            if search.active:
                results += self._search(search, results, start)
                self.spec = search.realized()  # the later stages see the sizes the search reached
            return Tuned(results, waves, time.monotonic() - start, search.outcome())

    def _decide(self, jobs: list[Job]) -> list[Decision]:
        """Each job against what the store holds for its key (which result ids it saw, kept in ``known``)."""
        stored = self.store.results_for(j.key for j in jobs)
        policy = Policy(self.options.force, self.options.retry_failed)
        self.known.update({j.key: {r.result_id for r in stored.get(j.key, [])} for j in jobs})
        return [decide(j, stored.get(j.key, []), policy, self.store.checkpoint_problem) for j in jobs]

    def _left(self, start: float) -> float | None:
        total_s = self.spec.budgets.total_s
        return None if total_s is None else max(total_s - (time.monotonic() - start), 1e-3)

    def _search(self, search: BatchSearch, results: list[ResultRecord], start: float) -> list[ResultRecord]:
        """``batch_sizes: auto``: one size more per round, with the fastest few candidates of the size before."""
        search.take(results)
        more: list[ResultRecord] = []
        while (spec := search.next_spec()) is not None:
            left = self._left(start)
            if left is not None and left <= 1e-3:
                search.out_of_budget()
                break
            jobs = [j for j in jobs_for(spec, self.identities, self.workers.classes(), self.shapes) if search.wanted(j)]
            if not jobs:  # nothing left to try: the next round would be this one again
                search.nothing_to_try()
                break
            decisions = self._decide(jobs)
            self.progress.total += len(decisions)
            ran = self._run(decisions, budget_s=left)
            search.take(ran)
            more += ran
        return more + self._final_round(search, start)

    def _final_round(self, search: BatchSearch, start: float) -> list[ResultRecord]:
        """Every candidate correct at batch 1 that the search left out, at the largest size it tuned."""
        spec, left = search.final_spec(), self._left(start)
        if spec is None or (left is not None and left <= 1e-3):
            return []
        jobs = [j for j in jobs_for(spec, self.identities, self.workers.classes(), self.shapes) if search.wanted_final(j)]
        if not jobs:
            return []
        decisions = self._decide(jobs)
        self.progress.total += len(decisions)
        ran = self._run(decisions, budget_s=left)
        search.take_final(ran)
        return ran

    def _act(self, decision: Decision) -> ResultRecord | Job:
        """A result now (reused, or re-checked on the driver) or a job for the workers."""
        job, prior = decision.job, decision.prior
        if decision.action == REUSE:
            return self.store.add_reuse(self.sweep_id, prior)
        if decision.action == RECHECK:
            outputs, reference = self.store.outputs_bytes(prior), self.store.reference_bytes(job.reference_key)
            if outputs is not None and reference is not None:
                return self.store.add_result(self.sweep_id, recheck(job, prior, outputs, reference, self.spec))
            decision = Decision(job, EVALUATE, prior, [R.Redo.CHECK], "stored outputs unreadable")
        if decision.action == EVALUATE:
            job.mode, job.redo = R.JobMode.EVALUATE, list(decision.redo)
            self._stored[job.key] = prior
            return job
        job.mode, job.redo = R.JobMode.BUILD, []
        return job

    def _resolve(self, job: Job, stored: list[ResultRecord]) -> ResultRecord | Job:
        """A deferred job whose key another driver stored meanwhile: judged as any stored result."""
        return self._act(decide(job, stored, Policy(), self.store.checkpoint_problem))

    def _payload(self, job: Job) -> tuple[bytes, dict]:
        prior = self._stored[job.key]
        return self.store.checkpoint_bytes(prior), prior.to_dict()

    def commit(self, record: ResultRecord, checkpoint: bytes | None, outputs: bytes | None,
                reference: bytes | None) -> ResultRecord:
        """A worker's result into the store (the scheduler's ``on_result``): its reference first."""
        self.asks.answered(record, reference is not None)
        if record.status in (R.OK, R.INCORRECT) and checkpoint is None and record.source is None:
            record.status, record.error = R.ERROR, "the worker returned no checkpoint"
            record.measurement = None
        # The reference first: a driver killed between the two writes then loses nothing a
        # later run (which reuses the result and asks for no reference) would need.
        if reference is not None and record.reference_key:
            self.store.put_reference(record.reference_key, reference)
        return self.store.add_result(self.sweep_id, record, checkpoint, outputs)

    def _run(self, decisions: list[Decision], waves: Waves | None = None,
             budget_s: float | None = None) -> list[ResultRecord]:
        """Reuse and re-check what the store holds; evaluate and build the rest on the workers."""
        results: list[ResultRecord] = []
        to_run: list[Job] = []
        for decision in decisions:
            outcome = self._act(decision)
            (results if isinstance(outcome, ResultRecord) else to_run).append(outcome)
        if results:
            self.progress.reused(len(results), dict(Counter(r.how for r in results)))
        gate = StoreGate(self.store, self.sweep_id, self._resolve, self.known, self.progress)
        if waves is not None and waves.held:
            gate = FamilyGate(gate, waves, self.store, self.sweep_id, to_run, results)
        if not to_run:
            return results  # everything came from the store: no worker needs to start
        # Longest first, by the store's phase history: a long build that starts last holds up the end.
        ran = self.workers.started().run(to_run, self.asks.want, gate=gate, payload=self._payload,
                                         estimate=job_estimator(self.store), budget_s=budget_s)
        return results + [r for r in ran if r.error_class != NARROWED]

    # -- select -------------------------------------------------------------------------------------
    def select(self, tuned: Tuned) -> tuple[list[SelectionRecord], float]:
        """Each group's winner, stored; and the seconds choosing took."""
        start = time.monotonic()
        previous = None if self.options.force else EarlierDecisions(self.store, self.objective, self.sweep_id)
        selections = choose_winners(tuned.results, self.spec.strategy(),
                                    decide=RoundsOnWorkers(self.workers, self.store, self.spec),
                                    previous=previous, rule=self.spec.decision.rule(), rank=SpecOrder(self.spec))
        decide_s = time.monotonic() - start
        tuned.waves.annotate(selections, tuned.results)
        for s in selections:  # decided afresh each sweep, even for a decision taken over from an earlier one
            s.superseded = None
        tuned.shape_strategies = choose_strategies(self.spec, selections, tuned.results)
        for s in selections:
            self.store.put_selection(self.sweep_id, s)
        return selections, decide_s

    @property
    def objective(self) -> str:
        return self.spec.strategy().describe()

    # -- deploy -------------------------------------------------------------------------------------
    def deploy(self, tuned: Tuned, selections: list[SelectionRecord], inventory) -> list[DeployRecord]:
        if not (self.options.deploy and self.spec.deploy.targets):
            return []
        return deploy_winners(self.spec, self.store, self.sweep_id, selections, tuned.results, inventory)

    # -- report -------------------------------------------------------------------------------------
    def outcome(self, tuned: Tuned, selections: list[SelectionRecord], deployments: list[DeployRecord],
                decide_s: float) -> SweepOutcome:
        how = Counter(r.how for r in tuned.results if r.status != R.SKIPPED)  # skipped: neither built nor reused
        outcome = SweepOutcome(self.sweep_id, self.store.root, tuned.results, selections, deployments,
                               tune_s=tuned.tune_s, decide_s=decide_s, how=dict(how),
                               reused=sum(v for k, v in how.items() if k != R.BUILT), ran=how.get(R.BUILT, 0))
        outcome.diff = self._diff()
        outcome.batch_search = tuned.batch_search
        outcome.shape_strategies = tuned.shape_strategies
        return outcome

    def _diff(self) -> SweepDiff | None:
        try:
            return diff_sweeps(self.store, self.sweep_id)
        except Exception as exc:  # the diff is a view on the history: the sweep itself stands
            log.warning("no diff against the previous sweep: %s", exc)
            return None

    def report(self, outcome: SweepOutcome) -> None:
        """The tables, the decisions' cost and the diff on the console; the report files in the store."""
        say = self._say
        swept = self.store.sweep_results(self.sweep_id)
        render(self.console, swept, outcome.selections, outcome.deployments)
        line = decisions_line(outcome.selections, outcome.decide_s, outcome.tune_s)
        if line:
            say(line)
        for line in outcome.diff.lines() if outcome.diff else []:
            say(line)
        for line in search_lines(outcome.batch_search, {r.device_class_key: r.device_name for r in swept}):
            say(line)
        buckets = bucket_figures(self.spec, outcome.selections, swept)
        for line in bucket_lines(buckets) + strategy_lines(outcome.shape_strategies) + frontier.lines(outcome.serving):
            say(line)
        if self.store.root is not None:
            out = self.store.root / "reports" / self.sweep_id
            outcome.reports = write_reports(out, self.store.sweep_info(self.sweep_id).to_dict(), swept,
                                            outcome.selections, outcome.deployments,
                                            diff=outcome.diff.to_dict() if outcome.diff else None,
                                            batch_search=outcome.batch_search or None, buckets=buckets or None,
                                            shape_strategies=outcome.shape_strategies or None)
            if outcome.serving:
                outcome.reports.update(frontier.write(out, outcome.serving))
            say(f"reports: {', '.join(str(p) for p in outcome.reports.values())}")

    def _say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)
