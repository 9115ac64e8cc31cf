"""The environment a candidate was built and measured in: versions and the device's identity."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any

import torch


@lru_cache(maxsize=None)  # what is installed does not change under a running process
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
    driver: str | None = None
    torchao: str | None = None

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
            "driver": self.driver,
            "tensorrt": self.tensorrt,
            "onnxruntime": self.onnxruntime,
            # only where installed: a machine without torchao keeps the keys it had before torchao was known
            **({"torchao": self.torchao} if self.torchao else {}),
        }


def tensorrt_version() -> str | None:
    """From the module when it imports: ``tensorrt-cu12``/``-cu13`` installs have no ``tensorrt`` distribution."""
    version = _version("tensorrt")
    if version:
        return version
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # a broken install: no version to record
        return None


def torchao_version() -> str | None:
    """From the distribution's metadata, so nothing is imported; None where torchao is not installed."""
    return _version("torchao")


def cuda_driver_version() -> str | None:
    """The CUDA driver's version (e.g. "12.4"); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    try:
        raw = int(torch._C._cuda_getDriverVersion())  # e.g. 12040
    except Exception:
        return None
    return f"{raw // 1000}.{raw % 1000 // 10}"


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
        tensorrt=tensorrt_version(),
        python=platform.python_version(),
        driver=cuda_driver_version() if device.type == "cuda" else None,
        torchao=torchao_version(),
    )
