"""AOTInductor and ONNX Runtime on models returning a named tuple or a dataclass: torch's pytree
can't keep those (the package or export fails), so the compiled form returns flat tensors and the
backend rebuilds the output, here and, from its checkpoint, in a fresh process."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from aitune.check import compare_outputs, tolerance_for
from aitune.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend import OnnxRuntimeBackend, TorchInductorAotBackend
from aitune_helpers import HERE, PYTHON, needs_onnx_export, subprocess_env
from structured_outputs import Boxes, Scores, box_head, named_head

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BACKENDS = {"aot": TorchInductorAotBackend, "onnxruntime": OnnxRuntimeBackend}
MODELS = {"named_tuple": (named_head, Scores), "dataclass": (box_head, Boxes)}
SAMPLE = Sample.of(torch.randn(2, 8, generator=torch.Generator().manual_seed(3)))


@pytest.fixture(scope="module", params=[("aot", "named_tuple"), ("onnxruntime", "dataclass"), ("onnxruntime", "named_tuple")],
                ids=lambda p: "-".join(p))
def built(request, tmp_path_factory):
    backend_name, model_name = request.param
    if backend_name == "onnxruntime":
        needs_onnx_export()
    factory, out_type = MODELS[model_name]
    model = factory()
    with torch.inference_mode():
        reference = SAMPLE(model)
    backend = BACKENDS[backend_name]()
    backend.build(model, GraphSpec.from_sample(SAMPLE, reference), [SAMPLE], "cpu", tmp_path_factory.mktemp("build"))
    return backend, reference, out_type


def test_the_output_comes_back_as_the_models_own_type_and_matches_eager(built):
    backend, reference, out_type = built
    with torch.inference_mode():
        out = SAMPLE(backend.infer)
    assert type(out) is out_type
    check = compare_outputs(reference, out, tolerance_for("float32"))
    assert check.ok, check.reason
    if out_type is Boxes:
        assert out.meta["count"] == 4 and out.meta["parts"][1] is None  # constants kept as they were


@pytest.mark.parametrize("import_types", [True, False], ids=["types-imported", "stand-ins"])
def test_a_checkpoint_rebuilds_the_output_in_a_fresh_process(built, tmp_path, import_types):
    backend, reference, out_type = built
    save_checkpoint(backend, tmp_path / "ckpt")
    torch.save(SAMPLE.args[0], tmp_path / "x.pt")
    flags = ["--import-types"] if import_types else []
    proc = subprocess.run([PYTHON, str(HERE / "output_tree_child.py"), str(tmp_path / "ckpt"), str(tmp_path / "x.pt"),
                           str(tmp_path / "out.pt"), *flags],
                          env=subprocess_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    module, _, name = got["type"].partition(":")
    # the model's own type where its module is imported; else a stand-in of that name and shape
    assert name == out_type.__name__ and (module == "structured_outputs") == import_types
    assert got["fields"] == {Scores: ["logits", "best"], Boxes: ["boxes", "meta"]}[out_type]
    first = reference[0] if isinstance(reference, tuple) else reference.boxes
    assert torch.allclose(got["first"].float(), first.float(), atol=1e-5)


def test_a_checkpoint_whose_output_tree_was_edited_is_refused_before_it_runs(built, tmp_path):
    backend, _, _ = built
    save_checkpoint(backend, tmp_path / "ckpt")
    manifest = tmp_path / "ckpt" / "manifest.json"
    data = json.loads(manifest.read_text())
    assert data["state"]["out_tree"] is not None
    data["state"]["out_tree"] = {"tuple": [{"tensor": 0}, {"tensor": 5}]}
    manifest.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "ckpt", "cpu")
    assert "output tree: tensor slots [0, 5] are not 0..1" in str(info.value)


def test_an_onnx_export_traces_the_flags_the_sample_passes_not_the_models_defaults(tmp_path):
    needs_onnx_export()
    from structured_outputs import Flagged

    torch.manual_seed(0)
    model = Flagged().eval()
    sample = Sample((SAMPLE.args[0],), {"return_dict": False})
    with torch.inference_mode():
        reference = sample(model)
    backend = OnnxRuntimeBackend()
    backend.build(model, GraphSpec.from_sample(sample, reference), [sample], "cpu", tmp_path / "build")
    with torch.inference_mode():
        out = sample(backend.infer)
    assert type(out) is tuple  # what return_dict=False gives, not the default's dict
    check = compare_outputs(reference, out, tolerance_for("float32"))
    assert check.ok, check.reason


CHILD_WITHOUT_THE_LIBRARY = """
import sys, torch
from aitune.checkpoint import load_checkpoint
backend = load_checkpoint(sys.argv[1], "cpu", allow_factories=True)
backend.deploy("cpu")
ids = torch.load(sys.argv[2], weights_only=True)
with torch.inference_mode():
    out = backend.infer(input_ids=ids, attention_mask=torch.ones_like(ids))
assert "transformers" not in sys.modules, "the child imported transformers"
torch.save({"type": type(out).__name__, "last_hidden_state": out["last_hidden_state"]}, sys.argv[3])
"""


@pytest.mark.parametrize("backend_name", ["aot", "onnxruntime"])
def test_a_hugging_face_output_is_read_back_where_transformers_was_never_imported(backend_name, tmp_path):
    """A deploy target or a serving process loads the artifact without importing the model's
    library: torch's pytree knows an HF ModelOutput only where transformers was imported, so such
    an output is kept as our own tree (rebuilt as a stand-in there), never as torch's treespec."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (the test extra has it)")
    if backend_name == "onnxruntime":
        needs_onnx_export()
    from aitune.examples_hf import bert

    model = bert(layers=1, hidden=32, heads=2, vocab=100)
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    sample = Sample((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    with torch.inference_mode():
        reference = sample(model)
    backend = BACKENDS[backend_name]()
    backend.build(model, GraphSpec.from_sample(sample, reference), [sample], "cpu", tmp_path / "build")
    save_checkpoint(backend, tmp_path / "ckpt")
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run([PYTHON, "-c", CHILD_WITHOUT_THE_LIBRARY, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], env=subprocess_env(), capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["type"] == "dict"  # the ModelOutput's stand-in there: its entries, by name
    assert torch.allclose(got["last_hidden_state"], reference.last_hidden_state, atol=1e-4)
