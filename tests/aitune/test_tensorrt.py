"""TensorRTBackend: everything that can be checked without TensorRT, and real engines where it exists.

``tensorrt`` cannot be installed on the CI machine (its PyPI packages download from a host that
is not reachable) and the machine has no GPU. So most tests here cover the plain-Python parts:
config validation and keys, profile shapes, dtype names, checkpoints and device refusals. The
builder configuration is checked against a small recording stand-in for the ``tensorrt`` module,
the one stand-in in these tests: the real module cannot exist here. The tests at the end build
real engines and skip, saying why, where ``tensorrt`` or a CUDA GPU is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from aitune.canonical import sha256_file
from aitune.checkpoint import (
    FORMAT_VERSION,
    MANIFEST,
    ArtifactRecord,
    CheckpointError,
    Manifest,
    check_device_compatible,
    load_checkpoint,
    read_manifest,
)
from aitune.environment import Environment
from aitune.specs import GraphSpec, Sample, TensorSpec
from aitune.torch.backend.backend import BackendState, UnsupportedDeviceError
from aitune.torch.backend.registry import get_backend_class
from aitune.torch.backend.tensorrt import (
    TRT_DTYPES,
    TensorRTBackend,
    TensorRTConfig,
    _trt,
    make_builder_config,
    timing_cache_path,
    torch_dtype,
)
from aitune.torch.onnx_export import export_onnx, onnx_input_order
from aitune.torch.trt_profiles import network_profile, profile_shapes, tensor_profile
from aitune_helpers import PYTHON, needs_onnx_export, subprocess_env, tiny_mlp

CUDA = torch.cuda.is_available()


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


# -- import and device refusals -------------------------------------------------------------------
def test_module_imports_without_tensorrt_and_says_how_to_install_it():
    # ``sys.modules["tensorrt"] = None`` makes ``import tensorrt`` fail even where it is installed
    code = (
        "import sys; sys.modules['tensorrt'] = None\n"
        "import aitune.torch.backend.tensorrt as m\n"
        "from aitune.torch.backend.backend import UnsupportedDeviceError\n"
        "try:\n    m._trt()\nexcept UnsupportedDeviceError as e:\n    print('unsupported:', e)\n"
    )
    proc = subprocess.run([PYTHON, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "unsupported: TensorRT is not installed: pip install tensorrt" in proc.stdout


def test_missing_tensorrt_is_unsupported_not_a_crash(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UnsupportedDeviceError, match="TensorRT is not installed"):
        _trt()


def test_registry_names_the_tensorrt_backend():
    assert get_backend_class("TensorRTBackend") is TensorRTBackend


def test_backend_is_cuda_only_device_bound_and_ahead_of_time():
    backend = TensorRTBackend()
    assert TensorRTBackend.supported_device_types == frozenset({"cuda"})
    assert TensorRTBackend.portable is False
    assert backend.is_jit is False
    assert backend.describe() == "TensorRTBackend(defaults)"
    assert TensorRTBackend(TensorRTConfig(precision="fp16", workspace_mb=512)).describe() == (
        "TensorRTBackend(precision=float16,workspace_mb=512)"
    )


def _mlp_spec(batch: int = 2, dynamic: tuple[int, int] | None = None) -> tuple[nn.Module, GraphSpec, Sample]:
    module = tiny_mlp(width=8, hidden=16)
    sample = Sample.of(torch.randn(batch, 8))
    return module, GraphSpec.from_sample(sample, dynamic_batch=dynamic), sample


def test_build_on_cpu_is_unsupported_and_leaves_the_backend_unbuilt(tmp_path):
    module, spec, sample = _mlp_spec()
    backend = TensorRTBackend()
    with pytest.raises(UnsupportedDeviceError, match="does not support device type 'cpu'"):
        backend.build(module, spec, [sample], "cpu", tmp_path)
    assert backend.state == BackendState.INIT
    assert not list(tmp_path.iterdir())  # refused before anything was exported


@pytest.mark.skipif(CUDA and _has_tensorrt(), reason="CUDA and TensorRT are both here: the build would succeed")
def test_build_on_cuda_without_cuda_or_tensorrt_is_unsupported(tmp_path):
    module, spec, sample = _mlp_spec()
    backend = TensorRTBackend()
    with pytest.raises(UnsupportedDeviceError, match="CUDA is not available|TensorRT is not installed"):
        backend.build(module, spec, [sample], "cuda", tmp_path)
    assert backend.state == BackendState.INIT


# -- profile shapes -----------------------------------------------------------------------------
def test_static_inputs_get_min_opt_max_all_equal_to_their_shape():
    spec = GraphSpec((TensorSpec("x", (4, 3, 32, 32)), TensorSpec("ids", (4, 16), "int64")))
    assert profile_shapes(spec) == {
        "x": ((4, 3, 32, 32),) * 3,
        "ids": ((4, 16),) * 3,
    }


def test_dynamic_axes_span_their_range_and_shape_is_opt():
    spec = GraphSpec(
        (
            TensorSpec("x", (8, 3, 224, 224), dynamic_axes={0: (1, 32)}),
            TensorSpec("tokens", (8, 128), "int64", dynamic_axes={0: (1, 32), 1: (16, 512)}),
        )
    )
    assert profile_shapes(spec) == {
        "x": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224)),
        "tokens": ((1, 16), (8, 128), (32, 512)),
    }


def test_profile_refuses_a_range_that_does_not_hold_the_shape():
    with pytest.raises(ValueError, match="must hold its size"):  # TensorSpec refuses it first
        TensorSpec("x", (8, 4), dynamic_axes={0: (16, 32)})
    spec = TensorSpec("x", (8, 4), dynamic_axes={0: (1, 16)})
    object.__setattr__(spec, "dynamic_axes", {0: (16, 32)})  # past TensorSpec's own check
    with pytest.raises(ValueError, match=r"input 'x': axis 0 needs 0 <= min <= opt <= max .* min 16, opt 8"):
        tensor_profile(spec)
    object.__setattr__(spec, "dynamic_axes", {2: (1, 4)})
    with pytest.raises(ValueError, match="dynamic axis 2 is outside its shape"):
        tensor_profile(spec)


def test_network_profile_matches_onnx_inputs_by_position_keywords_last_in_kwarg_order():
    spec = GraphSpec(
        (TensorSpec("mask", (2, 4)), TensorSpec("input_0", (2, 8), dynamic_axes={0: (1, 4)})),
        kwarg_names=("mask",),
    )
    assert [t.name for t in onnx_input_order(spec)] == ["input_0", "mask"]
    assert network_profile(spec, ["x", "attention_mask"]) == {
        "x": ((1, 8), (2, 8), (4, 8)),
        "attention_mask": ((2, 4),) * 3,
    }
    with pytest.raises(ValueError, match="the ONNX model takes 1 inputs"):
        network_profile(spec, ["x"])


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x, mask=None, scale=None, return_dict=True):
        y = self.lin(x)
        out = {"masked": y * mask, "scaled": (y + scale,)}
        return out if return_dict else (out["masked"], out["scaled"])


@pytest.mark.slow
def test_exported_onnx_inputs_follow_the_order_the_profile_assumes(tmp_path):
    needs_onnx_export()
    import onnx

    # keywords passed in another order than forward() declares them
    sample = Sample((torch.randn(2, 8),), {"scale": torch.randn(2, 4), "mask": torch.ones(2, 4)})
    spec = GraphSpec.from_sample(sample, dynamic_batch=(1, 16))
    exported = export_onnx(_TwoInputs().eval(), spec, Sample(sample.args, {**sample.kwargs, "return_dict": False}), tmp_path / "model.onnx")
    assert exported.model.is_file() and exported.external_data is not None and exported.external_data.is_file()
    graph = onnx.load(str(exported.model), load_external_data=False).graph
    names = [i.name for i in graph.input]
    assert names == ["x", "scale", "mask"]
    assert network_profile(spec, names) == {
        "x": ((1, 8), (2, 8), (16, 8)),
        "scale": ((1, 4), (2, 4), (16, 4)),
        "mask": ((1, 4), (2, 4), (16, 4)),
    }
    batch_dims = {i.name: i.type.tensor_type.shape.dim[0] for i in graph.input}
    assert all(d.dim_param and not d.dim_value for d in batch_dims.values())  # symbolic, not 2
    assert len(graph.output) == 2
    # the flag is no graph input, but the export traced what the model does with it (a tuple),
    # not with its default (a dict)
    assert json.loads(exported.out_spec)[1]["type"] == "builtins.tuple"


# -- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("given", "normal"), [("fp32", "float32"), ("FP16", "float16"), ("half", "float16"), ("bf16", "bfloat16")])
def test_precision_aliases_are_normalised(given, normal):
    assert TensorRTConfig(precision=given).precision == normal


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"precision": "int8"}, "precision 'int8' is not one of"),
        ({"optimization_level": -1}, "optimization_level must be an integer from 0 to 5"),
        ({"optimization_level": 6}, "optimization_level must be an integer from 0 to 5"),
        ({"optimization_level": 2.0}, "optimization_level must be an integer from 0 to 5"),
        ({"optimization_level": True}, "optimization_level must be an integer from 0 to 5"),
        ({"workspace_mb": 0}, "workspace_mb must be a positive number of MiB"),
        ({"workspace_mb": -512}, "workspace_mb must be a positive number of MiB"),
        ({"tf32": "yes"}, "tf32 must be True or False"),
        ({"opset": 0}, "opset must be a positive integer"),
        ({"timing_cache": "/var/cache/trt.cache"}, "is an absolute path"),
        ({"timing_cache": "C:\\cache\\trt.cache"}, "is an absolute path"),
        ({"timing_cache": "\\\\server\\share\\trt.cache"}, "is an absolute path"),
        ({"timing_cache": "../shared/trt.cache"}, "leaves the build's cache directory"),
        ({"timing_cache": ""}, "timing_cache must be a file name or None"),
    ],
)
def test_config_refuses_invalid_values(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TensorRTConfig(**fields)


@pytest.mark.parametrize("level", range(6))
def test_every_optimization_level_from_0_to_5_is_accepted(level):
    assert TensorRTConfig(optimization_level=level).optimization_level == level


def test_timing_cache_lives_in_the_build_cache_dir(tmp_path):
    assert timing_cache_path(TensorRTConfig(), tmp_path) is None
    assert timing_cache_path(TensorRTConfig(timing_cache="trt.cache"), tmp_path) == tmp_path / "trt.cache"
    assert timing_cache_path(TensorRTConfig(timing_cache="caches/h100.cache"), tmp_path) == tmp_path / "caches" / "h100.cache"


def test_config_round_trips_through_json(tmp_path):
    config = TensorRTConfig(precision="bf16", tf32=False, workspace_mb=1024, optimization_level=5, timing_cache="t.cache", opset=18)
    data = json.loads(json.dumps(config.to_dict()))
    assert TensorRTConfig.from_dict(data) == config
    assert TensorRTConfig.from_dict(data).key() == config.key()


def test_keys_are_stable_for_equal_configs_and_differ_for_each_change():
    assert TensorRTConfig().key() == TensorRTConfig().key()
    assert TensorRTConfig(precision="fp16").key() == TensorRTConfig(precision="float16").key()
    variants = [
        TensorRTConfig(),
        TensorRTConfig(precision="float16"),
        TensorRTConfig(precision="bfloat16"),
        TensorRTConfig(tf32=False),
        TensorRTConfig(workspace_mb=1024),
        TensorRTConfig(workspace_mb=2048),
        TensorRTConfig(optimization_level=0),
        TensorRTConfig(optimization_level=5),
        TensorRTConfig(timing_cache="trt.cache"),
        TensorRTConfig(opset=18),
    ]
    keys = [c.key() for c in variants]
    assert len(set(keys)) == len(keys)
    backend_keys = {TensorRTBackend(c).key() for c in variants}
    assert len(backend_keys) == len(variants)


def test_key_is_the_same_in_another_process():
    code = "from aitune.torch.backend.tensorrt import TensorRTConfig as C; print(C(precision='fp16', timing_cache='t.cache').key())"
    proc = subprocess.run([PYTHON, "-c", code], env=subprocess_env(PYTHONHASHSEED="123"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == TensorRTConfig(precision="float16", timing_cache="t.cache").key()


# -- dtype names ----------------------------------------------------------------------------------
def test_tensorrt_dtypes_map_to_torch_by_member_name():
    assert torch_dtype("FLOAT") is torch.float32
    assert torch_dtype("HALF") is torch.float16
    assert torch_dtype("BF16") is torch.bfloat16
    assert torch_dtype("INT64") is torch.int64
    assert torch_dtype("BOOL") is torch.bool
    assert torch_dtype(SimpleNamespace(name="INT32")) is torch.int32  # an enum member has .name
    assert set(TRT_DTYPES) >= {"FLOAT", "HALF", "BF16", "INT8", "UINT8", "INT32", "INT64", "BOOL"}
    with pytest.raises(TypeError, match="TensorRT data type INT4 has no torch equivalent"):
        torch_dtype("INT4")


# -- builder config, against a recording stand-in for the tensorrt module ------------------------------
class _Recorder:
    """Records every call and attribute set made on it (a builder, config, profile or cache)."""

    def __init__(self, calls: list, name: str, returns: dict | None = None) -> None:
        object.__setattr__(self, "_calls", calls)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_returns", returns or {})

    def __setattr__(self, attr, value):
        self._calls.append((f"{self._name}.{attr}=", value))

    def __getattr__(self, attr):
        def method(*args):
            self._calls.append((f"{self._name}.{attr}", *args))
            result = self._returns.get(attr)
            return result(*args) if callable(result) else result

        return method


def _fake_trt(with_precision_flags: bool = True) -> SimpleNamespace:
    """The few names ``make_builder_config`` uses from ``tensorrt``; without FP16/BF16 like TensorRT 11."""
    flags = {"TF32": "TF32"}
    if with_precision_flags:
        flags.update(FP16="FP16", BF16="BF16")
    return SimpleNamespace(
        __version__="10.0.1" if with_precision_flags else "11.0.0",
        BuilderFlag=SimpleNamespace(**flags),
        MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
    )


def _fake_builder(calls: list, cache_accepted: bool = True) -> _Recorder:
    accepted = iter([cache_accepted, True])
    builder_config = _Recorder(
        calls,
        "config",
        {
            "add_optimization_profile": 0,
            "create_timing_cache": lambda blob: f"cache({blob!r})",
            "set_timing_cache": lambda cache, ignore: next(accepted),
        },
    )
    return _Recorder(calls, "builder", {"create_builder_config": builder_config, "create_optimization_profile": _Recorder(calls, "profile")})


PROFILE = {"x": ((1, 8), (4, 8), (16, 8)), "mask": ((4, 4),) * 3}


def test_builder_config_for_defaults_sets_tf32_level_3_and_the_profile():
    calls: list = []
    make_builder_config(_fake_trt(), _fake_builder(calls), TensorRTConfig(), PROFILE)
    assert calls == [
        ("builder.create_builder_config",),
        ("config.set_flag", "TF32"),
        ("config.builder_optimization_level=", 3),
        ("builder.create_optimization_profile",),
        ("profile.set_shape", "x", (1, 8), (4, 8), (16, 8)),
        ("profile.set_shape", "mask", (4, 4), (4, 4), (4, 4)),
        ("config.add_optimization_profile", _Anything()),
    ]


def test_builder_config_for_a_static_network_adds_no_profile():
    calls: list = []
    make_builder_config(_fake_trt(), _fake_builder(calls), TensorRTConfig(), {})
    assert not [c for c in calls if "profile" in c[0]]


class _Anything:
    def __eq__(self, other):
        return True


@pytest.mark.parametrize(("precision", "flag"), [("fp16", "FP16"), ("bf16", "BF16")])
def test_builder_config_sets_the_reduced_precision_flag(precision, flag):
    calls: list = []
    make_builder_config(_fake_trt(), _fake_builder(calls), TensorRTConfig(precision=precision), PROFILE)
    assert ("config.set_flag", flag) in calls
    assert not [c for c in calls if c[0] == "config.set_flag" and c[1] in {"FP16", "BF16"} - {flag}]


def test_builder_config_clears_tf32_and_limits_the_workspace():
    calls: list = []
    config = TensorRTConfig(tf32=False, workspace_mb=256, optimization_level=5)
    make_builder_config(_fake_trt(), _fake_builder(calls), config, PROFILE)
    assert ("config.clear_flag", "TF32") in calls
    assert ("config.set_flag", "TF32") not in calls
    assert ("config.set_memory_pool_limit", "WORKSPACE", 256 * 1024 * 1024) in calls
    assert ("config.builder_optimization_level=", 5) in calls


def test_builder_config_loads_the_given_timing_cache_and_none_without_one():
    calls: list = []
    make_builder_config(_fake_trt(), _fake_builder(calls), TensorRTConfig(), PROFILE, timing_cache=b"blob")
    assert calls[-2:] == [("config.create_timing_cache", b"blob"), ("config.set_timing_cache", "cache(b'blob')", False)]
    calls.clear()
    make_builder_config(_fake_trt(), _fake_builder(calls), TensorRTConfig(), PROFILE, timing_cache=None)
    assert not [c for c in calls if "timing_cache" in c[0]]


def test_a_refused_timing_cache_is_replaced_by_an_empty_one():
    calls: list = []
    make_builder_config(_fake_trt(), _fake_builder(calls, cache_accepted=False), TensorRTConfig(), PROFILE, timing_cache=b"old")
    assert [c for c in calls if "timing_cache" in c[0]] == [
        ("config.create_timing_cache", b"old"),
        ("config.set_timing_cache", "cache(b'old')", False),
        ("config.create_timing_cache", b""),
        ("config.set_timing_cache", "cache(b'')", False),
    ]


def test_reduced_precision_without_builder_flags_is_unsupported():
    calls: list = []
    with pytest.raises(UnsupportedDeviceError, match="has no BuilderFlag.FP16"):
        make_builder_config(_fake_trt(with_precision_flags=False), _fake_builder(calls), TensorRTConfig(precision="fp16"), PROFILE)
    make_builder_config(_fake_trt(with_precision_flags=False), _fake_builder(calls), TensorRTConfig(), PROFILE)  # fp32 builds


def test_a_refused_profile_raises():
    calls: list = []
    builder = _fake_builder(calls)
    object.__getattribute__(builder, "_returns")["create_builder_config"] = _Recorder(calls, "config", {"add_optimization_profile": -1})
    with pytest.raises(ValueError, match="TensorRT refused the optimization profile"):
        make_builder_config(_fake_trt(), builder, TensorRTConfig(), PROFILE)


# -- state dicts and checkpoints ------------------------------------------------------------------------
def _loaded_state(engine: Path) -> dict:
    spec = GraphSpec((TensorSpec("input_0", (4, 8), dynamic_axes={0: (1, 16)}),))
    return {
        "backend": "TensorRTBackend",
        "config": TensorRTConfig(precision="fp16").to_dict(),
        "graph_spec": spec.to_dict(),
        "device": "cuda:0",
        "engine": engine,
        "out_spec": None,
        "input_names": ["x"],
        "output_names": ["linear_1"],
    }


def test_state_dict_round_trips_and_names_the_engine_as_an_artifact(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    backend = TensorRTBackend.from_dict(_loaded_state(engine))
    assert backend.state == BackendState.CHECKPOINT_LOADED
    assert backend.device == torch.device("cuda:0")
    assert backend.config == TensorRTConfig(precision="float16")
    state = backend.to_dict()
    assert state == _loaded_state(engine)
    assert isinstance(state["engine"], Path)  # a Path: checkpoints bundle it
    with pytest.raises(RuntimeError, match="Cannot run inference, backend TensorRTBackend should be activated first"):
        backend.infer(torch.randn(4, 8))


def test_an_unbuilt_backend_has_no_state_to_save():
    with pytest.raises(RuntimeError, match="never built"):
        TensorRTBackend().to_dict()


def _write_checkpoint(root: Path, tensorrt: str = "10.0.1", compute_capability: str = "9.0") -> Path:
    """A TensorRT checkpoint as ``save_checkpoint`` writes it, by hand: saving one needs a GPU
    (the manifest describes the device it was built on)."""
    (root / "artifacts").mkdir(parents=True)
    engine = root / "artifacts" / "model.engine"
    engine.write_bytes(b"a serialized engine")
    backend = TensorRTBackend.from_dict(_loaded_state(engine))
    state = {**backend.to_dict(), "engine": {"__artifact__": "artifacts/model.engine"}}
    environment = Environment(
        device_type="cuda",
        device_name="NVIDIA H100 80GB HBM3",
        compute_capability=compute_capability,
        torch=torch.__version__,
        cuda="12.8",
        onnxruntime=None,
        tensorrt=tensorrt,
        python="3.12.0",
    )
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        backend="TensorRTBackend",
        portable=TensorRTBackend.portable,
        config=backend.config.to_dict(),
        graph_spec=backend.graph_spec.to_dict(),
        environment=environment.to_dict(),
        artifacts=[ArtifactRecord("artifacts/model.engine", engine.stat().st_size, sha256_file(engine))],
        state=state,
        key=backend.key(),
    )
    (root / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
    return root


def test_a_tensorrt_checkpoint_is_refused_on_a_cpu(tmp_path):
    root = _write_checkpoint(tmp_path / "ckpt")
    manifest = read_manifest(root)
    assert manifest.portable is False
    with pytest.raises(CheckpointError, match="built for device type 'cuda' and can't run on 'cpu'"):
        check_device_compatible(manifest, "cpu")
    with pytest.raises(CheckpointError, match="can't run on 'cpu'"):
        load_checkpoint(root, "cpu")


def test_a_loaded_tensorrt_checkpoint_refuses_to_deploy_on_a_cpu(tmp_path):
    root = _write_checkpoint(tmp_path / "ckpt")
    backend = load_checkpoint(root)
    assert isinstance(backend, TensorRTBackend)
    assert backend.state == BackendState.CHECKPOINT_LOADED
    assert backend.to_dict()["engine"] == root.resolve() / "artifacts" / "model.engine"
    with pytest.raises(UnsupportedDeviceError, match="does not support device type 'cpu'"):
        backend.deploy("cpu")
    assert backend.state == BackendState.CHECKPOINT_LOADED


@pytest.mark.skipif(CUDA and _has_tensorrt(), reason="with CUDA and TensorRT the deploy would try the fake engine")
def test_a_tensorrt_checkpoint_without_cuda_or_tensorrt_is_unsupported_on_cuda(tmp_path):
    backend = load_checkpoint(_write_checkpoint(tmp_path / "ckpt"))
    with pytest.raises(UnsupportedDeviceError):
        backend.deploy("cuda:0")


# -- real engines: need tensorrt and a CUDA GPU --------------------------------------------------------
NEEDS = "needs tensorrt and a CUDA GPU; tensorrt cannot be installed on the CI machine"


@pytest.fixture
def trt_gpu():
    trt = pytest.importorskip("tensorrt", reason=NEEDS)
    if not CUDA:
        pytest.skip(NEEDS)
    return trt


def _tolerance(precision: str) -> dict:
    return {"float32": dict(atol=1e-3, rtol=1e-3), "float16": dict(atol=2e-2, rtol=2e-2), "bfloat16": dict(atol=1e-1, rtol=5e-2)}[precision]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "float16", "bfloat16"])
def test_engine_matches_eager_with_a_dynamic_batch(trt_gpu, tmp_path, precision):
    module, spec, sample = _mlp_spec(batch=4, dynamic=(1, 16))
    backend = TensorRTBackend(TensorRTConfig(precision=precision)).build(module, spec, [sample], "cuda", tmp_path)
    assert (tmp_path / "model.engine").is_file()
    for batch in (1, 4, 16):
        x = torch.randn(batch, 8)
        got = backend.infer(x.cuda())
        assert got.device.type == "cuda" and got.dtype == torch.float32 and got.shape == (batch, 8)
        torch.testing.assert_close(got.cpu(), module(x).detach(), **_tolerance(precision))
    with pytest.raises(ValueError, match="has shape"):
        backend.infer(torch.randn(17, 8).cuda())


@pytest.mark.gpu
@pytest.mark.slow
def test_engine_takes_keywords_and_returns_the_output_tree(trt_gpu, tmp_path):
    module = _TwoInputs().eval()
    sample = Sample((torch.randn(2, 8),), {"scale": torch.randn(2, 4), "mask": torch.ones(2, 4)})
    spec = GraphSpec.from_sample(sample, dynamic_batch=(1, 8))
    backend = TensorRTBackend().build(module, spec, [sample], "cuda", tmp_path)
    want = module(*sample.args, **sample.kwargs)
    got = backend.infer(*[a.cuda() for a in sample.args], **{k: v.cuda() for k, v in sample.kwargs.items()})
    assert set(got) == {"masked", "scaled"} and isinstance(got["scaled"], tuple)
    torch.testing.assert_close(got["masked"].cpu(), want["masked"].detach(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got["scaled"][0].cpu(), want["scaled"][0].detach(), atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.slow
def test_timing_cache_is_saved_and_reused(trt_gpu, tmp_path):
    module, spec, sample = _mlp_spec()
    config = TensorRTConfig(timing_cache="trt.cache", optimization_level=0)
    TensorRTBackend(config).build(module, spec, [sample], "cuda", tmp_path / "a")
    cache = tmp_path / "a" / "trt.cache"
    assert cache.is_file() and cache.stat().st_size > 0
    # a second build in the same directory loads it
    (tmp_path / "a" / "model.engine").unlink()
    TensorRTBackend(config).build(module, spec, [sample], "cuda", tmp_path / "a")
    assert cache.is_file()


@pytest.mark.gpu
@pytest.mark.slow
def test_engine_survives_deactivate_and_a_checkpoint_round_trip(trt_gpu, tmp_path):
    from aitune.checkpoint import deploy_checkpoint, save_checkpoint

    module, spec, sample = _mlp_spec()
    backend = TensorRTBackend().build(module, spec, [sample], "cuda", tmp_path / "build")
    x = sample.args[0].cuda()
    want = backend.infer(x).cpu()
    backend.deactivate()
    backend.activate()
    torch.testing.assert_close(backend.infer(x).cpu(), want)
    manifest = save_checkpoint(backend, tmp_path / "ckpt")
    assert manifest.portable is False and manifest.environment["tensorrt"] == trt_gpu.__version__
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "ckpt", "cpu")
    served = deploy_checkpoint(tmp_path / "ckpt", "cuda")
    assert served.state == BackendState.DEPLOYED
    torch.testing.assert_close(served.infer(x).cpu(), want)
