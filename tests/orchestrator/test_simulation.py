"""The real scheduler over a simulated cluster (no Ray, a simulated clock): nothing is lost, faults
are classified, and a lost node's jobs are retried on other nodes."""

from __future__ import annotations

import collections

import pytest

from orchestrator import records as R
from orchestrator.sim.sweep import gpu_slots, run_simulation
from orchestrator.sim.pool import SimClock, SimNode, SimulatedPool, Timing
from orchestrator.records import Job
from orchestrator.dispatch.scheduler import Limits, Scheduler


@pytest.fixture(scope="module")
def faulty():
    """50 workers on 10 nodes, 2,000 jobs over 20 models, 1% crashing candidates, 2 nodes lost."""
    return run_simulation(nodes=10, devices_per_node=5, jobs=2000, models=20, crash_rate=0.01, node_losses=2,
                          seed=3, high_s=20.0)


def test_every_job_has_exactly_one_result(faulty):
    assert faulty.lost == []
    assert len(faulty.results) == len(faulty.jobs)


def test_crashing_candidates_are_crashes_and_only_they(faulty):
    status = {r.key: r.status for r in faulty.results}
    crashed = set(faulty.pool.crashed)
    assert crashed, "the run was meant to have crashing candidates"
    assert {k for k, s in status.items() if s == R.CRASH} == crashed
    assert all(status[k] == R.OK for k in status if k not in crashed)


def test_a_lost_nodes_jobs_are_retried_on_other_nodes(faulty):
    lost_nodes = set(faulty.pool.lost)
    in_flight = {k for keys in faulty.pool.lost.values() for k in keys}
    assert len(lost_nodes) == 2 and in_flight
    by_key = {r.key: r for r in faulty.results}
    for node, keys in faulty.pool.lost.items():
        for key in set(keys) - set(faulty.pool.crashed):
            record = by_key[key]
            assert record.status == R.OK and record.attempts >= 2
            assert record.worker.node_id != node
    assert R.INFRA not in {r.status for r in faulty.results}


def test_replacement_nodes_take_the_lost_workers_places(faulty):
    # The fresh nodes the simulated autoscaler brought up ran jobs: the lost workers were replaced.
    fresh = {n for n in faulty.pool.nodes if n not in {f"node-{i}" for i in range(10)}}
    assert len(fresh) == 2
    assert any(r.worker.node_id in fresh for r in faulty.results if r.worker)


def test_workers_keep_to_their_models():
    outcome = run_simulation(nodes=2, devices_per_node=4, jobs=400, models=4, seed=1, high_s=5.0)
    assert outcome.lost == []
    # 8 workers over 4 models: about two workers per model, far from every worker loading every model.
    assert len(outcome.pool.pairs) <= 16 < 8 * 4


def test_a_device_class_gets_only_its_own_workers():
    outcome = run_simulation(nodes=4, devices_per_node=3, jobs=300, models=3, classes=["sim-A", "sim-B"], seed=2,
                             high_s=5.0)
    assert outcome.lost == []
    assert all(r.worker.device_class_key == r.device_class_key for r in outcome.results)
    assert collections.Counter(r.device_class_key for r in outcome.results) == {"sim-A": 150, "sim-B": 150}


def _one_worker_order(lengths: dict[str, float], estimate) -> list[str]:
    clock = SimClock()
    timings = {k: Timing(s, 0.1) for k, s in lengths.items()}
    pool = SimulatedPool(clock, [SimNode("n0", "dc", 1)], timings, charge_driver=False)
    sched = Scheduler(gpu_slots(1), {}, Limits(100, 100), on_result=lambda r, *a: r, pool=pool, clock=clock)
    sched.start_workers()
    jobs = [Job(key=k, model="m", batch_size=1, backend="Sim", config={}, candidate=k, device_class_key="dc",
                model_fingerprint="f") for k in lengths]
    return [r.key for r in sched.run(jobs, estimate=estimate)]


def test_with_estimates_the_longest_jobs_go_first_else_first_in_first_out():
    lengths = {f"j{i}": float(s) for i, s in enumerate([1, 5, 3, 4, 2])}
    assert _one_worker_order(lengths, lambda j: lengths[j.key]) == ["j1", "j3", "j2", "j4", "j0"]
    assert _one_worker_order(lengths, None) == list(lengths)


def test_other_workers_go_on_while_a_crash_waits_out_its_grace():
    # Worker A's candidate crashes within 1 s; whether its node is gone is known only after the
    # grace (2 s). Worker B's six 0.6 s jobs must not wait for that: in simulated time B is done
    # at 3.6 s, not 2 s later.
    clock = SimClock()
    timings = {"crash": Timing(1.0, 0.1), **{f"ok{i}": Timing(0.5, 0.1) for i in range(6)}}
    pool = SimulatedPool(clock, [SimNode("n0", "dc", 2)], timings, crash_keys={"crash"}, charge_driver=False, load_s=0.0,
                         start_s=0.5)
    # prefetch 0: nothing queued behind the crash, so it is judged at once, not run again alone
    sched = Scheduler(gpu_slots(2), {}, Limits(100, 100), on_result=lambda r, *a: r, pool=pool, clock=clock,
                      prefetch=0)
    sched.start_workers()
    pool.start_s = 100.0  # A's replacement comes too late to help: B runs every ok job alone
    t0 = clock.now()
    jobs = [Job(key=k, model=k, batch_size=1, backend="Sim", config={}, candidate=k, device_class_key="dc",
                model_fingerprint="f") for k in timings]
    finished_at = {}
    sched.events.result = lambda record: finished_at.setdefault(record.key, clock.now() - t0)
    results = sched.run(jobs)
    assert {r.key: r.status for r in results}["crash"] == R.CRASH
    assert finished_at["crash"] >= 2.0  # classified only after the grace
    ok_done = max(t for k, t in finished_at.items() if k != "crash")
    assert ok_done == pytest.approx(3.6)


def test_a_simulated_worker_runs_its_calls_one_after_another():
    # As a Ray actor does: a call made while the worker is busy starts when the one before ends.
    clock = SimClock()
    pool = SimulatedPool(clock, [SimNode("n0", "dc", 1)], {"a": Timing(1.0, 0.5), "b": Timing(2.0, 0.5)},
                         charge_driver=False, load_s=0.0, start_s=0.0)
    worker, start = pool.spawn(gpu_slots(1)[0], "w0", {})
    assert pool.wait([start], 1.0) == [start]
    pool.get(start)
    job_a = {"key": "a", "model": "m"}
    job_b = {"key": "b", "model": "m"}
    refs = [pool.call(worker, "build", job_a), pool.call(worker, "finish", job_a), pool.call(worker, "build", job_b)]
    done_at = []
    for ref in refs:
        assert pool.wait([ref], 10.0) == [ref]
        done_at.append(clock.now())
    assert done_at == pytest.approx([1.0, 1.5, 3.5])


def test_a_crash_with_calls_queued_behind_it_is_judged_only_once_it_ran_alone():
    # With calls queued on a worker, the answer of one that had just ended can die with the
    # process: the dying call may be innocent. Every job the worker held runs again alone; only a
    # job that kills its worker alone is a crash, and the others are not blamed.
    clock = SimClock()
    timings = {"crash": Timing(1.0, 0.1), **{f"ok{i}": Timing(0.5, 0.1) for i in range(6)}}
    pool = SimulatedPool(clock, [SimNode("n0", "dc", 1)], timings, crash_keys={"crash"}, charge_driver=False, load_s=0.0,
                         start_s=0.5, seed=5)
    sched = Scheduler(gpu_slots(1), {}, Limits(100, 100), on_result=lambda r, *a: r, pool=pool, clock=clock)
    sched.start_workers()
    jobs = [Job(key=k, model="m", batch_size=1, backend="Sim", config={}, candidate=k, device_class_key="dc",
                model_fingerprint="f") for k in timings]
    results = sched.run(jobs)
    status = {r.key: r.status for r in results}
    assert sorted(status) == sorted(timings)
    assert status.pop("crash") == R.CRASH and set(status.values()) == {R.OK}
    assert pool.crashed == ["crash", "crash"]  # once with its finish and the next job queued, once alone
