"""ONNX export with the exporter's ATen-to-ONNX table built once per process and opset.

The fast path hands a cached table to the exporter's core; these tests hold it to the same
model ``torch.onnx.export`` writes, on a dynamic batch and with keyword inputs, and check the
table is built once and not once per export.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from aitune.build_refusal import BuildRefused
from aitune.specs import GraphSpec, Sample
from aitune.torch import onnx_export
from aitune.torch.onnx_export import export_onnx

from aitune_helpers import needs_onnx_export, tiny_mlp


class _Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(8, 4)

    def forward(self, x, mask=None, scale=None):
        y = self.lin(x)
        return {"masked": y * mask, "scaled": (y + scale,)}


def _cases():
    mlp_sample = Sample((torch.randn(2, 16),), {})
    kw_sample = Sample((torch.randn(2, 8),), {"scale": torch.randn(2, 4), "mask": torch.ones(2, 4)})
    return [
        ("mlp, dynamic batch", tiny_mlp(), GraphSpec.from_sample(mlp_sample, dynamic_batch=(1, 8)), mlp_sample, None),
        ("mlp, static, opset 17", tiny_mlp(), GraphSpec.from_sample(mlp_sample), mlp_sample, 17),
        ("keywords, dynamic batch", _Keywords().eval(), GraphSpec.from_sample(kw_sample, dynamic_batch=(1, 16)), kw_sample, None),
    ]


def _path(root, name):
    (root / name).mkdir()
    return root / name / "model.onnx"


def _graph(path):
    import onnx

    model = onnx.load(str(path))
    return model.graph, [(o.domain, o.version) for o in model.opset_import]


@pytest.mark.slow
@pytest.mark.parametrize("case", range(3), ids=["mlp, dynamic batch", "mlp, static, opset 17", "keywords, dynamic batch"])
def test_the_fast_path_writes_what_torch_onnx_export_writes(case, tmp_path, monkeypatch):
    needs_onnx_export()
    if onnx_export._exporter_core() is None:
        pytest.skip("this torch's exporter has no core that takes a registry: every export is the public one")
    _, module, spec, sample, opset = _cases()[case]
    fast = export_onnx(module, spec, sample, _path(tmp_path, "fast"), opset)
    # The public path, as on a torch whose exporter internals are laid out otherwise.
    monkeypatch.setattr(onnx_export, "_exporter_core", lambda: None)
    public = export_onnx(module, spec, sample, _path(tmp_path, "public"), opset)
    assert _graph(fast.model) == _graph(public.model)
    assert fast.out_spec == public.out_spec


@pytest.mark.slow
def test_the_table_is_built_once_per_opset_not_per_export(tmp_path, monkeypatch):
    needs_onnx_export()
    parts = onnx_export._exporter_core()
    if parts is None:
        pytest.skip("this torch's exporter has no core that takes a registry: every export builds its own table")
    registration = parts[1]
    built = []
    real = registration.ONNXRegistry.from_torchlib

    def counting(*args, **kwargs):
        built.append(kwargs.get("opset_version"))
        return real(*args, **kwargs)

    monkeypatch.setattr(registration.ONNXRegistry, "from_torchlib", counting)
    onnx_export._registry.cache_clear()
    sample = Sample((torch.randn(1, 16),), {})
    spec = GraphSpec.from_sample(sample)
    for i in range(3):
        export_onnx(tiny_mlp(seed=i), spec, sample, _path(tmp_path, f"m{i}"))
    assert len(built) == 1
    # opset 17 is below torchlib's own: the exporter works at torchlib's and converts after
    export_onnx(tiny_mlp(), spec, sample, _path(tmp_path, "opset"), opset=17)
    assert built == [parts[3], max(17, parts[4])]
    onnx_export._registry.cache_clear()  # leave no table built from the counting wrapper behind


@pytest.mark.slow
def test_an_opset_the_exporter_could_not_convert_to_is_refused_not_passed_off(tmp_path):
    # torch's exporter works at its own opset and converts down after; on this encoder the
    # conversion to 17 fails and it keeps 18, only logging it. The candidate asked for 17.
    needs_onnx_export()
    from aitune import examples

    module, sample = examples.small_encoder().eval(), examples.token_sample(1)
    root = logging.getLogger()
    seen = _Records()
    root.addHandler(seen)
    try:
        with pytest.raises(ValueError, match=r"wrote opset (\d+), not the 17 asked for") as raised:
            export_onnx(module, GraphSpec.from_sample(sample), sample, _path(tmp_path, "encoder"), opset=17)
    finally:
        root.removeHandler(seen)
    assert not (tmp_path / "encoder" / "model.onnx").exists()  # nothing written for it
    assert isinstance(raised.value, BuildRefused)  # a known refusal: Backend.build logs it without a traceback
    # the converter's reason is in the error, and its traceback not in the caller's log
    assert "it did not say why" not in str(raised.value) and "Error" in str(raised.value).split("(", 1)[1]
    assert not [r for r in seen.records if r.name.startswith("onnxscript.version_converter")]
    assert logging.getLogger("onnxscript.version_converter").propagate  # put back as it was


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)
