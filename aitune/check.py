"""Correctness of a candidate's outputs against the eager fp32 reference.

An element passes when ``|candidate - reference| <= atol + rtol * |reference|`` (the rule of
``torch.allclose``). Both sides are widened to float64 on the CPU first, so the comparison adds no
rounding of its own whatever the candidate's dtype or device.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from aitune.canonical import dtype_name

# children is the walker behind flatten_tensors; reusing it keeps the paths of non-tensor
# leaves identical to those of tensors.
from aitune.torch.tree import children, flatten_tensors

OUTPUT_ROOT = "output"
TINY = torch.finfo(torch.float64).tiny
_SCALARS = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"Tolerance.{name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))

    def to_dict(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Tolerance":
        return cls(atol=d["atol"], rtol=d["rtol"])


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(atol=1e-4, rtol=1e-3),
    "tf32": Tolerance(atol=1e-2, rtol=1e-2),
    "float16": Tolerance(atol=1e-2, rtol=1e-2),
    "bfloat16": Tolerance(atol=5e-2, rtol=5e-2),
}

_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def _precision_name(precision: str | torch.dtype) -> str:
    if isinstance(precision, torch.dtype):
        return dtype_name(precision)
    name = str(precision).strip().lower().removeprefix("torch.")
    return _ALIASES.get(name, name)


def tolerance_for(
    precision: str | torch.dtype,
    overrides: Mapping[str, Mapping[str, float] | Tolerance] | None = None,
) -> Tolerance:
    """The tolerance for outputs computed in ``precision`` ("float16", "fp16", torch.float16...).

    ``overrides`` maps a precision to a ``Tolerance`` or to a dict giving ``atol``, ``rtol`` or
    both; a missing one keeps its default. A precision without a default needs both.
    """
    name = _precision_name(precision)
    override = {_precision_name(k): v for k, v in (overrides or {}).items()}.get(name)
    base = DEFAULT_TOLERANCES.get(name)
    if isinstance(override, Tolerance):
        return override
    if override is not None:
        if not isinstance(override, Mapping):
            raise TypeError(f"tolerance override for {name!r} must be a Tolerance or a dict, got {override!r}")
        unknown = set(override) - {"atol", "rtol"}
        if unknown:
            raise ValueError(f"tolerance override for {name!r}: unknown keys {sorted(unknown)}, expected atol and/or rtol")
        if base is not None:
            return dataclasses.replace(base, **override)
        if {"atol", "rtol"} <= set(override):
            return Tolerance(**override)
    if base is None:
        known = sorted(DEFAULT_TOLERANCES) + sorted(_ALIASES)
        raise ValueError(
            f"unknown precision {precision!r}: known are {', '.join(known)} "
            "(or give both atol and rtol for it in overrides)"
        )
    return base


@dataclass
class CheckResult:
    """Outcome of a comparison; ``reason`` (when not ok) starts with the path it is about."""

    ok: bool
    max_abs_err: float
    max_rel_err: float
    worst_path: str | None
    worst_index: list[int] | None
    reason: str | None
    tolerance: Tolerance
    #: the accuracy gates' report (aitune.accuracy): each gate's figure, where, passed, the limits
    gates: dict[str, Any] | None = None
    #: whether the tolerance decided too (False for quantized candidates: only the gates did)
    elementwise: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tolerance"] = self.tolerance.to_dict()
        if self.gates is None:  # a record without gates reads as it always did
            del d["gates"]
        if self.elementwise:
            del d["elementwise"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CheckResult":
        index = d.get("worst_index")
        return cls(
            ok=bool(d["ok"]),
            max_abs_err=float(d["max_abs_err"]),
            max_rel_err=float(d["max_rel_err"]),
            worst_path=d.get("worst_path"),
            worst_index=None if index is None else [int(i) for i in index],
            reason=d.get("reason"),
            tolerance=Tolerance.from_dict(d["tolerance"]),
            gates=dict(d["gates"]) if isinstance(d.get("gates"), Mapping) else None,
            elementwise=d.get("elementwise", True) is not False,
        )


def _index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    # numpy's unravel_index: torch's imports sympy on first use (half a second per process)
    return tuple(int(i) for i in np.unravel_index(flat, tuple(shape))) if len(shape) else ()


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return _index(int(mask.flatten().nonzero()[0]), mask.shape)


def _fmt(t: torch.Tensor) -> str:
    v = t.item()
    return f"{v:.6g}" if isinstance(v, float) else str(v)


# A comparison of one leaf: its result, and how bad its failure is, so that the worst one is
# reported. Failures that are not about tolerance (shape, NaN...) rank above every tolerance miss.
_Part = tuple[CheckResult, float]


def _compare_tensor(path: str, ref: torch.Tensor, cand: torch.Tensor, tol: Tolerance) -> _Part:
    def result(reason: str | None = None, index: tuple[int, ...] | None = None, abs_err: float = 0.0, rel_err: float = 0.0) -> CheckResult:
        return CheckResult(reason is None, abs_err, rel_err, path, None if index is None else list(index), reason, tol)

    if ref.shape != cand.shape:
        return result(f"{path}: shape {tuple(cand.shape)} != reference {tuple(ref.shape)}"), math.inf
    if ref.numel() == 0:
        return result(), -math.inf
    wide = torch.complex128 if ref.is_complex() or cand.is_complex() else torch.float64
    r = ref.detach().to("cpu", wide)
    c = cand.detach().to("cpu", wide)

    r_finite, c_finite = torch.isfinite(r), torch.isfinite(c)
    both = r_finite & c_finite
    abs_err = torch.where(both, (c - r).abs(), 0.0)
    # Relative error is measured against at least atol: near-zero references would otherwise
    # report astronomically large (and meaningless) relative errors.
    rel_err = abs_err / r.abs().clamp_min(max(tol.atol, TINY))
    max_abs, max_rel = float(abs_err.max()), float(torch.where(both, rel_err, 0.0).max())

    new_bad = r_finite & ~c_finite
    if new_bad.any():
        index = _first(new_bad)
        reason = f"{path}: {int(new_bad.sum())} NaN/Inf values where the reference is finite (first at {index})"
        return result(reason, index, max_abs, max_rel), math.inf
    # Where the reference itself is NaN/Inf there is no error to measure; the candidate must agree.
    same = (c == r) | (torch.isnan(c) & torch.isnan(r))
    lost = ~r_finite & ~same
    if lost.any():
        index = _first(lost)
        reason = f"{path}: {int(lost.sum())} values differ from the reference's NaN/Inf (first at {index})"
        return result(reason, index, max_abs, max_rel), math.inf

    allowed = tol.atol + tol.rtol * r.abs()
    excess = torch.where(both, abs_err - allowed, -math.inf)
    worst = int(excess.argmax())
    worst_excess = float(excess.flatten()[worst])
    if worst_excess <= 0:
        return result(None, _index(int(abs_err.argmax()), r.shape), max_abs, max_rel), worst_excess
    index = _index(worst, r.shape)
    n_bad = int((excess > 0).sum())
    reason = (
        f"{path}: max abs error {float(abs_err.flatten()[worst]):.3g} at {index} exceeds atol {tol.atol:g} + "
        f"rtol {tol.rtol:g}*|ref| (candidate {_fmt(c.flatten()[worst])}, reference {_fmt(r.flatten()[worst])}; "
        f"{n_bad} of {r.numel()} elements out of tolerance)"
    )
    return result(reason, index, max_abs, max_rel), worst_excess


def _scalar_leaves(value: Any, path: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, torch.Tensor):
        return out
    items = children(value)
    if items is None:
        if isinstance(value, _SCALARS):
            out[path] = value
        return out
    for suffix, child in items:
        _scalar_leaves(child, path + suffix, out)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _compare_scalar(path: str, ref: Any, cand: Any, tol: Tolerance) -> _Part:
    if _is_number(ref) and _is_number(cand):
        both_nan = math.isnan(ref) and math.isnan(cand)
        close = cand == ref or both_nan or abs(cand - ref) <= tol.atol + tol.rtol * abs(ref)
    else:
        close = type(ref) is type(cand) and ref == cand
    if close:
        return CheckResult(True, 0.0, 0.0, path, None, None, tol), -math.inf
    return CheckResult(False, 0.0, 0.0, path, None, f"{path}: {cand!r} != reference {ref!r}", tol), math.inf


def _combine(parts: Sequence[_Part], tol: Tolerance) -> CheckResult:
    """One result for several leaves: the worst failure, else where the largest error was."""
    if not parts:
        return CheckResult(True, 0.0, 0.0, None, None, None, tol)
    failures = [part for part in parts if not part[0].ok]
    # max() keeps the first of equals: among failures of the same rank, the earliest path wins.
    chosen = max(failures, key=lambda p: p[1])[0] if failures else max(parts, key=lambda p: p[0].max_abs_err)[0]
    return CheckResult(
        ok=not failures,
        max_abs_err=max(p[0].max_abs_err for p in parts),
        max_rel_err=max(p[0].max_rel_err for p in parts),
        worst_path=chosen.worst_path,
        worst_index=chosen.worst_index,
        reason=chosen.reason,
        tolerance=tol,
    )


def _structure_failure(ref_paths: list[str], cand_paths: list[str], tol: Tolerance) -> CheckResult:
    counts = f"candidate has {len(cand_paths)} tensors, reference {len(ref_paths)}"
    missing = [p for p in ref_paths if p not in set(cand_paths)]
    extra = [p for p in cand_paths if p not in set(ref_paths)]
    if missing:
        where = ", ".join(cand_paths[:3]) + (", ..." if len(cand_paths) > 3 else "")
        theirs = f"; the candidate's are at {where}" if cand_paths else ""
        path, what = missing[0], f"reference tensor missing from the candidate ({counts}{theirs})"
    elif extra:
        path, what = extra[0], f"tensor not in the reference ({counts})"
    else:
        path, what = OUTPUT_ROOT, "tensors come in a different order than in the reference"
    return CheckResult(False, 0.0, 0.0, path, None, f"{path}: {what}", tol)


def compare_outputs(reference: Any, candidate: Any, tolerance: Tolerance) -> CheckResult:
    """Compare a candidate's output with the reference's, tensor by tensor, by path.

    Fails on a different structure, a shape mismatch, NaN/Inf where the reference is finite,
    an element out of tolerance, or a different non-tensor leaf (int, str, None...) at a path
    both have. The result names the worst failure, or the largest error when all pass.
    """
    ref = flatten_tensors(reference, OUTPUT_ROOT)
    cand = flatten_tensors(candidate, OUTPUT_ROOT)
    ref_paths, cand_paths = [p for p, _ in ref], [p for p, _ in cand]
    if ref_paths != cand_paths:
        return _structure_failure(ref_paths, cand_paths, tolerance)
    parts = [_compare_tensor(path, r, c, tolerance) for (path, r), (_, c) in zip(ref, cand)]
    ref_scalars = _scalar_leaves(reference, OUTPUT_ROOT, {})
    cand_scalars = _scalar_leaves(candidate, OUTPUT_ROOT, {})
    parts += [_compare_scalar(p, v, cand_scalars[p], tolerance) for p, v in ref_scalars.items() if p in cand_scalars]
    return _combine(parts, tolerance)


def check_samples(reference_outputs: Sequence[Any], candidate_outputs: Sequence[Any], tolerance: Tolerance) -> CheckResult:
    """Compare the outputs of several samples; the first failing sample is the one reported,
    errors are the worst over all samples, and paths read ``sample[i].output...``."""
    if len(reference_outputs) != len(candidate_outputs):
        reason = f"samples: {len(candidate_outputs)} candidate outputs for {len(reference_outputs)} reference samples"
        return CheckResult(False, 0.0, 0.0, "samples", None, reason, tolerance)
    if not reference_outputs:
        raise ValueError("check_samples needs at least one sample: comparing nothing proves nothing")

    def prefixed(i: int, res: CheckResult) -> CheckResult:
        def add(text: str | None) -> str | None:
            return None if text is None else f"sample[{i}].{text}"

        return dataclasses.replace(res, worst_path=add(res.worst_path), reason=add(res.reason))

    results = [
        prefixed(i, compare_outputs(r, c, tolerance)) for i, (r, c) in enumerate(zip(reference_outputs, candidate_outputs))
    ]
    # Rank every failure alike so that _combine reports the first one.
    return _combine([(res, 0.0 if not res.ok else -math.inf) for res in results], tolerance)
