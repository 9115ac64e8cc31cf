"""A checkpoint's manifest can't be edited into code: every tampering is refused before anything
is imported or run. Each test works on a real checkpoint whose model factory writes a marker file
when it runs, so "no code ran" is something the test sees, not something it assumes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from aitune.checkpoint import (
    CheckpointError,
    deploy_checkpoint,
    load_checkpoint,
    manifest_sha256,
    save_checkpoint,
    verify_checkpoint,
)
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend import BackendState, TorchEagerBackend
from aitune_helpers import marking_mlp

FACTORY = "aitune_helpers:marking_mlp"
ALLOW = {"allow_factories": [FACTORY]}
X = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
SAMPLE = Sample.of(X)
EVIL_MODULE = "aitune_evil_plugin"
EVIL = f'''
from pathlib import Path
Path({{marker!r}}).write_text("imported")

def make(**kwargs):
    Path({{marker!r}}).write_text("called")

class EvilBackend:
    pass
'''


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "marker"


@pytest.fixture
def ckpt(tmp_path, marker) -> Path:
    module = marking_mlp(str(marker))
    marker.unlink()  # made once here; from now on it appears only if a load runs the factory
    backend = TorchEagerBackend().build(module, GraphSpec.from_sample(SAMPLE), [SAMPLE], "cpu", tmp_path / "build")
    save_checkpoint(backend, tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def evil_module(tmp_path, monkeypatch, marker) -> str:
    """An importable module that writes the marker as soon as it is imported."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / f"{EVIL_MODULE}.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, EVIL_MODULE, raising=False)
    return EVIL_MODULE


def edit(path: Path, change) -> None:
    file = path / "manifest.json"
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data, indent=2))


def refused(path: Path, match: str, **kwargs) -> None:
    """Both load and deploy refuse with ``match``."""
    for fn in (load_checkpoint, deploy_checkpoint):
        with pytest.raises(CheckpointError, match=match):
            fn(path, "cpu", **kwargs)


# -- the untouched checkpoint: the marker does show a factory that ran ----------------------------------
def test_an_untouched_checkpoint_with_its_factory_allowed_deploys_and_runs_it(ckpt, marker):
    backend = deploy_checkpoint(ckpt, "cpu", manifest_sha256=manifest_sha256(ckpt), **ALLOW)
    assert backend.state is BackendState.DEPLOYED
    assert marker.read_text() == "ran"
    with torch.inference_mode():
        torch.testing.assert_close(backend.infer(X), marking_mlp(str(marker))(X))


def test_manifest_sha256_is_the_sha256_of_the_manifest_bytes(ckpt):
    assert manifest_sha256(ckpt) == hashlib.sha256((ckpt / "manifest.json").read_bytes()).hexdigest()


# -- factories ------------------------------------------------------------------------------------
def test_a_factory_is_refused_unless_allowed(ckpt, marker):
    refused(ckpt, re.escape(f"the model factory {FACTORY!r} is not allowed: pass allow_factories=[{FACTORY!r}]"))
    refused(ckpt, "allow_factories=True to trust everything this manifest names", allow_factories=["other:factory"])
    assert not marker.exists()


def test_allow_factories_true_trusts_the_manifest(ckpt, marker):
    deploy_checkpoint(ckpt, "cpu", allow_factories=True)
    assert marker.exists()


def test_a_string_is_not_an_allowlist(ckpt, marker):
    with pytest.raises(TypeError, match="allow_factories must be a collection of import paths or True, not the string"):
        load_checkpoint(ckpt, "cpu", allow_factories=FACTORY)  # "in" on a string would match substrings
    assert not marker.exists()


def test_factory_changed_to_a_shell_command_is_refused(ckpt, marker):
    command = {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}}
    edit(ckpt, lambda d: d["state"].update(module=command))
    refused(ckpt, re.escape("the model factory 'os:system' is not allowed"), **ALLOW)
    assert not marker.exists()
    # what the refusal prevents: allowed, the edited manifest does run the command
    with pytest.raises(TypeError, match="factory 'os:system' returned int, not a torch.nn.Module"):
        deploy_checkpoint(ckpt, "cpu", allow_factories=["os:system"])
    assert marker.exists()


def test_factory_changed_to_another_module_is_refused_before_it_is_imported(ckpt, marker, evil_module):
    edit(ckpt, lambda d: d["state"]["module"].update(factory=f"{evil_module}:make", kwargs={}))
    refused(ckpt, re.escape(f"the model factory '{evil_module}:make' is not allowed"), **ALLOW)
    assert not marker.exists() and evil_module not in sys.modules


def test_a_factory_however_deep_in_the_state_is_refused(ckpt, marker):
    hidden = {"deeper": [{"x": 1}, {"factory": "os:system", "kwargs": {"command": f"touch {marker}"}}]}
    edit(ckpt, lambda d: d["state"].update(extra=hidden))
    refused(ckpt, re.escape("the model factory 'os:system' is not allowed"), **ALLOW)
    assert not marker.exists()


def test_factory_kwargs_are_json_only(ckpt, marker):
    # an artifact tag would reach the factory as a Path object
    edit(ckpt, lambda d: d["state"]["module"]["kwargs"].update(marker={"__artifact__": "artifacts/weights.pt"}))
    refused(ckpt, r"kwargs of module factory 'aitune_helpers:marking_mlp'\.marker: PosixPath .* is not a JSON value", **ALLOW)
    assert not marker.exists()


# -- artifacts ------------------------------------------------------------------------------------
def test_weights_changed_to_a_plain_path_outside_are_refused(ckpt, marker, tmp_path):
    outside = tmp_path / "outside.pt"
    shutil.copyfile(ckpt / "artifacts" / "weights.pt", outside)  # valid weights: only where they are is wrong
    edit(ckpt, lambda d: d["state"].update(weights=str(outside)))
    refused(ckpt, r"TorchEagerBackend: state entry 'weights' must be an artifact Path bundled with the checkpoint, got str", **ALLOW)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["notes.txt", "artifacts/extra.pt"])
def test_an_extra_file_is_refused_naming_it(ckpt, marker, where):
    (ckpt / where).write_bytes(b"not listed")
    match = f"checkpoint {ckpt} holds a file {where} that its manifest does not list"
    with pytest.raises(CheckpointError, match=re.escape(match)):
        verify_checkpoint(ckpt)
    refused(ckpt, re.escape(match), **ALLOW)
    assert not marker.exists()


def test_an_extra_directory_is_refused_naming_it(ckpt, marker):
    (ckpt / "artifacts" / "more").mkdir()
    refused(ckpt, re.escape(f"checkpoint {ckpt} holds a directory artifacts/more that its manifest does not list"), **ALLOW)
    assert not marker.exists()


def test_a_symlink_even_to_a_listed_artifact_is_refused_naming_it(ckpt, marker):
    os.symlink(ckpt / "artifacts" / "weights.pt", ckpt / "artifacts" / "alias.pt")
    refused(ckpt, re.escape(f"checkpoint {ckpt} holds a symbolic link artifacts/alias.pt: links are refused"), **ALLOW)
    assert not marker.exists()


def test_a_manifest_that_is_a_symlink_is_refused(ckpt, marker, tmp_path):
    shutil.move(ckpt / "manifest.json", tmp_path / "elsewhere.json")
    os.symlink(tmp_path / "elsewhere.json", ckpt / "manifest.json")
    refused(ckpt, "manifest.json: a symbolic link; a checkpoint's manifest must be a real file", **ALLOW)
    assert not marker.exists()


# -- backends -------------------------------------------------------------------------------------
def test_backend_changed_to_another_module_is_refused_before_it_is_imported(ckpt, marker, evil_module):
    path = f"{evil_module}:EvilBackend"
    edit(ckpt, lambda d: d.update(backend=path))
    refused(ckpt, re.escape(f"the plug-in backend {path!r} is not allowed: pass allow_backends=[{path!r}]"), **ALLOW)
    assert not marker.exists() and evil_module not in sys.modules
    # what the refusal prevents: allowed, loading imports the module (which then is no Backend)
    with pytest.raises(CheckpointError, match="not a subclass of aitune.torch.backend.Backend"):
        load_checkpoint(ckpt, "cpu", allow_backends=[path], **ALLOW)
    assert marker.read_text() == "imported"


def test_the_old_backend_module_field_is_no_way_in(ckpt, marker, evil_module):
    edit(ckpt, lambda d: d.update(backend_module=evil_module))
    refused(ckpt, "manifest.json: malformed manifest", **ALLOW)
    assert not marker.exists() and evil_module not in sys.modules


def test_an_unknown_builtin_name_is_refused(ckpt, marker):
    edit(ckpt, lambda d: d.update(backend="Turbo"))
    refused(ckpt, "unknown backend 'Turbo'", **ALLOW)
    assert not marker.exists()


# -- the manifest's own hash --------------------------------------------------------------------------
def test_an_edited_manifest_is_refused_when_its_sha256_is_given(ckpt, marker):
    stored = manifest_sha256(ckpt)
    edit(ckpt, lambda d: d["extra"].update(note="harmless looking"))
    match = f"{ckpt / 'manifest.json'}: changed since it was stored"
    refused(ckpt, re.escape(match), manifest_sha256=stored, **ALLOW)
    with pytest.raises(CheckpointError, match=re.escape(match)):
        verify_checkpoint(ckpt, manifest_sha256=stored)
    assert not marker.exists()


def test_the_sha256_is_checked_before_the_manifest_is_parsed(ckpt, marker):
    stored = manifest_sha256(ckpt)
    (ckpt / "manifest.json").write_text("{not json")
    refused(ckpt, "changed since it was stored", manifest_sha256=stored, **ALLOW)
    refused(ckpt, "not valid JSON", **ALLOW)  # without the hash, parsing is what fails
    assert not marker.exists()


@pytest.mark.parametrize("field, value", [("backend", ["os", "system"]), ("state", "os:system")])
def test_fields_of_the_wrong_type_are_refused(ckpt, marker, field, value):
    edit(ckpt, lambda d: d.update({field: value}))
    refused(ckpt, f"manifest.json: malformed manifest: wrong type of {field}", **ALLOW)
    assert not marker.exists()
