"""Canonical JSON and the SHA-256 keys built on it.

A key must be the same in every process and on every machine for equal values, so nothing
that depends on the process may leak into it: no ``repr`` of objects (memory addresses), no
iteration order of sets (``PYTHONHASHSEED``), no absolute paths.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from pathlib import Path, PurePath
from typing import Any

import torch


class CanonicalError(TypeError):
    """A value has no stable canonical form (an arbitrary object, an absolute path...)."""


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.float16`` -> ``"float16"``; plain names pass through after validation."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return name


def to_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, dtype_name(name))


def canonicalize(value: Any, where: str = "value") -> Any:
    """Turn ``value`` into plain JSON types with a stable order.

    ``where`` names the position for error messages ("config.options.foo").
    """
    # Enums first: a str or int enum (``class Mode(str, Enum)``) would otherwise pass as itself.
    if isinstance(value, enum.Enum):
        return canonicalize(value.value, where)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CanonicalError(f"{where}: non-finite float {value!r} has no JSON form")
        return value
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, PurePath):
        if value.is_absolute():
            raise CanonicalError(f"{where}: absolute path {str(value)!r} would make the key machine-specific")
        return value.as_posix()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonicalize(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int, enum.Enum)):
                raise CanonicalError(f"{where}: dict key {k!r} must be a string")
            key = str(canonicalize(k, where))
            out[key] = canonicalize(v, f"{where}.{key}")
        return dict(sorted(out.items()))
    if isinstance(value, (set, frozenset)):
        items = [canonicalize(v, f"{where}[]") for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, (list, tuple)):
        return [canonicalize(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "model_dump"):  # pydantic models
        return canonicalize(value.model_dump(mode="json"), where)
    raise CanonicalError(f"{where}: {type(value).__name__} has no canonical JSON form")


def canonical_json(value: Any) -> str:
    return json.dumps(canonicalize(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_of(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def update_with_tensor(digest: "hashlib._Hash", tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes (on the CPU, contiguous) to ``digest``: equal tensors, equal digests."""
    plain = tensor.detach().to("cpu").contiguous()
    digest.update(f"{plain.dtype}{tuple(plain.shape)}".encode())
    digest.update(plain.reshape(-1).view(torch.uint8).numpy().tobytes())
