"""Tensors as JSON for the HTTP API of ``orchestrator.deploy.serve``.

A tensor is ``{"dtype": "float32", "shape": [2, 16], "data": [...]}`` with ``data`` the values
flattened in row-major (C) order. A request is ``{"inputs": [TENSOR, ...]}`` (the model's
positional inputs, in order); a response is
``{"model": NAME, "version": "v0002-...", "outputs": [{"path": "output", **TENSOR}, ...]}``, one
entry per tensor in the model's output (``path`` names it inside tuples, dicts and dataclasses:
``output``, ``output[0]``, ``output['logits']``).

Values must be finite numbers in a request (NaN, Infinity, and numbers the dtype can't hold, such
as ``1e39`` for float32, are refused). In a response, a non-finite output value is sent as the
string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` (strict JSON has no such numbers), which
:func:`decode_outputs` reads back.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from aitune.torch.tree import flatten_tensors

_DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")}


class TensorJsonError(ValueError):
    """A request whose tensors can't be read; the message names which and why."""


_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _finite_or_name(x: float) -> float | str:
    if math.isfinite(x):
        return x
    return "NaN" if x != x else ("Infinity" if x > 0 else "-Infinity")


def encode(t: torch.Tensor) -> dict[str, Any]:
    t = t.detach().cpu()
    name = str(t.dtype).removeprefix("torch.")
    data = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    values = data.reshape(-1).tolist()
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        values = [_finite_or_name(x) for x in values]
    return {"dtype": name, "shape": list(t.shape), "data": values}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def decode(value: Any, where: str = "inputs[0]", *, allow_nonfinite: bool = False) -> torch.Tensor:
    if not isinstance(value, dict) or not {"dtype", "shape", "data"} <= set(value):
        raise TensorJsonError(f"{where}: a tensor is {{\"dtype\": ..., \"shape\": [...], \"data\": [...]}}")
    name = value["dtype"]
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise TensorJsonError(f"{where}: unknown dtype {_short(name)}; known: {', '.join(_DTYPES)}")
    shape = value["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise TensorJsonError(f"{where}: shape must be a list of non-negative integers, got {_short(shape)}")
    data = value["data"]
    if not isinstance(data, list) or len(data) != math.prod(shape):
        got = len(data) if isinstance(data, list) else type(data).__name__
        raise TensorJsonError(f"{where}: shape {shape} needs {math.prod(shape)} values in data, got {got}")
    if not all(isinstance(x, (int, float)) for x in data):  # flat numbers only (bools are ints)
        if allow_nonfinite and all(isinstance(x, (int, float)) or x in _NONFINITE for x in data):
            data = [_NONFINITE[x] if isinstance(x, str) else x for x in data]
        else:
            bad = next(i for i, x in enumerate(data) if not isinstance(x, (int, float)))
            raise TensorJsonError(f"{where}: data[{bad}] is {type(data[bad]).__name__}, not a number; data is the values flattened")
    if not allow_nonfinite and any(isinstance(x, float) and not math.isfinite(x) for x in data):
        bad = next(i for i, x in enumerate(data) if isinstance(x, float) and not math.isfinite(x))
        raise TensorJsonError(f"{where}: data[{bad}] is {data[bad]}; values must be finite numbers")
    try:
        tensor = torch.tensor(data, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise TensorJsonError(f"{where}: data can't be read as {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not allow_nonfinite and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor.reshape(-1))).nonzero()[0])
        raise TensorJsonError(f"{where}: data[{bad}] = {data[bad]!r} is out of range for {name}")
    return tensor


def request(*tensors: torch.Tensor) -> dict[str, Any]:
    return {"inputs": [encode(t) for t in tensors]}


def decode_request(body: Any) -> list[torch.Tensor]:
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise TensorJsonError('the request body must be {"inputs": [TENSOR, ...]}')
    return [decode(v, f"inputs[{i}]") for i, v in enumerate(body["inputs"])]


def encode_outputs(outputs: Any) -> list[dict[str, Any]]:
    return [{"path": path, **encode(t)} for path, t in flatten_tensors(outputs)]


def decode_outputs(body: dict[str, Any]) -> list[torch.Tensor]:
    return [decode(v, f"outputs[{i}]", allow_nonfinite=True) for i, v in enumerate(body["outputs"])]
