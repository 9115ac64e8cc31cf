"""TorchAO: the module's linear layers quantized by ``torchao.quantization.quantize_``, then (by
default) compiled with ``torch.compile``.

``torchao`` is imported only inside the functions and methods here: this module imports without
it, and where it is missing (or older than ``MIN_TORCHAO``) building or deploying raises
``UnsupportedDeviceError`` saying how to install it (recorded as "unsupported", not a crash). A
scheme the device can't run is refused the same way before anything is built: float8 needs a CUDA
GPU of compute capability 8.9 or newer.

Schemes (``TorchAOConfig.scheme``), each one torchao config:

* ``int8_weight_only``: ``Int8WeightOnlyConfig``, int8 weights with per-row scales, activations
  as they are;
* ``int8_dynamic``: ``Int8DynamicActivationInt8WeightConfig``, int8 weights and activations
  quantized per token at run time (int8 matmuls);
* ``float8_weight_only``: ``Float8WeightOnlyConfig``;
* ``float8_dynamic``: ``Float8DynamicActivationFloat8WeightConfig``.

Every config is made with ``set_inductor_config=False``: torchao would otherwise set Inductor's
process-wide config for every later ``torch.compile`` of the process (another candidate's build
and measurement included). The one option that matters for int8 matmuls is passed to this
backend's own ``torch.compile`` instead.

``filter`` names layers left in full precision (the config's ``precision``): a module type name
(``"Linear"``, ``"NonDynamicallyQuantizableLinear"``) or an ``fnmatch`` pattern of module names
(``"head"``, ``"encoder.layers.0.*"``). Only ``nn.Linear`` layers are quantized in any case.

Checkpoints. The checkpoint loader rebuilds the module from its factory and weights
(``ModuleRef``, as for eager and ``torch.compile`` checkpoints) and hands the backend no module,
so the checkpoint holds the module's unquantized weights, written at build as a plain state dict
of plain tensors (``torch.save``, read back with ``weights_only=True``: no pickled objects), and
the config. ``deploy`` re-quantizes them with the same scheme and filter. Quantization is
deterministic (per-row absmax scales and round-to-nearest), so the loaded module is the one that
was built, measured and checked; to prove it, the checkpoint also records a SHA-256 of the
quantized tensors' components (int data, scales: ``__tensor_flatten__``) and the device type they
were made on, and ``deploy`` on that device type refuses weights that quantize to anything else
(a torchao that changed its rounding, say). Quantized tensor subclasses are never serialized:
their layout is torchao's private business and changes between versions. The installed torchao
version is part of :class:`aitune.environment.Environment` and its device class, so an upgrade
changes every artifact key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from aitune.accuracy import DEFAULT_QUANTIZED_GATES, Gates
from aitune.canonical import update_with_tensor
from aitune.environment import torchao_version
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend.backend import UnsupportedDeviceError
from aitune.torch.backend.eager import ModuleBackend, ModuleRunConfig, prepare_module
from aitune.torch.backend.inductor_jit import _raise_recompile_limits
from aitune.torch.backend.torchao_fallback import quantizable_layers
from aitune.torch.backend.torchao_fallback import search as fallback_search
from aitune.torch.module_ref import load_module, save_weights
from aitune.torch.random_inputs import sample_from_spec
from aitune.torch.vec_isa_memo import remember_vec_isa


SCHEMES = ("int8_weight_only", "int8_dynamic", "float8_weight_only", "float8_dynamic")
FLOAT8_SCHEMES = frozenset({"float8_weight_only", "float8_dynamic"})
#: float8 matmuls (``torch._scaled_mm``) need Ada Lovelace (8.9), Hopper (9.0) or newer
MIN_FLOAT8_CAPABILITY = (8, 9)
MIN_TORCHAO = (0, 12)
INSTALL_HINT = "pip install torchao (or aitune-orchestrator[torchao])"
WEIGHTS_FILE = "weights.pt"


def _torchao():
    """The ``torchao.quantization`` module, or ``UnsupportedDeviceError`` saying how to get it."""
    # torchao warns, on import, of each optional CUDA kernel library a CPU build can't load: noise
    # on every worker's console, so its logger says only errors while it imports
    quiet, level = logging.getLogger("torchao"), logging.getLogger("torchao").level
    quiet.setLevel(logging.ERROR)
    try:
        import torchao
        import torchao.quantization as quantization
    except ImportError as exc:
        raise UnsupportedDeviceError(
            f"torchao is not installed: {INSTALL_HINT} to use TorchAOBackend ({exc})"
        ) from None
    finally:
        quiet.setLevel(level)
    version = str(getattr(torchao, "__version__", "0"))
    if _version_tuple(version) < MIN_TORCHAO:
        wanted = ".".join(map(str, MIN_TORCHAO))
        raise UnsupportedDeviceError(f"TorchAOBackend needs torchao >= {wanted}, found {version}: {INSTALL_HINT}")
    return quantization


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def scheme_config(scheme: str) -> Any:
    """The torchao config object for ``scheme`` (imports torchao)."""
    q = _torchao()
    makers: dict[str, Callable[[], Any]] = {
        "int8_weight_only": lambda: q.Int8WeightOnlyConfig(set_inductor_config=False),
        "int8_dynamic": lambda: q.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
        "float8_weight_only": lambda: q.Float8WeightOnlyConfig(set_inductor_config=False),
        "float8_dynamic": lambda: q.Float8DynamicActivationFloat8WeightConfig(set_inductor_config=False),
    }
    return makers[scheme]()


def unsupported_reason(scheme: str, device: torch.device) -> str | None:
    """Why ``device`` can't run ``scheme`` (None: it can). Float8 needs CUDA capability >= 8.9."""
    if scheme not in FLOAT8_SCHEMES:
        return None
    need = ".".join(map(str, MIN_FLOAT8_CAPABILITY))
    what = f"TorchAOBackend scheme {scheme} needs a CUDA GPU of compute capability >= {need}"
    what += " (Ada Lovelace, Hopper or newer)"
    if device.type != "cuda":
        return f"{what}; device {device} is not a CUDA GPU"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_FLOAT8_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{what}; {device} ({name}) has {capability[0]}.{capability[1]}"
    return None


def keeps_full_precision(patterns: Sequence[str], module: torch.nn.Module, name: str) -> bool:
    """Whether ``filter`` leaves this module alone: its type's name or an ``fnmatch`` pattern of its name."""
    kind = type(module).__name__
    return any(pattern == kind or fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def quantize_module(module: torch.nn.Module, scheme: str, patterns: Sequence[str]) -> torch.nn.Module:
    """Quantize ``module``'s ``nn.Linear`` layers in place with ``scheme``, except those ``patterns``
    name; returns the module."""
    q = _torchao()

    def wanted(mod: torch.nn.Module, name: str) -> bool:
        if not isinstance(mod, torch.nn.Linear) or not _is_plain(mod.weight):
            return False
        return not keeps_full_precision(patterns, mod, name)

    q.quantize_(module, scheme_config(scheme), filter_fn=wanted)
    return module


def _is_plain(t: torch.Tensor) -> bool:
    """A plain tensor or parameter, not a tensor subclass: a weight already quantized is left as it is."""
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _components(t: torch.Tensor, prefix: str) -> list[tuple[str, Any]]:
    """A tensor as (name, plain tensor or metadata) parts: a subclass through ``__tensor_flatten__``."""
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(data) is torch.Tensor or not hasattr(data, "__tensor_flatten__"):
        return [(prefix, data)]
    names, meta = data.__tensor_flatten__()
    # metadata by its repr (block sizes, dtypes, enums); an object's address is not part of it
    meta_text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(meta))
    parts: list[tuple[str, Any]] = [(f"{prefix}#{type(data).__name__}", meta_text)]
    for name in names:
        parts.extend(_components(getattr(data, name), f"{prefix}.{name}"))
    return parts


def quantized_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every entry of ``module``'s state dict, quantized tensors by their components
    (int data, scales, block sizes), in name order: equal for equally quantized modules."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        for name, part in _components(value, key):
            digest.update(name.encode() + b"\0")
            if isinstance(part, torch.Tensor):
                update_with_tensor(digest, part)
            else:
                digest.update(str(part).encode())
    return digest.hexdigest()


@dataclass
class TorchAOConfig(ModuleRunConfig):
    """How the module is quantized and run. ``precision`` is that of everything not quantized
    (activations, biases, filtered layers) and of the quantized layers' outputs."""

    #: one of ``SCHEMES``
    scheme: str = "int8_dynamic"
    #: ``torch.compile`` the quantized module (Inductor fuses the quantize/dequantize steps)
    compile: bool = True
    #: layers left in full precision: module type names or fnmatch patterns of module names
    filter: tuple[str, ...] = ()
    #: where the whole model fails ``fallback_gates``: the most mixes tried with its most sensitive
    #: layers left in full precision (torchao_fallback.py); 0: no fallback
    fallback: int = 0
    #: the gates the fallback aims for (aitune.accuracy.Gates fields); None: DEFAULT_QUANTIZED_GATES
    fallback_gates: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        if self.scheme not in SCHEMES:
            raise ValueError(f"{owner}: scheme {self.scheme!r} is not one of {list(SCHEMES)}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"{owner}: compile must be True or False, got {self.compile!r}")
        if self.autocast:
            raise ValueError(f"{owner}: autocast can't run quantized layers; give the precision alone (weights cast)")
        if isinstance(self.filter, str) or not all(isinstance(p, str) and p for p in self.filter):
            raise ValueError(
                f"{owner}: filter must be a list of module type names or name patterns, got {self.filter!r}"
            )
        self.filter = tuple(self.filter)
        if isinstance(self.fallback, bool) or not isinstance(self.fallback, int) or not 0 <= self.fallback <= 64:
            raise ValueError(f"{owner}: fallback must be a number of tries from 0 to 64, got {self.fallback!r}")
        if self.fallback_gates is not None:
            if not isinstance(self.fallback_gates, dict):
                raise ValueError(f"{owner}: fallback_gates must be a mapping of gates, got {self.fallback_gates!r}")
            Gates.from_dict(self.fallback_gates)  # refused here, naming the field, rather than at build

    def gates(self) -> Gates:
        """The gates the fallback aims for."""
        return Gates.from_dict(self.fallback_gates) if self.fallback_gates is not None else DEFAULT_QUANTIZED_GATES


class TorchAOBackend(ModuleBackend):
    """Linear layers quantized by torchao, optionally compiled; checkpoints re-quantize on deploy."""

    config_class = TorchAOConfig
    dynamic_shapes = True
    toolchain = "inductor"
    #: judged by accuracy gates, not by an elementwise tolerance (aitune.accuracy.criteria_for)
    quantizes = True

    def __init__(self, config: TorchAOConfig | None = None) -> None:
        super().__init__(config)
        self._compiled: Callable[..., Any] | None = None
        #: SHA-256 of the quantized state (see quantized_digest), the device type and torchao it was made with
        self._digest: str | None = None
        self._digest_device: str | None = None
        self._digest_torchao: str | None = None
        #: layers the fallback kept in full precision (besides ``filter``), and what it found
        self.kept: list[str] = []
        self._fallback: dict[str, Any] | None = None

    @property
    def is_jit(self) -> bool:
        return self.config.compile

    def _assert_device(self, device) -> None:
        super()._assert_device(device)
        _torchao()
        reason = unsupported_reason(self.config.scheme, torch.device(device))
        if reason is not None:
            raise UnsupportedDeviceError(reason)

    # -- build and run ------------------------------------------------------------------------------
    def _build(self, module, graph_spec: GraphSpec, data: list[Sample], cache_dir: Path) -> None:
        self._module = self._take_module(module)
        # the unquantized weights, which a checkpoint re-quantizes (see the module docstring)
        self._weights = save_weights(self._module, cache_dir / WEIGHTS_FILE)
        if self.config.fallback and data:
            self._choose_kept(data[0].to(self.device))
        self._quantize(self._module)
        self._digest, self._digest_device = quantized_digest(self._module), self.device.type
        self._digest_torchao = torchao_version()
        self._compile()
        if self.config.compile:  # compile now: the cost lands in the build, not the first inference
            for sample in data:
                self._run(self._compiled, sample.to(self.device))

    def _quantize(self, module: torch.nn.Module, also: Sequence[str] | None = None) -> torch.nn.Module:
        cfg = self.config
        kept = self.kept if also is None else also
        with torch.no_grad():
            return quantize_module(module, cfg.scheme, [*cfg.filter, *kept])

    def _choose_kept(self, sample: Sample) -> None:
        """The fallback: which layers to keep in full precision for the gates to pass (if any)."""
        def run(module: torch.nn.Module) -> Any:
            with torch.inference_mode():
                return self._run(module, sample)

        reference = run(self._module)
        layers = quantizable_layers(self._module, lambda m, n: keeps_full_precision(self.config.filter, m, n))
        found = fallback_search(self._module, lambda m, kept: self._quantize(m, kept), layers, run, reference,
                                self.config.gates(), self.config.fallback)
        self.kept, self._fallback = list(found.kept or []), found.to_dict()

    def build_notes(self) -> dict[str, Any]:
        """What the build chose: the layers the fallback kept in full precision, and its search."""
        if self._fallback is None:
            return {}
        return {"kept_full_precision": list(self.kept), "fallback": self._fallback}

    def _compile(self) -> None:
        if not self.config.compile:
            self._compiled = self._module
            return
        _raise_recompile_limits()
        if self.device is not None and self.device.type == "cpu":
            remember_vec_isa()
        # torchao's recommended option for int8 matmuls, for this compile only (see the docstring)
        options = {"force_fuse_int_mm_with_mul": True} if self.config.scheme == "int8_dynamic" else None
        self._compiled = torch.compile(self._module, dynamic=self._dynamic(), options=options)

    def _dynamic(self) -> bool | None:
        """Static shapes for a static graph spec, as ``TorchInductorJitBackend`` does (and why)."""
        if self.graph_spec is not None and not self.graph_spec.is_dynamic:
            return False
        return None

    def _infer(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self._compiled, Sample(args, kwargs))

    # -- checkpoints --------------------------------------------------------------------------------
    def _materialize(self, device: torch.device) -> None:
        cfg = self.config
        module = load_module(self._module_ref, self._weights)
        self._module = prepare_module(module, cfg.precision, cfg.autocast, cfg.channels_last, device)
        self._quantize(self._module)
        self._check_digest(quantized_digest(self._module), device)
        self._compile()
        if cfg.compile and self.graph_spec is not None:  # compile on the target before the first request
            self._run(self._compiled, sample_from_spec(self.graph_spec, device))

    def _check_digest(self, digest: str, device: torch.device) -> None:
        if self._digest is None or self._digest_device != device.type or digest == self._digest:
            return
        raise RuntimeError(
            f"{self.name}: the checkpoint's weights quantize to other tensors on {device.type} than when it was "
            f"built (torchao {self._digest_torchao} then, {torchao_version()} now): the accuracy it was checked "
            "for does not hold; tune it again"
        )

    def to_dict(self) -> dict[str, Any]:
        state = super().to_dict()
        state["quantized"] = {
            "sha256": self._digest, "device_type": self._digest_device, "torchao": self._digest_torchao,
        }  # fmt: skip
        state["kept_full_precision"] = list(self.kept)
        return state

    @classmethod
    def from_dict(cls, state_dict: dict[str, Any]) -> "TorchAOBackend":
        backend = super().from_dict(state_dict)
        quantized = state_dict.get("quantized") or {}
        if not isinstance(quantized, dict):
            raise ValueError(f"{cls.__name__}: state entry 'quantized' must be a mapping, got {quantized!r}")
        backend._digest, backend._digest_device = quantized.get("sha256"), quantized.get("device_type")
        backend._digest_torchao = quantized.get("torchao")
        kept = state_dict.get("kept_full_precision") or []
        if not isinstance(kept, list) or not all(isinstance(n, str) and n for n in kept):
            raise ValueError(f"{cls.__name__}: state entry 'kept_full_precision' must be a list of layer names, got {kept!r}")
        backend.kept = list(kept)
        return backend
