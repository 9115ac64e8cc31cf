"""Faults on a real local Ray cluster: each is classified, the sweep goes on, nothing is lost."""

from __future__ import annotations

import pytest
import ray

from orchestrator import records as R
from orchestrator.store import SqliteStore
from orchestrator.sweep import run_sweep
from sweep_helpers import EAGER, EAGER_BF16, fault, quiet, tiny_spec

pytestmark = pytest.mark.timeout(600)



@pytest.fixture(scope="module")
def fault_sweep(ray_session, tmp_path_factory):
    store = tmp_path_factory.mktemp("faults") / "store"
    spec = tiny_spec(
        store,
        [
            EAGER,
            EAGER_BF16,
            fault("raise"),
            fault("wrong", "infer"),
            fault("unsupported"),
            fault("hang", seconds=600),
            fault("exit"),
            fault("segfault", "infer"),
        ],
        budgets={"build_timeout_s": 10, "measure_timeout_s": 30},
    )
    outcome = run_sweep(spec, console=quiet(), deploy=False, write_report=False)
    return spec, outcome


def by_fault(outcome):
    out = {}
    for r in outcome.results:
        name = r.config.get("fault", "eager-" + r.config.get("precision", ""))
        out[name] = r
    return out


def test_each_fault_is_classified(fault_sweep):
    _, outcome = fault_sweep
    got = {k: r.status for k, r in by_fault(outcome).items()}
    assert got == {
        "eager-float32": R.OK,
        "eager-bfloat16": R.OK,
        "raise": R.BUILD_ERROR,
        "wrong": R.INCORRECT,
        "unsupported": R.UNSUPPORTED,
        "hang": R.TIMEOUT,
        "exit": R.CRASH,
        "segfault": R.CRASH,
    }


def test_failures_carry_their_evidence(fault_sweep):
    _, outcome = fault_sweep
    rs = by_fault(outcome)
    assert "Traceback" in rs["raise"].error and "injected failure" in rs["raise"].error
    assert "max abs error" in rs["wrong"].error or "exceeds" in rs["wrong"].error
    assert "build phase passed its 10 s timeout" in rs["hang"].error
    assert "died during build" in rs["exit"].error
    assert "died during finish" in rs["segfault"].error
    assert rs["segfault"].error_class is not None
    for r in outcome.results:  # every result says who ran it
        assert r.worker is not None and r.worker.worker_id and r.worker.node_id


def test_incorrect_candidate_never_wins(fault_sweep):
    _, outcome = fault_sweep
    (selection,) = outcome.selections
    assert selection.winner is not None and "FaultBackend" not in selection.winner


def test_dead_and_hung_workers_are_replaced(fault_sweep):
    _, outcome = fault_sweep
    workers = {r.worker.worker_id for r in outcome.results if r.worker}
    # two slots; the hang, the exit and the segfault each cost a worker, whose replacements
    # (new ids) ran the candidates after them
    assert len(workers) >= 3


def test_no_finished_result_is_lost(fault_sweep):
    spec, outcome = fault_sweep
    with SqliteStore(spec.store) as store:
        stored = store.sweep_results(outcome.sweep_id)
        assert {r.key for r in stored} == {r.key for r in outcome.results}
        for r in stored:
            if r.status == R.OK:
                assert store.checkpoint_problem(r) is None


def test_rerun_reuses_every_result(fault_sweep):
    spec, first = fault_sweep
    again = run_sweep(spec, console=quiet(), deploy=False, write_report=False)
    assert again.ran == 0
    assert again.reused == len(first.results)
    assert all(r.from_store for r in again.results)
    assert {r.key: r.status for r in again.results} == {r.key: r.status for r in first.results}
    # nothing new was measured, so the first sweep's decision stands, and says where it was made
    (selection,) = again.selections
    assert selection.winner_key == first.selections[0].winner_key
    assert selection.decided_in == first.sweep_id
    with SqliteStore(spec.store) as store:
        assert all(r.from_store for r in store.sweep_results(again.sweep_id))


def test_force_runs_again(ray_session, tmp_path):
    spec = tiny_spec(tmp_path / "store", [EAGER])
    run_sweep(spec, console=quiet(), deploy=False, write_report=False)
    forced = run_sweep(spec, console=quiet(), deploy=False, write_report=False, force=True)
    assert forced.ran == 1 and forced.reused == 0


def test_ray_is_left_running_for_the_caller(ray_session):
    assert ray.is_initialized()


def test_inputs_the_model_cant_take_fail_each_job_with_its_own_error_and_the_selection_says_why(ray_session, tmp_path):
    models = [{"name": "mlp", "factory": "aitune.examples:mlp", "kwargs": {"width": 16, "depth": 2},
               "inputs": [{"name": "x", "shape": [7]}]}]  # the MLP takes 16 features
    outcome = run_sweep(tiny_spec(tmp_path / "store", [EAGER, EAGER_BF16], models=models), console=quiet(),
                        write_report=False, deploy=False)
    assert {r.status for r in outcome.results} == {R.ERROR}
    assert {r.error_class for r in outcome.results} == {R.REFERENCE_FAILED}
    # the model's own traceback, its error last, not a wrapper's
    assert all(r.error.strip().splitlines()[-1].startswith("RuntimeError: mat1 and mat2 shapes") for r in outcome.results)
    (sel,) = outcome.selections
    assert sel.winner is None
    assert "fails in eager fp32 on the spec's inputs (RuntimeError: mat1 and mat2 shapes" in sel.reason
    assert "check the model's inputs" in sel.reason


def test_a_model_whose_outputs_change_between_calls_is_named_as_not_repeatable(ray_session, tmp_path):
    models = [{"name": "counting", "factory": "orchestrator.sim.fault_backends:stateful_mlp", "kwargs": {"width": 16},
               "inputs": [{"name": "x", "shape": [16]}]}]
    outcome = run_sweep(tiny_spec(tmp_path / "store", [EAGER_BF16], models=models), console=quiet(),
                        write_report=False, deploy=False)
    assert {r.status for r in outcome.results} == {R.INCORRECT}  # eager fp32 too: it can't match its own reference
    (sel,) = outcome.selections
    assert sel.winner is None
    assert sel.reason.startswith("eager fp32, which made the reference, gave other outputs on the same inputs (sample[0]")
    assert "not repeatable" in sel.reason and "buffer it updates" in sel.reason
