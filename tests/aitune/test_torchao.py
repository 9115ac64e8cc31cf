"""TorchAOBackend and aitune.accuracy.

The accuracy metrics, the config, the default sets and the missing-torchao path need no torchao
and always run (torchao is hidden from the process where it matters). The tests that quantize
take the ``ao`` fixture, which skips them, saying why, where torchao is not installed: each CPU
scheme builds, passes the default quantized gates against eager fp32, saves, and is loaded,
deployed and run again in a fresh process; float8 is refused on the CPU with its reason; the
filter keeps layers in full precision; outliers fail the gates, a plain MLP passes them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import aitune
from aitune import examples
from aitune.accuracy import (
    DEFAULT_QUANTIZED_GATES,
    Gates,
    cosine,
    paired_tensors,
    sqnr_db,
    top1_agreement,
    topk_max_rel_err,
)
from aitune.check import compare_outputs, tolerance_for
from aitune.checkpoint import MANIFEST, load_checkpoint, read_manifest, save_checkpoint
from aitune.defaults import CPU_TORCHAO, candidates_for, make_backend
from aitune.environment import describe_environment
from aitune.measure import MeasureConfig
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend.backend import BackendState, UnsupportedDeviceError
from aitune.torch.backend.registry import display_name, get_backend_class
from aitune.torch.backend.torchao import (
    SCHEMES,
    TorchAOBackend,
    TorchAOConfig,
    quantized_digest,
    unsupported_reason,
)
from aitune_helpers import PYTHON, subprocess_env, tiny_mlp

TORCHAO_MISSING = "torchao is not installed (pip install torchao, or the project's test extra)"


@pytest.fixture(scope="module")
def ao():
    return pytest.importorskip("torchao", reason=TORCHAO_MISSING)


def _plain(t: torch.Tensor) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter)


def _hide_torchao(monkeypatch) -> None:
    """``import torchao`` fails in this process from here on, even where it is installed."""
    for name in ["torchao", *[m for m in sys.modules if m.startswith("torchao.")]]:
        monkeypatch.setitem(sys.modules, name, None)


# -- accuracy metrics on hand-made tensors -------------------------------------------------------------
def test_identical_outputs_have_exact_figures():
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    assert cosine(x, x.clone()) == {"output": 1.0}
    assert sqnr_db(x, x.clone()) == {"output": math.inf}
    assert topk_max_rel_err(x, x.clone()) == {"output": 0.0}
    assert top1_agreement(x, x.clone()) == 1.0
    zeros = torch.zeros(3)
    assert cosine(zeros, zeros) == {"output": 1.0} and sqnr_db(zeros, zeros) == {"output": math.inf}
    report = DEFAULT_QUANTIZED_GATES.judge(x, x.clone())
    assert report.ok and report.reason is None and report.figures == {"cosine": 1.0, "sqnr_db": math.inf}


def test_known_perturbations_give_known_figures():
    ref, cand = torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0])
    assert cosine(cand, ref)["output"] == pytest.approx(24 / 25, abs=1e-15)
    assert sqnr_db(cand, ref)["output"] == pytest.approx(10 * math.log10(25 / 2), abs=1e-12)
    assert cosine(-ref, ref)["output"] == -1.0
    ones = torch.ones(100, dtype=torch.float64)
    assert sqnr_db(ones + 0.01, ones)["output"] == pytest.approx(40.0, abs=1e-9)  # signal 100, noise 0.01
    assert cosine(ones * 1.01, ones)["output"] == pytest.approx(1.0, abs=1e-15)  # a scale: same direction
    assert cosine(torch.tensor([1.0, 0.0]), torch.zeros(2))["output"] == 0.0
    assert sqnr_db(torch.tensor([1.0, 0.0]), torch.zeros(2))["output"] == -math.inf


def test_topk_relative_error_and_top1_agreement():
    ref = torch.tensor([[10.0, 1.0, 5.0, 2.0]])
    assert topk_max_rel_err(torch.tensor([[11.0, 1.0, 5.0, 2.0]]), ref, k=1)["output"] == pytest.approx(0.1)
    assert topk_max_rel_err(torch.tensor([[10.0, 1.0, 4.0, 2.0]]), ref, k=1)["output"] == 0.0
    assert topk_max_rel_err(torch.tensor([[10.0, 1.0, 4.0, 2.0]]), ref, k=2)["output"] == pytest.approx(0.2)
    assert topk_max_rel_err(torch.tensor([[10.0, 9.0, 5.0, 2.0]]), ref, k=10)["output"] == pytest.approx(8.0)
    refs = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    assert top1_agreement(torch.tensor([[2.0, 1.0], [3.0, 1.0]]), refs) == 0.5
    # several samples' outputs (a list) are one tree: their rows count together
    two_samples = top1_agreement([refs, torch.tensor([[2.0, 1.0]])], [refs, torch.tensor([[1.0, 2.0]])])
    assert two_samples == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        topk_max_rel_err(ref, ref, k=0)


def test_gates_report_the_worst_tensor_and_name_the_failing_gate():
    ref = {"a": torch.ones(8), "b": torch.tensor([3.0, 4.0])}
    cand = {"a": torch.ones(8), "b": torch.tensor([4.0, 3.0])}
    report = Gates(cosine=0.999, sqnr_db=30.0, topk_rel_err=0.5, topk=1).judge(cand, ref)
    assert not report.ok
    assert report.passed == {"cosine": False, "sqnr_db": False, "topk_rel_err": True}
    assert report.where == {"cosine": "output['b']", "sqnr_db": "output['b']", "topk_rel_err": "output['b']"}
    assert report.figures["cosine"] == pytest.approx(0.96) and report.figures["topk_rel_err"] == pytest.approx(0.25)
    assert report.reason == "cosine 0.96 < 0.999 on output['b']; sqnr_db 10.97 < 30 on output['b']"
    # a figure that rounds to the limit is printed with the digits that tell them apart
    near = Gates(cosine=0.999).judge(torch.tensor([1.0, 0.0452]), torch.tensor([1.0, 0.0]))
    assert not near.ok and re.fullmatch(r"cosine 0\.99898 < 0\.999 on output", near.reason), near.reason
    assert Gates().judge(cand, ref).ok  # no gate set: nothing to fail


def test_nan_fails_every_gate_and_mismatched_trees_are_refused():
    ref = torch.tensor([1.0, 2.0])
    report = Gates(cosine=0.0, sqnr_db=-100.0, topk_rel_err=1e9).judge(torch.tensor([1.0, math.nan]), ref)
    assert report.passed == {"cosine": False, "sqnr_db": False, "topk_rel_err": False}
    assert "cosine nan < 0 on output" in report.reason
    with pytest.raises(ValueError, match="shape"):
        cosine(torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="not the reference's"):
        paired_tensors((torch.ones(2),), (torch.ones(2), torch.ones(2)))


def test_gates_validate_and_round_trip():
    gates = Gates(cosine=0.99, topk_rel_err=0.1, topk=3)
    assert Gates.from_dict(gates.to_dict()) == gates
    assert DEFAULT_QUANTIZED_GATES == Gates(cosine=0.999, sqnr_db=30.0)
    for bad in ({"cosine": math.nan}, {"sqnr_db": "30"}, {"topk_rel_err": True}, {"topk": 0}):
        with pytest.raises(ValueError):
            Gates(**bad)
    with pytest.raises(ValueError, match="no field"):
        Gates.from_dict({"cosin": 0.9})


# -- config, registry, default sets, environment (no torchao needed) -------------------------------------
def test_config_validates_and_names_itself():
    assert get_backend_class("TorchAOBackend") is TorchAOBackend
    cfg = TorchAOConfig(scheme="int8_weight_only", compile=False, filter=["head", "Embedding"])
    assert cfg.filter == ("head", "Embedding")
    assert TorchAOConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.key() == TorchAOConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).key()
    assert display_name(*CPU_TORCHAO) == "TorchAOBackend(defaults)"  # int8_dynamic, compiled: the defaults
    assert display_name("TorchAOBackend", {"scheme": "int8_weight_only"}) == "TorchAOBackend(scheme=int8_weight_only)"
    bad = [({"scheme": "int3"}, "scheme 'int3' is not one of"), ({"compile": 1}, "compile must be True or False"),
           ({"precision": "bfloat16", "autocast": True}, "autocast"), ({"filter": "head"}, "filter must be a list"),
           ({"filter": [""]}, "filter must be a list")]  # fmt: skip
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            TorchAOConfig(**fields)
    assert set(SCHEMES) >= {"int8_weight_only", "int8_dynamic", "float8_weight_only", "float8_dynamic"}


def test_float8_needs_a_recent_gpu_and_int8_runs_anywhere():
    for scheme in ("float8_weight_only", "float8_dynamic"):
        reason = unsupported_reason(scheme, torch.device("cpu"))
        assert reason == (f"TorchAOBackend scheme {scheme} needs a CUDA GPU of compute capability >= 8.9 "
                          "(Ada Lovelace, Hopper or newer); device cpu is not a CUDA GPU")  # fmt: skip
    assert unsupported_reason("int8_dynamic", torch.device("cpu")) is None


def test_without_torchao_the_backend_says_it_cannot_build(monkeypatch, tmp_path):
    _hide_torchao(monkeypatch)
    module, sample = tiny_mlp(), Sample.of(torch.randn(2, 16))
    backend = TorchAOBackend()
    with pytest.raises(UnsupportedDeviceError, match=r"torchao is not installed: pip install torchao"):
        backend.build(module, GraphSpec.from_sample(sample), [sample], "cpu", tmp_path)
    assert backend.state is BackendState.INIT
    # aitune.tune records it as unsupported, with the reason, and goes on with the others
    result = aitune.tune(module, [sample], ["TorchEagerBackend", backend], "cpu", cache_dir=tmp_path / "tune",
                         measure_config=MeasureConfig(budget_s=0.05, min_iters=3, warmup_iters=1))
    (ao_result,) = [r for r in result.results if r.backend_class == "TorchAOBackend"]
    assert ao_result.status == "unsupported" and "torchao is not installed" in ao_result.error


def test_default_sets_gain_torchao_only_where_it_is_installed(monkeypatch):
    from aitune import defaults, gpu_defaults

    installed = importlib.util.find_spec("torchao") is not None
    assert (CPU_TORCHAO in candidates_for("cpu")) == installed
    monkeypatch.setattr(defaults, "torchao_installed", lambda: False)
    monkeypatch.setattr(gpu_defaults, "torchao_installed", lambda: False)
    assert [name for name, _ in candidates_for("cpu")] == [name for name, _ in defaults.CPU_BASE]
    assert not any(name == "TorchAOBackend" for name, _ in gpu_defaults.gpu_candidates())
    monkeypatch.setattr(defaults, "torchao_installed", lambda: True)
    monkeypatch.setattr(gpu_defaults, "torchao_installed", lambda: True)
    assert candidates_for("cpu")[-1] == CPU_TORCHAO
    gpu = [cfg["scheme"] for name, cfg in gpu_defaults.gpu_candidates() if name == "TorchAOBackend"]
    assert gpu == ["int8_dynamic", "int8_weight_only", "float8_dynamic"]
    for definition in candidates_for("cpu") + gpu_defaults.gpu_candidates():
        make_backend(definition)  # every entry makes a valid backend


def test_importing_the_backend_and_the_default_sets_does_not_import_torchao():
    probe = ("import sys, aitune.torch.backend.torchao, aitune.defaults, aitune.gpu_defaults, aitune.environment as e\n"
             "e.describe_environment('cpu'); aitune.defaults.candidates_for('cpu')\n"
             "print('torchao' in sys.modules)")  # fmt: skip
    done = subprocess.run([PYTHON, "-c", probe], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]


def test_environment_records_the_torchao_version():
    env = describe_environment("cpu")
    installed = importlib.util.find_spec("torchao") is not None
    if installed:
        from importlib import metadata

        assert env.torchao == metadata.version("torchao")
    else:
        assert env.torchao is None
    # in the device class (so in every artifact key) only where installed: keys made without torchao stay
    assert env.device_class().get("torchao") == env.torchao
    assert ("torchao" in env.device_class()) == installed
    assert type(env).from_dict({k: v for k, v in env.to_dict().items() if k != "torchao"}).torchao is None


# -- real quantization ------------------------------------------------------------------------------
CANDIDATES = {
    "int8_weight_only": TorchAOConfig(scheme="int8_weight_only", compile=False),
    "int8_dynamic": TorchAOConfig(scheme="int8_dynamic", compile=False),
    "int8_dynamic_compiled": TorchAOConfig(scheme="int8_dynamic", compile=True),
}

CHILD = """
import json, sys, torch
from aitune.checkpoint import load_checkpoint
checkpoint, inputs, outputs, report = sys.argv[1:5]
backend = load_checkpoint(checkpoint, "cpu", allow_factories=["aitune_helpers:tiny_mlp"])
states = [backend.state.name]
backend.deploy("cpu")
states.append(backend.state.name)
with torch.inference_mode():
    y = backend.infer(torch.load(inputs, weights_only=True))
torch.save(y, outputs)
weights = [type(m.weight).__name__ for m in backend._module.modules() if isinstance(m, torch.nn.Linear)]
json.dump({"states": states, "config": backend.config.to_dict(), "weights": weights}, open(report, "w"))
"""


@pytest.fixture(scope="module")
def model():
    return tiny_mlp(width=16, hidden=32)


@pytest.fixture(scope="module")
def sample():
    return Sample.of(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)))


@pytest.fixture(scope="module")
def reference(model, sample):
    with torch.inference_mode():
        return sample(model)


@pytest.fixture(scope="module", params=list(CANDIDATES))
def built(request, ao, model, sample, tmp_path_factory):
    """(name, backend, first-process outputs) for one candidate, built once."""
    backend = TorchAOBackend(CANDIDATES[request.param])
    backend.build(model, GraphSpec.from_sample(sample), [sample], "cpu", tmp_path_factory.mktemp(request.param))
    with torch.inference_mode():
        outputs = sample(backend.infer)
    yield request.param, backend, outputs
    if backend.state is BackendState.ACTIVE:
        backend.deactivate()


@pytest.mark.slow
def test_build_quantizes_and_passes_the_default_gates(built, model, sample, reference):
    name, backend, outputs = built
    assert backend.state is BackendState.ACTIVE and backend.is_jit == backend.config.compile
    linears = [m for m in backend._module.modules() if isinstance(m, nn.Linear)]
    assert linears and not any(_plain(m.weight) for m in linears), name
    assert all(_plain(p) for p in model.parameters())  # the caller's module is left as it was
    report = DEFAULT_QUANTIZED_GATES.judge(outputs, reference)
    assert report.ok, f"{name}: {report.reason}"
    assert not compare_outputs(reference, outputs, tolerance_for("float32")).ok  # it is quantized, not fp32
    backend.deactivate()
    backend.activate()  # the quantized weights go to the CPU and back
    with torch.inference_mode():
        assert torch.equal(sample(backend.infer), outputs)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_checkpoint_loads_and_infers_in_a_fresh_process(built, sample, reference, tmp_path):
    name, backend, outputs = built
    checkpoint = tmp_path / "checkpoint"
    manifest = save_checkpoint(backend, checkpoint)
    assert manifest.backend == "TorchAOBackend" and manifest.environment["torchao"] is not None
    assert re.fullmatch(r"[0-9a-f]{64}", manifest.state["quantized"]["sha256"])
    assert manifest.state["quantized"]["device_type"] == "cpu"
    # the weights travel as plain float tensors (re-quantized on deploy): nothing torchao pickles
    weights = torch.load(checkpoint / manifest.state["weights"]["__artifact__"], weights_only=True)
    assert weights and all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in weights.values())
    torch.save(sample.args[0], tmp_path / "input.pt")
    args = [str(checkpoint), str(tmp_path / "input.pt"), str(tmp_path / "output.pt"), str(tmp_path / "report.json")]
    proc = subprocess.run([PYTHON, "-c", CHILD, *args], env=subprocess_env(), capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["states"] == ["CHECKPOINT_LOADED", "DEPLOYED"]
    assert report["config"] == backend.config.to_dict()
    assert report["weights"] and "Parameter" not in report["weights"] and "Tensor" not in report["weights"]
    deployed = torch.load(tmp_path / "output.pt", weights_only=True)
    same = compare_outputs(outputs, deployed, tolerance_for("float32"))
    assert same.ok, f"{name}: the fresh process's outputs differ from the first process's: {same.reason}"
    assert DEFAULT_QUANTIZED_GATES.judge(deployed, reference).ok


@pytest.mark.slow
def test_deploy_refuses_weights_that_quantize_differently(ao, model, sample, tmp_path):
    backend = TorchAOBackend(TorchAOConfig(scheme="int8_weight_only", compile=False))
    backend.build(model, GraphSpec.from_sample(sample), [sample], "cpu", tmp_path / "build")
    save_checkpoint(backend, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST).read_text())
    manifest["state"]["quantized"]["sha256"] = "0" * 64  # as if torchao now rounded otherwise
    (tmp_path / "ckpt" / MANIFEST).write_text(json.dumps(manifest))
    loaded = load_checkpoint(tmp_path / "ckpt", "cpu", allow_factories=["aitune_helpers:tiny_mlp"])
    with pytest.raises(RuntimeError, match=r"quantize to other tensors on cpu than when it was built \(torchao 0\.\d+"):
        loaded.deploy("cpu")
    assert loaded.state is BackendState.CHECKPOINT_LOADED
    assert read_manifest(tmp_path / "ckpt").state["quantized"]["device_type"] == "cpu"


@pytest.mark.slow
def test_quantization_is_deterministic(ao, model, sample, tmp_path):
    digests = set()
    for i in range(2):
        backend = TorchAOBackend(TorchAOConfig(scheme="int8_dynamic", compile=False))
        backend.build(model, GraphSpec.from_sample(sample), [], "cpu", tmp_path / str(i))
        digests.add(quantized_digest(backend._module))
    assert len(digests) == 1


@pytest.mark.parametrize("scheme", ["float8_weight_only", "float8_dynamic"])
def test_float8_is_unsupported_on_the_cpu(ao, scheme, model, sample, tmp_path):
    backend = TorchAOBackend(TorchAOConfig(scheme=scheme))
    with pytest.raises(UnsupportedDeviceError, match=r"compute capability >= 8\.9.*device cpu is not a CUDA GPU"):
        backend.build(model, GraphSpec.from_sample(sample), [sample], "cpu", tmp_path)
    assert backend.state is BackendState.INIT


@pytest.mark.slow
def test_filter_keeps_the_named_layers_in_full_precision(ao, model, sample, tmp_path):
    def build(patterns):
        backend = TorchAOBackend(TorchAOConfig(scheme="int8_dynamic", compile=False, filter=patterns))
        return backend.build(model, GraphSpec.from_sample(sample), [sample], "cpu", tmp_path / str(len(patterns)))

    by_name = build(["net.2"])._module.net
    assert not _plain(by_name[0].weight)
    assert _plain(by_name[2].weight) and by_name[2].weight.dtype == torch.float32
    assert torch.equal(by_name[2].weight, model.net[2].weight)
    by_type = build(["Linear", "net.*"])._module.net
    assert _plain(by_type[0].weight) and _plain(by_type[2].weight)


def _judged(module: nn.Module, scheme: str, tmp_path):
    sample = Sample.of(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)))
    with torch.inference_mode():
        reference = sample(module)
    backend = TorchAOBackend(TorchAOConfig(scheme=scheme, compile=False))
    backend.build(module, GraphSpec.from_sample(sample), [sample], "cpu", tmp_path / scheme)
    with torch.inference_mode():
        return DEFAULT_QUANTIZED_GATES.judge(sample(backend.infer), reference)


@pytest.mark.slow
def test_outliers_fail_the_default_gates_and_a_plain_mlp_passes(ao, tmp_path):
    failed = _judged(examples.outlier_mlp(64), "int8_dynamic", tmp_path / "outliers")
    assert not failed.ok and not failed.passed["cosine"] and not failed.passed["sqnr_db"]
    match = re.fullmatch(r"cosine (\S+) < 0\.999 on output; sqnr_db (\S+) < 30 on output", failed.reason)
    assert match, failed.reason
    assert float(match[1]) == pytest.approx(failed.figures["cosine"], abs=1e-4) and float(match[1]) < 0.99
    assert float(match[2]) == pytest.approx(failed.figures["sqnr_db"], abs=1e-2) and float(match[2]) < 20
    # weight-only int8 keeps the activations: the same model passes
    assert _judged(examples.outlier_mlp(64), "int8_weight_only", tmp_path / "weights").ok
    passed = _judged(examples.mlp(64, 3), "int8_dynamic", tmp_path / "mlp")
    assert passed.ok and passed.reason is None, passed.reason


# -- per-layer fallback -------------------------------------------------------------------------------
def test_fallback_settings_are_checked():
    with pytest.raises(ValueError, match="fallback must be a number of tries"):
        TorchAOConfig(fallback=-1)
    with pytest.raises(ValueError, match="fallback must be a number of tries"):
        TorchAOConfig(fallback=True)
    with pytest.raises(ValueError, match="no field"):
        TorchAOConfig(fallback=2, fallback_gates={"cosnie": 0.9})
    assert TorchAOConfig(fallback=2, fallback_gates={"sqnr_db": 20}).gates().sqnr_db == 20
    assert TorchAOConfig(fallback=2).gates() == DEFAULT_QUANTIZED_GATES


def _fallback_built(ao, module, tmp_path, tries, gates=None):
    sample = Sample.of(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)))
    backend = TorchAOBackend(TorchAOConfig(scheme="int8_dynamic", compile=False, fallback=tries, fallback_gates=gates))
    backend.build(module, GraphSpec.from_sample(sample), [sample], "cpu", tmp_path)
    with torch.inference_mode():
        report = DEFAULT_QUANTIZED_GATES.judge(sample(backend.infer), sample(module))
    return backend, report


@pytest.mark.slow
def test_fallback_keeps_the_most_sensitive_layer_and_a_checkpoint_keeps_its_choice(ao, tmp_path):
    backend, report = _fallback_built(ao, examples.outlier_mlp(64), tmp_path / "b", tries=4)
    assert report.ok, report.reason
    assert backend.kept == ["fc2"] and backend.build_notes()["kept_full_precision"] == ["fc2"]
    assert _plain(backend._module.fc2.weight) and not _plain(backend._module.fc1.weight)
    tried = backend.build_notes()["fallback"]["tried"]
    assert tried[0][0] == [] and "sqnr_db" in tried[0][1] and tried[-1] == [["fc2"], None]
    assert TorchAOBackend.from_dict(backend.to_dict()).kept == ["fc2"]  # what a checkpoint re-quantizes
    with pytest.raises(ValueError, match="kept_full_precision"):
        TorchAOBackend.from_dict({**backend.to_dict(), "kept_full_precision": "fc2"})


@pytest.mark.slow
def test_fallback_that_finds_nothing_leaves_the_whole_model_and_a_model_that_passes_needs_none(ao, tmp_path):
    backend, report = _fallback_built(ao, examples.outlier_mlp(64), tmp_path / "none", tries=0)
    assert not report.ok and backend.kept == [] and backend.build_notes() == {}  # no fallback asked for
    # gates no mix can meet: quantized whole after the tries, and the check refuses it
    backend, report = _fallback_built(ao, examples.outlier_mlp(64), tmp_path / "never", tries=4, gates={"sqnr_db": 500})
    notes = backend.build_notes()["fallback"]
    # the whole model, then one layer kept: keeping both would quantize nothing, so it is not tried
    assert backend.kept == [] and notes["kept"] is None and [kept for kept, _ in notes["tried"]] == [[], ["fc2"]]
    assert not report.ok
    plain, report = _fallback_built(ao, examples.mlp(64, 3), tmp_path / "plain", tries=4)
    assert report.ok and plain.kept == [] and plain.build_notes()["fallback"]["needed"] is False


# -- a quantized winner in the deploy root ------------------------------------------------------------
@pytest.mark.slow
def test_a_quantized_install_is_verified_by_its_gates_and_load_tuned_runs_it(ao, model, sample, reference, tmp_path):
    from aitune import deploy_root
    from aitune.accuracy import Criteria
    from aitune.loader import load_tuned
    from aitune.reference import pack_reference

    backend = TorchAOBackend(TorchAOConfig(scheme="int8_dynamic", compile=False))
    backend.build(model, GraphSpec.from_sample(sample), [sample], "cpu", tmp_path / "build")
    save_checkpoint(backend, tmp_path / "checkpoint")
    ref = pack_reference(sample, reference)
    tolerance = tolerance_for("float32")
    common = dict(device="cpu", model="q", batch_size=4, tolerance=tolerance.to_dict(), factory="aitune_helpers:tiny_mlp")
    # judged by the fp32 tolerance alone, the int8 outputs are refused, and nothing becomes current
    _, refused = deploy_root.install(tmp_path / "strict", tmp_path / "checkpoint", ref, **common)
    assert not refused.ok and "outputs differ" in refused.reason
    # with the criteria it was tuned by (gates instead of the tolerance), it is verified and recorded
    criteria = Criteria(tolerance, DEFAULT_QUANTIZED_GATES, elementwise=False).to_dict()
    version, verified = deploy_root.install(tmp_path / "root", tmp_path / "checkpoint", ref, criteria=criteria, **common)
    assert verified.ok, verified.reason
    assert json.loads((version / "install.json").read_text())["criteria"] == criteria
    tuned = load_tuned(tmp_path / "root", "q", "cpu", allow_factories=["aitune_helpers:tiny_mlp"])
    with torch.inference_mode():
        assert DEFAULT_QUANTIZED_GATES.judge(tuned(*sample.args), reference).ok
