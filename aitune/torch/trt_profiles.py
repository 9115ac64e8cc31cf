"""TensorRT optimization-profile shapes from a graph spec; plain Python, no ``tensorrt`` needed."""

from __future__ import annotations

from typing import Sequence

from aitune.specs import GraphSpec, TensorSpec
from aitune.torch.onnx_export import onnx_input_order

Shape = tuple[int, ...]
ProfileShapes = tuple[Shape, Shape, Shape]


def tensor_profile(spec: TensorSpec) -> ProfileShapes:
    """``(min, opt, max)`` of one input: dynamic axes span their range, ``shape`` is the opt size."""
    lo, opt, hi = list(spec.shape), list(spec.shape), list(spec.shape)
    for axis, (a, b) in spec.dynamic_axes.items():
        if not 0 <= axis < len(spec.shape):
            raise ValueError(f"input {spec.name!r}: dynamic axis {axis} is outside its shape {spec.shape}")
        lo[axis], hi[axis] = a, b
    for axis, (a, o, b) in enumerate(zip(lo, opt, hi)):
        if not 0 <= a <= o <= b:
            raise ValueError(
                f"input {spec.name!r}: axis {axis} needs 0 <= min <= opt <= max for a TensorRT profile, "
                f"got min {a}, opt {o} (its shape), max {b}"
            )
    return tuple(lo), tuple(opt), tuple(hi)


def profile_shapes(graph_spec: GraphSpec) -> dict[str, ProfileShapes]:
    """``{input name: (min, opt, max)}`` for every input of the graph spec, by its spec name."""
    return {spec.name: tensor_profile(spec) for spec in graph_spec.inputs}


def network_profile(graph_spec: GraphSpec, network_inputs: Sequence[str]) -> dict[str, ProfileShapes]:
    """The profile keyed by the parsed network's input names (the ONNX exporter names inputs after
    ``forward()``'s parameters, not after the spec), matched by position."""
    ordered = onnx_input_order(graph_spec)
    if len(ordered) != len(network_inputs):
        raise ValueError(
            f"the ONNX model takes {len(network_inputs)} inputs {list(network_inputs)} but the graph spec "
            f"has {len(ordered)} {[t.name for t in ordered]}"
        )
    shapes = profile_shapes(graph_spec)
    return {net: shapes[spec.name] for net, spec in zip(network_inputs, ordered)}
