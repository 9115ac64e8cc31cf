"""The GPU path, second review (issue 31): each fix checked here as far as a machine without a GPU
allows, and on a GPU by the tests marked ``gpu`` (skipped here, each naming why).

Where a test replaces a CUDA or TensorRT call, it says so: those can't exist on this machine.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest
import torch

from aitune import examples
from aitune.check import tolerance_for
from aitune.judge import judge
from aitune.specs import GraphSpec, Sample
from aitune.torch import cuda_graphs
from aitune.torch.backend import OnnxRuntimeBackend, OnnxRuntimeConfig, TorchInductorJitBackend, TorchInductorJitConfig
from aitune.torch.backend.backend import UnsupportedDeviceError
from aitune.torch.backend.eager import TorchEagerBackend
from aitune.torch.backend.inductor_aot import on_device
from aitune.torch.cuda_graphs import CudaGraphCaptureError, CudaGraphRunner, capture
from aitune.torch.precision import fp32_reference_settings, use_fp32_reference_settings
from aitune.torch.tree import flatten_tensors, map_tensors
from aitune_helpers import needs_onnx_export

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU; this machine has none")


def tiny(batch: int = 2):
    module = examples.mlp(width=16, depth=2)
    sample = Sample.of(torch.randn(batch, 16))
    return module, sample, GraphSpec.from_sample(sample)


# -- 1, 12: a failed capture ends allocation to its pool; captures are thread-local ---------------------
class _FakeGraph:
    """The calls ``capture`` makes on a ``torch.cuda.CUDAGraph``: the CUDA runtime does not exist here."""

    def __init__(self, end_error: Exception | None = None, ended_allocation: bool = False) -> None:
        self.end_error, self.ended_allocation = end_error, ended_allocation
        self.begun_with: dict = {}

    def capture_begin(self, **kwargs):
        self.begun_with = kwargs

    def capture_end(self):
        if self.end_error is not None:
            raise self.end_error

    def pool(self):
        if not self.ended_allocation:  # what torch says for a capture that never ended
            raise RuntimeError("Called CUDAGraph::pool() without a preceding successful capture.")
        return self.begun_with["pool"]


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream calls and the caching allocator's pool calls, recorded (no CUDA here)."""
    calls: list[tuple] = []
    current = ["default"]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: current.__setitem__(0, stream))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 77))
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda device, pool: calls.append(("end", device, pool)),
                        raising=False)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda device, pool: calls.append(("release", device, pool)),
                        raising=False)
    return calls


def test_a_failed_capture_ends_allocation_to_the_pool_it_began_with_and_releases_it(fake_cuda):
    graph = _FakeGraph(RuntimeError("CUDA error: operation failed due to a previous error during capture"))
    with pytest.raises(CudaGraphCaptureError):
        capture(graph, lambda: "out", "capture stream", pool=(0, 5))
    assert graph.begun_with["pool"] == (0, 5)
    # the allocator is told on the capture's device, with the pool handed to capture_begin
    assert fake_cuda == [("end", 3, (0, 5)), ("release", 3, (0, 5))]


def test_a_capture_without_a_pool_gets_its_own_and_ends_it_on_failure(fake_cuda):
    graph = _FakeGraph(RuntimeError("capture failed"))
    with pytest.raises(CudaGraphCaptureError):
        capture(graph, lambda: "out", "capture stream")
    assert graph.begun_with["pool"] == (0, 77)  # from graph_pool_handle(), never None
    assert fake_cuda[0] == ("end", 3, (0, 77))


def test_a_capture_that_ended_its_allocation_keeps_the_pool_for_its_graph(fake_cuda, caplog, monkeypatch):
    """Where capture_end got as far as ending the allocation itself, the second end is refused
    (logged, not hidden) and the pool stays the graph's, for the graph to give back."""
    def refuse(device, pool):
        fake_cuda.append(("end", device, pool))
        raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", refuse, raising=False)
    graph = _FakeGraph(RuntimeError("instantiate failed"), ended_allocation=True)
    with caplog.at_level("DEBUG", logger="aitune.torch.cuda_graphs"), pytest.raises(CudaGraphCaptureError):
        capture(graph, lambda: "out", "capture stream", pool=(0, 5))
    assert fake_cuda == [("end", 3, (0, 5))]
    assert "not currently recording" in caplog.text


def test_a_capture_begin_that_fails_gives_the_pool_back_only_where_it_took_it(fake_cuda, monkeypatch):
    class FailingBegin(_FakeGraph):
        def capture_begin(self, **kwargs):
            super().capture_begin(**kwargs)
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    # after redirecting the allocator (cudaStreamBeginCapture failed): ended and released
    with pytest.raises(CudaGraphCaptureError):
        capture(FailingBegin(), lambda: "out", "capture stream", pool=(0, 5))
    assert fake_cuda == [("end", 3, (0, 5)), ("release", 3, (0, 5))]
    # before it (the allocator refuses to end what it never began): the pool is left alone
    fake_cuda.clear()

    def refuse(device, pool):
        fake_cuda.append(("end", device, pool))
        raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", refuse, raising=False)
    with pytest.raises(CudaGraphCaptureError):
        capture(FailingBegin(), lambda: "out", "capture stream", pool=(0, 5))
    assert fake_cuda == [("end", 3, (0, 5))]


def test_captures_forbid_unsafe_calls_only_in_their_own_thread(fake_cuda):
    graph = _FakeGraph()
    assert capture(graph, lambda: "out", "capture stream", pool=(0, 5)) == "out"
    assert graph.begun_with == {"pool": (0, 5), "capture_error_mode": "thread_local"}
    assert fake_cuda == []  # a capture that succeeded leaves the allocator to capture_end


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: a capture that fails in the caching allocator's pool (item 1)")
def test_after_a_failed_capture_the_same_runner_captures_another_shape():
    def sometimes_forbidden(x):
        if x.shape[0] == 4:
            torch.cuda.synchronize()  # fine while warming up, not permitted while capturing
        return x * 2

    runner = CudaGraphRunner(sometimes_forbidden, warmup_iters=1)
    with pytest.raises(CudaGraphCaptureError):
        runner(torch.randn(4, 8, device="cuda"))
    x = torch.randn(2, 8, device="cuda")
    torch.testing.assert_close(runner(x), x * 2)  # no "already recording to mempool_id"
    assert runner.captured == 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: a capture on one thread while another runs work (item 12)")
def test_a_capture_on_a_loader_thread_leaves_another_threads_work_alone(tmp_path):
    from aitune.torch.backend.cuda_graph import CudaGraphBackend

    module, sample, spec = tiny()
    module = module.cuda()
    stop, errors = threading.Event(), []

    def serve():
        x = torch.randn(64, 64, device="cuda")
        while not stop.is_set():
            try:
                (x @ x).sum().item()  # allocates and syncs, as a live version answering requests does
            except Exception as exc:  # noqa: BLE001 - collected for the assert below
                errors.append(exc)
                return

    server = threading.Thread(target=serve)
    server.start()
    try:
        for i in range(5):
            backend = CudaGraphBackend().build(module, spec, [sample.to("cuda")], "cuda", tmp_path / str(i))
            backend.infer(sample.args[0].cuda())
    finally:
        stop.set()
        server.join()
    assert not errors, errors


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: a deployed checkpoint captured as it loads (item 12)")
def test_a_deployed_cuda_graph_checkpoint_is_captured_before_its_first_request(tmp_path):
    from aitune.checkpoint import load_checkpoint, save_checkpoint
    from aitune.torch.backend.cuda_graph import CudaGraphBackend

    module, sample, spec = tiny()
    built = CudaGraphBackend().build(module, spec, [sample.to("cuda")], "cuda", tmp_path / "build")
    save_checkpoint(built, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt", "cuda", allow_factories=True)
    loaded.deploy("cuda")
    assert loaded._runner.captured == 1  # before any request
    x = sample.args[0].cuda()
    torch.testing.assert_close(loaded.infer(x), module.cuda()(x), atol=1e-5, rtol=1e-4)
    assert loaded._runner.captured == 1


# -- 2, 8, 9: ONNX Runtime ------------------------------------------------------------------------------
def test_onnxruntime_refuses_bfloat16_as_unsupported_with_the_reason(tmp_path):
    module, sample, spec = tiny()
    backend = OnnxRuntimeBackend(OnnxRuntimeConfig(precision="bf16"))
    with pytest.raises(UnsupportedDeviceError, match="bfloat16 is unsupported.*numpy"):
        backend.build(module, spec, [sample], "cpu", tmp_path)
    from aitune import tune

    result = tune(module, [sample], [OnnxRuntimeBackend(OnnxRuntimeConfig(precision="bfloat16"))], "cpu",
                  cache_dir=tmp_path / "tune")
    bf16 = next(r for r in result.results if r.backend_class == "OnnxRuntimeBackend")
    assert bf16.status == "unsupported" and "bfloat16" in bf16.error


@pytest.mark.slow
def test_onnxruntime_refuses_a_session_that_fell_back_to_another_provider(tmp_path, monkeypatch):
    """ONNX Runtime here has no CUDA provider; the list of available providers is made to claim
    it (only that: the session is real), and ONNX Runtime then falls back to the CPU as it does
    on a GPU machine whose CUDA libraries fail to load."""
    needs_onnx_export()
    import onnxruntime as ort

    module, sample, spec = tiny()
    backend = OnnxRuntimeBackend(OnnxRuntimeConfig(providers=("CUDAExecutionProvider", "CPUExecutionProvider")))
    backend.build(module, spec, [sample], "cpu", tmp_path)  # the CPU provider, which is there
    assert backend._session.get_providers()[0] == "CPUExecutionProvider"
    assert backend._session._enable_fallback is False  # no quiet switch to the CPU at run() either
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    with pytest.raises(UnsupportedDeviceError, match="did not start CUDAExecutionProvider"):
        backend._load(torch.device("cuda", 0))


@pytest.mark.slow
def test_onnxruntime_checks_the_bound_path_it_measures(tmp_path):
    needs_onnx_export()
    module, sample, spec = tiny()
    backend = OnnxRuntimeBackend(OnnxRuntimeConfig(io_binding=True))
    backend.build(module, spec, [sample], "cpu", tmp_path)
    assert len(backend._out_meta) == 1  # learnt at build, before any check or measurement

    def copying_run(*args, **kwargs):
        raise AssertionError("the first call took the copying path, not the bound one")

    backend._session.run = copying_run  # only the copying path calls run(); the bound one does not
    verdict = judge(backend.infer, [sample], [sample(module)], "cpu", tolerance_for("float32"), None)
    assert verdict.status == "ok", verdict.error


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and onnxruntime-gpu: the CUDA provider really running (item 8)")
def test_onnxruntime_on_cuda_runs_on_the_cuda_provider(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (CUDAExecutionProvider); the GPU image's onnxruntime is CPU-only")
    needs_onnx_export()
    module, sample, spec = tiny()
    backend = OnnxRuntimeBackend(OnnxRuntimeConfig(providers=("CUDAExecutionProvider",)))
    backend.build(module, spec, [sample], "cuda", tmp_path)
    assert backend._session.get_providers()[0] == "CUDAExecutionProvider"
    torch.testing.assert_close(backend.infer(sample.args[0].cuda()).cpu(), sample(module), atol=1e-4, rtol=1e-3)


# -- 3: pretend device names win over a real GPU ------------------------------------------------------
def test_the_test_device_name_wins_over_a_real_gpu(monkeypatch):
    import dataclasses

    from aitune.environment import describe_environment
    from orchestrator.worker.pretend_gpus import ENV_VAR, pretend_device

    real_gpu = dataclasses.replace(describe_environment(torch.device("cpu")), device_type="cuda", device_name="NVIDIA H100")
    monkeypatch.setenv(ENV_VAR, "A100")
    assert pretend_device(real_gpu, "gpu").device_name == "A100"
    assert pretend_device(real_gpu, "cpu").device_name == "NVIDIA H100"  # CPU slots keep theirs
    monkeypatch.delenv(ENV_VAR)
    assert pretend_device(real_gpu, "gpu") is real_gpu


# -- 6: a static compile for every static graph spec --------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_second_batch_size_in_one_process_compiles_a_static_graph(tmp_path):
    """Built after batch 1 in the same process, the batch-8 graph must be static: a symbolic batch
    would serve batch 4 without compiling, where a static graph compiles anew."""
    from torch._dynamo.utils import counters

    module = examples.mlp(width=16, depth=2)
    backends = {}
    for batch in (1, 8):
        sample = Sample.of(torch.randn(batch, 16))
        backends[batch] = TorchInductorJitBackend().build(module, GraphSpec.from_sample(sample), [sample], "cpu",
                                                          tmp_path / str(batch))
    before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        backends[8].infer(torch.randn(4, 16))
    assert counters["stats"]["unique_graphs"] == before + 1  # batch 4 got a graph of its own
    assert TorchInductorJitBackend(TorchInductorJitConfig(dynamic=True))._dynamic() is True  # an explicit choice stays


def test_static_specs_compile_static_and_dynamic_ones_are_left_to_dynamo():
    _, sample, spec = tiny()
    backend = TorchInductorJitBackend()
    backend._graph_spec = spec
    assert backend._dynamic() is False
    backend._graph_spec = GraphSpec.from_sample(sample, dynamic_batch=(1, 8))
    assert backend._dynamic() is None


# -- 7: outputs that are plain objects are copied too -------------------------------------------------
class _Holder:
    """A model output that is no container, dataclass or dict: a plain object holding tensors."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self._private = "kept"


class _HolderModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = examples.mlp(width=16, depth=2)

    def forward(self, x):
        return _Holder(self.inner(x))


class _ReusingBackend(TorchEagerBackend):
    """Answers in one output buffer that each call overwrites, as a CUDA graph's replay does."""

    _buffer = None

    def _infer(self, *args, **kwargs):
        out = super()._infer(*args, **kwargs)
        if self._buffer is None:
            self._buffer = torch.empty_like(out.logits)
        self._buffer.copy_(out.logits)
        return _Holder(self._buffer)


def test_map_tensors_copies_plain_objects_that_hold_tensors():
    original = _Holder(torch.ones(2))
    copied = map_tensors(original, lambda t: t.clone())
    assert type(copied) is _Holder and copied is not original and copied._private == "kept"
    assert copied.logits.data_ptr() != original.logits.data_ptr()
    assert [p for p, _ in flatten_tensors(copied)] == [p for p, _ in flatten_tensors(original)] == ["output.logits"]
    plain = object()
    assert map_tensors(plain, lambda t: t.clone()) is plain  # no tensors: returned as it is


def test_an_object_output_from_reused_buffers_is_judged_correct_on_two_samples(tmp_path):
    torch.manual_seed(0)
    module = _HolderModel().eval()
    samples = [Sample.of(torch.randn(2, 16)) for _ in range(2)]
    with torch.inference_mode():
        reference = [map_tensors(s(module), lambda t: t.clone()) for s in samples]
    backend = _ReusingBackend().build(module, GraphSpec.from_sample(samples[0]), samples, "cpu", tmp_path)
    verdict = judge(backend.infer, samples, reference, "cpu", tolerance_for("float32"), None)
    assert verdict.status == "ok", verdict.error  # not a false "incorrect" from the overwritten first output


# -- 10: TensorRT on a stream of its own ----------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and importlib.util.find_spec("tensorrt")),
                    reason="needs a CUDA GPU and TensorRT (not installable on this machine) (item 10)")
def test_tensorrt_enqueues_on_a_private_stream_joined_to_the_callers(tmp_path):
    from aitune.torch.backend.tensorrt import TensorRTBackend

    needs_onnx_export()
    module, sample, spec = tiny()
    backend = TensorRTBackend().build(module, spec, [sample], "cuda", tmp_path)
    streams = []
    real = backend._context

    class Recording:
        def __getattr__(self, name):
            return getattr(real, name)

        def execute_async_v3(self, handle):
            streams.append(handle)
            return real.execute_async_v3(handle)

    backend._context = Recording()
    out = backend.infer(sample.args[0].cuda())
    assert streams and streams[0] not in (0, torch.cuda.current_stream().cuda_stream)
    torch.testing.assert_close(out.cpu(), sample(module), atol=1e-2, rtol=1e-2)


# -- 11: the TensorRT fp32 default is judged as what it computes ---------------------------------------
@pytest.mark.parametrize("major", [10, 11])
def test_the_tensorrt_default_candidate_is_real_fp32_where_it_is_fp32(monkeypatch, major):
    """TensorRT can't be installed here: the two probes of what is installed are replaced."""
    from aitune import gpu_defaults

    monkeypatch.setattr(gpu_defaults, "tensorrt_installed", lambda: True)
    monkeypatch.setattr(gpu_defaults, "tensorrt_major", lambda: major)
    trt = [cfg for name, cfg in gpu_defaults.gpu_candidates() if name == "TensorRTBackend"]
    assert len(trt) == 1
    fp32 = [cfg for cfg in trt if cfg.get("precision", "float32") == "float32"]
    assert all(cfg.get("tf32") is False for cfg in fp32)  # judged with the fp32 tolerance: no TF32
    assert bool(fp32) == (major >= 11)


# -- 14: AOTInductor moves inputs to its device -------------------------------------------------------
def test_aot_inputs_are_moved_to_the_package_device_and_left_alone_there():
    sample = Sample((torch.ones(2), 3), {"mask": torch.zeros(2)})
    assert on_device(sample, torch.device("cpu")) is sample
    moved = on_device(sample, torch.device("meta"))
    assert [t.device.type for t in moved.named_tensors().values()] == ["meta", "meta"]
    assert moved.args[1] == 3


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: a CUDA AOTInductor package given CPU tensors (item 14)")
def test_a_cuda_aot_package_given_cpu_tensors_answers_correctly(tmp_path):
    from aitune.torch.backend import TorchInductorAotBackend

    module, sample, spec = tiny()
    module = module.cuda()
    backend = TorchInductorAotBackend().build(module, spec, [sample.to("cuda")], "cuda", tmp_path)
    out = backend.infer(sample.args[0])  # on the CPU
    assert out.device.type == "cuda"
    with torch.inference_mode():
        torch.testing.assert_close(out, module(sample.args[0].cuda()), atol=1e-4, rtol=1e-3)


# -- 5: one AOTInductor package per group, whichever way it is run ------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_aot_candidates_that_differ_only_in_how_they_run_share_one_package(tmp_path):
    """On a GPU the pair is with and without CUDA graphs; here (no CUDA) with and without output
    clones, which likewise change nothing in the package."""
    from aitune.torch.backend import TorchInductorAotBackend, TorchInductorAotConfig
    from aitune.torch.export_cache import ExportCache

    module, sample, spec = tiny()
    exports = ExportCache(tmp_path / "exports")
    built = [TorchInductorAotBackend(TorchInductorAotConfig(clone_outputs=clone))
             .build(module, spec, [sample], "cpu", tmp_path / str(clone), exports=exports) for clone in (True, False)]
    assert exports.package_hits == 1  # compiled once
    packages = [b.to_dict()["package"] for b in built]
    assert packages[0] != packages[1] and packages[0].stat().st_ino == packages[1].stat().st_ino
    with torch.inference_mode():
        expected = sample(module)
    for b in built:
        torch.testing.assert_close(b.infer(*sample.args), expected, atol=1e-4, rtol=1e-3)
    other = TorchInductorAotBackend(TorchInductorAotConfig(precision="bfloat16"))
    other.build(module, spec, [sample], "cpu", tmp_path / "bf16", exports=exports)
    assert exports.package_hits == 1  # another precision is another package


# -- 15: one set of fp32 reference settings -------------------------------------------------------------
def test_fp32_reference_settings_turn_tf32_off_on_cuda_only_and_restore_it():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with fp32_reference_settings("cpu"):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with fp32_reference_settings("cuda:0"):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert use_fp32_reference_settings("cpu") is None
        assert use_fp32_reference_settings(torch.device("cuda", 1)) == (True, True)
        assert not torch.backends.cuda.matmul.allow_tf32  # for a process's life: not restored
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_the_worker_and_the_gpu_check_use_the_same_settings():
    root = Path(__file__).resolve().parents[2]
    for path in ("orchestrator/worker/actor.py", "scripts/gpu_check.py"):
        text = (root / path).read_text()
        assert "use_fp32_reference_settings" in text and "allow_tf32 = False" not in text, path


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: aitune.tune on a CUDA device (item 15)")
def test_tune_on_cuda_tries_the_gpu_set_with_tf32_off_and_restores_it(tmp_path):
    from aitune import tune
    from aitune.defaults import candidates_for
    from aitune.torch.backend.registry import display_name

    module, sample, _ = tiny()
    seen = []

    class Watching(TorchEagerBackend):
        def _infer(self, *args, **kwargs):
            seen.append(torch.backends.cuda.matmul.allow_tf32)
            return super()._infer(*args, **kwargs)

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        result = tune(module.cuda(), [sample], [Watching()], "cuda", cache_dir=tmp_path / "w")
        assert seen and not any(seen) and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    default_names = {display_name(name, cfg) for name, cfg in candidates_for("cuda")}
    cheap = [(n, c) for n, c in candidates_for("cuda") if n in ("TorchEagerBackend", "CudaGraphBackend")]
    result = tune(module.cuda(), [sample], cheap, "cuda", cache_dir=tmp_path / "c")
    assert {r.name for r in result.results} <= default_names


def test_tune_without_candidates_takes_the_device_types_default_set(monkeypatch, tmp_path):
    """On the CPU the CPU set; which set is asked for is what is checked (a GPU can't run here)."""
    from aitune import tuning

    asked = []
    monkeypatch.setattr(tuning, "candidates_for", lambda device_type: asked.append(device_type) or [("TorchEagerBackend", {})])
    module, sample, _ = tiny()
    result = tuning.tune(module, [sample], device="cpu", cache_dir=tmp_path)
    assert asked == ["cpu"] and [r.status for r in result.results] == ["ok"]


# -- 16: the declared torch floor -----------------------------------------------------------------------
def test_the_declared_torch_floor_has_what_the_code_calls():
    import inspect
    import re
    import tomllib

    root = Path(__file__).resolve().parents[2]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.fullmatch(r"torch>=(\d+)\.(\d+)", d) for d in deps if d.startswith("torch"))
    assert floor and (int(floor[1]), int(floor[2])) >= (2, 8)  # where the calls below first all exist
    assert {"run_single_threaded", "device_index"} <= set(inspect.signature(torch._inductor.aoti_load_package).parameters)
    assert hasattr(torch._dynamo.config, "recompile_limit") and hasattr(torch, "AcceleratorError")


# -- 17: a device run selects exactly the GPU tests -------------------------------------------------------
def test_the_gpu_marker_selects_the_cuda_tests_and_never_the_cpu_rehearsal():
    import subprocess
    import sys

    from env_helpers import child_env

    root = Path(__file__).resolve().parents[2]
    files = ["tests/aitune/test_gpu_path.py", "tests/aitune/test_gpu_review.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files],
                          cwd=root, env=child_env(), capture_output=True, text=True, timeout=300)
    selected = {line.split("::")[-1].split("[")[0] for line in done.stdout.splitlines() if "::" in line}
    assert "test_gpu_check_script_rehearsed_on_the_cpu" not in selected
    assert {"test_after_a_failed_capture_the_same_runner_captures_another_shape",
            "test_a_capture_that_fails_on_the_gpu_leaves_the_process_usable",
            "test_cuda_graph_backend_matches_eager_and_recaptures_per_shape"} <= selected
    assert not any(name.startswith("test_fp32_reference") for name in selected)  # CPU tests stay out
