"""Descriptions of a model's inputs and outputs, and the samples fed to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from aitune.canonical import dtype_name, to_dtype


@dataclass(frozen=True)
class TensorSpec:
    """One tensor: its name, shape and dtype.

    ``dynamic_axes`` maps an axis index to its ``(min, max)`` size; ``shape`` holds the size
    the graph was specialised for (also the "opt" size of a TensorRT profile).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    dynamic_axes: Mapping[int, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        axes = {int(k): (int(v[0]), int(v[1])) for k, v in dict(self.dynamic_axes).items()}
        for axis, (lo, hi) in axes.items():
            if not 0 <= axis < len(self.shape):
                raise ValueError(f"tensor {self.name!r}: dynamic axis {axis} is outside its shape {self.shape}")
            if not 1 <= lo <= self.shape[axis] <= hi:
                raise ValueError(
                    f"tensor {self.name!r}: axis {axis} range ({lo}, {hi}) must hold its size {self.shape[axis]}"
                )
        object.__setattr__(self, "dynamic_axes", dict(sorted(axes.items())))

    @property
    def torch_dtype(self) -> torch.dtype:
        return to_dtype(self.dtype)

    def accepts(self, shape: Iterable[int]) -> bool:
        shape = tuple(shape)
        if len(shape) != len(self.shape):
            return False
        for axis, (want, got) in enumerate(zip(self.shape, shape)):
            if axis in self.dynamic_axes:
                lo, hi = self.dynamic_axes[axis]
                if not lo <= got <= hi:
                    return False
            elif want != got:
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "dynamic_axes": {str(k): list(v) for k, v in self.dynamic_axes.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(
            name=d["name"],
            shape=tuple(d["shape"]),
            dtype=d.get("dtype", "float32"),
            dynamic_axes={int(k): tuple(v) for k, v in d.get("dynamic_axes", {}).items()},
        )


@dataclass(frozen=True)
class GraphSpec:
    """A model's positional inputs, keyword inputs and flattened outputs."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = ()
    kwarg_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "kwarg_names", tuple(self.kwarg_names))
        names = [t.name for t in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"graph spec: input names must be unique, got {names}")
        unknown = set(self.kwarg_names) - set(names)
        if unknown:
            raise ValueError(f"graph spec: keyword inputs {sorted(unknown)} are not among the inputs {names}")

    @property
    def positional(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.inputs if t.name not in self.kwarg_names)

    @property
    def is_dynamic(self) -> bool:
        return any(t.dynamic_axes for t in self.inputs)

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def check_sample(self, sample: "Sample", backend: str = "backend") -> None:
        """Raise ``ValueError`` naming the input whose shape or dtype the graph was not built for."""
        got = sample.named_tensors(self)
        for spec in self.inputs:
            if spec.name not in got:
                raise ValueError(f"{backend}: input {spec.name!r} is missing from the sample")
            tensor = got[spec.name]
            if not spec.accepts(tensor.shape):
                ranges = f" (dynamic axes {dict(spec.dynamic_axes)})" if spec.dynamic_axes else ""
                raise ValueError(
                    f"{backend}: input {spec.name!r} has shape {tuple(tensor.shape)} but the graph was built "
                    f"for {spec.shape}{ranges}"
                )
            if dtype_name(tensor.dtype) != spec.dtype:
                raise ValueError(
                    f"{backend}: input {spec.name!r} has dtype {dtype_name(tensor.dtype)} but the graph was built "
                    f"for {spec.dtype}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "kwarg_names": list(self.kwarg_names),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GraphSpec":
        return cls(
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d.get("outputs", [])),
            kwarg_names=tuple(d.get("kwarg_names", [])),
        )

    @classmethod
    def from_sample(
        cls,
        sample: "Sample",
        outputs: Any = None,
        dynamic_batch: tuple[int, int] | None = None,
    ) -> "GraphSpec":
        """Describe ``sample``'s tensors; ``dynamic_batch=(lo, hi)`` makes axis 0 dynamic."""
        specs = []
        for name, tensor in sample.named_tensors().items():
            axes = {0: dynamic_batch} if dynamic_batch and tensor.dim() > 0 else {}
            specs.append(TensorSpec(name, tuple(tensor.shape), dtype_name(tensor.dtype), axes))
        out_specs = []
        if outputs is not None:
            from aitune.torch.tree import flatten_tensors

            for i, (_, t) in enumerate(flatten_tensors(outputs)):
                out_specs.append(TensorSpec(f"output_{i}", tuple(t.shape), dtype_name(t.dtype)))
        # Only tensor keywords are graph inputs; a flag such as ``return_dict=False`` is not.
        kwarg_names = tuple(k for k, v in sample.kwargs.items() if isinstance(v, torch.Tensor))
        return cls(tuple(specs), tuple(out_specs), kwarg_names)


@dataclass
class Sample:
    """The positional and keyword arguments of one model call."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.args = tuple(self.args)
        self.kwargs = dict(self.kwargs)

    @classmethod
    def of(cls, *args: Any, **kwargs: Any) -> "Sample":
        return cls(args, kwargs)

    def named_tensors(self, spec: GraphSpec | None = None) -> dict[str, torch.Tensor]:
        """Tensors by input name: ``input_0``, ``input_1``... for positional ones unless ``spec`` names them."""
        names = [t.name for t in spec.positional] if spec is not None else []
        out: dict[str, torch.Tensor] = {}
        for i, arg in enumerate(self.args):
            if isinstance(arg, torch.Tensor):
                out[names[i] if i < len(names) else f"input_{i}"] = arg
        for key, value in self.kwargs.items():
            if isinstance(value, torch.Tensor):
                out[key] = value
        return out

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Sample":
        """A new sample with ``fn`` applied to every tensor (others are kept)."""

        def f(x: Any) -> Any:
            return fn(x) if isinstance(x, torch.Tensor) else x

        return Sample(tuple(f(a) for a in self.args), {k: f(v) for k, v in self.kwargs.items()})

    def to(self, device: torch.device | str) -> "Sample":
        return self.map(lambda t: t.to(device))

    def __call__(self, fn: Callable[..., Any]) -> Any:
        return fn(*self.args, **self.kwargs)

    @property
    def batch_size(self) -> int:
        for t in self.named_tensors().values():
            if t.dim() > 0:
                return int(t.shape[0])
        return 1
