"""A backend written from the published AITune AOT Backend API plugs in unchanged, by import path:
its life cycle with every published message, ``aitune.tune``, a checkpoint deployed in a fresh
process, and a real sweep whose workers and deploy target import it themselves."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import aitune
from aitune.checkpoint import CheckpointError, deploy_checkpoint, load_checkpoint, read_manifest, save_checkpoint
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend import Backend, BackendState, TorchEagerBackend, TorchEagerConfig, UnsupportedDeviceError
from aitune.torch.backend.registry import (
    InvalidBackendError,
    UnknownBackendError,
    config_class_of,
    config_key,
    display_name,
    get_backend_class,
    known_backends,
    make_backend,
)
from aitune_helpers import HERE, PYTHON, REPO, subprocess_env, tiny_mlp
from published_backend import CALLS, PublishedBackend, PublishedConfig, PublishedPlainBackend

PATH = "published_backend:PublishedBackend"
PLAIN = "published_backend:PublishedPlainBackend"
NAME = "PublishedBackend"
FACTORY = "aitune_helpers:tiny_mlp"
X = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
SAMPLE = Sample.of(X)
SPEC = GraphSpec.from_sample(SAMPLE)


def exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


def fast():
    from aitune.measure import MeasureConfig

    return MeasureConfig(budget_s=0.05, min_iters=5, warmup_iters=2)


@pytest.fixture
def module():
    return tiny_mlp()


@pytest.fixture
def built(module, tmp_path):
    return PublishedBackend().build(module, SPEC, [SAMPLE], "cpu", tmp_path / "build")


@pytest.fixture
def loaded(built):
    return PublishedBackend.from_dict(built.to_dict())


@pytest.fixture
def deployed(loaded):
    loaded.deploy("cpu")
    return loaded


def expected(module):
    with torch.inference_mode():
        return module(X)


# -- the contract --------------------------------------------------------------------------------
def test_backend_takes_no_constructor_arguments_and_starts_in_init():
    assert list(inspect.signature(Backend.__init__).parameters) == ["self"]
    backend = PublishedBackend()
    assert backend.state is BackendState.INIT and backend.device is None and not backend.is_active


def test_state_is_a_plain_attribute_a_subclass_sets():
    backend = PublishedBackend()
    backend.state = BackendState.INACTIVE
    assert backend.state is BackendState.INACTIVE


def test_build_calls_the_published_hook_without_a_device_and_ends_active(built, module):
    assert built.state is BackendState.ACTIVE and built.is_active
    assert built.device == torch.device("cpu")  # the hook read it from self.device
    torch.testing.assert_close(built.infer(X), expected(module))
    torch.testing.assert_close(built(X), expected(module))


def test_to_dict_names_artifacts_as_paths(built):
    state = built.to_dict()
    assert isinstance(state["weights"], os.PathLike) and state["weights"].is_file()


def test_from_dict_sets_checkpoint_loaded_and_deploy_calls_the_published_hook(loaded, module):
    assert loaded.state is BackendState.CHECKPOINT_LOADED
    CALLS.clear()
    loaded.deploy("cpu")
    assert CALLS == ["_deploy"]
    assert loaded.state is BackendState.DEPLOYED and loaded.device == torch.device("cpu")
    torch.testing.assert_close(loaded.infer(X), expected(module))


def test_deactivate_calls_the_hook_then_cleans_memory(module, tmp_path):
    order = []

    class Recording(PublishedBackend):
        def _deactivate(self):
            order.append("_deactivate")
            super()._deactivate()

        def _clean_memory(self):
            order.append("_clean_memory")
            super()._clean_memory()

    backend = Recording().build(module, SPEC, [SAMPLE], "cpu", tmp_path)
    backend.deactivate()
    assert order == ["_deactivate", "_clean_memory"]
    assert backend.state is BackendState.INACTIVE
    backend.activate()
    assert backend.state is BackendState.ACTIVE
    torch.testing.assert_close(backend.infer(X), expected(module))


def test_checkpoint_loaded_activates(loaded, module):
    loaded._set_device("cpu")
    loaded.activate()
    assert loaded.state is BackendState.ACTIVE
    torch.testing.assert_close(loaded.infer(X), expected(module))


def test_published_devices_narrow_the_device_types(module):
    class CudaOnly(PublishedBackend):
        _devices = ["cuda"]

    backend = CudaOnly()
    with pytest.raises(UnsupportedDeviceError, match=re.escape("does not support device type 'cpu' (supported: ['cuda'])")):
        backend.build(module, SPEC, [SAMPLE], "cpu")
    assert backend.state is BackendState.INIT and backend.device is None


def test_assert_device_receives_a_torch_device(module, tmp_path):
    seen = []

    class Checking(PublishedBackend):
        def _assert_device(self, device):
            seen.append(device)
            super()._assert_device(device)

    backend = Checking().build(module, SPEC, [SAMPLE], "cpu", tmp_path)
    Checking.from_dict(backend.to_dict()).deploy("cpu")
    assert seen == [torch.device("cpu"), torch.device("cpu")]


# -- every published message, word for word ------------------------------------------------------------
def test_activate_from_init(module):
    with pytest.raises(RuntimeError, match=exactly(f"Cannot activate backend {NAME}, backend should be built first")):
        PublishedBackend().activate()


def test_activate_from_deployed(deployed):
    with pytest.raises(RuntimeError, match=exactly(f"Cannot activate backend {NAME}, backend is already deployed")):
        deployed.activate()
    assert deployed.state is BackendState.DEPLOYED


def test_deactivate_from_init():
    with pytest.raises(RuntimeError, match=exactly(f"Cannot deactivate backend {NAME}, backend should be built first")):
        PublishedBackend().deactivate()


def test_deactivate_from_deployed(deployed):
    with pytest.raises(RuntimeError, match=exactly(f"Cannot deactivate backend {NAME}, backend is already deployed")):
        deployed.deactivate()
    assert deployed.state is BackendState.DEPLOYED


def test_deactivate_from_checkpoint_loaded(loaded):
    with pytest.raises(RuntimeError, match=exactly(f"Cannot deactivate backend {NAME}, backend has already been deployed")):
        loaded.deactivate()
    assert loaded.state is BackendState.CHECKPOINT_LOADED


@pytest.mark.parametrize("state", ["INIT", "ACTIVE", "INACTIVE", "DEPLOYED"])
def test_deploy_from_any_state_but_checkpoint_loaded(state, module, tmp_path):
    backend = PublishedBackend()
    if state != "INIT":
        backend.build(module, SPEC, [SAMPLE], "cpu", tmp_path)
    if state == "INACTIVE":
        backend.deactivate()
    if state == "DEPLOYED":
        backend = PublishedBackend.from_dict(backend.to_dict())
        backend.deploy("cpu")
    with pytest.raises(RuntimeError, match=exactly(f"Cannot deploy backend {NAME}, backend should be loaded from a checkpoint")):
        backend.deploy("cpu")
    assert backend.state is BackendState[state]


@pytest.mark.parametrize("state", ["INIT", "INACTIVE", "CHECKPOINT_LOADED"])
def test_infer_outside_active_or_deployed(state, module, tmp_path):
    backend = PublishedBackend()
    if state != "INIT":
        backend.build(module, SPEC, [SAMPLE], "cpu", tmp_path)
        backend.deactivate()
    if state == "CHECKPOINT_LOADED":
        backend = PublishedBackend.from_dict(backend.to_dict())
    with pytest.raises(RuntimeError, match=exactly(f"Cannot run inference, backend {NAME} should be activated first")):
        backend.infer(X)


def test_second_build(built, module):
    with pytest.raises(RuntimeError, match=exactly(f"Backend {NAME} build should be called only once")):
        built.build(module, SPEC, [SAMPLE], "cpu")
    assert built.state is BackendState.ACTIVE


def test_builtin_backends_use_the_same_messages():
    with pytest.raises(RuntimeError, match=exactly("Cannot activate backend TorchEagerBackend, backend should be built first")):
        TorchEagerBackend().activate()


# -- naming and making backends ------------------------------------------------------------------------
def test_a_plugin_is_found_by_import_path_and_configured_from_its_constructor_annotation():
    assert get_backend_class(PATH) is PublishedBackend
    assert config_class_of(PublishedBackend) is PublishedConfig
    backend = make_backend(PATH, {"inference_mode": False})
    assert isinstance(backend, PublishedBackend) and backend.config == PublishedConfig(inference_mode=False)
    assert config_key(backend) == PublishedConfig(inference_mode=False).key()


def test_a_plugin_without_config_is_built_with_no_arguments_and_keyed_by_its_own_key():
    assert config_class_of(PublishedPlainBackend) is None
    backend = make_backend(PLAIN)
    assert isinstance(backend, PublishedPlainBackend) and backend.config is None
    assert config_key(backend) == backend.key()
    with pytest.raises(InvalidBackendError, match=rf"config of {PLAIN}: the backend takes no config .*\['x'\]"):
        make_backend(PLAIN, {"x": 1})


def test_display_names_stay_readable():
    assert display_name(PATH) == "PublishedBackend(defaults)"
    assert display_name(PATH, {"inference_mode": False}) == "PublishedBackend(inference_mode=False)"
    assert display_name(PLAIN) == "PublishedPlainBackend(plain eager)"
    assert display_name("TorchEagerBackend") == "TorchEagerBackend(defaults)"
    assert display_name(TorchEagerBackend(TorchEagerConfig(precision="bf16", autocast=True))) == (
        "TorchEagerBackend(precision=bfloat16,autocast=True)"
    )


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_such_module_here:Thing", r"backend 'no_such_module_here:Thing' can't be imported: cannot import module 'no_such_module_here'"),
        ("published_backend:Missing", r"backend 'published_backend:Missing' can't be imported: .*no attribute 'Missing'"),
        ("published_backend:NOT_A_BACKEND", r"backend 'published_backend:NOT_A_BACKEND' is 42, not a subclass of aitune.torch.backend.Backend"),
        ("published_backend:PublishedConfig", r"backend 'published_backend:PublishedConfig' is .*, not a subclass"),
        ("published_backend:HalfDoneBackend", r"backend 'published_backend:HalfDoneBackend' is abstract: it does not implement _activate, .*to_dict"),
        (":Thing", r"backend ':Thing': an import path looks like 'package.module:ClassName'"),
    ],
)
def test_bad_plugins_are_refused_naming_the_path(path, message):
    with pytest.raises(InvalidBackendError, match=message):
        get_backend_class(path)


def test_a_config_that_does_not_fit_is_refused_naming_the_path():
    with pytest.raises(InvalidBackendError, match=rf"config of {PATH}: PublishedConfig has no field\(s\) \['precison'\]"):
        make_backend(PATH, {"precison": "fp16"})


def test_an_unknown_name_says_how_to_name_a_plugin():
    with pytest.raises(UnknownBackendError, match=r"unknown backend 'Turbo'.*'package.module:ClassName'"):
        get_backend_class("Turbo")


def test_every_builtin_is_importable_from_the_package_and_listed():
    import aitune.torch.backend as package

    for name in ("TorchEagerBackend", "TorchInductorJitBackend", "TorchInductorAotBackend", "OnnxRuntimeBackend",
                 "CudaGraphBackend", "TensorRTBackend"):  # fmt: skip
        assert getattr(package, name) is get_backend_class(name)
        assert name in known_backends()
    assert "FaultBackend" not in known_backends()


def test_importing_the_backend_package_does_not_import_tensorrt_code():
    probe = "import sys, aitune.torch.backend, aitune.defaults; print('aitune.torch.backend.tensorrt' in sys.modules, 'tensorrt' in sys.modules)"
    done = subprocess.run([PYTHON, "-c", probe], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


# -- aitune.tune ---------------------------------------------------------------------------------------
def test_tune_takes_plugins_by_import_path(module, tmp_path):
    result = aitune.tune(
        module, [SAMPLE], [PATH, (PATH, {"inference_mode": False}), PLAIN], "cpu",
        measure_config=fast(), cache_dir=tmp_path, keep_backends=True,
    )  # fmt: skip
    by_name = {r.name: r for r in result.results}
    assert set(by_name) == {"TorchEagerBackend(defaults)", "PublishedBackend(defaults)",
                            "PublishedBackend(inference_mode=False)", "PublishedPlainBackend(plain eager)"}  # fmt: skip
    for name in ("PublishedBackend(defaults)", "PublishedBackend(inference_mode=False)", "PublishedPlainBackend(plain eager)"):
        assert by_name[name].status == "ok", by_name[name].error
        assert by_name[name].check.ok and by_name[name].measurement is not None
    assert by_name["PublishedBackend(inference_mode=False)"].config == {"inference_mode": False}
    assert by_name["PublishedPlainBackend(plain eager)"].config == {}
    assert isinstance(by_name["PublishedBackend(defaults)"].backend, PublishedBackend)


def test_tune_refuses_a_candidate_of_another_kind(module):
    with pytest.raises(TypeError, match=r"candidate 3 is not a Backend, a backend name or import path"):
        aitune.tune(module, [SAMPLE], [3], "cpu", measure_config=fast())


# -- checkpoints ---------------------------------------------------------------------------------------
def test_checkpoint_names_the_import_path_and_needs_it_allowed(built, tmp_path):
    save_checkpoint(built, tmp_path / "ckpt")
    manifest = read_manifest(tmp_path / "ckpt")
    assert manifest.backend == PATH
    assert manifest.state["weights"] == {"__artifact__": "artifacts/weights.pt"}
    with pytest.raises(CheckpointError, match=re.escape(f"the plug-in backend {PATH!r} is not allowed: pass allow_backends=[{PATH!r}]")):
        load_checkpoint(tmp_path / "ckpt", "cpu", allow_factories=[FACTORY])
    backend = load_checkpoint(tmp_path / "ckpt", "cpu", allow_factories=[FACTORY], allow_backends=[PATH])
    assert isinstance(backend, PublishedBackend) and backend.state is BackendState.CHECKPOINT_LOADED


CHILD = """
import json, sys, torch
from aitune.checkpoint import deploy_checkpoint
path, x_file, out_file, backend_path, factory = sys.argv[1:6]
backend = deploy_checkpoint(path, "cpu", allow_factories=[factory], allow_backends=[backend_path])
torch.save(backend.infer(torch.load(x_file, weights_only=True)), out_file)
print(json.dumps({"class": type(backend).__module__ + ":" + type(backend).__name__, "state": backend.state.name}))
"""


def test_checkpoint_deploys_in_a_fresh_process(built, module, tmp_path):
    save_checkpoint(built, tmp_path / "ckpt")
    torch.save(X, tmp_path / "x.pt")
    done = subprocess.run(
        [PYTHON, "-c", CHILD, str(tmp_path / "ckpt"), str(tmp_path / "x.pt"), str(tmp_path / "out.pt"), PATH, FACTORY],
        env=subprocess_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"class": PATH, "state": "DEPLOYED"}
    torch.testing.assert_close(torch.load(tmp_path / "out.pt", weights_only=True), expected(module))


def test_deploy_checkpoint_in_this_process(built, module, tmp_path):
    save_checkpoint(built, tmp_path / "ckpt")
    backend = deploy_checkpoint(tmp_path / "ckpt", "cpu", allow_factories=[FACTORY], allow_backends=[PATH])
    assert backend.state is BackendState.DEPLOYED
    torch.testing.assert_close(backend.infer(X), expected(module))


# -- a real sweep --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plugin_ray():
    """A local Ray whose workers can import this directory's modules (they inherit PYTHONPATH)."""
    import ray

    from cluster import connect

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE)] + ([old] if old else []))
    if ray.is_initialized():
        ray.shutdown()
    handle = connect(num_cpus=2, object_store_memory=200 * 1024**2)
    try:
        yield handle
    finally:
        handle.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sweep_builds_and_deploys_a_plugin_named_by_import_path(plugin_ray, tmp_path):
    import io

    import ray
    from rich.console import Console

    from orchestrator import records as R
    from orchestrator.deploy.install import DEPLOYED, DeployWorker
    from orchestrator.records import DeployRecord
    from orchestrator.spec.schema import parse_spec
    from orchestrator.store import SqliteStore
    from orchestrator.sweep import run_sweep
    from orchestrator.transfer import pack_dir

    spec = parse_spec({
        "name": "plugin", "store": str(tmp_path / "store"), "batch_sizes": [2],
        "models": [{"name": "mlp", "factory": "aitune.examples:mlp", "kwargs": {"width": 16, "depth": 2},
                    "inputs": [{"name": "x", "shape": [16]}]}],
        "candidates": [{"backend": "TorchEagerBackend"}, {"backend": PATH, "config": {"inference_mode": False}},
                       {"backend": PLAIN}],
        "measure": {"budget_s": 0.05, "min_iters": 5, "warmup_iters": 2},
        "workers": {"cpu_slots": 2, "threads_per_slot": 1},
        "budgets": {"build_timeout_s": 120, "measure_timeout_s": 120},
    })  # fmt: skip
    outcome = run_sweep(spec, console=Console(file=io.StringIO()), deploy=False, write_report=False)
    by_backend = {r.backend: r for r in outcome.results}
    assert set(by_backend) == {"TorchEagerBackend", PATH, PLAIN}
    plugin = by_backend[PATH]
    assert plugin.status == R.OK, plugin.error
    assert plugin.candidate == "PublishedBackend(inference_mode=False)" and plugin.config == {"inference_mode": False}
    assert by_backend[PLAIN].candidate == "PublishedPlainBackend(plain eager)"
    # built, checked and measured in a worker; its checkpoint saved there names the import path
    assert by_backend[PLAIN].status == R.ERROR and "not saved" in by_backend[PLAIN].error
    with SqliteStore(spec.store) as store:
        folder = store.checkpoint_path(plugin)
        reference = store.reference_bytes(plugin.reference_key)
    assert read_manifest(folder).backend == PATH

    target = ray.remote(DeployWorker).remote({"kind": "cpu", "threads": 1}, "t0")
    try:
        selection = {"model": "mlp", "batch_size": 2, "winner_key": plugin.key, "device_class_key": plugin.device_class_key}
        trust = {"manifest_sha256": plugin.manifest_sha256, "factories": ["aitune.examples:mlp"], "backends": [PATH]}
        record = DeployRecord.from_dict(ray.get(
            target.deploy.remote(pack_dir(folder), reference, selection, "float32", {}, 0.05, trust), timeout=120))
    finally:
        ray.kill(target, no_restart=True)
    assert record.status == DEPLOYED, record.reason
    assert record.max_abs_err is not None and record.max_abs_err < 1e-5


# -- the README's example ------------------------------------------------------------------------------
def test_the_readme_backend_example_tunes_saves_and_deploys(module, tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    section = text[text.index("#### Writing a backend"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("\n```", section.index("```python"))]
    (tmp_path / "my_backends.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_backends", raising=False)
    result = aitune.tune(module, [SAMPLE], ["my_backends:NoGradEager"], "cpu", measure_config=fast(), keep_backends=True)
    mine = next(r for r in result.results if r.backend_class == "NoGradEager")
    assert mine.status == "ok", mine.error
    assert mine.name == "NoGradEager(no_grad)"
    save_checkpoint(mine.backend, tmp_path / "ckpt")
    served = deploy_checkpoint(tmp_path / "ckpt", "cpu", allow_factories=[FACTORY], allow_backends=["my_backends:NoGradEager"])
    torch.testing.assert_close(served.infer(X), expected(module))


def test_a_plugin_may_set_its_config_the_natural_way_in_its_constructor(module, tmp_path):
    # the published API has no ``config`` attribute: a plug-in that writes ``self.config = ...``
    # used to fail at construction ("property 'config' ... has no setter")
    class SelfConfigured(PublishedBackend):
        def __init__(self, config: PublishedConfig | None = None):
            Backend.__init__(self)
            self.config = config or PublishedConfig(inference_mode=False)

    backend = SelfConfigured()
    assert backend.config == PublishedConfig(inference_mode=False)
    assert backend.describe() == PublishedConfig(inference_mode=False).describe()
    assert backend.key() != SelfConfigured(PublishedConfig()).key()  # the config it set is the one keyed
    backend.build(module, SPEC, [SAMPLE], "cpu", tmp_path / "build")
    torch.testing.assert_close(backend.infer(X), expected(module))
    with pytest.raises(TypeError, match="must be a BackendConfig"):
        backend.config = {"inference_mode": True}
