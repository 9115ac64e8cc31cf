"""The checks behind the sweep spec's validators, for what a worker would otherwise find too late.

What the sample maker can make (dtypes, value ranges, sizes), what a factory can be called with
and says it returns, and a backend config's fields checked strictly against their annotations.
Each check returns problems as ``(field path, message)``; ``problems_error`` turns them into one
pydantic error, so that a validator reports several problems at their own paths.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import math
import os
import types
import typing
import unicodedata
from typing import Any, Callable, Literal, Union

import torch
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from aitune.canonical import CanonicalError, canonicalize

Loc = tuple[str | int, ...]
Problems = list[tuple[Loc, str]]

#: what ``orchestrator.planning.candidates.make_sample`` makes: floats drawn in float32 and cast, integers
#: from ``torch.randint``, bools all True. Not complex, quantized, float8 or sub-byte types (it
#: can't draw them), nor uint16/32/64 (PyTorch runs few operators on them).
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INT_DTYPES = ("uint8", "int8", "int16", "int32", "int64")
SAMPLE_DTYPES = FLOAT_DTYPES + INT_DTYPES + ("bool",)

_F32_MAX = torch.finfo(torch.float32).max
# torch.randint takes its bounds as int64, whatever the dtype it makes.
_RANDINT_MAX = torch.iinfo(torch.int64).max


def problems_error(problems: Problems, title: str = "spec") -> ValidationError:
    return ValidationError.from_exception_data(
        title,
        [InitErrorDetails(type=PydanticCustomError("spec", "{message}", {"message": m}), loc=loc, input=None) for loc, m in problems],
    )


def has_control_characters(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


# -- what a value is, and what was expected, in words ---------------------------------------------
def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {_short(repr(value))}"
    if isinstance(value, (list, tuple)):
        return f"the list {_short(repr(list(value)))}"
    if isinstance(value, dict):
        return f"the mapping {_short(repr(value))}"
    return f"a {type(value).__name__}"


_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a mapping", type(None): "null"}


def expected(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(expected(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if (origin or hint) in (list, tuple, set, frozenset):
        items = [a for a in args if a is not Ellipsis]
        return f"a list (each item {expected(items[0])})" if len(set(items)) == 1 else "a list"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return _WORDS.get(origin or hint, getattr(hint, "__name__", str(hint)))


# -- inputs the sample maker makes ----------------------------------------------------------------
def int_range_problem(dtype: str, low: int, high: int) -> str | None:
    if dtype == "bool":
        return "int_range does not apply to bool inputs (the sample maker makes them all True); leave it out"
    info = torch.iinfo(getattr(torch, dtype))
    top = min(info.max + 1, _RANDINT_MAX)
    if low < info.min or high > top:
        return f"int_range {[low, high]} does not fit {dtype}: low must be >= {info.min} and high (exclusive) <= {top}"
    return None


def float_range_problem(dtype: str, low: float, high: float) -> str | None:
    # The sample maker draws in float32 and casts, so float32 bounds float64 inputs too.
    limit = min(torch.finfo(getattr(torch, dtype)).max, _F32_MAX)
    note = " (the sample maker draws float64 inputs in float32)" if dtype == "float64" else ""
    if low < -limit or high > limit:
        return f"range {[low, high]} is outside {dtype}'s finite values [{-limit:g}, {limit:g}]{note}"
    if high - low > _F32_MAX:
        return f"range {[low, high]} is wider than float32's largest value {_F32_MAX:g}, in which the sample maker draws"
    return None


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare with
        return None


def memory_problem(batch: int, shape: list[int], dtype: str, total: int | None) -> str | None:
    itemsize = getattr(torch, dtype).itemsize
    size = batch * math.prod(shape) * itemsize
    if total is None or size <= total:
        return None
    gib = 1024**3
    return (
        f"at batch size {batch} this input takes {size / gib:.1f} GiB ({batch} x {shape} x {itemsize}-byte {dtype}), "
        f"more than the {total / gib:.1f} GiB of memory this machine has; lower the batch size or the shape"
    )


# -- factories: what can be known without calling them ------------------------------------------
_UNKNOWN = object()


def return_hint(obj: Callable) -> Any:
    """What ``obj`` says it returns (a class returns itself); ``_UNKNOWN`` when it doesn't say."""
    if isinstance(obj, type):
        return obj
    try:
        annotation = inspect.signature(obj, eval_str=True).return_annotation
    except Exception:  # no signature, or an annotation naming what isn't importable here
        return _UNKNOWN
    if annotation is inspect.Signature.empty or isinstance(annotation, str):
        return _UNKNOWN
    return type(None) if annotation is None else annotation


def _plain_class(hint: Any) -> type | None:
    """The class ``hint`` clearly is, or None when it is open (a union, Any, a TypeVar, a protocol)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return None
    klass = origin if isinstance(origin, type) else hint
    if not isinstance(klass, type) or klass in (typing.Any, object) or getattr(klass, "_is_protocol", False):
        return None
    return klass


def signature_problem(obj: Callable, path: str, **kwargs: Any) -> str | None:
    """Why ``obj(**kwargs)`` can't be called, judged from its signature alone."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: only a call would tell
        return None
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        return f"{path!r} can't be called with {sorted(kwargs) or 'no arguments'}: {exc}; its signature is {signature}"
    return None


def model_factory_problem(obj: Callable, path: str) -> str | None:
    klass = _plain_class(return_hint(obj))
    if klass is None or issubclass(klass, torch.nn.Module):
        return None
    said = "is a class" if obj is klass else "is annotated to return"
    return f"{path!r} {said} {klass.__name__}, not a torch.nn.Module; a model factory returns the model"


_NOT_SAMPLES = (type(None), bool, int, float, complex, str, bytes, torch.nn.Module)


def sample_factory_problem(obj: Callable, path: str) -> str | None:
    klass = _plain_class(return_hint(obj))
    if klass is None or not issubclass(klass, _NOT_SAMPLES):
        return None
    said = "is a class" if obj is klass else "is annotated to return"
    return f"{path!r} {said} {klass.__name__}; a sample factory returns an aitune.Sample, a tensor, or a tuple of inputs"


# -- backend configs, strictly ---------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _field_adapters(config_class: type) -> dict[str, TypeAdapter | None]:
    """A strict adapter per field; None where pydantic can't validate the type (torch.dtype...)."""
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # an annotation that doesn't resolve here: leave the fields to the config
        hints = {}
    adapters: dict[str, TypeAdapter | None] = {}
    for f in dataclasses.fields(config_class):
        adapters[f.name] = None if f.name not in hints else _adapter(hints[f.name])
    return adapters


def _adapter(hint: Any) -> TypeAdapter | None:
    for config in (ConfigDict(allow_inf_nan=False), None):  # a model or dataclass type brings its own config
        try:
            return TypeAdapter(hint, config=config)
        except Exception:
            continue
    return None


def config_problems(config_class: type, config: dict[str, Any]) -> Problems:
    """Each field of ``config`` that ``config_class`` lacks or that doesn't have its annotated type.

    Values are compared in their JSON form, strictly: a bool must be a bool (not "false"), an int
    an int (not 2.0 or "2"), a list a list, an enum or Literal one of its values.
    """
    adapters = _field_adapters(config_class)
    problems: Problems = []
    for name, value in config.items():
        if name not in adapters:
            problems.append(((name,), f"{config_class.__name__} has no field {name!r}; its fields: {', '.join(sorted(adapters))}"))
            continue
        adapter = adapters[name]
        try:
            text = json.dumps(canonicalize(value, name))
        except (CanonicalError, ValueError) as exc:
            problems.append(((name,), f"not a plain JSON value: {exc}"))
            continue
        if adapter is None:
            continue
        try:
            adapter.validate_json(text, strict=True)
        except ValidationError:
            hint = typing.get_type_hints(config_class)[name]
            problems.append(((name,), f"expected {expected(hint)}, got {describe(value)}"))
    return problems
