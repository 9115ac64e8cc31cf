"""Models and test backends shared by the aitune tests; importable by subprocesses as ``aitune_helpers``.

The test backends are real ``Backend`` subclasses (no mocks): they run eager PyTorch and differ
from it in one deliberate way each.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aitune.torch.backend import TorchEagerBackend, register_backend
from aitune.torch.module_ref import attach_factory
from aitune.torch.tree import map_tensors

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a fresh Python process that imports ``aitune`` and these helpers."""
    env = dict(os.environ)
    paths = [str(REPO), str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.update(extra)
    return env


PYTHON = sys.executable

ONNX_EXPORT_MISSING = "the ONNX exporter needs onnx and onnxscript, which this machine lacks (the GPU image may)"


def needs_onnx_export() -> None:
    """Skip the calling test, naming why, where the ONNX exporter's packages are not installed."""
    import pytest

    pytest.importorskip("onnx", reason=ONNX_EXPORT_MISSING)
    pytest.importorskip("onnxscript", reason=ONNX_EXPORT_MISSING)


# -- models ---------------------------------------------------------------------------------------
class TinyMLP(nn.Module):
    def __init__(self, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny_mlp(width: int = 16, hidden: int = 32, seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    module = TinyMLP(width, hidden).eval()
    return attach_factory(module, "aitune_helpers:tiny_mlp", {"width": width, "hidden": hidden, "seed": seed})


def marking_mlp(marker: str, width: int = 16, hidden: int = 32, seed: int = 0) -> TinyMLP:
    """``tiny_mlp`` that writes ``marker`` each time it runs: a test sees whether loading ran it."""
    Path(marker).write_text("ran")
    torch.manual_seed(seed)
    module = TinyMLP(width, hidden).eval()
    return attach_factory(module, "aitune_helpers:marking_mlp", {"marker": marker, "width": width, "hidden": hidden, "seed": seed})


def tiny_linear(features: int = 4, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return attach_factory(nn.Linear(features, features).eval(), "aitune_helpers:tiny_linear", {"features": features, "seed": seed})


#: calls of every CountingModule and its copies (backends deep-copy modules), by tag
CALLS: dict[str, int] = {}


class CountingModule(nn.Module):
    """Counts its calls three ways: a buffer, a Python attribute, and ``CALLS[tag]`` (shared by copies)."""

    def __init__(self, tag: str = "counting", features: int = 4) -> None:
        super().__init__()
        self.tag = tag
        self.lin = nn.Linear(features, features)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.py_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.py_calls += 1
        CALLS[self.tag] = CALLS.get(self.tag, 0) + 1
        self.calls += 1
        return self.lin(x)


# -- test backends ----------------------------------------------------------------------------
class WrongOutputBackend(TorchEagerBackend):
    """Eager, but every output is off by 1.0: fast and wrong, so it must never win."""

    def _infer(self, *args: Any, **kwargs: Any) -> Any:
        return map_tensors(super()._infer(*args, **kwargs), lambda t: t + 1.0)


class BuildFailsBackend(TorchEagerBackend):
    MESSAGE = "deliberate build failure from BuildFailsBackend"

    def _build(self, module, graph_spec, data, cache_dir) -> None:
        raise RuntimeError(self.MESSAGE)


class CudaOnlyBackend(TorchEagerBackend):
    supported_device_types = frozenset({"cuda"})


@register_backend
class PinnedEagerBackend(TorchEagerBackend):
    """Eager with ``portable = False``: its checkpoints are bound to the device they were built on.

    ``from_dict_calls`` counts how often a checkpoint got as far as rebuilding the backend.
    """

    portable = False
    from_dict_calls = 0

    @classmethod
    def from_dict(cls, state_dict: dict[str, Any]) -> "PinnedEagerBackend":
        PinnedEagerBackend.from_dict_calls += 1
        return super().from_dict(state_dict)


class NotAWeight:
    """A class no ``weights_only`` unpickler may build: stands for a hostile pickle."""

    def __init__(self, payload: str = "x") -> None:
        self.payload = payload


class SleepyModule(nn.Module):
    """A linear layer behind a fixed sleep: every way of running it eagerly takes the same time."""

    def __init__(self, seconds: float = 0.004, features: int = 8) -> None:
        super().__init__()
        self.seconds = seconds
        self.lin = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.seconds)
        return self.lin(x)


class DoubleWorkBackend(TorchEagerBackend):
    """Eager, but runs the module twice per call: correct, and never faster than eager."""

    def _infer(self, *args: Any, **kwargs: Any) -> Any:
        super()._infer(*args, **kwargs)
        return super()._infer(*args, **kwargs)


class ScaledLinear(nn.Module):
    """Takes a tensor keyword (``bias``) and a plain one (``scale``), as many real models do."""

    def __init__(self, features: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(features, features)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        y = self.lin(x) * scale
        return y if bias is None else y + bias
