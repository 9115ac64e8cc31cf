"""The scheduler driven through the WorkerPool seam, without Ray: an in-process pool of scripted workers."""

from __future__ import annotations

import itertools
import time

import pytest

from cluster.placement import Slot
from orchestrator import records as R
from orchestrator.dispatch.pool import CallFailed, WorkerDied, WorkerPool
from orchestrator.records import Job, ResultRecord, WorkerInfo
from orchestrator.dispatch.scheduler import JobGate, Limits, Scheduler
from orchestrator.dispatch.start_cost import StartCost

DC = "d" * 64
PENDING = object()


class ScriptedPool(WorkerPool):
    """Each job's candidate name says how its worker behaves: ok, raise, die, hang (-finish: in that call only),
    late-finish (its finish answers 0.5 s after it was sent)."""

    def __init__(self) -> None:
        self.refs = itertools.count()
        self.values: dict[int, object] = {}
        self.ready_at: dict[int, float] = {}
        self.cancelled: list[int] = []
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
        elif behaviour == "die" or (behaviour == "die-finish" and method == "finish"):
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
            if behaviour == "late-finish":
                self.ready_at[ref] = time.monotonic() + 0.5
        return ref

    def cancel(self, ref):
        self.cancelled.append(ref)

    def wait(self, refs, timeout):
        now = time.monotonic()
        ready = [r for r in refs if self.values.get(r) is not PENDING and self.ready_at.get(r, 0) <= now]
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


def _jobs(*groups):
    """One model's jobs: ``n`` of each (backend, name), named ``ok-<name><i>`` (they succeed)."""
    return [Job(key=f"k-{name}{i}", model="m", batch_size=1, backend=backend, config={}, candidate=f"ok-{name}{i}",
                device_class_key=DC, model_fingerprint="f") for backend, name, n in groups for i in range(n)]


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
    # "die" kills its worker twice: once with calls queued behind it (which call killed it is not
    # known), once alone (a crash); each time the worker is replaced.
    assert len(pool.spawned) == 3 and len(pool.killed) >= 2


def test_a_hung_phase_times_out_and_its_worker_is_killed():
    results, _, pool = run(["hang-finish", "ok"], limits=Limits(5, 0.3), slots=1)
    hung = next(r for r in results if r.candidate == "hang-finish")
    assert hung.status == R.TIMEOUT and "finish phase passed" in hung.error
    assert pool.killed and any(r.status == R.OK for r in results)


def test_the_total_budget_skips_what_has_not_started():
    results, _, _ = run(["hang", "a", "b"], limits=Limits(0.5, 5, total_s=0.2), slots=1)
    assert {r.candidate: r.status for r in results} == {"hang": R.TIMEOUT, "a": R.SKIPPED, "b": R.SKIPPED}


def test_a_job_sent_ahead_but_not_started_when_the_total_budget_runs_out_is_taken_back_and_skipped():
    # "a" is sent ahead while late-finish measures; the budget runs out before late-finish answers.
    pool = RecordingPool()
    sched = Scheduler([Slot(0, "cpu", 1, 0, 1, "cpu0")], {}, Limits(5, 5, total_s=0.2),
                      on_result=lambda r, *a: r, pool=pool)
    sched.start_workers()
    sent: list[dict] = []
    call = pool.call
    pool.call = lambda handle, method, *args: (method == "build" and sent.append(args[0])) or call(handle, method, *args)
    began = time.time()
    results = sched.run([job(n) for n in ("late-finish", "a", "b")])
    assert {r.candidate: r.status for r in results} == {"late-finish": R.OK, "a": R.SKIPPED, "b": R.SKIPPED}
    sent_a = [ref for ref, (_, method, key) in pool.calls.items() if key == "k-a"]
    assert len(sent_a) == 2 and sorted(pool.cancelled) == sorted(sent_a)  # its build and its finish
    assert ("get", "cpu0-0", "build", "k-a") not in pool.log
    # Where a pool can't cancel (a call already on its way), the worker skips its build by this deadline.
    assert sent and all(began < d["start_by"] <= time.time() + 0.2 for d in sent)


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


def started(pool, slots: int = 1, on_result=lambda record, *rest: record, **kwargs) -> Scheduler:
    """A scheduler over ``pool`` with ``slots`` CPU workers, started."""
    sched = Scheduler([Slot(i, "cpu", 1, 0, 1, f"cpu{i}") for i in range(slots)], {}, Limits(5, 5),
                      on_result=on_result, pool=pool, **kwargs)
    sched.start_workers()
    return sched


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


class RecordingPool(ScriptedPool):
    """A scripted pool that also keeps the order of calls sent and answers taken."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str, str, str]] = []  # (what, worker, method, job key)
        self.calls: dict[int, tuple[str, str, str]] = {}

    def call(self, handle, method, *args):
        ref = super().call(handle, method, *args)
        self.calls[ref] = (handle, method, args[0]["key"])
        self.log.append(("call", handle, method, args[0]["key"]))
        return ref

    def get(self, ref):
        if ref in self.calls:
            self.log.append(("get", *self.calls[ref]))
        return super().get(ref)


def run_recorded(names, slots=1, limits=None):
    pool = RecordingPool()
    sched = Scheduler([Slot(i, "cpu", 1, 0, 1, f"cpu{i}") for i in range(slots)], {}, limits or Limits(5, 5),
                      on_result=lambda record, *rest: record, pool=pool)
    sched.start_workers()
    return sched.run([job(n) for n in names]), pool


def test_a_busy_worker_is_sent_its_next_job_before_its_current_one_answers():
    results, pool = run_recorded(["ok1", "ok2", "ok3"])
    assert [r.status for r in results] == [R.OK] * 3
    log = pool.log
    # A build job's finish goes with its build, and job 2's build before job 1's finish is taken.
    assert log.index(("call", "cpu0-0", "finish", "k-ok1")) < log.index(("get", "cpu0-0", "build", "k-ok1"))
    assert log.index(("call", "cpu0-0", "build", "k-ok2")) < log.index(("get", "cpu0-0", "finish", "k-ok1"))
    # Only while more jobs wait than there are workers: the last one waits for a free worker.
    assert log.index(("call", "cpu0-0", "build", "k-ok3")) > log.index(("get", "cpu0-0", "finish", "k-ok1"))


def test_no_job_is_sent_ahead_with_prefetch_off():
    pool = RecordingPool()
    sched = Scheduler([Slot(0, "cpu", 1, 0, 1, "cpu0")], {}, Limits(5, 5), on_result=lambda r, *a: r, pool=pool,
                      prefetch=0)
    sched.start_workers()
    sched.run([job(n) for n in ("ok1", "ok2", "ok3")])
    log = pool.log
    assert log.index(("call", "cpu0-0", "build", "k-ok2")) > log.index(("get", "cpu0-0", "finish", "k-ok1"))


def test_a_job_sent_ahead_to_a_worker_that_dies_runs_again_elsewhere_not_as_a_crash():
    results, pool = run_recorded(["die-finish", "ok1", "ok2"])
    by_name = {r.candidate: r for r in results}
    assert by_name["die-finish"].status == R.CRASH and "during finish" in by_name["die-finish"].error
    assert by_name["ok1"].status == by_name["ok2"].status == R.OK
    sent = [(w, key) for what, w, method, key in pool.log if what == "call" and method == "build"]
    # ok1 went to the first worker while the dying job measured, then again to a replacement.
    assert ("cpu0-0", "k-ok1") in sent and sum(key == "k-ok1" for _, key in sent) == 2
    assert by_name["ok1"].attempts == by_name["ok2"].attempts  # a job that never started is not retried


def test_no_job_is_sent_ahead_of_a_running_build():
    # A build may take minutes: a job queued behind it would wait while another worker idles.
    results, pool = run_recorded(["hang", "ok1", "ok2"], limits=Limits(0.3, 5))
    sent = [(w, key) for what, w, method, key in pool.log if what == "call" and method == "build"]
    assert [key for w, key in sent if w == "cpu0-0"] == ["k-hang"]


def test_the_finish_of_a_failed_build_is_never_waited_on():
    results, pool = run_recorded(["raise", "ok1", "ok2"])
    assert {r.candidate: r.status for r in results} == {"raise": R.ERROR, "ok1": R.OK, "ok2": R.OK}
    # The build raised: its finish was sent with it, but its answer is never taken.
    assert ("call", "cpu0-0", "finish", "k-raise") in pool.log
    assert ("get", "cpu0-0", "finish", "k-raise") not in pool.log
    assert len(pool.spawned) == 1  # a failed call is not a dead worker


def test_a_job_sent_ahead_of_a_hung_measurement_runs_on_the_replacement():
    results, pool = run_recorded(["hang-finish", "ok1", "ok2"], limits=Limits(5, 0.3))
    by_name = {r.candidate: r for r in results}
    assert by_name["hang-finish"].status == R.TIMEOUT and "finish phase passed" in by_name["hang-finish"].error
    assert by_name["ok1"].status == by_name["ok2"].status == R.OK
    sent = [(w, key) for what, w, method, key in pool.log if what == "call" and method == "build"]
    assert ("cpu0-0", "k-ok1") in sent and ("cpu0-1", "k-ok1") in sent  # sent ahead, then run elsewhere
    assert pool.killed == ["cpu0-0"]


class Follows(JobGate):
    """Holds ``k-follow`` until ``k-head``'s result is committed, as a family gate holds a follower."""

    def __init__(self, committed: list) -> None:
        self.committed, self.polls = committed, 0

    def admit(self, j):
        return j.key != "k-follow" or self._head_done()

    def _head_done(self):
        return any(r.key == "k-head" for r in self.committed)

    def poll(self, deferred):
        self.polls += 1
        return [], [j for j in deferred if self._head_done()]


def test_a_job_held_for_another_result_starts_when_that_result_comes_not_at_the_next_poll(monkeypatch):
    import orchestrator.dispatch.scheduler as S

    monkeypatch.setattr(S, "POLL_S", 60.0)  # were it only polled on the clock, it would wait a minute
    committed: list[ResultRecord] = []
    sched = started(ScriptedPool(), on_result=lambda record, *rest: committed.append(record) or record)
    gate = Follows(committed)
    start = time.monotonic()
    results = sched.run([job("follow"), job("head")], gate=gate)
    assert sorted(r.key for r in results) == ["k-follow", "k-head"] and all(r.status == R.OK for r in results)
    assert time.monotonic() - start < 30  # not held for the poll interval
    assert gate.polls >= 1


def test_two_workers_start_different_toolchains_first():
    # One model: 2 eager jobs, then 3 torch.compile and 3 ONNX Runtime ones. In queue order both
    # workers would start torch.compile (seconds each, once per process) and later both the
    # exporter; with toolchains each starts one of them while the other starts the other.
    chains = {"Eager": None, "Jit": "inductor", "Ort": "onnx"}
    pool = RecordingPool()
    jobs = _jobs(("Eager", "Eager", 2), ("Jit", "Jit", 3), ("Ort", "Ort", 3))
    results = started(pool, 2, toolchain=lambda j: chains[j.backend]).run(jobs)
    assert sorted(r.key for r in results) == sorted(j.key for j in jobs) and all(r.status == R.OK for r in results)
    backend = {j.key: j.backend for j in jobs}
    first = {}
    for what, worker, method, key in pool.log:
        if what == "call" and method == "build" and chains[backend[key]] is not None:
            first.setdefault(worker, chains[backend[key]])
    assert sorted(first.values()) == ["inductor", "onnx"]


def test_a_job_the_gate_holds_from_the_start_never_waits_in_the_queues():
    class HoldsFollow(Follows):
        """Follows, saying up front that it holds k-follow: it goes straight to the deferred."""

        asked: list = []

        def holds(self, j):
            return j.key == "k-follow" and not self._head_done()

        def admit(self, j):
            self.asked.append((j.key, self._head_done()))
            return super().admit(j)

    committed: list[ResultRecord] = []
    pool = RecordingPool()
    sched = started(pool, on_result=lambda record, *rest: committed.append(record) or record)
    gate = HoldsFollow(committed)
    results = sched.run([job("follow"), job("head")], gate=gate)
    assert sorted(r.key for r in results) == ["k-follow", "k-head"] and all(r.status == R.OK for r in results)
    # asked about only once its head was in: it was never taken from a queue before
    assert ("k-follow", True) in gate.asked and ("k-follow", False) not in gate.asked
    assert [key for what, _, method, key in pool.log if what == "call" and method == "build"] == ["k-head", "k-follow"]


class SlowBuilds(RecordingPool):
    """Builds of a ``slow`` candidate answer 1 s after they were sent (a TensorRT engine's minutes)."""

    def call(self, handle, method, *args):
        ref = super().call(handle, method, *args)
        if method == "build" and args[0]["candidate"].startswith("ok-slow"):
            self.ready_at[ref] = time.monotonic() + 1.0
        return ref


def _two_workers(pool, chains):
    return started(pool, 2, toolchain=lambda j: chains[j.backend])


def test_the_last_job_of_a_toolchain_waits_for_its_worker_unless_that_worker_is_in_a_long_build(monkeypatch):
    monkeypatch.setattr(StartCost, "LONG_BUILD_S", 0.3)
    chains = {"Ort": "onnx", "Eager": None}
    # two long builds of one toolchain: the second worker starts it too once the first has
    # been building a while, rather than wait all of it
    pool = SlowBuilds()
    results = _two_workers(pool, chains).run(_jobs(("Ort", "slow", 2)))
    assert all(r.status == R.OK for r in results)
    builds = [(w, key) for what, w, method, key in pool.log if what == "call" and method == "build"]
    assert {w for w, _ in builds} == {"cpu0-0", "cpu1-1"}
    answered = pool.log.index(next(e for e in pool.log if e[0] == "get" and e[2] == "build"))
    assert pool.log.index(("call", builds[1][0], "build", builds[1][1])) < answered  # in parallel
    # short ones: the last is left to the worker that has the toolchain started
    pool = RecordingPool()
    results = _two_workers(pool, chains).run(_jobs(("Ort", "quick", 2)))
    assert all(r.status == R.OK for r in results)
    assert {w for what, w, method, _ in pool.log if what == "call" and method == "build"} == {"cpu0-0"}


class HeldUntil(JobGate):
    """Holds model ``f``'s jobs until ``late-finish`` has a result; ``ahead``: offers them, all at
    once, to a worker with nothing to do before that."""

    def __init__(self, ahead: bool) -> None:
        self.ahead, self.offered, self.done = ahead, set(), False

    def holds(self, j):
        return j.model == "f"

    def admit(self, j):
        return j.model != "f" or self.done or j.key in self.offered

    def poll(self, deferred):
        return [], (list(deferred) if self.done else [])

    def speculate(self, deferred, classes):
        if not self.ahead or DC not in classes:
            return []
        chosen = [j for j in deferred if j.key not in self.offered]
        self.offered.update(j.key for j in chosen)
        return chosen


@pytest.mark.parametrize("ahead", [False, True])
def test_a_worker_with_nothing_to_do_runs_held_jobs_ahead_only_when_the_gate_offers_them(ahead):
    pool = ScriptedPool()
    order: list[str] = []
    gate = HeldUntil(ahead)

    def commit(record, *rest):
        order.append(record.candidate)
        gate.done = gate.done or record.candidate == "late-finish"
        return record

    sched = Scheduler([Slot(i, "cpu", 1, 0, 1, f"cpu{i}") for i in range(2)], {}, Limits(5, 5), on_result=commit, pool=pool)
    sched.start_workers()
    results = sched.run([job("late-finish"), job("ok-f1", "f"), job("ok-f2", "f")], gate=gate)
    assert sorted(r.candidate for r in results) == ["late-finish", "ok-f1", "ok-f2"]
    assert all(r.status == R.OK for r in results) and len(gate.offered) == (2 if ahead else 0)
    # the other worker idles 0.5 s while late-finish measures: with the offer it runs f meanwhile
    first_f = min(order.index("ok-f1"), order.index("ok-f2"))
    assert (first_f < order.index("late-finish")) is ahead


class CostedPool(ScriptedPool):
    """Results say what the work cost: a ``cold`` candidate's build ``start_s`` (a toolchain's
    start), any other 0.01 s; ``ok-q`` jobs take 0.3 s of wall time to finish."""

    def __init__(self, start_s: float) -> None:
        super().__init__()
        self.start_s, self.builds = start_s, []

    def call(self, handle, method, *args):
        ref = super().call(handle, method, *args)
        job = Job.from_dict(args[0])
        build = self.start_s if "cold" in job.candidate else 0.01
        if method == "build":
            self.builds += [handle] if job.backend == "Ort" else []
            self.values[ref]["phases"] = {"build": build}
        if method == "finish":
            record, *rest = self.values[ref]
            record["phases"] = {"build": build, "check+measure": 0.01}
            self.values[ref] = (record, *rest)
            if job.candidate.startswith("ok-q"):
                self.ready_at[ref] = time.monotonic() + 0.3
        return ref


@pytest.mark.parametrize("start_s", [5.0, 0.001])
def test_an_idle_worker_starts_a_toolchain_others_started_only_when_the_jobs_waiting_outweigh_its_start(start_s):
    pool = CostedPool(start_s)
    sched = started(pool, 2, toolchain=lambda j: {"Ort": "onnx", "Eager": None}[j.backend])
    eager = Job(key="k-eager", model="m", batch_size=1, backend="Eager", config={}, candidate="late-finish",
                device_class_key=DC, model_fingerprint="f")
    results = sched.run([eager] + _jobs(("Ort", "cold", 1), ("Ort", "q", 6)))
    assert len(results) == 8 and all(r.status == R.OK for r in results)
    # one worker starts the exporter while the other measures eager; when that one frees, 3 or
    # so of the exporter's quick jobs wait: worth a start of 0.001 s, not of 5 s (more than
    # twice as many jobs as workers that started it: the count alone would have said start it)
    assert len(set(pool.builds)) == (1 if start_s > 1 else 2)
