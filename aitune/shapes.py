"""Axes that vary (a sequence length): their buckets, and padding a call up to its bucket and
slicing the outputs back.

A model with a dynamic axis is tuned at each bucket (one artifact per bucket and batch size, or
one dynamic-shape artifact covering them). A call whose length lies between buckets is padded up
to the next bucket with each input's pad value, run, and each output that follows the axis is
sliced back to the call's length. Padding is never assumed to be harmless: :func:`padding_problem`
runs lengths between the buckets both ways and compares, and an install keeps the outcome.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from aitune.specs import Sample
from aitune.torch.tree import flatten_tensors, map_tensors


class ShapeError(ValueError):
    """A call whose lengths no bucket holds, or inputs that disagree on an axis; one clear line."""


@dataclass(frozen=True)
class Axis:
    """One named axis that varies: its buckets, where it lies in each input (the dimension of the
    batched tensor) with the value padding fills, and the outputs that follow it."""

    name: str
    buckets: tuple[int, ...]
    #: (input name, dimension, pad value)
    inputs: tuple[tuple[str, int, float], ...]
    #: (output index in flatten order, output path, dimension)
    outputs: tuple[tuple[int, str, int], ...] = ()

    def __post_init__(self) -> None:
        buckets = tuple(int(b) for b in self.buckets)
        if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"axis {self.name!r}: buckets must be increasing positive sizes, got {list(buckets)}")
        if not self.inputs:
            raise ValueError(f"axis {self.name!r} lies in no input")
        inputs = tuple((str(n), int(d), p) for n, d, p in self.inputs)
        outputs = tuple((int(i), str(p), int(d)) for i, p, d in self.outputs)
        for name, dim, pad in inputs:  # read back from an install record too: trusted for nothing
            if dim < 0 or isinstance(pad, bool) or not isinstance(pad, (int, float)) or pad != pad or abs(pad) == float("inf"):
                raise ValueError(f"axis {self.name!r}: input {name!r} needs a dimension >= 0 and a finite pad value")
        if any(i < 0 or d < 0 for i, _, d in outputs):
            raise ValueError(f"axis {self.name!r}: an output's index and dimension must be >= 0")
        object.__setattr__(self, "buckets", buckets)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "outputs", outputs)

    def bucket_for(self, length: int) -> int:
        for bucket in self.buckets:
            if length <= bucket:
                return bucket
        raise ShapeError(f"{self.name} {length} is longer than the largest bucket: tuned {self.name} "
                         f"1..{self.buckets[-1]} (buckets {', '.join(map(str, self.buckets))})")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "buckets": list(self.buckets),
                "inputs": [list(i) for i in self.inputs], "outputs": [list(o) for o in self.outputs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Axis":
        return cls(d["name"], tuple(d["buckets"]), tuple(tuple(i) for i in d["inputs"]),
                   tuple(tuple(o) for o in d.get("outputs", [])))


def label(point: Mapping[str, int]) -> str:
    """A shape point's name: ``seq=64`` (axes in name order, joined by commas); '' for none."""
    return ",".join(f"{name}={int(point[name])}" for name in sorted(point))


def parse_label(shape: str) -> dict[str, int]:
    """The lengths a shape point's label names (``seq=64`` -> {"seq": 64}); {} for ''. A range's
    label (``seq=2..64``) names its largest lengths: what its artifact was built and checked at."""
    return {name: hi for name, (_, hi) in parse_ranges(shape).items()}


def parse_ranges(shape: str) -> dict[str, tuple[int, int]]:
    """Each axis's (low, high) in a label: ``seq=64`` -> {"seq": (64, 64)}, ``seq=2..64`` -> {"seq": (2, 64)}."""
    out: dict[str, tuple[int, int]] = {}
    for part in filter(None, shape.split(",")):
        name, sep, size = part.partition("=")
        low, dots, high = size.partition("..")
        if not sep or not name or not low.isdigit() or (dots and not high.isdigit()):
            raise ValueError(f"shape point {shape!r} is not axis=size[,axis=size] (or a range axis=low..high)")
        out[name] = (int(low), int(high if dots else low))
    return out


def range_label(ranges: Mapping[str, tuple[int, int]]) -> str:
    """The label of an artifact that covers a range of each axis: ``seq=2..64``."""
    return ",".join(f"{name}={int(ranges[name][0])}..{int(ranges[name][1])}" for name in sorted(ranges))


def is_range(shape: str) -> bool:
    return ".." in shape


def at(batch_size: int, shape: str = "") -> str:
    """A batch size and shape point in words: ``b4`` or ``b4 seq=64``."""
    return f"b{batch_size} {shape}" if shape else f"b{batch_size}"


@dataclass(frozen=True)
class Shapes:
    """Every axis of a model that varies."""

    axes: tuple[Axis, ...]

    def __post_init__(self) -> None:
        names = [a.name for a in self.axes]
        if len(set(names)) != len(names):
            raise ValueError(f"axes named twice: {names}")

    def points(self) -> list[dict[str, int]]:
        """Every combination of buckets, smallest first."""
        return [dict(zip([a.name for a in self.axes], combo)) for combo in itertools.product(*(a.buckets for a in self.axes))]

    def lengths(self, named: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Each axis's length in a call's tensors (by input name); inputs sharing an axis must agree."""
        found: dict[str, int] = {}
        for axis in self.axes:
            for name, dim, _ in axis.inputs:
                tensor = named.get(name)
                if tensor is None or tensor.dim() <= dim:
                    raise ShapeError(f"input {name!r} is missing or has no dimension {dim} (axis {axis.name})")
                size = int(tensor.shape[dim])
                if found.setdefault(axis.name, size) != size:
                    raise ShapeError(f"inputs disagree on axis {axis.name}: {found[axis.name]} and {size} ({name!r})")
        return found

    def dynamic_range(self) -> dict[str, tuple[int, int]]:
        """What one dynamic-shape artifact covers: each axis from 2 (``torch.export`` specialises a
        dimension of size 0 or 1) or its first bucket when that is smaller, up to its largest bucket."""
        return {a.name: (min(2, a.buckets[0]), a.buckets[-1]) for a in self.axes}

    def bucket(self, lengths: Mapping[str, int]) -> dict[str, int]:
        return {a.name: a.bucket_for(lengths[a.name]) for a in self.axes}

    def pad(self, named: Mapping[str, torch.Tensor], point: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """The inputs padded along each axis up to ``point`` with their pad values."""
        out = dict(named)
        for axis in self.axes:
            for name, dim, value in axis.inputs:
                out[name] = _pad_to(out[name], dim, point[axis.name], value)
        return out

    def cut(self, outputs: Any, lengths: Mapping[str, int]) -> Any:
        """The outputs sliced back to ``lengths`` along every axis that follows an input's."""
        dims: dict[int, list[tuple[int, int]]] = {}
        for axis in self.axes:
            for index, _, dim in axis.outputs:
                dims.setdefault(index, []).append((dim, lengths[axis.name]))
        counter = itertools.count()

        def fn(t: torch.Tensor) -> torch.Tensor:
            for dim, length in dims.get(next(counter), []):
                t = t.narrow(dim, 0, length)
            return t

        return map_tensors(outputs, fn) if dims else outputs

    def cut_flat(self, flat: list[tuple[str, torch.Tensor]], lengths: Mapping[str, int]) -> list[tuple[str, torch.Tensor]]:
        """:meth:`cut` for outputs already flattened to (path, tensor) in flatten order."""
        out = list(flat)
        for axis in self.axes:
            for index, _, dim in axis.outputs:
                path, t = out[index]
                out[index] = (path, t.narrow(dim, 0, lengths[axis.name]))
        return out

    def describe(self) -> str:
        parts = []
        for a in self.axes:
            ins = ", ".join(f"{n}[{d}]" for n, d, _ in a.inputs)
            outs = ", ".join(f"{p}[{d}]" for _, p, d in a.outputs) or "none"
            parts.append(f"{a.name} in {ins}; outputs that follow it: {outs}; buckets {', '.join(map(str, a.buckets))}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"axes": [a.to_dict() for a in self.axes]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Shapes":
        return cls(tuple(Axis.from_dict(a) for a in d["axes"]))


def _pad_to(tensor: torch.Tensor, dim: int, size: int, value: float) -> torch.Tensor:
    have = int(tensor.shape[dim])
    if have == size:
        return tensor
    if have > size:
        raise ShapeError(f"a length of {have} does not fit a bucket of {size}")
    shape = list(tensor.shape)
    shape[dim] = size - have
    return torch.cat([tensor, torch.full(shape, value, dtype=tensor.dtype, device=tensor.device)], dim=dim)


def trace_outputs(out_a: Any, out_b: Any, length_a: int, length_b: int) -> list[tuple[int, str, int]] | str:
    """The output dimensions that follow an axis: in outputs at two lengths, those of size
    ``length_a`` in the first and ``length_b`` in the second. A string: an output whose size changes
    with the length in some other way (it can't be sliced back), named."""
    flat_a, flat_b = flatten_tensors(out_a), flatten_tensors(out_b)
    if [p for p, _ in flat_a] != [p for p, _ in flat_b]:
        return "the outputs' structure changes with the length"
    found = []
    for index, ((path, a), (_, b)) in enumerate(zip(flat_a, flat_b)):
        if a.dim() != b.dim():
            return f"output {path} has {a.dim()} dimensions at one length and {b.dim()} at another"
        for dim, (sa, sb) in enumerate(zip(a.shape, b.shape)):
            if sa == sb:
                continue
            if (sa, sb) != (length_a, length_b):
                return f"output {path} dimension {dim} is {sa} at length {length_a} and {sb} at {length_b}: it can't be sliced back"
            found.append((index, path, dim))
    return found


def held_out_lengths(buckets: Sequence[int]) -> list[int]:
    """Lengths between the buckets (and under the first) that padding must get right: one just
    over each smaller bucket and one midway, and one under the first bucket."""
    out: set[int] = set()
    below = 0
    for bucket in buckets:
        for length in (below + 1, (below + bucket) // 2, bucket - 1):
            if below < length < bucket:
                out.add(length)
        below = bucket
    return sorted(out)


def pad_sample(sample: Sample, shapes: Shapes, point: Mapping[str, int], positional: Sequence[str]) -> Sample:
    """``sample`` with its inputs padded up to ``point``; ``positional`` names its positional inputs."""
    named = {**{positional[i]: a for i, a in enumerate(sample.args) if isinstance(a, torch.Tensor)},
             **{k: v for k, v in sample.kwargs.items() if isinstance(v, torch.Tensor)}}
    padded = shapes.pad(named, point)
    args = tuple(padded[positional[i]] if isinstance(a, torch.Tensor) else a for i, a in enumerate(sample.args))
    return Sample(args, {k: padded.get(k, v) if isinstance(v, torch.Tensor) else v for k, v in sample.kwargs.items()})


def held_out_points(shapes: Shapes, point: Mapping[str, int] | None = None) -> list[dict[str, int]]:
    """The lengths padding is checked at: each axis's held-out lengths (those that pad up to
    ``point``'s bucket of that axis, or every one), the other axes at ``point`` (or their first bucket)."""
    out = []
    for axis in shapes.axes:
        for length in held_out_lengths(axis.buckets):
            if point is not None and axis.bucket_for(length) != point[axis.name]:
                continue
            base = dict(point) if point is not None else {a.name: a.buckets[0] for a in shapes.axes}
            out.append({**base, axis.name: length})
    return out


def padding_problem(call: Callable[..., Any], reference: Callable[..., Any], shapes: Shapes,
                    make: Callable[[dict[str, int]], Sample], positional: Sequence[str],
                    compare: Callable[[Any, Any], str | None], point: Mapping[str, int] | None = None) -> str | None:
    """Whether padding gives the outputs of the unpadded call: at each held-out length (those that
    pad up to ``point``, or all), ``make``'s sample padded up to its bucket and run by ``call`` (the
    candidate), sliced back, against ``reference`` (eager fp32) on the unpadded sample (``compare``:
    None, or what differs). None: padding is safe there."""
    for lengths in held_out_points(shapes, point):
        sample = make(lengths)
        want = sample(reference)
        bucket = shapes.bucket(lengths)
        got = shapes.cut(pad_sample(sample, shapes, bucket, positional)(call), lengths)
        problem = compare(want, got)
        if problem:
            said = ", ".join(f"{name} {lengths[name]} up to {bucket[name]}" for name in lengths if lengths[name] != bucket[name])
            return (f"padding {said} changes the outputs ({problem}): the model does not mask its padding, "
                    "or pools over the padded axis")
    return None
