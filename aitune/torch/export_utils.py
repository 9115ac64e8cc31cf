"""``torch.export`` helpers shared by the AOTInductor and ONNX backends."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from aitune.specs import GraphSpec, Sample


def dynamic_shapes_for(module: torch.nn.Module, spec: GraphSpec, sample: Sample) -> dict[str, Any] | None:
    """``torch.export`` dynamic shapes from the spec's dynamic axes, keyed by forward()'s parameter names."""
    if not spec.is_dynamic:
        return None
    params = [p for p in inspect.signature(module.forward).parameters.values() if p.kind != p.VAR_KEYWORD]
    by_input = {t.name: t for t in spec.inputs}
    positional = [t.name for t in spec.positional]
    dims: dict[tuple[str, int], Any] = {}
    shapes: dict[str, Any] = {}
    for i, _ in enumerate(sample.args):
        shapes[params[i].name] = _axes(by_input.get(positional[i]) if i < len(positional) else None, dims)
    for name in sample.kwargs:
        shapes[name] = _axes(by_input.get(name), dims)
    return shapes


def _axes(tensor_spec, dims) -> dict[int, Any] | None:
    if tensor_spec is None or not tensor_spec.dynamic_axes:
        return None
    out = {}
    for axis, (lo, hi) in tensor_spec.dynamic_axes.items():
        # One shared Dim per (axis, range): inputs whose batch axes must agree share a symbol.
        key = (f"axis{axis}", lo, hi)
        if key not in dims:
            dims[key] = torch.export.Dim(f"axis{axis}_{lo}_{hi}", min=lo, max=hi)
        out[axis] = dims[key]
    return out


def export_module(module: torch.nn.Module, spec: GraphSpec, sample: Sample) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(
            module, tuple(sample.args), dict(sample.kwargs), dynamic_shapes=dynamic_shapes_for(module, spec, sample)
        )
