"""Checkpoints: what the manifest holds, and every refusal, each before anything is loaded."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from aitune.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    deploy_checkpoint,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    verify_checkpoint,
)
from aitune.environment import cpu_name
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend import BackendState, TorchEagerBackend, TorchEagerConfig
from aitune_helpers import NotAWeight, PinnedEagerBackend, tiny_mlp

X = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
SAMPLE = Sample.of(X)
SPEC = GraphSpec.from_sample(SAMPLE)
WEIGHTS = "artifacts/weights.pt"
#: what these checkpoints name: the test model's factory and the test backend's import path
TRUST = {"allow_factories": ["aitune_helpers:tiny_mlp"], "allow_backends": ["aitune_helpers:PinnedEagerBackend"]}


@pytest.fixture
def module():
    return tiny_mlp()


def build(cls, module, tmp_path, config=None):
    return cls(config).build(module, SPEC, [SAMPLE], "cpu", tmp_path / "build")


@pytest.fixture
def checkpoint(module, tmp_path):
    """A checkpoint of the non-portable test backend, so that every refusal can also check the device."""
    path = tmp_path / "ckpt"
    save_checkpoint(build(PinnedEagerBackend, module, tmp_path), path)
    return path


@pytest.fixture
def from_dict_calls():
    """Read after a refusal: how many times a backend got rebuilt since the test began."""
    start = PinnedEagerBackend.from_dict_calls
    return lambda: PinnedEagerBackend.from_dict_calls - start


def edit_manifest(path: Path, change) -> None:
    file = path / "manifest.json"
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data, indent=2))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- what a checkpoint holds --------------------------------------------------------------------------
def test_manifest_holds_version_backend_config_spec_environment_and_artifacts(module, tmp_path):
    config = TorchEagerConfig(channels_last=False, inference_mode=False)
    backend = build(TorchEagerBackend, module, tmp_path, config)
    manifest = save_checkpoint(backend, tmp_path / "ckpt", extra={"note": "hello"})
    data = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert data == manifest.to_dict()
    assert data["format_version"] == FORMAT_VERSION == 2
    assert data["backend"] == "TorchEagerBackend"  # a built-in: its name; a plug-in: its import path
    assert "backend_module" not in data
    assert data["portable"] is True
    assert data["config"] == config.to_dict()
    assert data["graph_spec"] == SPEC.to_dict()
    assert data["key"] == backend.key()
    assert data["extra"] == {"note": "hello"}
    env = data["environment"]
    assert env["torch"] == torch.__version__
    assert env["device_type"] == "cpu"
    assert env["device_name"] == cpu_name()
    assert "compute_capability" in env and "cuda" in env and "python" in env
    assert [a["path"] for a in data["artifacts"]] == [WEIGHTS]
    art = data["artifacts"][0]
    file = tmp_path / "ckpt" / WEIGHTS
    assert art["size"] == file.stat().st_size > 0
    assert art["sha256"] == sha256(file)
    assert data["state"]["weights"] == {"__artifact__": WEIGHTS}
    assert data["state"]["module"] == {"factory": "aitune_helpers:tiny_mlp", "kwargs": {"hidden": 32, "seed": 0, "width": 16}}
    assert read_manifest(tmp_path / "ckpt") == manifest
    assert verify_checkpoint(tmp_path / "ckpt") == manifest


def test_weights_are_a_plain_state_dict_loadable_with_weights_only(module, checkpoint):
    state = torch.load(checkpoint / WEIGHTS, weights_only=True)
    assert type(state) is dict
    assert set(state) == set(module.state_dict())
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(state[name], tensor)


def test_no_temporary_directory_is_left_after_a_save(checkpoint):
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["build", "ckpt"]


def test_load_ends_in_checkpoint_loaded_and_deploys(module, checkpoint, from_dict_calls):
    backend = load_checkpoint(checkpoint, "cpu", **TRUST)
    assert isinstance(backend, PinnedEagerBackend)
    assert backend.state is BackendState.CHECKPOINT_LOADED
    assert from_dict_calls() == 1
    backend.deploy("cpu")
    with torch.inference_mode():
        torch.testing.assert_close(backend.infer(X), module(X))


def test_deploy_checkpoint_loads_and_deploys_in_one_call(module, checkpoint):
    backend = deploy_checkpoint(checkpoint, "cpu", **TRUST)
    assert backend.state is BackendState.DEPLOYED
    assert backend.device == torch.device("cpu")
    with torch.inference_mode():
        torch.testing.assert_close(backend.infer(X), module(X))


def test_a_checkpoint_still_loads_after_being_moved(module, checkpoint, tmp_path):
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(str(checkpoint), moved)
    backend = deploy_checkpoint(moved, "cpu", **TRUST)
    with torch.inference_mode():
        torch.testing.assert_close(backend.infer(X), module(X))


# -- saving refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [None, "keep.txt"])
def test_save_refuses_to_overwrite_an_existing_directory(module, tmp_path, content):
    target = tmp_path / "ckpt"
    target.mkdir()
    if content:
        (target / content).write_text("precious")
    backend = build(TorchEagerBackend, module, tmp_path)
    with pytest.raises(CheckpointError, match=f"checkpoint directory {target} already exists; refusing to overwrite it"):
        save_checkpoint(backend, target)
    assert sorted(p.name for p in target.iterdir()) == ([content] if content else [])
    if content:
        assert (target / content).read_text() == "precious"


class UnserializableStateBackend(TorchEagerBackend):
    """Its state holds an object JSON can't write: saving fails after the artifacts were copied."""

    def to_dict(self):
        state = super().to_dict()
        state["opaque"] = NotAWeight()
        return state


def test_failed_save_leaves_neither_checkpoint_nor_temporary_directory(module, tmp_path):
    backend = build(UnserializableStateBackend, module, tmp_path)
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(TypeError):
        save_checkpoint(backend, parent / "ckpt")
    assert list(parent.iterdir()) == []


def test_save_refuses_an_artifact_that_does_not_exist(module, tmp_path):
    backend = build(TorchEagerBackend, module, tmp_path)
    backend.to_dict()["weights"].unlink()  # the backend wrote it, then it vanished
    with pytest.raises(CheckpointError, match=r"artifact .*weights\.pt named in the backend's state does not exist"):
        save_checkpoint(backend, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]


def test_save_refuses_an_unbuilt_backend(tmp_path):
    with pytest.raises(CheckpointError, match="backend TorchEagerBackend has no device"):
        save_checkpoint(TorchEagerBackend(), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# -- loading refusals -------------------------------------------------------------------------------
def refuse(path, from_dict_calls, match):
    """Both verify and load refuse, and nothing reaches the backend's from_dict."""
    with pytest.raises(CheckpointError, match=match):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, "cpu", **TRUST)
    with pytest.raises(CheckpointError, match=match):
        deploy_checkpoint(path, "cpu", **TRUST)
    assert from_dict_calls() == 0


def test_missing_artifact_is_refused(checkpoint, from_dict_calls):
    (checkpoint / WEIGHTS).unlink()
    refuse(checkpoint, from_dict_calls, f"artifact {WEIGHTS} is missing from checkpoint {checkpoint}")


def test_changed_artifact_of_the_same_size_fails_its_sha256(checkpoint, from_dict_calls):
    file = checkpoint / WEIGHTS
    data = bytearray(file.read_bytes())
    size = len(data)
    data[-20] ^= 0xFF
    file.write_bytes(bytes(data))
    assert file.stat().st_size == size
    refuse(checkpoint, from_dict_calls, f"artifact {WEIGHTS} fails its SHA-256 check")


def test_artifact_of_another_size_is_refused(checkpoint, from_dict_calls):
    file = checkpoint / WEIGHTS
    size = file.stat().st_size
    with open(file, "ab") as fh:
        fh.write(b"\0")
    refuse(checkpoint, from_dict_calls, f"artifact {WEIGHTS} has {size + 1} bytes, the manifest says {size}: it was changed")


def test_absolute_artifact_path_is_refused(checkpoint, from_dict_calls):
    absolute = str((checkpoint / WEIGHTS).resolve())

    def change(data):
        data["artifacts"][0]["path"] = absolute
        data["state"]["weights"] = {"__artifact__": absolute}

    edit_manifest(checkpoint, change)
    refuse(checkpoint, from_dict_calls, f"artifact path '{absolute}' is absolute; checkpoint paths must be relative")


def test_path_leaving_the_checkpoint_is_refused(checkpoint, from_dict_calls):
    outside = checkpoint.parent / "outside.pt"
    shutil.copyfile(checkpoint / WEIGHTS, outside)  # a valid file, so only the path is wrong
    rel = "../outside.pt"

    def change(data):
        data["artifacts"][0]["path"] = rel
        data["state"]["weights"] = {"__artifact__": rel}

    edit_manifest(checkpoint, change)
    refuse(checkpoint, from_dict_calls, r"artifact path '\.\./outside\.pt' leaves the checkpoint directory")


def test_dot_dot_inside_a_path_is_refused(checkpoint, from_dict_calls):
    rel = "artifacts/../artifacts/weights.pt"

    def change(data):
        data["artifacts"][0]["path"] = rel
        data["state"]["weights"] = {"__artifact__": rel}

    edit_manifest(checkpoint, change)
    refuse(checkpoint, from_dict_calls, "leaves the checkpoint directory")


def test_link_leaving_the_checkpoint_is_refused(checkpoint, from_dict_calls):
    outside = checkpoint.parent / "outside.pt"
    shutil.move(checkpoint / WEIGHTS, outside)
    os.symlink(outside, checkpoint / WEIGHTS)
    refuse(checkpoint, from_dict_calls, r"leaves the checkpoint directory \(through a link\)")


def test_plugin_backend_checkpoint_names_its_import_path(checkpoint):
    assert read_manifest(checkpoint).backend == "aitune_helpers:PinnedEagerBackend"


def test_state_naming_an_unlisted_artifact_is_refused(checkpoint, from_dict_calls):
    edit_manifest(checkpoint, lambda d: d["state"].update(weights={"__artifact__": "artifacts/other.pt"}))
    refuse(checkpoint, from_dict_calls, "the backend state names 'artifacts/other.pt', which the manifest does not list")


@pytest.mark.parametrize("version", [1, 3, 0, "2", None])
def test_unknown_format_version_is_refused(checkpoint, from_dict_calls, version):
    edit_manifest(checkpoint, lambda d: d.update(format_version=version))
    refuse(checkpoint, from_dict_calls, rf"manifest\.json: unknown checkpoint format version {version!r} \(this aitune reads version 2\)")


def test_manifest_without_a_version_is_refused(checkpoint, from_dict_calls):
    edit_manifest(checkpoint, lambda d: d.pop("format_version"))
    refuse(checkpoint, from_dict_calls, "no format_version; this is not an aitune checkpoint manifest")


def test_missing_manifest_is_refused(checkpoint, from_dict_calls):
    (checkpoint / "manifest.json").unlink()
    refuse(checkpoint, from_dict_calls, f"{checkpoint / 'manifest.json'}: missing; {checkpoint} is not a checkpoint directory")


def test_manifest_that_is_not_json_is_refused(checkpoint, from_dict_calls):
    (checkpoint / "manifest.json").write_text("{not json")
    refuse(checkpoint, from_dict_calls, "manifest.json: not valid JSON")


def test_malformed_manifest_is_refused(checkpoint, from_dict_calls):
    edit_manifest(checkpoint, lambda d: d["artifacts"][0].pop("sha256"))
    refuse(checkpoint, from_dict_calls, "manifest.json: malformed manifest")


# -- device-bound checkpoints -------------------------------------------------------------------------
def built_on(checkpoint: Path, **environment) -> None:
    edit_manifest(checkpoint, lambda d: d["environment"].update(environment))


def test_non_portable_checkpoint_built_for_cuda_is_refused_on_cpu(checkpoint, from_dict_calls):
    built_on(checkpoint, device_type="cuda", device_name="NVIDIA H200", compute_capability="9.0")
    match = r"PinnedEagerBackend checkpoint was built for device type 'cuda' and can't run on 'cpu'"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(checkpoint, "cpu", **TRUST)
    with pytest.raises(CheckpointError, match=match):
        deploy_checkpoint(checkpoint, "cpu", **TRUST)
    assert from_dict_calls() == 0
    verify_checkpoint(checkpoint)  # the files themselves are fine


def test_non_portable_checkpoint_is_checked_against_its_stored_device_when_none_is_given(checkpoint, from_dict_calls):
    built_on(checkpoint, device_type="cuda", device_name="NVIDIA H200", compute_capability="9.0")
    with pytest.raises(CheckpointError, match="built for device type 'cuda' and can't run on 'cpu'"):
        deploy_checkpoint(checkpoint, **TRUST)
    assert from_dict_calls() == 0


def test_non_portable_checkpoint_of_another_compute_capability_is_refused(checkpoint, from_dict_calls):
    built_on(checkpoint, compute_capability="9.0", device_name="some accelerator")
    match = r"PinnedEagerBackend checkpoint was built for compute capability 9\.0 \(some accelerator\); the target .* has None"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(checkpoint, "cpu", **TRUST)
    assert from_dict_calls() == 0


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_non_portable_checkpoint_loads_without_a_device_for_inspection(checkpoint, from_dict_calls):
    built_on(checkpoint, device_type="cuda", compute_capability="9.0")
    backend = load_checkpoint(checkpoint, **TRUST)
    assert backend.state is BackendState.CHECKPOINT_LOADED
    assert from_dict_calls() == 1


def test_portable_checkpoint_from_another_device_deploys_on_cpu(module, tmp_path):
    save_checkpoint(build(TorchEagerBackend, module, tmp_path), tmp_path / "ckpt")
    built_on(tmp_path / "ckpt", device_type="cuda", device_name="NVIDIA H200", compute_capability="9.0")
    backend = deploy_checkpoint(tmp_path / "ckpt", "cpu", **TRUST)
    with torch.inference_mode():
        torch.testing.assert_close(backend.infer(X), module(X))


def test_weights_are_loaded_with_weights_only(checkpoint):
    """A weights file holding an arbitrary pickled object, with a matching manifest, still loads nothing."""
    file = checkpoint / WEIGHTS
    state = torch.load(file, weights_only=True)
    state["evil"] = NotAWeight("payload")
    torch.save(state, file)

    def change(data):
        data["artifacts"][0]["size"] = file.stat().st_size
        data["artifacts"][0]["sha256"] = sha256(file)

    edit_manifest(checkpoint, change)
    backend = load_checkpoint(checkpoint, "cpu", **TRUST)  # the files verify: only the unpickler stands in the way
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        backend.deploy("cpu")
    assert backend.state is BackendState.CHECKPOINT_LOADED
