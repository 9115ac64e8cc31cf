"""``aitune.load_tuned``: what is current for a model on this device, as one callable, without Ray.

    model = aitune.load_tuned("~/.cache/aitune/deploy", "small_cnn", device="cpu")
    out = model(images)          # sent to the winner tuned for images.shape

Each tuned input shape (one per batch size) has its own winner; a call goes to the one tuned for
its input shapes. A shape that was not tuned raises :class:`UntunedShape`, which lists the tuned
shapes (the default, because a silent slow path hides a missing tuning), unless a ``fallback``
is given: then such calls run on it (pass the eager model to get an eager fallback).

Loading verifies every installed checkpoint (the manifest SHA-256 recorded at install and every
artifact's checksum) and imports only the model factory recorded at install for that model, or
the ones in ``allow_factories``. The deploy root is trusted like the store: whoever can write its
``install.json`` files chooses that factory.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch

from aitune import deploy_root as layout
from aitune.batching import Batching, batching_for
from aitune.checkpoint import CheckpointError


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

    @property
    def tuned_shapes(self) -> list[tuple[tuple[int, ...], ...]]:
        return sorted(self._routes)

    @property
    def versions(self) -> dict[int, str]:
        """Batch size -> installed version served."""
        return {i.batch_size: i.version for i in self.installs.values()}

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
        return self.installs.get(_key(args, kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = _key(args, kwargs)
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

    def eval(self) -> "TunedModel":
        return self

    def __repr__(self) -> str:
        return f"TunedModel({self.model!r}, device={str(self.device)!r}, versions={self.versions})"


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
            raise TunedModelError(f"{model} b{entry.batch_size} version {entry.version} refused: {exc}") from None
        except Exception as exc:  # whatever a damaged file makes torch or json raise: still one line, our type
            raise TunedModelError(f"{model} b{entry.batch_size} version {entry.version} refused: {entry.folder}: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        shapes = tuple(tuple(s) for s in install.input_shapes)
        if shapes in installs:  # two batch folders claiming one route: neither may take it over
            other = installs[shapes]
            raise TunedModelError(f"{model}: {entry.folder} and b{other.batch_size}/{other.version} both take input "
                                  f"shapes {_shape_text(shapes)}; deploy again")
        routes[shapes], installs[shapes] = backend, install
    return TunedModel(model, device, routes, installs, fallback)
