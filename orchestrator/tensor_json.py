"""Tensors as JSON for the HTTP API of ``orchestrator.serve``.

A tensor is ``{"dtype": "float32", "shape": [2, 16], "data": [...]}`` with ``data`` the values
flattened in row-major (C) order. A request is ``{"inputs": [TENSOR, ...]}`` (the model's
positional inputs, in order); a response is
``{"model": NAME, "version": "v0002-...", "outputs": [{"path": "output", **TENSOR}, ...]}``, one
entry per tensor in the model's output (``path`` names it inside tuples, dicts and dataclasses:
``output``, ``output[0]``, ``output['logits']``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from aitune.torch.tree import flatten_tensors

_DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")}


class TensorJsonError(ValueError):
    """A request whose tensors can't be read; the message names which and why."""


def encode(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().cpu()
    name = str(t.dtype).removeprefix("torch.")
    data = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    return {"dtype": name, "shape": list(t.shape), "data": data.reshape(-1).tolist()}


def decode(value: Any, where: str = "inputs[0]") -> torch.Tensor:
    if not isinstance(value, dict) or not {"dtype", "shape", "data"} <= set(value):
        raise TensorJsonError(f"{where}: a tensor is {{\"dtype\": ..., \"shape\": [...], \"data\": [...]}}")
    dtype = _DTYPES.get(value["dtype"])
    if dtype is None:
        raise TensorJsonError(f"{where}: unknown dtype {value['dtype']!r}; known: {', '.join(_DTYPES)}")
    shape = value["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise TensorJsonError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    data = value["data"]
    if not isinstance(data, list) or len(data) != math.prod(shape):
        got = len(data) if isinstance(data, list) else type(data).__name__
        raise TensorJsonError(f"{where}: shape {shape} needs {math.prod(shape)} values in data, got {got}")
    try:
        return torch.tensor(data, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TensorJsonError(f"{where}: data can't be read as {value['dtype']}: {exc}") from None


def request(*tensors: torch.Tensor) -> dict[str, Any]:
    return {"inputs": [encode(t) for t in tensors]}


def decode_request(body: Any) -> list[torch.Tensor]:
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise TensorJsonError('the request body must be {"inputs": [TENSOR, ...]}')
    return [decode(v, f"inputs[{i}]") for i, v in enumerate(body["inputs"])]


def encode_outputs(outputs: Any) -> list[dict[str, Any]]:
    return [{"path": path, **encode(t)} for path, t in flatten_tensors(outputs)]


def decode_outputs(body: dict[str, Any]) -> list[torch.Tensor]:
    return [decode(v, f"outputs[{i}]") for i, v in enumerate(body["outputs"])]
