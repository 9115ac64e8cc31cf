"""The GPU path, from the CPU side: what can be checked without a GPU is checked here; the rest
runs only where CUDA is present (skipped with the reason on the CI machine, which has no GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aitune import examples
from aitune.defaults import candidates_for, is_baseline, make_backend
from aitune.gpu_defaults import gpu_candidates
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend import OnnxRuntimeBackend, OnnxRuntimeConfig, TorchInductorAotBackend, TorchInductorAotConfig
from aitune.torch.backend.backend import BackendState, UnsupportedDeviceError
from aitune.torch.backend.cuda_graph import CudaGraphBackend, CudaGraphConfig
from aitune.torch.cuda_graphs import shape_key

ROOT = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CI machine has none")


def tiny():
    module = examples.mlp(width=16, depth=2)
    sample = Sample.of(torch.randn(2, 16))
    return module, sample, GraphSpec.from_sample(sample)


def test_cuda_graph_backend_refuses_the_cpu_as_unsupported(tmp_path):
    module, sample, spec = tiny()
    backend = CudaGraphBackend()
    with pytest.raises(UnsupportedDeviceError, match="does not support device type 'cpu'"):
        backend.build(module, spec, [sample], "cpu", tmp_path)
    assert backend.state is BackendState.INIT


def test_cuda_graph_config_is_validated():
    with pytest.raises(ValueError, match="warmup_iters"):
        CudaGraphConfig(warmup_iters=0)
    with pytest.raises(ValueError, match="autocast needs precision"):
        CudaGraphConfig(autocast=True)
    assert CudaGraphConfig(precision="fp16").precision == "float16"
    assert CudaGraphConfig(precision="fp16").describe() == "precision=float16"


def test_aot_with_cuda_graphs_is_unsupported_on_cpu(tmp_path):
    module, sample, spec = tiny()
    with pytest.raises(UnsupportedDeviceError, match="cuda_graphs=True needs a CUDA device"):
        TorchInductorAotBackend(TorchInductorAotConfig(cuda_graphs=True)).build(module, spec, [sample], "cpu", tmp_path)
    assert TorchInductorAotConfig(cuda_graphs=True).key() != TorchInductorAotConfig().key()


def test_shape_key_tells_shapes_dtypes_and_layouts_apart():
    a = Sample.of(torch.randn(2, 3, 4, 4))
    assert shape_key(a) == shape_key(Sample.of(torch.randn(2, 3, 4, 4)))
    assert shape_key(a) != shape_key(Sample.of(torch.randn(4, 3, 4, 4)))
    assert shape_key(a) != shape_key(a.map(lambda t: t.half()))
    assert shape_key(a) != shape_key(a.map(lambda t: t.contiguous(memory_format=torch.channels_last)))


def test_gpu_default_set_has_the_winning_kinds():
    names = [(name, cfg) for name, cfg in gpu_candidates()]
    assert is_baseline(*names[0])
    kinds = {(name, cfg.get("precision"), cfg.get("mode"), cfg.get("cuda_graphs")) for name, cfg in names}
    assert ("TorchEagerBackend", "float16", None, None) in kinds
    assert ("TorchEagerBackend", "bfloat16", None, None) in kinds
    assert ("CudaGraphBackend", "float16", None, None) in kinds
    assert ("TorchInductorJitBackend", "float16", "reduce-overhead", None) in kinds
    assert ("TorchInductorAotBackend", "float16", None, True) in kinds
    assert ("TorchInductorAotBackend", "float16", None, None) in kinds
    assert not any(cfg.get("mode") == "max-autotune" for _, cfg in names)  # opt-in only
    assert any(cfg.get("mode") == "max-autotune" for _, cfg in gpu_candidates(include_max_autotune=True))
    for definition in names:  # every entry makes a valid backend
        make_backend(definition)


def test_optional_gpu_candidates_follow_what_is_installed():
    import importlib.util

    has_trt = importlib.util.find_spec("tensorrt") is not None
    assert any(name == "TensorRTBackend" for name, _ in gpu_candidates()) == has_trt
    import onnxruntime as ort

    has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    assert any(name == "OnnxRuntimeBackend" for name, _ in gpu_candidates()) == has_cuda_ep
    assert candidates_for("cuda") == gpu_candidates()


def test_onnxruntime_cuda_provider_is_unsupported_without_it(tmp_path):
    module, sample, spec = tiny()
    backend = OnnxRuntimeBackend(OnnxRuntimeConfig(providers=("CUDAExecutionProvider",)))
    with pytest.raises(UnsupportedDeviceError, match="none of the providers"):
        backend.build(module, spec, [sample], "cpu", tmp_path)


@pytest.mark.slow
def test_io_binding_gives_the_same_outputs_as_plain_runs(tmp_path):
    module, sample, spec = tiny()
    reference = sample(module)
    outs = {}
    for binding in (True, False):
        backend = OnnxRuntimeBackend(OnnxRuntimeConfig(io_binding=binding))
        backend.build(module, spec, [sample], "cpu", tmp_path / str(binding))
        first, second = backend.infer(*sample.args), backend.infer(*sample.args)  # second call binds
        torch.testing.assert_close(first, second)
        outs[binding] = second
    torch.testing.assert_close(outs[True], reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[True], outs[False])


def test_gpu_check_script_spec_is_valid_and_it_refuses_to_run_without_a_gpu(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    from orchestrator.spec import parse_spec

    args = type("Args", (), {"models": list(gpu_check.MODELS), "measure_s": 1.0, "total_s": 300.0, "store": str(tmp_path), "deploy": False})
    spec = parse_spec(gpu_check.build_spec(args))
    assert {m.name: spec.batches_of(m) for m in spec.models} == {"resnet50": [1, 32], "bert_base": [8], "mlp_12x512": [1]}
    assert spec.candidates is None  # the GPU default set
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "needs a GPU" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_script_rehearsed_on_the_cpu(tmp_path):
    """The script's whole flow (sweep, table, winners, top-3 re-measure) on CPU candidates, so that a
    first GPU session does not find the script's own bugs."""
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--models", "mlp_12x512",
         "--measure-s", "0.1", "--store", str(tmp_path / "store")],
        capture_output=True, text=True, timeout=540, env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "winner mlp_12x512 b1:" in done.stdout
    assert "re-measured interleaved" in done.stdout
    assert "sweep winner" in done.stdout and "gpu_check done" in done.stdout


@needs_cuda
def test_cuda_graph_backend_matches_eager_and_recaptures_per_shape(tmp_path):
    module, sample, spec = tiny()
    backend = CudaGraphBackend().build(module, spec, [sample], "cuda", tmp_path)
    for batch in (2, 4):
        x = torch.randn(batch, 16, device="cuda")
        torch.testing.assert_close(backend.infer(x).clone(), module.cuda()(x), atol=1e-5, rtol=1e-4)
    assert backend._runner.captured == 2


@needs_cuda
def test_onnxruntime_cuda_with_io_binding(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (CUDAExecutionProvider)")
    module, sample, spec = tiny()
    backend = OnnxRuntimeBackend(OnnxRuntimeConfig(providers=("CUDAExecutionProvider",)))
    backend.build(module, spec, [sample], "cuda", tmp_path)
    x = sample.args[0].cuda()
    backend.infer(x)
    out = backend.infer(x)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out, module.cuda()(x), atol=1e-4, rtol=1e-3)
