"""How a checkpoint rebuilds a module: a factory import path, its keyword arguments, and the weights.

Eager and JIT checkpoints hold weights, not code. To run them again the module's architecture
must be rebuilt, so the module is tagged with the factory that made it (``attach_factory``); a
module whose class builds with no arguments needs no tag.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aitune.canonical import canonicalize

FACTORY_ATTR = "__aitune_factory__"


class ImportPathError(ImportError):
    """An import path such as ``package.module:function`` could not be resolved."""


def import_object(path: str) -> Any:
    """Resolve ``package.module:attr.sub``; the error says which part failed and why."""
    if not isinstance(path, str) or ":" not in path:
        raise ImportPathError(f"import path {path!r} must look like 'package.module:name'")
    module_name, _, attr_path = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises at import
        raise ImportPathError(f"cannot import module {module_name!r} of {path!r}: {type(exc).__name__}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportPathError(f"module {module_name!r} has no attribute {attr_path!r} (from {path!r})") from exc
    return obj


def object_path(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


@dataclass(frozen=True)
class ModuleRef:
    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> torch.nn.Module:
        fn = import_object(self.factory)
        module = fn(**self.kwargs)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"factory {self.factory!r} returned {type(module).__name__}, not a torch.nn.Module")
        return attach_factory(module, self.factory, self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": canonicalize(self.kwargs, "module.kwargs")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModuleRef":
        """From ``to_dict()`` output: an import path and JSON keyword arguments, nothing else."""
        factory, kwargs = d["factory"], d.get("kwargs", {})
        if not isinstance(factory, str):
            raise ValueError(f"module factory {factory!r} is not an import path string")
        if not isinstance(kwargs, dict):
            raise ValueError(f"kwargs of module factory {factory!r} must be a JSON object, got {type(kwargs).__name__}")
        _require_json(kwargs, f"kwargs of module factory {factory!r}")
        return cls(factory, dict(kwargs))

    @classmethod
    def of(cls, module: torch.nn.Module) -> "ModuleRef":
        """The factory attached to ``module``, else its class when that builds without arguments."""
        tagged = getattr(module, FACTORY_ATTR, None)
        if tagged is not None:
            return cls(tagged[0], dict(tagged[1]))
        klass = type(module)
        params = [
            p
            for p in list(inspect.signature(klass.__init__).parameters.values())[1:]
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if params or "<locals>" in klass.__qualname__:
            raise ValueError(
                f"cannot checkpoint a {klass.__qualname__}: its class needs arguments ({[p.name for p in params]}) "
                f"or is not importable; tag it with aitune.attach_factory(module, 'package.module:factory', kwargs)"
            )
        return cls(object_path(klass), {})


def _require_json(value: Any, where: str) -> None:
    """Plain JSON values only: a checkpoint's factory gets no object (not even an artifact ``Path``)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _require_json(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is not a string")
            _require_json(v, f"{where}.{k}")
        return
    raise ValueError(f"{where}: {type(value).__name__} {value!r} is not a JSON value")


def attach_factory(module: torch.nn.Module, factory: str, kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """Record how ``module`` was made so that checkpoints can rebuild it."""
    object.__setattr__(module, FACTORY_ATTR, (factory, dict(kwargs or {})))
    return module


def save_weights(module: torch.nn.Module, path: Path) -> Path:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    torch.save(state, path)
    return path


def load_module(ref: ModuleRef, weights: Path) -> torch.nn.Module:
    """Rebuild the module and load weights with ``weights_only=True`` (no arbitrary unpickling)."""
    module = ref.build()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    return module.eval()
