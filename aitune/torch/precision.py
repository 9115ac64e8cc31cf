"""Precision names shared by the backends, and moving inputs to a backend's dtype and layout."""

from __future__ import annotations

import torch

from aitune.specs import Sample

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def normalize_precision(name: str, owner: str = "config") -> str:
    name = ALIASES.get(str(name).lower(), str(name).lower())
    if name not in PRECISIONS:
        raise ValueError(f"{owner}: precision {name!r} is not one of {sorted(PRECISIONS)} (or {sorted(ALIASES)})")
    return name


def cast_sample(sample: Sample, dtype: torch.dtype | None, channels_last: bool = False) -> Sample:
    """Cast floating tensors to ``dtype`` (token ids and masks keep theirs); 4-D ones to channels-last."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    return sample.map(fn)
