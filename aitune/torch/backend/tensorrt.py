"""TensorRT: the module exported to ONNX, parsed and built into an engine for one GPU class.

``tensorrt`` is imported only inside the methods: this module imports without it, and a build
where it is missing raises ``UnsupportedDeviceError`` (recorded as "unsupported", not a crash).

Precision is given to the builder as flags (FP16, BF16) on an fp32 ONNX model (weak typing), so
TensorRT picks the precision per layer. TensorRT 11 removed those flags; there a reduced
precision is refused as unsupported.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Mapping

import torch

from aitune.specs import GraphSpec, Sample
from aitune.torch.backend.backend import ArtifactBackend, BackendConfig, UnsupportedDeviceError, artifact_path
from aitune.torch.backend.eager import prepare_module
from aitune.torch.export_cache import shared_onnx_export
from aitune.torch.onnx_export import OutputLayout, onnx_input_order
from aitune.torch.precision import normalize_precision
from aitune.torch.trt_profiles import ProfileShapes, network_profile

log = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"
MIN_TENSORRT_MAJOR = 10

#: TensorRT ``DataType`` member names to torch dtypes (INT4 and FP4 have no torch tensor type)
TRT_DTYPES: dict[str, torch.dtype] = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
    "FP8": torch.float8_e4m3fn,
}
#: the builder flag each reduced precision sets
PRECISION_FLAGS = {"float32": None, "float16": "FP16", "bfloat16": "BF16"}


def _trt():
    """The ``tensorrt`` module, or ``UnsupportedDeviceError`` saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise UnsupportedDeviceError(
            "TensorRT is not installed: pip install tensorrt (for your CUDA version; float16 and bfloat16 "
            f"need TensorRT 10.x, whose builder flags TensorRT 11 removed) to use TensorRTBackend ({exc})"
        ) from None
    major = _major(getattr(trt, "__version__", "0"))
    if major < MIN_TENSORRT_MAJOR:
        raise UnsupportedDeviceError(f"TensorRTBackend needs TensorRT >= {MIN_TENSORRT_MAJOR}, found {trt.__version__}")
    return trt


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType`` (or of its member name, e.g. ``"HALF"``)."""
    name = trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    try:
        return TRT_DTYPES[name]
    except KeyError:
        raise TypeError(f"TensorRT data type {name} has no torch equivalent (known: {sorted(TRT_DTYPES)})") from None


@dataclass
class TensorRTConfig(BackendConfig):
    #: reduced precision TensorRT may choose per layer (builder flag); the ONNX weights stay fp32
    precision: str = "float32"
    #: allow TF32 for fp32 matmuls and convolutions (TensorRT's own default). A float32 engine is
    #: judged with the fp32 tolerance, which TF32 may fail: the GPU default set turns it off there
    tf32: bool = True
    #: limit of the builder's workspace memory pool in MiB; None: TensorRT's default (the GPU's memory)
    workspace_mb: int | None = None
    #: ``builder_optimization_level``, 0 (fast build) to 5 (slowest build, most tactics); 3 is TensorRT's default
    optimization_level: int = 3
    #: file name of a timing cache inside the build's cache directory, loaded if present and saved
    #: after the build; relative, so that keys do not depend on the machine. None: no cache file
    timing_cache: str | None = None
    #: ONNX opset; None takes the exporter's default
    opset: int | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self.precision = normalize_precision(self.precision, owner)
        if not isinstance(self.tf32, bool):
            raise ValueError(f"{owner}: tf32 must be True or False, got {self.tf32!r}")
        if self.workspace_mb is not None and (not _is_int(self.workspace_mb) or self.workspace_mb <= 0):
            raise ValueError(f"{owner}: workspace_mb must be a positive number of MiB or None, got {self.workspace_mb!r}")
        if not _is_int(self.optimization_level) or not 0 <= self.optimization_level <= 5:
            raise ValueError(f"{owner}: optimization_level must be an integer from 0 to 5, got {self.optimization_level!r}")
        if self.opset is not None and (not _is_int(self.opset) or self.opset <= 0):
            raise ValueError(f"{owner}: opset must be a positive integer or None, got {self.opset!r}")
        if self.timing_cache is not None:
            self.timing_cache = _relative_name(self.timing_cache, owner)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _relative_name(name: Any, owner: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{owner}: timing_cache must be a file name or None, got {name!r}")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith("\\"):
        raise ValueError(
            f"{owner}: timing_cache {name!r} is an absolute path; give a file name relative to the build's "
            "cache directory (an absolute path would make the config key machine-specific)"
        )
    if ".." in posix.parts or ".." in windows.parts:
        raise ValueError(f"{owner}: timing_cache {name!r} leaves the build's cache directory")
    return posix.as_posix()


def timing_cache_path(config: TensorRTConfig, cache_dir: str | Path) -> Path | None:
    """Where the config's timing cache lives for a build in ``cache_dir`` (None: no cache file)."""
    return Path(cache_dir) / config.timing_cache if config.timing_cache is not None else None


def make_builder_config(
    trt: Any,
    builder: Any,
    config: TensorRTConfig,
    profile: Mapping[str, ProfileShapes],
    timing_cache: bytes | None = None,
) -> Any:
    """A TensorRT ``IBuilderConfig`` for ``config``, with one optimization profile.

    ``trt`` is the ``tensorrt`` module, a parameter so that this can be checked without it.
    ``profile`` maps network input names to ``(min, opt, max)``; empty for a static network, which
    takes no profile. ``timing_cache`` is a serialized cache (``b""`` for a new one); None attaches none. A cache
    TensorRT refuses (built by another version or GPU) is replaced by an empty one.
    """
    builder_config = builder.create_builder_config()
    flag = PRECISION_FLAGS[config.precision]
    if flag is not None:
        if not hasattr(trt.BuilderFlag, flag):
            raise UnsupportedDeviceError(
                f"TensorRT {getattr(trt, '__version__', '?')} has no BuilderFlag.{flag} (TensorRT 11 removed "
                f"weakly typed precision flags): precision {config.precision} needs TensorRT 10"
            )
        builder_config.set_flag(getattr(trt.BuilderFlag, flag))
    if config.tf32:
        builder_config.set_flag(trt.BuilderFlag.TF32)
    else:
        builder_config.clear_flag(trt.BuilderFlag.TF32)
    if config.workspace_mb is not None:
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    builder_config.builder_optimization_level = config.optimization_level
    if profile:
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, lo, opt, hi)
        if builder_config.add_optimization_profile(opt_profile) < 0:
            raise ValueError(f"TensorRT refused the optimization profile {dict(profile)}")
    if timing_cache is not None:
        cache = builder_config.create_timing_cache(timing_cache)
        if not builder_config.set_timing_cache(cache, False):
            log.warning("TensorRT refused the timing cache (another TensorRT version or GPU?): starting an empty one")
            builder_config.set_timing_cache(builder_config.create_timing_cache(b""), False)
    return builder_config


def _make_logger(trt: Any):
    """A TensorRT logger that forwards to ``logging`` and keeps the errors for exception messages."""

    class RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):  # called by TensorRT
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

        def take_errors(self) -> str:
            errors, self.errors = self.errors, []
            return "; ".join(errors) if errors else "no error logged"

    return RecordingLogger()


def _write_atomic(path: Path, blob: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(memoryview(blob))
    os.replace(tmp, path)


class TensorRTBackend(ArtifactBackend):
    """An engine built by TensorRT from the module's ONNX export; bound to the GPU class it was built on."""

    config_class = TensorRTConfig
    dynamic_shapes = True
    toolchain = "onnx"
    supported_device_types = frozenset({"cuda"})
    #: 2: an output whose containers a library registers with pytree (an HF ModelOutput) is kept as
    #: aitune's own tree, so a process that never imported the library reads the artifact back
    implementation_version = "2"
    portable = False

    def __init__(self, config: TensorRTConfig | None = None) -> None:
        super().__init__(config)
        self._engine_file: Path | None = None
        self._outputs = OutputLayout()
        self._input_names: list[str] = []
        self._output_names: list[str] = []
        # live TensorRT objects: the logger and runtime must outlive the engine and its context
        self._logger = None
        self._runtime = None
        self._engine = None
        self._context = None
        self._dtypes: dict[str, torch.dtype] = {}
        self._stream: torch.cuda.Stream | None = None  # the engine's own stream (see _infer)

    @property
    def is_jit(self) -> bool:
        return False

    def _assert_device(self, device) -> None:
        super()._assert_device(device)
        _trt()

    # -- build --------------------------------------------------------------------------------------
    def _build(self, module, graph_spec: GraphSpec, data: list[Sample], cache_dir: Path) -> None:
        trt = _trt()
        device = self.device
        if not data:
            raise ValueError(f"Backend {self.name} needs at least one sample to export the module")
        # fp32 ONNX: TensorRT lowers precision per layer from the builder flags
        def prepare():
            return prepare_module(module, "float32", False, False, torch.device("cpu")), data[0].to("cpu")

        exported = shared_onnx_export(self._exports, module, data[0], graph_spec, cache_dir / "model.onnx",
                                      self.config.opset, "float32", prepare)
        logger = _make_logger(trt)
        with torch.cuda.device(device):
            builder = trt.Builder(logger)
            network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
            parser = trt.OnnxParser(network, logger)
            # from the file, so that the external weights beside it resolve
            if not parser.parse_from_file(str(exported.model)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise RuntimeError(f"Backend {self.name}: TensorRT could not parse {exported.model}: {errors}")
            input_names = [network.get_input(i).name for i in range(network.num_inputs)]
            output_names = [network.get_output(i).name for i in range(network.num_outputs)]
            profile = network_profile(graph_spec, input_names)
            # a profile only where the network has dynamic dimensions: a static one takes none
            if not any(d < 0 for i in range(network.num_inputs) for d in tuple(network.get_input(i).shape)):
                profile = {}
            cache_file = timing_cache_path(self.config, cache_dir)
            blob = None
            if cache_file is not None:
                blob = cache_file.read_bytes() if cache_file.is_file() else b""
            builder_config = make_builder_config(trt, builder, self.config, profile, blob)
            plan = builder.build_serialized_network(network, builder_config)
            if plan is None:
                raise RuntimeError(f"Backend {self.name}: TensorRT failed to build the engine: {logger.take_errors()}")
            engine_file = cache_dir / ENGINE_FILE
            _write_atomic(engine_file, plan)
            if cache_file is not None:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(cache_file, builder_config.get_timing_cache().serialize())
        self._engine_file = engine_file
        self._outputs = OutputLayout.of(exported)
        self._input_names, self._output_names = input_names, output_names
        self._load(device)

    def _load(self, device: torch.device) -> None:
        trt = _trt()
        if self._engine_file is None:
            raise RuntimeError(f"Backend {self.name} has no engine file to load")
        logger = _make_logger(trt)
        with torch.cuda.device(device):
            runtime = trt.Runtime(logger)
            engine = runtime.deserialize_cuda_engine(self._engine_file.read_bytes())
            if engine is None:
                raise RuntimeError(
                    f"Backend {self.name}: TensorRT could not load the engine {self._engine_file} on {device} "
                    f"(built by another TensorRT version or for another GPU?): {logger.take_errors()}"
                )
            context = engine.create_execution_context()
            if context is None:
                raise RuntimeError(
                    f"Backend {self.name}: TensorRT could not create an execution context: {logger.take_errors()}"
                )
            stream = torch.cuda.Stream(device)
        self._logger, self._runtime, self._engine, self._context = logger, runtime, engine, context
        self._stream = stream
        self._dtypes = {n: torch_dtype(engine.get_tensor_dtype(n)) for n in self._input_names + self._output_names}

    # -- inference ----------------------------------------------------------------------------------
    def _infer(self, *args: Any, **kwargs: Any) -> Any:
        spec = self.graph_spec
        if spec is None:
            raise RuntimeError(f"Backend {self.name} has no graph spec")
        sample = Sample(args, kwargs)
        spec.check_sample(sample, self.name)
        named = sample.named_tensors(spec)
        tensors = [named[t.name] for t in onnx_input_order(spec)]
        if len(tensors) != len(self._input_names):
            raise ValueError(f"Backend {self.name}: the engine takes {len(self._input_names)} inputs, got {len(tensors)}")
        context, device = self._context, self.device
        # The cast copies are kept in ``inputs`` until the engine is enqueued: one freed earlier
        # could be handed to the next input's copy before the engine has read it. Freed when this
        # returns, their memory goes only to later work on the same stream, after the engine.
        inputs = []
        with torch.cuda.device(device):
            for name, tensor in zip(self._input_names, tensors):
                tensor = tensor.to(device=device, dtype=self._dtypes[name]).contiguous()
                inputs.append(tensor)
                if not context.set_input_shape(name, tuple(tensor.shape)):
                    raise ValueError(f"Backend {self.name}: TensorRT refused shape {tuple(tensor.shape)} for input {name!r}")
                context.set_tensor_address(name, tensor.data_ptr())
            outputs = []
            for name in self._output_names:
                shape = tuple(context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(
                        f"Backend {self.name}: output {name!r} has a data-dependent shape {shape}, "
                        "which this backend does not support"
                    )
                out = torch.empty(shape, dtype=self._dtypes[name], device=device)
                context.set_tensor_address(name, out.data_ptr())
                outputs.append(out)
            # On a stream of its own: on the legacy default stream (torch's current stream unless the
            # caller set another) TensorRT adds host synchronisations to every enqueue. Joined to the
            # caller's stream on both sides: the engine reads inputs copied on it, and later work
            # on it (reading the outputs, reusing the inputs' memory) waits for the engine.
            caller = torch.cuda.current_stream(device)
            self._stream.wait_stream(caller)
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"Backend {self.name}: TensorRT execution failed: {self._logger.take_errors()}")
            caller.wait_stream(self._stream)
        return self._outputs.rebuild(outputs)

    # -- life cycle ---------------------------------------------------------------------------------
    def _deactivate(self) -> None:
        # the context before the engine, the engine before the runtime
        self._context = None
        self._engine = None
        self._runtime = None
        self._stream = None

    # -- checkpoints --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        state = self._base_dict()
        state["engine"] = self._engine_file
        self._outputs.save(state)
        state["input_names"] = list(self._input_names)
        state["output_names"] = list(self._output_names)
        return state

    @classmethod
    def from_dict(cls, state_dict: dict[str, Any]) -> "TensorRTBackend":
        backend = cls._new_loaded(state_dict)
        backend._engine_file = artifact_path(state_dict, "engine", cls.__name__)
        backend._outputs = OutputLayout.load(state_dict)
        backend._input_names = list(state_dict.get("input_names", []))
        backend._output_names = list(state_dict.get("output_names", []))
        return backend
