"""ONNX export with the dynamo exporter, shared by the ONNX Runtime and TensorRT backends.

``torch.onnx.export(dynamo=True)`` builds its table of ATen-to-ONNX functions from torchlib at
every call: half a second or more of translating onnxscript sources, more than the export of a
small model itself, paid again by every ONNX Runtime and TensorRT candidate. :func:`export_onnx`
builds that table once per opset and process and hands it to the exporter's core (what
``torch.onnx.export`` calls after building it). The table is only read while exporting. Where
this torch lacks those internals, exports go through ``torch.onnx.export`` as before.

Given :class:`~aitune.torch.onnx_refit.ExportTemplates`, an export of a program translated
before but for its weights (a fine-tune of a model exported before, here or, through their
``TemplateDir``, in another process) is filled in rather than translated again, and without
building the table.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from aitune.build_refusal import BuildRefused
from aitune.specs import GraphSpec, Sample, TensorSpec
from aitune.torch.export_utils import dynamic_shapes_for
from aitune.torch.onnx_refit import ExportTemplates, program_form
from aitune.torch.output_tree import OutputTree, exportable, flat_tree


@dataclass(frozen=True)
class OnnxExport:
    """What an export wrote: the model, its external weights (if any), and the output tree."""

    model: Path
    #: ``model.onnx.data``: the weights; it must stay beside ``model`` (the model names it relatively)
    external_data: Path | None
    #: the output pytree spec as ``torch.utils._pytree.treespec_dumps`` JSON
    out_spec: str
    #: where the model's output is not one that spec can keep (a named tuple, a dataclass): its
    #: tree, the ONNX model returning its tensors flat
    out_tree: OutputTree | None = None


class OutputLayout:
    """How an exported model's flat outputs become the model's output: torch's pytree spec, or,
    where that spec could not keep it, the :class:`~aitune.torch.output_tree.OutputTree`.
    Saved into and read back from a backend's state (``out_spec``, ``out_tree``)."""

    def __init__(self, out_spec: str | None = None, out_tree: OutputTree | None = None) -> None:
        self.out_spec, self.out_tree = out_spec, out_tree
        self._spec = None

    @classmethod
    def of(cls, exported: OnnxExport) -> "OutputLayout":
        return cls(exported.out_spec, exported.out_tree)

    def rebuild(self, outputs: list[torch.Tensor]) -> Any:
        if self.out_tree is not None:
            return self.out_tree.rebuild(outputs)
        if self._spec is None and self.out_spec:
            self._spec = pytree.treespec_loads(self.out_spec)
        return pytree.tree_unflatten(outputs, self._spec) if self._spec is not None else tuple(outputs)

    def save(self, state: dict[str, Any]) -> None:
        state["out_spec"] = json.loads(self.out_spec) if self.out_spec else None
        if self.out_tree is not None:  # only where there is one: other states stay as they were
            state["out_tree"] = self.out_tree.tree

    @classmethod
    def load(cls, state: dict[str, Any]) -> "OutputLayout":
        """From a checkpoint's state; the tree is checked whole here, before anything runs."""
        spec = state.get("out_spec")
        return cls(json.dumps(spec) if spec is not None else None, OutputTree.read(state.get("out_tree")))


def onnx_input_order(graph_spec: GraphSpec) -> list[TensorSpec]:
    """The graph's inputs in the order the exported ONNX model takes them.

    The exporter takes positional tensors first, then keyword tensors in the order they are
    passed, which ``export_onnx`` makes ``graph_spec.kwarg_names``.
    """
    by_name = {t.name: t for t in graph_spec.inputs}
    return list(graph_spec.positional) + [by_name[k] for k in graph_spec.kwarg_names]


def export_onnx(
    module: torch.nn.Module, graph_spec: GraphSpec, sample: Sample, path: str | Path, opset: int | None = None,
    templates: ExportTemplates | None = None,
) -> OnnxExport:
    """Export ``module`` called on ``sample`` to ``path`` with the spec's dynamic axes.

    The caller prepares ``module`` and ``sample`` (device, dtype): they are exported as given.
    Keyword arguments that are not graph inputs (flags such as ``return_dict=False``) are not
    inputs of the ONNX model: they are fixed at the values ``sample`` gives them.
    ``templates``: translations kept from earlier exports, used and added to (see ``onnx_refit``).
    """
    path = Path(path)
    # The exporter warns once per missing optional library (torchvision ops) at every export.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(max(level, logging.ERROR))
    # The opset converter logs why it could not convert, with a traceback, and goes on: what it
    # says goes into the error that refuses the candidate instead of into the worker's log.
    converter = _ConverterLog()
    try:
        with converter:
            return _export(module, graph_spec, sample, path, opset, converter, templates)
    finally:
        onnx_log.setLevel(level)


class _ConverterLog(logging.Handler):
    """Holds what onnxscript's opset converter logs while it is installed, and keeps it from the root logger."""

    NAME = "onnxscript.version_converter"

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "_ConverterLog":
        log = logging.getLogger(self.NAME)
        self._propagate = log.propagate
        log.addHandler(self)
        log.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        log = logging.getLogger(self.NAME)
        log.removeHandler(self)
        log.propagate = self._propagate

    def why(self) -> str:
        """The converter's last complaint: its exception where it logged one, else its message."""
        for record in reversed(self.records):
            if record.exc_info and record.exc_info[1] is not None:
                return f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return self.records[-1].getMessage() if self.records else "it did not say why"


def _export(module: torch.nn.Module, graph_spec: GraphSpec, sample: Sample, path: Path, opset: int | None,
            converter: _ConverterLog, templates: ExportTemplates | None = None) -> OnnxExport:
    # Keywords that are not graph inputs (flags such as return_dict=False) are bound into the
    # traced call as given: dropped, the export would trace the model's defaults instead.
    flags = {k: v for k, v in sample.kwargs.items() if k not in graph_spec.kwarg_names}
    sample = Sample(sample.args, {k: sample.kwargs[k] for k in graph_spec.kwarg_names if k in sample.kwargs})
    args, kwargs = tuple(sample.args), dict(sample.kwargs) or None
    dynamic_shapes = dynamic_shapes_for(module, graph_spec, sample)
    module, record = exportable(module, flags)
    with torch.no_grad():
        program, form = _export_with_registry(module, args, kwargs, dynamic_shapes, opset, templates)
        if program is None:
            program = torch.onnx.export(module, args, kwargs=kwargs, dynamo=True, verbose=False, external_data=True,
                                        opset_version=opset, dynamic_shapes=dynamic_shapes)
        wrote = _default_opset(program)
        if opset is not None and wrote is not None and wrote != opset:
            # The exporter works at its own opset and converts down after; when that fails it
            # keeps its own and only logs it: a candidate asking for an opset must get that one.
            why = (f"the ONNX exporter wrote opset {wrote}, not the {opset} asked for: it could not convert this "
                   f"model down ({converter.why()}); use opset {wrote} or leave it unset")
            if templates is not None and form is not None:
                templates.refuse(form, why)  # the next model of this graph is refused without translating it
            raise BuildRefused(why)
        program.save(str(path), external_data=True)
    data_file = path.with_name(path.name + ".data")
    return OnnxExport(
        model=path,
        external_data=data_file if data_file.exists() else None,
        out_spec=pytree.treespec_dumps(program.exported_program.call_spec.out_spec),
        out_tree=flat_tree(record, program.exported_program.call_spec.out_spec),
    )


@functools.lru_cache(maxsize=None)
def _exporter_core():
    """``(core, registration, dynamic_shapes, default opset, torchlib opset)`` from this torch's
    exporter, or None where they are not what :func:`_export_with_registry` expects."""
    try:
        from torch.onnx import _constants as onnx_constants
        from torch.onnx._internal.exporter import _constants, _core, _dynamic_shapes, _registration

        takes = set(inspect.signature(_core.export).parameters)
        if not {"registry", "dynamic_shapes", "opset_version", "verbose"} <= takes:
            return None
        if not (hasattr(_dynamic_shapes, "convert_str_to_export_dim") and hasattr(_registration.ONNXRegistry, "from_torchlib")):
            return None
        return _core, _registration, _dynamic_shapes, onnx_constants.ONNX_DEFAULT_OPSET, _constants.TORCHLIB_OPSET
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=None)
def _registry(opset: int):
    """The exporter's ATen-to-ONNX table for ``opset``, built once per process (read-only after)."""
    return _exporter_core()[1].ONNXRegistry.from_torchlib(opset_version=opset)


def _export_with_registry(module, args, kwargs, dynamic_shapes, opset: int | None,
                          templates: ExportTemplates | None = None):
    """What ``torch.onnx.export(dynamo=True)`` does for a module, with the table built once, and
    the program's form (None where it has none); ``(None, None)`` where this torch's exporter is
    not laid out as expected (the caller then calls it)."""
    parts = _exporter_core()
    if parts is None:
        return None, None
    core, _, shapes, default_opset, torchlib_opset = parts
    opset = default_opset if opset is None else opset
    # Below torchlib's own opset the exporter works at torchlib's and converts the model after;
    # the table is built only for a translation (a program filled from a template needs none).
    table_opset = max(opset, torchlib_opset)
    converted, renamed = shapes.convert_str_to_export_dim(dynamic_shapes)
    captured = _capture(module, args, kwargs, converted) if templates is not None else None
    form = None
    if captured is None:  # the exporter captures it, trying each of its ways
        program = core.export(module, args, kwargs, registry=_registry(table_opset), dynamic_shapes=converted,
                              verbose=False, opset_version=opset)
    else:
        form = program_form(captured, opset, repr(converted))
        refused = templates.refused(form) if form is not None else None
        if refused is not None:
            raise BuildRefused(refused)
        model = templates.take(form, captured) if form is not None else None
        if model is not None:
            program = torch.onnx.ONNXProgram(model, captured)
        else:
            program = core.export(captured, registry=_registry(table_opset), verbose=False, opset_version=opset,
                                  optimize=False)
            # one the exporter could not convert to the opset asked for is not kept: the
            # caller refuses it and remembers why, for the next export of that form
            if form is not None and _default_opset(program) == opset:
                templates.keep(form, program.model, captured)
        program.optimize()  # what the exporter does last, on this model's own weights
    if renamed and dynamic_shapes is not None:
        program._rename_dynamic_axes(dynamic_shapes)
    return program, form


def _capture(module, args, kwargs, dynamic_shapes):
    """The program the exporter's first way of capturing makes (``torch.export``, non-strict),
    or None where that fails or this torch lays it out otherwise."""
    try:
        from torch.onnx._internal.exporter import _capture_strategies

        strategy = _capture_strategies.TorchExportNonStrictStrategy(verbose=False)
    except (ImportError, AttributeError, TypeError):
        return None
    result = strategy(module, args, kwargs, dynamic_shapes=dynamic_shapes)
    program = getattr(result, "exported_program", None)
    return program if isinstance(program, torch.export.ExportedProgram) else None


def _default_opset(program) -> int | None:
    """The default-domain opset of an exported program's model, None where it does not say."""
    imports = getattr(getattr(program, "model", None), "opset_imports", None)
    try:
        return int(imports[""]) if imports is not None and "" in imports else None
    except (TypeError, ValueError):
        return None
