"""Walking nested model outputs: tensors inside tuples, lists, dicts, dataclasses and objects."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Iterator

import torch


def _plain_object_attrs(value: Any) -> dict[str, Any] | None:
    """The public attributes of a plain object that holds tensors directly (None for any other value):
    the one rule by which both walks below treat objects that are no container."""
    attrs = getattr(value, "__dict__", None)
    if attrs and any(isinstance(v, torch.Tensor) for v in attrs.values()):
        return {k: v for k, v in attrs.items() if not k.startswith("_")}
    return None


def _children(value: Any) -> Iterator[tuple[str, Any]] | None:
    if isinstance(value, dict):  # also HF ModelOutput, an OrderedDict subclass
        return ((f"[{k!r}]", v) for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return ((f"[{i}]", v) for i, v in enumerate(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return ((f".{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value))
    attrs = _plain_object_attrs(value)
    if attrs is not None:
        return ((f".{k}", v) for k, v in attrs.items())
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
    """A copy of ``value`` with ``fn`` applied to every tensor.

    Tuples (named ones too), lists and dicts are rebuilt; dict subclasses (model-output objects),
    dataclass instances and plain objects holding tensors (the objects :func:`flatten_tensors`
    walks into) are shallow-copied and their entries, fields or public attributes replaced, so
    the original is left as it was; anything else is returned as it is.
    """
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict) and type(value) is dict:
        return {k: map_tensors(v, fn) for k, v in value.items()}
    is_dataclass = dataclasses.is_dataclass(value) and not isinstance(value, type)
    if not isinstance(value, dict) and not is_dataclass:
        attrs = _plain_object_attrs(value)
        if attrs is None:
            return value
        # A plain object that holds tensors (what flatten_tensors walks into): a shallow copy
        # with those attributes mapped, or a clone of a graph's outputs would still share them.
        new = copy.copy(value)
        for k, v in attrs.items():
            new.__dict__[k] = map_tensors(v, fn)
        return new
    new = copy.copy(value)
    if isinstance(value, dict):
        for k, v in value.items():
            new[k] = map_tensors(v, fn)
    if is_dataclass:
        for f in dataclasses.fields(value):
            # an entry already mapped above is the same value (model outputs keep both in step)
            mapped = new[f.name] if isinstance(value, dict) and f.name in value else map_tensors(getattr(value, f.name), fn)
            object.__setattr__(new, f.name, mapped)
    return new
