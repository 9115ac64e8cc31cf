"""How a built candidate is judged, one rule for every caller: check against the reference, then
measure only what is correct.

``aitune.tune`` and the orchestrator's workers both call :func:`judge`, so a candidate is treated
the same way whether it is tuned in one process or on a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from aitune.accuracy import Criteria
from aitune.check import CheckResult, Tolerance, check_samples
from aitune.measure import MeasureConfig, Measurement, measure
from aitune.specs import Sample
from aitune.torch.cuda_graphs import without_output_clones
from aitune.torch.tree import map_tensors

OK, INCORRECT = "ok", "incorrect"


@dataclass
class Judgement:
    status: str  # ok | incorrect
    check: CheckResult | None
    measurement: Measurement | None
    #: the candidate's outputs on each sample, on the CPU (for a later re-check under other tolerances)
    outputs: list[Any]
    error: str | None = None


def run_samples(infer: Callable[..., Any], samples: Sequence[Sample]) -> list[Any]:
    """Each sample's outputs, copied to the CPU before the next call (so backends need not clone)."""
    with torch.inference_mode(), without_output_clones():
        return [map_tensors(s(infer), lambda t: t.detach().to("cpu").clone()) for s in samples]


def judge(
    infer: Callable[..., Any],
    samples: Sequence[Sample],
    reference: Sequence[Any],
    device: torch.device | str,
    tolerance: Tolerance,
    measure_config: MeasureConfig | None,
    *,
    check: bool = True,
    previous_check: CheckResult | None = None,
    criteria: Criteria | None = None,
    task: tuple[Sequence[Sample], Sequence[Any]] | None = None,
) -> Judgement:
    """Check ``infer`` on ``samples`` against ``reference``; measure it only when it is correct.

    ``measure_config=None`` checks only. ``check=False`` keeps ``previous_check`` (a re-measure of
    an artifact whose check still holds). ``criteria`` (with ``tolerance`` as its tolerance) adds
    accuracy gates, or replaces the elementwise check by them (quantized candidates); ``task``
    (evaluation batches, their eager fp32 outputs) gives its task gate a figure.
    """
    outputs = run_samples(infer, samples)
    result = previous_check
    if check:
        result = check_samples(list(reference), outputs, tolerance)
        if criteria is not None:
            figure = None
            if criteria.task is not None and task is not None:  # the user's evaluation batches and their reference
                figure = criteria.task.figure(run_samples(infer, task[0]), list(task[1]))
            result = criteria.apply(result, outputs, list(reference), figure)
    if result is not None and not result.ok:
        return Judgement(INCORRECT, result, None, outputs, result.reason)
    measurement = measure(infer, samples[0], device, measure_config) if measure_config is not None else None
    return Judgement(OK, result, measurement, outputs)
