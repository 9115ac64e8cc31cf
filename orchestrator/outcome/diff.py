"""What changed since the previous sweep of the same models: winners, latencies, and why keys changed.

Groups are matched by (model, batch size, device name), not by device class key: a torch
upgrade changes the key, and that is one of the changes worth reporting. A key changes for the
reasons its parts change: the device class (a torch, CUDA or driver upgrade; a device never seen
before), the model's weights or architecture, and the candidates (a new one, one dropped).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from aitune.decision import BEATEN, DecisionRule, pair
from orchestrator.records import ResultRecord, SelectionRecord
from orchestrator.store import ResultStore

#: a winner's latency this much slower (or faster) than before is a regression (or a gain)
THRESHOLD = 0.05


@dataclass
class GroupDiff:
    model: str
    batch_size: int
    device: str
    #: "new", "same", "winner changed", "tie swap" (the winners were not told apart), "gone"
    status: str
    old_winner: str | None = None
    new_winner: str | None = None
    old_ms: float | None = None
    new_ms: float | None = None
    #: new median over old (of the winners): above 1 a regression, below 1 a gain
    ratio: float | None = None
    trend: str = ""  # "regression", "gain", ""
    why: list[str] = field(default_factory=list)


@dataclass
class SweepDiff:
    sweep_id: str
    previous_sweep: str
    groups: list[GroupDiff]

    def to_dict(self) -> dict[str, Any]:
        return {"sweep": self.sweep_id, "previous_sweep": self.previous_sweep, "groups": [asdict(g) for g in self.groups]}

    @property
    def changed(self) -> list[GroupDiff]:
        return [g for g in self.groups if g.status != "same" or g.trend or g.why]

    def lines(self) -> list[str]:
        out = [f"diff against sweep {self.previous_sweep}: {len(self.changed)} of {len(self.groups)} group(s) changed"]
        for g in self.changed:
            head = f"  {g.model} b{g.batch_size} on {g.device}: {g.status}"
            if g.status == "winner changed":
                head += f" ({g.old_winner} -> {g.new_winner})"
            if g.ratio is not None and g.trend:
                head += f"; latency {g.trend} x{g.ratio:.2f} ({g.old_ms:.3f} -> {g.new_ms:.3f} ms)"
            if g.why:
                head += "; why: " + ", ".join(g.why)
            out.append(head)
        return out


def _device_of(records: list[ResultRecord]) -> dict[str, dict]:
    """Device class key -> the device class a worker reported for it."""
    out: dict[str, dict] = {}
    for r in records:
        if r.worker is not None and r.device_class_key not in out:
            out[r.device_class_key] = dict(r.worker.device_class or {})
    return out


def _name(dc: dict) -> str:
    return str(dc.get("device_name") or dc.get("device_type") or "?")


def previous_sweep_of(store: ResultStore, sweep_id: str, models: set[str]) -> str | None:
    """The latest finished sweep before ``sweep_id`` that tuned any of ``models``."""
    sweeps = store.list_sweeps()
    ids = [s.id for s in sweeps]
    before = sweeps[:ids.index(sweep_id)] if sweep_id in ids else sweeps
    for s in reversed(before):
        if s.status == "done" and models & {r.model for r in store.sweep_results(s.id)}:
            return s.id
    return None


def _why(old: list[ResultRecord], new: list[ResultRecord], old_dc: dict, new_dc: dict, seen_names: set[str]) -> list[str]:
    why: list[str] = []
    if _name(new_dc) not in seen_names:
        why.append(f"a new device class ({_name(new_dc)})")
    for name in sorted(set(old_dc) | set(new_dc)):
        if name in ("device_name", "device_type"):
            continue
        a, b = old_dc.get(name), new_dc.get(name)
        if a != b:
            why.append(f"a {name} upgrade ({a} -> {b})" if a and b else f"{name} {a} -> {b}")
    fingerprints = lambda rs, f: {getattr(r, f) for r in rs if getattr(r, f)}  # noqa: E731
    if fingerprints(old, "structure_key") and fingerprints(new, "structure_key") and \
            fingerprints(old, "structure_key") != fingerprints(new, "structure_key"):
        why.append("a new architecture")
    elif fingerprints(old, "model_fingerprint") and fingerprints(new, "model_fingerprint") and \
            fingerprints(old, "model_fingerprint") != fingerprints(new, "model_fingerprint"):
        why.append("new weights")
    old_c, new_c = {r.candidate for r in old}, {r.candidate for r in new}
    why += [f"a new candidate ({c})" for c in sorted(new_c - old_c)]
    why += [f"a dropped candidate ({c})" for c in sorted(old_c - new_c)]
    return why


def _winner_ms(selection: SelectionRecord, by_key: dict[str, ResultRecord]) -> float | None:
    """The winner's median in its decision rounds where it had them, else its first measurement's."""
    medians = (selection.decision or {}).get("medians") if isinstance(selection.decision, dict) else None
    ms = medians.get(selection.winner_key) if isinstance(medians, dict) else None
    if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms > 0:
        return float(ms)
    record = by_key.get(selection.winner_key)
    return record.median_ms if record else None


def _changed(old: SelectionRecord, new: SelectionRecord) -> tuple[str, str]:
    """A group whose winner changed: ``tie swap`` where either decision could not tell the two
    apart (the fixed rule chose), else ``winner changed``, with what the new rounds say of the two."""
    if old.winner in new.ties or new.winner in old.ties:
        return "tie swap", f"{old.winner} and {new.winner} were not told apart (a tie or the cap)"
    decision = new.decision if isinstance(new.decision, dict) else {}
    times = decision.get("times_ms")
    if isinstance(times, dict) and old.winner_key in times and new.winner_key in times:
        try:
            rule = DecisionRule(**decision.get("rule", {}))
            p = pair({k: times[k] for k in (old.winner_key, new.winner_key)}, new.winner_key, old.winner_key,
                     rule.confidence, rule)
        except (TypeError, ValueError) as exc:  # rounds read back from the store: checked, not trusted
            return "winner changed", f"the new rounds can't be compared ({exc})"
        said = "beyond noise" if p.verdict == BEATEN else "not beyond noise"
        return "winner changed", (f"{said}: {old.winner} took {p.ratio:.2f}x ({p.low:.2f}-{p.high:.2f}) "
                                  f"the time of {new.winner} in the new rounds")
    return "winner changed", f"{old.winner} was not among the new decision's contenders"


def diff_sweeps(store: ResultStore, sweep_id: str, previous: str | None = None) -> SweepDiff | None:
    """The diff of ``sweep_id`` against ``previous`` (default: the previous sweep of its models)."""
    new_results = store.sweep_results(sweep_id)
    previous = previous or previous_sweep_of(store, sweep_id, {r.model for r in new_results})
    if previous is None:
        return None
    old_results = store.sweep_results(previous)
    old_dc, new_dc = _device_of(old_results), _device_of(new_results)

    def by_group(selections: list[SelectionRecord], dcs: dict) -> dict[tuple, SelectionRecord]:
        return {(s.model, s.batch_size, _name(dcs.get(s.device_class_key, {}))): s for s in selections}

    def results_of(records: list[ResultRecord], dcs: dict, group: tuple) -> list[ResultRecord]:
        return [r for r in records if (r.model, r.batch_size, _name(dcs.get(r.device_class_key, {}))) == group]

    old_sel, new_sel = by_group(store.selections(previous), old_dc), by_group(store.selections(sweep_id), new_dc)
    old_by_key, new_by_key = {r.key: r for r in old_results}, {r.key: r for r in new_results}
    seen_names = {_name(d) for d in old_dc.values()}
    groups: list[GroupDiff] = []
    for group in sorted(set(old_sel) | set(new_sel), key=str):
        model, batch, device = group
        old, new = old_sel.get(group), new_sel.get(group)
        if new is None:
            groups.append(GroupDiff(model, batch, device, "gone", old_winner=old.winner))
            continue
        g = GroupDiff(model, batch, device, "new" if old is None else "same", new_winner=new.winner)
        new_rs = results_of(new_results, new_dc, group)
        if old is not None:
            g.old_winner = old.winner
            if old.winner_key != new.winner_key and old.winner != new.winner:
                g.status, evidence = _changed(old, new)
                g.why.append(evidence)
            g.old_ms = _winner_ms(old, old_by_key)
            g.new_ms = _winner_ms(new, new_by_key)
            if g.old_ms and g.new_ms:
                g.ratio = g.new_ms / g.old_ms
                g.trend = "regression" if g.ratio > 1 + THRESHOLD else "gain" if g.ratio < 1 - THRESHOLD else ""
            old_dc_of = old_dc.get(old.device_class_key, {})
            g.why += _why(results_of(old_results, old_dc, group), new_rs, old_dc_of, new_dc.get(new.device_class_key, {}), seen_names)
        elif _name(new_dc.get(new.device_class_key, {})) not in seen_names:
            g.why = [f"a new device class ({device})"]
        groups.append(g)
    return SweepDiff(sweep_id, previous, groups)
