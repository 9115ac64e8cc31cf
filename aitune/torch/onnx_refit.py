"""ONNX exports of one graph with other weights: translated once, filled with each model's weights.

An ONNX export captures the module (``torch.export``, a fraction of a second for a small model),
decomposes the captured program and translates it into ONNX (most of the export's time), then
optimises the ONNX graph. Fine-tunes of one base capture the same program but for the values
of their weights, and its decomposition and translation do not read those values (the
exporter gives its initializers their values only after translating the graph): the ONNX graph
before optimisation is the same but for its initializers' values. The optimiser, which
does read them (it folds constants), runs on each model's own weights.

:class:`ExportTemplates` keeps, per captured program's *form* (:func:`program_form`: its graph
code, signature, every node's shape and dtype, its parameters' and buffers' names, shapes and
dtypes, the values of its other tensor constants), the translated ONNX graph with its initializers emptied. An
export whose capture has a form kept before fills a copy of that graph with its own
parameters, buffers and constants (:func:`refit`) instead of translating again. A program
whose form can't vouch for it (subgraphs or tensors held in the graph itself, non-tensor
constants), or a template with an initializer the new program does not fill, is translated as
before. A form the exporter could not convert to the opset asked for is remembered with why,
and the next program of that form refused at once (conversion reads the graph, not the
weights). The owner of the templates decides what shares them (an ``ExportCache``, one per
worker); nothing here is global. Given a :class:`~aitune.torch.template_dir.TemplateDir`, the
templates and the refusals are also written to disk and read back from it, so that other
processes of the machine, and later runs, fill them instead of translating again (or refuse at once).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Iterator

import torch

if TYPE_CHECKING:
    from aitune.torch.template_dir import TemplateDir

#: templates kept at most, least recently used first out; each holds a graph, not its weights
DEFAULT_LIMIT = 16


class ExportTemplates:
    def __init__(self, limit: int = DEFAULT_LIMIT, disk: "TemplateDir | None" = None) -> None:
        self.limit = int(limit)
        self.disk = disk
        self._kept: OrderedDict[str, Any] = OrderedDict()
        #: exports filled from a template, and templates made
        self.hits = 0
        self.misses = 0
        #: of the hits, those whose template was read from ``disk`` (made by another process)
        self.disk_hits = 0
        #: forms the exporter could not translate as asked (an opset it can't convert down to),
        #: with why: the same graph is refused at once (by other processes too, through ``disk``)
        self._refused: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def take(self, form: str, program: torch.export.ExportedProgram):
        """A copy of the ONNX model kept for ``form`` filled with ``program``'s weights, or None."""
        template, from_disk = self._kept.get(form), False
        if template is None and self.disk is not None:
            template, from_disk = self.disk.load(form), True
        if template is None:
            return None
        model = refit(template, program)
        if model is None:
            return None
        self._remember(form, template)
        self.hits += 1
        self.disk_hits += from_disk
        return model

    def keep(self, form: str, model, program: torch.export.ExportedProgram) -> bool:
        """Keep ``model`` (the unoptimised translation of ``program``), its initializers emptied;
        False where ``program`` would not fill all of them again (nothing is kept)."""
        if not set(model.graph.initializers) <= {name for name, _ in _weights(program)}:
            return False
        template = model.clone()
        for value in template.graph.initializers.values():
            value.const_value = None  # the template holds no model's weights
        self._remember(form, template)
        if self.disk is not None:
            self.disk.save(form, template)
        self.misses += 1
        return True

    def refuse(self, form: str, why: str) -> None:
        """Remember that ``form`` can't be exported as asked, and why (on ``disk`` too)."""
        self._remember_refusal(form, why)
        if self.disk is not None:
            self.disk.refuse(form, why)

    def refused(self, form: str) -> str | None:
        """Why ``form`` was refused before, in this process or by one that left it on ``disk``; or None."""
        why = self._refused.get(form)
        if why is None and self.disk is not None:
            why = self.disk.refusal(form)
            if why is not None:
                self._remember_refusal(form, why)
        return why

    def _remember_refusal(self, form: str, why: str) -> None:
        self._refused[form] = why
        self._refused.move_to_end(form)
        while len(self._refused) > self.limit:
            self._refused.popitem(last=False)

    def _remember(self, form: str, template) -> None:
        self._kept[form] = template
        self._kept.move_to_end(form)
        while len(self._kept) > self.limit:
            self._kept.popitem(last=False)

    def clear(self) -> None:
        self._kept.clear()
        self._refused.clear()


def program_form(program: torch.export.ExportedProgram, *context: Any) -> str | None:
    """A hash of everything in ``program`` that its ONNX translation depends on but the values of
    its parameters and buffers, and of ``context`` (the opset, the dynamic shapes asked for);
    None where the program holds something this can't vouch for."""
    digest = hashlib.sha256()

    def add(*parts: Any) -> None:
        for part in parts:
            digest.update(repr(part).encode())
            digest.update(b"\x00")

    gm = program.graph_module
    for node in gm.graph.nodes:
        if node.op == "get_attr":  # a subgraph, or a tensor held in the graph itself
            return None
        add(node.name, node.op, str(node.target), _meta_form(node.meta.get("val")))
    add(gm.code, str(program.graph_signature), str(program.call_spec),
        sorted((str(k), str(v)) for k, v in program.range_constraints.items()), context)
    for name, tensor in itertools.chain(program.named_parameters(), program.named_buffers()):
        add(name, str(tensor.dtype), tuple(tensor.shape), tuple(tensor.stride()), tensor.device.type)
    buffers = set(program.graph_signature.non_persistent_buffers)  # weights, for all they are kept apart
    for name, value in sorted(program.constants.items()):
        if name in buffers:
            continue
        if not isinstance(value, torch.Tensor):
            return None  # a script object
        t = value.detach().cpu().contiguous()
        add(name, str(t.dtype), tuple(t.shape))
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def refit(template, program: torch.export.ExportedProgram):
    """A copy of ``template`` whose initializers hold ``program``'s parameters, buffers and
    constants, as the exporter fills them; None where one would be left empty."""
    from torch.onnx._internal.exporter._core import TorchTensor

    model = template.clone()
    initializers = model.graph.initializers
    filled = set()
    for name, tensor in _weights(program):
        value = initializers.get(name)
        if value is None:  # the exporter passes over these too
            continue
        if not isinstance(tensor, torch.Tensor):
            return None
        if tensor.dtype.is_complex:  # as the exporter writes them
            tensor = torch.view_as_real(tensor)
        value.const_value = TorchTensor(tensor, name=name)
        filled.add(name)
    if filled != set(initializers):
        return None
    return model


def _weights(program: torch.export.ExportedProgram) -> Iterator[tuple[str, Any]]:
    return itertools.chain(program.named_parameters(), program.named_buffers(), program.constants.items())


def _meta_form(value: Any) -> Any:
    """What a node's ``val`` says of its shape and type, not its data."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), str(tuple(value.shape)), str(value.stride()) if value.layout == torch.strided else
                str(value.layout), value.device.type, value.requires_grad)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_meta_form(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _meta_form(v)) for k, v in value.items())))
    if value is None or isinstance(value, (bool, int, float, str, torch.SymInt, torch.SymFloat, torch.SymBool)):
        return (type(value).__name__, str(value))
    return (type(value).__name__, repr(value))  # an address in it only keeps templates apart
