"""Deploying winners on a real local Ray: verified on every target, bad checkpoints refused, the target goes on."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import ray
import torch

from orchestrator import records as R
from orchestrator.deploy.install import DEPLOYED, REFUSED, DeployWorker
from orchestrator.records import DeployRecord
from orchestrator.store import SqliteStore
from orchestrator.sweep import run_sweep
from orchestrator.transfer import pack_dir
from sweep_helpers import EAGER, EAGER_BF16, quiet, tiny_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LATENCY_S = 0.05



@pytest.fixture(scope="module")
def deployed_sweep(ray_session, tmp_path_factory):
    store = tmp_path_factory.mktemp("deploy") / "store"
    spec = tiny_spec(store, [EAGER, EAGER_BF16], deploy={"targets": [{"cpu_slots": 2}], "latency_check_s": LATENCY_S})
    outcome = run_sweep(spec, console=quiet(), write_report=False)
    return spec, outcome


def test_winner_is_deployed_and_verified_on_every_target(deployed_sweep):
    spec, outcome = deployed_sweep
    assert {r.status for r in outcome.results} == {R.OK}
    (selection,) = outcome.selections
    assert selection.winner_key is not None
    assert len(outcome.deployments) == 2
    assert {d.target for d in outcome.deployments} == {"cpu0", "cpu1"}
    for d in outcome.deployments:
        assert d.status == DEPLOYED, d.reason
        assert d.winner_key == selection.winner_key
        assert (d.model, d.batch_size) == ("mlp", 2)
        assert d.max_abs_err is not None and 0.0 <= d.max_abs_err < 1e-2
        assert d.median_ms is not None and d.median_ms > 0
        assert d.reason is None
        assert d.worker is not None and d.worker["device"] == "cpu"
    with SqliteStore(spec.store) as store:
        stored = store.deployments(outcome.sweep_id)
    assert [d.to_dict() for d in stored] == [d.to_dict() for d in outcome.deployments]


# -- refusals, calling the deploy actor directly ---------------------------------------------------


@pytest.fixture(scope="module")
def winner(deployed_sweep):
    """The winner's packed checkpoint, its stored checkpoint folder, its reference bytes and its selection."""
    spec, outcome = deployed_sweep
    (selection,) = outcome.selections
    record = next(r for r in outcome.results if r.key == selection.winner_key)
    with SqliteStore(spec.store) as store:
        folder = store.checkpoint_path(record)
        reference = store.reference_bytes(record.reference_key)
    assert folder is not None and reference is not None
    return {
        "folder": folder,
        "checkpoint": pack_dir(folder),
        "reference": reference,
        "trust": {"manifest_sha256": None, "factories": [spec.models[0].factory], "backends": []},
        "selection": selection.to_dict(),
        "precision": record.config.get("precision", "float32"),
    }


@pytest.fixture(scope="module")
def target(ray_session, deployed_sweep):
    actor = ray.remote(DeployWorker).remote({"kind": "cpu", "threads": 1}, "t0")
    yield actor
    ray.kill(actor, no_restart=True)


def deploy(actor, winner, *, checkpoint=None, reference=None, selection=None) -> DeployRecord:
    ref = actor.deploy.remote(
        winner["checkpoint"] if checkpoint is None else checkpoint,
        winner["reference"] if reference is None else reference,
        selection or winner["selection"],
        winner["precision"],
        {},
        LATENCY_S,
        winner["trust"],
    )
    return DeployRecord.from_dict(ray.get(ref, timeout=120))


def assert_still_deploys(actor, winner) -> None:
    """A refusal must not stop the target: the good checkpoint still deploys on the same actor."""
    good = deploy(actor, winner)
    assert good.status == DEPLOYED, good.reason
    assert good.max_abs_err is not None and good.median_ms is not None and good.median_ms > 0


def edited_copy(winner, tmp_path: Path) -> Path:
    copy = tmp_path / "checkpoint"
    shutil.copytree(winner["folder"], copy)
    return copy


def test_good_checkpoint_deploys_on_a_direct_target(target, winner):
    rec = deploy(target, winner)
    assert rec.status == DEPLOYED, rec.reason
    assert rec.target == "t0" and rec.winner_key == winner["selection"]["winner_key"]


def test_checkpoint_for_another_device_class_is_refused(target, winner):
    own = ray.get(target.info.remote())["device_class_key"]
    other = "0" * 64
    rec = deploy(target, winner, selection={**winner["selection"], "device_class_key": other})
    assert rec.status == REFUSED
    assert "device class" in rec.reason and other[:12] in rec.reason and own[:12] in rec.reason
    assert rec.max_abs_err is None and rec.median_ms is None
    assert_still_deploys(target, winner)


def test_corrupted_checkpoint_is_refused_by_its_checksum(target, winner, tmp_path):
    folder = edited_copy(winner, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["artifacts"], "the eager checkpoint should carry its weights as an artifact"
    artifact = folder / manifest["artifacts"][0]["path"]
    data = bytearray(artifact.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + 16, len(data))):
        data[i] ^= 0xFF  # same size, other bytes: only the checksum can tell
    artifact.write_bytes(bytes(data))
    assert artifact.stat().st_size == manifest["artifacts"][0]["size"]
    rec = deploy(target, winner, checkpoint=pack_dir(folder))
    assert rec.status == REFUSED
    assert "SHA-256" in rec.reason and manifest["artifacts"][0]["path"] in rec.reason
    assert rec.median_ms is None
    assert_still_deploys(target, winner)


def test_non_portable_checkpoint_for_another_device_type_is_refused(target, winner, tmp_path):
    folder = edited_copy(winner, tmp_path)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["portable"] = False
    manifest["environment"]["device_type"] = "cuda"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    rec = deploy(target, winner, checkpoint=pack_dir(folder))
    assert rec.status == REFUSED
    assert "device type 'cuda'" in rec.reason and "'cpu'" in rec.reason
    assert rec.median_ms is None
    assert_still_deploys(target, winner)


def test_wrong_reference_outputs_are_refused(target, winner):
    ref = torch.load(io.BytesIO(winner["reference"]), map_location="cpu", weights_only=True)
    ref["outputs"] = [t + 1.0 for t in ref["outputs"]]
    buf = io.BytesIO()
    torch.save(ref, buf)
    rec = deploy(target, winner, reference=buf.getvalue())
    assert rec.status == REFUSED
    assert "outputs differ" in rec.reason
    assert rec.max_abs_err is not None and rec.max_abs_err >= 0.9  # the +1 shows in the recorded error
    assert rec.median_ms is None
    assert_still_deploys(target, winner)


def test_missing_reference_is_refused(target, winner):
    ref = target.deploy.remote(winner["checkpoint"], None, winner["selection"], winner["precision"], {}, LATENCY_S)
    rec = DeployRecord.from_dict(ray.get(ref, timeout=120))
    assert rec.status == REFUSED and "no stored reference" in rec.reason
    assert_still_deploys(target, winner)


def test_bytes_that_are_no_checkpoint_are_refused(target, winner):
    rec = deploy(target, winner, checkpoint=b"not a tar archive at all" * 40)
    assert rec.status == REFUSED
    assert "not a valid checkpoint archive" in rec.reason
    assert_still_deploys(target, winner)
