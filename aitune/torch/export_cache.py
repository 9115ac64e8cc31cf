"""ONNX exports that the candidates of one process share when they export the same model the same way.

Every ONNX Runtime and TensorRT candidate starts by exporting the module to ONNX, and a sweep
has several of them per model (optimisation levels, I/O binding, providers, TensorRT's
precisions): the same export, seconds to minutes each, paid again by every one. An
:class:`ExportCache` keeps each export once and gives the next candidate that asks for the same
one hard links to its files (a copy where the file system has no links) in that candidate's own
work directory. Its caller owns it (one per worker process, passed to ``Backend.build`` as
``exports``): nothing is shared between candidates that the caller did not hand them.

An export is the same when it is of the same module object (the caller's, before any copy the
backend makes), called on the same sample object, with the same graph spec, opset and
``variant`` (what the backend does to the module before exporting it, its precision). The module
and the sample are told apart by identity, not by their values: a model loaded again is another
module, and its exports are exported again. Entries whose module is gone are dropped, and the
cache holds at most ``limit_bytes`` of files, least recently used first out; the newest export
stays even when it alone is over the bound. A failed export is not kept: the next candidate
tries again and fails with its own error.

Each candidate still loads, checks and measures what it was given: a shared file that went
wrong would show as wrong outputs in every candidate's check against its reference.

An export that is not the same but of the same graph with other weights (a fine-tune of a model
exported before, in this process or, where the caller's ``templates`` keep them on disk, in
another) is not translated again: the cache's ``templates`` (:mod:`aitune.torch.onnx_refit`)
fill the earlier translation with its weights.
"""

from __future__ import annotations

import os
import shutil
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from aitune.canonical import sha256_of
from aitune.specs import GraphSpec, Sample
from aitune.torch.onnx_export import OnnxExport, export_onnx
from aitune.torch.onnx_refit import ExportTemplates
from aitune.torch.template_dir import TemplateDir

GiB = 2**30
DEFAULT_LIMIT_BYTES = 4 * GiB


@dataclass
class _Entry:
    export: Any  # an OnnxExport; for a package, (its file, what was made with it)
    module: weakref.ref
    nbytes: int


class ExportCache:
    def __init__(self, root: str | Path, limit_bytes: int = DEFAULT_LIMIT_BYTES,
                 templates: ExportTemplates | None = None) -> None:
        self.root = Path(root)
        self.limit_bytes = int(limit_bytes)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._tokens: dict[int, tuple[weakref.ref, str]] = {}
        #: translations of the graphs exported so far, without their weights (kept in this
        #: process only, unless the caller gave templates that also keep them on disk)
        self.templates = templates if templates is not None else ExportTemplates()
        #: exports handed out again, and exports made
        self.hits = 0
        self.misses = 0
        #: compiled packages (see :meth:`package`), and how many were handed out again
        self._packages: OrderedDict[str, _Entry] = OrderedDict()
        self.package_hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def onnx(
        self,
        module: torch.nn.Module,
        sample: Sample,
        graph_spec: GraphSpec,
        path: str | Path,
        *,
        opset: int | None,
        variant: Any,
        prepare: Callable[[], tuple[torch.nn.Module, Sample]],
    ) -> OnnxExport:
        """The export of ``module`` on ``sample`` placed at ``path``: made by exporting what
        ``prepare()`` returns (the module and sample as the backend exports them), or the one
        made before for the same module, sample, graph spec, opset and ``variant``."""
        path = Path(path)
        module_token, sample_token = self._token(module), self._token(sample)
        if module_token is None or sample_token is None:  # not weakly referable: nothing to key by
            return _export_prepared(prepare, graph_spec, path, opset)
        key = sha256_of({"module": module_token, "sample": sample_token, "graph_spec": graph_spec.to_dict(),
                         "opset": opset, "variant": variant})
        entry = self._entries.get(key)
        if entry is not None and _files_exist(entry.export):
            self._entries.move_to_end(key)
            self.hits += 1
            return _place(entry.export, path)
        self._drop(key)
        where = self.root / key[:24]
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        try:
            made = _export_prepared(prepare, graph_spec, where / path.name, opset, self.templates)
        except BaseException:
            shutil.rmtree(where, ignore_errors=True)
            raise
        self.misses += 1
        self._entries[key] = _Entry(made, weakref.ref(module), sum(_size(p) for p in _files(made)))
        self._evict(keep=key)
        return _place(made, path)

    def package(
        self,
        module: torch.nn.Module,
        sample: Sample,
        graph_spec: GraphSpec,
        path: str | Path,
        *,
        variant: Any,
        make: Callable[[Path], Any],
    ) -> tuple[Path, Any]:
        """A compiled package of ``module`` on ``sample`` placed at ``path`` (linked, or copied),
        and what ``make`` returned with it: made by ``make(file)``, which writes the package to
        ``file``, or the one made before for the same module, sample, graph spec and ``variant``.

        For candidates that run one package in different ways (AOTInductor with and without CUDA
        graphs): minutes of compiling, paid once per model and shape instead of once per way.
        """
        path = Path(path)
        module_token, sample_token = self._token(module), self._token(sample)
        if module_token is None or sample_token is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            return path, make(path)
        key = sha256_of({"package": True, "module": module_token, "sample": sample_token,
                         "graph_spec": graph_spec.to_dict(), "variant": variant})
        entry = self._packages.get(key)
        if entry is not None and entry.export[0].is_file():
            self._packages.move_to_end(key)
            self.package_hits += 1
            return _link(entry.export[0], path), entry.export[1]
        self._drop_package(key)
        where = self.root / key[:24]
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        try:
            extra = make(where / path.name)
        except BaseException:
            shutil.rmtree(where, ignore_errors=True)
            raise
        made = where / path.name
        self._packages[key] = _Entry((made, extra), weakref.ref(module), _size(made))
        while len(self._packages) > 1 and sum(e.nbytes for e in self._packages.values()) > self.limit_bytes:
            self._drop_package(next(iter(self._packages)))
        return _link(made, path), extra

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key)
        for key in list(self._packages):
            self._drop_package(key)
        self.templates.clear()

    def prune(self) -> None:
        """Drop the exports and packages of modules that are gone (no one can ask for them again)."""
        for key in [k for k, e in self._entries.items() if e.module() is None]:
            self._drop(key)
        for key in [k for k, e in self._packages.items() if e.module() is None]:
            self._drop_package(key)

    # -- inside ---------------------------------------------------------------------------------
    def _token(self, obj: Any) -> str | None:
        held = self._tokens.get(id(obj))
        if held is not None and held[0]() is obj:
            return held[1]
        try:
            ref = weakref.ref(obj)
        except TypeError:
            return None
        token = uuid.uuid4().hex
        self._tokens[id(obj)] = (ref, token)
        if len(self._tokens) > 2 * len(self._entries) + 64:  # ids of objects gone: forget them
            self._tokens = {i: (r, t) for i, (r, t) in self._tokens.items() if r() is not None}
        return token

    def _evict(self, keep: str) -> None:
        self.prune()
        while self.nbytes > self.limit_bytes and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            self._drop(oldest)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            shutil.rmtree(entry.export.model.parent, ignore_errors=True)

    def _drop_package(self, key: str) -> None:
        entry = self._packages.pop(key, None)
        if entry is not None:
            shutil.rmtree(entry.export[0].parent, ignore_errors=True)


def machine_export_cache(root: str | Path, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> ExportCache:
    """An export cache for one process whose templates are also kept in this machine's template
    folder (``$AITUNE_ONNX_TEMPLATES``, see :mod:`aitune.torch.template_dir`), where one is on."""
    return ExportCache(root, limit_bytes, ExportTemplates(disk=TemplateDir.from_env()))


def shared_package(
    exports: ExportCache | None,
    module: torch.nn.Module,
    sample: Sample,
    graph_spec: GraphSpec,
    path: str | Path,
    variant: Any,
    make: Callable[[Path], Any],
) -> tuple[Path, Any]:
    """A backend's compiled package: through ``exports`` where its caller gave one, else made here."""
    path = Path(path)
    if exports is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, make(path)
    return exports.package(module, sample, graph_spec, path, variant=variant, make=make)


def shared_onnx_export(
    exports: ExportCache | None,
    module: torch.nn.Module,
    sample: Sample,
    graph_spec: GraphSpec,
    path: str | Path,
    opset: int | None,
    variant: Any,
    prepare: Callable[[], tuple[torch.nn.Module, Sample]],
) -> OnnxExport:
    """A backend's export: through ``exports`` where its caller gave one, else made here."""
    if exports is None:
        return _export_prepared(prepare, graph_spec, path, opset)
    return exports.onnx(module, sample, graph_spec, path, opset=opset, variant=variant, prepare=prepare)


def _export_prepared(prepare: Callable[[], tuple[torch.nn.Module, Sample]], graph_spec: GraphSpec, path: Path,
                     opset: int | None, templates: ExportTemplates | None = None) -> OnnxExport:
    prepared, prepared_sample = prepare()
    return export_onnx(prepared, graph_spec, prepared_sample, path, opset, templates)


def _files(export: OnnxExport) -> list[Path]:
    return [export.model] + ([export.external_data] if export.external_data is not None else [])


def _files_exist(export: OnnxExport) -> bool:
    return all(p.is_file() for p in _files(export))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _link(src: Path, dst: Path) -> Path:
    """``src`` hard-linked (copied where the file system has no links) at ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def _place(export: OnnxExport, path: Path) -> OnnxExport:
    """The export's files linked (or copied) beside ``path``, under the names the model refers to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    placed = {}
    for src in _files(export):
        # the model names its weights file relatively, by the name it was saved with
        dst = path if src == export.model else path.parent / src.name
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        placed[src] = dst
    data = placed[export.external_data] if export.external_data is not None else None
    return replace(export, model=placed[export.model], external_data=data)
