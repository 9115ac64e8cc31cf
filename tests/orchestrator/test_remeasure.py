"""Re-measuring near-ties after a sweep: groups side by side on the idle workers, on real Ray actors.

The dispatch tests use small stand-in actors with the TuneWorker's start-up answer (``info``) and
calls that sleep, hang or fail, so that what is asserted is the scheduler's dispatch, not torch
timings; the last test is a whole sweep with real workers and a real store.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray
from ray import cloudpickle

from cluster.placement import Slot
from orchestrator.worker.ray_pool import RayPool
from orchestrator.records import WorkerInfo
from orchestrator.dispatch.scheduler import Limits, Scheduler

pytestmark = pytest.mark.timeout(120)

DC = "c" * 64


class StandIn:
    def __init__(self, slot, spec, worker_id) -> None:
        self.worker_id = worker_id

    def info(self) -> dict:
        return WorkerInfo(self.worker_id, "node", "host", os.getpid(), "cpu", {}, DC, 1).to_dict()

    def work(self, seconds: float) -> tuple[str, float, float]:
        start = time.time()
        time.sleep(seconds)
        return self.worker_id, start, time.time()

    def hang(self) -> None:
        time.sleep(3600)

    def fail(self) -> None:
        raise ValueError("this call fails")


@pytest.fixture()
def scheduler(ray_session):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers can't import a test module
    pool = RayPool(ray.remote(max_restarts=0, max_task_retries=0)(StandIn))
    sched = Scheduler([Slot(i, "cpu", 1, 0, 1, f"cpu{i}") for i in range(2)], {}, Limits(5, 5),
                      on_result=lambda r, *a: r, pool=pool)
    sched.start_workers()
    yield sched
    sched.shutdown()


def call(method, *args, prefer=None):
    return DC, prefer, lambda: (method, args)


def test_entries_run_side_by_side_on_the_idle_workers_and_the_preferred_one_is_taken(scheduler):
    answers = scheduler.call_idle({"a": call("work", 1.0, prefer="cpu1-1"), "b": call("work", 1.0),
                                   "c": call("work", 0.1)}, timeout_s=30)
    (wa, sa, ea), (wb, sb, eb), (wc, sc, ec) = answers["a"], answers["b"], answers["c"]
    assert wa == "cpu1-1" and wb == "cpu0-0"  # a on the worker it asked for, b on the other one
    assert sa < eb and sb < ea  # at the same time, not one after the other
    assert sc >= min(ea, eb) - 0.05  # c waited for a free worker: one call per worker at a time


def test_a_failing_call_or_argument_or_class_fails_its_own_entry_only(scheduler):
    def broken():
        raise OSError("checkpoint unreadable")

    answers = scheduler.call_idle({"fails": call("fail"), "args": (DC, None, broken), "elsewhere": ("e" * 64, None, broken),
                                   "fine": call("work", 0.0)}, timeout_s=30)
    assert "this call fails" in str(answers["fails"])
    assert isinstance(answers["args"], OSError)
    assert isinstance(answers["elsewhere"], LookupError) and "no idle worker" in str(answers["elsewhere"])
    assert answers["fine"][0] in ("cpu0-0", "cpu1-1")
    assert len(scheduler.workers) == 2  # a call that failed leaves its worker standing


def test_a_hanging_call_times_out_and_its_worker_takes_nothing_more(scheduler):
    start = time.monotonic()
    answers = scheduler.call_idle({"hangs": call("hang", prefer="cpu0-0"), "one": call("work", 0.2),
                                   "two": call("work", 0.2)}, timeout_s=2)
    assert time.monotonic() - start < 300  # the deadline, not the hour-long hang (no speed: a bound)
    assert isinstance(answers["hangs"], TimeoutError) and "cpu0-0" in str(answers["hangs"])
    assert answers["one"][0] == answers["two"][0] == "cpu1-1"
    assert list(scheduler.workers) == ["cpu1-1"]  # the hung one is gone


def test_a_sweep_decides_in_rounds_and_a_checkpoint_damaged_meanwhile_keeps_the_first_figures(
        ray_session, tmp_path, monkeypatch, caplog):
    """Real sweep: FaultBackend(fault=none) runs the module eagerly, so each group's candidates are
    near-ties, decided in interleaved rounds; one group's checkpoint is damaged on disk after tuning."""
    from aitune.checkpoint import MANIFEST
    from orchestrator.sweep import session as sweep_module
    from orchestrator.sweep import run_sweep
    from sweep_helpers import EAGER, fault, quiet, tiny_spec

    same = [EAGER, {**fault("none"), "config": {**fault("none")["config"], "tag": "a"}},
            {**fault("none"), "config": {**fault("none")["config"], "tag": "b"}}]
    models = [{"name": f"m{i}", "factory": "aitune.examples:mlp", "kwargs": {"width": 16, "depth": 2, "seed": i},
               "inputs": [{"name": "x", "shape": [16]}]} for i in range(2)]
    spec = tiny_spec(tmp_path / "store", same, models=models)
    real = sweep_module.choose_winners
    damaged = []

    def damage_then_choose(results, *args, **kwargs):
        victim = next(r for r in results if r.model == "m1" and r.checkpoint)
        (tmp_path / "store" / victim.checkpoint / MANIFEST).write_text("{}")  # no longer the hash the store keeps
        damaged.append(victim.key)
        return real(results, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "choose_winners", damage_then_choose)
    with caplog.at_level("WARNING", logger="orchestrator.sweep"):
        outcome = run_sweep(spec, console=quiet(), write_report=False, deploy=False)
    by_model = {s.model: s for s in outcome.selections}
    m0 = by_model["m0"]
    assert m0.remeasured is True and "interleaved rounds" in m0.reason
    d = m0.decision
    assert d["stop"] in ("resolved", "tie", "cap") and d["rounds"] >= d["rule"]["min_rounds"]
    assert sorted(d["times_ms"]) == sorted(d["contenders"]) and len(d["contenders"]) == 3
    assert all(len(t) == d["rounds"] for t in d["times_ms"].values())
    assert 0 <= d["p_best"] <= 1 and d["load"]
    # the three run the same module (the others through a wrapper), eager first in the rounds; which
    # one wins depends on the machine's load during the rounds (a busy machine can tilt three equals)
    eager_key = next(r.key for r in outcome.results if r.model == "m0" and r.backend == "TorchEagerBackend")
    assert d["contenders"][0] == eager_key and m0.winner_key in d["contenders"]
    # m1's checkpoint could not be read back: its first measurements decide, and the reason and log say why
    assert by_model["m1"].remeasured is False and by_model["m1"].winner is not None
    assert by_model["m1"].decision["stop"] == "screening" and "first measurements alone" in by_model["m1"].reason
    assert any("no decision rounds for m1" in m and damaged[0][:12] in m for m in caplog.messages)
