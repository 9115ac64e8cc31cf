"""Quantized candidates in a real sweep (real Ray, real torchao on CPU): judged by accuracy gates
instead of the fp32 tolerance, every gate's figure stored and shown, a threshold change re-judged
from stored outputs without a build, and a quantized checkpoint verified by its gates on deploy."""

from __future__ import annotations

import io

import pytest
import ray
from rich.console import Console

from orchestrator import records as R
from orchestrator.outcome.report import render
from sweep_helpers import EAGER, quiet, tiny_spec

pytest.importorskip("torchao", reason="torchao is not installed: pip install -e '.[torchao]' (the test extra has it)")

from orchestrator.sweep import run_sweep  # noqa: E402

INT8 = {"backend": "TorchAOBackend", "config": {"scheme": "int8_dynamic", "compile": False}}
INT8_WEIGHTS = {"backend": "TorchAOBackend", "config": {"scheme": "int8_weight_only", "compile": False}}
MODELS = [
    {"name": "plain", "factory": "aitune.examples:mlp", "kwargs": {"width": 64, "depth": 3},
     "inputs": [{"name": "x", "shape": [64]}]},
    {"name": "outliers", "factory": "aitune.examples:outlier_mlp", "kwargs": {"width": 64},
     "inputs": [{"name": "x", "shape": [64]}]},
]


def _spec(tmp_path, **changes):
    return tiny_spec(tmp_path / "store", [EAGER, INT8, INT8_WEIGHTS], models=MODELS, batch_sizes=[8], **changes)


def _by(outcome):
    return {(r.model, r.config.get("scheme", "eager")): r for r in outcome.results}


@pytest.mark.slow
def test_quantized_candidates_are_judged_by_gates_and_a_new_threshold_rejudges_without_building(ray_session, tmp_path):
    first = run_sweep(_spec(tmp_path), console=quiet(), deploy=False, write_report=False)
    by = _by(first)
    plain, broken, weights = by[("plain", "int8_dynamic")], by[("outliers", "int8_dynamic")], by[("outliers", "int8_weight_only")]
    # the plain MLP passes the default gates though it is far outside the fp32 tolerance
    assert plain.status == R.OK and plain.check.elementwise is False
    assert plain.check.max_abs_err > 1e-4
    figures = plain.check.gates["figures"]
    assert figures["cosine"] >= 0.999 and figures["sqnr_db"] >= 30
    assert plain.check.gates["limits"]["cosine"] == 0.999 and plain.check.gates["limits"]["sqnr_db"] == 30
    # int8 activations destroy the outlier model: refused, with the figure in the reason
    assert broken.status == R.INCORRECT
    assert "cosine" in broken.error and "< 0.999" in broken.error and "sqnr_db" in broken.error
    assert broken.check.gates["figures"]["sqnr_db"] < 30
    assert weights.status == R.OK  # weight-only int8 keeps the activations: it passes
    # eager is judged by its tolerance as before: no gates, and its key did not change
    eager = by[("plain", "eager")]
    assert eager.check.gates is None and eager.check.elementwise is True
    # the table shows each gate's figure against its limit
    console = quiet()
    render(console, first.results, first.selections, [])
    text = console.file.getvalue()
    assert "accuracy gates" in text and "sqnr" in text and ">=30 dB" in text

    # a looser threshold: the broken candidate is judged again from its stored outputs and, now that it
    # passes, measured from its stored checkpoint: nothing is built
    figure = broken.check.gates["figures"]["sqnr_db"]
    looser = _spec(tmp_path, accuracy={"quantized": {"sqnr_db": float(int(figure) - 1)}})
    again = run_sweep(looser, console=quiet(), deploy=False, write_report=False)
    assert again.ran == 0
    rejudged = _by(again)[("outliers", "int8_dynamic")]
    assert rejudged.how == R.How.RECHECKED_REMEASURED and rejudged.status == R.OK
    assert rejudged.measurement is not None
    assert rejudged.check.gates["limits"] == {"cosine": None, "sqnr_db": float(int(figure) - 1),
                                              "topk_rel_err": None, "topk": 5}
    assert rejudged.check.gates["figures"]["sqnr_db"] == pytest.approx(figure)
    assert _by(again)[("plain", "int8_dynamic")].how == R.RECHECKED  # passed before: its stored outputs suffice
    assert _by(again)[("plain", "eager")].how == R.REUSED  # its evaluation did not change


@pytest.mark.slow
def test_a_quantized_checkpoint_is_verified_on_its_target_by_its_gates(ray_session, tmp_path):
    from orchestrator.deploy.install import DeployWorker, criteria_of_winner

    spec = tiny_spec(tmp_path / "store", [EAGER, INT8], models=MODELS[:1], batch_sizes=[8])
    outcome = run_sweep(spec, console=quiet(), deploy=False, write_report=False)
    quantized = next(r for r in outcome.results if r.backend == "TorchAOBackend")
    from orchestrator.store import SqliteStore

    with SqliteStore(tmp_path / "store") as store:
        checkpoint = store.checkpoint_bytes(quantized)
        reference = store.reference_bytes(quantized.reference_key)
    selection = {"model": "plain", "batch_size": 8, "winner_key": quantized.key,
                 "device_class_key": quantized.device_class_key, "winner": quantized.candidate}
    trust = {"manifest_sha256": quantized.manifest_sha256, "factories": ["aitune.examples:mlp"], "backends": []}
    target = ray.remote(DeployWorker).remote({"kind": "cpu", "threads": 1}, "t0")
    try:
        def deploy(criteria):
            return R.DeployRecord.from_dict(ray.get(target.deploy.remote(
                checkpoint, reference, selection, "float32", {}, 0.05, trust, None, criteria), timeout=300))

        by_gates = deploy(criteria_of_winner(spec, quantized))
        by_tolerance = deploy(None)  # the fp32 tolerance alone: int8 outputs are outside it
    finally:
        ray.kill(target, no_restart=True)
    assert by_gates.status == R.DeployStatus.DEPLOYED, by_gates.reason
    assert by_tolerance.status == R.DeployStatus.REFUSED and "outputs differ" in by_tolerance.reason


@pytest.mark.slow
def test_a_scheme_that_fails_on_the_whole_model_passes_with_its_most_sensitive_layer_kept(ray_session, tmp_path):
    """The outlier model under int8_dynamic: the whole model fails its gates; the fallback finds
    the layer whose int8 activations drown in the outlier, keeps it in full precision, and the
    result is a candidate like any other: stored with that choice, shown, and deployable."""
    from orchestrator.deploy.install import DeployWorker, criteria_of_winner
    from orchestrator.store import SqliteStore

    fallback = {"backend": "TorchAOBackend", "config": {"scheme": "int8_dynamic", "compile": False, "fallback": 4}}
    spec = tiny_spec(tmp_path / "store", [EAGER, INT8, fallback], models=MODELS[1:], batch_sizes=[8])
    outcome = run_sweep(spec, console=quiet(), deploy=False, write_report=False)
    whole = next(r for r in outcome.results if r.backend == "TorchAOBackend" and not r.config.get("fallback"))
    mixed = next(r for r in outcome.results if r.config.get("fallback"))
    assert whole.status == R.INCORRECT
    assert mixed.status == R.OK, mixed.error
    # the gates it aimed for are the ones it is judged by (and part of its key)
    assert mixed.config["fallback_gates"]["sqnr_db"] == 30
    notes = mixed.context["notes"]
    assert notes["kept_full_precision"] == ["fc2"]
    assert notes["fallback"]["sensitivity"][0][0] == "fc2"  # the most sensitive first
    assert notes["fallback"]["sensitivity"][0][1] < notes["fallback"]["sensitivity"][1][1]
    assert notes["fallback"]["tried"][0][0] == [] and notes["fallback"]["tried"][0][1]  # the whole model, refused
    console = Console(file=io.StringIO(), width=400)  # wide enough that no cell wraps
    render(console, outcome.results, outcome.selections, [])
    assert "[full precision: fc2]" in console.file.getvalue()

    with SqliteStore(tmp_path / "store") as store:
        checkpoint, reference = store.checkpoint_bytes(mixed), store.reference_bytes(mixed.reference_key)
    selection = {"model": "outliers", "batch_size": 8, "winner_key": mixed.key,
                 "device_class_key": mixed.device_class_key, "winner": mixed.candidate}
    trust = {"manifest_sha256": mixed.manifest_sha256, "factories": ["aitune.examples:outlier_mlp"], "backends": []}
    target = ray.remote(DeployWorker).remote({"kind": "cpu", "threads": 1}, "t0")
    try:
        record = R.DeployRecord.from_dict(ray.get(target.deploy.remote(
            checkpoint, reference, selection, "float32", {}, 0.05, trust, None, criteria_of_winner(spec, mixed)),
            timeout=300))
    finally:
        ray.kill(target, no_restart=True)
    assert record.status == R.DeployStatus.DEPLOYED, record.reason  # the same mix, re-quantized on the target
