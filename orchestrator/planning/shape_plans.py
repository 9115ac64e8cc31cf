"""Each model's axes that vary, settled before Ray starts: where each axis lies in the inputs, the
outputs that follow it (traced from two lengths, or declared), and whether padding up to a bucket
is safe for the model at all (eager fp32, padded, against eager fp32 unpadded, at lengths between
the buckets). A model whose outputs change with padding is named, and padding is refused for it:
its buckets are still tuned, but a call between buckets is refused rather than padded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from aitune.check import compare_outputs, tolerance_for
from aitune.shapes import Axis, Shapes, label, padding_problem, range_label, trace_outputs
from aitune.specs import GraphSpec, TensorSpec
from aitune.torch.tree import flatten_tensors
from orchestrator.planning.candidates import ModelLoadError, graph_spec_of, load_model, make_sample, samples_key
from orchestrator.spec.models import ModelSpec
from orchestrator.spec.schema import SweepSpec

#: the batch size padding is checked at before Ray (rows of different masks)
CHECK_BATCH = 2


@dataclass
class ShapePlan:
    """A model's axes, how its outputs were found to follow them, and why padding is refused (None: verified)."""

    shapes: Shapes
    outputs_from: str  # "traced" or "declared"
    padding: str | None = None

    @property
    def pads(self) -> bool:
        return self.padding is None

    def line(self, model: str) -> str:
        verdict = "padding verified on eager fp32" if self.pads else f"padding refused: {self.padding}"
        return f"axes of {model}: {self.shapes.describe()} (outputs {self.outputs_from}); {verdict}"

    def to_dict(self) -> dict[str, Any]:
        return {**self.shapes.to_dict(), "outputs_from": self.outputs_from, "padding": self.padding}


def positional_names(model: ModelSpec, sample) -> list[str]:
    """The names of a sample's positional inputs, as the graph spec names them."""
    if not model.inputs:
        return [f"input_{i}" for i in range(len(sample.args))]
    positional = [i for i in model.inputs if not i.kwarg]
    return [inp.name or f"input_{j}" for j, inp in enumerate(positional)]


def _input_axes(model: ModelSpec, where: str, longest: dict[str, int]) -> dict[str, list[tuple[str, int, float]]]:
    """Each axis's (input name, dimension of the batched tensor, pad value)."""
    found: dict[str, list[tuple[str, int, float]]] = {name: [] for name in longest}
    if model.inputs:
        j = 0
        for inp in model.inputs:
            name = inp.name if inp.kwarg else (inp.name or f"input_{j}")
            j += 0 if inp.kwarg else 1
            for index, d in enumerate(inp.shape):
                if isinstance(d, str):
                    found[d].append((name, index + (1 if index >= inp.batch_axis else 0), inp.dynamic[d].pad))
        return found
    # A sample factory's: traced, the dimensions whose size follows the length.
    other = {n: (v - 1 if v > 1 else v + 1) for n, v in longest.items()}
    for axis in longest:
        a = make_sample(model, 1, longest).named_tensors()
        b = make_sample(model, 1, {**longest, axis: other[axis]}).named_tensors()
        pads = model.dynamic[axis].pad
        unknown = sorted(set(pads) - set(a)) if isinstance(pads, dict) else []
        if unknown:
            raise ModelLoadError(f"{where}.dynamic.{axis}.pad: no input named {', '.join(unknown)}; inputs: {', '.join(a)}")
        for name, t in a.items():
            for dim, (sa, sb) in enumerate(zip(t.shape, b[name].shape)):
                if (sa, sb) == (longest[axis], other[axis]):
                    found[axis].append((name, dim, pads.get(name, 0) if isinstance(pads, dict) else pads))
        if not found[axis]:
            raise ModelLoadError(f"{where}.sample_factory: its samples at {axis}={longest[axis]} and {other[axis]} "
                                 f"have no input whose size follows {axis}")
    return found


def _declared_outputs(model: ModelSpec, where: str, outputs: Any, axis: str) -> list[tuple[int, str, int]]:
    flat = flatten_tensors(outputs)
    paths = [p for p, _ in flat]
    out = []
    for path, dim in (model.output_axes or {}).get(axis, {}).items():
        if path not in paths:
            raise ModelLoadError(f"{where}.output_axes.{axis}: no output {path!r}; outputs: {', '.join(paths)}")
        if not 0 <= dim < flat[paths.index(path)][1].dim():
            raise ModelLoadError(f"{where}.output_axes.{axis}.{path}: dimension {dim} is outside the output's "
                                 f"{flat[paths.index(path)][1].dim()} dimensions")
        out.append((paths.index(path), path, dim))
    return out


def _outputs(model: ModelSpec, where: str, module: torch.nn.Module, longest: dict[str, int]) -> tuple[dict, str | None]:
    """Each axis's outputs that follow it, and a reason padding can't be undone (None: it can)."""
    found: dict[str, list[tuple[int, str, int]]] = {}
    with torch.inference_mode():
        base = make_sample(model, 1, longest)(module)
        for axis, length in longest.items():
            if model.output_axes is not None:
                found[axis] = _declared_outputs(model, where, base, axis)
                continue
            other = length - 1 if length > 1 else length + 1
            traced = trace_outputs(base, make_sample(model, 1, {**longest, axis: other})(module), length, other)
            if isinstance(traced, str):
                return {a: [] for a in longest}, f"{traced} (axis {axis})"
            found[axis] = traced
    return found, None


def plan_for(i: int, model: ModelSpec) -> ShapePlan:
    where = f"models[{i}]"
    axes = model.axes()
    longest = {name: buckets[-1] for name, buckets in axes.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0x5EED)
        module = load_model(model)
    inputs = _input_axes(model, where, longest)
    outputs, problem = _outputs(model, where, module, longest)
    shapes = Shapes(tuple(Axis(name, tuple(axes[name]), tuple(inputs[name]), tuple(outputs[name])) for name in axes))
    plan = ShapePlan(shapes, "declared" if model.output_axes is not None else "traced", problem)
    if plan.pads:
        tolerance = tolerance_for("float32")
        sample = make_sample(model, CHECK_BATCH, {n: b[0] for n, b in axes.items()})

        def compare(want, got):
            result = compare_outputs(want, got, tolerance)
            return None if result.ok else result.reason

        with torch.inference_mode():
            plan.padding = padding_problem(module, module, shapes, lambda lengths: make_sample(model, CHECK_BATCH, lengths),
                                           positional_names(model, sample), compare)
    return plan


def settle_shapes(spec: SweepSpec) -> dict[str, ShapePlan]:
    """The shape plan of every model whose axes vary, before any worker starts."""
    out = {}
    for i, model in enumerate(spec.models):
        if model.axes():
            try:
                out[model.name] = plan_for(i, model)
            except ModelLoadError:
                raise
            except Exception as exc:  # the user's model or sample factory at another length
                raise ModelLoadError(f"models[{i}]: tracing its axes at other lengths failed: "
                                     f"{type(exc).__name__}: {exc}") from None
    return out


@dataclass
class Variant:
    """What one model is tuned at for one batch size: a shape point (or, ``dynamic``, one artifact
    covering every bucket), its graph spec and samples key, and what its evaluation adds."""

    shape: str
    graph: dict[str, Any]
    samples: str
    dynamic: bool = False
    #: evaluation["check"]["padding"]: the axes, this point (or the range) and why padding is refused
    padding: dict[str, Any] | None = None
    #: evaluation["measure"]["buckets"]: a dynamic artifact is measured at every bucket too
    buckets: list[str] | None = None


def variants(model: ModelSpec, batch: int, plan: ShapePlan | None) -> list[Variant]:
    """Each bucket's variant (the model's one variant where its shapes are fixed), and where its axes
    vary, one dynamic-shape variant built at the largest bucket with each axis's range dynamic."""
    out = []
    for point in model.points():
        graph = graph_spec_of(model, make_sample(model, batch, point))
        padding = None if plan is None else {"shapes": plan.shapes.to_dict(), "point": point, "refused": plan.padding}
        out.append(Variant(label(point), graph.to_dict(), samples_key(model, batch, point), padding=padding))
    if plan is not None:
        ranges = plan.shapes.dynamic_range()
        largest = {name: hi for name, (_, hi) in ranges.items()}
        graph = dynamic_graph(graph_spec_of(model, make_sample(model, batch, largest)), plan.shapes, ranges)
        padding = {"shapes": plan.shapes.to_dict(), "range": {n: list(r) for n, r in ranges.items()},
                   "refused": plan.padding}
        out.append(Variant(range_label(ranges), graph.to_dict(), samples_key(model, batch, largest), dynamic=True,
                           padding=padding, buckets=[label(p) for p in model.points()]))
    return out


def dynamic_graph(graph: GraphSpec, shapes: Shapes, ranges: dict[str, tuple[int, int]]) -> GraphSpec:
    """``graph`` with each axis that varies dynamic over its range, in every input it lies in."""
    dims: dict[str, dict[int, tuple[int, int]]] = {}
    for axis in shapes.axes:
        for name, dim, _ in axis.inputs:
            dims.setdefault(name, {})[dim] = ranges[axis.name]
    inputs = tuple(TensorSpec(t.name, t.shape, t.dtype, {**t.dynamic_axes, **dims.get(t.name, {})}) for t in graph.inputs)
    return GraphSpec(inputs, graph.outputs, graph.kwarg_names)
