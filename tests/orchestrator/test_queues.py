"""ModelQueues on its own: model affinity, then toolchains within a model, then queue order."""

from __future__ import annotations

from orchestrator.dispatch.queues import ModelQueues
from orchestrator.records import Job

CHAINS = {"Eager": None, "Jit": "inductor", "Aot": "inductor", "Ort": "onnx"}


def job(name: str, model: str = "m") -> Job:
    backend = name.rstrip("0123456789")
    return Job(key=f"k-{model}-{name}", model=model, batch_size=1, backend=backend, config={}, candidate=name,
               device_class_key="d" * 64, model_fingerprint="f")


def queues(names, model: str = "m", toolchain=lambda j: CHAINS[j.backend], estimate=None) -> ModelQueues:
    q = ModelQueues(estimate, toolchain)
    for n in names:
        q.append(job(n, model))
    return q


class Worker:
    """What the scheduler keeps per worker and tells the queue (see Scheduler._give)."""

    def __init__(self, q: ModelQueues) -> None:
        self.q, self.started = q, set()

    def pop(self) -> str | None:
        j = self.q.pop_for({"m"}, "m", self.started)
        if j is None:
            return None
        chain = self.q.toolchain(j)
        if chain is not None and chain not in self.started:
            self.started.add(chain)
            self.q.started(chain)
        return j.candidate


def test_each_worker_starts_a_toolchain_no_other_worker_has_started():
    q = queues(["Eager1", "Jit1", "Jit2", "Aot1", "Ort1", "Ort2"])
    a, b = Worker(q), Worker(q)
    assert a.pop() == "Eager1"  # eager starts nothing: it goes in queue order
    assert b.pop() == "Jit1"  # b starts torch.compile's toolchain ...
    assert a.pop() == "Ort1"  # ... so a starts the exporter's rather than a second compiler
    assert b.pop() == "Jit2"
    assert a.pop() == "Ort2"
    assert b.pop() == "Aot1"  # AOTInductor shares the toolchain b started
    assert not q


def test_a_toolchain_another_worker_started_is_shared_only_while_over_twice_its_workers_jobs_wait():
    q = queues(["Jit1", "Ort1", "Jit2", "Jit3", "Jit4", "Ort2"])
    a, b, c = Worker(q), Worker(q), Worker(q)
    assert (a.pop(), b.pop()) == ("Jit1", "Ort1")
    assert c.pop() == "Jit2"  # three torch.compile jobs wait for the one worker that started it: c shares
    assert c.pop() == "Jit3"  # c has started it now
    d = Worker(q)
    assert d.pop() is None  # one job of each left, for workers that have them started: d waits
    assert (b.pop(), a.pop()) == ("Ort2", "Jit4")
    assert not q


def test_a_worker_that_must_leave_one_models_jobs_takes_another_models():
    q = ModelQueues(None, lambda j: CHAINS[j.backend])
    for n, m in [("Jit1", "a"), ("Jit2", "a"), ("Ort1", "b")]:
        q.append(job(n, m))
    a = Worker(q)
    assert q.pop_for({"a"}, "a", set()).key == "k-a-Jit1"
    q.started("inductor")  # a worker has started torch.compile; one of a's jobs is left
    assert q.pop_for({"a"}, "a", set()).key == "k-b-Ort1"  # a's last job is left to it
    assert q.pop_for({"a"}, "a", set()) is None
    assert a.q.pop_for({"a"}, "a", {"inductor"}).key == "k-a-Jit2"


def test_a_gone_workers_toolchain_counts_as_not_started():
    for gone in (False, True):
        q = queues(["Jit1", "Jit2", "Ort1"])
        a, b = Worker(q), Worker(q)
        assert a.pop() == "Jit1"
        if gone:
            q.stopped("inductor")
        # while a lives, b starts the exporter; once a is gone, b goes on in queue order
        assert b.pop() == ("Jit2" if gone else "Ort1")


def test_a_job_put_back_at_the_front_goes_first_whatever_its_toolchain():
    q = queues(["Jit1", "Ort1", "Ort2"])
    w = Worker(q)
    assert w.pop() == "Jit1"
    q.append(job("Ort9"), front=True)
    w2 = Worker(q)
    w2.started = {"inductor"}
    assert w2.pop() == "Ort9"


def test_without_toolchains_each_model_goes_in_queue_order_or_longest_first():
    names = ["Eager1", "Jit1", "Ort1", "Jit2"]
    q = queues(names, toolchain=None)
    assert [q.pop_for(set(), None, {"onnx"}).candidate for _ in names] == names
    cost = {"Eager1": 1.0, "Jit1": 5.0, "Ort1": 3.0, "Jit2": 4.0}
    q = queues(names, toolchain=None, estimate=lambda j: cost[j.candidate])
    assert [q.pop_for(set()).candidate for _ in names] == ["Jit1", "Jit2", "Ort1", "Eager1"]


def test_models_come_before_toolchains():
    q = ModelQueues(None, lambda j: CHAINS[j.backend])
    for n, m in [("Jit1", "a"), ("Ort1", "b"), ("Jit2", "b")]:
        q.append(job(n, m))
    # a worker that holds b and has started torch.compile's toolchain takes b's Jit2, not a's Jit1
    assert q.pop_for({"b"}, "b", {"inductor"}).key == "k-b-Jit2"
    assert q.pop_for({"b"}, "b", {"inductor"}).key == "k-b-Ort1"
    assert q.pop_for({"b"}, "b", {"inductor"}).key == "k-a-Jit1"


def test_drain_gives_every_job_once_in_queue_order():
    names = ["Eager1", "Jit1", "Ort1", "Jit2", "Ort2"]
    q = queues(names)
    q.append(job("Aot1"), front=True)
    assert [j.candidate for j in q.drain()] == ["Aot1"] + names
    assert not q and len(q) == 0


def test_a_job_sent_ahead_to_a_busy_worker_is_never_of_a_toolchain_others_started():
    q = queues(["Jit1", "Jit2", "Jit3", "Jit4", "Ort1"])
    assert Worker(q).pop() == "Jit1"  # another worker started torch.compile; three of its jobs wait
    assert q.pop_for({"m"}, "m", set(), share=False).candidate == "Ort1"  # a chain no one started: fine
    assert q.pop_for({"m"}, "m", set(), share=False) is None
    assert q.pop_for({"m"}, "m", set()).candidate == "Jit2"  # an idle worker shares them


def test_a_toolchain_whose_workers_are_all_in_builds_is_shared_however_few_of_its_jobs_wait():
    q = queues(["Ort1", "Ort2"])
    assert Worker(q).pop() == "Ort1"  # that worker starts the exporter; one job of it is left
    assert q.pop_for({"m"}, "m", set(), share=lambda chain: False) is None
    assert q.pop_for({"m"}, "m", set(), share=lambda chain: chain == "onnx").candidate == "Ort2"
