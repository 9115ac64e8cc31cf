"""Winners per (model, batch size, device class), with near-ties measured again before deciding."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Iterable

from aitune.defaults import is_baseline
from aitune.measure import Measurement
from aitune.strategy import Selection, Strategy, select, speedup
from orchestrator.error_text import summarize
from orchestrator.records import INCORRECT, REFERENCE_FAILED, ResultRecord, SelectionRecord

Group = tuple[str, int, str]  # model, batch size, device class key
#: re-measures each group's given results interleaved on one worker (groups side by side where
#: there are workers for them); returns each group's new measurements by key, leaving out
#: groups it could not re-measure
Remeasure = Callable[[dict[Group, list[ResultRecord]]], dict[Group, dict[str, Measurement]]]
#: an earlier decision over exactly these results, if there is one
Previous = Callable[[Group, list[ResultRecord]], SelectionRecord | None]

TOP_K = 3
#: a candidate this close to the best (relative score) is a contender, measured again side by side
#: with it even where the first intervals do not overlap: they were measured at different times,
#: maybe on different workers, and each window's own interval does not see the drift between
#: windows. On a shared 2-core VM the same ONNX Runtime session measured 18 us in one window and
#: 23 to 40 us in others (other processes, the neighbour worker's builds), so a candidate that
#: wins side by side could rank fourth or fifth by the first numbers.
CLOSE = 0.40
#: at most this many contenders are measured again (the top TOP_K always, when any are), and the baseline
MOST_REMEASURED = 6


@dataclass
class _Candidate:
    """Adapts a stored result to what :func:`aitune.strategy.select` needs."""

    record: ResultRecord
    measurement: Measurement | None

    @property
    def name(self) -> str:
        return self.record.candidate

    @property
    def eligible(self) -> bool:
        return self.record.eligible


def group_results(results: Iterable[ResultRecord]) -> dict[Group, list[ResultRecord]]:
    groups: dict[Group, list[ResultRecord]] = collections.defaultdict(list)
    for r in results:
        groups[(r.model, r.batch_size, r.device_class_key)].append(r)
    return dict(groups)


def baseline_of(records: Iterable[ResultRecord]) -> dict[Group, ResultRecord]:
    """The eager fp32 result of each group that has one: what every speedup is measured against."""
    found: dict[Group, ResultRecord] = {}
    for record in records:
        if not is_baseline(record.backend, record.config):
            continue
        group = (record.model, record.batch_size, record.device_class_key)
        current = found.get(group)
        if current is None or (record.eligible and not current.eligible):  # prefer a measured one
            found[group] = record
    return found


def _decide(records: list[ResultRecord], measurements: dict[str, Measurement], strategy: Strategy):
    cands = [_Candidate(r, measurements.get(r.key)) for r in records]
    base = next(iter(baseline_of(records).values()), None)
    baseline = next((c for c in cands if c.record is base), None)
    return select(cands, baseline, strategy), cands, baseline


def _near(a: _Candidate, b: _Candidate, strategy: Strategy) -> bool:
    """Whether the two scores are within :data:`CLOSE` of each other (relative to the larger)."""
    x, y = abs(strategy.score(a.measurement)), abs(strategy.score(b.measurement))
    return abs(x - y) <= CLOSE * max(x, y)


def _close(ranked: list[_Candidate], strategy: Strategy) -> bool:
    """Whether the runner-up's score is within :data:`CLOSE` of the best one's."""
    return len(ranked) >= 2 and _near(ranked[0], ranked[1], strategy)


def _contenders(ranked: list[_Candidate], strategy: Strategy) -> list[ResultRecord]:
    """The top TOP_K, then those within CLOSE of the best, MOST_REMEASURED at most."""
    more = [c for c in ranked[TOP_K:MOST_REMEASURED] if _near(ranked[0], c, strategy)]
    return [c.record for c in ranked[:TOP_K] + more]


def _unsettled(winner: _Candidate, remeasured: list[_Candidate], first: dict[str, Measurement], strategy: Strategy,
               ties: tuple[str, ...]) -> tuple[str, ...]:
    """Re-measured candidates that beat the winner beyond noise in the first window: two windows
    that each separate a pair, in opposite orders, have not settled it, so they stay ties (a first
    window that could not separate them is settled by the second)."""
    mine = first.get(winner.record.key)
    if mine is None:
        return ()
    return tuple(
        c.name for c in remeasured
        if c is not winner and c.eligible and c.name not in ties and c.record.key in first
        and strategy.beats(first[c.record.key], mine)
    )


@dataclass
class _Pending:
    """A group's first decision, before any re-measurement."""

    records: list[ResultRecord]
    measurements: dict[str, Measurement]
    choice: Selection
    baseline: _Candidate | None
    contenders: list[ResultRecord]


def _first_look(records: list[ResultRecord], strategy: Strategy) -> _Pending:
    """The decision from the first measurements, and the contenders to measure again if it is too close to call."""
    measurements = {r.key: r.measurement for r in records if r.measurement}
    choice, cands, baseline = _decide(records, measurements, strategy)
    ranked = sorted(
        (c for c in cands if c.eligible and c.measurement is not None and strategy.fits(c.measurement)),
        key=lambda c: strategy.score(c.measurement), reverse=True,
    )
    near_tie = (bool(choice.ties) or (choice.winner is baseline and bool(ranked) and ranked[0] is not baseline)
                or _close(ranked, strategy))
    top: list[ResultRecord] = []
    if near_tie:
        top = _contenders(ranked, strategy)
        if baseline is not None and baseline.eligible and baseline.record not in top:
            top.append(baseline.record)
    return _Pending(records, measurements, choice, baseline, top if len(top) > 1 else [])


def _settle(group: Group, first: _Pending, fresh: dict[str, Measurement], strategy: Strategy) -> SelectionRecord:
    measurements, choice, baseline = first.measurements, first.choice, first.baseline
    if fresh:
        measurements = {**measurements, **fresh}
        choice, cands, baseline = _decide(first.records, measurements, strategy)
        choice.reason += f" (after re-measuring {len(fresh)} candidates interleaved)"
        if choice.winner is not None and choice.winner is not baseline:
            choice.ties = choice.ties + _unsettled(choice.winner, [c for c in cands if c.record.key in fresh],
                                                   first.measurements, strategy, choice.ties)
    winner = choice.winner.record if choice.winner is not None else None
    gain = speedup(baseline.measurement, measurements[winner.key]) if winner is not None and baseline else None
    if winner is None and first.records and all(r.error_class == REFERENCE_FAILED for r in first.records):
        said = summarize(first.records[0].error, 200) or "no message"
        choice.reason = (f"the model fails in eager fp32 on the spec's inputs ({said}), so no candidate could "
                         "be checked against it: check the model's inputs (or sample_factory)")
    elif winner is None and baseline is not None and baseline.record.status == INCORRECT:
        # eager fp32 is what made the reference: failing its check, the model itself is not repeatable
        said = summarize(baseline.record.error, 160) or "no message"
        choice.reason = (f"eager fp32, which made the reference, gave other outputs on the same inputs ({said}): "
                         "the model's forward is not repeatable (it keeps state across calls, such as a buffer it "
                         "updates, or draws random numbers), so no candidate can be checked: make forward depend "
                         "only on its inputs")
    return SelectionRecord(
        model=group[0], batch_size=group[1], device_class_key=group[2],
        winner_key=winner.key if winner else None, winner=winner.candidate if winner else None,
        reason=choice.reason, ties=list(choice.ties), remeasured=bool(fresh), speedup=gain,
    )


def choose_winners(
    results: Iterable[ResultRecord],
    strategy: Strategy,
    remeasure: Remeasure | None = None,
    previous: Previous | None = None,
) -> list[SelectionRecord]:
    """Each group's winner. Groups too close to call are measured again, all in one ``remeasure``
    call so that different groups can be re-measured on different workers at once."""
    decided: dict[Group, SelectionRecord] = {}
    pending: dict[Group, _Pending] = {}
    for group, records in sorted(group_results(results).items()):
        earlier = previous(group, records) if previous is not None else None
        if earlier is not None:
            # Nothing new in this group: the earlier decision (re-measurements included) stands.
            decided[group] = earlier
        else:
            pending[group] = _first_look(records, strategy)
    asks = {g: p.contenders for g, p in pending.items() if p.contenders}
    fresh = remeasure(asks) if remeasure is not None and asks else {}
    for group, first in pending.items():
        # a group's answer only for keys it asked for: anything else is not this group's to use
        asked = {r.key for r in first.contenders}
        decided[group] = _settle(group, first, {k: m for k, m in fresh.get(group, {}).items() if k in asked}, strategy)
    return [decided[g] for g in sorted(decided)]
