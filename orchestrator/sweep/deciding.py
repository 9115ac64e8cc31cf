"""How a sweep chooses its winners beyond the rule in ``outcome.selection``: each group's decision
rounds on an idle worker (``RoundsOnWorkers``), the spec's candidate order for breaking ties
(``SpecOrder``), and an earlier sweep's decision that still stands (``EarlierDecisions``)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from aitune.decision import Rounds
from aitune.torch.backend.registry import display_name
from orchestrator import records as R
from orchestrator.error_text import summarize
from orchestrator.outcome.selection import Answer, Ask
from orchestrator.planning.candidates import candidate_specs
from orchestrator.records import Group, ResultRecord, SelectionRecord
from orchestrator.spec.schema import SweepSpec, parse_spec
from orchestrator.store import ResultStore, SweepStatus
from orchestrator.sweep.workers import Workers

log = logging.getLogger(__name__)


class RoundsOnWorkers:
    """Each group's decision rounds on an idle worker of its device class (groups side by side),
    read from the store only when a worker is free for them; answers are read back with checks."""

    def __init__(self, workers: Workers, store: ResultStore, spec: SweepSpec, clock=time.monotonic) -> None:
        self.workers, self.store, self.spec, self.clock = workers, store, spec, clock

    def __call__(self, asks: dict[Group, Ask]) -> dict[Group, Answer | str]:
        scheduler = self.workers.started()
        start, sent = self.clock(), {}
        calls = {group: self._call(group, ask, sent) for group, ask in asks.items()}
        # the cap and min_rounds bound the rounds; warm-up and loading the checkpoints come on top
        longest = max((a.rule.cap_s + 2 * a.estimate_s + 2.0 * len(a.records) for a in asks.values()), default=0.0)
        answers = scheduler.call_idle(calls, self.spec.budgets.measure_timeout_s + longest)
        out: dict[Group, Answer | str] = {}
        where: dict[Group, tuple[str, float, float]] = {}
        for group, answer in answers.items():
            out[group] = self._read(group, answer, max(0.0, sent.get(group, start) - start))
            window = answer.get("window") if isinstance(answer, dict) else None
            if (isinstance(out[group], Answer) and isinstance(window, list) and len(window) == 2
                    and all(isinstance(t, (int, float)) for t in window)):
                where[group] = (str(answer.get("node")), float(window[0]), float(window[1]))
        for group, (node, a, b) in where.items():  # what else ran on that node meanwhile
            out[group].beside = [f"rounds of {g[0]} b{g[1]}, {min(b, e) - max(a, s):.1f} s"
                                 for g, (n, s, e) in where.items() if g != group and n == node and s < b and e > a]
        return out

    def _call(self, group: Group, ask: Ask, sent: dict[Group, float]):
        def make():  # read from the store only when a worker is free for it
            sent[group] = self.clock()
            checkpoints = {r.key: (r.backend, r.manifest_sha256, self.store.checkpoint_bytes(r)) for r in ask.records}
            return "decide", (checkpoints, group.model, group.batch_size, ask.rule.to_dict(), ask.keys, group.shape)

        # the worker that ran most of them holds the model already
        ran = Counter(r.worker.worker_id for r in ask.records if r.worker is not None)
        return group.device_class_key, (ran.most_common(1)[0][0] if ran else None), make

    @staticmethod
    def _read(group: Group, answer: Any, wait_s: float) -> Answer | str:
        if isinstance(answer, BaseException):  # deciding is a refinement: the first measurements stand
            log.warning("no decision rounds for %s b%s: %s", group[0], group[1], summarize(str(answer), 300))
            return f"{type(answer).__name__}: {summarize(str(answer), 200) or 'no message'}"
        try:  # a worker's answer is read back like anything else: checked
            rounds = Rounds.from_dict(answer)
        except Exception as exc:
            log.warning("no decision rounds for %s b%s: the worker's answer is not rounds (%s)", group[0], group[1], exc)
            return f"the worker's answer is not rounds ({exc})"
        load_s = answer.get("load_s") if isinstance(answer, dict) else None
        return Answer(rounds, wait_s=wait_s,
                      load_s=float(load_s) if isinstance(load_s, (int, float)) and load_s >= 0 else 0.0)


class SpecOrder:
    """A candidate's place in the spec's list (the default set's where the spec has none): the
    fixed tie rule's second key."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.places: dict[str, dict[str, int]] = {}

    def __call__(self, record: ResultRecord) -> int:
        device_type = (record.worker.device_class or {}).get("device_type", "cpu") if record.worker else "cpu"
        if device_type not in self.places:
            names: dict[str, int] = {}
            for i, c in enumerate(candidate_specs(self.spec, device_type)):
                try:
                    names.setdefault(display_name(c.backend, dict(c.config)), i)
                except Exception:  # a candidate that can't be made here has no name to match
                    continue
            self.places[device_type] = names
        return self.places[device_type].get(record.candidate, len(self.places[device_type]))


def origin(record: ResultRecord) -> tuple[int | None, str]:
    """The stored measurement a record stands for (its source unless it was measured here), and its status."""
    if record.how in (R.REUSED, R.RECHECKED) and record.source:
        return record.source.get("result"), record.status
    return record.result_id, record.status


def objective_of(sweep) -> str | None:
    """The objective a stored sweep chose its winners by: stored with it, or (a sweep stored before
    the objective was) read from its spec. None: unknown, its decisions are not reused."""
    stored = getattr(sweep, "objective", None)
    if stored:
        return stored
    try:
        return parse_spec(sweep.spec).strategy().describe()
    except Exception:  # an older or foreign spec
        return None


class EarlierDecisions:
    """An earlier sweep's decision for a group whose results all come from the store unchanged
    (same measurements and the same verdicts): it stands. Re-checked results that kept their
    status change nothing the selection looks at."""

    def __init__(self, store: ResultStore, objective: str, this_sweep: str) -> None:
        self.store, self.objective, self.this_sweep = store, objective, this_sweep
        self._origins: dict[str, dict[Group, set]] = {}
        self._objectives: dict[str, str | None] = {}

    def _group_origins(self, sweep_id: str, group: Group) -> set:
        if sweep_id not in self._origins:
            grouped: dict[Group, set] = {}
            for r in self.store.sweep_results(sweep_id):
                grouped.setdefault(r.group, set()).add(origin(r))
            self._origins[sweep_id] = grouped
        return self._origins[sweep_id].get(group, set())

    def _same_objective(self, sweep) -> bool:
        if sweep.id not in self._objectives:
            self._objectives[sweep.id] = objective_of(sweep)
        return self._objectives[sweep.id] == self.objective

    def __call__(self, group: Group, records: list[ResultRecord]) -> SelectionRecord | None:
        if not records or not all(r.how in (R.REUSED, R.RECHECKED) for r in records):
            return None
        origins = {origin(r) for r in records}
        for sweep in reversed(self.store.list_sweeps()):
            if sweep.id == self.this_sweep or sweep.status != SweepStatus.DONE or not self._same_objective(sweep):
                continue
            for sel in self.store.selections(sweep.id):
                if sel.group == group and self._group_origins(sweep.id, group) == origins:
                    sel.decided_in = sel.decided_in or sweep.id  # keep the sweep that really decided
                    return sel
        return None
