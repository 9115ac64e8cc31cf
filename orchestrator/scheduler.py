"""The driver's dispatch loop: keeps every worker busy, enforces phase timeouts, survives faults.

A ``build`` job runs as two calls (``build``, then ``finish``); an ``evaluate`` job (a stored
artifact judged again) as one. The loop waits on whichever call or worker start-up finishes first,
so that no worker idles while another runs a slow candidate. A worker that hangs past its
phase's deadline is killed; one that dies is replaced. A death is a ``crash`` when the worker's
node is still alive (the candidate killed it) and ``infra`` when the node went away, in which
case the job is retried on another worker, at most twice.

The scheduler drives a :class:`~orchestrator.pool.WorkerPool` and never calls Ray itself. A
:class:`JobGate` decides, job by job, whether this driver builds it now (another driver sharing
the store may be building the same artifact) and resolves the jobs it deferred.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cluster.placement import Slot
from orchestrator import records as R
from orchestrator.events import SweepEvents
from orchestrator.pool import CallFailed, WorkerDied, WorkerPool
from orchestrator.records import Job, ResultRecord, WorkerInfo, result_for

log = logging.getLogger(__name__)

MAX_INFRA_RETRIES = 2
#: how often deferred jobs are looked up again while another driver builds them
POLL_S = 0.5


@dataclass
class WorkerHandle:
    slot: Slot
    worker_id: str
    actor: Any
    info: WorkerInfo | None = None
    start_ref: Any = None
    started_at: float = field(default_factory=time.monotonic)
    task: "Task | None" = None


@dataclass
class Task:
    job: Job
    worker: WorkerHandle
    phase: str  # "build" | "finish" | "evaluate"
    ref: Any
    deadline: float
    started: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class Limits:
    build_timeout_s: float
    measure_timeout_s: float
    total_s: float | None = None
    start_timeout_s: float = 180.0


class JobGate:
    """Admits every job; a store-backed gate claims keys and waits for other drivers' results."""

    def admit(self, job: Job) -> bool:
        return True

    def poll(self, deferred: list[Job]) -> tuple[list[ResultRecord], list[Job]]:
        """(results now available for deferred jobs, deferred jobs this driver should now run)."""
        return [], list(deferred)


#: commits a finished result (with its packed checkpoint, outputs and reference) before the next wait;
#: returns the record as stored
ResultSink = Callable[[ResultRecord, bytes | None, bytes | None, bytes | None], ResultRecord]
#: for an evaluate job: (the stored checkpoint's bytes, the stored result it judges again)
Payload = Callable[[Job], tuple[bytes, dict[str, Any]]]


class Scheduler:
    def __init__(
        self,
        slots: list[Slot],
        spec_dict: dict[str, Any],
        limits: Limits,
        on_result: ResultSink,
        events: SweepEvents | None = None,
        pool: WorkerPool | None = None,
    ) -> None:
        if pool is None:
            from orchestrator.pool import RayPool

            pool = RayPool()
        self.pool = pool
        self.slots = slots
        self.spec_dict = spec_dict
        self.limits = limits
        self.on_result = on_result
        self.events = events or SweepEvents()
        self._ids = itertools.count()
        self.workers: list[WorkerHandle] = []
        self._want_reference: Callable[[Job], bool] = lambda job: False
        self._payload: Payload | None = None

    # -- workers ------------------------------------------------------------------------------------
    def start_workers(self) -> list[WorkerInfo]:
        for slot in self.slots:
            self._spawn(slot)
        deadline = time.monotonic() + self.limits.start_timeout_s
        pending = {w.start_ref: w for w in self.workers}
        while pending and time.monotonic() < deadline:
            for ref in self.pool.wait(list(pending), max(0.1, deadline - time.monotonic())):
                self._on_started(pending.pop(ref), ref)
        for w in pending.values():
            log.warning("worker %s did not start within %.0f s; giving up on its slot", w.worker_id, self.limits.start_timeout_s)
            self._drop(w)
        live = [w.info for w in self.workers if w.info is not None]
        if not live:
            raise RuntimeError("no worker could be started: check the cluster's resources (see the log above)")
        return live

    def _spawn(self, slot: Slot) -> WorkerHandle:
        worker_id = f"{slot.label}-{next(self._ids)}"
        actor, start_ref = self.pool.spawn(slot, worker_id, self.spec_dict)
        handle = WorkerHandle(slot, worker_id, actor, start_ref=start_ref)
        self.workers.append(handle)
        return handle

    def _on_started(self, w: WorkerHandle, ref) -> bool:
        try:
            w.info = WorkerInfo.from_dict(self.pool.get(ref))
        except Exception as exc:  # the actor failed in __init__
            log.warning("worker %s failed to start: %s", w.worker_id, exc)
            self._drop(w)
            return False
        w.start_ref = None
        self.events.worker_ready(w.worker_id, w.info.device, w.info.node_id)
        return True

    def _drop(self, w: WorkerHandle) -> None:
        self.pool.kill(w.actor)
        if w in self.workers:
            self.workers.remove(w)

    def _replace(self, w: WorkerHandle, why: str) -> None:
        self._drop(w)
        new = self._spawn(w.slot)
        self.events.worker_lost(w.worker_id, new.worker_id, why)

    def shutdown(self) -> None:
        for w in list(self.workers):
            self._drop(w)

    def live_worker(self, device_class_key: str) -> WorkerHandle | None:
        for w in self.workers:
            if w.info is not None and w.info.device_class_key == device_class_key and w.task is None:
                return w
        return None

    # -- the loop -------------------------------------------------------------------------------------
    def run(
        self,
        jobs: list[Job],
        want_reference: Callable[[Job], bool] = lambda job: False,
        gate: JobGate | None = None,
        payload: Payload | None = None,
    ) -> list[ResultRecord]:
        gate = gate or JobGate()
        queues: dict[str, collections.deque[Job]] = collections.defaultdict(collections.deque)
        for job in jobs:
            queues[job.device_class_key].append(job)
        self._want_reference, self._payload = want_reference, payload
        results: list[ResultRecord] = []
        tasks: dict[Any, Task] = {}
        deferred: list[Job] = []
        started = time.monotonic()
        last_poll = 0.0

        def emit(record: ResultRecord, checkpoint: bytes | None = None, outputs: bytes | None = None,
                 reference: bytes | None = None) -> None:
            stored = self.on_result(record, checkpoint, outputs, reference)  # committed before the next wait
            results.append(stored if stored is not None else record)
            self.events.result(results[-1])

        while any(queues.values()) or tasks or deferred:
            out_of_time = self.limits.total_s is not None and time.monotonic() - started > self.limits.total_s
            if out_of_time:
                for job in [*itertools.chain.from_iterable(queues.values()), *deferred]:
                    emit(result_for(job, R.SKIPPED, "the sweep's total time budget ran out", "Budget"))
                queues.clear()
                deferred.clear()
            else:
                self._assign(queues, tasks, gate, deferred)
                self._fail_orphans(queues, emit)
            if deferred and time.monotonic() - last_poll >= POLL_S:
                last_poll = time.monotonic()
                done, runnable = gate.poll(deferred)
                for record in done:
                    results.append(record)
                    self.events.result(record)
                settled = {r.key for r in done} | {j.key for j in runnable}
                deferred[:] = [j for j in deferred if j.key not in settled]
                for job in runnable:
                    queues[job.device_class_key].appendleft(job)
                if runnable:
                    continue
            if not tasks and not any(queues.values()) and not deferred:
                break
            waitables = list(tasks) + [w.start_ref for w in self.workers if w.start_ref is not None]
            now = time.monotonic()
            if not waitables:
                if not deferred:
                    break
                time.sleep(POLL_S)  # only other drivers' work is left: wait for it
                continue
            next_deadline = min((t.deadline for t in tasks.values()), default=now + 1.0)
            timeout = max(0.0, min(next_deadline - now, POLL_S if deferred else 1.0))
            for ref in self.pool.wait(waitables, timeout):
                if ref in tasks:
                    self._on_task_done(tasks.pop(ref), ref, queues, tasks, emit)
                else:
                    starting = next((w for w in self.workers if w.start_ref == ref), None)
                    if starting is not None:  # None: dropped meanwhile (it took too long to start)
                        self._on_started(starting, ref)
            self._enforce_deadlines(tasks, emit)
        return results

    def _assign(self, queues, tasks, gate: JobGate, deferred: list[Job]) -> None:
        for w in self.workers:
            if w.info is None or w.task is not None:
                continue
            queue = queues.get(w.info.device_class_key)
            while queue:
                job = queue.popleft()
                if job.mode == "build" and not gate.admit(job):
                    deferred.append(job)  # another driver is building it: do other work first
                    continue
                try:
                    self._submit(w, job, "evaluate" if job.mode == "evaluate" else "build", tasks)
                except Exception as exc:  # its stored artifact can't be sent: build it instead
                    log.warning("%s: %s; building it again", job.candidate, exc)
                    job.mode, job.redo = "build", []
                    queue.appendleft(job)
                    continue
                self.events.started(w.worker_id, job)
                break

    def _submit(self, w: WorkerHandle, job: Job, phase: str, tasks, phases: dict | None = None) -> None:
        if phase == "build":
            ref = self.pool.call(w.actor, "build", job.to_dict())
            timeout = self.limits.build_timeout_s
        elif phase == "finish":
            ref = self.pool.call(w.actor, "finish", job.to_dict(), self._want_reference(job))
            timeout = self.limits.measure_timeout_s
        else:
            checkpoint, prior = self._payload(job)  # raises when the stored artifact is gone since planning
            ref = self.pool.call(w.actor, "evaluate", job.to_dict(), checkpoint, prior, self._want_reference(job))
            timeout = self.limits.measure_timeout_s
        task = Task(job, w, phase, ref, time.monotonic() + timeout, phases=dict(phases or {}))
        w.task = task
        tasks[ref] = task

    def _fail_orphans(self, queues, emit) -> None:
        """Jobs whose device class has no worker left (live or starting) can never run: infra."""
        classes = {w.info.device_class_key if w.info else None for w in self.workers}
        starting = any(w.info is None for w in self.workers)
        for dc, q in queues.items():
            if q and dc not in classes and not starting:
                while q:
                    emit(result_for(q.popleft(), R.INFRA, f"no worker of device class {dc[:12]} is left", "NoWorker"))

    def _on_task_done(self, task: Task, ref, queues, tasks, emit) -> None:
        w = task.worker
        w.task = None
        try:
            value = self.pool.get(ref)
        except WorkerDied as exc:
            self._on_worker_death(task, exc, queues, emit)
            return
        except CallFailed as exc:
            emit(result_for(task.job, R.ERROR, str(exc), exc.cause, w.info))
            return
        if task.phase == "build":
            record = ResultRecord.from_dict(value)
            if record.status == R.OK:
                self._submit(w, task.job, "finish", tasks, record.phases)
                self.events.phase(w.worker_id, task.job, "measure")
                return
            emit(record)
        else:
            record_dict, checkpoint, outputs, reference = value
            record = ResultRecord.from_dict(record_dict)
            record.phases = {**task.phases, **record.phases}
            emit(record, checkpoint, outputs, reference)
        if record.recycled:
            # A fresh process is the only sure way to give back what a candidate leaked.
            self._replace(w, f"recycled: {record.recycled}")

    def _on_worker_death(self, task: Task, exc: BaseException, queues, emit) -> None:
        w = task.worker
        if w.info is not None and self._node_alive(w.info.node_id):
            # The node is fine, so the candidate took its worker down (os._exit, segfault, OOM kill).
            emit(result_for(task.job, R.CRASH, f"worker {w.worker_id} died during {task.phase}: {exc}", type(exc).__name__, w.info))
            self._replace(w, f"crashed during {task.job.candidate}")
            return
        self._replace(w, "its node went away")
        job = task.job
        if job.attempt < MAX_INFRA_RETRIES:
            job.attempt += 1
            queues[job.device_class_key].appendleft(job)
            self.events.retry(job, "node lost")
        else:
            emit(result_for(job, R.INFRA, f"worker {w.worker_id} lost with its node, {job.attempt + 1} attempts", "NodeLost", w.info))

    def _node_alive(self, node_id: str, grace_s: float = 2.0) -> bool:
        """Whether the node still lives; a lost node can take the cluster a moment to notice."""
        deadline = time.monotonic() + grace_s
        while True:
            if not self.pool.node_alive(node_id):
                return False
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.25)

    def _enforce_deadlines(self, tasks, emit) -> None:
        now = time.monotonic()
        for w in list(self.workers):
            if w.start_ref is not None and now - w.started_at > self.limits.start_timeout_s:
                log.warning("replacement worker %s never started; giving up on its slot", w.worker_id)
                self._drop(w)
        for ref, task in list(tasks.items()):
            if now < task.deadline:
                continue
            tasks.pop(ref)
            task.worker.task = None
            limit = self.limits.build_timeout_s if task.phase == "build" else self.limits.measure_timeout_s
            record = result_for(task.job, R.TIMEOUT, f"{task.phase} phase passed its {limit:.0f} s timeout", "Timeout",
                                task.worker.info)
            record.phases = {**task.phases, task.phase: now - task.started}
            emit(record)
            self._replace(task.worker, f"timed out in {task.phase}")
