"""Model outputs of any shape through ``torch.export``: named tuples, dataclasses, objects.

A compiled form (an AOTInductor package, an ONNX model, a TensorRT engine) returns flat tensors
and keeps the output's tree with ``torch.utils._pytree``, which serialises only built-in
containers and types registered with a serialised name: a model returning a ``NamedTuple``
fails to package ("Can't serialize TreeSpec of namedtuple class"), one returning a plain
dataclass fails to export ("Found <class> in output, which is not a known type").

:func:`exportable` gives a view of the module whose forward returns such an output as a flat
tuple of its tensors, and records while it is traced, as JSON, how to put it back together
(:class:`OutputTree`). Outputs torch keeps by itself are returned unchanged and record nothing,
so their exports are what they always were. Rebuilding imports nothing: a type is taken from a
module already imported (the model's factory imports its own), else a stand-in of the same
shape is made (a named tuple with the same fields, a dataclass with the same fields, a dict,
a namespace), which the output check reads the same way.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import math
import sys
import types
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from aitune.torch.tree import DICT, LIST, NAMEDTUPLE, TUPLE, container

_CONSTANTS = (type(None), bool, int, float, str)


class OutputTreeError(ValueError):
    """An output that can't be kept (a leaf neither a tensor nor a JSON constant), or a tree read
    back that is not one this module writes."""


def _type_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _constant(value: Any, path: str) -> dict[str, Any]:
    if isinstance(value, float) and not math.isfinite(value):
        raise OutputTreeError(f"{path} is {value}, which a compiled model's output can't keep")
    return {"value": value}


def describe(value: Any, tensors: list[torch.Tensor], path: str = "output") -> dict[str, Any]:
    """The JSON tree of ``value``, appending its tensors to ``tensors`` in the order it numbers them.
    Containers are told from leaves as every walk of an output tells them (aitune.torch.tree.container)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return {"tensor": len(tensors) - 1}
    if isinstance(value, _CONSTANTS):
        return _constant(value, path)
    found = container(value)
    if found is None:
        raise OutputTreeError(
            f"{path} is a {type(value).__name__}: a compiled model's output can hold tensors, numbers, strings and "
            "None, in tuples, lists, dicts, dataclasses and objects"
        )
    kind, items = found
    if kind == NAMEDTUPLE:
        described = [describe(v, tensors, f"{path}.{k}") for k, v in items]
        return {"namedtuple": _type_path(type(value)), "fields": list(type(value)._fields), "items": described}
    if kind in (TUPLE, LIST):
        return {kind: [describe(v, tensors, f"{path}[{i}]") for i, v in items]}
    if kind == DICT:  # HF ModelOutput too: a dict subclass
        for k, _ in items:
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise OutputTreeError(f"{path} has key {k!r}: only str and int keys can be kept")
        pairs = [[k, describe(v, tensors, f"{path}[{k!r}]")] for k, v in items]
        return {"dict": pairs} if type(value) is dict else {"mapping": _type_path(type(value)), "items": pairs}
    # a dataclass instance, or a plain object holding tensors: its fields, or public attributes
    return {kind: _type_path(type(value)), "fields": [[k, describe(v, tensors, f"{path}.{k}")] for k, v in items]}


#: the modules whose containers every process reading an artifact back has registered with pytree
_ALWAYS_REGISTERED = ("builtins", "collections", "torch")


def _only_builtin_nodes(spec: pytree.TreeSpec) -> bool:
    """Whether every container in ``spec`` is one any process can read back. A type a library
    registers (an HF ``ModelOutput``) is known to pytree only where that library was imported:
    a deploy target or ``load_tuned`` loading the artifact has not imported it."""
    node = spec.type
    if node is not None and not spec.is_leaf() and node.__module__.split(".")[0] not in _ALWAYS_REGISTERED:
        return False
    return all(_only_builtin_nodes(child) for child in spec.children())


def _torch_keeps(value: Any) -> bool:
    """Whether torch's own pytree exports and serialises ``value`` as it is, and reads it back in
    any process (its containers built-in ones)."""
    leaves, spec = pytree.tree_flatten(value)
    if not all(isinstance(leaf, (torch.Tensor, *_CONSTANTS)) for leaf in leaves):
        return False  # an unregistered dataclass or object: a leaf to pytree, refused by export
    try:
        pytree.treespec_dumps(spec)
    except Exception:  # noqa: BLE001 - a named tuple or a type registered without a serialised name
        return False
    return _only_builtin_nodes(spec)


def exportable(module: torch.nn.Module, bound: dict[str, Any] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``(view, record)``: ``view`` is ``module`` (the same parameters, names and class) whose
    forward returns an output torch can't keep as a flat tuple of its tensors; tracing it puts
    that output's tree in ``record["tree"]``. Export ``view``; an empty ``record`` after the
    export means the output went through unchanged.

    ``bound``: keyword arguments that are not inputs of the exported graph (flags such as
    ``return_dict=False``), passed to every call of ``module`` as they are given here, so that
    the export traces what the model does with them rather than with its defaults."""
    record: dict[str, Any] = {}
    forward = module.forward
    bound = dict(bound or {})

    @functools.wraps(forward)  # torch.export reads the parameter names through __wrapped__
    def flat_forward(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **{**bound, **kwargs})
        if torch.compiler.is_dynamo_compiling():
            return out  # a strict (dynamo) capture: as always (see flat_tree for what it leaves)
        record.clear()
        if _torch_keeps(out):
            return out
        tensors: list[torch.Tensor] = []
        record["tree"] = describe(out, tensors)
        return tuple(tensors)

    view = copy.copy(module)  # a new attribute dict; the same parameters and submodules
    view.forward = flat_forward
    return view, record


def flat_tree(record: dict[str, Any], out_spec: pytree.TreeSpec) -> "OutputTree | None":
    """The tree of an export of an :func:`exportable` view whose program has ``out_spec``; None
    where the output went through unchanged. A capture that ran the view and failed leaves its
    tree behind for one that did not (an exporter falling back to strict capture): a tree is
    taken only when the program returns the flat tuple it describes."""
    tree = OutputTree.read(record.get("tree"))
    if tree is None:
        return None
    flat = (out_spec.type is tuple and out_spec.num_children == tree.count
            and all(c.is_leaf() for c in out_spec.children()))
    return tree if flat else None


# -- rebuilding ----------------------------------------------------------------------------------


def _checked_path(path: Any, where: str) -> str:
    if not isinstance(path, str) or path.count(":") != 1:
        raise OutputTreeError(f"output tree: {where} names type {path!r}, not 'module:qualname'")
    return path


def _loaded_type(path: str) -> type | None:
    """The type ``module:qualname`` names, from a module already imported; None if there is none.
    A tree looks its types up on first use, not when it is read: a checkpoint may be loaded before
    the model's factory, which imports the output's type, and used after."""
    module_name, qualname = path.split(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None and part.isidentifier() else None
    return obj if isinstance(obj, type) else None


def _stand_in_name(path: str) -> str:
    return path.rsplit(":", 1)[-1].rsplit(".", 1)[-1]  # "pkg.mod:Outer.Out" -> "Out"


def _names(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(n, str) and n.isidentifier() for n in value):
        raise OutputTreeError(f"output tree: {where} fields must be a list of names, got {value!r}")
    return value


def _pairs(value: Any, where: str, keys: tuple[type, ...]) -> list[tuple[Any, Any]]:
    if not isinstance(value, list) or not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], keys) and not isinstance(p[0], bool) for p in value
    ):
        raise OutputTreeError(f"output tree: {where} must be a list of [key, item] pairs, got {value!r}")
    return [(k, v) for k, v in value]


_Builder = Callable[[list[torch.Tensor]], Any]


def _namedtuple_type(path: str, fields: list[str]) -> type:
    cls = _loaded_type(path)
    if cls is not None and issubclass(cls, tuple) and list(getattr(cls, "_fields", ())) == fields:
        return cls
    return collections.namedtuple(_stand_in_name(path), fields)


def _dataclass_type(path: str, fields: list[str]) -> type:
    cls = _loaded_type(path)
    if cls is not None and dataclasses.is_dataclass(cls) and [f.name for f in dataclasses.fields(cls)] == fields:
        return cls
    return dataclasses.make_dataclass(_stand_in_name(path), fields)


def _fill(cls: type, values: dict[str, Any]) -> Any:
    """An instance of ``cls`` with these attributes, without calling its ``__init__``."""
    new = cls.__new__(cls)
    for name, value in values.items():
        object.__setattr__(new, name, value)
    return new


def _compile(node: Any, slots: set[int]) -> _Builder:
    if not isinstance(node, dict):
        raise OutputTreeError(f"output tree: {node!r} is not a node")
    if set(node) == {"tensor"}:
        index = node["tensor"]
        if not isinstance(index, int) or isinstance(index, bool) or index < 0 or index in slots:
            raise OutputTreeError(f"output tree: tensor slot {index!r} is not a new non-negative integer")
        slots.add(index)
        return lambda tensors: tensors[index]
    if set(node) == {"value"}:
        value = node["value"]
        if not isinstance(value, _CONSTANTS) or (isinstance(value, float) and not math.isfinite(value)):
            raise OutputTreeError(f"output tree: constant {value!r} is not a JSON constant")
        return lambda tensors: value
    if set(node) in ({"tuple"}, {"list"}):
        kind = "tuple" if "tuple" in node else "list"
        if not isinstance(node[kind], list):
            raise OutputTreeError(f"output tree: a {kind} must hold a list, got {node[kind]!r}")
        parts = [_compile(child, slots) for child in node[kind]]
        make = tuple if kind == "tuple" else list
        return lambda tensors: make(part(tensors) for part in parts)
    if set(node) == {"namedtuple", "fields", "items"}:
        fields = _names(node["fields"], "a named tuple's")
        if not isinstance(node["items"], list) or len(node["items"]) != len(fields):
            raise OutputTreeError(f"output tree: named tuple {node['namedtuple']!r} has {len(fields)} fields "
                                  "but not as many items")
        path = _checked_path(node["namedtuple"], "a named tuple")  # checked now, the type found on first use
        cls = functools.cache(lambda: _namedtuple_type(path, fields))
        parts = [_compile(child, slots) for child in node["items"]]
        return lambda tensors: cls()(*(part(tensors) for part in parts))
    if set(node) == {"dict"}:
        pairs = [(k, _compile(v, slots)) for k, v in _pairs(node["dict"], "a dict", (str, int))]
        return lambda tensors: {k: part(tensors) for k, part in pairs}
    if set(node) == {"mapping", "items"}:
        return _mapping(node, slots)
    if set(node) == {"dataclass", "fields"}:
        pairs = [(k, _compile(v, slots)) for k, v in _pairs(node["fields"], "a dataclass", (str,))]
        names = _names([k for k, _ in pairs], "a dataclass's")
        path = _checked_path(node["dataclass"], "a dataclass")
        cls = functools.cache(lambda: _dataclass_type(path, names))
        return lambda tensors: _fill(cls(), {k: part(tensors) for k, part in pairs})
    if set(node) == {"object", "fields"}:
        return _object(node, slots)
    raise OutputTreeError(f"output tree: unknown node {sorted(node)}")


def _mapping(node: dict[str, Any], slots: set[int]) -> _Builder:
    """A dict subclass's node (HF ModelOutput): its type where it is loaded and can be made, else a dict."""
    path = _checked_path(node["mapping"], "a mapping")
    found = functools.cache(lambda: _loaded_type(path))
    pairs = [(k, _compile(v, slots)) for k, v in _pairs(node["items"], "a mapping", (str, int))]

    def mapping(tensors: list[torch.Tensor]) -> Any:
        items = {k: part(tensors) for k, part in pairs}
        cls = found()
        if cls is None or not issubclass(cls, dict):
            return items
        try:  # HF ModelOutput: set item by item (its update() refuses)
            new = cls()
            for k, v in items.items():
                new[k] = v
            return new
        except Exception:  # noqa: BLE001 - a subclass that needs arguments: the items as a dict
            return items

    return mapping


def _object(node: dict[str, Any], slots: set[int]) -> _Builder:
    """A plain object's node: its type where it is loaded and can be made, else a namespace."""
    pairs = [(k, _compile(v, slots)) for k, v in _pairs(node["fields"], "an object", (str,))]
    _names([k for k, _ in pairs], "an object's")
    path = _checked_path(node["object"], "an object")
    found = functools.cache(lambda: _loaded_type(path))

    def obj(tensors: list[torch.Tensor]) -> Any:
        values = {k: part(tensors) for k, part in pairs}
        cls = found()
        try:
            return _fill(cls, values) if cls is not None else types.SimpleNamespace(**values)
        except Exception:  # noqa: BLE001 - a type that can't be made without its __init__
            return types.SimpleNamespace(**values)

    return obj


class OutputTree:
    """A model output's tree, as :func:`exportable` recorded it: JSON in a checkpoint, checked
    whole when read back, then used to rebuild each call's output from the flat tensors."""

    def __init__(self, tree: Any) -> None:
        slots: set[int] = set()
        self._build = _compile(tree, slots)
        if slots != set(range(len(slots))):
            raise OutputTreeError(f"output tree: tensor slots {sorted(slots)} are not 0..{len(slots) - 1}")
        self.tree, self.count = copy.deepcopy(tree), len(slots)

    def rebuild(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> Any:
        tensors = list(tensors)
        if len(tensors) != self.count:
            raise OutputTreeError(f"output tree: the compiled model returned {len(tensors)} tensors, "
                                  f"the tree holds {self.count}")
        return self._build(tensors)

    @classmethod
    def read(cls, tree: Any) -> "OutputTree | None":
        """The tree a backend's state holds (None: the output went through unchanged)."""
        return None if tree is None else cls(tree)
