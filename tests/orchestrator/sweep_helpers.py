"""Small specs for sweep tests: a tiny MLP, fast measurements, fault-injecting candidates."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich.console import Console

from orchestrator.spec.schema import SweepSpec, parse_spec

RAY_INIT = {"num_cpus": 2, "num_gpus": 0, "object_store_memory": 200 * 1024**2}  # CPU slots, even on a GPU machine


def tiny_spec(store, candidates: list[dict[str, Any]], **changes) -> SweepSpec:
    data: dict[str, Any] = {
        "name": "test",
        "models": [{"name": "mlp", "factory": "aitune.examples:mlp", "kwargs": {"width": 16, "depth": 2},
                    "inputs": [{"name": "x", "shape": [16]}]}],
        "batch_sizes": [2],
        "candidates": candidates,
        "measure": {"budget_s": 0.05, "min_iters": 5, "warmup_iters": 2},
        "workers": {"cpu_slots": 2, "threads_per_slot": 1, "use_gpus": False},
        "budgets": {"build_timeout_s": 60, "measure_timeout_s": 60},
        "store": str(store),
    }
    data.update(changes)
    if isinstance(data.get("deploy"), dict) and "root" not in data["deploy"]:
        # installs stay in the test's folder, never in the user's cache directory
        data["deploy"] = {**data["deploy"], "root": str(Path(store).parent / "deploy-root")}
    return parse_spec(data)


def fault(kind: str, phase: str = "build", **extra) -> dict[str, Any]:
    return {"backend": "orchestrator.sim.fault_backends:FaultBackend", "config": {"fault": kind, "phase": phase, **extra}}


EAGER = {"backend": "TorchEagerBackend", "config": {}}
EAGER_BF16 = {"backend": "TorchEagerBackend", "config": {"precision": "bfloat16", "autocast": True}}


def quiet() -> Console:
    """A console whose output goes nowhere: sweep tests check records, not what is printed."""
    return Console(file=io.StringIO(), width=200)


def measurement(median_ms: float, p99_ms: float | None = None, n: int = 20):
    """A real Measurement whose median is ``median_ms`` (and p99 about ``p99_ms``)."""
    from aitune.measure import Measurement

    p99 = p99_ms if p99_ms is not None else median_ms * 1.2
    m = Measurement.from_times([median_ms] * n, threads=1)
    m.p99_ms = p99
    return m


def check_result(max_abs_err: float = 1e-5, ok: bool = True):
    from aitune.check import CheckResult, Tolerance

    return CheckResult(ok=ok, max_abs_err=max_abs_err, max_rel_err=max_abs_err, worst_path="output",
                       worst_index=None, reason=None if ok else "output: too far", tolerance=Tolerance(1e-4, 1e-3))


def worker_info(device_name: str = "NVIDIA H200", device_type: str = "cuda", worker_id: str = "w0", node: str = "node-1"):
    from orchestrator.records import WorkerInfo

    return WorkerInfo(worker_id=worker_id, node_id=node, hostname=node, pid=1, device="cuda:0",
                      device_class={"device_name": device_name, "device_type": device_type},
                      device_class_key="d" * 64, threads=1)


def result_stub(key: str | None = None, model: str = "mlp", candidate: str = "eager", status: str = "ok", **kw):
    """A stored-looking result record for store and report tests."""
    import hashlib

    from orchestrator.records import ResultRecord

    fields = dict(
        key=key or hashlib.sha256(f"{model}/{candidate}".encode()).hexdigest(), model=model, batch_size=1,
        backend="TorchEagerBackend", config={"precision": "float32"}, candidate=candidate, status=status,
        device_class_key="c" * 64, measurement=measurement(1.5) if status == "ok" else None,
    )
    fields.update(kw)
    return ResultRecord(**fields)
