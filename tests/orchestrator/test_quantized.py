"""Quantized candidates in a real sweep (real Ray, real torchao on CPU): judged by accuracy gates
instead of the fp32 tolerance, every gate's figure stored and shown, a threshold change re-judged
from stored outputs without a build, and a quantized checkpoint verified by its gates on deploy."""

from __future__ import annotations

import pytest
import ray

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
