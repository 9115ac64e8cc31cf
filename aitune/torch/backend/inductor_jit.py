"""``torch.compile`` (TorchInductor), compiled at build and again at deploy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aitune.specs import GraphSpec, Sample
from aitune.torch.backend.eager import ModuleBackend, ModuleRunConfig
from aitune.torch.cuda_graphs import clone_tensors, clones_wanted
from aitune.torch.random_inputs import sample_from_spec
from aitune.torch.vec_isa_memo import remember_vec_isa

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# the modes whose compiled code is replayed from CUDA graphs (on a CUDA device)
GRAPHED_MODES = ("reduce-overhead", "max-autotune")

# Every candidate compiles the same forward() again; past dynamo's default limit (8) it would
# silently fall back to eager and the measurement would lie. Long-lived workers need more room.
_RECOMPILE_LIMIT = 256


@dataclass
class TorchInductorJitConfig(ModuleRunConfig):
    """How ``torch.compile`` compiles the module.

    In the CUDA-graph modes (``reduce-overhead``, ``max-autotune``, or ``triton.cudagraphs`` in
    ``options``) on a GPU, ``clone_outputs`` (default on) returns outputs that the next call
    leaves alone; measuring and checking skip that copy, so measurements are of the graph alone.
    """

    mode: str = "default"
    #: True/False force dynamic/static shapes; None: static where the graph spec is static (else
    #: dynamo decides)
    dynamic: bool | None = None
    fullgraph: bool = False
    #: inductor options; ``torch.compile`` accepts them only with the default mode
    options: dict[str, Any] = field(default_factory=dict)
    #: in the CUDA-graph modes on a GPU: return copies of the outputs, which torch overwrites at
    #: the next call (reading an overwritten one raises); off: torch's own buffers
    clone_outputs: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"{type(self).__name__}: mode {self.mode!r} is not one of {list(MODES)}")
        if self.options and self.mode != "default":
            raise ValueError(f"{type(self).__name__}: options can't be combined with mode {self.mode!r} (torch.compile takes one or the other)")


def _raise_recompile_limits() -> None:
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, _RECOMPILE_LIMIT)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, _RECOMPILE_LIMIT * 4)


class TorchInductorJitBackend(ModuleBackend):
    config_class = TorchInductorJitConfig
    dynamic_shapes = True
    toolchain = "inductor"
    implementation_version = "2"  # 2: static shapes for a static graph spec (was dynamo's choice)

    def __init__(self, config: TorchInductorJitConfig | None = None) -> None:
        super().__init__(config)
        self._compiled = None

    @property
    def is_jit(self) -> bool:
        return True

    def _compile(self, module: torch.nn.Module) -> None:
        cfg = self.config
        _raise_recompile_limits()
        if self.device is not None and self.device.type == "cpu":
            remember_vec_isa()  # this process's first CPU kernel skips Inductor's ISA probe where it can
        self._compiled = torch.compile(
            module,
            mode=None if cfg.options else cfg.mode,
            dynamic=self._dynamic(),
            fullgraph=cfg.fullgraph,
            options=dict(cfg.options) or None,
        )

    def _dynamic(self) -> bool | None:
        """What ``torch.compile`` is told about shapes: the config's choice, else static for a
        static graph spec. Left to dynamo (None), a second batch size compiled in the same process
        gets a symbolic batch: dynamo keeps its automatic-dynamic state per code object, shared by
        every compile of the same ``forward``, so the graph (and its timing) would depend on which
        candidates this process compiled before."""
        if self.config.dynamic is not None:
            return self.config.dynamic
        if self.graph_spec is not None and not self.graph_spec.is_dynamic:
            return False
        return None

    def _build(self, module, graph_spec: GraphSpec, data: list[Sample], cache_dir: Path) -> None:
        self._module = self._take_module(module)
        self._compile(self._module)
        # Compile now, so that the cost lands in the build time and not in the first inference.
        # One call per sample at most keeps build idempotent for stateful modules.
        for sample in data:
            self._run(self._compiled, sample.to(self.device))

    def _graphed(self) -> bool:
        cfg = self.config
        graphs = cfg.options.get("triton.cudagraphs") if cfg.options else cfg.mode in GRAPHED_MODES
        return bool(graphs) and self.device is not None and self.device.type == "cuda"

    def _infer(self, *args: Any, **kwargs: Any) -> Any:
        out = self._run(self._compiled, Sample(args, kwargs))
        # Cloned outside the compiled code, as torch asks, in the caller's autograd mode.
        return clone_tensors(out) if self._graphed() and clones_wanted(self.config.clone_outputs) else out

    def _materialize(self, device: torch.device) -> None:
        super()._materialize(device)
        self._compile(self._module)
        if self.graph_spec is not None:  # compile again on the target, before the first request
            self._run(self._compiled, sample_from_spec(self.graph_spec, device))
