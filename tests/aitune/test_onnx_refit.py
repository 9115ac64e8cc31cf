"""ONNX exports of one graph with other weights: filled from a template, the same as exported afresh."""

from __future__ import annotations

import pytest
import torch

from aitune.specs import GraphSpec, Sample
from aitune.torch.export_cache import ExportCache
from aitune.torch.onnx_export import export_onnx
from aitune.torch.onnx_refit import ExportTemplates, program_form
from aitune_helpers import needs_onnx_export, tiny_mlp


@pytest.fixture(autouse=True)
def _onnx():
    needs_onnx_export()


class Scaled(torch.nn.Module):
    """One state dict for every ``scale`` and ``act``: only the graph tells them apart."""

    def __init__(self, scale: float = 1.0, act: str = "relu", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("offset", torch.randn(8), persistent=False)  # not in the state dict
        self.scale, self.act = scale, act

    def forward(self, x):
        y = self.lin(x) * self.scale + self.offset
        return torch.relu(y) if self.act == "relu" else torch.tanh(y)


def sample(width: int = 16) -> Sample:
    return Sample((torch.randn(2, width, generator=torch.Generator().manual_seed(3)),), {})


def export(module, s, path, templates):
    return export_onnx(module, GraphSpec.from_sample(s), s, path, None, templates)


def run_onnx(export_, s):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(export_.model), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: s.args[0].numpy()})[0])


def graph_and_weights(export_):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(export_.model))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = [(n.op_type, list(n.input), list(n.output), [str(a) for a in n.attribute]) for n in model.graph.node]
    return nodes, weights


def test_a_fine_tune_is_filled_in_and_is_what_a_fresh_export_makes(tmp_path):
    s = sample()
    templates = ExportTemplates()
    export(tiny_mlp(seed=0), s, tmp_path / "a.onnx", templates)
    tuned = tiny_mlp(seed=1)
    filled = export(tuned, s, tmp_path / "b.onnx", templates)
    assert (templates.misses, templates.hits) == (1, 1)
    fresh = export(tuned, s, tmp_path / "c.onnx", None)
    (nodes_f, weights_f), (nodes_e, weights_e) = graph_and_weights(filled), graph_and_weights(fresh)
    assert nodes_f == nodes_e
    assert sorted(weights_f) == sorted(weights_e)
    assert all((weights_f[k] == weights_e[k]).all() for k in weights_e)
    torch.testing.assert_close(run_onnx(filled, s), tuned(*s.args).detach(), rtol=1e-4, atol=1e-5)


def test_the_template_holds_no_weights_and_each_export_runs_its_own(tmp_path):
    s = sample()
    templates = ExportTemplates()
    first, second = tiny_mlp(seed=0), tiny_mlp(seed=1)
    a = export(first, s, tmp_path / "a.onnx", templates)
    b = export(second, s, tmp_path / "b.onnx", templates)
    assert templates.hits == 1
    (template,) = templates._kept.values()
    assert all(v.const_value is None for v in template.graph.initializers.values())
    torch.testing.assert_close(run_onnx(a, s), first(*s.args).detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run_onnx(b, s), second(*s.args).detach(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(run_onnx(a, s), run_onnx(b, s))


def test_the_same_state_dict_in_another_graph_is_translated_again(tmp_path):
    s = sample(8)
    templates = ExportTemplates()
    models = [Scaled(1.0, seed=0), Scaled(0.5, seed=0), Scaled(1.0, act="tanh", seed=0), Scaled(1.0, seed=1)]
    exports = [export(m, s, tmp_path / f"{i}.onnx", templates) for i, m in enumerate(models)]
    # the scale and the activation are in the graph, not the state: each is its own translation;
    # the last differs from the first in its weights and its non-persistent buffer only
    assert (templates.misses, templates.hits) == (3, 1)
    for module, made in zip(models, exports):
        torch.testing.assert_close(run_onnx(made, s), module(*s.args).detach(), rtol=1e-4, atol=1e-5)


def test_a_program_with_a_tensor_constant_is_told_apart_by_its_value():
    class Shift(torch.nn.Module):
        def __init__(self, by: float) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.by = by

        def forward(self, x):
            return self.lin(x) + torch.tensor([self.by] * 4)

    x = torch.randn(2, 4)
    forms = [program_form(torch.export.export(Shift(b), (x,), strict=False)) for b in (1.0, 1.0, 2.0)]
    assert forms[0] is not None and forms[0] == forms[1] != forms[2]


def test_a_template_the_program_would_not_fill_is_not_kept(tmp_path):
    x = torch.randn(2, 16)
    program = torch.export.export(tiny_mlp(), (x,), strict=False)
    other = torch.export.export(torch.nn.Linear(16, 4), (x,), strict=False)
    templates = ExportTemplates()
    from torch.onnx._internal.exporter import _core

    model = _core.export(program, optimize=False).model
    assert not templates.keep("f", model, other)  # its initializers are not the other's
    assert len(templates) == 0 and templates.take("f", program) is None
    assert templates.keep("f", model, program) and len(templates) == 1
    assert templates.take("f", other) is None  # would leave initializers empty: refused


def test_the_export_cache_fills_fine_tunes_from_what_it_translated(tmp_path):
    from aitune.torch.backend import OnnxRuntimeBackend
    from aitune.torch.backend.backend import build_sharing

    s = sample()
    exports = ExportCache(tmp_path / "exports")
    built = []
    for seed in range(3):
        module = tiny_mlp(seed=seed)
        spec = GraphSpec.from_sample(s, module(*s.args))
        built.append((module, build_sharing(OnnxRuntimeBackend(), module, spec, [s], "cpu", tmp_path / str(seed), exports)))
    assert exports.misses == 3 and (exports.templates.misses, exports.templates.hits) == (1, 2)
    for module, backend in built:
        torch.testing.assert_close(backend.infer(*s.args), module(*s.args), rtol=1e-4, atol=1e-5)
    exports.clear()
    assert len(exports.templates) == 0


def test_an_export_refused_for_its_opset_is_not_kept_and_the_next_one_is_refused_for_the_same_reason_untranslated(
        tmp_path, monkeypatch):
    from torch.onnx._internal.exporter import _core

    from aitune.examples import small_encoder

    translations = []
    real = _core.export
    monkeypatch.setattr(_core, "export", lambda *a, **k: translations.append(1) or real(*a, **k))
    x = torch.randint(0, 1000, (1, 64))
    s = Sample((x,), {})
    templates = ExportTemplates()
    messages = []
    for seed in range(2):  # the encoder's attention can't be converted down to opset 17
        with pytest.raises(ValueError, match="not the 17 asked for") as err:
            export_onnx(small_encoder(dim=32, layers=1, seed=seed), GraphSpec.from_sample(s), s,
                        tmp_path / f"{seed}.onnx", 17, templates)
        messages.append(str(err.value))
    assert len(templates) == 0 and templates.hits == 0
    assert all("did not say why" not in m for m in messages), messages
    assert messages[0] == messages[1] and len(translations) == 1  # the second model was not translated
    # another graph is tried on its own: a refusal is of one form, not of the opset
    with pytest.raises(ValueError, match="not the 17 asked for"):
        export_onnx(small_encoder(dim=32, layers=2), GraphSpec.from_sample(s), s, tmp_path / "2.onnx", 17, templates)
    assert len(translations) == 2
    # the opset the exporter can write is not refused for that graph
    made = export_onnx(small_encoder(dim=32, layers=1, seed=5), GraphSpec.from_sample(s), s, tmp_path / "3.onnx", 18,
                       templates)
    assert made.model.exists() and len(templates) == 1
