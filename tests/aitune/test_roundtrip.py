"""Every CPU backend: build, check against eager fp32, save, then load and deploy in a fresh process.

Builds are shared per backend (module-scoped fixture): inductor backends take seconds to compile.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from aitune import attach_factory, examples
from aitune.check import compare_outputs, tolerance_for
from aitune.checkpoint import read_manifest, save_checkpoint
from aitune.specs import GraphSpec
from aitune.torch.backend import (
    BackendState,
    OnnxRuntimeBackend,
    TorchEagerBackend,
    TorchEagerConfig,
    TorchInductorAotBackend,
    TorchInductorJitBackend,
)
from aitune_helpers import HERE, PYTHON, needs_onnx_export, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CANDIDATES = {
    "eager_fp32": lambda: TorchEagerBackend(),
    "eager_bf16": lambda: TorchEagerBackend(TorchEagerConfig(precision="bfloat16")),
    "inductor_jit": lambda: TorchInductorJitBackend(),
    "inductor_aot": lambda: TorchInductorAotBackend(),
    "onnxruntime": lambda: OnnxRuntimeBackend(),
}


@pytest.fixture(scope="module")
def model():
    return attach_factory(examples.small_cnn(channels=8), "aitune.examples:small_cnn", {"channels": 8})


@pytest.fixture(scope="module")
def sample():
    return examples.image_sample(2, size=16, seed=1)


@pytest.fixture(scope="module")
def reference(model, sample):
    with torch.inference_mode():
        return sample(model)


@pytest.fixture(scope="module", params=list(CANDIDATES))
def built(request, model, sample, tmp_path_factory):
    """(name, backend, first-process outputs, tolerance) for one candidate, built once."""
    name = request.param
    if name == "onnxruntime":
        needs_onnx_export()
    backend = CANDIDATES[name]()
    spec = GraphSpec.from_sample(sample)
    backend.build(model, spec, [sample], "cpu", tmp_path_factory.mktemp(f"build-{name}"))
    with torch.inference_mode():
        outputs = sample(backend.infer)
    yield name, backend, outputs, tolerance_for(backend.config.precision)
    if backend.state is BackendState.ACTIVE:
        backend.deactivate()


def test_build_matches_eager_fp32(built, reference):
    name, backend, outputs, tolerance = built
    assert backend.state is BackendState.ACTIVE
    result = compare_outputs(reference, outputs, tolerance)
    assert result.ok, f"{name}: {result.reason}"


def test_checkpoint_deploys_in_a_fresh_process(built, sample, reference, tmp_path):
    name, backend, outputs, tolerance = built
    checkpoint = tmp_path / "checkpoint"
    manifest = save_checkpoint(backend, checkpoint)
    assert manifest.backend == type(backend).__name__
    x = sample.args[0]
    torch.save(x, tmp_path / "input.pt")

    proc = subprocess.run(
        [PYTHON, str(HERE / "roundtrip_child.py"), str(checkpoint), str(tmp_path / "input.pt"),
         str(tmp_path / "output.pt"), str(tmp_path / "report.json")],
        env=subprocess_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["states"] == ["CHECKPOINT_LOADED", "DEPLOYED"]
    assert report["backend"] == type(backend).__name__
    assert report["device"] == "cpu"
    assert report["config"] == backend.config.to_dict()

    deployed = torch.load(tmp_path / "output.pt", weights_only=True)
    again = compare_outputs(outputs, deployed, tolerance)
    assert again.ok, f"{name}: the deployed checkpoint's outputs differ from the first process's: {again.reason}"
    assert deployed.dtype == outputs.dtype and deployed.shape == outputs.shape
    correct = compare_outputs(reference, deployed, tolerance)
    assert correct.ok, f"{name}: {correct.reason}"


def test_checkpoint_holds_no_absolute_paths(built, tmp_path):
    _, backend, _, _ = built
    save_checkpoint(backend, tmp_path / "ckpt")
    text = (tmp_path / "ckpt" / "manifest.json").read_text()
    assert str(tmp_path) not in text
    assert str(backend.work_dir()) not in text


def test_aot_refuses_an_input_shape_it_was_not_built_for(model, sample, tmp_path_factory):
    backend = TorchInductorAotBackend()
    spec = GraphSpec.from_sample(sample)
    backend.build(model, spec, [sample], "cpu", tmp_path_factory.mktemp("aot-shape"))
    wrong = torch.randn(4, 3, 16, 16)
    with pytest.raises(ValueError) as info:
        backend.infer(wrong)
    message = str(info.value)
    assert "TorchInductorAotBackend" in message
    assert "'input_0'" in message
    assert "(4, 3, 16, 16)" in message and "(2, 3, 16, 16)" in message
    with pytest.raises(ValueError, match="dtype float64 but the graph was built for float32"):
        backend.infer(sample.args[0].double())
    backend.infer(sample.args[0])  # the right shape still works


def test_onnx_checkpoint_contains_the_external_data_file(model, sample, tmp_path):
    needs_onnx_export()
    import onnx

    backend = OnnxRuntimeBackend().build(model, GraphSpec.from_sample(sample), [sample], "cpu", tmp_path / "build")
    manifest = save_checkpoint(backend, tmp_path / "ckpt")
    paths = {a.path: a for a in manifest.artifacts}
    assert "artifacts/model.onnx" in paths and "artifacts/model.onnx.data" in paths
    data_file = tmp_path / "ckpt" / "artifacts" / "model.onnx.data"
    assert data_file.is_file() and data_file.stat().st_size == paths["artifacts/model.onnx.data"].size > 0
    assert read_manifest(tmp_path / "ckpt").state["external_data"] == {"__artifact__": "artifacts/model.onnx.data"}
    # the model finds its weights beside it, by a relative name
    proto = onnx.load(str(tmp_path / "ckpt" / "artifacts" / "model.onnx"), load_external_data=False)
    locations = {
        entry.value for init in proto.graph.initializer for entry in init.external_data if entry.key == "location"
    }
    assert locations == {"model.onnx.data"}
