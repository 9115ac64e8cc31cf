"""The diff against the previous sweep: winners that changed, latency ratios, and a torch upgrade as the reason."""

from __future__ import annotations

from orchestrator.outcome.diff import diff_sweeps
from orchestrator.records import SelectionRecord, WorkerInfo
from orchestrator.store import MemoryStore
from sweep_helpers import measurement, result_stub


def worker(torch_version: str, dc_key: str) -> WorkerInfo:
    return WorkerInfo(worker_id="w", node_id="n", hostname="h", pid=1, device="cpu",
                      device_class={"device_type": "cpu", "device_name": "x86", "torch": torch_version}, device_class_key=dc_key, threads=1)


def sweep(store: MemoryStore, torch_version: str, dc_key: str, winner: str, medians: dict[str, float],
          ties: list[str] = (), rounds: dict[str, list[float]] | None = None) -> str:
    sid = store.begin_sweep("s", {})
    for cand, ms in medians.items():
        store.add_result(sid, result_stub(key=f"{dc_key[:1]}{cand}".ljust(64, "0"), candidate=cand, device_class_key=dc_key,
                                          measurement=measurement(ms), worker=worker(torch_version, dc_key)))
    key = lambda cand: f"{dc_key[:1]}{cand}".ljust(64, "0")  # noqa: E731
    decision = {"times_ms": {key(c): t for c, t in rounds.items()}, "rule": {}} if rounds else None
    store.put_selection(sid, SelectionRecord(model="mlp", batch_size=1, device_class_key=dc_key, winner_key=key(winner),
                                             winner=winner, reason="fastest", ties=list(ties), decision=decision))
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


def test_a_winner_swapped_within_a_declared_tie_is_a_tie_swap_not_a_change():
    store = MemoryStore()
    sweep(store, "2.13.0", "a" * 64, "onnx", {"onnx": 1.0, "compile": 1.01}, ties=["compile"])
    new = sweep(store, "2.13.0", "a" * 64, "compile", {"onnx": 1.01, "compile": 1.0})
    (group,) = diff_sweeps(store, new).groups
    assert group.status == "tie swap" and "not told apart" in group.why[0]


def test_a_changed_winner_says_whether_the_new_rounds_separate_the_two_beyond_noise():
    wobble = [1.0, 1.01, 0.99, 1.02, 0.98, 1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0]
    store = MemoryStore()
    sweep(store, "2.13.0", "a" * 64, "onnx", {"onnx": 1.0, "compile": 1.3})
    new = sweep(store, "2.13.0", "a" * 64, "compile", {"onnx": 1.2, "compile": 1.0},
                rounds={"onnx": [1.2 * w for w in wobble], "compile": [1.0 * w for w in reversed(wobble)]})
    (group,) = diff_sweeps(store, new).groups
    assert group.status == "winner changed"
    assert group.why[0].startswith("beyond noise: onnx took 1.20x")
    close = sweep(store, "2.13.0", "a" * 64, "onnx", {"onnx": 1.0, "compile": 1.01},
                  rounds={"onnx": [1.0 * w for w in wobble], "compile": [1.005 * w for w in reversed(wobble)]})
    (group,) = diff_sweeps(store, close).groups
    assert group.status == "winner changed" and group.why[0].startswith("not beyond noise")
