"""Walking nested model outputs: tensors inside tuples, lists, dicts, dataclasses and objects."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import torch


def _children(value: Any) -> Iterator[tuple[str, Any]] | None:
    if isinstance(value, dict):  # also HF ModelOutput, an OrderedDict subclass
        return ((f"[{k!r}]", v) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return ((f"[{i}]", v) for i, v in enumerate(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return ((f".{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value))
    attrs = getattr(value, "__dict__", None)
    if attrs and any(isinstance(v, torch.Tensor) for v in attrs.values()):
        return ((f".{k}", v) for k, v in attrs.items() if not k.startswith("_"))
    return None


def flatten_tensors(value: Any, path: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in ``value`` with the path that reaches it, in a stable order."""
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    children = _children(value)
    if children is None:
        return []
    out: list[tuple[str, torch.Tensor]] = []
    for suffix, child in children:
        out.extend(flatten_tensors(child, path + suffix))
    return out


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor, rebuilding tuples, lists and dicts (other containers are walked in place)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict) and type(value) is dict:
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value
