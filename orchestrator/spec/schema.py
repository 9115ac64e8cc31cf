"""The sweep spec: what to tune, how, and where the winner goes. Validated with pydantic.

A bad spec fails before anything starts (Ray, workers), listing every problem with its field
path and what was expected. Fields are strict (``strict``); what is tuned is in ``models``, the
spec's other sections in ``sections``; this module holds the whole and reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from aitune.accuracy import Gates
from aitune.strategy import Strategy
from orchestrator.spec import checks
from orchestrator.spec.accuracy import AccuracySpec, GatesSpec
from orchestrator.spec.axes import shape_at
from orchestrator.spec.models import CandidateSpec, InputSpec, ModelSpec
from orchestrator.spec.reader import SpecStructureError, SpecSyntaxError, read_spec_text
from orchestrator.spec.sections import (
    BudgetSpec,
    DecisionSpec,
    DeploySpec,
    LatencyTargetSpec,
    MeasureSpec,
    Precision,
    ServingSearchSpec,
    ToleranceSpec,
    WorkersSpec,
    precision_of,
)
from orchestrator.spec.strict import Strict, plain_name

__all__ = [
    "AccuracySpec", "GatesSpec",
    "BudgetSpec", "CandidateSpec", "DecisionSpec", "DeploySpec", "InputSpec", "LatencyTargetSpec", "MeasureSpec",
    "ModelSpec", "ServingSearchSpec", "SpecError",
    "SweepSpec", "ToleranceSpec", "WorkersSpec", "parse_spec", "read_spec_file",
]


class SpecError(ValueError):
    """The spec is invalid; the message lists every problem with its field path."""


def _sweep_name(value: str) -> str:
    plain_name(value)
    if "/" in value:
        raise ValueError(f"sweep name {value!r} has a '/'; use a plain name")
    return value


def _store_path(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _store(value: str) -> str:
    if not value.strip():
        raise ValueError("store must name a directory (it is empty)")
    return value


class SweepSpec(Strict):
    name: Annotated[str, AfterValidator(_sweep_name)] = "sweep"
    models: list[ModelSpec] = Field(min_length=1)
    #: the batch sizes tuned; "auto": searched, powers of two from 1 until throughput gains under
    #: 5% twice, up to ``max_batch`` (orchestrator.sweep.batch_search)
    batch_sizes: list[PositiveInt] | Literal["auto"] = Field(min_length=1)
    #: the largest batch size ``batch_sizes: auto`` tries
    max_batch: PositiveInt = 64
    #: None: the default candidate set for each device class (CPU or GPU)
    candidates: list[CandidateSpec] | None = None
    objective: Literal["min_latency", "max_throughput", "latency_budget"] = "min_latency"
    latency_budget_ms: PositiveFloat | None = None
    #: with max_throughput: the serving settings are chosen under this p99 target (orchestrator.deploy.serving_search)
    latency_target: LatencyTargetSpec | None = None
    #: the settings that search may choose from (None: the defaults of ServingSearchSpec)
    serving_search: ServingSearchSpec | None = None
    #: per precision ("float32", "float16"...): atol and/or rtol
    tolerances: dict[Precision, ToleranceSpec] = Field(default_factory=dict)
    #: accuracy gates: of quantized candidates (instead of a tolerance), and per precision
    accuracy: AccuracySpec = Field(default_factory=AccuracySpec)
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
            precision = precision_of(key)
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
            problems.append((("latency_budget_ms",),
                             f"latency_budget_ms is only used with objective latency_budget, not {self.objective}"))
        problems += self._serving_problems()
        first: dict[str, int] = {}
        for i, m in enumerate(self.models):
            if m.name in first:
                problems.append((("models", i, "name"),
                                 f"model names must be unique; {m.name!r} is also models[{first[m.name]}]"))
            first.setdefault(m.name, i)
        if self.batch_sizes != "auto" and len(set(self.batch_sizes)) != len(self.batch_sizes):
            problems.append((("batch_sizes",), f"batch_sizes repeat a value: {self.batch_sizes}"))
        problems += self._memory_problems()
        if problems:
            raise checks.problems_error(problems)
        return self

    def _serving_problems(self) -> checks.Problems:
        problems: checks.Problems = []
        if self.latency_target is not None and self.objective != "max_throughput":
            problems.append((("latency_target",), f"latency_target is only used with objective max_throughput, "
                                                  f"not {self.objective}: set objective: max_throughput"))
        if self.latency_target is not None and not self.deploy.targets:
            problems.append((("latency_target",), "latency_target measures the deployed winners: give deploy.targets"))
        if self.serving_search is not None and self.latency_target is None:
            problems.append((("serving_search",), "serving_search is only used with latency_target"))
        return problems

    def serving(self) -> ServingSearchSpec:
        return self.serving_search or ServingSearchSpec()

    def _memory_problems(self) -> checks.Problems:
        """Inputs that could not be allocated at the largest batch size, on this machine."""
        total = checks.host_memory_bytes()
        problems: checks.Problems = []
        for i, m in enumerate(self.models):
            batch = self.max_batch_of(m) if self.searches_batches(m) else max(self.batches_of(m))
            longest = {name: max(buckets, default=1) for name, buckets in m.axes().items()}
            for j, inp in enumerate(m.inputs or []):
                problem = checks.memory_problem(batch, shape_at(inp.shape, longest), inp.dtype, total)
                if problem:
                    problems.append((("models", i, "inputs", j), problem))
        return problems

    def strategy(self) -> Strategy:
        return Strategy(self.objective, self.latency_budget_ms)

    def gates_for(self, candidate: CandidateSpec, precision: str, quantizes: bool) -> Gates | None:
        """The accuracy gates of a candidate: its own, else the sweep's for quantized candidates or for
        its precision; None where there are none (a plain tolerance check)."""
        if candidate.accuracy is not None:
            return candidate.accuracy.gates()
        if quantizes:
            return self.accuracy.quantized.gates()
        chosen = {precision_of(k): v for k, v in self.accuracy.precisions.items()}.get(precision_of(precision))
        return chosen.gates() if chosen is not None else None

    def tolerance_overrides(self) -> dict[str, dict[str, float]]:
        return {k: v.model_dump(exclude_none=True) for k, v in self.tolerances.items()}

    def batches_of(self, model: ModelSpec) -> list[int]:
        """The batch sizes to tune; a model whose sizes are searched starts at 1 (the search adds the rest)."""
        sizes = model.batch_sizes or self.batch_sizes
        return [1] if sizes == "auto" else list(sizes)

    def searches_batches(self, model: ModelSpec) -> bool:
        return (model.batch_sizes or self.batch_sizes) == "auto"

    def max_batch_of(self, model: ModelSpec) -> int:
        return model.max_batch or self.max_batch

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


_LIST_BRANCH, _AUTO_BRANCH = "list[constrained-int]", "literal['auto']"


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid sweep spec {source}:"]
    for err in exc.errors():
        # batch_sizes is a list or "auto": the list's error says what is wrong, at the list's path
        if _AUTO_BRANCH in err["loc"]:
            continue
        if _LIST_BRANCH in err["loc"]:
            err = {**err, "loc": tuple(p for p in err["loc"] if p != _LIST_BRANCH)}
            if err["type"] == "list_type":
                lines.append(f"  {_path(err['loc'])}: expected a list of batch sizes or 'auto', "
                             f"got {checks.describe(err['input'])}")
                continue
        # an input's shape entry is a size or an axis name: say only what is wrong with the one given
        if err["loc"] and err["loc"][-1] == "constrained-int" and isinstance(err["input"], str):
            continue
        if err["loc"] and str(err["loc"][-1]).startswith("function-after["):
            if not isinstance(err["input"], str):
                continue
            err = {**err, "loc": err["loc"][:-1]}
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
        lines = [f"invalid sweep spec {path}:"] + [f"  {_path(loc)}: {m}" for loc, m in exc.problems]
        raise SpecError("\n".join(lines)) from None
    return data
