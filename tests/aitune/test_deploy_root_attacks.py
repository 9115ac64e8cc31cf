"""The deploy root under attack, without Ray: names that would leave it, links, damaged files,
spoofed install records. Every refusal is one line of aitune's own error type, naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aitune
from aitune import deploy_root as layout
from aitune.loader import TunedModelError
from test_loader import FACTORY, FP32, checkpoint, install, sample

ROOT_DIR = Path(__file__).resolve().parents[2]


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "deploy"
    for batch in (2, 4):
        _, verified = install(tmp_path, root, batch)
        assert verified.ok, verified.reason
    return root


def install_again(tmp_path: Path, root: Path, batch: int):
    """The same checkpoint (same weights, same manifest) installed once more, from a fresh build folder."""
    fresh = tmp_path / f"again-{len(list(tmp_path.glob('again-*')))}"
    fresh.mkdir()
    return install(fresh, root, batch)


def folder_of(root: Path, batch: int = 2) -> Path:
    return layout.batch_dir(root, "mlp", layout.device_class_key("cpu"), batch)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


# -- 1. model names can't leave the root ------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "..", ".", "/tmp/x", "a/b", "x\n", "", ".hidden", "a\\b"])
def test_a_model_name_that_would_leave_the_root_is_refused_by_the_loader(tmp_path, root, name):
    outside = tmp_path / "x"
    outside.mkdir()
    with pytest.raises(TunedModelError) as info:
        aitune.load_tuned(root, name if name != "/tmp/x" else str(outside), device="cpu")
    assert "can't be a folder of the deploy root" in one_line(info.value)


@pytest.mark.parametrize("name", ["../escaped", "/ABS", "a/b", ".."])
def test_a_model_name_that_would_leave_the_root_installs_nothing(tmp_path, name):
    path, reference = checkpoint(tmp_path, 2)
    root = tmp_path / "deploy"
    name = str(tmp_path / "abs-escape") if name == "/ABS" else name  # an absolute path, inside this test's folder
    with pytest.raises(layout.DeployRootError, match="can't be a folder of the deploy root"):
        layout.install(root, path, reference, device="cpu", model=name, batch_size=2, tolerance=FP32, factory=FACTORY)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "abs-escape").exists()
    assert not root.exists() or not any(p.name != ".write-check" and p.is_dir() for p in root.iterdir())


# -- 3. roots that can't be a deploy root ----------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "   ", "/", "/etc", "/usr/lib/x", "/proc/self"])
def test_an_empty_root_or_a_system_folder_is_refused(bad):
    with pytest.raises(TunedModelError) as info:
        aitune.load_tuned(bad, "mlp")
    assert ("empty" in one_line(info.value)) or ("system folder" in one_line(info.value))


def test_a_root_that_is_a_file_is_refused(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(layout.DeployRootError, match="is a file, not a directory"):
        layout.resolve_root(file)


# -- 2. every file written whole; damaged shared files rewritten ----------------------------------------


FULL_DISK_CHILD = r"""
import resource, signal, sys
sys.path[:0] = [{tests!r}]
from pathlib import Path
from test_loader import checkpoint, FP32, FACTORY
from aitune import deploy_root as layout
tmp = Path({tmp!r})
path, reference = checkpoint(tmp, 2)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
try:
    layout.install(tmp / "deploy", path, reference, device="cpu", model="mlp", batch_size=2, tolerance=FP32, factory=FACTORY)
except layout.DeployRootError as exc:
    print("REFUSED", exc)
"""


@pytest.mark.parametrize("limit", [100, 2000])  # device_class.json fails / reference.pt fails
def test_a_deploy_that_runs_out_of_space_leaves_nothing_half_written_and_the_next_one_works(tmp_path, limit):
    from env_helpers import child_env

    env = child_env(ROOT_DIR)
    out = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), limit=limit)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = [l for l in out.stdout.splitlines() if l.startswith("REFUSED")]
    assert "can't be written" in line
    root = tmp_path / "deploy"
    for p in root.rglob("*"):  # no empty or partial file, no staging or version folder, is left behind
        assert "staging" not in p.name and not p.name.startswith("v0"), f"left behind: {p}"
        if p.name == layout.DEVICE_CLASS:
            assert json.loads(p.read_text())["key"], "a device_class.json is whole or absent"
        else:
            assert p.name == ".lock" or p.is_dir(), f"left behind: {p}"
    (tmp_path / "again").mkdir()
    path, reference = checkpoint(tmp_path / "again", 2)
    _, verified = layout.install(root, path, reference, device="cpu", model="mlp", batch_size=2, tolerance=FP32, factory=FACTORY)
    assert verified.ok, verified.reason
    assert aitune.load_tuned(root, "mlp").versions == {2: layout.current_version(folder_of(root))}


@pytest.mark.parametrize("content", [b"", b"{", b"[1]", b'{"key": "zz", "device_class": {}}'])
def test_a_damaged_device_class_file_is_one_clear_line_and_the_next_install_rewrites_it(tmp_path, root, content):
    class_file = folder_of(root).parent / layout.DEVICE_CLASS
    class_file.write_bytes(content)
    with pytest.raises(TunedModelError) as info:
        aitune.load_tuned(root, "mlp")
    assert f"{class_file}: " in one_line(info.value) and "deploy again" in str(info.value)
    _, verified = install_again(tmp_path, root, 2)
    assert verified.ok
    assert sorted(aitune.load_tuned(root, "mlp").versions) == [2, 4]


# -- 8, 12. install.json is checked, and must agree with what is verified ---------------------------------


def edit_install(root: Path, **changes) -> Path:
    folder = folder_of(root)
    file = folder / layout.current_version(folder) / layout.INSTALL
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))
    return file


def test_a_missing_manifest_hash_in_install_json_is_refused_not_a_check_turned_off(root):
    file = edit_install(root, manifest_sha256=None)
    with pytest.raises(TunedModelError) as info:
        aitune.load_tuned(root, "mlp")
    assert f"{file}: unreadable install record: manifest_sha256 must be" in one_line(info.value)


@pytest.mark.parametrize("field,value", [("version", "v0009-000000000000"), ("batch_size", 4), ("model", "other"),
                                         ("input_shapes", [[4, 16]]), ("tolerance", {"atol": "x"}), ("factory", 3)])
def test_a_spoofed_install_record_is_refused(root, field, value):
    file = edit_install(root, **{field: value})
    with pytest.raises(TunedModelError) as info:
        aitune.load_tuned(root, "mlp")
    assert str(file) in one_line(info.value)


def test_one_batch_cant_take_over_another_batchs_route(tmp_path, root):
    # b2's folder made to hold a batch-4 reference and record: both claim batch 4's shapes
    folder2, folder4 = folder_of(root, 2), folder_of(root, 4)
    v2, v4 = layout.current_version(folder2), layout.current_version(folder4)
    data = json.loads((folder2 / v2 / layout.INSTALL).read_text())
    four = json.loads((folder4 / v4 / layout.INSTALL).read_text())
    (folder2 / v2 / layout.REFERENCE).write_bytes((folder4 / v4 / layout.REFERENCE).read_bytes())
    data.update(input_shapes=four["input_shapes"], reference_sha256=four["reference_sha256"])
    (folder2 / v2 / layout.INSTALL).write_text(json.dumps(data))
    with pytest.raises(TunedModelError, match="both take input shapes 4x16"):
        aitune.load_tuned(root, "mlp")


@pytest.mark.parametrize("content", [b"\x80\x04garbage", b"PK\x03\x04" + b"\0" * 40])
def test_a_damaged_reference_is_our_error_not_unpickling_error(root, content):
    import hashlib

    folder = folder_of(root)
    version = folder / layout.current_version(folder)
    (version / layout.REFERENCE).write_bytes(content)
    edit_install(root, reference_sha256=hashlib.sha256(content).hexdigest())
    with pytest.raises(TunedModelError) as info:
        aitune.load_tuned(root, "mlp")
    assert f"{version / layout.REFERENCE}: not a reference" in one_line(info.value)


def test_install_json_nested_too_deep_is_our_error(root):
    folder = folder_of(root)
    file = folder / layout.current_version(folder) / layout.INSTALL
    file.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TunedModelError) as info:
        aitune.load_tuned(root, "mlp")
    assert f"{file}: unreadable install record: nested too deep" in one_line(info.value)


def test_a_dtype_the_tuned_shape_does_not_take_is_untuned(root):
    tuned = aitune.load_tuned(root, "mlp")
    with pytest.raises(aitune.UntunedShape, match="input dtypes float64 were not tuned .* tuned dtypes: float32"):
        tuned(torch.randn(2, 16, dtype=torch.float64))


# -- 9. a tampered installed copy is installed again, not reused ----------------------------------------


def test_a_tampered_installed_copy_of_the_same_checkpoint_is_reinstalled(tmp_path, root):
    folder = folder_of(root)
    first = layout.current_version(folder)
    weights = folder / first / layout.CHECKPOINT / "artifacts" / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(TunedModelError, match="weights.pt"):
        aitune.load_tuned(root, "mlp")
    version, verified = install_again(tmp_path, root, 2)  # the same checkpoint deployed again
    assert verified.ok, verified.reason
    assert version.name != first and layout.current_version(folder) == version.name
    assert sorted(aitune.load_tuned(root, "mlp").versions) == [2, 4]


# -- 10. no links followed; no file's content in an error -----------------------------------------------


def test_a_version_folder_linked_outside_the_root_is_refused(tmp_path, root):
    folder = folder_of(root)
    current = layout.current_version(folder)
    outside = tmp_path / "outside-version"
    os.rename(folder / current, outside)
    os.symlink(outside, folder / current)
    with pytest.raises(TunedModelError) as info:
        aitune.load_tuned(root, "mlp")
    assert f"{folder / current} is a symbolic link" in one_line(info.value)


def test_a_linked_model_folder_is_refused_and_rollback_writes_nothing_through_it(tmp_path, root):
    target = tmp_path / "system-like"
    os.rename(root / "mlp", target)
    os.symlink(target, root / "mlp")
    before = sorted(str(p) for p in target.rglob("*"))
    with pytest.raises(TunedModelError, match="is a symbolic link"):
        aitune.load_tuned(root, "mlp")
    with pytest.raises(layout.DeployRootError, match="is a symbolic link"):
        layout.rollback(root, "mlp", layout.device_class_key("cpu"), 2, "cpu")
    assert sorted(str(p) for p in target.rglob("*")) == before  # no lock file made in the link's target


def test_a_current_pointer_linked_to_a_file_never_shows_its_content(tmp_path, root):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:SECRET-CONTENT\n" * 50)
    folder = folder_of(root)
    (folder / layout.CURRENT).unlink()
    os.symlink(secret, folder / layout.CURRENT)
    with pytest.raises(TunedModelError) as info:
        aitune.load_tuned(root, "mlp")
    assert "SECRET" not in str(info.value) and "symbolic link" in one_line(info.value)
    (folder / layout.CURRENT).unlink()
    (folder / layout.CURRENT).write_text("root:x:0:0:SECRET-CONTENT\n")
    with pytest.raises(TunedModelError) as info:
        aitune.load_tuned(root, "mlp")
    assert "SECRET" not in str(info.value) and "does not name a version" in one_line(info.value)
