"""``aitune.load_tuned``: what is current for a model on this device, as one callable, without Ray.

    model = aitune.load_tuned("~/.cache/aitune/deploy", "small_cnn", device="cpu")
    out = model(images)          # sent to the winner tuned for images.shape

Each tuned input shape (one per batch size, and per bucket of an axis that varies) has its own
winner; a call goes to the one tuned for its input shapes. A model tuned with sequence buckets
(aitune.shapes) takes any length up to its largest bucket: a call between buckets is padded up to
the next bucket and its outputs sliced back, where the sweep verified that padding is safe for the
model (else it is refused, saying why). A shape that was not tuned raises :class:`UntunedShape`,
which lists the tuned shapes (the default, because a silent slow path hides a missing tuning),
unless a ``fallback`` is given: then such calls run on it (pass the eager model to get an eager
fallback).

Loading verifies every installed checkpoint (the manifest SHA-256 recorded at install and every
artifact's checksum) and imports only the model factory recorded at install for that model, or
the ones in ``allow_factories``. The deploy root is trusted like the store: whoever can write its
``install.json`` files chooses that factory.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable

import torch

from aitune import deploy_root as layout
from aitune.batching import Batching, batching_for
from aitune.checkpoint import CheckpointError
from aitune.shapes import ShapeError, Shapes, at, is_range, label, pad_sample, parse_ranges
from aitune.specs import Sample


class TunedModelError(RuntimeError):
    """The deploy root holds nothing usable for this model on this device; one clear line."""


class UntunedShape(TunedModelError, ValueError):
    """A call with input shapes no winner was tuned for."""


def _shape_text(shapes) -> str:
    return ", ".join("x".join(str(d) for d in s) for s in shapes) or "()"


class TunedModel:
    """Module-like: call it as the model; each call goes to the winner tuned for its input shapes."""

    def __init__(self, model: str, device: torch.device, routes: dict, installs: dict, fallback: Callable | None) -> None:
        self.model, self.device = model, device
        self._routes = routes  # shapes -> deployed backend
        self.installs = installs  # shapes -> aitune.deploy_root.Install
        self.fallback = fallback
        self._batching_at: dict[str, Batching] = {}

    @property
    def tuned_shapes(self) -> list[tuple[tuple[int, ...], ...]]:
        return sorted(self._routes)

    @property
    def versions(self) -> dict[int | str, str]:
        """Batch size (``b4 seq=64`` for a shape point) -> installed version served."""
        return {(at(i.batch_size, i.shape) if i.shape else i.batch_size): i.version for i in self.installs.values()}

    def version_at(self, batch_size: int, shape: str = "") -> str | None:
        """The version served at a batch size and shape point (None: none)."""
        return next((i.version for i in self.installs.values() if (i.batch_size, i.shape) == (batch_size, shape)), None)

    @functools.cached_property
    def shapes(self) -> Shapes | None:
        """The axes that vary (None: every shape is fixed), and :attr:`padding`: why padding is refused."""
        found = next((i.shapes for i in self.installs.values() if i.shapes), None)
        return Shapes.from_dict(found) if found else None

    @functools.cached_property
    def padding(self) -> str | None:
        found = next((i.shapes for i in self.installs.values() if i.shapes), None)
        return found.get("padding") if found else None

    @functools.cached_property
    def batching(self) -> Batching:
        """Whether requests may be combined into the tuned batch sizes, and the latencies that plan it."""
        return batching_for(list(self.installs.values()))

    @property
    def input_names(self) -> list[str] | None:
        """The tensor inputs' names, in the order of the tuned shapes (None: installed before names were kept)."""
        names = {tuple(i.input_names) for i in self.installs.values() if i.input_names}
        return list(next(iter(names))) if len(names) == 1 else None

    def winner_for(self, *args: Any, **kwargs: Any):
        """The install a call goes to (after padding up to its bucket); None: none."""
        found = self.installs.get(_key(args, kwargs))
        if found is None and self.shapes is not None:
            ranged = self._in_range(args, kwargs)
            if ranged is not None:
                return next(i for k, i in self.installs.items() if self._routes[k] is ranged[0])
        if found is None and self.shapes is not None and self.padding is None:
            with contextlib.suppress(UntunedShape):
                padded = self._padded(args, kwargs)
                if padded is not None:
                    found = self.installs.get(_key(*padded[0]))
        return found

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = _key(args, kwargs)
        if key not in self._routes and self.shapes is not None:
            ranged = self._in_range(args, kwargs)
            if ranged is not None:  # a dynamic-shape artifact holds the call's lengths
                backend, (args, kwargs), lengths = ranged
                return self.shapes.cut(backend.infer(*args, **kwargs), lengths)
            padded = self._padded(args, kwargs)
            if padded is not None:
                (args, kwargs), lengths = padded
                return self.shapes.cut(self(*args, **kwargs), lengths)
        backend = self._routes.get(key)
        if backend is not None:
            wanted = self.installs[key].input_dtypes
            if wanted is not None and layout.input_dtypes(args, kwargs) != wanted:
                if self.fallback is not None:
                    return self.fallback(*args, **kwargs)
                raise UntunedShape(f"{self.model}: input dtypes {', '.join(layout.input_dtypes(args, kwargs))} were not "
                                   f"tuned for shape {_shape_text(key)}; tuned dtypes: {', '.join(wanted)}")
            return backend.infer(*args, **kwargs)
        if self.fallback is not None:
            return self.fallback(*args, **kwargs)
        shapes = layout.input_shapes(args, kwargs)
        tuned = "; ".join(_shape_text(s) for s in self.tuned_shapes)
        raise UntunedShape(f"{self.model}: input shape {_shape_text(shapes)} was not tuned; tuned shapes: {tuned}")

    forward = __call__

    def batching_at(self, shape: str) -> Batching:
        """The batching of one bucket's installs: requests padded up to it are combined there."""
        found = self._batching_at.get(shape)
        if found is None:
            found = self._batching_at[shape] = batching_for([i for i in self.installs.values() if i.shape == shape])
        return found

    def to_bucket(self, args: tuple, kwargs: dict):
        """(the call padded up to its bucket, its lengths, the bucket's label) where one bucket's
        installs answer it; None where none does (a dynamic-shape install, fixed shapes, a length
        beyond the buckets: the plain call says why); UntunedShape where padding is refused."""
        if self.shapes is None or any(is_range(i.shape) for i in self.installs.values()):
            return None
        _, named = self._named(args, kwargs)
        try:
            lengths = self.shapes.lengths(named)
            bucket = self.shapes.bucket(lengths)
        except ShapeError:
            return None
        if bucket != lengths:
            padded = self._padded(args, kwargs)
            if padded is None:
                return None
            args, kwargs = padded[0]
        return (args, kwargs), lengths, label(bucket)

    def _named(self, args: tuple, kwargs: dict) -> tuple[list[str], dict[str, torch.Tensor]]:
        names = self.input_names or layout.names_of_inputs(args, kwargs, None)
        positional = names[:sum(isinstance(a, torch.Tensor) for a in args)]
        return positional, dict(zip(layout.names_of_inputs(args, kwargs, positional), _tensors(args, kwargs)))

    def _in_range(self, args: tuple, kwargs: dict):
        """(backend, the call padded up to the range's low end where shorter, its lengths) of a
        dynamic-shape install whose batch and range hold the call; None: none does."""
        ranged = [(k, i) for k, i in self.installs.items() if is_range(i.shape)]
        if not ranged:
            return None
        positional, named = self._named(args, kwargs)
        try:
            lengths = self.shapes.lengths(named)
        except ShapeError:
            return None
        rows = next((int(t.shape[0]) for t in named.values() if t.dim()), None)
        for key, install in ranged:
            ranges = parse_ranges(install.shape)
            if install.batch_size != rows or not all(lengths[a] <= ranges[a][1] for a in lengths if a in ranges):
                continue
            if install.input_dtypes is not None and layout.input_dtypes(args, kwargs) != install.input_dtypes:
                raise UntunedShape(f"{self.model}: input dtypes {', '.join(layout.input_dtypes(args, kwargs))} were not "
                                   f"tuned; tuned dtypes: {', '.join(install.input_dtypes)}")
            target = {a: max(n, ranges.get(a, (n, n))[0]) for a, n in lengths.items()}
            if target != lengths and self.padding is not None:
                continue  # shorter than the range, and padding is refused for this model
            call = pad_sample(Sample(args, kwargs), self.shapes, target, positional) if target != lengths else Sample(args, kwargs)
            return self._routes[key], (call.args, call.kwargs), lengths
        return None

    def _padded(self, args: tuple, kwargs: dict) -> tuple[tuple[tuple, dict], dict[str, int]] | None:
        """The call padded up to its bucket, and its lengths; None where it needs no padding (or it
        goes to the fallback); UntunedShape where it can't be padded, saying why."""
        positional, named = self._named(args, kwargs)
        try:
            lengths = self.shapes.lengths(named)
            bucket = self.shapes.bucket(lengths)
        except ShapeError as exc:
            if self.fallback is not None:
                return None
            raise UntunedShape(f"{self.model}: {exc}") from None
        if bucket == lengths:
            return None
        if self.padding is not None:
            if self.fallback is not None:
                return None
            said = ", ".join(f"{n} {lengths[n]}" for n in lengths if lengths[n] != bucket[n])
            raise UntunedShape(f"{self.model}: {said} is between buckets ({self.shapes.describe()}), and padding is "
                               f"refused for this model: {self.padding}")
        padded = pad_sample(Sample(args, kwargs), self.shapes, bucket, positional)
        return (padded.args, padded.kwargs), lengths

    def eval(self) -> "TunedModel":
        return self

    def __repr__(self) -> str:
        return f"TunedModel({self.model!r}, device={str(self.device)!r}, versions={self.versions})"


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor)] + [kwargs[k] for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor)]


def _key(args: tuple, kwargs: dict) -> tuple:
    return tuple(tuple(s) for s in layout.input_shapes(args, kwargs))


def load_tuned(
    root: str | os.PathLike | None,
    model: str,
    device: torch.device | str = "cpu",
    *,
    fallback: Callable | None = None,
    allow_factories: list[str] | bool | None = None,
) -> TunedModel:
    """Load every current version of ``model`` for this device's class from the deploy ``root``
    (None: :func:`aitune.deploy_root.default_root`).

    Raises :class:`TunedModelError` (one line, naming the file or argument at fault) when the
    model is not installed there, when this device's class has no winner (naming the classes that
    have one), when a checkpoint or any file of the root fails its checks, or when ``model`` or
    ``root`` is no name or folder a deploy root can have (a name that would leave the root).
    """
    device = torch.device(device)
    return load_for_class(root, model, device, None, fallback=fallback, allow_factories=allow_factories)


def load_for_class(root, model: str, device: torch.device, class_key: str | None, *,
                   fallback: Callable | None = None, allow_factories=None) -> TunedModel:
    """:func:`load_tuned` for a given device class key (None: this device's own)."""
    try:
        layout.check_model_name(model)
        root_path = layout.resolve_root(root)
        layout.check_no_links(root_path, root_path / model)
        if not (root_path / model).is_dir():
            known = sorted(p.name for p in root_path.iterdir() if p.is_dir() and not p.name.startswith(".")) \
                if root_path.is_dir() else []
            raise TunedModelError(f"model {model!r} is not installed in deploy root {root_path} "
                                  f"(installed: {', '.join(known) or 'none'})")
        key = class_key or layout.device_class_key(device)
        entries = layout.live(root_path, model)
    except layout.DeployRootError as exc:
        raise TunedModelError(str(exc)) from None
    mine = [e for e in entries if e.class_key == key]
    if not mine:
        classes = sorted({f"{e.device_name or '?'} [{e.class_key[:12]}]" for e in entries})
        name = layout.describe_environment(device).device_name
        raise TunedModelError(
            f"{model} was not tuned for device class {name} [{key[:12]}] of {device}; "
            f"tuned for: {', '.join(classes) or 'none'}")
    routes, installs = {}, {}
    for entry in mine:
        try:
            install, backend = layout.load_version(entry.folder, device, allow_factories=allow_factories)
        except (CheckpointError, layout.DeployRootError) as exc:
            raise TunedModelError(f"{model} {at(entry.batch_size, entry.shape)} version {entry.version} refused: {exc}") from None
        except Exception as exc:  # whatever a damaged file makes torch or json raise: still one line, our type
            raise TunedModelError(f"{model} {at(entry.batch_size, entry.shape)} version {entry.version} refused: {entry.folder}: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        shapes = tuple(tuple(s) for s in install.input_shapes)
        if shapes in installs:  # two batch folders claiming one route: neither may take it over
            other = installs[shapes]
            raise TunedModelError(f"{model}: {entry.folder} and {at(other.batch_size, other.shape)}/{other.version} both take input "
                                  f"shapes {_shape_text(shapes)}; deploy again")
        routes[shapes], installs[shapes] = backend, install
    return TunedModel(model, device, routes, installs, fallback)
