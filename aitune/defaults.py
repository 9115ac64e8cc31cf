"""The candidates worth trying by default on each device type, as (backend name, config fields)."""

from __future__ import annotations

from typing import Any

from aitune.torch.backend.backend import Backend
from aitune.torch.backend import registry

CandidateDef = tuple[str, dict[str, Any]]

BASELINE: CandidateDef = ("TorchEagerBackend", {})

CPU_CANDIDATES: list[CandidateDef] = [
    BASELINE,
    ("TorchEagerBackend", {"precision": "bfloat16", "autocast": True}),
    ("TorchInductorJitBackend", {}),
    ("TorchInductorAotBackend", {}),
    ("OnnxRuntimeBackend", {}),
]


def candidates_for(device_type: str) -> list[CandidateDef]:
    if device_type == "cpu":
        return list(CPU_CANDIDATES)
    from aitune.gpu_defaults import gpu_candidates  # the GPU set depends on what is installed

    return gpu_candidates()


def make_backend(definition: CandidateDef) -> Backend:
    """A backend from ``(name or "package.module:Class", config fields)``."""
    name, fields = definition
    return registry.make_backend(name, fields)


def is_baseline(backend_name: str, config: dict[str, Any]) -> bool:
    """Eager fp32 with every other field at its default: what every speedup is measured against."""
    if backend_name != BASELINE[0]:
        return False
    cls = registry.get_backend_class(backend_name)
    try:
        return cls.config_class.from_dict(dict(config)) == cls.config_class()
    except (TypeError, ValueError):  # fields this config class does not have: not the baseline
        return False
