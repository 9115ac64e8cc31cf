"""The sweep spec: what to tune, how, and where the winner goes. Validated with pydantic.

A bad spec fails before anything starts, with the field path and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator, model_validator

from aitune.canonical import dtype_name
from aitune.torch.backend.registry import InvalidBackendError, UnknownBackendError, config_class_of, get_backend_class, make_backend
from aitune.torch.module_ref import ImportPathError, import_object


class SpecError(ValueError):
    """The spec is invalid; the message lists every problem with its field path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_import(path: str) -> str:
    try:
        obj = import_object(path)
    except ImportPathError as exc:
        raise ValueError(str(exc)) from None
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable")
    return path


class InputSpec(_Strict):
    """One input tensor. ``shape`` excludes the batch axis, which is inserted at ``batch_axis``."""

    name: str | None = None
    shape: list[PositiveInt] = Field(default_factory=list)
    batch_axis: int = 0
    dtype: str = "float32"
    #: floats: uniform in [low, high); default standard normal
    range: tuple[float, float] | None = None
    #: integers (token ids, masks): uniform in [low, high)
    int_range: tuple[int, int] | None = None
    #: pass as a keyword argument named ``name``
    kwarg: bool = False

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        return dtype_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> "InputSpec":
        if not 0 <= self.batch_axis <= len(self.shape):
            raise ValueError(f"batch_axis {self.batch_axis} is outside 0..{len(self.shape)}")
        floating = self.dtype in ("float32", "float16", "bfloat16", "float64")
        if self.int_range is not None and floating:
            raise ValueError(f"int_range is for integer inputs, but dtype is {self.dtype}")
        if self.range is not None and not floating:
            raise ValueError(f"range is for floating inputs, but dtype is {self.dtype}; use int_range")
        for name, r in (("range", self.range), ("int_range", self.int_range)):
            if r is not None and not r[0] < r[1]:
                raise ValueError(f"{name} must be (low, high) with low < high, got {list(r)}")
        if self.kwarg and not self.name:
            raise ValueError("a keyword input needs a name")
        return self


class ModelSpec(_Strict):
    name: str = Field(min_length=1)
    #: import path of a function (or class) returning the ``torch.nn.Module``: ``package.module:function``
    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InputSpec] | None = None
    #: import path of ``f(batch_size: int, seed: int) -> aitune.Sample`` (instead of ``inputs``)
    sample_factory: str | None = None
    seed: int = 0
    #: this model's batch sizes, instead of the sweep's
    batch_sizes: list[PositiveInt] | None = None

    @field_validator("factory")
    @classmethod
    def _factory(cls, value: str) -> str:
        return _check_import(value)

    @field_validator("sample_factory")
    @classmethod
    def _sample_factory(cls, value: str | None) -> str | None:
        return None if value is None else _check_import(value)

    @model_validator(mode="after")
    def _one_input_source(self) -> "ModelSpec":
        if (self.inputs is None) == (self.sample_factory is None):
            raise ValueError("give exactly one of 'inputs' (a list of input specs) or 'sample_factory'")
        if self.inputs is not None and not self.inputs:
            raise ValueError("inputs must list at least one input")
        return self


class CandidateSpec(_Strict):
    backend: str
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("backend")
    @classmethod
    def _known(cls, value: str) -> str:
        try:
            get_backend_class(value)
        except (UnknownBackendError, InvalidBackendError) as exc:
            raise ValueError(str(exc)) from None
        except ImportError as exc:  # a known backend whose library is missing here
            raise ValueError(f"backend {value!r} can't be imported here: {exc}") from None
        return value

    @model_validator(mode="after")
    def _config_fields(self) -> "CandidateSpec":
        try:
            make_backend(self.backend, self.config)
        except InvalidBackendError as exc:  # names the backend and the field
            raise ValueError(str(exc)) from None
        return self

    def make_config(self):
        """The config object; None for a backend that takes no config."""
        config_class = config_class_of(get_backend_class(self.backend))
        return config_class.from_dict(dict(self.config)) if config_class is not None else None


class ToleranceSpec(_Strict):
    atol: float | None = Field(default=None, ge=0)
    rtol: float | None = Field(default=None, ge=0)


class BudgetSpec(_Strict):
    #: seconds for loading the model and building one candidate
    build_timeout_s: PositiveFloat = 900.0
    #: seconds for checking, measuring and saving one candidate
    measure_timeout_s: PositiveFloat = 300.0
    #: seconds for the whole sweep; candidates not started by then are recorded as skipped
    total_s: PositiveFloat | None = None


class MeasureSpec(_Strict):
    budget_s: PositiveFloat = 1.0
    target_rel_ci: PositiveFloat = 0.02
    warmup_iters: PositiveInt = 5
    min_iters: PositiveInt = 10


class WorkersSpec(_Strict):
    #: CPU worker slots where there is no GPU (default: up to 4, sized to the machine)
    cpu_slots: PositiveInt | None = None
    threads_per_slot: PositiveInt | None = None
    use_gpus: bool = True
    #: recycle a worker (fresh process) when a candidate leaves more than this behind;
    #: default: 256 MB of GPU memory on GPUs, off on CPUs (resident memory there is noisy)
    recycle_margin_mb: PositiveFloat | None = None


class DeploySpec(_Strict):
    #: "all_gpus", {"gpus": N}, {"cpu_slots": N}, {"accelerator_type": "H200"}; empty: no deploy
    targets: list[str | dict[str, int | str]] = Field(default_factory=list)
    #: seconds of latency measurement on each target
    latency_check_s: PositiveFloat = 0.3

    @field_validator("targets")
    @classmethod
    def _forms(cls, targets):
        for t in targets:
            key = next(iter(t)) if isinstance(t, dict) and len(t) == 1 else None
            if not (t == "all_gpus" or key in ("gpus", "cpu_slots", "accelerator_type")):
                raise ValueError(
                    f"deploy target {t!r} is not one of 'all_gpus', {{gpus: N}}, {{cpu_slots: N}}, {{accelerator_type: NAME}}"
                )
            value = t[key] if key else None
            if key in ("gpus", "cpu_slots") and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"deploy target {t!r} must ask for a positive number")
            if key == "accelerator_type" and (not isinstance(value, str) or not value):
                raise ValueError(f"deploy target {t!r} must name an accelerator type, e.g. H200")
        return targets


class SweepSpec(_Strict):
    name: str = "sweep"
    models: list[ModelSpec] = Field(min_length=1)
    batch_sizes: list[PositiveInt] = Field(min_length=1)
    #: None: the default candidate set for each device class (CPU or GPU)
    candidates: list[CandidateSpec] | None = None
    objective: Literal["min_latency", "max_throughput", "latency_budget"] = "min_latency"
    latency_budget_ms: PositiveFloat | None = None
    #: per precision ("float32", "float16"...): atol and/or rtol
    tolerances: dict[str, ToleranceSpec] = Field(default_factory=dict)
    budgets: BudgetSpec = Field(default_factory=BudgetSpec)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    store: str = "store"
    deploy: DeploySpec = Field(default_factory=DeploySpec)

    @model_validator(mode="after")
    def _objective(self) -> "SweepSpec":
        if self.objective == "latency_budget" and self.latency_budget_ms is None:
            raise ValueError("objective latency_budget needs latency_budget_ms")
        if self.latency_budget_ms is not None and self.objective != "latency_budget":
            raise ValueError("latency_budget_ms is only used with objective latency_budget")
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {dupes}")
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            raise ValueError(f"batch_sizes repeat a value: {self.batch_sizes}")
        return self

    def strategy(self):
        from aitune.strategy import Strategy

        return Strategy(self.objective, self.latency_budget_ms)

    def tolerance_overrides(self) -> dict[str, dict[str, float]]:
        return {k: v.model_dump(exclude_none=True) for k, v in self.tolerances.items()}

    def batches_of(self, model: ModelSpec) -> list[int]:
        return list(model.batch_sizes or self.batch_sizes)

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid sweep spec {source}:"]
    for err in exc.errors():
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif err["type"] == "missing":
            message = "missing required field"
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "<dict>") -> SweepSpec:
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc, source)) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read a YAML or JSON spec; relative store paths stay relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"sweep spec {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError(f"sweep spec {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    return parse_spec(data, str(path))
