"""Backends that misbehave on purpose, to show the sweep survives them (and to size the scheduler).

``FaultBackend`` runs the module eagerly, except that, in the phase it is told, it raises, kills
its own process (``os._exit`` or a real segfault), hangs, returns wrong values, claims the
device is unsupported, fails as a CUDA graph capture does, sleeps a set time (the scale
benchmark's stand-in for a slow build), or drops its ``attention_mask`` (``unmask``: right on
unpadded samples, wrong once padding is masked: what a fused kernel that ignores the mask does).
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from aitune.specs import Sample
from aitune.torch.backend.backend import UnsupportedDeviceError
from aitune.torch.backend.eager import ModuleBackend, ModuleRunConfig
from aitune.torch.cuda_graphs import CudaGraphCaptureError

FAULTS = ("none", "raise", "exit", "segfault", "hang", "wrong", "unsupported", "sleep", "leak", "oom", "capture", "unmask")

# Where the "leak" fault keeps what it leaks: never freed, as a real leak would be.
_LEAKED: list = []
PHASES = ("build", "infer", "deploy")


@dataclass
class FaultBackendConfig(ModuleRunConfig):
    fault: str = "none"
    phase: str = "build"
    #: for "sleep": seconds; for "hang": how long to hang (far past any timeout)
    seconds: float = 3600.0
    #: distinguishes otherwise equal configs, so that they get different keys
    tag: str = ""
    #: for "leak": megabytes left behind in the worker process
    leak_mb: int = 0
    #: answer each input after the first from memory: correct and far faster than eager, so it wins
    #: (with ``phase: deploy``, a winner that then fails on its deploy targets)
    fast: bool = False
    #: misbehave only at this batch size and above (the first input's first axis): a build that
    #: runs out of memory only past some batch, for ``batch_sizes: auto``
    from_batch: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fault not in FAULTS:
            raise ValueError(f"FaultBackendConfig: fault {self.fault!r} is not one of {list(FAULTS)}")
        if self.phase not in PHASES:
            raise ValueError(f"FaultBackendConfig: phase {self.phase!r} is not one of {list(PHASES)}")


def _misbehave(fault: str, seconds: float) -> None:
    if fault == "raise":
        raise RuntimeError("FaultBackend: injected failure")
    if fault == "exit":
        os._exit(17)
    if fault == "segfault":
        ctypes.string_at(0)  # reads address 0: a real SIGSEGV
    if fault == "hang":
        time.sleep(seconds)
    if fault == "sleep":
        time.sleep(seconds)
    if fault == "unsupported":
        raise UnsupportedDeviceError("FaultBackend: injected 'unsupported device'")
    if fault == "oom":
        raise torch.cuda.OutOfMemoryError("FaultBackend: injected CUDA out of memory")
    if fault == "capture":  # what a failed CUDA graph capture raises, for machines without a GPU
        raise CudaGraphCaptureError("FaultBackend: injected CUDA graph capture failure")


def _batch_of(data) -> int:
    for sample in data or []:
        for t in [*getattr(sample, "args", ()), *getattr(sample, "kwargs", {}).values()]:
            if isinstance(t, torch.Tensor) and t.dim():
                return int(t.shape[0])
    return 0


class FaultBackend(ModuleBackend):
    config_class = FaultBackendConfig

    @property
    def is_jit(self) -> bool:
        return False

    def _build(self, module, graph_spec, data, cache_dir) -> None:
        if self.config.phase == "build" and _batch_of(data) >= self.config.from_batch:
            _misbehave(self.config.fault, self.config.seconds)
        if self.config.fault == "leak":
            # touch every page so that the memory is really resident
            _LEAKED.append(torch.ones(self.config.leak_mb * 2**20, dtype=torch.uint8, device=self.device))
        self._module = self._take_module(module)

    def _deploy(self) -> None:
        if self.config.phase == "deploy":
            _misbehave(self.config.fault, self.config.seconds)
        super()._deploy()

    def _infer(self, *args: Any, **kwargs: Any) -> Any:
        cfg = self.config
        if cfg.phase == "infer" and cfg.fault not in ("wrong", "none", "sleep", "unmask"):
            _misbehave(cfg.fault, cfg.seconds)
        if cfg.fault == "unmask" and isinstance(kwargs.get("attention_mask"), torch.Tensor):
            kwargs = {**kwargs, "attention_mask": torch.ones_like(kwargs["attention_mask"])}
        if cfg.fast:
            cached = getattr(self, "_answer", None)
            if cached is None:
                cached = self._answer = self._run(self._module, Sample(args, kwargs))
            return cached
        out = self._run(self._module, Sample(args, kwargs))
        if cfg.fault == "wrong":
            from aitune.torch.tree import map_tensors

            out = map_tensors(out, lambda t: t + 1.0 if t.is_floating_point() else t)
        return out


def process_seeded_mlp(width: int = 16, depth: int = 2) -> torch.nn.Module:
    """A model factory that is deterministic within a process but not across processes: it seeds
    itself from the process id, as a factory seeded from the clock or a hash of an object would."""
    from aitune.examples import mlp

    return mlp(width=width, depth=depth, seed=os.getpid())


class _CallCounting(torch.nn.Module):
    """Adds how many times it was called to its output: a buffer updated in forward."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x) + self.calls


def stateful_mlp(width: int = 16, depth: int = 2) -> torch.nn.Module:
    """A model whose outputs change from one call to the next on the same inputs."""
    from aitune.examples import mlp

    return _CallCounting(mlp(width=width, depth=depth)).eval()
