"""Backends: ways of running a ``torch.nn.Module``, behind the AITune AOT Backend API.

``TensorRTBackend`` and ``TensorRTConfig`` load on first use (module ``__getattr__``), so that
importing this package never touches TensorRT's module.
"""

from aitune.torch.backend.backend import Backend, BackendConfig, BackendState, UnsupportedDeviceError, artifact_path
from aitune.torch.backend.cuda_graph import CudaGraphBackend, CudaGraphConfig
from aitune.torch.backend.eager import TorchEagerBackend, TorchEagerConfig
from aitune.torch.backend.inductor_aot import TorchInductorAotBackend, TorchInductorAotConfig
from aitune.torch.backend.inductor_jit import TorchInductorJitBackend, TorchInductorJitConfig
from aitune.torch.backend.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from aitune.torch.backend.registry import (
    config_class_of,
    display_name,
    get_backend_class,
    known_backends,
    make_backend,
    register_backend,
)

_LAZY = {"TensorRTBackend", "TensorRTConfig"}


def __getattr__(name):
    if name in _LAZY:
        from aitune.torch.backend import tensorrt

        return getattr(tensorrt, name)
    raise AttributeError(f"module 'aitune.torch.backend' has no attribute {name!r}")


__all__ = [
    "Backend",
    "BackendConfig",
    "BackendState",
    "UnsupportedDeviceError",
    "artifact_path",
    "TorchEagerBackend",
    "TorchEagerConfig",
    "TorchInductorJitBackend",
    "TorchInductorJitConfig",
    "TorchInductorAotBackend",
    "TorchInductorAotConfig",
    "OnnxRuntimeBackend",
    "OnnxRuntimeConfig",
    "CudaGraphBackend",
    "CudaGraphConfig",
    "TensorRTBackend",
    "TensorRTConfig",
    "config_class_of",
    "display_name",
    "get_backend_class",
    "known_backends",
    "make_backend",
    "register_backend",
]
