"""Backends by class name, so that specs and checkpoints name them as plain strings."""

from __future__ import annotations

import importlib

from aitune.torch.backend.backend import Backend

_BUILTIN = {
    "TorchEagerBackend": "aitune.torch.backend.eager",
    "TorchInductorJitBackend": "aitune.torch.backend.inductor_jit",
    "TorchInductorAotBackend": "aitune.torch.backend.inductor_aot",
    "OnnxRuntimeBackend": "aitune.torch.backend.onnxruntime",
    "CudaGraphBackend": "aitune.torch.backend.cuda_graph",
    "TensorRTBackend": "aitune.torch.backend.tensorrt",
}
_EXTRA: dict[str, type[Backend]] = {}


class UnknownBackendError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Make a backend class known by name (used as a decorator by plug-ins and test backends)."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{cls!r} is not a Backend subclass")
    _EXTRA[cls.__name__] = cls
    return cls


def known_backends() -> list[str]:
    return sorted(set(_BUILTIN) | set(_EXTRA))


def get_backend_class(name: str) -> type[Backend]:
    if name in _EXTRA:
        return _EXTRA[name]
    if name in _BUILTIN:
        module = importlib.import_module(_BUILTIN[name])
        return getattr(module, name)
    raise UnknownBackendError(f"unknown backend {name!r}; known backends: {', '.join(known_backends())}")


def resolve_backend_class(name: str, module: str | None = None) -> type[Backend]:
    """By name, or by importing ``module`` first (a plug-in backend registered at import)."""
    try:
        return get_backend_class(name)
    except UnknownBackendError:
        if not module:
            raise
    imported = importlib.import_module(module)
    cls = getattr(imported, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise UnknownBackendError(f"module {module!r} defines no Backend named {name!r}")
    return cls
