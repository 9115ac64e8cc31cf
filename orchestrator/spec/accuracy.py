"""The spec's ``accuracy`` section: gates beyond the elementwise tolerance (``aitune.accuracy``).

    accuracy:
      quantized: {cosine: 0.999, sqnr_db: 30}     # quantized candidates (TorchAO...), instead of a tolerance
      precisions: {bfloat16: {cosine: 0.9999}}    # other candidates of a precision, on top of their tolerance
      task: {samples: pkg.mod:eval_batches, metric: top1_agreement, min: 0.99}   # on the user's batches

A candidate may carry its own ``accuracy`` (the same fields), which wins over both. Without any,
a quantized candidate is judged by ``aitune.accuracy.DEFAULT_QUANTIZED_GATES``.
"""

from __future__ import annotations

import math

from pydantic import Field, field_validator, model_validator

from aitune.accuracy import BUILTIN_METRICS, DEFAULT_QUANTIZED_GATES, GATE_NAMES, Gates
from aitune.torch.module_ref import ImportPathError, import_object
from orchestrator.spec.sections import Precision
from orchestrator.spec.strict import Strict


class GatesSpec(Strict):
    #: the least cosine similarity of each output tensor with the reference's
    cosine: float | None = Field(default=None, gt=0, le=1)
    #: the least signal-to-quantization-noise ratio of each output tensor, in dB
    sqnr_db: float | None = None
    #: the largest relative error over the reference's top ``topk`` entries of each row
    topk_rel_err: float | None = Field(default=None, ge=0)
    topk: int = Field(default=5, ge=1)

    @field_validator("sqnr_db")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("give a finite number of dB")
        return value

    @model_validator(mode="after")
    def _something(self) -> "GatesSpec":
        if all(getattr(self, name) is None for name in GATE_NAMES):
            raise ValueError(f"give at least one gate: {', '.join(GATE_NAMES)}")
        return self

    def gates(self) -> Gates:
        return Gates(cosine=self.cosine, sqnr_db=self.sqnr_db, topk_rel_err=self.topk_rel_err, topk=self.topk)


def _default_quantized() -> GatesSpec:
    d = DEFAULT_QUANTIZED_GATES
    return GatesSpec(cosine=d.cosine, sqnr_db=d.sqnr_db, topk_rel_err=d.topk_rel_err, topk=d.topk)


class AccuracySpec(Strict):
    #: gates of quantized candidates, judged by them instead of an elementwise tolerance
    quantized: GatesSpec = Field(default_factory=_default_quantized)
    #: per precision ("bfloat16"...): gates other candidates of that precision meet as well as their tolerance
    precisions: dict[Precision, GatesSpec] = Field(default_factory=dict)
    #: a gate on the user's evaluation batches, for every candidate judged by gates
    task: "TaskSpec | None" = None


class TaskSpec(Strict):
    """A gate on the user's own evaluation batches, for the candidates judged by gates."""

    #: import path of ``fn(model: str, batch_size: int)`` returning the evaluation batches for that
    #: model at that batch size (each a tensor, a tuple of them, or an aitune Sample), or None: no
    #: task gate for that model
    samples: str
    #: ``top1_agreement`` (with eager fp32), or the import path of ``fn(candidate_outputs, reference_outputs) -> float``
    metric: str = "top1_agreement"
    min: float | None = None
    max: float | None = None

    @field_validator("samples")
    @classmethod
    def _importable(cls, value: str) -> str:
        _import(value)
        return value

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value not in BUILTIN_METRICS:
            if ":" not in value:
                raise ValueError(f"give {', '.join(BUILTIN_METRICS)} or an import path 'package.module:function'")
            _import(value)
        return value

    @model_validator(mode="after")
    def _one_bound(self) -> "TaskSpec":
        if (self.min is None) == (self.max is None):
            raise ValueError("give min (the figure must reach it) or max (it must stay under it), one of them")
        return self


def _import(path: str) -> None:
    try:
        import_object(path)
    except ImportPathError as exc:
        raise ValueError(str(exc)) from None


AccuracySpec.model_rebuild()
