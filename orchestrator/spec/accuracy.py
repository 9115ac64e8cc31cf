"""The spec's ``accuracy`` section: gates beyond the elementwise tolerance (``aitune.accuracy``).

    accuracy:
      quantized: {cosine: 0.999, sqnr_db: 30}     # quantized candidates (TorchAO...), instead of a tolerance
      precisions: {bfloat16: {cosine: 0.9999}}    # other candidates of a precision, on top of their tolerance

A candidate may carry its own ``accuracy`` (the same fields), which wins over both. Without any,
a quantized candidate is judged by ``aitune.accuracy.DEFAULT_QUANTIZED_GATES``.
"""

from __future__ import annotations

import math

from pydantic import Field, field_validator, model_validator

from aitune.accuracy import DEFAULT_QUANTIZED_GATES, GATE_NAMES, Gates
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
