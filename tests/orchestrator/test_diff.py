"""The diff against the previous sweep: winners that changed, latency ratios, and a torch upgrade as the reason."""

from __future__ import annotations

from orchestrator.diff import diff_sweeps
from orchestrator.records import SelectionRecord, WorkerInfo
from orchestrator.store import MemoryStore
from sweep_helpers import measurement, result_stub


def worker(torch_version: str, dc_key: str) -> WorkerInfo:
    return WorkerInfo(worker_id="w", node_id="n", hostname="h", pid=1, device="cpu",
                      device_class={"device_type": "cpu", "device_name": "x86", "torch": torch_version}, device_class_key=dc_key, threads=1)


def sweep(store: MemoryStore, torch_version: str, dc_key: str, winner: str, medians: dict[str, float]) -> str:
    sid = store.begin_sweep("s", {})
    for cand, ms in medians.items():
        store.add_result(sid, result_stub(key=f"{dc_key[:1]}{cand}".ljust(64, "0"), candidate=cand, device_class_key=dc_key,
                                          measurement=measurement(ms), worker=worker(torch_version, dc_key)))
    store.put_selection(sid, SelectionRecord(model="mlp", batch_size=1, device_class_key=dc_key,
                                             winner_key=f"{dc_key[:1]}{winner}".ljust(64, "0"), winner=winner, reason="fastest"))
    store.finish_sweep(sid, "done")
    return sid


def test_a_changed_winner_its_latency_ratio_and_a_torch_upgrade_are_reported():
    store = MemoryStore()
    old = sweep(store, "2.12.0", "a" * 64, "eager", {"eager": 1.0, "compile": 1.5})
    new = sweep(store, "2.13.0", "b" * 64, "compile", {"eager": 2.5, "compile": 2.0})
    diff = diff_sweeps(store, new)
    assert diff.previous_sweep == old
    (group,) = diff.groups
    assert group.status == "winner changed" and (group.old_winner, group.new_winner) == ("eager", "compile")
    assert abs(group.ratio - 2.0) < 1e-9 and group.trend == "regression"
    assert "a torch upgrade (2.12.0 -> 2.13.0)" in group.why
    assert any("winner changed" in line and "x2.00" in line for line in diff.lines())


def test_the_first_sweep_has_nothing_to_diff_against():
    store = MemoryStore()
    first = sweep(store, "2.13.0", "a" * 64, "eager", {"eager": 1.0})
    assert diff_sweeps(store, first) is None


def test_a_faster_same_winner_is_a_gain():
    store = MemoryStore()
    sweep(store, "2.13.0", "a" * 64, "eager", {"eager": 2.0})
    new = sweep(store, "2.13.0", "a" * 64, "eager", {"eager": 1.0})
    (group,) = diff_sweeps(store, new).groups
    assert group.status == "same" and group.trend == "gain" and abs(group.ratio - 0.5) < 1e-9 and group.why == []
