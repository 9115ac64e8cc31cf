"""Eager PyTorch: the reference everything is compared with, in fp32, fp16 or bf16."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aitune.specs import GraphSpec, Sample
from aitune.torch.backend.backend import Backend, BackendConfig, artifact_path
from aitune.torch.module_ref import ModuleRef, load_module, save_weights
from aitune.torch.precision import PRECISIONS, cast_sample, normalize_precision


@dataclass
class ModuleRunConfig(BackendConfig):
    """How a backend that keeps a live module runs it: shared by eager, compiled and graphed."""

    #: float32, float16 or bfloat16 (fp32/fp16/bf16 accepted)
    precision: str = "float32"
    #: True: keep fp32 weights and run under ``torch.autocast``; False: cast weights and inputs
    autocast: bool = False
    channels_last: bool = False
    #: ``torch.inference_mode`` (True) or ``torch.no_grad`` (False)
    inference_mode: bool = True

    def __post_init__(self) -> None:
        self.precision = normalize_precision(self.precision, type(self).__name__)
        if self.autocast and self.precision == "float32":
            raise ValueError(f"{type(self).__name__}: autocast needs precision float16 or bfloat16, not float32")


@dataclass
class TorchEagerConfig(ModuleRunConfig):
    pass


def prepare_module(module: torch.nn.Module, precision: str, autocast: bool, channels_last: bool, device: torch.device):
    """A private copy of ``module`` on ``device`` in the wanted dtype and layout.

    A copy, because candidates share the user's module and casting in place would change the
    reference and every later candidate.
    """
    module = copy.deepcopy(module).eval().to(device)
    if precision != "float32" and not autocast:
        module = module.to(PRECISIONS[precision])
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


class ModuleBackend(Backend):
    """Shared by backends that keep a live ``nn.Module`` (eager, torch.compile).

    Checkpoints hold the module's factory and weights; ``deploy`` rebuilds the module.
    """

    def __init__(self, config: BackendConfig | None = None) -> None:
        super().__init__()
        self._configure(config)
        self._module: torch.nn.Module | None = None
        self._module_ref: ModuleRef | None = None
        self._weights: Path | None = None

    # input handling common to eager and compiled modules
    def _input_dtype(self) -> torch.dtype | None:
        cfg = self.config
        return None if cfg.precision == "float32" or cfg.autocast else PRECISIONS[cfg.precision]

    def _context(self) -> contextlib.AbstractContextManager:
        cfg = self.config
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode() if cfg.inference_mode else torch.no_grad())
        if cfg.autocast:
            stack.enter_context(torch.autocast(self.device.type, dtype=PRECISIONS[cfg.precision]))
        return stack

    def _prepared(self, sample: Sample) -> Sample:
        return cast_sample(sample, self._input_dtype(), self.config.channels_last)

    def _run(self, fn, sample: Sample) -> Any:
        with self._context():
            return self._prepared(sample)(fn)

    def _take_module(self, module: torch.nn.Module) -> torch.nn.Module:
        self._module_ref = ModuleRef.of(module)
        cfg = self.config
        return prepare_module(module, cfg.precision, cfg.autocast, cfg.channels_last, self.device)

    def _activate(self) -> None:
        if self._module is None:  # loaded from a checkpoint
            self._materialize(self.device)
        else:
            self._module.to(self.device)

    def _deactivate(self) -> None:
        self._module.to("cpu")

    def _deploy(self) -> None:
        self._materialize(self.device)

    def _materialize(self, device: torch.device) -> None:
        cfg = self.config
        module = load_module(self._module_ref, self._weights)
        self._module = prepare_module(module, cfg.precision, cfg.autocast, cfg.channels_last, device)

    def to_dict(self) -> dict[str, Any]:
        state = self._base_dict()
        if self._weights is None:
            self._weights = save_weights(self._module, self.work_dir() / "weights.pt")
        state["module"] = self._module_ref.to_dict()
        state["weights"] = self._weights
        return state

    @classmethod
    def from_dict(cls, state_dict: dict[str, Any]) -> "ModuleBackend":
        backend = cls._new_loaded(state_dict)
        backend._module_ref = ModuleRef.from_dict(state_dict["module"])
        backend._weights = artifact_path(state_dict, "weights", cls.__name__)
        return backend


class TorchEagerBackend(ModuleBackend):
    config_class = TorchEagerConfig

    @property
    def is_jit(self) -> bool:
        return False

    def _build(self, module, graph_spec: GraphSpec, data: list[Sample], cache_dir: Path) -> None:
        # Nothing to compile: eager needs no sample, so build calls the module zero times.
        self._module = self._take_module(module)

    def _infer(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self._module, Sample(args, kwargs))
