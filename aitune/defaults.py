"""The candidates worth trying by default on each device type, as (backend name, config fields)."""

from __future__ import annotations

import importlib.util
from typing import Any

from aitune.torch.backend.backend import Backend
from aitune.torch.backend import registry

CandidateDef = tuple[str, dict[str, Any]]

BASELINE: CandidateDef = ("TorchEagerBackend", {})

#: the CPU set whatever is installed
CPU_BASE: tuple[CandidateDef, ...] = (
    BASELINE,
    ("TorchEagerBackend", {"precision": "bfloat16", "autocast": True}),
    ("TorchInductorJitBackend", {}),
    ("TorchInductorAotBackend", {}),
    ("OnnxRuntimeBackend", {}),
)
#: added to the CPU set where torchao is installed: int8 weights and activations, compiled
CPU_TORCHAO: CandidateDef = ("TorchAOBackend", {"scheme": "int8_dynamic", "compile": True})


def torchao_installed() -> bool:
    """Whether ``torchao`` can be found; it is not imported (that takes seconds)."""
    return importlib.util.find_spec("torchao") is not None


def cpu_candidates() -> list[CandidateDef]:
    """The CPU default set: ``CPU_BASE``, and ``CPU_TORCHAO`` where torchao is installed."""
    chosen = [*CPU_BASE, *([CPU_TORCHAO] if torchao_installed() else [])]
    return [(name, dict(fields)) for name, fields in chosen]  # copies: a caller may change its own


#: the CPU default set as this process found it at import
CPU_CANDIDATES: tuple[CandidateDef, ...] = tuple(cpu_candidates())


def candidates_for(device_type: str) -> list[CandidateDef]:
    if device_type == "cpu":
        return cpu_candidates()
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
