"""aitune.load_tuned and the deploy root, in one process without Ray: install, route by shape, refuse."""

from __future__ import annotations

from aitune.reference import pack_reference
import json
import os
import sys

import pytest
import torch

import aitune
from aitune import deploy_root as layout
from aitune.checkpoint import save_checkpoint
from aitune.examples import mlp
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend import TorchEagerBackend, TorchEagerConfig

FACTORY = "aitune.examples:mlp"
KWARGS = {"width": 16, "depth": 2}
FP32 = {"atol": 1e-4, "rtol": 1e-3}
BF16 = {"atol": 5e-2, "rtol": 5e-2}


def model():
    return aitune.attach_factory(mlp(**KWARGS), FACTORY, KWARGS)


def sample(batch: int, seed: int = 0) -> Sample:
    return Sample.of(torch.randn(batch, 16, generator=torch.Generator().manual_seed(seed)))


def checkpoint(tmp_path, batch: int, precision: str = "float32"):
    s = sample(batch)
    config = TorchEagerConfig(precision=precision, autocast=True) if precision != "float32" else None
    backend = TorchEagerBackend(config).build(model(), GraphSpec.from_sample(s), [s], "cpu", tmp_path / f"build-{batch}-{precision}")
    path = tmp_path / f"ckpt-{batch}-{precision}"
    save_checkpoint(backend, path)
    with torch.inference_mode():
        reference = pack_reference(s, model()(*s.args))
    return path, reference


def install(tmp_path, root, batch: int, precision: str = "float32", **kw):
    path, reference = checkpoint(tmp_path, batch, precision)
    return layout.install(root, path, reference, device="cpu", model="mlp", batch_size=batch,
                          tolerance=BF16 if precision != "float32" else FP32, factory=FACTORY, **kw)


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "deploy"
    for batch in (2, 4):
        _, verified = install(tmp_path, root, batch)
        assert verified.ok, verified.reason
    return root


def test_calls_go_to_the_winner_tuned_for_their_shape_and_match_eager(root):
    tuned = aitune.load_tuned(root, "mlp", device="cpu")
    assert tuned.tuned_shapes == [((2, 16),), ((4, 16),)]
    reference = mlp(**KWARGS)
    for batch in (2, 4):
        x = torch.randn(batch, 16)
        torch.testing.assert_close(tuned(x), reference(x), atol=1e-4, rtol=1e-3)
        assert tuned.winner_for(x).batch_size == batch
    assert set(tuned.versions) == {2, 4}


def test_untuned_shape_is_refused_listing_the_tuned_shapes(root):
    tuned = aitune.load_tuned(root, "mlp")
    with pytest.raises(aitune.UntunedShape, match=r"input shape 3x16 was not tuned; tuned shapes: 2x16; 4x16"):
        tuned(torch.randn(3, 16))


def test_untuned_shape_runs_on_the_fallback_when_one_is_given(root):
    eager = mlp(**KWARGS)
    tuned = aitune.load_tuned(root, "mlp", fallback=eager)
    x = torch.randn(3, 16)
    torch.testing.assert_close(tuned(x), eager(x))


def test_layout_is_model_class_batch_version_with_a_current_pointer(root):
    key = layout.device_class_key("cpu")
    folder = root / "mlp" / key[:16] / "b2"
    (version,) = layout.versions(folder)
    assert (folder / "current").read_text().strip() == version
    assert {p.name for p in (folder / version).iterdir()} == {"install.json", "reference.pt", "checkpoint", "batching.json"}
    install = json.loads((folder / version / "install.json").read_text())
    assert install["factory"] == FACTORY and install["batch_size"] == 2 and install["input_shapes"] == [[2, 16]]
    assert install["input_names"] == ["input_0"]  # no spec names here: positional inputs are input_N
    assert json.loads((root / "mlp" / key[:16] / "device_class.json").read_text())["key"] == key


def test_a_new_version_becomes_current_and_the_previous_is_kept(tmp_path, root):
    folder = layout.batch_dir(root, "mlp", layout.device_class_key("cpu"), 2)
    (first,) = layout.versions(folder)
    second, verified = install(tmp_path, root, 2, "bfloat16")
    assert verified.ok, verified.reason
    assert layout.versions(folder) == [first, second.name]
    assert layout.current_version(folder) == second.name
    was, to, verified = layout.rollback(root, "mlp", layout.device_class_key("cpu"), 2, "cpu")
    assert (was, to, verified.ok) == (second.name, first, True)
    assert layout.current_version(folder) == first


def test_a_version_that_fails_verification_leaves_current_as_it_was(tmp_path, root):
    folder = layout.batch_dir(root, "mlp", layout.device_class_key("cpu"), 2)
    before = layout.current_version(folder)
    path, reference = checkpoint(tmp_path, 2, "bfloat16")
    ref = torch.load(__import__("io").BytesIO(reference), weights_only=True)
    ref["outputs"] = [t + 1 for t in ref["outputs"]]
    buf = __import__("io").BytesIO()
    torch.save(ref, buf)
    version, verified = layout.install(root, path, buf.getvalue(), device="cpu", model="mlp", batch_size=2,
                                       tolerance=BF16, factory=FACTORY)
    assert not verified.ok and "outputs differ" in verified.reason
    assert layout.current_version(folder) == before
    assert not version.exists()  # the failed version is not left behind


def test_an_installed_checkpoint_edited_after_install_is_refused_at_load(root):
    (entry,) = [e for e in layout.live(root, "mlp") if e.batch_size == 4]
    weights = entry.folder / "checkpoint" / "artifacts" / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(aitune.TunedModelError, match=r"mlp b4 version v0001-\w+ refused: .*weights.pt fails its SHA-256"):
        aitune.load_tuned(root, "mlp")


def test_an_edited_manifest_is_refused_by_the_hash_recorded_at_install(root):
    (entry,) = [e for e in layout.live(root, "mlp") if e.batch_size == 2]
    manifest = entry.folder / "checkpoint" / "manifest.json"
    manifest.write_text(manifest.read_text().replace("aitune.examples:mlp", "os:system"))
    with pytest.raises(aitune.TunedModelError, match="changed since it was stored"):
        aitune.load_tuned(root, "mlp")


def test_a_device_class_without_a_winner_is_refused_naming_the_classes_that_have_one(root):
    # What a GPU machine would hold: the same model installed only for another device class.
    cpu_dir = root / "mlp" / layout.device_class_key("cpu")[:16]
    other = root / "mlp" / ("e" * 16)
    cpu_dir.rename(other)
    (other / "device_class.json").write_text(json.dumps({"key": "e" * 64, "device_class": {"device_name": "NVIDIA H200"}}))
    with pytest.raises(aitune.TunedModelError) as info:
        aitune.load_tuned(root, "mlp", device="cpu")
    message = str(info.value)
    assert "was not tuned for device class" in message and "[" + layout.device_class_key("cpu")[:12] + "]" in message
    assert message.endswith("tuned for: NVIDIA H200 [eeeeeeeeeeee]")


def test_an_unknown_model_is_refused_listing_what_is_installed(root):
    with pytest.raises(aitune.TunedModelError, match=r"model 'resnet' is not installed in deploy root .* \(installed: mlp\)"):
        aitune.load_tuned(root, "resnet")


def test_an_unwritable_deploy_root_is_refused_in_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(layout.DeployRootError, match=r"deploy root .*a-file/deploy can't be written"):
        layout.check_writable(blocker / "deploy")


def test_default_root_honours_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert layout.default_root() == tmp_path / "aitune" / "deploy"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert layout.default_root() == __import__("pathlib").Path.home() / ".cache" / "aitune" / "deploy"


def test_the_loader_imports_no_ray(root):
    import subprocess

    code = f"import sys, aitune; aitune.load_tuned({str(root)!r}, 'mlp'); print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
