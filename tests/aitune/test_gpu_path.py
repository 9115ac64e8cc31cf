"""The GPU path, from the CPU side: what can be checked without a GPU is checked here; the rest
runs only where CUDA is present (skipped with the reason on the CI machine, which has no GPU)."""

from __future__ import annotations

import collections
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aitune import examples
from aitune.defaults import candidates_for, is_baseline, make_backend
from aitune.gpu_defaults import gpu_candidates
from aitune.judge import run_samples
from aitune.measure import MeasureConfig, measure
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend import (
    OnnxRuntimeBackend,
    OnnxRuntimeConfig,
    TorchInductorAotBackend,
    TorchInductorAotConfig,
    TorchInductorJitBackend,
    TorchInductorJitConfig,
)
from aitune.torch.backend.backend import BackendState, UnsupportedDeviceError
from aitune.torch.backend.cuda_graph import CudaGraphBackend, CudaGraphConfig
from aitune.torch.backend.onnxruntime import session_providers
from aitune.torch.cuda_graphs import (
    CudaGraphCaptureError,
    CudaGraphRunner,
    capture,
    clone_tensors,
    clones_wanted,
    shape_key,
    without_output_clones,
)
from aitune_helpers import needs_onnx_export

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
    needs_onnx_export()
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


def _args(tmp_path, **changes):
    fields = {"models": None, "measure_s": 1.0, "store": str(tmp_path), "deploy": False, "time_left_s": None,
              "build_timeout_s": 150.0, "measure_timeout_s": 30.0}
    return type("Args", (), {**fields, **changes})


def test_gpu_check_script_spec_is_valid_and_it_refuses_to_run_without_a_gpu(tmp_path):
    gpu_check = _gpu_check()
    from orchestrator.spec.schema import parse_spec

    spec = parse_spec(gpu_check.build_spec(_args(tmp_path)))
    assert {m.name: spec.batches_of(m) for m in spec.models} == {"resnet50": [1, 32], "bert_base": [8], "mlp_12x512": [1]}
    assert spec.candidates is None  # the GPU default set
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "needs a GPU" in done.stderr


def test_gpu_check_takes_fewer_models_on_a_lent_machine(tmp_path):
    gpu_check = _gpu_check()
    from orchestrator.spec.schema import parse_spec

    spec = parse_spec(gpu_check.build_spec(_args(tmp_path, time_left_s=400.0)))
    assert {m.name: spec.batches_of(m) for m in spec.models} == {"mlp_12x512": [1], "resnet50": [32]}
    named = parse_spec(gpu_check.build_spec(_args(tmp_path, time_left_s=400.0, models=["bert_base"])))
    assert {m.name: named.batches_of(m) for m in named.models} == {"bert_base": [8]}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_script_rehearsed_on_the_cpu(tmp_path):
    """The script's whole flow (the plan, AOTInductor first, the rest, winners, the top-3 re-measure)
    on CPU candidates, so that a first GPU session does not find the script's own bugs."""
    from env_helpers import child_env

    env = child_env(ROOT)  # prepended: on the GPU machine the carried packages come only through PYTHONPATH
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--models", "mlp_12x512", "--confirm",
         "--time-left-s", "600", "--measure-s", "0.1", "--store", str(tmp_path / "store")],
        capture_output=True, text=True, timeout=590, env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "plan: 600 s of device time left, 1 group(s)" in done.stdout
    assert "winner mlp_12x512 b1:" in done.stdout
    assert "re-measured interleaved" in done.stdout
    assert "sweep winner" in done.stdout and "gpu_check done" in done.stdout
    # AOTInductor first, then every candidate with the first stage's results reused
    first, second = done.stdout.index("stage 1/2"), done.stdout.index("stage 2/2")
    assert first < second and "TorchInductorAotBackend and eager fp32" in done.stdout[first:second]
    assert "skipped: none" in done.stdout


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_backend_matches_eager_and_recaptures_per_shape(tmp_path):
    module, sample, spec = tiny()
    backend = CudaGraphBackend().build(module, spec, [sample], "cuda", tmp_path)
    for batch in (2, 4):
        x = torch.randn(batch, 16, device="cuda")
        torch.testing.assert_close(backend.infer(x).clone(), module.cuda()(x), atol=1e-5, rtol=1e-4)
    assert backend._runner.captured == 2


@pytest.mark.gpu
@needs_cuda
def test_onnxruntime_cuda_with_io_binding(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (CUDAExecutionProvider)")
    needs_onnx_export()
    module, sample, spec = tiny()
    backend = OnnxRuntimeBackend(OnnxRuntimeConfig(providers=("CUDAExecutionProvider",)))
    backend.build(module, spec, [sample], "cuda", tmp_path)
    x = sample.args[0].cuda()
    backend.infer(x)
    out = backend.infer(x)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out, module.cuda()(x), atol=1e-4, rtol=1e-3)


# -- outputs: clones for callers, none inside measuring (issue 9, item 6) ------------------------------
class _Output(collections.OrderedDict):
    """Stands in for a model-output object (transformers' ModelOutput is an OrderedDict subclass)."""


@dataclasses.dataclass
class _Pair:
    first: torch.Tensor
    rest: tuple


def test_clone_tensors_copies_through_model_outputs_and_dataclasses():
    a, b, c = torch.ones(2), torch.zeros(3), torch.full((1,), 5.0)
    out = clone_tensors({"plain": a, "model": _Output(logits=b), "pair": _Pair(c, (a, 7))})
    assert type(out["model"]) is _Output and type(out["pair"]) is _Pair
    copies = [out["plain"], out["model"]["logits"], out["pair"].first, out["pair"].rest[0]]
    for copy, original in zip(copies, [a, b, c, a]):
        torch.testing.assert_close(copy, original)
        assert copy.data_ptr() != original.data_ptr()
    assert out["pair"].rest[1] == 7
    a.add_(1)  # the copies don't follow the originals
    assert out["plain"].sum().item() == 2.0


def test_measuring_and_checking_turn_output_clones_off_and_only_there():
    seen = []

    def infer(x):
        seen.append(clones_wanted(True))
        return x * 2

    sample = Sample.of(torch.randn(2, 4))
    assert clones_wanted(True) and not clones_wanted(False)
    run_samples(infer, [sample])
    measure(infer, sample, "cpu", MeasureConfig(warmup_iters=1, warmup_s=0, min_iters=3, budget_s=0.01))
    assert seen and not any(seen)
    with pytest.raises(ValueError):
        with without_output_clones():
            raise ValueError("left by an exception")
    assert clones_wanted(True)  # restored however the block ends


def test_clone_outputs_is_on_by_default_and_part_of_the_key():
    for cls in (CudaGraphConfig, TorchInductorJitConfig, TorchInductorAotConfig):
        assert cls().clone_outputs is True
        assert cls(clone_outputs=False).key() != cls().key()
        assert cls(clone_outputs=False).describe() == "clone_outputs=False"
    assert CudaGraphRunner(lambda x: x).clone_outputs is True


def test_jit_clones_only_what_cuda_graphs_would_overwrite():
    for mode in ("default", "reduce-overhead"):  # on the CPU reduce-overhead has no graphs either
        backend = TorchInductorJitBackend(TorchInductorJitConfig(mode=mode))
        backend._set_device(torch.device("cpu"))
        assert not backend._graphed()
    backend = TorchInductorJitBackend(TorchInductorJitConfig(mode="reduce-overhead"))
    backend._set_device(torch.device("cuda", 0))
    assert backend._graphed()
    backend = TorchInductorJitBackend(TorchInductorJitConfig(mode="max-autotune-no-cudagraphs"))
    backend._set_device(torch.device("cuda", 0))
    assert not backend._graphed()
    backend = TorchInductorJitBackend(TorchInductorJitConfig(options={"triton.cudagraphs": True}))
    backend._set_device(torch.device("cuda", 0))
    assert backend._graphed()


# -- AOTInductor with CUDA graphs loads single-threaded (item 1) --------------------------------------------
def test_aot_package_is_loaded_single_threaded_exactly_when_it_is_captured(monkeypatch, tmp_path):
    """The loader is replaced only to see its arguments: a CUDA package can't be built here."""
    calls = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path, **kw: calls.append(kw) or (lambda *a: a))
    captured = TorchInductorAotBackend(TorchInductorAotConfig(cuda_graphs=True, clone_outputs=False))
    captured._package = tmp_path / "model.pt2"
    captured._load(torch.device("cuda", 1))
    plain = TorchInductorAotBackend(TorchInductorAotConfig())
    plain._package = tmp_path / "model.pt2"
    plain._load(torch.device("cpu"))
    assert calls == [{"run_single_threaded": True, "device_index": 1}, {"run_single_threaded": False, "device_index": -1}]
    assert isinstance(captured._runner, CudaGraphRunner) and captured._runner.clone_outputs is False
    assert not isinstance(plain._runner, CudaGraphRunner)


# -- a failed capture (item 2) ------------------------------------------------------------------------
class _FakeGraph:
    """Only the two calls ``capture`` makes; the CUDA runtime does not exist here."""

    def __init__(self, end_error: Exception | None = None) -> None:
        self.end_error, self.ended = end_error, False

    def capture_begin(self, pool=None, capture_error_mode="global"):
        pass

    def capture_end(self):
        self.ended = True
        if self.end_error is not None:
            raise self.end_error

    def pool(self):
        return (0, 0)


@pytest.mark.parametrize("where", ["capture_end", "body"])
def test_failed_capture_restores_the_callers_stream_and_raises_its_own_error(monkeypatch, where):
    """torch.cuda's stream calls are replaced (no CUDA here): what is checked is that the
    caller's stream is current again and the error names the capture, whichever step failed."""
    current = ["default"]
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: current.__setitem__(0, stream))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 1))
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda device, pool: None, raising=False)
    end_error = RuntimeError("CUDA error: operation failed due to a previous error during capture")
    body_error = RuntimeError("CUDA error: operation not permitted when stream is capturing")

    def body():
        assert current[0] == "capture stream"  # the work is recorded on the capture stream
        if where == "body":
            raise body_error
        return "out"

    graph = _FakeGraph(end_error)
    with pytest.raises(CudaGraphCaptureError, match="CUDA graph capture failed") as info:
        capture(graph, body, "capture stream")
    assert current[0] == "default"
    assert graph.ended  # a failing body still ends the capture
    assert info.value.__cause__ is (body_error if where == "body" else end_error)
    assert capture(_FakeGraph(), lambda: "out", "capture stream") == "out" and current[0] == "default"


# -- ONNX Runtime on the given GPU (item 8) -------------------------------------------------------------
def test_onnxruntime_cuda_providers_are_told_the_device_index():
    providers = session_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                                  torch.device("cuda", 3))
    assert providers == [("TensorrtExecutionProvider", {"device_id": 3}), ("CUDAExecutionProvider", {"device_id": 3}),
                         "CPUExecutionProvider"]
    assert session_providers(["CPUExecutionProvider"], torch.device("cpu")) == ["CPUExecutionProvider"]


def test_shape_key_tells_devices_apart():
    a = Sample.of(torch.randn(2, 3))
    assert shape_key(a) != shape_key(a.map(lambda t: t.to("meta")))


# -- scripts/gpu_check.py: cheap first, sized to the time left, the worker's TF32 settings (items 4, 11) --
def _gpu_check():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_gpu_check_runs_aotinductor_first_on_every_model(tmp_path):
    gpu_check = _gpu_check()
    from orchestrator.spec.schema import parse_spec

    for device in ("cpu", "cuda"):
        everything = candidates_for(device)
        first, last = gpu_check.stages(everything)
        assert first and all(name == "TorchInductorAotBackend" for name, _ in first)
        assert [c for c in everything if c not in first] and last is None  # the last stage has them all
    gpu_first = gpu_check.stages(candidates_for("cuda"))[0]
    assert {cfg.get("cuda_graphs", False) for _, cfg in gpu_first} == {True, False}  # one package, both ways
    spec = parse_spec(gpu_check.build_spec(_args(tmp_path, models=["resnet50", "mlp_12x512", "bert_base"]), first, total_s=120.0))
    assert [m.name for m in spec.models] == ["mlp_12x512", "bert_base", "resnet50"]  # cheapest first
    assert [(c.backend, c.config) for c in spec.candidates] == first
    assert spec.budgets.total_s == 120.0
    assert gpu_check.stages([("TorchEagerBackend", {})]) == [None]


@pytest.mark.parametrize("confirm", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gpu_check_plans_everything_inside_the_time_left_with_a_minute_to_spare(groups, confirm):
    gpu_check = _gpu_check()
    for left in (420.0, 600.0, 900.0):
        try:
            plan = gpu_check.make_plan(left, groups, confirm)
        except ValueError as exc:
            assert "too little" in str(exc) and left < 600
            continue
        assert plan.hard_stop + gpu_check.SHUTDOWN_S + gpu_check.SPARE_S == left  # even a forced stop ends in time
        assert 0 < plan.stage1_dispatch_end < plan.stage1_end < plan.stage2_start < plan.stage2_dispatch_end
        assert plan.stage2_dispatch_end < plan.stage2_end <= plan.confirm_end <= plan.hard_stop
        # the tails are inside the plan: the decision rounds, the report, the confirmation
        rounds = groups * (gpu_check.DECISION_CAP_S[2] + gpu_check.DECISION_FIRST_ROUNDS_S)
        assert plan.stage2_end - plan.stage2_dispatch_end >= gpu_check.TAIL_S + rounds + gpu_check.REPORT_S
        assert plan.confirm_end - plan.stage2_end == (groups * gpu_check.CONFIRM_S if confirm else 0)
        lines = "\n".join(plan.lines())
        assert "stage 1: TorchInductorAotBackend" in lines and "hard stop" in lines
        assert ("confirmation: top 3" in lines) == confirm
    with pytest.raises(ValueError, match="too little for a sweep"):
        gpu_check.make_plan(200.0, groups, confirm)


def test_gpu_check_hard_stop_interrupts_a_blocking_wait():
    import time

    gpu_check = _gpu_check()
    stop = gpu_check.HardStop(time.monotonic() + 0.2)
    try:
        with pytest.raises(KeyboardInterrupt):
            time.sleep(60)
    finally:
        stop.cancel()
    assert stop.fired
    late = gpu_check.HardStop(time.monotonic() + 60)
    late.cancel()
    assert not late.fired


def test_gpu_check_lists_what_it_skipped():
    gpu_check = _gpu_check()
    rows = [type("R", (), {"model": "resnet50", "batch_size": 32, "candidate": "TorchInductorAotBackend(precision=float16)",
                           "status": status, "error": error})
            for status, error in (("skipped", "the sweep's total time budget ran out"), ("ok", None))]
    lines = gpu_check.skipped_lines(rows, ["every model: OnnxRuntimeBackend(defaults)"])
    assert lines == ["  resnet50 b32: TorchInductorAotBackend(precision=float16) (the sweep's total time budget ran out)",
                     "  every model: OnnxRuntimeBackend(defaults) (no time left for its stage)"]


# -- on a GPU (skipped here, each naming why) ----------------------------------------------------------
def _eager(module, x):
    with torch.inference_mode():
        return module(x).clone()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: AOTInductor packages captured into CUDA graphs (item 1)")
def test_aot_package_with_cuda_graphs_runs_and_matches_eager(tmp_path):
    module, sample, spec = tiny()
    module = module.cuda()
    backend = TorchInductorAotBackend(TorchInductorAotConfig(cuda_graphs=True))
    backend.build(module, spec, [sample.to("cuda")], "cuda", tmp_path)
    xs = [torch.randn(2, 16, device="cuda") for _ in range(2)]
    outs = [backend.infer(x) for x in xs]
    for x, out in zip(xs, outs):  # the first output survived the second call (cloned by default)
        torch.testing.assert_close(out, _eager(module, x), atol=1e-4, rtol=1e-3)
    assert backend._runner.captured == 1
    assert not outs[0].is_inference()  # cloned in the caller's mode, so the caller may modify it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: a capture that fails on the device (item 2)")
def test_a_capture_that_fails_on_the_gpu_leaves_the_process_usable():
    def forbidden(x):
        y = x * 2
        torch.cuda.synchronize()  # fine while warming up, not permitted while capturing
        return y

    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(CudaGraphCaptureError) as info:
        CudaGraphRunner(forbidden, warmup_iters=1)(x)
    assert "capture" in str(info.value)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert not torch.cuda.is_current_stream_capturing()
    torch.testing.assert_close((x + 1).cpu(), x.cpu() + 1)  # plain work runs on the default stream again
    runner = CudaGraphRunner(lambda t: t * 3, warmup_iters=1)
    torch.testing.assert_close(runner(x), x * 3)  # and a later capture works


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: static buffers made under inference mode (item 5)")
def test_a_graph_captured_under_inference_mode_replays_outside_it(tmp_path):
    module, sample, spec = tiny()
    backend = CudaGraphBackend().build(module, spec, [sample], "cuda", tmp_path)
    x = torch.randn(2, 16, device="cuda")
    with torch.inference_mode():
        first = backend.infer(x)  # the capture: buffers made under inference mode, as in judge()
    second = backend.infer(x * 2)  # no "Inplace update to inference tensor outside InferenceMode"
    torch.testing.assert_close(first, _eager(module.cuda(), x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(second, _eager(module.cuda(), x * 2), atol=1e-5, rtol=1e-4)
    assert not second.is_inference()  # a clone made in the caller's mode


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: outputs of CUDA graphs and reduce-overhead (item 6)")
def test_outputs_survive_the_next_call_unless_clones_are_off(tmp_path):
    module, sample, spec = tiny()
    reference = module.cuda()
    xs = [torch.randn(2, 16, device="cuda") for _ in range(2)]
    graphed = CudaGraphBackend().build(module, spec, [sample], "cuda", tmp_path / "graph")
    compiled = TorchInductorJitBackend(TorchInductorJitConfig(mode="reduce-overhead"))
    compiled.build(module, spec, [sample.to("cuda")], "cuda", tmp_path / "jit")
    for backend in (graphed, compiled):
        outs = [backend.infer(x) for x in xs]
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, _eager(reference, x), atol=1e-5, rtol=1e-4)
    with without_output_clones():  # what measuring sees: the graph's own buffers, no copy
        assert graphed.infer(xs[0]).data_ptr() == graphed.infer(xs[1]).data_ptr()
