"""ONNX translations kept on disk, without weights, for every process of a machine and every later run.

A sweep's workers are fresh processes, and a worker's first ONNX export pays for building the
exporter's ATen-to-ONNX table (about a second) and for translating the captured program (one to
two seconds for a small encoder, more for big models), even when the same graph was translated
yesterday by another worker of the same machine. A :class:`TemplateDir` keeps each translation
:class:`~aitune.torch.onnx_refit.ExportTemplates` makes (the graph, its initializers emptied) as a
file named by the program's form, under a folder named by the versions of the toolchain that
made it (torch, onnxscript, onnx-ir, onnx): an upgrade starts a new folder rather than reusing a
translation made by other code. An export that finds its form here fills it with its own weights
and skips both the table and the translation; the optimiser and everything after still run.

The folder is ``$AITUNE_ONNX_TEMPLATES``, else ``$XDG_CACHE_HOME/aitune/onnx-templates``, else
``~/.cache/aitune/onnx-templates``; ``AITUNE_ONNX_TEMPLATES=off`` keeps nothing on disk. It holds
at most ``limit_bytes`` of files, least recently used first out. Deleting it at any time is safe.

Nothing read back is trusted: a file is used only if it parses, names the form and toolchain it
is filed under, holds no weights and no reference to data outside itself, defines every value
its graph uses, and leaves exactly the initializers the new program fills; anything else is
deleted (with one warning line) and the program translated again. What a template can't vouch
for is its arithmetic: every candidate built from it is still checked against its own model's
eager outputs, so a template that went wrong shows as a failed check, never as a wrong winner
(delete the folder to clear it).

A form the exporter could not make as asked (an opset it can't convert this graph down to) is
kept too, as its reason (``<form>.refused.json``), and later exports of that form in any process
are refused with it at once, the message naming the file to delete to try again.

Writes go to a temporary file renamed into place, so a reader never sees half a file; a folder
that can't be written to costs only the speed-up, never a build.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Mapping

from aitune.cache_folders import cache_folder
from aitune.canonical import sha256_of

log = logging.getLogger(__name__)

ENV = "AITUNE_ONNX_TEMPLATES"
MiB = 2**20
DEFAULT_LIMIT_BYTES = 512 * MiB
#: a form the exporter could not make as asked: a small JSON file beside the templates
REFUSED, MAX_REFUSAL_BYTES = ".refused.json", 16384
#: what a template file is, in the keys of its metadata
FORMAT, FORM_KEY, TAG_KEY, WEIGHTS_KEY = "1", "aitune.template.form", "aitune.template.toolchain", "aitune.template.weights"


def default_root(environ: Mapping[str, str] = os.environ) -> Path | None:
    """Where the templates of this machine live, None where ``$AITUNE_ONNX_TEMPLATES`` turns them off."""
    return cache_folder(ENV, "onnx-templates", environ)


@functools.lru_cache(maxsize=None)
def toolchain_tag() -> str:
    """A short hash of the versions whose code makes a translation (and of this file's format)."""
    import onnx
    import onnx_ir
    import onnxscript
    import torch

    return sha256_of({"format": FORMAT, "torch": torch.__version__, "onnxscript": onnxscript.__version__,
                      "onnx_ir": onnx_ir.__version__, "onnx": onnx.__version__})[:16]


class TemplateDir:
    def __init__(self, root: str | Path, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> None:
        self.root = Path(root)
        self.limit_bytes = int(limit_bytes)
        #: templates read back and used, written, and files found unusable (deleted)
        self.loads = 0
        self.saves = 0
        self.rejected = 0
        self._unwritable = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "TemplateDir | None":
        root = default_root(environ)
        return cls(root) if root is not None else None

    def path(self, form: str, suffix: str = ".onnx") -> Path:
        return self.root / toolchain_tag() / f"{form}{suffix}"

    def refusal(self, form: str) -> str | None:
        """Why the exporter could not make ``form`` as asked, as a process of this toolchain found
        before, or None. Read back like a template: one that does not say it is of this form and
        toolchain is deleted and not believed."""
        path = self.path(form, REFUSED)
        try:
            if path.stat().st_size > MAX_REFUSAL_BYTES:
                return self._reject(path, "too long for a refusal")
            said = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            return self._reject(path, f"it does not parse ({type(e).__name__})")
        if not (isinstance(said, dict) and said.get("form") == form and said.get("toolchain") == toolchain_tag()
                and isinstance(said.get("why"), str) and said["why"]):
            return self._reject(path, "it does not name this form, this toolchain and a reason")
        return f"{said['why']} (found by an earlier export of this graph, kept in {path}: delete it to try again)"

    def refuse(self, form: str, why: str) -> bool:
        """Keep why ``form`` can't be made as asked; False where it could not be written."""
        return self._write(self.path(form, REFUSED),
                           lambda tmp: Path(tmp).write_text(json.dumps({"form": form, "toolchain": toolchain_tag(),
                                                                         "why": why[:MAX_REFUSAL_BYTES // 2]})))

    def load(self, form: str):
        """The template kept for ``form`` (an ``onnx_ir`` model, initializers without values), or None."""
        import onnx_ir as ir

        path = self.path(form)
        try:
            size = path.stat().st_size
        except OSError:
            return None
        if size > self.limit_bytes:
            return self._reject(path, f"{size} bytes, over the folder's {self.limit_bytes}")
        try:
            model = ir.load(str(path))
        except Exception as e:  # a damaged file is a miss, not a failed build
            return self._reject(path, f"it does not parse as ONNX ({type(e).__name__}: {e})")
        why = _unusable(model, form)
        if why is not None:
            return self._reject(path, why)
        graph = model.graph
        names = model.metadata_props[WEIGHTS_KEY].split("\n") if model.metadata_props[WEIGHTS_KEY] else []
        for name in reversed(names):  # written as the graph's last inputs: initializers again
            graph.initializers.add(graph.inputs.pop())
        for key in (FORM_KEY, TAG_KEY, WEIGHTS_KEY):
            del model.metadata_props[key]
        try:  # a copy checks that the graph is whole: every value it uses is defined in it
            model = model.clone()
        except Exception as e:
            return self._reject(path, f"its graph is not whole ({type(e).__name__}: {str(e)[:200]})")
        try:
            os.utime(path)  # recently used: the last to go
        except OSError:
            pass
        self.loads += 1
        return model

    def save(self, form: str, template) -> bool:
        """Write ``template`` (initializers without values) for ``form``; False where it could not be."""
        import onnx_ir as ir

        if self._unwritable:
            return False
        path = self.path(form)
        model = template.clone()
        graph = model.graph
        names = list(graph.initializers)
        for name in names:  # an initializer without a value is not written: kept as an input
            value = graph.initializers.pop(name)
            value.const_value = None
            graph.inputs.append(value)
        model.metadata_props.update({FORM_KEY: form, TAG_KEY: toolchain_tag(), WEIGHTS_KEY: "\n".join(names)})
        if not self._write(path, lambda tmp: ir.save(model, tmp)):
            return False
        self.saves += 1
        return True

    def _write(self, path: Path, write) -> bool:
        """``write(tmp)`` then rename ``tmp`` to ``path``: a reader sees all of it or none."""
        if self._unwritable:
            return False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:16]}-", suffix=".tmp")
            os.close(fd)
            try:
                write(tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as e:
            self._unwritable = True  # said once, then the process goes on without the folder
            log.warning("ONNX templates can't be kept in %s (%s); exports go on without it", self.root, e)
            return False
        self._prune(keep=path)
        return True

    # -- inside ---------------------------------------------------------------------------------
    def _reject(self, path: Path, why: str) -> None:
        log.warning("ONNX template %s is not used and is deleted: %s; the program is translated again", path, why)
        self.rejected += 1
        try:
            path.unlink()
        except OSError:
            pass
        return None

    def _prune(self, keep: Path) -> None:
        files = []
        for p in itertools.chain(self.root.glob("*/*.onnx"), self.root.glob(f"*/*{REFUSED}")):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= self.limit_bytes:
                break
            if p == keep:
                continue
            try:
                p.unlink()
                total -= size
            except OSError:
                pass


def _unusable(model, form: str) -> str | None:
    """Why a template read back can't be used, None where it can."""
    import onnx_ir as ir

    props = model.metadata_props
    if props.get(FORM_KEY) != form:
        return f"it is filed under form {form[:16]}... but says {str(props.get(FORM_KEY))[:16]}..."
    if props.get(TAG_KEY) != toolchain_tag():
        return "it was made by another toolchain than the folder it is in says"
    if WEIGHTS_KEY not in props:
        return "it does not list its weights"
    graph = model.graph
    if len(graph.initializers):
        return "it holds weights (a template holds none)"
    names = props[WEIGHTS_KEY].split("\n") if props[WEIGHTS_KEY] else []
    if len(names) != len(set(names)) or len(names) > len(graph.inputs):
        return "its list of weights does not match its inputs"
    if [v.name for v in graph.inputs[len(graph.inputs) - len(names):]] != names:
        return "its list of weights does not match its inputs"
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for attr in node.attributes.values():
            held = getattr(attr, "value", None)
            if any(isinstance(t, ir.ExternalTensor) for t in (held if isinstance(held, (list, tuple)) else [held])):
                return f"node {node.name!r} refers to data outside the file"
    return None
