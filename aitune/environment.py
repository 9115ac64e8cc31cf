"""The environment a candidate was built and measured in: versions and the device's identity."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any

import torch


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@dataclass(frozen=True)
class Environment:
    device_type: str
    device_name: str
    compute_capability: str | None
    torch: str
    cuda: str | None
    onnxruntime: str | None
    tensorrt: str | None
    python: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Environment":
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})

    def device_class(self) -> dict[str, Any]:
        """What must match for a result or a compiled artifact to hold on another device."""
        return {
            "device_type": self.device_type,
            "device_name": self.device_name,
            "compute_capability": self.compute_capability,
            "torch": self.torch,
            "cuda": self.cuda,
            "tensorrt": self.tensorrt,
        }


def describe_environment(device: torch.device | str = "cpu") -> Environment:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        name, capability = props.name, f"{props.major}.{props.minor}"
    else:
        name, capability = cpu_name(), None
    return Environment(
        device_type=device.type,
        device_name=name,
        compute_capability=capability,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        onnxruntime=_version("onnxruntime") or _version("onnxruntime-gpu"),
        tensorrt=_version("tensorrt"),
        python=platform.python_version(),
    )
