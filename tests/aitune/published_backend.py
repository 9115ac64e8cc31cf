"""Backends written the way the published AITune AOT Backend API page shows, for tests that plug
them in by import path (``published_backend:PublishedBackend``): ``super().__init__()`` with no
arguments, the config kept by the backend itself, ``self.state`` set in ``from_dict``, the
published hooks (``_build(module, graph_spec, data, cache_dir)``, ``_deploy()``), artifacts as
``Path`` values. Nothing of this project's own additions (``config_class``, ``_configure``,
``_base_dict``, ``_new_loaded``) is used.

Importable by Ray workers and fresh processes: put this directory on ``PYTHONPATH``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aitune.torch.backend import Backend
from aitune.torch.backend.backend import BackendConfig, BackendState
from aitune.torch.module_ref import ModuleRef, load_module

#: hook calls, by name, of every backend in this process: tests read what the base called
CALLS: list[str] = []


@dataclass
class PublishedConfig(BackendConfig):
    #: ``torch.inference_mode`` (True) or ``torch.no_grad`` (False)
    inference_mode: bool = True


class PublishedBackend(Backend):
    """Eager PyTorch, saved as the module's factory and a weights file."""

    def __init__(self, config: PublishedConfig | None = None):
        super().__init__()
        self._config = config or PublishedConfig()
        self._module = None
        self._module_ref: dict[str, Any] | None = None
        self._weights: Path | None = None

    @property
    def is_jit(self) -> bool:
        return False

    def describe(self) -> str:
        return self._config.describe()

    def key(self) -> str:
        text = json.dumps({"backend": "PublishedBackend", "config": self._config.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def _build(self, module, graph_spec, data, cache_dir):
        CALLS.append("_build")
        self._module_ref = ModuleRef.of(module).to_dict()
        self._module = copy.deepcopy(module).eval().to(self.device)
        self._weights = Path(cache_dir) / "weights.pt"
        torch.save({k: v.detach().cpu() for k, v in self._module.state_dict().items()}, self._weights)

    def _activate(self):
        CALLS.append("_activate")
        if self._module is None:
            self._module = load_module(ModuleRef.from_dict(self._module_ref), self._weights)
        self._module.to(self.device)

    def _deactivate(self):
        CALLS.append("_deactivate")
        self._module.to("cpu")

    def _deploy(self):
        CALLS.append("_deploy")
        self._module = load_module(ModuleRef.from_dict(self._module_ref), self._weights).to(self.device)

    def _infer(self, *args, **kwargs):
        with torch.inference_mode() if self._config.inference_mode else torch.no_grad():
            return self._module(*args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self._config.to_dict(), "module": self._module_ref, "weights": self._weights}

    @classmethod
    def from_dict(cls, state_dict: dict[str, Any]) -> "PublishedBackend":
        weights = state_dict["weights"]
        if not isinstance(weights, Path):
            raise ValueError(f"PublishedBackend: weights must be an artifact Path, got {weights!r}")
        backend = cls(PublishedConfig.from_dict(state_dict["config"]))
        backend._module_ref = state_dict["module"]
        backend._weights = weights
        backend.state = BackendState.CHECKPOINT_LOADED
        return backend


class PublishedPlainBackend(Backend):
    """No config at all (not even a constructor): built with no arguments, keyed by its own ``key()``."""

    @property
    def is_jit(self) -> bool:
        return False

    def describe(self) -> str:
        return "plain eager"

    def key(self) -> str:
        return hashlib.sha256(b"PublishedPlainBackend").hexdigest()

    def _build(self, module, graph_spec, data, cache_dir):
        self._module = copy.deepcopy(module).eval().to(self.device)

    def _activate(self):
        self._module.to(self.device)

    def _deactivate(self):
        self._module.to("cpu")

    def _deploy(self):
        raise NotImplementedError("PublishedPlainBackend has no checkpoint to deploy")

    def _infer(self, *args, **kwargs):
        with torch.inference_mode():
            return self._module(*args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError("PublishedPlainBackend is not saved")

    @classmethod
    def from_dict(cls, state_dict):
        raise NotImplementedError("PublishedPlainBackend is not saved")


class HalfDoneBackend(Backend):
    """Abstract: no hooks. A plug-in path naming it must be refused."""


NOT_A_BACKEND = 42
