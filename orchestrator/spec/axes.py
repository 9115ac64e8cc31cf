"""Axes that vary, in the spec: an input's named axes with their buckets and pad values, a sample
factory's axes, the traffic mix over the buckets, and outputs declared to follow an axis.

    inputs:
      - {name: input_ids, shape: [seq], dtype: int64, int_range: [0, 30522], kwarg: true,
         dynamic: {seq: {buckets: [32, 64, 128], pad: 0}}}
      - {name: attention_mask, shape: [seq], dtype: int64, kwarg: true, dynamic: {seq: {pad: 0}}}
    traffic: {seq: {32: 0.5, 64: 0.3, 128: 0.2}}

Every problem is found here, before anything starts, at its field path.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Union

import torch
from pydantic import AfterValidator, Field, PositiveFloat, PositiveInt, StrictFloat, StrictInt

from orchestrator.spec import checks
from orchestrator.spec.strict import Name, Strict

Number = Union[StrictInt, StrictFloat]
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _axis_name(value: str) -> str:
    if not _IDENTIFIER.match(value):
        raise ValueError(f"axis name {value!r} must be letters, digits and '_', not starting with a digit "
                         "(it names deploy-root folders: b4-seq=64)")
    return value


#: an axis's name: an identifier (it is part of a deploy-root folder's name)
AxisName = Annotated[str, AfterValidator(_axis_name)]


class AxisSpec(Strict):
    """One named axis of an input: its buckets (given once per model, on any input that has the
    axis) and the value padding fills this input with."""

    buckets: list[PositiveInt] | None = Field(default=None, min_length=1)
    pad: Number = 0


class SampleAxisSpec(Strict):
    """An axis of a model whose samples come from its ``sample_factory``: the factory is called with
    ``lengths={axis: size}``; where the axis lies in each input is traced from two lengths."""

    buckets: list[PositiveInt] = Field(min_length=1)
    #: the pad value of every input, or of each input by name (others: 0)
    pad: Number | dict[Name, Number] = 0


def buckets_problem(buckets: list[int] | None) -> str | None:
    if buckets and any(b >= c for b, c in zip(buckets, buckets[1:])):
        return f"buckets must be strictly increasing, got {buckets}"
    return None


def pad_problem(dtype: str, pad: float) -> str | None:
    """Why ``pad`` can't be a value of ``dtype``."""
    if dtype == "bool":
        return None if pad in (0, 1) else f"pad {pad!r} is not a bool value (0 or 1)"
    if dtype in checks.FLOAT_DTYPES:
        limit = torch.finfo(getattr(torch, dtype)).max
        return None if abs(pad) <= limit else f"pad {pad!r} is outside {dtype}'s finite values"
    if isinstance(pad, float) and not pad.is_integer():
        return f"pad {pad!r} is not an integer, but the input is {dtype}"
    info = torch.iinfo(getattr(torch, dtype))
    return None if info.min <= pad <= info.max else f"pad {pad!r} does not fit {dtype} ({info.min}..{info.max})"


def input_axis_problems(shape: list, dynamic: dict[str, AxisSpec] | None, dtype: str) -> checks.Problems:
    """An input's named axes against its ``dynamic`` declarations."""
    problems: checks.Problems = []
    named = [d for d in shape if isinstance(d, str)]
    declared = dynamic or {}
    for i, d in enumerate(shape):
        if isinstance(d, str) and d not in declared:
            problems.append((("shape", i), f"axis {d!r} is not declared in this input's 'dynamic' "
                                           f"(give at least its pad: dynamic: {{{d}: {{pad: 0}}}})"))
    if len(set(named)) != len(named):
        problems.append((("shape",), f"an axis name appears twice in shape {shape}"))
    for name, axis in declared.items():
        if name not in named:
            problems.append((("dynamic", name), f"unknown axis {name!r}: shape {shape} names "
                                                f"{', '.join(map(repr, named)) or 'no axis'}"))
            continue
        problem = buckets_problem(axis.buckets)
        if problem:
            problems.append((("dynamic", name, "buckets"), problem))
        problem = pad_problem(dtype, axis.pad)
        if problem:
            problems.append((("dynamic", name, "pad"), problem))
    return problems


def model_axes(inputs: list | None, sample_axes: dict[str, SampleAxisSpec] | None) -> tuple[dict[str, list[int]], checks.Problems]:
    """Each axis's buckets, from the inputs (given once, or the same on each) or a sample factory's axes."""
    if sample_axes:
        return {name: list(a.buckets) for name, a in sample_axes.items()}, []
    found: dict[str, list[int]] = {}
    where: dict[str, int] = {}
    problems: checks.Problems = []
    for i, inp in enumerate(inputs or []):
        for name, axis in (inp.dynamic or {}).items():
            if axis.buckets is None:
                continue
            if name in found and found[name] != axis.buckets:
                problems.append((("inputs", i, "dynamic", name, "buckets"),
                                 f"axis {name!r} has buckets {found[name]} in inputs[{where[name]}]; give them once"))
            found.setdefault(name, list(axis.buckets))
            where.setdefault(name, i)
    for i, inp in enumerate(inputs or []):
        for name in inp.dynamic or {}:
            if name not in found:
                problems.append((("inputs", i, "dynamic", name),
                                 f"axis {name!r} has no buckets: give them on one input (buckets: [32, 64, 128])"))
                found[name] = []
    return found, problems


def traffic_problems(traffic: dict[str, dict[int, float]] | None, axes: dict[str, list[int]]) -> checks.Problems:
    problems: checks.Problems = []
    for name, mix in (traffic or {}).items():
        if name not in axes:
            problems.append((("traffic", name), f"unknown axis {name!r}; the model's axes: {', '.join(axes) or 'none'}"))
            continue
        if not mix:
            problems.append((("traffic", name), "an empty mix; give lengths and their shares, e.g. {32: 0.5, 64: 0.5}"))
        top = max(axes[name], default=0)
        for length in mix:
            if not 1 <= length <= top:
                problems.append((("traffic", name, length), f"length {length} is outside 1..{top}, the range the buckets cover"))
    return problems


def traffic_weights(traffic: dict[str, dict[int, float]] | None, axes: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    """Each axis's share of calls per bucket (a length goes to the smallest bucket that holds it),
    summing to 1; uniform over the buckets where no mix is given."""
    out: dict[str, dict[int, float]] = {}
    for name, buckets in axes.items():
        mix = (traffic or {}).get(name) or {b: 1.0 for b in buckets}
        shares = {b: 0.0 for b in buckets}
        for length, weight in mix.items():
            shares[next(b for b in buckets if length <= b)] += weight
        total = math.fsum(shares.values())
        out[name] = {b: w / total for b, w in shares.items()}
    return out


Traffic = dict[AxisName, dict[PositiveInt, PositiveFloat]]
#: outputs declared to follow an axis: {axis: {output path: dimension}}
OutputAxes = dict[AxisName, dict[str, StrictInt]]


def sample_factory_takes_lengths(obj: Any, path: str) -> str | None:
    return checks.signature_problem(obj, path, batch_size=1, seed=0, lengths={})


def shape_at(shape: list, lengths: dict[str, int]) -> list[int]:
    """An input's shape (without its batch axis) with each named axis at its length."""
    return [lengths[d] if isinstance(d, str) else int(d) for d in shape]
