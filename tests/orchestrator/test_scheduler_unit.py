"""The scheduler driven through the WorkerPool seam, without Ray: an in-process pool of scripted workers."""

from __future__ import annotations

import itertools
import time

import pytest

from cluster.placement import Slot
from orchestrator import records as R
from orchestrator.pool import CallFailed, WorkerDied, WorkerPool
from orchestrator.records import Job, ResultRecord, WorkerInfo
from orchestrator.scheduler import JobGate, Limits, Scheduler

DC = "d" * 64
PENDING = object()


class ScriptedPool(WorkerPool):
    """Each job's candidate name says how its worker behaves: ok, raise, die, hang."""

    def __init__(self) -> None:
        self.refs = itertools.count()
        self.values: dict[int, object] = {}
        self.spawned: list[str] = []
        self.killed: list[str] = []
        self.loads: set[tuple[str, str]] = set()  # (worker, model): a worker loads a model on its first job of it

    def spawn(self, slot, worker_id, spec):
        self.spawned.append(worker_id)
        ref = next(self.refs)
        self.values[ref] = WorkerInfo(worker_id, "node", "host", 1, "cpu", {"device_type": "cpu"}, DC, 1).to_dict()
        return worker_id, ref

    def call(self, handle, method, *args):
        ref = next(self.refs)
        job = Job.from_dict(args[0])
        behaviour = job.candidate
        self.loads.add((handle, job.model))
        if behaviour == "hang" or (behaviour == "hang-finish" and method == "finish"):
            self.values[ref] = PENDING
        elif behaviour == "die":
            self.values[ref] = WorkerDied("worker process exited")
        elif behaviour == "raise":
            self.values[ref] = CallFailed("boom", "RuntimeError")
        elif method == "build":
            built = R.result_for(job, R.OK)
            built.phases = {"build": 0.01}
            self.values[ref] = built.to_dict()
        else:
            record = R.result_for(job, R.OK)
            record.worker = WorkerInfo(handle, "node", "host", 1, "cpu", {}, DC, 1)
            self.values[ref] = (record.to_dict(), b"ckpt", None, None)
        return ref

    def wait(self, refs, timeout):
        ready = [r for r in refs if self.values.get(r) is not PENDING]
        if not ready:
            time.sleep(min(timeout, 0.05))
        return ready[:1]

    def get(self, ref):
        value = self.values.pop(ref)
        if isinstance(value, Exception):
            raise value
        return value

    def kill(self, handle):
        self.killed.append(handle)

    def node_alive(self, node_id):
        return True


def job(name: str, model: str = "m") -> Job:
    return Job(key=f"k-{name}", model=model, batch_size=1, backend="B", config={}, candidate=name,
               device_class_key=DC, model_fingerprint="f")


def run(names, limits=None, gate=None, slots=2):
    pool = ScriptedPool()
    committed: list[ResultRecord] = []

    def commit(record, checkpoint, outputs, reference):
        committed.append(record)
        return record

    sched = Scheduler([Slot(i, "cpu", 1, 0, 1, f"cpu{i}") for i in range(slots)], {}, limits or Limits(5, 5),
                      on_result=commit, pool=pool)
    sched.start_workers()
    results = sched.run([job(n) for n in names], gate=gate)
    return results, committed, pool


def test_every_job_gets_exactly_one_committed_result():
    results, committed, _ = run(["ok", "raise", "die", "ok2"])
    assert sorted(r.key for r in results) == sorted(r.key for r in committed) == ["k-die", "k-ok", "k-ok2", "k-raise"]
    status = {r.candidate: r.status for r in results}
    assert status == {"ok": R.OK, "ok2": R.OK, "raise": R.ERROR, "die": R.CRASH}


def test_a_dead_worker_is_replaced_and_the_rest_still_runs():
    results, _, pool = run(["die", "ok", "ok2", "ok3"], slots=1)
    assert [r.status for r in results].count(R.OK) == 3
    assert len(pool.spawned) == 2 and len(pool.killed) >= 1


def test_a_hung_phase_times_out_and_its_worker_is_killed():
    results, _, pool = run(["hang-finish", "ok"], limits=Limits(5, 0.3), slots=1)
    hung = next(r for r in results if r.candidate == "hang-finish")
    assert hung.status == R.TIMEOUT and "finish phase passed" in hung.error
    assert pool.killed and any(r.status == R.OK for r in results)


def test_the_total_budget_skips_what_has_not_started():
    results, _, _ = run(["hang", "a", "b"], limits=Limits(0.5, 5, total_s=0.2), slots=1)
    assert {r.candidate: r.status for r in results} == {"hang": R.TIMEOUT, "a": R.SKIPPED, "b": R.SKIPPED}


class OtherDriver(JobGate):
    """Another driver holds ``held``; its result appears after two polls."""

    def __init__(self, held: str) -> None:
        self.held, self.polls = held, 0

    def admit(self, j):
        return j.key != self.held

    def poll(self, deferred):
        self.polls += 1
        if self.polls < 2:
            return [], []
        record = R.result_for(deferred[0], R.OK)
        record.how = R.REUSED
        return [record], []


def test_a_key_another_driver_holds_is_waited_for_and_taken_not_built():
    gate = OtherDriver("k-shared")
    results, committed, _ = run(["shared", "ok"], gate=gate, slots=1)
    shared = next(r for r in results if r.key == "k-shared")
    assert shared.how == R.REUSED and gate.polls >= 2
    assert [r.key for r in committed] == ["k-ok"]  # only what this driver built was committed by it


def test_a_deferred_key_whose_claim_expired_is_built_here():
    class Expired(JobGate):
        def admit(self, j):
            return False if not getattr(self, "seen", False) else True

        def poll(self, deferred):
            self.seen = True
            return [], list(deferred)

    results, committed, _ = run(["ok"], gate=Expired(), slots=1)
    assert [r.how for r in results] == [R.BUILT] and len(committed) == 1


@pytest.mark.parametrize("slots", [1, 3])
def test_no_job_is_lost_whatever_the_number_of_workers(slots):
    names = [f"ok{i}" for i in range(10)] + ["die", "raise"]
    results, committed, _ = run(names, slots=slots)
    assert sorted(r.key for r in results) == sorted(f"k-{n}" for n in names)


def test_workers_keep_to_the_models_they_hold():
    # 3 models x 5 candidates, queued model by model as the plan makes them, on 2 workers.
    pool = ScriptedPool()
    sched = Scheduler([Slot(i, "cpu", 1, 0, 1, f"cpu{i}") for i in range(2)], {}, Limits(5, 5),
                      on_result=lambda record, *rest: record, pool=pool)
    sched.start_workers()
    jobs = [job(f"ok-{m}-{c}", model=m) for m in ("a", "b", "c") for c in range(5)]
    results = sched.run(jobs)
    assert sorted(r.key for r in results) == sorted(j.key for j in jobs)
    # First in, first out would hand the 2 workers alternate jobs: each would load all 3 models
    # (6 loads). Two busy workers over 3 models need at least 4: one model each, and one shared.
    assert len(pool.loads) == 4
    per_worker = {w: {m for ww, m in pool.loads if ww == w} for w, _ in pool.loads}
    assert sorted(len(models) for models in per_worker.values()) == [2, 2]
