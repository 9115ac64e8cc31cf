"""Precision names shared by the backends, and moving inputs to a backend's dtype and layout."""

from __future__ import annotations

import contextlib
from typing import Iterator

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


def use_fp32_reference_settings(device: torch.device | str) -> tuple[bool, bool] | None:
    """TF32 off for CUDA matmuls and convolutions when ``device`` is a CUDA device; returns the
    settings it replaced (None where it changed nothing).

    The eager fp32 reference must be real fp32 (TF32 rounds inputs to 10 mantissa bits, far past
    the fp32 tolerance), and every candidate is then judged and measured under the same settings,
    wherever it runs: an orchestrator worker, :func:`aitune.tune`, a re-measure outside both.
    """
    if torch.device(device).type != "cuda":
        return None
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return before


@contextlib.contextmanager
def fp32_reference_settings(device: torch.device | str) -> Iterator[None]:
    """:func:`use_fp32_reference_settings` within a block; the caller's settings come back after it."""
    before = use_fp32_reference_settings(device)
    try:
        yield
    finally:
        if before is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
