"""The reference file format, written in one place: a sample with its eager fp32 outputs
(``reference.pt``), and a candidate's outputs per check sample.

Both are plain ``torch.save`` files of tensors, lists, dicts and strings, read back with
``weights_only=True``: nothing in them is imported or run. What is read back is checked for its
form before use; a file that is not one of ours raises :class:`ReferenceFormatError`.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from aitune.specs import Sample
from aitune.torch.tree import flatten_tensors


class ReferenceFormatError(ValueError):
    """Bytes that are not a reference (or outputs) file this project wrote."""


def _cpu(value: Any) -> Any:
    return value.cpu() if isinstance(value, torch.Tensor) else value


def pack_reference(sample: Sample, outputs: Any) -> bytes:
    """A sample and its outputs, flattened to (path, tensor) pairs."""
    flat = flatten_tensors(outputs)
    buf = io.BytesIO()
    torch.save({"args": [_cpu(a) for a in sample.args], "kwargs": {k: _cpu(v) for k, v in sample.kwargs.items()},
                "paths": [p for p, _ in flat], "outputs": [t.cpu() for _, t in flat]}, buf)
    return buf.getvalue()


def _load(data: bytes, what: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, EOFError, RuntimeError from a damaged zip...
        raise ReferenceFormatError(f"not {what} this project wrote ({type(exc).__name__})") from None


def unpack_reference(data: bytes) -> dict[str, Any]:
    """A reference's content (``args``, ``kwargs``, ``outputs``, ``paths``), its form checked."""
    ref = _load(data, "a reference")
    if not (isinstance(ref, dict) and isinstance(ref.get("args"), (list, tuple)) and isinstance(ref.get("kwargs"), dict)
            and isinstance(ref.get("outputs"), (list, tuple)) and all(isinstance(t, torch.Tensor) for t in ref["outputs"])):
        raise ReferenceFormatError("not a reference this project wrote (args, kwargs, outputs)")
    return ref


def load_reference(data: bytes) -> tuple[Sample, list[torch.Tensor]]:
    """The sample and its flattened outputs."""
    ref = unpack_reference(data)
    return Sample(tuple(ref["args"]), dict(ref["kwargs"])), list(ref["outputs"])


def pack_outputs(outputs: list[Any]) -> bytes:
    """A candidate's outputs, one flattened list of tensors per check sample."""
    buf = io.BytesIO()
    torch.save({"samples": [[t.cpu() for _, t in flatten_tensors(o)] for o in outputs]}, buf)
    return buf.getvalue()


def unpack_outputs(data: bytes) -> list[list[torch.Tensor]]:
    """What :func:`pack_outputs` wrote, its form checked."""
    stored = _load(data, "a candidate's outputs")
    samples = stored.get("samples") if isinstance(stored, dict) else None
    if not (isinstance(samples, list) and samples and all(
            isinstance(s, list) and all(isinstance(t, torch.Tensor) for t in s) for s in samples)):
        raise ReferenceFormatError("not a candidate's outputs this project wrote (samples)")
    return samples
