"""What a sweep tunes: its models (each with its inputs or sample factory) and its candidates.

Each factory and backend a spec names is imported and checked here, before anything starts.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PositiveInt, ValidationInfo, field_validator, model_validator

from aitune.canonical import CanonicalError, canonicalize, dtype_name
from aitune.deploy_root import model_name_problem
from aitune.torch.backend.registry import (
    InvalidBackendError,
    UnknownBackendError,
    config_class_of,
    get_backend_class,
    make_backend,
)
from aitune.torch.module_ref import ImportPathError, import_object
from orchestrator.spec import axes as axes_spec
from orchestrator.spec import checks
from orchestrator.spec.accuracy import GatesSpec
from orchestrator.spec.axes import AxisName, AxisSpec, OutputAxes, SampleAxisSpec, Traffic
from orchestrator.spec.strict import Name, Strict


def _config_class(backend: str) -> type | None:
    """The config dataclass of a backend, by name or import path (None: it takes no config)."""
    return config_class_of(get_backend_class(backend))


def _check_import(path: str) -> Any:
    try:
        obj = import_object(path)
    except ImportPathError as exc:
        raise ValueError(str(exc)) from None
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable")
    return obj


def _model_name(value: str) -> str:
    """A model's name is a folder of the deploy root: the deploy root's own rule (aitune.deploy_root)."""
    problem = model_name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


class InputSpec(Strict):
    """One input tensor. ``shape`` excludes the batch axis, which is inserted at ``batch_axis``; an
    entry may name an axis that varies (``seq``), declared in ``dynamic`` (spec/axes.py)."""

    name: Name | None = None
    shape: list[PositiveInt | AxisName] = Field(default_factory=list)
    batch_axis: int = 0
    dtype: str = "float32"
    #: floats: uniform in [low, high); default standard normal. (A list in JSON: not strict.)
    range: tuple[float, float] | None = Field(default=None, strict=False)
    #: integers (token ids, masks): uniform in [low, high)
    int_range: tuple[int, int] | None = Field(default=None, strict=False)
    #: pass as a keyword argument named ``name``
    kwarg: bool = False
    #: the axes of ``shape`` that vary: {axis: {buckets, pad}}
    dynamic: dict[AxisName, AxisSpec] | None = None

    @field_validator("range", "int_range", mode="before")
    @classmethod
    def _pair_items(cls, value: Any, info: ValidationInfo) -> Any:
        # strict=False on the pair lets a JSON list in; its items must still be real numbers.
        kinds, words = ((int, float), "numbers") if info.field_name == "range" else (int, "integers")
        for item in value if isinstance(value, (list, tuple)) else ():
            if isinstance(item, bool) or not isinstance(item, kinds):
                raise ValueError(f"expected a list [low, high] of {words}, got {checks.describe(list(value))}")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        name = dtype_name(value)
        if name not in checks.SAMPLE_DTYPES:
            allowed = ", ".join(checks.SAMPLE_DTYPES)
            raise ValueError(f"dtype {name!r} is not one the sample maker can make; allowed: {allowed}")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> "InputSpec":
        problems: checks.Problems = []
        if not 0 <= self.batch_axis <= len(self.shape):
            problems.append((("batch_axis",), f"batch_axis {self.batch_axis} is outside 0..{len(self.shape)}"))
        floating = self.dtype in checks.FLOAT_DTYPES
        if self.int_range is not None and floating:
            problems.append((("int_range",), f"int_range is for integer inputs, but dtype is {self.dtype}"))
        if self.range is not None and not floating:
            problems.append((("range",), f"range is for floating inputs, but dtype is {self.dtype}; use int_range"))
        for name, r in (("range", self.range), ("int_range", self.int_range)):
            if r is not None and not r[0] < r[1]:
                problems.append(((name,), f"{name} must be (low, high) with low < high, got {list(r)}"))
        if not problems and self.int_range is not None:
            problem = checks.int_range_problem(self.dtype, *self.int_range)
            problems += [(("int_range",), problem)] if problem else []
        if not problems and self.range is not None:
            problem = checks.float_range_problem(self.dtype, *self.range)
            problems += [(("range",), problem)] if problem else []
        if self.kwarg and not self.name:
            problems.append((("name",), "a keyword input needs a name"))
        problems += axes_spec.input_axis_problems(self.shape, self.dynamic, self.dtype)
        if problems:
            raise checks.problems_error(problems)
        return self


class ModelSpec(Strict):
    #: one folder of the deploy root: letters, digits, '.', '_' and '-' (aitune.deploy_root.MODEL_NAME_RULE)
    name: Annotated[str, AfterValidator(_model_name)]
    #: import path of a function (or class) returning the ``torch.nn.Module``: ``package.module:function``
    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InputSpec] | None = None
    #: import path of ``f(batch_size: int, seed: int) -> aitune.Sample`` (instead of ``inputs``);
    #: with ``dynamic``, also ``lengths={axis: size}``
    sample_factory: str | None = None
    #: a sample factory's axes that vary: {axis: {buckets, pad}} (inputs declare theirs themselves)
    dynamic: dict[AxisName, SampleAxisSpec] | None = None
    #: the share of calls at each length, per axis (default: uniform over the buckets)
    traffic: Traffic | None = Field(default=None, strict=False)
    #: outputs that follow an axis, {axis: {output path: dimension}} (default: traced from two lengths)
    output_axes: OutputAxes | None = None
    #: the check samples' seed; at most 2**40, so that the per-batch seed the samples are drawn
    #: with (seed x 1,000,003 + batch) fits torch's 64-bit generator seed
    seed: int = Field(default=0, ge=0, le=2**40)
    #: this model's batch sizes, instead of the sweep's
    batch_sizes: list[PositiveInt] | Literal["auto"] | None = Field(default=None, min_length=1)
    #: the largest batch size ``batch_sizes: auto`` tries for this model (None: the sweep's)
    max_batch: PositiveInt | None = None
    #: "decisions": tune only the family's top-k candidates when another member was tuned
    #: fully (same architecture, graph spec and device class); None: the sweep's setting
    reuse: Literal["none", "decisions"] | None = None

    @field_validator("factory")
    @classmethod
    def _factory(cls, value: str) -> str:
        problem = checks.model_factory_problem(_check_import(value), value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("sample_factory")
    @classmethod
    def _sample_factory(cls, value: str | None) -> str | None:
        if value is None:
            return None
        obj = _check_import(value)
        # one that needs the lengths is checked for them with its axes (``_axis_problems``)
        problem = checks.sample_factory_problem(obj, value) or checks.signature_problem(obj, value, batch_size=1, seed=0)
        if problem and checks.signature_problem(obj, value, batch_size=1, seed=0, lengths={}) is None:
            problem = None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("traffic", mode="before")
    @classmethod
    def _length_keys(cls, value: Any) -> Any:
        # A JSON (or a stored spec's) mapping has string keys: "64" is the length 64.
        if isinstance(value, dict):
            return {axis: {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in mix.items()}
                    if isinstance(mix, dict) else mix for axis, mix in value.items()}
        return value

    @field_validator("kwargs")
    @classmethod
    def _plain_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:  # checkpoints record them as canonical JSON: a date, a set or a NaN would fail there
            canonicalize(value, "kwargs")
        except CanonicalError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSpec":
        problems: checks.Problems = []
        problem = checks.signature_problem(import_object(self.factory), self.factory, **self.kwargs)
        if problem:
            problems.append((("kwargs",), problem))
        if (self.inputs is None) == (self.sample_factory is None):
            problems.append(((), "give exactly one of 'inputs' (a list of input specs) or 'sample_factory'"))
        if self.inputs is not None and not self.inputs:
            problems.append((("inputs",), "inputs must list at least one input"))
        seen: set[str] = set()
        for i, inp in enumerate(self.inputs or []):
            if inp.name is not None and inp.name in seen:
                problems.append((("inputs", i, "name"),
                                 f"input name {inp.name!r} is used twice; each input needs its own"))
            seen.add(inp.name)
        if isinstance(self.batch_sizes, list) and len(set(self.batch_sizes)) != len(self.batch_sizes):
            problems.append((("batch_sizes",), f"batch_sizes repeat a value: {self.batch_sizes}"))
        problems += self._axis_problems()
        if problems:
            raise checks.problems_error(problems)
        return self

    def _axis_problems(self) -> checks.Problems:
        problems: checks.Problems = []
        if self.dynamic and self.sample_factory is None:
            problems.append((("dynamic",), "'dynamic' at the model is for a sample_factory's axes; "
                                           "inputs declare theirs in their own 'dynamic'"))
        if self.dynamic and self.sample_factory:
            problem = axes_spec.sample_factory_takes_lengths(import_object(self.sample_factory), self.sample_factory)
            if problem:
                problems.append((("sample_factory",), f"{problem} (an axis that varies passes lengths=)"))
            for name, axis in self.dynamic.items():
                problem = axes_spec.buckets_problem(axis.buckets)
                if problem:
                    problems.append((("dynamic", name, "buckets"), problem))
        found, more = axes_spec.model_axes(self.inputs, self.dynamic)
        problems += more + axes_spec.traffic_problems(self.traffic, found)
        for name in self.output_axes or {}:
            if name not in found:
                problems.append((("output_axes", name), f"unknown axis {name!r}; the model's axes: {', '.join(found) or 'none'}"))
        return problems

    def axes(self) -> dict[str, list[int]]:
        """Each axis that varies and its buckets (empty: every shape is fixed)."""
        return axes_spec.model_axes(self.inputs, self.dynamic)[0]

    def points(self) -> list[dict[str, int]]:
        """Every combination of buckets ([{}] for a model whose shapes are fixed)."""
        found = self.axes()
        return [dict(zip(found, combo)) for combo in itertools.product(*found.values())]

    def traffic_weights(self) -> dict[str, dict[int, float]]:
        return axes_spec.traffic_weights(self.traffic, self.axes())


class CandidateSpec(Strict):
    backend: str
    config: dict[str, Any] = Field(default_factory=dict)
    #: this candidate's accuracy gates (spec/accuracy.py), over the sweep's ``accuracy`` section
    accuracy: GatesSpec | None = None

    @field_validator("backend")
    @classmethod
    def _known(cls, value: str) -> str:
        try:
            _config_class(value)
        except (UnknownBackendError, InvalidBackendError) as exc:
            raise ValueError(str(exc)) from None
        except ImportError as exc:  # a known backend whose library is missing here
            raise ValueError(f"backend {value!r} can't be imported here: {exc}") from None
        return value

    @model_validator(mode="after")
    def _config_fields(self) -> "CandidateSpec":
        config_class = _config_class(self.backend)
        if config_class is not None:
            problems = checks.config_problems(config_class, self.config)
            if problems:
                raise checks.problems_error([(("config",) + loc, message) for loc, message in problems])
        try:  # the config's own rules, now that every field has its type; and the backend itself
            make_backend(self.backend, self.config)
        except (TypeError, ValueError) as exc:  # make_backend's own errors name the backend already
            message = str(exc) if isinstance(exc, InvalidBackendError) else f"config of {self.backend}: {exc}"
            raise checks.problems_error([(("config",), message)]) from None
        return self

    def make_config(self):
        """The config object; None for a backend that takes no config."""
        config_class = _config_class(self.backend)
        return config_class.from_dict(dict(self.config)) if config_class is not None else None
