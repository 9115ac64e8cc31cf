"""Backends: ways of running a ``torch.nn.Module``, behind the AITune AOT Backend API."""

from aitune.torch.backend.backend import Backend, BackendConfig, BackendState, UnsupportedDeviceError
from aitune.torch.backend.eager import TorchEagerBackend, TorchEagerConfig
from aitune.torch.backend.inductor_aot import TorchInductorAotBackend, TorchInductorAotConfig
from aitune.torch.backend.inductor_jit import TorchInductorJitBackend, TorchInductorJitConfig
from aitune.torch.backend.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeConfig
from aitune.torch.backend.registry import get_backend_class, known_backends, register_backend

__all__ = [
    "Backend",
    "BackendConfig",
    "BackendState",
    "UnsupportedDeviceError",
    "TorchEagerBackend",
    "TorchEagerConfig",
    "TorchInductorJitBackend",
    "TorchInductorJitConfig",
    "TorchInductorAotBackend",
    "TorchInductorAotConfig",
    "OnnxRuntimeBackend",
    "OnnxRuntimeConfig",
    "get_backend_class",
    "known_backends",
    "register_backend",
]
