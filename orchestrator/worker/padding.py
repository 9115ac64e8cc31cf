"""A candidate's shape checks on the worker. At one bucket: at the lengths between its bucket and
the one below, each sample padded up to the bucket and run by the candidate, sliced back, must match
eager fp32 on the unpadded sample within the candidate's own criteria (aitune.shapes.padding_problem).
A dynamic-shape artifact: run unpadded at every bucket and at the lengths between them that its
range holds, against eager fp32 at the same lengths; and measured at every bucket."""

from __future__ import annotations

from typing import Any, Callable

import torch

from aitune.accuracy import Criteria
from aitune.check import compare_outputs
from aitune.measure import MeasureConfig, measure
from aitune.shapes import Shapes, held_out_lengths, padding_problem, parse_label
from aitune.specs import GraphSpec
from orchestrator.planning.candidates import make_sample
from orchestrator.spec.models import ModelSpec


def candidate_padding_problem(call: Callable[..., Any], module: torch.nn.Module, model: ModelSpec, batch: int,
                              graph_spec: dict[str, Any], padding: dict[str, Any], criteria: Criteria,
                              device: torch.device) -> str | None:
    """None where padding up to this job's bucket gives the candidate's unpadded outputs; else why not."""
    shapes = Shapes.from_dict(padding["shapes"])
    positional = [t.name for t in GraphSpec.from_dict(graph_spec).positional]

    with torch.inference_mode():
        return padding_problem(call, module, shapes, lambda lengths: make_sample(model, batch, lengths).to(device),
                               positional, _compare(criteria), point=padding["point"])


def _compare(criteria: Criteria):
    def compare(want: Any, got: Any) -> str | None:
        if criteria.gates is not None:
            return criteria.gates.judge(got, want).reason
        result = compare_outputs(want, got, criteria.tolerance)
        return None if result.ok else result.reason

    return compare


def dynamic_problem(call: Callable[..., Any], module: torch.nn.Module, model: ModelSpec, batch: int,
                    padding: dict[str, Any], criteria: Criteria, device: torch.device) -> str | None:
    """None where a dynamic-shape artifact gives eager fp32's outputs at every bucket and at the
    lengths between them that its range holds, each run as it is (no padding); else what differs."""
    shapes = Shapes.from_dict(padding["shapes"])
    ranges = {name: tuple(r) for name, r in padding["range"].items()}
    compare = _compare(criteria)
    for axis in shapes.axes:
        low, high = ranges[axis.name]
        for length in sorted({*axis.buckets, *held_out_lengths(axis.buckets)}):
            if not low <= length <= high:
                continue
            lengths = {**{a.name: a.buckets[-1] for a in shapes.axes}, axis.name: length}
            sample = make_sample(model, batch, lengths).to(device)
            with torch.inference_mode():
                problem = compare(sample(module), sample(call))
            if problem:
                return f"at {axis.name} {length} the dynamic-shape artifact differs from eager fp32 ({problem})"
    return None


def bucket_latencies(call: Callable[..., Any], model: ModelSpec, batch: int, buckets: list[str],
                     config: MeasureConfig, device: torch.device) -> dict[str, float]:
    """A dynamic-shape artifact's median ms at each bucket (label -> ms)."""
    out = {}
    for shape in buckets:
        sample = make_sample(model, batch, parse_label(shape)).to(device)
        with torch.inference_mode():
            out[shape] = measure(call, sample, device, config).median_ms
    return out
