"""ONNX export with the dynamo exporter, shared by the ONNX Runtime and TensorRT backends."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from aitune.specs import GraphSpec, Sample, TensorSpec
from aitune.torch.export_utils import dynamic_shapes_for


@dataclass(frozen=True)
class OnnxExport:
    """What an export wrote: the model, its external weights (if any), and the output tree."""

    model: Path
    #: ``model.onnx.data``: the weights; it must stay beside ``model`` (the model names it relatively)
    external_data: Path | None
    #: the output pytree spec as ``torch.utils._pytree.treespec_dumps`` JSON
    out_spec: str


def onnx_input_order(graph_spec: GraphSpec) -> list[TensorSpec]:
    """The graph's inputs in the order the exported ONNX model takes them.

    The exporter takes positional tensors first, then keyword tensors in the order they are
    passed, which ``export_onnx`` makes ``graph_spec.kwarg_names``.
    """
    by_name = {t.name: t for t in graph_spec.inputs}
    return list(graph_spec.positional) + [by_name[k] for k in graph_spec.kwarg_names]


def export_onnx(
    module: torch.nn.Module, graph_spec: GraphSpec, sample: Sample, path: str | Path, opset: int | None = None
) -> OnnxExport:
    """Export ``module`` called on ``sample`` to ``path`` with the spec's dynamic axes.

    The caller prepares ``module`` and ``sample`` (device, dtype): they are exported as given.
    Keyword arguments that are not graph inputs (flags such as ``return_dict=False``) are dropped.
    """
    path = Path(path)
    # The exporter warns once per missing optional library (torchvision ops) at every export.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(max(level, logging.ERROR))
    try:
        return _export(module, graph_spec, sample, path, opset)
    finally:
        onnx_log.setLevel(level)


def _export(module: torch.nn.Module, graph_spec: GraphSpec, sample: Sample, path: Path, opset: int | None) -> OnnxExport:
    sample = Sample(sample.args, {k: sample.kwargs[k] for k in graph_spec.kwarg_names if k in sample.kwargs})
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            tuple(sample.args),
            kwargs=dict(sample.kwargs) or None,
            dynamo=True,
            verbose=False,
            external_data=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes_for(module, graph_spec, sample),
        )
        program.save(str(path), external_data=True)
    data_file = path.with_name(path.name + ".data")
    return OnnxExport(
        model=path,
        external_data=data_file if data_file.exists() else None,
        out_spec=pytree.treespec_dumps(program.exported_program.call_spec.out_spec),
    )
