"""A candidate's padding check on the worker: at the lengths between its bucket and the one below,
each sample padded up to the bucket and run by the candidate, sliced back, must match eager fp32 on
the unpadded sample within the candidate's own criteria (aitune.shapes.padding_problem)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from aitune.accuracy import Criteria
from aitune.check import compare_outputs
from aitune.shapes import Shapes, padding_problem
from aitune.specs import GraphSpec
from orchestrator.planning.candidates import make_sample
from orchestrator.spec.models import ModelSpec


def candidate_padding_problem(call: Callable[..., Any], module: torch.nn.Module, model: ModelSpec, batch: int,
                              graph_spec: dict[str, Any], padding: dict[str, Any], criteria: Criteria,
                              device: torch.device) -> str | None:
    """None where padding up to this job's bucket gives the candidate's unpadded outputs; else why not."""
    shapes = Shapes.from_dict(padding["shapes"])
    positional = [t.name for t in GraphSpec.from_dict(graph_spec).positional]

    def compare(want: Any, got: Any) -> str | None:
        if criteria.gates is not None:
            return criteria.gates.judge(got, want).reason
        result = compare_outputs(want, got, criteria.tolerance)
        return None if result.ok else result.reason

    with torch.inference_mode():
        return padding_problem(call, module, shapes, lambda lengths: make_sample(model, batch, lengths).to(device),
                               positional, compare, point=padding["point"])
