"""The sweep spec: what to tune, how, and where the winner goes. Validated with pydantic.

A bad spec fails before anything starts (Ray, workers), listing every problem with its field
path and what was expected. Fields are strict: a number is not a string or a boolean, a boolean
is not the string "false", and no float is NaN or infinite.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from aitune.canonical import CanonicalError, canonicalize, dtype_name
from aitune.check import DEFAULT_TOLERANCES, tolerance_for
from aitune.measure import WARMUP_MAX_ITERS, MeasureConfig
from aitune.torch.backend.registry import (
    InvalidBackendError,
    UnknownBackendError,
    config_class_of,
    get_backend_class,
    make_backend,
)
from aitune.torch.module_ref import ImportPathError, import_object
from aitune.torch.precision import ALIASES as PRECISION_ALIASES
from orchestrator.spec import checks
from orchestrator.spec.reader import SpecStructureError, SpecSyntaxError, read_spec_text


class SpecError(ValueError):
    """The spec is invalid; the message lists every problem with its field path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


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


def _plain_name(value: str) -> str:
    if not value.strip():
        raise ValueError("a name can't be empty or only whitespace")
    if checks.has_control_characters(value):
        raise ValueError(f"name {value!r} has control characters; use printable characters")
    return value


Name = Annotated[str, AfterValidator(_plain_name)]


def _model_name(value: str) -> str:
    """A model's name is a folder of the deploy root: the deploy root's own rule (aitune.deploy_root)."""
    from aitune.deploy_root import model_name_problem

    problem = model_name_problem(value)
    if problem:
        raise ValueError(problem)
    return value


class InputSpec(_Strict):
    """One input tensor. ``shape`` excludes the batch axis, which is inserted at ``batch_axis``."""

    name: Name | None = None
    shape: list[PositiveInt] = Field(default_factory=list)
    batch_axis: int = 0
    dtype: str = "float32"
    #: floats: uniform in [low, high); default standard normal. (A list in JSON: not strict.)
    range: tuple[float, float] | None = Field(default=None, strict=False)
    #: integers (token ids, masks): uniform in [low, high)
    int_range: tuple[int, int] | None = Field(default=None, strict=False)
    #: pass as a keyword argument named ``name``
    kwarg: bool = False

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
            raise ValueError(f"dtype {name!r} is not one the sample maker can make; allowed: {', '.join(checks.SAMPLE_DTYPES)}")
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
        if problems:
            raise checks.problems_error(problems)
        return self


class ModelSpec(_Strict):
    #: one folder of the deploy root: letters, digits, '.', '_' and '-' (aitune.deploy_root.MODEL_NAME_RULE)
    name: Annotated[str, AfterValidator(_model_name)]
    #: import path of a function (or class) returning the ``torch.nn.Module``: ``package.module:function``
    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InputSpec] | None = None
    #: import path of ``f(batch_size: int, seed: int) -> aitune.Sample`` (instead of ``inputs``)
    sample_factory: str | None = None
    #: the check samples' seed; at most 2**40, so that the per-batch seed the samples are drawn
    #: with (seed x 1,000,003 + batch) fits torch's 64-bit generator seed
    seed: int = Field(default=0, ge=0, le=2**40)
    #: this model's batch sizes, instead of the sweep's
    batch_sizes: list[PositiveInt] | None = Field(default=None, min_length=1)
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
        problem = checks.sample_factory_problem(obj, value) or checks.signature_problem(obj, value, batch_size=1, seed=0)
        if problem:
            raise ValueError(problem)
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
                problems.append((("inputs", i, "name"), f"input name {inp.name!r} is used twice; each input needs its own"))
            seen.add(inp.name)
        if self.batch_sizes is not None and len(set(self.batch_sizes)) != len(self.batch_sizes):
            problems.append((("batch_sizes",), f"batch_sizes repeat a value: {self.batch_sizes}"))
        if problems:
            raise checks.problems_error(problems)
        return self


class CandidateSpec(_Strict):
    backend: str
    config: dict[str, Any] = Field(default_factory=dict)

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


def _precision(name: str) -> str | None:
    """The checker's name for a tolerance key ("fp16" -> "float16"); None if it knows none."""
    try:
        tolerance = tolerance_for(name)
    except ValueError:
        return None
    # tolerance_for hands back the default object itself, which tells which precision it is.
    return next((k for k, v in DEFAULT_TOLERANCES.items() if v is tolerance), name)


def _known_precision(key: str) -> str:
    if _precision(key) is None:
        aliases = ", ".join(a for a in PRECISION_ALIASES if _precision(a))
        raise ValueError(f"{key!r} is not a precision the checker knows; allowed: {', '.join(DEFAULT_TOLERANCES)} (or {aliases})")
    return key


Precision = Annotated[str, AfterValidator(_known_precision)]


class ToleranceSpec(_Strict):
    atol: float | None = Field(default=None, ge=0)
    rtol: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _something(self) -> "ToleranceSpec":
        if self.atol is None and self.rtol is None:
            raise ValueError("give atol, rtol or both")
        return self


class BudgetSpec(_Strict):
    #: seconds for loading the model and building one candidate
    build_timeout_s: PositiveFloat = 900.0
    #: seconds for checking, measuring and saving one candidate
    measure_timeout_s: PositiveFloat = 300.0
    #: seconds for the whole sweep; candidates not started by then are recorded as skipped
    total_s: PositiveFloat | None = None


# The worker measures with MeasureConfig's default max_iters, which min_iters may not exceed.
_MAX_ITERS = MeasureConfig().max_iters


class MeasureSpec(_Strict):
    """Passed to ``aitune.measure.MeasureConfig`` in every worker: its rules, checked here."""

    budget_s: PositiveFloat = 1.0
    #: stop when the median's 95% confidence half-width is this fraction of the median
    target_rel_ci: float = Field(default=0.02, gt=0, lt=1)
    warmup_iters: int = Field(default=5, ge=0)
    min_iters: PositiveInt = 10
    #: "node": one worker per node measures at a time while the others build (not part of the
    #: evaluation key: it changes how quietly a measurement is taken, not what is measured)
    exclusive: Literal["node"] | None = None

    @field_validator("warmup_iters")
    @classmethod
    def _warmup(cls, value: int) -> int:
        if value > WARMUP_MAX_ITERS:
            raise ValueError(f"warm-up stops at {WARMUP_MAX_ITERS} iterations whatever is asked; give 0 to {WARMUP_MAX_ITERS}")
        return value

    @field_validator("min_iters")
    @classmethod
    def _min_iters(cls, value: int) -> int:
        if value > _MAX_ITERS:
            raise ValueError(f"min_iters {value} is above the {_MAX_ITERS} iterations a measurement may take; give 1 to {_MAX_ITERS}")
        return value


class DecisionSpec(_Strict):
    """How each group's winner is decided (``aitune.decision``): its contenders and eager fp32 in
    interleaved rounds, on one worker, until the answer is known or the cap is reached."""

    #: seconds of rounds per group, past ``min_rounds``
    cap_s: PositiveFloat = 30.0
    #: rounds (timed calls of every contender) before anything is decided, whatever the cap
    min_rounds: int = Field(default=10, ge=3)
    max_rounds: int = Field(default=1000, ge=3)
    #: of each comparison (Bonferroni-corrected for the number of contenders)
    confidence: float = Field(default=0.95, ge=0.5, lt=1)
    #: two candidates whose time ratio's interval lies within 1 +- tie are a declared tie
    tie: float = Field(default=0.03, gt=0, lt=0.5)
    #: a win must also be at least this much faster (relative)
    min_gain: float = Field(default=0.02, ge=0, lt=0.5)
    #: screening: candidates slower than reach x the best first measurement are not compared again
    #: (reach_disturbed where that measurement ran beside a build on its node)
    reach: float = Field(default=2.5, ge=1)
    reach_disturbed: float = Field(default=5.0, ge=1)
    #: contenders compared at most per group (eager fp32 comes on top)
    most: PositiveInt = 6

    @model_validator(mode="after")
    def _ordered(self) -> "DecisionSpec":
        problems: checks.Problems = []
        if self.min_rounds > self.max_rounds:
            problems.append((("min_rounds",), f"min_rounds {self.min_rounds} is above max_rounds {self.max_rounds}"))
        if self.reach > self.reach_disturbed:
            problems.append((("reach_disturbed",), f"reach_disturbed {self.reach_disturbed} is below reach {self.reach}"))
        if problems:
            raise checks.problems_error(problems)
        return self

    def rule(self):
        from aitune.decision import DecisionRule

        return DecisionRule(**self.model_dump())


class WorkersSpec(_Strict):
    #: CPU worker slots where there is no GPU (default: up to 4, sized to the machine)
    cpu_slots: PositiveInt | None = None
    threads_per_slot: PositiveInt | None = None
    use_gpus: bool = True
    #: recycle a worker (fresh process) when a candidate leaves more than this behind;
    #: default: 256 MB of GPU memory on GPUs, off on CPUs (resident memory there is noisy)
    recycle_margin_mb: PositiveFloat | None = None
    #: bytes of models and references each worker keeps loaded (least recently used go first);
    #: default: a quarter of host memory shared by the slots on CPUs, half the device's memory on GPUs
    model_cache_mb: PositiveFloat | None = None


class DeploySpec(_Strict):
    #: "all_gpus", {"gpus": N}, {"cpu_slots": N}, {"accelerator_type": "H200"}; empty: no deploy
    targets: list[str | dict[str, Any]] = Field(default_factory=list)
    #: seconds of latency measurement on each target
    latency_check_s: PositiveFloat = 0.3
    #: where each target node installs the verified winners (aitune.deploy_root); None: the
    #: user's cache directory on that node ($XDG_CACHE_HOME/aitune/deploy, ~/.cache/aitune/deploy)
    root: str | None = None
    #: after deploying, serve the winners with Ray Serve (``python -m orchestrator serve``)
    serve: bool = False

    @field_validator("root")
    @classmethod
    def _root(cls, root):
        # relative to where the driver runs (its targets get the same absolute path)
        if root is None:
            return None
        if not root.strip():
            raise ValueError("deploy.root must name a directory (it is empty); leave it out for ~/.cache/aitune/deploy")
        from aitune.deploy_root import root_problem

        problem = root_problem(root)  # a system folder, a file
        if problem:
            raise ValueError(problem)
        return os.path.abspath(os.path.expanduser(root))

    @field_validator("targets")
    @classmethod
    def _forms(cls, targets):
        problems: checks.Problems = []
        for i, t in enumerate(targets):
            key = next(iter(t)) if isinstance(t, dict) and len(t) == 1 else None
            value = t[key] if key else None
            if not (t == "all_gpus" or key in ("gpus", "cpu_slots", "accelerator_type")):
                problems.append(((i,), f"deploy target {t!r} is not one of 'all_gpus', {{gpus: N}}, {{cpu_slots: N}}, {{accelerator_type: NAME}}"))
            elif key in ("gpus", "cpu_slots") and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                problems.append(((i,), f"deploy target {t!r} must ask for a positive number"))
            elif key == "accelerator_type" and (not isinstance(value, str) or not value.strip()):
                problems.append(((i,), f"deploy target {t!r} must name an accelerator type, e.g. H200"))
        if problems:
            raise checks.problems_error(problems)
        return targets


def _sweep_name(value: str) -> str:
    _plain_name(value)
    if "/" in value:
        raise ValueError(f"sweep name {value!r} has a '/'; use a plain name")
    return value


def _store_path(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _store(value: str) -> str:
    if not value.strip():
        raise ValueError("store must name a directory (it is empty)")
    return value


class SweepSpec(_Strict):
    name: Annotated[str, AfterValidator(_sweep_name)] = "sweep"
    models: list[ModelSpec] = Field(min_length=1)
    batch_sizes: list[PositiveInt] = Field(min_length=1)
    #: None: the default candidate set for each device class (CPU or GPU)
    candidates: list[CandidateSpec] | None = None
    objective: Literal["min_latency", "max_throughput", "latency_budget"] = "min_latency"
    latency_budget_ms: PositiveFloat | None = None
    #: per precision ("float32", "float16"...): atol and/or rtol
    tolerances: dict[Precision, ToleranceSpec] = Field(default_factory=dict)
    budgets: BudgetSpec = Field(default_factory=BudgetSpec)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    decision: DecisionSpec = Field(default_factory=DecisionSpec)
    workers: WorkersSpec = Field(default_factory=WorkersSpec)
    store: Annotated[str, BeforeValidator(_store_path), AfterValidator(_store)] = "store"
    deploy: DeploySpec = Field(default_factory=DeploySpec)
    #: "decisions": models of one family (architecture, graph spec, device class) after the first
    #: build only the family's top ``reuse_top_k`` candidates; a model's own ``reuse`` wins
    reuse: Literal["none", "decisions"] = "none"
    reuse_top_k: PositiveInt = 3

    @field_validator("tolerances")
    @classmethod
    def _one_key_per_precision(cls, tolerances: dict[str, ToleranceSpec]) -> dict[str, ToleranceSpec]:
        problems: checks.Problems = []
        first: dict[str, str] = {}
        for key in tolerances:
            precision = _precision(key)
            if precision in first:
                problems.append(((key,), f"{key!r} and {first[precision]!r} are both {precision}; give it once"))
            first.setdefault(precision, key)
        if problems:
            raise checks.problems_error(problems)
        return tolerances

    @model_validator(mode="after")
    def _across_fields(self) -> "SweepSpec":
        problems: checks.Problems = []
        if self.objective == "latency_budget" and self.latency_budget_ms is None:
            problems.append((("latency_budget_ms",), "objective latency_budget needs latency_budget_ms"))
        if self.latency_budget_ms is not None and self.objective != "latency_budget":
            problems.append((("latency_budget_ms",), f"latency_budget_ms is only used with objective latency_budget, not {self.objective}"))
        first: dict[str, int] = {}
        for i, m in enumerate(self.models):
            if m.name in first:
                problems.append((("models", i, "name"), f"model names must be unique; {m.name!r} is also models[{first[m.name]}]"))
            first.setdefault(m.name, i)
        if len(set(self.batch_sizes)) != len(self.batch_sizes):
            problems.append((("batch_sizes",), f"batch_sizes repeat a value: {self.batch_sizes}"))
        problems += self._memory_problems()
        if problems:
            raise checks.problems_error(problems)
        return self

    def _memory_problems(self) -> checks.Problems:
        """Inputs that could not be allocated at the largest batch size, on this machine."""
        total = checks.host_memory_bytes()
        problems: checks.Problems = []
        for i, m in enumerate(self.models):
            batch = max(self.batches_of(m))
            for j, inp in enumerate(m.inputs or []):
                problem = checks.memory_problem(batch, inp.shape, inp.dtype, total)
                if problem:
                    problems.append((("models", i, "inputs", j), problem))
        return problems

    def strategy(self):
        from aitune.strategy import Strategy

        return Strategy(self.objective, self.latency_budget_ms)

    def tolerance_overrides(self) -> dict[str, dict[str, float]]:
        return {k: v.model_dump(exclude_none=True) for k, v in self.tolerances.items()}

    def batches_of(self, model: ModelSpec) -> list[int]:
        return list(model.batch_sizes or self.batch_sizes)

    def reuse_of(self, model: ModelSpec) -> str:
        return model.reuse or self.reuse

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


# Pydantic's words for a wrong type, said as what was expected.
_EXPECTED = {
    "bool_type": "a boolean", "int_type": "an integer", "float_type": "a number", "string_type": "a string",
    "dict_type": "a mapping", "list_type": "a list", "tuple_type": "a list", "model_type": "a mapping",
    "int_from_float": "an integer", "finite_number": "a finite number",
}


def _path(loc) -> str:
    if loc and loc[-1] == "[key]":  # pydantic's mark for a dict key (not its value) that failed
        loc = loc[:-1]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid sweep spec {source}:"]
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif err["type"] == "missing":
            message = "missing required field"
        elif err["type"] in _EXPECTED:
            message = f"expected {_EXPECTED[err['type']]}, got {checks.describe(err['input'])}"
        lines.append(f"  {_path(err['loc'])}: {message}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "<dict>") -> SweepSpec:
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc, source)) from None


def read_spec_file(path: str | Path) -> Any:
    """One spec file's plain data, refusing what YAML or JSON would silently accept."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"sweep spec {path} is a directory, not a spec file: name its spec files (e.g. {path}/*.yaml)")
    if not path.is_file():
        raise SpecError(f"sweep spec {path} does not exist")
    try:
        data = read_spec_text(path.read_text(encoding="utf-8"), is_json=path.suffix == ".json")
    except UnicodeDecodeError as exc:
        raise SpecError(f"sweep spec {path} is not UTF-8 text: {exc}") from None
    except SpecSyntaxError as exc:
        raise SpecError(f"sweep spec {path} is {exc}") from None
    except SpecStructureError as exc:
        raise SpecError("\n".join([f"invalid sweep spec {path}:"] + [f"  {_path(loc)}: {m}" for loc, m in exc.problems])) from None
    return data
