"""Memory hygiene: a candidate that leaves memory behind (or runs out) gets its worker recycled."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from cluster import connect
from orchestrator import memory
from orchestrator.memory import MB, MemorySnapshot
from orchestrator.sweep import run_sweep
from sweep_helpers import EAGER, EAGER_BF16, RAY_INIT, fault, tiny_spec


def test_recycle_when_more_than_the_margin_is_left_behind():
    before, after = MemorySnapshot(100 * MB, 200 * MB), MemorySnapshot(500 * MB, 600 * MB)
    reason = memory.recycle_reason(before, after, 256, oom=False)
    assert reason is not None and "400 MB behind" in reason and "256" in reason
    assert memory.recycle_reason(before, MemorySnapshot(300 * MB, 300 * MB), 256, oom=False) is None


def test_out_of_memory_always_recycles():
    snap = MemorySnapshot(0, 0)
    assert "out of memory" in memory.recycle_reason(snap, snap, None, oom=True)
    assert memory.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert not memory.is_oom(ValueError("shape mismatch"))


def test_default_margin_is_for_gpus_only():
    assert memory.margin_mb(None, torch.device("cpu")) is None
    assert memory.margin_mb(None, torch.device("cuda")) == memory.GPU_DEFAULT_MARGIN_MB
    assert memory.margin_mb(64, torch.device("cpu")) == 64


def test_cpu_snapshot_reads_resident_memory():
    snap = memory.snapshot(torch.device("cpu"))
    assert snap.allocated > 10 * MB  # a Python process with torch loaded


@pytest.mark.timeout(300)
def test_leaking_candidate_gets_its_worker_recycled(tmp_path):
    handle = connect(**RAY_INIT)
    try:
        spec = tiny_spec(
            tmp_path / "store",
            [EAGER, fault("leak", leak_mb=300), EAGER_BF16, fault("oom", tag="x")],
            workers={"cpu_slots": 1, "threads_per_slot": 1, "recycle_margin_mb": 100},
        )
        outcome = run_sweep(spec, console=Console(file=open("/dev/null", "w")), deploy=False, write_report=False)
    finally:
        handle.shutdown()
    by_fault = {r.config.get("fault", r.config.get("precision")): r for r in outcome.results}
    leak = by_fault["leak"]
    assert leak.status == "ok"
    assert leak.recycled and "behind" in leak.recycled
    assert leak.memory["left_behind"] > 250 * MB
    oom = by_fault["oom"]
    assert oom.error_class == "OutOfMemoryError" and oom.recycled
    # one slot, so the candidate after the leak ran in the fresh process that replaced it
    order = sorted(outcome.results, key=lambda r: r.created_at)
    after_leak = order[order.index(next(r for r in order if r.key == leak.key)) + 1]
    assert after_leak.worker.worker_id != leak.worker.worker_id
    assert after_leak.worker.pid != leak.worker.pid
    assert not by_fault["float32"].recycled
