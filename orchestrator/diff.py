"""What changed since the previous sweep of the same models: winners, latencies, and why keys changed.

Groups are matched by (model, batch size, device name), not by device class key: a torch
upgrade changes the key, and that is one of the changes worth reporting. A key changes for the
reasons its parts change: the device class (a torch, CUDA or driver upgrade; a device never seen
before), the model's weights or architecture, and the candidates (a new one, one dropped).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator.records import ResultRecord, SelectionRecord
from orchestrator.store import ResultStore

#: a winner's latency this much slower (or faster) than before is a regression (or a gain)
THRESHOLD = 0.05


@dataclass
class GroupDiff:
    model: str
    batch_size: int
    device: str
    status: str  # "new", "same", "winner changed", "gone"
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
                g.status = "winner changed"
            old_r, new_r = old_by_key.get(old.winner_key), new_by_key.get(new.winner_key)
            g.old_ms = old_r.median_ms if old_r else None
            g.new_ms = new_r.median_ms if new_r else None
            if g.old_ms and g.new_ms:
                g.ratio = g.new_ms / g.old_ms
                g.trend = "regression" if g.ratio > 1 + THRESHOLD else "gain" if g.ratio < 1 - THRESHOLD else ""
            old_dc_of = old_dc.get(old.device_class_key, {})
            g.why = _why(results_of(old_results, old_dc, group), new_rs, old_dc_of, new_dc.get(new.device_class_key, {}), seen_names)
        elif _name(new_dc.get(new.device_class_key, {})) not in seen_names:
            g.why = [f"a new device class ({device})"]
        groups.append(g)
    return SweepDiff(sweep_id, previous, groups)
