"""Accuracy beyond elementwise tolerance: how close a candidate's outputs are to the reference's.

Quantized candidates (int8, float8) never pass the fp32 tolerance of :mod:`aitune.check`: every
element moves a little. What matters is whether the output as a whole still says the same thing,
so these metrics look at whole tensors:

* :func:`cosine`: the cosine of the angle between candidate and reference, each flattened;
* :func:`sqnr_db`: signal-to-quantization-noise ratio, ``10 * log10(sum(ref^2) / sum((cand - ref)^2))``;
* :func:`topk_max_rel_err`: the largest relative error over the reference's top-k entries of each
  row (the logits that decide a classification or the next token);
* :func:`top1_agreement`: the fraction of rows whose argmax is the same.

The first three give one figure per output tensor, keyed by the tensor's path in the output tree
(``output``, ``output[0]``, ``output['logits']``...), the paths :mod:`aitune.check` reports. All
arithmetic is in float64 on the CPU, so a metric adds no rounding of its own.

:class:`Gates` holds the limits a candidate must meet; :meth:`Gates.judge` gives each gate's
figure (the worst over the output tensors), whether it passed, and a one-line reason naming the
failing gate, its figure and where. :class:`TaskGate` is a gate on a user's own evaluation batches
(``top1_agreement`` or a user's metric). :class:`Criteria` joins them to the elementwise tolerance:
how one candidate is judged (a quantizing backend by its gates instead of the tolerance:
:func:`criteria_for`). Pure torch: nothing here imports the orchestrator.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from aitune.check import OUTPUT_ROOT, TINY, CheckResult, Tolerance
from aitune.torch.tree import flatten_tensors

GATE_NAMES = ("cosine", "sqnr_db", "topk_rel_err")
#: how each gate's figure meets its limit: at least it (higher is better) or at most it
GATE_SIGNS = {"cosine": ">=", "sqnr_db": ">=", "topk_rel_err": "<="}


# -- pairing ----------------------------------------------------------------------------------------
def paired_tensors(candidate: Any, reference: Any) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(path, candidate tensor, reference tensor)`` for every tensor of the two output trees, as
    float64 on the CPU; ``ValueError`` where the trees or a pair's shapes differ."""
    cand = flatten_tensors(candidate, OUTPUT_ROOT)
    ref = flatten_tensors(reference, OUTPUT_ROOT)
    cand_paths, ref_paths = [p for p, _ in cand], [p for p, _ in ref]
    if cand_paths != ref_paths:
        raise ValueError(f"the candidate's output tensors {cand_paths} are not the reference's {ref_paths}")
    pairs = []
    for (path, c), (_, r) in zip(cand, ref):
        if c.shape != r.shape:
            raise ValueError(f"{path}: shape {tuple(c.shape)} != reference {tuple(r.shape)}")
        pairs.append((path, _wide(c), _wide(r)))
    return pairs


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def _per_tensor(fn: Callable[[torch.Tensor, torch.Tensor], float], candidate: Any, reference: Any) -> dict[str, float]:
    return {path: fn(c, r) for path, c, r in paired_tensors(candidate, reference)}


# -- metrics of one pair of tensors (float64, same shape) ------------------------------------------------
def _cosine(c: torch.Tensor, r: torch.Tensor) -> float:
    if torch.equal(c, r):
        return 1.0  # identical (zeros included): exactly 1, not 1 - rounding
    c, r = c.flatten(), r.flatten()
    norms = float(torch.linalg.vector_norm(c)) * float(torch.linalg.vector_norm(r))
    if norms == 0.0:
        return 0.0  # one side is all zeros and the other is not: no direction in common
    value = float(torch.dot(c, r)) / norms
    return value if math.isnan(value) else min(1.0, max(-1.0, value))


def _sqnr_db(c: torch.Tensor, r: torch.Tensor) -> float:
    if torch.equal(c, r):
        return math.inf
    signal = float(r.square().sum())
    noise = float((c - r).square().sum())
    if math.isnan(noise) or math.isnan(signal):
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _topk_max_rel_err(c: torch.Tensor, r: torch.Tensor, k: int) -> float:
    if r.numel() == 0:
        return 0.0
    rows_r = r.reshape(-1, r.shape[-1]) if r.dim() else r.reshape(1, 1)
    rows_c = c.reshape(rows_r.shape)
    top = rows_r.topk(min(k, rows_r.shape[-1]), dim=-1).indices
    ref_top, cand_top = rows_r.gather(-1, top), rows_c.gather(-1, top)
    rel = (cand_top - ref_top).abs() / ref_top.abs().clamp_min(TINY)
    if torch.isnan(rel).any():
        return math.nan
    return float(rel.max())


# -- the public metrics ---------------------------------------------------------------------------------
def cosine(candidate: Any, reference: Any) -> dict[str, float]:
    """Cosine similarity of each output tensor with the reference's, both flattened (1.0: the same
    direction; 1.0 exactly for identical tensors, zeros included)."""
    return _per_tensor(_cosine, candidate, reference)


def sqnr_db(candidate: Any, reference: Any) -> dict[str, float]:
    """Signal-to-noise ratio of each output tensor in dB: ``10 * log10(sum(ref^2) / sum((cand - ref)^2))``;
    ``inf`` where the candidate is identical to the reference."""
    return _per_tensor(_sqnr_db, candidate, reference)


def topk_max_rel_err(candidate: Any, reference: Any, k: int = 5) -> dict[str, float]:
    """For each output tensor, the largest ``|cand - ref| / |ref|`` over the reference's ``k`` largest
    entries of each row (rows: the last dimension)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"topk_max_rel_err: k must be an int >= 1, got {k!r}")
    return _per_tensor(lambda c, r: _topk_max_rel_err(c, r, k), candidate, reference)


def top1_agreement(candidates: Any, references: Any) -> float:
    """The fraction of rows (over every output tensor; rows: the last dimension) whose argmax is the
    same in the candidate as in the reference; 1.0 when there are no rows."""
    agree = total = 0
    for _, c, r in paired_tensors(candidates, references):
        if r.numel() == 0:
            continue
        rows_r = r.reshape(-1, r.shape[-1]) if r.dim() else r.reshape(1, 1)
        same = rows_r.argmax(dim=-1) == c.reshape(rows_r.shape).argmax(dim=-1)
        agree, total = agree + int(same.sum()), total + same.numel()
    return agree / total if total else 1.0


# -- gates ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateReport:
    """Each set gate's figure (the worst over the output tensors), where it was, and whether it passed."""

    figures: dict[str, float] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    passed: dict[str, bool] = field(default_factory=dict)
    #: one line naming every failing gate with its figure and limit; None when all passed
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return all(self.passed.values())

    def to_dict(self) -> dict[str, Any]:
        return {"figures": dict(self.figures), "where": dict(self.where), "passed": dict(self.passed),
                "reason": self.reason, "ok": self.ok}  # fmt: skip


@dataclass(frozen=True)
class Gates:
    """Limits on :func:`cosine` (min), :func:`sqnr_db` (min) and :func:`topk_max_rel_err` (max, over
    the top ``topk`` entries); a gate left at None is not checked."""

    cosine: float | None = None
    sqnr_db: float | None = None
    topk_rel_err: float | None = None
    topk: int = 5

    def __post_init__(self) -> None:
        for name in GATE_NAMES:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Gates.{name} must be a finite number or None, got {value!r}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"Gates.topk must be an int >= 1, got {self.topk!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"cosine": self.cosine, "sqnr_db": self.sqnr_db, "topk_rel_err": self.topk_rel_err, "topk": self.topk}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Gates":
        unknown = sorted(set(d) - {*GATE_NAMES, "topk"})
        if unknown:
            raise ValueError(f"Gates has no field(s) {unknown}; known: {[*GATE_NAMES, 'topk']}")
        return cls(**d)

    def judge(self, outputs: Any, reference_outputs: Any) -> GateReport:
        """Each set gate's worst figure over the output tensors, pass/fail, and the reason for a failure.

        ``outputs`` and ``reference_outputs`` are output trees of the same structure (one sample's
        outputs, or a list of several samples' outputs)."""
        pairs = paired_tensors(outputs, reference_outputs)
        figures, where, passed, failures = {}, {}, {}, []
        for name, limit, higher_is_better, metric in self._checks():
            path, figure = _worst([(p, metric(c, r)) for p, c, r in pairs], higher_is_better)
            figures[name], where[name] = figure, path
            # written so that NaN fails: every comparison with NaN is False
            passed[name] = bool(figure >= limit) if higher_is_better else bool(figure <= limit)
            if not passed[name]:
                sign = "<" if higher_is_better else ">"
                failures.append(f"{name} {_fmt(figure, limit)} {sign} {limit:g} on {path}")
        return GateReport(figures, where, passed, "; ".join(failures) or None)

    def _checks(self) -> list[tuple[str, float, bool, Callable[[torch.Tensor, torch.Tensor], float]]]:
        """(gate, limit, whether higher figures are better, metric) for each gate that is set."""
        metrics = {"cosine": _cosine, "sqnr_db": _sqnr_db,
                   "topk_rel_err": lambda c, r: _topk_max_rel_err(c, r, self.topk)}
        return [(name, getattr(self, name), GATE_SIGNS[name] == ">=", metrics[name])
                for name in GATE_NAMES if getattr(self, name) is not None]


def _worst(figures: list[tuple[str, float]], higher_is_better: bool) -> tuple[str | None, float]:
    """The worst (path, figure): NaN first, then the lowest (or highest); the first of equals."""
    if not figures:
        return None, (math.inf if higher_is_better else 0.0)
    for path, value in figures:
        if math.isnan(value):
            return path, value
    pick = min if higher_is_better else max
    return pick(figures, key=lambda item: item[1])


def _fmt(value: float, limit: float) -> str:
    """``value`` in 4 significant digits, or as many more as it takes not to print the limit itself."""
    if not math.isfinite(value):
        return str(value)
    for digits in range(4, 17):
        text = f"{value:.{digits}g}"
        if float(text) != limit:
            return text
    return repr(value)


# Conservative defaults for quantized candidates (int8, float8) judged against the fp32 eager
# reference. Per-row int8 quantization of the example models (an encoder, a CNN, MLPs) keeps the
# output's SQNR at 40 to 60 dB (benchmarks/quantized.py), so 30 dB (noise power at 1/1000 of the
# signal's) leaves a margin of 10 dB or more; a model with outliers in its weights or activations
# (which per-token int8 activation scales can't resolve) falls far below it (5 dB in the tests).
# SQNR also catches a wrong scale, which cosine can't see. sqnr_db >= 30 already implies cosine
# >= 0.9995 (the angle's sine is at most sqrt(1e-3)): the cosine gate is the figure people read,
# and the backstop where sqnr_db is loosened or unset.
# No top-k gate: not every output is logits.
DEFAULT_QUANTIZED_GATES = Gates(cosine=0.999, sqnr_db=30.0)


BUILTIN_METRICS = ("top1_agreement",)


@dataclass(frozen=True)
class TaskGate:
    """A gate on a user's evaluation batches (not the check samples): ``metric(candidate outputs,
    eager fp32 outputs)`` over the batches, at least ``min`` (or at most ``max``). ``metric`` is a
    built-in name (``top1_agreement``) or the import path of ``fn(candidate_outputs, reference_outputs)
    -> float`` (lists, one entry per batch). ``samples`` names the batches' function and
    ``fingerprint`` their values (part of the evaluation key: other batches, another judgement)."""

    samples: str
    fingerprint: str
    metric: str = "top1_agreement"
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if (self.min is None) == (self.max is None):
            raise ValueError(f"a task gate needs min or max (one of them), got min={self.min!r}, max={self.max!r}")
        for name in ("min", "max"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"task gate {name} must be a finite number, got {value!r}")
        if not all(isinstance(v, str) and v for v in (self.samples, self.fingerprint, self.metric)):
            raise ValueError("a task gate needs its samples' import path and fingerprint, and a metric")
        if self.metric not in BUILTIN_METRICS and ":" not in self.metric:
            raise ValueError(f"task metric {self.metric!r}: give {', '.join(BUILTIN_METRICS)} or 'package.module:function'")

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "fingerprint": self.fingerprint, "metric": self.metric,
                "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TaskGate":
        if not isinstance(d, Mapping):
            raise ValueError(f"a task gate must be a mapping, got {d!r}")
        unknown = sorted(set(d) - {"samples", "fingerprint", "metric", "min", "max"})
        if unknown:
            raise ValueError(f"task gate has no field(s) {unknown}")
        return cls(**d)

    def same_figure(self, other: "TaskGate | None") -> bool:
        """Whether ``other`` measures the same figure (only its limit may differ)."""
        return other is not None and (self.samples, self.fingerprint, self.metric) == (
            other.samples, other.fingerprint, other.metric)

    def figure(self, candidate_outputs: list[Any], reference_outputs: list[Any]) -> float:
        if self.metric == "top1_agreement":
            return top1_agreement(candidate_outputs, reference_outputs)
        from aitune.torch.module_ref import import_object  # a user's metric, named by the spec

        value = import_object(self.metric)(candidate_outputs, reference_outputs)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"task metric {self.metric} returned {type(value).__name__}, not a number")
        return float(value)

    def passed(self, figure: float) -> bool:
        # written so that NaN fails
        return bool(figure >= self.min) if self.min is not None else bool(figure <= self.max)

    def reason(self, figure: float) -> str:
        bound = f"< {self.min:g}" if self.min is not None else f"> {self.max:g}"
        return f"task {self.metric} {figure:.6g} {bound} on {self.samples}"


@dataclass(frozen=True)
class Criteria:
    """How a candidate's outputs are judged against the eager fp32 reference: elementwise within
    ``tolerance`` (unless ``elementwise`` is off, as for quantized candidates, which never meet an
    fp32 tolerance), and within ``gates`` when there are any."""

    tolerance: Tolerance
    gates: Gates | None = None
    elementwise: bool = True
    #: a gate on the user's evaluation batches (judged where they can be run: on a worker)
    task: TaskGate | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``check`` part of an evaluation: only what differs from a plain tolerance is written,
        so that a candidate judged by its tolerance alone keeps its key."""
        out: dict[str, Any] = {"tolerance": self.tolerance.to_dict()}
        if self.gates is not None:
            out["gates"] = self.gates.to_dict()
        if not self.elementwise:
            out["elementwise"] = False
        if self.task is not None:
            out["task"] = self.task.to_dict()
        return out

    def without_task(self) -> "Criteria":
        """These criteria where the evaluation batches are not at hand (a deploy target)."""
        return dataclasses.replace(self, task=None)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Criteria":
        """Read back (from a job, a stored result or an install record), checked."""
        if not isinstance(d, Mapping) or not isinstance(d.get("tolerance"), Mapping):
            raise ValueError(f"criteria need a tolerance, got {d!r}")
        gates = d.get("gates")
        if gates is not None and not isinstance(gates, Mapping):
            raise ValueError(f"criteria gates must be a mapping, got {gates!r}")
        elementwise = d.get("elementwise", True)
        if not isinstance(elementwise, bool):
            raise ValueError(f"criteria elementwise must be true or false, got {elementwise!r}")
        task = TaskGate.from_dict(d["task"]) if d.get("task") is not None else None
        return cls(Tolerance.from_dict(d["tolerance"]), Gates.from_dict(gates) if gates is not None else None,
                   elementwise, task)

    def apply(self, elementwise: CheckResult, outputs: Any, reference: Any, task_figure: float | None = None) -> CheckResult:
        """The verdict from an elementwise comparison (``elementwise``, under ``self.tolerance``) of
        ``outputs`` with ``reference``, the gates on the same outputs and the task gate's figure on
        the evaluation batches (``task_figure``: required where there is a task gate): each gate's
        figure is kept in the result, passed or not."""
        result = self._apply(elementwise, outputs, reference)
        if self.task is None:
            return result
        report = dict(result.gates or {"figures": {}, "where": {}, "passed": {}, "limits": {}})
        passed = task_figure is not None and self.task.passed(task_figure)
        report["task"] = {**self.task.to_dict(), "figure": task_figure, "passed": passed}
        why = (self.task.reason(task_figure) if task_figure is not None else "task gate: no figure (its batches did not run)")
        reason = "; ".join(r for r in (result.reason, None if passed else why) if r) or None
        return dataclasses.replace(result, ok=result.ok and passed, reason=reason, gates=report)

    def _apply(self, elementwise: CheckResult, outputs: Any, reference: Any) -> CheckResult:
        if self.gates is None:
            if self.elementwise:
                return elementwise
            return dataclasses.replace(elementwise, ok=True, reason=None, elementwise=False)
        try:
            report = self.gates.judge(outputs, reference)
        except ValueError as exc:  # the trees or shapes differ: no figure can be had
            report = GateReport(reason=f"gates: {exc}", passed={"structure": False})
        ok_elementwise = elementwise.ok or not self.elementwise
        reasons = [r for r in (elementwise.reason if self.elementwise else None, report.reason) if r]
        return dataclasses.replace(elementwise, ok=ok_elementwise and report.ok, reason="; ".join(reasons) or None,
                                   gates={**report.to_dict(), "limits": self.gates.to_dict()},
                                   elementwise=self.elementwise)


def criteria_for(backend_cls: type, tolerance: Tolerance, gates: Gates | None = None) -> Criteria:
    """The criteria of a candidate of ``backend_cls``: a quantizing backend (``quantizes = True``) is
    judged by ``gates`` (default :data:`DEFAULT_QUANTIZED_GATES`), not elementwise; any other by
    its tolerance, and by ``gates`` as well when some are given."""
    if getattr(backend_cls, "quantizes", False):
        return Criteria(tolerance, gates or DEFAULT_QUANTIZED_GATES, elementwise=False)
    return Criteria(tolerance, gates)
