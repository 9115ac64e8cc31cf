"""Quantized candidates in a real sweep (real Ray, real torchao on CPU): judged by accuracy gates
instead of the fp32 tolerance, every gate's figure stored and shown, a threshold change re-judged
from stored outputs without a build, a scheme that fails on the whole model rescued by its
per-layer fallback, and a quantized checkpoint verified on a target by its gates.

One sweep (module fixture) serves every test; the threshold test runs a second on a copy of its store."""

from __future__ import annotations

import io
import shutil

import pytest
import ray
from rich.console import Console

from orchestrator import records as R
from orchestrator.outcome.report import render
from sweep_helpers import EAGER, quiet, tiny_spec

pytest.importorskip("torchao", reason="torchao is not installed: pip install -e '.[torchao]' (the test extra has it)")

from orchestrator.deploy.install import DeployWorker, criteria_of_winner  # noqa: E402
from orchestrator.store import SqliteStore  # noqa: E402
from orchestrator.sweep import run_sweep  # noqa: E402

INT8 = {"backend": "TorchAOBackend", "config": {"scheme": "int8_dynamic", "compile": False}}
INT8_WEIGHTS = {"backend": "TorchAOBackend", "config": {"scheme": "int8_weight_only", "compile": False}}
FALLBACK = {"backend": "TorchAOBackend", "config": {"scheme": "int8_dynamic", "compile": False, "fallback": 4}}
MODELS = [
    {"name": "plain", "factory": "aitune.examples:mlp", "kwargs": {"width": 64, "depth": 3},
     "inputs": [{"name": "x", "shape": [64]}]},
    {"name": "outliers", "factory": "aitune.examples:outlier_mlp", "kwargs": {"width": 64},
     "inputs": [{"name": "x", "shape": [64]}]},
]


def _spec(root, **changes):
    return tiny_spec(root / "store", [EAGER, INT8, INT8_WEIGHTS, FALLBACK], models=MODELS, batch_sizes=[8], **changes)


def _key(r):
    return (r.model, "fallback" if r.config.get("fallback") else r.config.get("scheme", "eager"))


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    outcome = run_sweep(_spec(root), console=quiet(), deploy=False, write_report=False)
    return root, outcome, {_key(r): r for r in outcome.results}


@pytest.mark.slow
def test_quantized_candidates_are_judged_by_gates_with_every_figure_kept_and_shown(swept):
    _, outcome, by = swept
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
    # eager is judged by its tolerance as before: no gates
    eager = by[("plain", "eager")]
    assert eager.check.gates is None and eager.check.elementwise is True
    # the table shows each gate's figure against its limit
    console = Console(file=io.StringIO(), width=400)  # wide enough that no cell wraps
    render(console, outcome.results, outcome.selections, [])
    text = console.file.getvalue()
    assert "accuracy gates" in text and ">=30 dB" in text and "sqnr" in text


@pytest.mark.slow
def test_a_scheme_that_fails_on_the_whole_model_passes_with_its_most_sensitive_layer_kept(swept):
    """The outlier model under int8_dynamic fails its gates whole; the fallback finds the layer whose
    int8 activations drown in the outlier and keeps it in full precision: a candidate like any other."""
    _, outcome, by = swept
    mixed = by[("outliers", "fallback")]
    assert by[("outliers", "int8_dynamic")].status == R.INCORRECT
    assert mixed.status == R.OK, mixed.error
    assert mixed.config["fallback_gates"]["sqnr_db"] == 30  # it aims at the gates it is judged by (in its key)
    notes = mixed.context["notes"]
    assert notes["kept_full_precision"] == ["fc2"]
    assert notes["fallback"]["sensitivity"][0][0] == "fc2"  # the most sensitive first
    assert notes["fallback"]["sensitivity"][0][1] < notes["fallback"]["sensitivity"][1][1]
    assert notes["fallback"]["tried"][0][0] == [] and notes["fallback"]["tried"][0][1]  # the whole model, refused
    plain_notes = by[("plain", "fallback")].context["notes"]  # the plain MLP passes whole: it keeps nothing
    assert plain_notes["fallback"]["needed"] is False and plain_notes["kept_full_precision"] == []
    console = Console(file=io.StringIO(), width=400)
    render(console, outcome.results, outcome.selections, [])
    assert "[full precision: fc2]" in console.file.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("key", [("plain", "int8_dynamic"), ("outliers", "fallback")])
def test_a_quantized_checkpoint_is_verified_on_its_target_by_its_gates(swept, key):
    root, _, by = swept
    winner = by[key]
    with SqliteStore(root / "store") as store:
        checkpoint, reference = store.checkpoint_bytes(winner), store.reference_bytes(winner.reference_key)
    selection = {"model": winner.model, "batch_size": 8, "winner_key": winner.key,
                 "device_class_key": winner.device_class_key, "winner": winner.candidate}
    factory = next(m["factory"] for m in MODELS if m["name"] == winner.model)
    trust = {"manifest_sha256": winner.manifest_sha256, "factories": [factory], "backends": []}
    target = ray.remote(DeployWorker).remote({"kind": "cpu", "threads": 1}, "t0")
    try:
        def deploy(criteria):
            return R.DeployRecord.from_dict(ray.get(target.deploy.remote(
                checkpoint, reference, selection, "float32", {}, 0.05, trust, None, criteria), timeout=300))

        by_gates = deploy(criteria_of_winner(_spec(root), winner))  # the same mix, re-quantized on the target
        by_tolerance = deploy(None)  # the fp32 tolerance alone: int8 outputs are outside it
    finally:
        ray.kill(target, no_restart=True)
    assert by_gates.status == R.DeployStatus.DEPLOYED, by_gates.reason
    assert by_tolerance.status == R.DeployStatus.REFUSED and "outputs differ" in by_tolerance.reason


@pytest.mark.slow
def test_a_new_threshold_rejudges_from_the_store_without_building(swept, tmp_path):
    root, _, by = swept
    shutil.copytree(root / "store", tmp_path / "store")  # the other tests keep the first store as it was
    broken = by[("outliers", "int8_dynamic")]
    figure = broken.check.gates["figures"]["sqnr_db"]
    looser = _spec(tmp_path, accuracy={"quantized": {"sqnr_db": float(int(figure) - 1)}})
    again = run_sweep(looser, console=quiet(), deploy=False, write_report=False)
    rejudged = {_key(r): r for r in again.results}
    # nothing built but the fallback candidates: their search aims at the gates, which are in their key
    assert {k for k, r in rejudged.items() if r.how == R.BUILT} == {("plain", "fallback"), ("outliers", "fallback")}
    # judged again from its stored outputs and, now that it passes, measured from its stored checkpoint
    assert rejudged[("outliers", "int8_dynamic")].how == R.How.RECHECKED_REMEASURED
    assert rejudged[("outliers", "int8_dynamic")].status == R.OK
    assert rejudged[("outliers", "int8_dynamic")].measurement is not None
    assert rejudged[("outliers", "int8_dynamic")].check.gates["limits"] == {
        "cosine": None, "sqnr_db": float(int(figure) - 1), "topk_rel_err": None, "topk": 5}
    assert rejudged[("outliers", "int8_dynamic")].check.gates["figures"]["sqnr_db"] == pytest.approx(figure)
    assert rejudged[("plain", "int8_dynamic")].how == R.RECHECKED  # passed before: its stored outputs suffice
    assert rejudged[("plain", "eager")].how == R.REUSED  # its evaluation did not change


TASK = {"samples": "aitune.examples:vector_batches", "metric": "top1_agreement", "min": 0.9}


@pytest.mark.slow
def test_a_task_gate_on_the_users_batches_is_judged_on_workers_and_rejudged_from_its_stored_figure(
        ray_session, tmp_path):
    spec = tiny_spec(tmp_path / "store", [EAGER, INT8, INT8_WEIGHTS], models=MODELS, batch_sizes=[8],
                     accuracy={"task": TASK})
    first = run_sweep(spec, console=quiet(), deploy=False, write_report=False)
    by = {_key(r): r for r in first.results}
    plain, broken = by[("plain", "int8_dynamic")], by[("outliers", "int8_dynamic")]
    task = plain.check.gates["task"]
    assert task["metric"] == "top1_agreement" and task["min"] == 0.9 and task["passed"] is True
    assert 0.9 <= task["figure"] <= 1.0 and len(task["fingerprint"]) == 64
    assert plain.status == R.OK
    assert broken.status == R.INCORRECT and "task top1_agreement" in broken.error  # its argmax drowns too
    assert broken.check.gates["task"]["figure"] < 0.9
    assert by[("plain", "eager")].check.gates is None  # the tolerance alone: no gates, no task gate
    console = Console(file=io.StringIO(), width=400)
    render(console, first.results, first.selections, [])
    assert "task top1_agreement" in console.file.getvalue()

    # a new limit: judged again on the driver from the stored figure (no batches run, nothing loaded)
    strict = tiny_spec(tmp_path / "store", [EAGER, INT8, INT8_WEIGHTS], models=MODELS, batch_sizes=[8],
                       accuracy={"task": {**TASK, "min": 1.01}})
    again = {_key(r): r for r in run_sweep(strict, console=quiet(), deploy=False, write_report=False).results}
    redone = again[("plain", "int8_dynamic")]
    assert redone.how == R.RECHECKED and "load_checkpoint" not in redone.phases
    assert redone.status == R.INCORRECT and redone.check.gates["task"]["figure"] == pytest.approx(task["figure"])
    assert "< 1.01" in redone.error

    # another metric (a user's, by import path) measures another figure: the stored artifact runs the batches again
    other = tiny_spec(tmp_path / "store", [EAGER, INT8, INT8_WEIGHTS], models=MODELS, batch_sizes=[8],
                      accuracy={"task": {**TASK, "metric": "aitune.accuracy:top1_agreement"}})
    third = run_sweep(other, console=quiet(), deploy=False, write_report=False)
    assert third.ran == 0  # nothing built
    rerun = {_key(r): r for r in third.results}[("plain", "int8_dynamic")]
    assert "load_checkpoint" in rerun.phases and rerun.status == R.OK
    assert rerun.check.gates["task"]["metric"] == "aitune.accuracy:top1_agreement"


def test_a_bad_task_gate_is_refused_with_its_field_path(tmp_path):
    from orchestrator.spec.schema import SpecError

    for task, words in (({**TASK, "samples": "nowhere:batches"}, "accuracy.task.samples"),
                        ({**TASK, "metric": "median"}, "accuracy.task.metric"),
                        ({**TASK, "max": 0.5}, "min")):
        with pytest.raises((SpecError, ValueError), match=words):
            tiny_spec(tmp_path / "store", [EAGER, INT8], models=MODELS, accuracy={"task": task})
