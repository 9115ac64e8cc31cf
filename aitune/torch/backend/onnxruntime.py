"""ONNX export (dynamo exporter) and an ONNX Runtime inference session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aitune.specs import GraphSpec, Sample
from aitune.torch.backend.backend import ArtifactBackend, BackendConfig, UnsupportedDeviceError, artifact_path
from aitune.torch.backend.eager import prepare_module
from aitune.torch.export_cache import shared_onnx_export
from aitune.torch.onnx_export import OutputLayout
from aitune.torch.precision import PRECISIONS, cast_sample, normalize_precision
from aitune.torch.random_inputs import sample_from_spec

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
# torch dtypes ONNX Runtime can bind (numpy has no bfloat16: those calls go through run())
_NUMPY = {
    torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
    torch.int32: np.int32, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
}
_PROVIDER_DEVICE = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def cuda_index(device: torch.device) -> int:
    """The CUDA device ordinal of ``device`` (``cuda`` alone: the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def session_providers(providers: list[str], device: torch.device) -> list[str | tuple[str, dict[str, Any]]]:
    """``providers`` as ``InferenceSession`` takes them: the CUDA ones told which GPU to run on
    (without ``device_id`` they all run on GPU 0, whatever device the backend was given)."""
    return [(p, {"device_id": cuda_index(device)}) if _PROVIDER_DEVICE.get(p) == "cuda" else p for p in providers]


@dataclass
class OnnxRuntimeConfig(BackendConfig):
    precision: str = "float32"
    #: ONNX opset; None takes the exporter's default
    opset: int | None = None
    #: execution providers in order of preference; the CPU one is the fallback
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    graph_optimization_level: str = "all"
    #: intra-op threads; None: ``torch.get_num_threads()`` (the threads the process was given)
    intra_op_threads: int | None = None
    #: bind inputs and outputs in place (on the GPU: no copies through host memory)
    io_binding: bool = True

    def __post_init__(self) -> None:
        self.precision = normalize_precision(self.precision, type(self).__name__)
        self.providers = tuple(self.providers)
        if not self.providers:
            raise ValueError(f"{type(self).__name__}: providers must name at least one execution provider")
        if self.graph_optimization_level not in OPT_LEVELS:
            raise ValueError(
                f"{type(self).__name__}: graph_optimization_level {self.graph_optimization_level!r} is not one of {list(OPT_LEVELS)}"
            )


class OnnxRuntimeBackend(ArtifactBackend):
    config_class = OnnxRuntimeConfig
    dynamic_shapes = True
    toolchain = "onnx"
    #: 2: an output whose containers a library registers with pytree (an HF ModelOutput) is kept as
    #: aitune's own tree, so a process that never imported the library reads the artifact back
    implementation_version = "2"

    def __init__(self, config: OnnxRuntimeConfig | None = None) -> None:
        super().__init__(config)
        self._model: Path | None = None
        self._data: Path | None = None
        self._outputs = OutputLayout()
        self._session = None

    @property
    def is_jit(self) -> bool:
        return False

    def _assert_device(self, device) -> None:
        super()._assert_device(device)
        device = torch.device(device)
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        usable = [p for p in self.config.providers if p in available and _PROVIDER_DEVICE.get(p) == device.type]
        if not usable:
            raise UnsupportedDeviceError(
                f"Backend {self.name}: none of the providers {list(self.config.providers)} runs on {device.type} "
                f"with this onnxruntime (available: {sorted(available)})"
            )

    def _dtype(self) -> torch.dtype | None:
        return None if self.config.precision == "float32" else PRECISIONS[self.config.precision]

    def _build(self, module, graph_spec: GraphSpec, data: list[Sample], cache_dir: Path) -> None:
        if not data:
            raise ValueError(f"Backend {self.name} needs at least one sample to export the module")
        if self.config.precision == "bfloat16":
            # The tensors would cross into ONNX Runtime through numpy, which has no bfloat16
            # ("Got unsupported ScalarType BFloat16" on every call).
            raise UnsupportedDeviceError(
                f"Backend {self.name}: precision bfloat16 is unsupported (inputs and outputs pass through numpy, "
                "which has no bfloat16); use float16 or float32"
            )
        def prepare():
            return (prepare_module(module, self.config.precision, False, False, torch.device("cpu")),
                    cast_sample(data[0].to("cpu"), self._dtype()))

        exported = shared_onnx_export(self._exports, module, data[0], graph_spec, cache_dir / "model.onnx",
                                      self.config.opset, self.config.precision, prepare)
        self._model, self._data, self._outputs = exported.model, exported.external_data, OutputLayout.of(exported)
        self._load(self.device)

    def _load(self, device: torch.device) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[self.config.graph_optimization_level])
        # Like torch, use the threads this process was given (a worker slot's count), not every
        # core of the machine: a session sized to the machine starves its neighbours.
        opts.intra_op_num_threads = self.config.intra_op_threads or torch.get_num_threads()
        available = set(ort.get_available_providers())
        providers = [p for p in self.config.providers if p in available and _PROVIDER_DEVICE.get(p) == device.type]
        session = ort.InferenceSession(str(self._model), sess_options=opts, providers=session_providers(providers, device))
        # ONNX Runtime falls back to the CPU quietly: at session creation where a provider fails to
        # load (a missing CUDA library), and at run() where it fails. Either would be measured as
        # this candidate while the CPU ran it.
        session.disable_fallback()
        running = session.get_providers()
        if not running or running[0] != providers[0]:
            raise UnsupportedDeviceError(
                f"Backend {self.name}: ONNX Runtime did not start {providers[0]} on {device} "
                f"(the session runs on {list(running)}); see its log for why"
            )
        self._session = session
        self._input_names = [i.name for i in session.get_inputs()]
        self._output_names = [o.name for o in session.get_outputs()]
        self._out_meta = {}
        if self.config.io_binding and self.graph_spec is not None:
            # Learn the output shapes now, so that the first call (the check) runs the bound path
            # that is measured, not the copying one.
            sample = sample_from_spec(self.graph_spec, device)
            self._infer(*sample.args, **sample.kwargs)

    def _feeds(self, sample: Sample) -> list[torch.Tensor]:
        flat = list(sample.args) + [sample.kwargs[k] for k in (self.graph_spec.kwarg_names if self.graph_spec else sample.kwargs)]
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if len(tensors) != len(self._input_names):
            raise ValueError(f"Backend {self.name}: the ONNX model takes {len(self._input_names)} inputs, got {len(tensors)}")
        return tensors

    def _infer(self, *args: Any, **kwargs: Any) -> Any:
        sample = Sample(args, kwargs)
        if self.graph_spec is not None:
            self.graph_spec.check_sample(sample, self.name)
        tensors = self._feeds(cast_sample(sample, self._dtype()))
        shapes = tuple((tuple(t.shape), t.dtype) for t in tensors)
        meta = self._out_meta.get(shapes)
        if self.config.io_binding and meta is not None and all(t.dtype in _NUMPY for t in tensors):
            outputs = self._run_bound(tensors, meta)
        else:
            feeds = {name: t.detach().cpu().numpy() for name, t in zip(self._input_names, tensors)}
            outputs = [torch.from_numpy(np.asarray(o)) for o in self._session.run(None, feeds)]
            # learn the output shapes once; later calls of these input shapes bind memory directly
            self._out_meta[shapes] = [(tuple(o.shape), o.dtype) for o in outputs]
            if self.device is not None and self.device.type != "cpu":
                outputs = [o.to(self.device) for o in outputs]
        return self._outputs.rebuild(outputs)

    def _run_bound(self, tensors: list[torch.Tensor], meta) -> list[torch.Tensor]:
        """I/O binding: ONNX Runtime reads inputs and writes outputs in place, on the device."""
        device = self.device or torch.device("cpu")
        kind, index = ("cuda", cuda_index(device)) if device.type == "cuda" else ("cpu", 0)
        binding = self._session.io_binding()
        inputs = [t.to(device).contiguous() for t in tensors]
        for name, t in zip(self._input_names, inputs):
            binding.bind_input(name, kind, index, _NUMPY[t.dtype], list(t.shape), t.data_ptr())
        outputs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in meta]
        for name, t in zip(self._output_names, outputs):
            binding.bind_output(name, kind, index, _NUMPY[t.dtype], list(t.shape), t.data_ptr())
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # ONNX Runtime runs on its own stream
        self._session.run_with_iobinding(binding)
        return outputs

    def _deactivate(self) -> None:
        self._session = None

    def to_dict(self) -> dict[str, Any]:
        state = self._base_dict()
        state["model"] = self._model
        state["external_data"] = self._data
        self._outputs.save(state)
        return state

    @classmethod
    def from_dict(cls, state_dict: dict[str, Any]) -> "OnnxRuntimeBackend":
        backend = cls._new_loaded(state_dict)
        backend._model = artifact_path(state_dict, "model", cls.__name__)
        backend._data = artifact_path(state_dict, "external_data", cls.__name__, optional=True)
        backend._outputs = OutputLayout.load(state_dict)
        return backend
