"""Winners per (model, batch size, device class): screened by the first measurements, decided in
interleaved rounds against each other and eager fp32 (:mod:`aitune.decision`).

A candidate's first measurement is taken alone, often beside another worker's build: it screens
out the clear losers and nothing more. Every group with more than one contender is then decided on
one worker, in interleaved rounds of its contenders and eager fp32, measured until the answer is
known or the group's cap is reached; the driver re-assesses the worker's raw rounds itself (they
are read back like anything else) and keeps them with the decision, so a report can redo it.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from aitune.decision import DecisionRule, Rounds, Verdict, assess, explain, paired_ratio, screen
from aitune.defaults import is_baseline
from aitune.strategy import Strategy, select, speedup
from orchestrator.error_text import summarize
from orchestrator.records import INCORRECT, REFERENCE_FAILED, Group, ResultRecord, SelectionRecord


@dataclass
class Ask:
    """One group's decision to run: its contenders in the order of the fixed tie rule (the
    baseline first), and how long the least it may take should last (from screening)."""

    records: list[ResultRecord]
    rule: DecisionRule
    #: seconds that min_rounds of every contender take by the first measurements (warm-up aside)
    estimate_s: float

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.records]


@dataclass
class Answer:
    """A group's rounds as a worker measured them, and what the driver saw around them."""

    rounds: Rounds
    #: seconds the group waited for an idle worker before its rounds began
    wait_s: float = 0.0
    #: seconds the worker took to load the contenders' checkpoints (a compiled one compiles again)
    load_s: float = 0.0
    #: what else ran on the worker's node meanwhile (other groups' rounds)
    beside: list[str] = field(default_factory=list)


#: runs each group's rounds (groups side by side where there are workers for them); answers each
#: group's rounds, or a line saying why they could not be run
Decide = Callable[[dict[Group, Ask]], dict[Group, "Answer | str"]]
#: an earlier decision over exactly these results, if there is one
Previous = Callable[[Group, list[ResultRecord]], SelectionRecord | None]
#: a candidate's place in the spec's candidate list (the fixed tie rule's second key)
Rank = Callable[[ResultRecord], int]


def group_results(results: Iterable[ResultRecord]) -> dict[Group, list[ResultRecord]]:
    groups: dict[Group, list[ResultRecord]] = collections.defaultdict(list)
    for r in results:
        groups[r.group].append(r)
    return dict(groups)


def baseline_of(records: Iterable[ResultRecord]) -> dict[Group, ResultRecord]:
    """The eager fp32 result of each group that has one: what every speedup is measured against."""
    found: dict[Group, ResultRecord] = {}
    for record in records:
        if not is_baseline(record.backend, record.config):
            continue
        group = record.group
        current = found.get(group)
        if current is None or (record.eligible and not current.eligible):  # prefer a measured one
            found[group] = record
    return found


#: a first measurement during which the load average rose or fell by this much was taken under a change of conditions
LOAD_CHANGE = 1.0


def disturbed(results: Iterable[ResultRecord]) -> dict[str, list[str]]:
    """Which first measurements ran beside a build on the same node, or while the load changed,
    and beside what: by result key.

    Workers record the wall-clock windows of their build and measure phases and the load average
    around the measurement (``context``); a measurement that overlapped another worker's build on
    its node, or during which the load moved by LOAD_CHANGE or more, was taken under other
    conditions than its neighbours' and may read slow."""
    results = [r for r in results if r.worker is not None and isinstance(r.context, dict)]
    builds: dict[str, list[tuple[float, float, ResultRecord]]] = collections.defaultdict(list)
    for r in results:
        window = _window(r.context.get("build"))
        if window is not None:
            builds[r.worker.node_id].append((*window, r))
    out: dict[str, list[str]] = {}
    for r in results:
        window = _window(r.context.get("measure"))
        if window is None:
            continue
        beside = [f"build of {o.candidate} ({o.model} b{o.batch_size}) on {o.worker.worker_id}, {min(e, window[1]) - max(s, window[0]):.1f} s"
                  for s, e, o in builds.get(r.worker.node_id, [])
                  if o.worker.worker_id != r.worker.worker_id and s < window[1] and e > window[0]]
        load = r.context.get("load")
        if (isinstance(load, (list, tuple)) and len(load) == 2 and all(isinstance(x, (int, float)) and x >= 0 for x in load)
                and abs(load[1] - load[0]) >= LOAD_CHANGE):
            beside.append(f"the load average went from {load[0]:.2f} to {load[1]:.2f}")
        if beside:
            out[r.key] = beside
    return out


def _window(value: Any) -> tuple[float, float] | None:
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            and value[0] <= value[1]):
        return float(value[0]), float(value[1])
    return None


@dataclass
class _Pending:
    """A group after screening: its contenders (tie-rule order), or why it has none."""

    records: list[ResultRecord]
    contenders: list[ResultRecord]
    baseline: ResultRecord | None
    #: where no candidate can win: the selection to record as it is
    foregone: SelectionRecord | None = None  # no contest: decided without rounds
    left_out: list[str] = field(default_factory=list)


def _screen(group: Group, records: list[ResultRecord], strategy: Strategy, rule: DecisionRule, rank: Rank | None,
            shaken: dict[str, list[str]]) -> _Pending:
    base = baseline_of(records).get(group)
    pool = [r for r in records if r.eligible and strategy.fits(r.measurement)]
    if not pool:
        return _Pending(records, [], base, foregone=_nobody(group, records, base, strategy))
    by_key = {r.key: r for r in pool}
    near, left_out = screen({k: r.measurement.median_ms for k, r in by_key.items()},
                            base.key if base is not None and base in pool else None, rule, set(shaken))
    contenders = sorted((by_key[k] for k in near), key=lambda r: _order_key(r, base, rank))
    return _Pending(records, contenders, base, left_out=[by_key[k].candidate for k in left_out])


def _order_key(r: ResultRecord, base: ResultRecord | None, rank: Rank | None) -> tuple:
    """The fixed tie rule: the baseline, then the spec's candidate order, then the name."""
    return (r is not base, rank(r) if rank is not None else 0, r.candidate, r.key)


def _nobody(group: Group, records: list[ResultRecord], base: ResultRecord | None, strategy: Strategy) -> SelectionRecord:
    """The selection of a group no candidate of which can win, with the most useful reason."""
    reason = select([], None, strategy).reason
    if records and all(r.error_class == REFERENCE_FAILED for r in records):
        said = summarize(records[0].error, 200) or "no message"
        reason = (f"the model fails in eager fp32 on the spec's inputs ({said}), so no candidate could "
                  "be checked against it: check the model's inputs (or sample_factory)")
    elif base is not None and base.status == INCORRECT:
        # eager fp32 is what made the reference: failing its check, the model itself is not repeatable
        said = summarize(base.error, 160) or "no message"
        reason = (f"eager fp32, which made the reference, gave other outputs on the same inputs ({said}): "
                  "the model's forward is not repeatable (it keeps state across calls, such as a buffer it "
                  "updates, or draws random numbers), so no candidate can be checked: make forward depend "
                  "only on its inputs")
    return SelectionRecord(model=group[0], batch_size=group[1], device_class_key=group[2], shape=group.shape, winner_key=None,
                           winner=None, reason=reason)


def _estimate(contenders: list[ResultRecord], rule: DecisionRule) -> float:
    return rule.min_rounds * sum(r.measurement.median_ms for r in contenders) / 1000.0


def _pair_dict(verdict: Verdict, other: str | None, names: dict[str, str]) -> dict[str, Any] | None:
    p = verdict.pairs.get(other) if other is not None else None
    if p is None:
        return None
    return {"key": other, "candidate": names.get(other), "ratio": p.ratio, "low": p.low, "high": p.high,
            "rounds": p.rounds, "verdict": p.verdict}


def _decided(group: Group, first: _Pending, answer: Answer, rule: DecisionRule,
             shaken: dict[str, list[str]]) -> SelectionRecord | None:
    """The group's decision from its rounds; None where the rounds hold no time at all."""
    rounds = answer.rounds
    order = [r.key for r in first.contenders]
    by_key = {r.key: r for r in first.contenders}
    base = first.baseline if first.baseline is not None and first.baseline.key in by_key else None
    in_rounds = base.key if base is not None else None
    verdict = assess({k: rounds.times_ms[k] for k in order}, order, rule, final=True, bootstrap=True, baseline=in_rounds)
    if verdict.winner is None:  # rounds read back with no time in them: the first measurements decide
        return None
    names = {k: r.candidate for k, r in by_key.items()}
    winner = by_key[verdict.winner]
    others = [k for k in order if k != verdict.winner and math.isfinite(verdict.medians.get(k, math.inf))]
    runner_up = min(others, key=lambda k: (verdict.medians[k], order.index(k))) if others else None
    measured = {k: rounds.measurement(k) for k in order}
    # the speedup is paired, like every figure of the rounds: eager's time over the winner's, round by round
    gain = paired_ratio(rounds.times_ms[winner.key], rounds.times_ms[base.key]) if base is not None else None
    ties = [names[k] for k in verdict.ties]
    reason = explain(verdict, names, in_rounds, rule, rounds.seconds)
    decision = {
        "stop": verdict.stop, "rounds": verdict.rounds, "seconds": round(rounds.seconds, 3),
        "wait_s": round(answer.wait_s, 3), "load_s": round(answer.load_s, 3),
        "load": rounds.load, "rule": rule.to_dict(), "p_best": verdict.p_best, "p_near": verdict.p_near,
        "leader": verdict.leader, "contenders": order, "left_out": first.left_out,
        "runner_up": _pair_dict(verdict, runner_up, names),
        "baseline": _pair_dict(verdict, base.key, names) if base is not None and base is not winner else None,
        "medians": {k: m.median_ms for k, m in measured.items() if m is not None},
        "first": {k: r.measurement.median_ms for k, r in by_key.items()},
        "disturbed": {k: v for k, v in shaken.items() if k in by_key},
        "beside": list(answer.beside),
        **{k: v for k, v in rounds.to_dict().items() if k not in ("seconds", "load")},
    }
    return SelectionRecord(model=group[0], batch_size=group[1], device_class_key=group[2], shape=group.shape, winner_key=winner.key,
                           winner=winner.candidate, reason=reason, ties=ties, remeasured=True, speedup=gain,
                           decision=decision)


def _screened(group: Group, first: _Pending, strategy: Strategy, rule: DecisionRule, why: str | None) -> SelectionRecord:
    """A group decided without rounds: one contender, or rounds that could not be run."""
    if len(first.contenders) == 1:
        only = first.contenders[0]
        far = f"; the others were more than {rule.reach:g}x slower in screening" if first.left_out else ""
        reason = f"the only contender{far}"
        base = first.baseline if first.baseline is not None and first.baseline.eligible else None
        gain = speedup(base.measurement, only.measurement) if base is not None else None
        return SelectionRecord(model=group[0], batch_size=group[1], device_class_key=group[2], shape=group.shape, winner_key=only.key,
                               winner=only.candidate, reason=reason, speedup=gain,
                               decision={"stop": "alone", "contenders": [only.key], "left_out": first.left_out})
    cands = [_Candidate(r) for r in first.contenders]
    base = next((c for c in cands if c.record is first.baseline), None)
    choice = select(cands, base, strategy)
    winner = choice.winner.record if choice.winner is not None else None
    gain = speedup(base.measurement, winner.measurement) if winner is not None and base is not None else None
    reason = f"{choice.reason}, by the first measurements alone: {why or 'the rounds could not be run'}"
    return SelectionRecord(model=group[0], batch_size=group[1], device_class_key=group[2], shape=group.shape,
                           winner_key=winner.key if winner else None, winner=winner.candidate if winner else None,
                           reason=reason, ties=list(choice.ties), speedup=gain,
                           decision={"stop": "screening", "contenders": [r.key for r in first.contenders],
                                     "left_out": first.left_out, "why": why})


@dataclass
class _Candidate:
    """Adapts a stored result to what :func:`aitune.strategy.select` needs."""

    record: ResultRecord

    @property
    def name(self) -> str:
        return self.record.candidate

    @property
    def eligible(self) -> bool:
        return self.record.eligible

    @property
    def measurement(self):
        return self.record.measurement


def choose_winners(
    results: Iterable[ResultRecord],
    strategy: Strategy,
    decide: Decide | None = None,
    previous: Previous | None = None,
    rule: DecisionRule | None = None,
    rank: Rank | None = None,
) -> list[SelectionRecord]:
    """Each group's winner. Groups with more than one contender are decided in interleaved rounds,
    all asked in one ``decide`` call so that different groups can run on different workers at once."""
    rule = rule or DecisionRule()
    results = list(results)
    shaken = disturbed(results)
    decided: dict[Group, SelectionRecord] = {}
    pending: dict[Group, _Pending] = {}
    for group, records in sorted(group_results(results).items()):
        earlier = previous(group, records) if previous is not None else None
        if earlier is not None:
            # Nothing new in this group: the earlier decision (its rounds included) stands.
            decided[group] = earlier
            continue
        first = _screen(group, records, strategy, rule, rank, shaken)
        if first.foregone is not None:
            decided[group] = first.foregone
        else:
            pending[group] = first
    asks = {g: Ask(p.contenders, rule, _estimate(p.contenders, rule)) for g, p in pending.items() if len(p.contenders) > 1}
    answers = decide(asks) if decide is not None and asks else {}
    for group, first in pending.items():
        answer = answers.get(group) if group in asks else None
        fair = isinstance(answer, Answer) and set(answer.rounds.times_ms) == set(asks[group].keys)
        made = _decided(group, first, answer, rule, shaken) if fair else None
        if made is not None:
            decided[group] = made
            continue
        why = (answer if isinstance(answer, str) else
               "the rounds hold no times" if fair else
               "the rounds named other candidates" if isinstance(answer, Answer) else
               "no decision was run" if group in asks else None)
        decided[group] = _screened(group, first, strategy, rule, why)
    return [decided[g] for g in sorted(decided)]
