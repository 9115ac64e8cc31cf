"""Backends by name: a built-in class name (``"TorchEagerBackend"``) or a plug-in's import path
(``"package.module:ClassName"``), so that specs, ``aitune.tune`` and checkpoints name them as
plain strings and every process imports the class itself.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from typing import Any

from aitune.torch.backend.backend import Backend, BackendConfig
from aitune.torch.module_ref import ImportPathError, import_object

_BUILTIN = {
    "TorchEagerBackend": "aitune.torch.backend.eager",
    "TorchInductorJitBackend": "aitune.torch.backend.inductor_jit",
    "TorchInductorAotBackend": "aitune.torch.backend.inductor_aot",
    "OnnxRuntimeBackend": "aitune.torch.backend.onnxruntime",
    "CudaGraphBackend": "aitune.torch.backend.cuda_graph",
    "TensorRTBackend": "aitune.torch.backend.tensorrt",
    "TorchAOBackend": "aitune.torch.backend.torchao",
}
_EXTRA: dict[str, type[Backend]] = {}


class UnknownBackendError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InvalidBackendError(ValueError):
    """A plug-in backend that can't be used: not importable, not a ``Backend``, abstract, or a config that doesn't fit."""


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Make a backend class known by name in this process (a decorator for in-process test backends)."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{cls!r} is not a Backend subclass")
    _EXTRA[cls.__name__] = cls
    return cls


def known_backends() -> list[str]:
    return sorted(set(_BUILTIN) | set(_EXTRA))


def is_import_path(name: str) -> bool:
    return ":" in name


def get_backend_class(name_or_path: str) -> type[Backend]:
    """The backend class named by a built-in (or registered) name or by ``"package.module:ClassName"``."""
    if not isinstance(name_or_path, str):
        raise UnknownBackendError(f"a backend is named by a string, got {type(name_or_path).__name__} {name_or_path!r}")
    if is_import_path(name_or_path):
        return _import_plugin(name_or_path)
    if name_or_path in _EXTRA:
        return _EXTRA[name_or_path]
    if name_or_path in _BUILTIN:
        return getattr(importlib.import_module(_BUILTIN[name_or_path]), name_or_path)
    raise UnknownBackendError(
        f"unknown backend {name_or_path!r}; known backends: {', '.join(known_backends())} "
        "(a plug-in backend is named by its import path, 'package.module:ClassName')"
    )


def _import_plugin(path: str) -> type[Backend]:
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise InvalidBackendError(f"backend {path!r}: an import path looks like 'package.module:ClassName'")
    try:
        obj = import_object(path)
    except ImportPathError as exc:
        raise InvalidBackendError(f"backend {path!r} can't be imported: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise InvalidBackendError(f"backend {path!r} is {obj!r}, not a subclass of aitune.torch.backend.Backend")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise InvalidBackendError(f"backend {path!r} is abstract: it does not implement {missing}")
    return obj


def backend_ref(cls: type[Backend]) -> str:
    """How another process finds ``cls`` again: its built-in name, else its import path."""
    if _BUILTIN.get(cls.__name__) == cls.__module__:
        return cls.__name__
    return f"{cls.__module__}:{cls.__qualname__}"


def config_class_of(cls: type[Backend]) -> type[BackendConfig] | None:
    """The config class a backend's constructor takes: ``config_class``, else the annotation of
    the constructor's first argument; None when the backend takes no config."""
    explicit = getattr(cls, "config_class", None)
    if explicit is not None:
        if not (isinstance(explicit, type) and issubclass(explicit, BackendConfig)):
            raise InvalidBackendError(f"backend {backend_ref(cls)}: config_class {explicit!r} is not a BackendConfig subclass")
        return explicit
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if not params or params[0].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        return None
    try:
        hint = typing.get_type_hints(cls.__init__).get(params[0].name)
    except Exception as exc:  # an annotation naming something its module does not define
        raise InvalidBackendError(f"backend {backend_ref(cls)}: can't read its constructor's annotations: {exc}") from exc
    found = [t for t in _union_members(hint) if isinstance(t, type) and issubclass(t, BackendConfig)]
    return found[0] if len(found) == 1 else None


def _union_members(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def make_backend(name_or_path: str, config: dict[str, Any] | None = None) -> Backend:
    """A new backend (state INIT) from its name or import path and its config fields."""
    cls = get_backend_class(name_or_path)
    config_cls = config_class_of(cls)
    fields = dict(config or {})
    try:
        if config_cls is None:
            if fields:
                raise InvalidBackendError(
                    f"config of {name_or_path}: the backend takes no config (no config_class and no config "
                    f"argument in its constructor), got fields {sorted(fields)}"
                )
            return cls()
        return cls(config_cls.from_dict(fields))
    except InvalidBackendError:
        raise
    except (TypeError, ValueError) as exc:
        raise InvalidBackendError(f"config of {name_or_path}: {exc}") from exc


def config_fields(backend: Backend) -> dict[str, Any]:
    """The backend's config as JSON fields; ``{}`` for a backend without one."""
    return backend.config.to_dict() if backend.config is not None else {}


def config_key(backend: Backend) -> str:
    """``BackendConfig.key()``; a backend without a config is keyed by its own ``key()``."""
    return backend.config.key() if backend.config is not None else backend.key()


def display_name(backend_or_name: Backend | str, config: dict[str, Any] | None = None) -> str:
    """A candidate's human name, e.g. ``TorchEagerBackend(precision=bfloat16)``; ``(defaults)`` when
    nothing is changed. A plug-in's own ``describe()`` is kept, prefixed with its class name."""
    backend = backend_or_name if isinstance(backend_or_name, Backend) else make_backend(backend_or_name, config)
    text = backend.describe() or ""
    if text.startswith(backend.name):
        return text
    return f"{backend.name}({text or 'defaults'})"
