"""Walking nested model outputs: tensors inside tuples, lists, dicts, dataclasses and objects."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch

#: the kinds of container :func:`container` tells apart (the names an output tree's JSON uses too)
NAMEDTUPLE, TUPLE, LIST, DICT, DATACLASS, OBJECT = "namedtuple", "tuple", "list", "dict", "dataclass", "object"
_SEQUENCES = (NAMEDTUPLE, TUPLE, LIST)


def container(value: Any) -> tuple[str, list[tuple[Any, Any]]] | None:
    """``(kind, items)``: what kind of container ``value`` is, and its ``(key, item)`` pairs in a
    stable order; None for a leaf (a tensor, a constant, anything else). The one rule by which
    every walk of a model's output (:func:`flatten_tensors`, :func:`map_tensors`, and
    ``aitune.torch.output_tree``, which keeps an output's tree through ``torch.export``) tells a
    container from a leaf.

    Keys: a named tuple's field names, a tuple's or list's indices, a dict's keys (any dict, HF
    ``ModelOutput`` too, which is also a dataclass), a dataclass instance's field names, and the
    public attributes of a plain object that holds tensors directly.
    """
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):
        return NAMEDTUPLE, list(zip(type(value)._fields, value))
    if isinstance(value, (tuple, list)):
        return (TUPLE if isinstance(value, tuple) else LIST), list(enumerate(value))
    if isinstance(value, dict):
        return DICT, list(value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return DATACLASS, [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    attrs = getattr(value, "__dict__", None)
    if isinstance(attrs, dict) and any(isinstance(v, torch.Tensor) for v in attrs.values()):
        return OBJECT, [(k, v) for k, v in attrs.items() if not k.startswith("_")]
    return None


def children(value: Any) -> list[tuple[str, Any]] | None:
    """``value``'s items, each with the suffix of the path that reaches it (``[0]``, ``['key']``,
    ``.field``); None for a leaf. The paths of :func:`flatten_tensors` and of the output check."""
    found = container(value)
    if found is None:
        return None
    kind, items = found
    return [(f"[{i}]" if kind in _SEQUENCES else f"[{key!r}]" if kind == DICT else f".{key}", child)
            for i, (key, child) in enumerate(items)]


def flatten_tensors(value: Any, path: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in ``value`` with the path that reaches it, in a stable order."""
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    out: list[tuple[str, torch.Tensor]] = []
    for suffix, child in children(value) or []:
        out.extend(flatten_tensors(child, path + suffix))
    return out


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """A copy of ``value`` with ``fn`` applied to every tensor.

    Tuples (named ones too), lists and dicts are rebuilt; dict subclasses (model-output objects),
    dataclass instances and plain objects holding tensors (the objects :func:`flatten_tensors`
    walks into) are shallow-copied and their entries, fields or public attributes replaced, so
    the original is left as it was (a clone of a graph's outputs shares none of them); anything
    else is returned as it is.
    """
    if isinstance(value, torch.Tensor):
        return fn(value)
    found = container(value)
    if found is None:
        return value
    kind, items = found
    mapped = [(k, map_tensors(v, fn)) for k, v in items]
    if kind == NAMEDTUPLE:
        return type(value)(*(v for _, v in mapped))
    if kind in (TUPLE, LIST):
        return type(value)(v for _, v in mapped)
    if kind == DICT and type(value) is dict:
        return dict(mapped)
    new = copy.copy(value)
    if kind == OBJECT:
        new.__dict__.update(mapped)
    elif kind == DATACLASS:
        for k, v in mapped:
            object.__setattr__(new, k, v)
    else:  # a dict subclass; a model output is a dataclass too, whose fields follow its entries
        for k, v in mapped:
            new[k] = v
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                field = new[f.name] if f.name in value else map_tensors(getattr(value, f.name), fn)
                object.__setattr__(new, f.name, field)
    return new
