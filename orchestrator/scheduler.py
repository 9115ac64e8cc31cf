"""The driver's dispatch loop: keeps every worker busy, enforces phase timeouts, survives faults.

Each job runs as two actor calls (``build``, then ``finish``). The loop waits on whichever call
or worker start-up finishes first, so that no worker idles while another runs a slow candidate.
A worker that hangs past its phase's deadline is killed; one that dies is replaced. A death is a
``crash`` when the worker's node is still alive (the candidate killed it) and ``infra`` when the
node went away, in which case the job is retried on another worker, at most twice.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

from cluster.inventory import Inventory
from cluster.placement import Slot
from orchestrator import records as R
from orchestrator.records import Job, ResultRecord, WorkerInfo
from orchestrator.worker import TuneWorker

log = logging.getLogger(__name__)

MAX_INFRA_RETRIES = 2


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
    phase: str  # "build" | "finish"
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


#: (event, payload) callbacks: "worker_ready", "started", "phase", "result", "worker_lost"
EventSink = Callable[[str, dict[str, Any]], None]
#: called with every finished result (and its packed checkpoint and reference) before the next wait
ResultSink = Callable[[ResultRecord, bytes | None, bytes | None], None]


class Scheduler:
    def __init__(
        self,
        slots: list[Slot],
        spec_dict: dict[str, Any],
        limits: Limits,
        on_result: ResultSink,
        on_event: EventSink | None = None,
        actor_class=None,
    ) -> None:
        self.slots = slots
        self.spec_dict = spec_dict
        self.limits = limits
        self.on_result = on_result
        self.on_event = on_event or (lambda kind, payload: None)
        self._actor_class = actor_class or ray.remote(max_restarts=0, max_task_retries=0)(TuneWorker)
        self._ids = itertools.count()
        self.workers: list[WorkerHandle] = []
        self._refs_wanted: set[tuple[str, int, str]] = set()

    # -- workers ------------------------------------------------------------------------------------
    def start_workers(self) -> list[WorkerInfo]:
        for slot in self.slots:
            self._spawn(slot)
        deadline = time.monotonic() + self.limits.start_timeout_s
        pending = {w.start_ref: w for w in self.workers}
        while pending and time.monotonic() < deadline:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.1, deadline - time.monotonic()))
            for ref in ready:
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
        options = dict(slot.actor_options())
        env = slot.env()
        if env:
            options["runtime_env"] = {"env_vars": env}
        actor = self._actor_class.options(**options).remote(
            {"kind": slot.kind, "threads": slot.threads, "label": slot.label}, self.spec_dict, worker_id
        )
        handle = WorkerHandle(slot, worker_id, actor, start_ref=actor.info.remote())
        self.workers.append(handle)
        return handle

    def _on_started(self, w: WorkerHandle, ref) -> bool:
        try:
            w.info = WorkerInfo.from_dict(ray.get(ref))
        except Exception as exc:  # the actor failed in __init__
            log.warning("worker %s failed to start: %s", w.worker_id, exc)
            self._drop(w)
            return False
        w.start_ref = None
        self.on_event("worker_ready", {"worker": w.worker_id, "device": w.info.device, "node": w.info.node_id})
        return True

    def _drop(self, w: WorkerHandle) -> None:
        try:
            ray.kill(w.actor, no_restart=True)
        except Exception:
            pass
        if w in self.workers:
            self.workers.remove(w)

    def _replace(self, w: WorkerHandle, why: str) -> None:
        self._drop(w)
        new = self._spawn(w.slot)
        self.on_event("worker_lost", {"worker": w.worker_id, "replacement": new.worker_id, "why": why})

    def shutdown(self) -> None:
        for w in list(self.workers):
            self._drop(w)

    def live_worker(self, device_class_key: str) -> WorkerHandle | None:
        for w in self.workers:
            if w.info is not None and w.info.device_class_key == device_class_key and w.task is None:
                return w
        return None

    # -- the loop -------------------------------------------------------------------------------------
    def run(self, jobs: list[Job], want_reference: Callable[[Job], bool] = lambda job: False) -> list[ResultRecord]:
        queues: dict[str, collections.deque[Job]] = collections.defaultdict(collections.deque)
        for job in jobs:
            queues[job.device_class_key].append(job)
        self._want_reference = want_reference
        results: list[ResultRecord] = []
        tasks: dict[Any, Task] = {}
        started = time.monotonic()

        def emit(record: ResultRecord, checkpoint: bytes | None = None, reference: bytes | None = None) -> None:
            self.on_result(record, checkpoint, reference)  # committed before the next wait
            results.append(record)
            self.on_event("result", {"record": record})

        while any(queues.values()) or tasks:
            out_of_time = self.limits.total_s is not None and time.monotonic() - started > self.limits.total_s
            if out_of_time:
                for q in queues.values():
                    while q:
                        emit(_record_for(q.popleft(), R.SKIPPED, "the sweep's total time budget ran out", "Budget"))
            else:
                self._assign(queues, tasks)
                self._fail_orphans(queues, emit)
            if not tasks and not any(queues.values()):
                break
            waitables = list(tasks) + [w.start_ref for w in self.workers if w.start_ref is not None]
            if not waitables:
                break
            now = time.monotonic()
            next_deadline = min((t.deadline for t in tasks.values()), default=now + 1.0)
            ready, _ = ray.wait(waitables, num_returns=1, timeout=max(0.0, min(next_deadline - now, 1.0)))
            for ref in ready:
                if ref in tasks:
                    self._on_task_done(tasks.pop(ref), ref, queues, tasks, emit)
                else:
                    starting = next((w for w in self.workers if w.start_ref == ref), None)
                    if starting is not None:  # None: dropped meanwhile (it took too long to start)
                        self._on_started(starting, ref)
            self._enforce_deadlines(tasks, emit)
        return results

    def _assign(self, queues, tasks) -> None:
        for w in self.workers:
            if w.info is None or w.task is not None:
                continue
            queue = queues.get(w.info.device_class_key)
            if queue:
                job = queue.popleft()
                self._submit(w, job, "build", tasks)
                self.on_event("started", {"worker": w.worker_id, "job": job})

    def _submit(self, w: WorkerHandle, job: Job, phase: str, tasks, phases: dict | None = None) -> None:
        if phase == "build":
            ref = w.actor.build.remote(job.to_dict())
            timeout = self.limits.build_timeout_s
        else:
            ref = w.actor.finish.remote(job.to_dict(), self._want_reference(job))
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
                    emit(_record_for(q.popleft(), R.INFRA, f"no worker of device class {dc[:12]} is left", "NoWorker"))

    def _on_task_done(self, task: Task, ref, queues, tasks, emit) -> None:
        w = task.worker
        w.task = None
        try:
            value = ray.get(ref)
        except (RayActorError, WorkerCrashedError) as exc:
            self._on_worker_death(task, exc, queues, emit)
            return
        except RayTaskError as exc:  # the method itself raised: the candidate, not the worker
            emit(_record_for(task.job, R.ERROR, str(exc), type(exc.cause).__name__ if exc.cause else "RayTaskError", w))
            return
        if task.phase == "build":
            if value["status"] == R.OK:
                self._submit(w, task.job, "finish", tasks, value.get("phases"))
                self.on_event("phase", {"worker": w.worker_id, "job": task.job, "phase": "measure"})
            else:
                record = _record_for(task.job, value["status"], value.get("error"), value.get("error_class"), w)
                record.phases = value.get("phases", {})
                record.memory, record.recycled = value.get("memory") or {}, value.get("recycled")
                emit(record)
                if record.recycled:
                    self._replace(w, f"recycled: {record.recycled}")
        else:
            record_dict, checkpoint, reference = value
            record = ResultRecord.from_dict(record_dict)
            record.phases = {**task.phases, **record.phases}
            emit(record, checkpoint, reference)
            if record.recycled:
                # A fresh process is the only sure way to give back what a candidate leaked.
                self._replace(w, f"recycled: {record.recycled}")

    def _on_worker_death(self, task: Task, exc: BaseException, queues, emit) -> None:
        w = task.worker
        node_alive = w.info is not None and _node_alive(w.info.node_id)
        if node_alive:
            # The node is fine, so the candidate took its worker down (os._exit, segfault, OOM kill).
            emit(_record_for(task.job, R.CRASH, f"worker {w.worker_id} died during {task.phase}: {exc}", type(exc).__name__, w))
            self._replace(w, f"crashed during {task.job.candidate}")
            return
        self._replace(w, "its node went away")
        job = task.job
        if job.attempt < MAX_INFRA_RETRIES:
            job.attempt += 1
            queues[job.device_class_key].appendleft(job)
            self.on_event("retry", {"job": job, "why": "node lost"})
        else:
            emit(_record_for(job, R.INFRA, f"worker {w.worker_id} lost with its node, {job.attempt + 1} attempts", "NodeLost", w))

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
            record = _record_for(task.job, R.TIMEOUT, f"{task.phase} phase passed its {limit:.0f} s timeout", "Timeout", task.worker)
            record.phases = {**task.phases, task.phase: now - task.started}
            emit(record)
            self._replace(task.worker, f"timed out in {task.phase}")


def _node_alive(node_id: str, grace_s: float = 2.0) -> bool:
    """Whether the node still lives; a lost node can take the cluster a moment to notice."""
    deadline = time.monotonic() + grace_s
    while True:
        if not Inventory.is_alive(node_id):
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.25)


def _record_for(job: Job, status: str, error: str | None, error_class: str | None, w: WorkerHandle | None = None) -> ResultRecord:
    return ResultRecord(
        key=job.key, model=job.model, batch_size=job.batch_size, backend=job.backend, config=job.config,
        candidate=job.candidate, status=status, device_class_key=job.device_class_key, error=error,
        error_class=error_class, worker=w.info.to_dict() if w is not None and w.info else None,
        attempts=job.attempt + 1, created_at=time.time(), reference_key=job.reference_key,
    )
