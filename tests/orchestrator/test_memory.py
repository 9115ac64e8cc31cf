"""Memory hygiene: a candidate that leaves memory behind (or runs out) gets its worker recycled."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from cluster import connect
from aitune.torch.cuda_graphs import CudaGraphCaptureError
from orchestrator.worker import hygiene
from orchestrator.worker.hygiene import MB, MemorySnapshot
from orchestrator.sweep import run_sweep
from sweep_helpers import EAGER, EAGER_BF16, RAY_INIT, fault, tiny_spec


def test_recycle_when_more_than_the_margin_is_left_behind():
    before, after = MemorySnapshot(100 * MB, 200 * MB), MemorySnapshot(500 * MB, 600 * MB)
    reason = hygiene.recycle_reason(before, after, 256, oom=False)
    assert reason is not None and "400 MB behind" in reason and "256" in reason
    assert hygiene.recycle_reason(before, MemorySnapshot(300 * MB, 300 * MB), 256, oom=False) is None


def test_device_wide_growth_outside_the_allocator_counts_as_left_behind():
    # AOTInductor weights and TensorRT engines: device memory in use grows, the allocator's doesn't
    before = MemorySnapshot(100 * MB, 200 * MB, 1000 * MB)
    after = MemorySnapshot(100 * MB, 200 * MB, 1600 * MB)
    assert hygiene.left_behind(before, after) == (600 * MB, 600 * MB)
    reason = hygiene.recycle_reason(before, after, 256, oom=False)
    assert reason is not None and "600 MB behind, 600 MB of it outside the caching allocator" in reason
    # the allocator's allocated tensors count too, on top
    after = MemorySnapshot(250 * MB, 400 * MB, 1400 * MB)  # outside: 800 MB before, 1000 MB after
    assert hygiene.left_behind(before, after) == (150 * MB + 200 * MB, 200 * MB)


def test_memory_the_allocator_only_caches_is_not_a_leak():
    before = MemorySnapshot(100 * MB, 200 * MB, 1000 * MB)
    after = MemorySnapshot(100 * MB, 700 * MB, 1500 * MB)  # 500 MB more reserved, none of it in use
    assert hygiene.left_behind(before, after) == (0, 0)
    assert hygiene.recycle_reason(before, after, 256, oom=False) is None


def test_memory_freed_outside_the_allocator_does_not_hide_a_tensor_leak():
    before = MemorySnapshot(100 * MB, 200 * MB, 2000 * MB)
    after = MemorySnapshot(400 * MB, 500 * MB, 1500 * MB)  # an earlier engine freed, 300 MB of tensors kept
    assert hygiene.left_behind(before, after) == (300 * MB, 0)
    assert "300 MB behind (margin 256 MB)" in hygiene.recycle_reason(before, after, 256, oom=False)


def test_without_device_figures_only_the_allocator_or_resident_size_counts():
    # the CPU (resident set size), or a GPU whose context could not be asked
    before, after = MemorySnapshot(100 * MB, 100 * MB), MemorySnapshot(150 * MB, 150 * MB, 5000 * MB)
    assert hygiene.left_behind(before, after) == (50 * MB, 0)
    assert hygiene.snapshot(torch.device("cpu")).device_used is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: device-wide used memory")
def test_gpu_snapshot_records_device_wide_used_memory():
    snap = hygiene.snapshot(torch.device("cuda", 0))
    assert snap.device_used is not None and snap.device_used >= snap.reserved >= snap.allocated


def test_a_failed_capture_or_a_sticky_cuda_error_must_recycle_the_worker():
    reason = hygiene.must_recycle(CudaGraphCaptureError("CUDA graph capture failed: RuntimeError: boom"))
    assert reason is not None and "capture failed" in reason and "can't be trusted" in reason
    try:  # wrapped by a backend: found through the cause
        try:
            raise CudaGraphCaptureError("CUDA graph capture failed: inner")
        except CudaGraphCaptureError as inner:
            raise ValueError("the backend gave up") from inner
    except ValueError as outer:
        assert "capture failed" in hygiene.must_recycle(outer)
    sticky = RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")
    assert "illegal memory access" in hygiene.must_recycle(sticky)
    assert hygiene.must_recycle(ValueError("shape mismatch")) is None
    assert hygiene.must_recycle(torch.cuda.OutOfMemoryError("CUDA out of memory")) is None  # recycled as OOM


def test_out_of_memory_always_recycles():
    snap = MemorySnapshot(0, 0)
    assert "out of memory" in hygiene.recycle_reason(snap, snap, None, oom=True)
    assert hygiene.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert not hygiene.is_oom(ValueError("shape mismatch"))


def test_default_margin_is_for_gpus_only():
    assert hygiene.margin_mb(None, torch.device("cpu")) is None
    assert hygiene.margin_mb(None, torch.device("cuda")) == hygiene.GPU_DEFAULT_MARGIN_MB
    assert hygiene.margin_mb(64, torch.device("cpu")) == 64


def test_cpu_snapshot_reads_resident_memory():
    snap = hygiene.snapshot(torch.device("cpu"))
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


@pytest.mark.timeout(300)
def test_a_failed_capture_gets_its_worker_recycled(tmp_path):
    """The fault backend raises what a failed CUDA graph capture raises (no GPU here)."""
    handle = connect(**RAY_INIT)
    try:
        spec = tiny_spec(
            tmp_path / "store",
            [EAGER, fault("capture", phase="infer"), EAGER_BF16, fault("capture", phase="build", tag="b")],
            workers={"cpu_slots": 1, "threads_per_slot": 1},
        )
        outcome = run_sweep(spec, console=Console(file=open("/dev/null", "w")), deploy=False, write_report=False)
    finally:
        handle.shutdown()
    order = sorted(outcome.results, key=lambda r: r.created_at)
    by_phase = {r.config["phase"]: r for r in order if r.config.get("fault") == "capture"}
    assert by_phase["infer"].status == "error" and by_phase["build"].status == "build_error"
    for record in by_phase.values():
        assert record.error_class == "CudaGraphCaptureError"
        assert record.recycled and "capture failed" in record.recycled
    # one slot: what ran after the failed capture ran in the fresh process that replaced it
    after = order[order.index(by_phase["infer"]) + 1]
    assert after.worker.pid != by_phase["infer"].worker.pid
    assert not after.recycled
