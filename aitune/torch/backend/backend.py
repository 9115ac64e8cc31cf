"""The AITune AOT Backend API: ``BackendState``, ``BackendConfig`` and the ``Backend`` base class.

A public method checks the state, calls a private hook (``_build``, ``_activate``...), then moves
to the next state. Subclasses implement only the hooks, exactly as on the published API page:
a backend written for AITune plugs in unchanged. What this project adds sits on top and is
optional for such a backend: supported device types, ``portable``, ``config_class``, the
checkpoint helpers (``_base_dict``, ``_new_loaded``, :func:`artifact_path`).
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import gc
import inspect
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import nvtx
import torch

from aitune.build_refusal import BuildRefused
from aitune.canonical import canonicalize, sha256_of, to_dtype
from aitune.specs import GraphSpec, Sample

log = logging.getLogger(__name__)

NVTX_DOMAIN = "AITune"


class BackendState(enum.Enum):
    INIT = "init"
    ACTIVE = "active"
    INACTIVE = "inactive"
    CHECKPOINT_LOADED = "checkpoint_loaded"
    DEPLOYED = "deployed"


class UnsupportedDeviceError(RuntimeError):
    """The backend cannot run on this device type: recorded as ``unsupported``, not as a crash."""


@dataclasses.dataclass
class BackendConfig:
    """Base of every backend's config. Subclasses are dataclasses whose fields all have defaults."""

    def describe(self) -> str:
        """The fields changed from the defaults, e.g. ``"precision=float16,channels_last=True"``; ``""`` for none."""
        default = type(self)()
        changed = [
            f"{f.name}={_short(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if canonicalize(getattr(self, f.name)) != canonicalize(getattr(default, f.name))
        ]
        return ",".join(changed)

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON values (dtypes by name, enums by value, sets sorted)."""
        return {f.name: canonicalize(getattr(self, f.name), f"{type(self).__name__}.{f.name}") for f in dataclasses.fields(self)}

    def key(self) -> str:
        """SHA-256 of the config's canonical JSON: equal in every process for equal configs."""
        return sha256_of({"config_class": type(self).__name__, "fields": self.to_dict()})

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BackendConfig":
        """Build a config from ``to_dict()`` output; unknown fields raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(known)}")
        defaults = cls()
        return cls(**{name: _restore(value, getattr(defaults, name)) for name, value in data.items()})


def _restore(value: Any, default: Any) -> Any:
    """Undo ``canonicalize`` for a field whose default shows its type: dtype, enum, set or tuple."""
    if value is None:
        return None
    if isinstance(default, torch.dtype):
        return to_dtype(value)
    if isinstance(default, enum.Enum):
        return type(default)(value)
    if isinstance(default, (set, frozenset, tuple)) and not hasattr(default, "_fields"):
        return type(default)(value)
    return value


def _short(value: Any) -> str:
    value = canonicalize(value)
    return value if isinstance(value, str) else repr(value)


def _annotate(message: str):
    return nvtx.annotate(message=message, domain=NVTX_DOMAIN)


def artifact_path(state_dict: dict[str, Any], key: str, owner: str, *, optional: bool = False) -> Path | None:
    """``state_dict[key]`` as an artifact ``Path``, for ``from_dict``.

    A checkpoint turns only the artifacts it bundles (and verified) into ``Path`` values; a plain
    string there could name any file on the machine, so it is refused.
    """
    value = state_dict.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, Path):
        raise ValueError(
            f"{owner}: state entry {key!r} must be an artifact Path bundled with the checkpoint, "
            f"got {type(value).__name__} {value!r}"
        )
    return value


class Backend(abc.ABC):
    """One way of running a module, with a five-state life cycle.

    ``INIT --build--> ACTIVE <--activate/deactivate--> INACTIVE``;
    ``from_dict --> CHECKPOINT_LOADED --deploy--> DEPLOYED`` (or ``--activate--> ACTIVE``).
    """

    #: device types (``torch.device.type``) the backend can build and run on
    supported_device_types: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    #: the published API's name for the same thing; a backend may narrow either
    _devices: ClassVar[list[str]] = ["cpu", "cuda"]
    #: False when the artifacts are compiled for one device class (AOTInductor, TensorRT):
    #: such a checkpoint is refused on another device type or compute capability
    portable: ClassVar[bool] = True
    #: the config dataclass the constructor takes; None: read from the constructor's annotation
    #: (see ``registry.config_class_of``), or the backend takes no config
    config_class: ClassVar[type[BackendConfig] | None] = None
    #: bumped by a backend when what its build makes changes: part of every artifact key, so a
    #: stored artifact of an older implementation is never reused for a newer one
    implementation_version: ClassVar[str] = "1"
    #: what its first build starts in a process and later builds of any backend naming the same
    #: toolchain find started (``torch.compile``'s compiler, the ONNX exporter): seconds, once
    #: per process. A scheduler keeps such builds together; None: nothing worth keeping together
    toolchain: ClassVar[str | None] = None
    #: True when one artifact can cover a range of an axis (from the graph spec's dynamic axes:
    #: ``torch.export`` dims, ONNX dynamic axes, TensorRT profiles, ``dynamic=True``); such a
    #: backend competes with one artifact per sequence bucket (aitune.shapes). Eager backends run
    #: any shape as they are and need no such artifact
    dynamic_shapes: ClassVar[bool] = False

    state: BackendState = BackendState.INIT
    _config: BackendConfig | None = None
    _graph_spec: GraphSpec | None = None
    _work_dir: Path | None = None
    #: set by checkpoint loading (``set_deploy_check``): refuses a target the artifacts were not built for
    _deploy_check: Callable[[torch.device], None] | None = None

    def __init__(self) -> None:
        self.state = BackendState.INIT
        self._device: torch.device | None = None

    def _configure(self, config: BackendConfig | None) -> None:
        """Keep ``config`` (default: ``config_class()``), refusing a config of another class."""
        cls = type(self).config_class
        if cls is None:
            raise TypeError(f"{self.name} has no config_class to configure")
        config = cls() if config is None else config
        if not isinstance(config, cls):
            raise TypeError(f"{self.name} needs a {cls.__name__}, got {type(config).__name__}")
        self._config = config

    # -- properties --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def config(self) -> BackendConfig | None:
        return self._config

    @config.setter
    def config(self, value: BackendConfig | None) -> None:
        # The published API has no ``config`` attribute, so a plug-in may well write
        # ``self.config = config or MyConfig()`` in its constructor: that is its config then.
        if value is not None and not isinstance(value, BackendConfig):
            raise TypeError(f"{self.name}.config must be a BackendConfig, got {type(value).__name__}")
        self._config = value

    @property
    def device(self) -> torch.device | None:
        return self._device

    @property
    def graph_spec(self) -> GraphSpec | None:
        return self._graph_spec

    @property
    def is_active(self) -> bool:
        return self.state == BackendState.ACTIVE

    @property
    @abc.abstractmethod
    def is_jit(self) -> bool:
        """True when the backend compiles at run time (the first call of a new shape is slow)."""

    # -- life cycle ----------------------------------------------------------------------------
    def build(
        self,
        module: torch.nn.Module,
        graph_spec: GraphSpec,
        data: Sequence[Sample],
        device: torch.device | str,
        cache_dir: str | Path | None = None,
        *,
        exports: Any = None,
    ) -> "Backend":
        """Build for ``device`` from ``module``, calling each sample in ``data`` at most once.

        ``exports``, an :class:`aitune.torch.export_cache.ExportCache` the caller owns, lets
        backends that export the module (ONNX Runtime, TensorRT) take an export another
        candidate of this process made of the same module, sample and graph spec; backends
        that do not export ignore it."""
        if self.state != BackendState.INIT:
            raise RuntimeError(f"Backend {self.name} build should be called only once")
        device = torch.device(device) if device is not None else None
        self._assert_device(device)
        with _annotate(f"{self.name}.build"):
            self._set_device(device)
            self._graph_spec = graph_spec
            self._work_dir = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="aitune-"))
            self._work_dir.mkdir(parents=True, exist_ok=True)
            self._exports = exports
            try:
                self._build(module, graph_spec, list(data), self._work_dir)
            except Exception as exc:
                if isinstance(exc, BuildRefused):  # a known reason, said in full: one line
                    log.warning("Backend %s can't build on %s: %s", self.name, device, exc)
                else:
                    log.exception("Backend %s failed to build on %s", self.name, device)
                self._device = self._graph_spec = None  # still INIT: built for nothing
                raise
            finally:
                self._exports = None
            self.state = BackendState.ACTIVE
        return self

    @nvtx.annotate(domain=NVTX_DOMAIN, color="black")
    def activate(self) -> None:
        if self.state == BackendState.INIT:
            raise RuntimeError(f"Cannot activate backend {self.name}, backend should be built first")
        if self.state == BackendState.DEPLOYED:
            raise RuntimeError(f"Cannot activate backend {self.name}, backend is already deployed")
        if self.state in (BackendState.INACTIVE, BackendState.CHECKPOINT_LOADED):
            self._activate()
            self.state = BackendState.ACTIVE

    def deactivate(self) -> None:
        if self.state == BackendState.INIT:
            raise RuntimeError(f"Cannot deactivate backend {self.name}, backend should be built first")
        if self.state == BackendState.DEPLOYED:
            raise RuntimeError(f"Cannot deactivate backend {self.name}, backend is already deployed")
        if self.state == BackendState.CHECKPOINT_LOADED:
            raise RuntimeError(f"Cannot deactivate backend {self.name}, backend has already been deployed")
        if self.state == BackendState.ACTIVE:
            with _annotate(f"{self.name}.deactivate"):
                self._deactivate()
                self._clean_memory()
                self.state = BackendState.INACTIVE

    def build_notes(self) -> dict[str, Any]:
        """What the build chose that the config did not say (JSON-able; e.g. the layers a quantizing
        backend kept in full precision); the orchestrator keeps it with the result."""
        return {}

    def set_deploy_check(self, check: Callable[[torch.device], None] | None) -> None:
        """Have :meth:`deploy` call ``check(target)`` first, which raises for a target this backend's
        artifacts were not built for (checkpoint loading sets it from the manifest); None: no check."""
        self._deploy_check = check

    def deploy(self, device: torch.device | str | None = None) -> None:
        """Make a checkpoint-loaded backend ready on ``device`` (``None``: the device it was built for)."""
        if self.state != BackendState.CHECKPOINT_LOADED:
            raise RuntimeError(f"Cannot deploy backend {self.name}, backend should be loaded from a checkpoint")
        target = torch.device(device) if device is not None else self._device
        self._assert_device(target)
        if self._deploy_check is not None:
            self._deploy_check(target)
        previous = self._device
        with _annotate(f"{self.name}.deploy"):
            self._set_device(target)
            try:
                self._deploy()
            except BaseException:
                self._device = previous  # still CHECKPOINT_LOADED, as before the call
                raise
            self.state = BackendState.DEPLOYED

    def infer(self, *args: Any, **kwargs: Any) -> Any:
        if self.state not in (BackendState.ACTIVE, BackendState.DEPLOYED):
            raise RuntimeError(f"Cannot run inference, backend {self.name} should be activated first")
        with _annotate(f"{self.name}.infer"):
            return self._infer(*args, **kwargs)

    __call__ = infer

    def _assert_device(self, device: torch.device | str | None) -> None:
        """Refuse a device this backend can't run on: ``UnsupportedDeviceError`` (``ValueError`` for none)."""
        if device is None:
            raise ValueError(f"Backend {self.name}: no device given")
        device = torch.device(device)
        supported = set(self.supported_device_types) & set(self._devices)
        if device.type not in supported:
            raise UnsupportedDeviceError(
                f"Backend {self.name} does not support device type {device.type!r} (supported: {sorted(supported)})"
            )
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UnsupportedDeviceError(f"Backend {self.name}: device {device} requested but CUDA is not available")

    def _set_device(self, device: torch.device | str) -> None:
        self._device = torch.device(device)

    def _clean_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- description and checkpoints -------------------------------------------------------------
    def describe(self) -> str:
        """A human name: the class and the config fields changed from the defaults."""
        if self._config is None:
            return self.name
        return f"{self.name}({self._config.describe() or 'defaults'})"

    def key(self) -> str:
        """Identifies the backend class and its config, the same in every process."""
        return sha256_of({"backend": self.name, "config": self._config.key() if self._config is not None else None})

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-able state; binary artifacts are ``Path`` values that checkpoints bundle."""

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, state_dict: dict[str, Any]) -> "Backend":
        """Rebuild from ``to_dict()`` output (artifact paths resolved); ends in ``CHECKPOINT_LOADED``."""

    def _base_dict(self) -> dict[str, Any]:
        """The part of ``to_dict()`` every project backend shares."""
        if self.state == BackendState.INIT:
            raise RuntimeError(f"Backend {self.name} has nothing to save: it was never built (state INIT)")
        return {
            "backend": self.name,
            "config": self._config.to_dict() if self._config is not None else {},
            "graph_spec": self._graph_spec.to_dict() if self._graph_spec else None,
            "device": str(self._device) if self._device is not None else None,
        }

    @classmethod
    def _new_loaded(cls, state_dict: dict[str, Any]) -> "Backend":
        """A backend in ``CHECKPOINT_LOADED`` with config, graph spec and device from ``state_dict``."""
        if state_dict.get("backend") not in (None, cls.__name__):
            raise ValueError(f"state dict is for backend {state_dict.get('backend')!r}, not {cls.__name__}")
        backend = cls(cls.config_class.from_dict(state_dict.get("config", {})))
        spec = state_dict.get("graph_spec")
        backend._graph_spec = GraphSpec.from_dict(spec) if spec else None
        backend._device = torch.device(state_dict["device"]) if state_dict.get("device") else None
        backend.state = BackendState.CHECKPOINT_LOADED
        return backend

    def work_dir(self) -> Path:
        if self._work_dir is None:
            self._work_dir = Path(tempfile.mkdtemp(prefix="aitune-"))
        return self._work_dir

    # -- hooks: the published ones, with the published arguments ------------------------------------
    @abc.abstractmethod
    def _build(self, module: torch.nn.Module, graph_spec: GraphSpec, data: list[Sample], cache_dir: Path) -> None:
        """Build on ``self.device``; after it the backend is ready to infer."""

    @abc.abstractmethod
    def _infer(self, *args: Any, **kwargs: Any) -> Any: ...

    @abc.abstractmethod
    def _activate(self) -> None:
        """From INACTIVE (bring state back to the device) or CHECKPOINT_LOADED (load on ``self.device``)."""

    @abc.abstractmethod
    def _deactivate(self) -> None:
        """Release device memory; keep what ``_activate`` needs."""

    @abc.abstractmethod
    def _deploy(self) -> None:
        """Load the checkpoint state on ``self.device``."""

    def __repr__(self) -> str:
        return f"<{self.describe()} state={self.state.name} device={self._device}>"


def build_sharing(backend: Backend, module: torch.nn.Module, graph_spec: GraphSpec, data: Sequence[Sample],
                  device: torch.device | str, cache_dir: str | Path | None, exports: Any) -> Backend:
    """``backend.build``, handed ``exports`` unless the backend overrides ``build`` with the
    published signature, which has no room for it."""
    if exports is not None and "exports" in inspect.signature(backend.build).parameters:
        return backend.build(module, graph_spec, data, device, cache_dir, exports=exports)
    return backend.build(module, graph_spec, data, device, cache_dir)


class ArtifactBackend(Backend):
    """A project backend that runs from files it built (a package, a model, an engine): activating
    and deploying both mean loading those files on ``self.device``, which subclasses do in ``_load``."""

    def __init__(self, config: BackendConfig | None = None) -> None:
        super().__init__()
        self._configure(config)

    @abc.abstractmethod
    def _load(self, device: torch.device) -> None: ...

    def _activate(self) -> None:
        self._load(self.device)

    def _deploy(self) -> None:
        self._load(self.device)
