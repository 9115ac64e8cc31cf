"""Small specs for sweep tests: a tiny MLP, fast measurements, fault-injecting candidates."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from orchestrator.spec import SweepSpec, parse_spec

RAY_INIT = {"num_cpus": 2, "object_store_memory": 200 * 1024**2}


def tiny_spec(store, candidates: list[dict[str, Any]], **changes) -> SweepSpec:
    data: dict[str, Any] = {
        "name": "test",
        "models": [{"name": "mlp", "factory": "aitune.examples:mlp", "kwargs": {"width": 16, "depth": 2},
                    "inputs": [{"name": "x", "shape": [16]}]}],
        "batch_sizes": [2],
        "candidates": candidates,
        "measure": {"budget_s": 0.05, "min_iters": 5, "warmup_iters": 2},
        "workers": {"cpu_slots": 2, "threads_per_slot": 1},
        "budgets": {"build_timeout_s": 60, "measure_timeout_s": 60},
        "store": str(store),
    }
    data.update(changes)
    return parse_spec(data)


def fault(kind: str, phase: str = "build", **extra) -> dict[str, Any]:
    return {"backend": "orchestrator.fault_backends:FaultBackend", "config": {"fault": kind, "phase": phase, **extra}}


EAGER = {"backend": "TorchEagerBackend", "config": {}}
EAGER_BF16 = {"backend": "TorchEagerBackend", "config": {"precision": "bfloat16", "autocast": True}}


def quiet() -> Console:
    """A console whose output goes nowhere: sweep tests check records, not what is printed."""
    return Console(file=io.StringIO(), width=200)
