"""AOTInductor: ``torch.export`` then a compiled ``.pt2`` package that runs without the module."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aitune.specs import GraphSpec, Sample
from aitune.torch.backend.backend import ArtifactBackend, BackendConfig, UnsupportedDeviceError, artifact_path
from aitune.torch.backend.eager import prepare_module
from aitune.torch.cuda_graphs import CudaGraphRunner
from aitune.torch.export_cache import shared_package
from aitune.torch.export_utils import export_module
from aitune.torch.output_tree import OutputTree, exportable, flat_tree
from aitune.torch.precision import PRECISIONS, cast_sample, normalize_precision
from aitune.torch.random_inputs import sample_from_spec
from aitune.torch.vec_isa_memo import remember_vec_isa


def on_device(sample: Sample, device: torch.device) -> Sample:
    """``sample`` with every tensor on ``device`` (the sample itself where they all are already)."""
    def elsewhere(t: torch.Tensor) -> bool:
        return t.device.type != device.type or (device.index is not None and t.device.index != device.index)

    if not any(elsewhere(t) for t in sample.named_tensors().values()):
        return sample
    return sample.map(lambda t: t.to(device) if elsewhere(t) else t)


@dataclass
class TorchInductorAotConfig(BackendConfig):
    """How an AOTInductor package is compiled and run.

    With ``cuda_graphs``, ``clone_outputs`` (default on) returns outputs that the next call leaves
    alone; measuring and checking skip that copy, so measurements are of the graph alone.
    """

    precision: str = "float32"
    #: inductor configs for ``aoti_compile_and_package`` (e.g. {"max_autotune": True})
    options: dict[str, Any] = field(default_factory=dict)
    #: replay the package from CUDA graphs, captured per input shape (GPU only)
    cuda_graphs: bool = False
    #: with ``cuda_graphs``: return copies of the graph's output buffers, which the next call
    #: overwrites (off: the buffers themselves); measuring skips the copy either way
    clone_outputs: bool = True

    def __post_init__(self) -> None:
        self.precision = normalize_precision(self.precision, type(self).__name__)


class TorchInductorAotBackend(ArtifactBackend):
    config_class = TorchInductorAotConfig
    dynamic_shapes = True
    toolchain = "inductor"
    portable = False  # the package holds machine code for one device type
    #: 2: an output whose containers a library registers with pytree (an HF ModelOutput) is kept as
    #: aitune's own tree, so a process that never imported the library reads the artifact back
    implementation_version = "2"

    def __init__(self, config: TorchInductorAotConfig | None = None) -> None:
        super().__init__(config)
        self._package: Path | None = None
        self._runner = None
        self._out_tree: OutputTree | None = None  # set where the package returns the output flattened

    @property
    def is_jit(self) -> bool:
        return False

    def _dtype(self) -> torch.dtype | None:
        return None if self.config.precision == "float32" else PRECISIONS[self.config.precision]

    def _build(self, module, graph_spec: GraphSpec, data: list[Sample], cache_dir: Path) -> None:
        device = self.device
        if not data:
            raise ValueError(f"Backend {self.name} needs at least one sample to export the module")
        if self.config.cuda_graphs and device.type != "cuda":
            raise UnsupportedDeviceError(f"Backend {self.name}: cuda_graphs=True needs a CUDA device, not {device}")
        def make(path: Path) -> OutputTree | None:
            prepared = prepare_module(module, self.config.precision, False, False, device)
            # Export traces with fake tensors: the real module is never called here. An output the
            # package could not keep (a named tuple, a dataclass) comes back flat and is rebuilt.
            view, record = exportable(prepared)
            program = export_module(view, graph_spec, cast_sample(data[0].to(device), self._dtype()))
            out_tree = flat_tree(record, program.call_spec.out_spec)
            if device.type == "cpu":
                remember_vec_isa()  # this process's first CPU kernel skips Inductor's ISA probe where it can
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(path), inductor_configs=dict(self.config.options) or None
            )
            return out_tree

        # One package serves both ways of running it (with and without CUDA graphs): a candidate
        # of this process that compiled it for the same module, sample and options hands it over.
        variant = {"precision": self.config.precision, "options": dict(self.config.options), "device": str(device)}
        self._package, self._out_tree = shared_package(self._exports, module, data[0], graph_spec,
                                                       cache_dir / "model.pt2", variant, make)
        self._load(device)

    def _load(self, device: torch.device) -> None:
        graphs = self.config.cuda_graphs
        if graphs and device.type != "cuda":
            raise UnsupportedDeviceError(f"Backend {self.name}: cuda_graphs=True needs a CUDA device, not {device}")
        index = device.index if device.type == "cuda" and device.index is not None else -1
        # The default runner synchronises its threads with CUDA events, which a capture forbids
        # ("operation not permitted when stream is capturing", pytorch/pytorch#148601): a package
        # that is to be captured runs single-threaded.
        runner = torch._inductor.aoti_load_package(str(self._package), run_single_threaded=graphs, device_index=index)
        self._runner = CudaGraphRunner(runner, clone_outputs=self.config.clone_outputs) if graphs else runner

    def _deploy(self) -> None:
        super()._deploy()
        # A deployed package serves the shape it was tuned for: its graph is captured now, while
        # the version loads (possibly beside a live one), not by the first request once it is live.
        if isinstance(self._runner, CudaGraphRunner) and self.graph_spec is not None:
            self._runner.capture_now(cast_sample(sample_from_spec(self.graph_spec, self.device), self._dtype()))

    def _infer(self, *args: Any, **kwargs: Any) -> Any:
        sample = Sample(args, kwargs)
        # A package built for one shape silently returns that shape's output for another input
        # shape; refuse instead.
        if self.graph_spec is not None:
            self.graph_spec.check_sample(sample, self.name)
        # The package reads raw pointers on its own device: a tensor elsewhere (a CPU tensor given
        # to a CUDA package) would be an illegal memory access, not an error. Moved there instead.
        sample = cast_sample(on_device(sample, self.device), self._dtype())
        if isinstance(self._runner, CudaGraphRunner):
            out = sample(self._runner)  # inference mode inside; its clones follow the caller's mode
        else:
            with torch.inference_mode():
                out = sample(self._runner)
        return self._out_tree.rebuild(out) if self._out_tree is not None else out

    def _deactivate(self) -> None:
        self._runner = None

    def to_dict(self) -> dict[str, Any]:
        state = self._base_dict()
        state["package"] = self._package
        if self._out_tree is not None:  # only where there is one: other states stay as they were
            state["out_tree"] = self._out_tree.tree
        return state

    @classmethod
    def from_dict(cls, state_dict: dict[str, Any]) -> "TorchInductorAotBackend":
        backend = cls._new_loaded(state_dict)
        backend._package = artifact_path(state_dict, "package", cls.__name__)
        backend._out_tree = OutputTree.read(state_dict.get("out_tree"))  # checked whole before anything runs
        return backend
