"""Eager PyTorch replayed from CUDA graphs, captured per input shape (GPU only).

Graphs are captured and replayed under ``torch.inference_mode`` whatever ``inference_mode`` says
(a graph replays kernels; autograd has no part in it), on the inputs' device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aitune.specs import GraphSpec, Sample
from aitune.torch.backend.eager import ModuleBackend, ModuleRunConfig
from aitune.torch.cuda_graphs import CudaGraphRunner
from aitune.torch.random_inputs import sample_from_spec


@dataclass
class CudaGraphConfig(ModuleRunConfig):
    """How eager PyTorch is captured into CUDA graphs.

    ``clone_outputs`` (default on) returns outputs that the next call leaves alone; measuring
    and checking skip that copy, so measurements are of the graph alone.
    """

    #: calls on a side stream before each capture
    warmup_iters: int = 3
    #: return copies of the graph's static output buffers, which the next call overwrites. On by
    #: default, for callers that keep outputs; off saves a copy per call for callers that read
    #: each output before the next call. Measuring and checking skip the copy either way
    #: (``aitune.torch.cuda_graphs.without_output_clones``): they time the graph, not the copy.
    clone_outputs: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup_iters < 1:
            raise ValueError(f"{type(self).__name__}: warmup_iters must be at least 1, got {self.warmup_iters}")


class CudaGraphBackend(ModuleBackend):
    config_class = CudaGraphConfig
    supported_device_types = frozenset({"cuda"})

    def __init__(self, config: CudaGraphConfig | None = None) -> None:
        super().__init__(config)
        self._runner: CudaGraphRunner | None = None

    @property
    def is_jit(self) -> bool:
        return True  # the first call of each new shape captures a graph

    def _new_runner(self) -> None:
        cfg = self.config
        self._runner = CudaGraphRunner(
            lambda *a, **k: self._run(self._module, Sample(a, k)), cfg.warmup_iters, clone_outputs=cfg.clone_outputs
        )

    def _build(self, module, graph_spec: GraphSpec, data: list[Sample], cache_dir: Path) -> None:
        # Capturing needs warm-up calls; doing them lazily on the first inference of each
        # shape keeps build from calling the module at all (stateful modules stay as they were).
        self._module = self._take_module(module)
        self._new_runner()

    def _infer(self, *args: Any, **kwargs: Any) -> Any:
        return self._runner(*args, **kwargs)

    def _materialize(self, device: torch.device) -> None:
        super()._materialize(device)
        self._new_runner()

    def _deploy(self) -> None:
        super()._deploy()
        # A deployed checkpoint serves the shape it was tuned for: captured now, while the version
        # loads (possibly beside a live one), not by the first request once it is live.
        if self.graph_spec is not None:
            self._runner.capture_now(sample_from_spec(self.graph_spec, self.device))

    def _activate(self) -> None:
        super()._activate()
        self._new_runner()

    def _deactivate(self) -> None:
        if self._runner is not None:
            self._runner.reset()
        super()._deactivate()
