"""The driver's dispatch loop: keeps every worker busy, enforces phase timeouts, survives faults.

A ``build`` job runs as two calls (``build``, then ``finish``); an ``evaluate`` job (a stored
artifact judged again) as one. The loop waits on whichever call or worker start-up finishes first,
so that no worker idles while another runs a slow candidate. Calls are pipelined: a build job's
``finish`` is sent with its ``build`` (the worker runs its calls in order and skips the finish of a
failed build), and while more jobs wait than there are workers, each worker is sent its next job
once its current one is measuring (``prefetch``; never behind a build, which may take minutes),
so that it never waits on the driver's round trip or on the commit of its last result. Only the
call a worker is running has a deadline; the next starts its clock when the one before it answers. A worker that dies with calls queued behind the
one it ran can't say which killed it (the answer of a call that had just ended may die with the
process): every job it held runs again *alone* (no call before or after it on its worker), and
only a job that kills its worker alone is a crash. A worker that hangs past its
phase's deadline is killed; one that dies is replaced at once. A death is a ``crash`` when the
worker's node is still alive a short grace later (the candidate killed it) and ``infra`` when the
node went away, in which case the job is retried on another worker, at most twice. Other workers
go on meanwhile: the grace is a deadline of the loop, not a pause.

The scheduler drives a :class:`~orchestrator.dispatch.pool.WorkerPool` and never calls Ray itself, and
reads time from a :class:`Clock` (a simulation passes its own). A :class:`JobGate` decides, job by
job, whether this driver builds it now (another driver sharing the store may be building the
same artifact) and resolves the jobs it deferred.

Each event costs O(1) whatever the number of workers: free workers are kept per device class,
deadlines in a heap, and jobs wait per device class and model (:mod:`orchestrator.dispatch.queues`), so
that a worker is given jobs of the models it already holds.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cluster.placement import Slot
from orchestrator import records as R
from orchestrator.dispatch.events import SweepEvents
from orchestrator.dispatch.pool import CallFailed, WorkerDied, WorkerPool
from orchestrator.dispatch.queues import ModelQueues
from orchestrator.records import Job, ResultRecord, WorkerInfo, result_for

log = logging.getLogger(__name__)

MAX_INFRA_RETRIES = 2
#: how often deferred jobs are looked up again while another driver builds them
POLL_S = 0.5
#: how long a worker's node may take to be seen gone before its death counts as a crash
DEATH_GRACE_S = 2.0
DEATH_POLL_S = 0.25


class Clock:
    """Real time; a simulation gives the scheduler its own clock."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass(eq=False)
class WorkerHandle:
    slot: Slot
    worker_id: str
    actor: Any
    info: WorkerInfo | None = None
    start_ref: Any = None
    started_at: float = 0.0
    #: the call it runs now (the one the loop waits on, with a deadline)
    running: "Task | None" = None
    #: calls sent after it, in the order the worker runs them
    queued: collections.deque = field(default_factory=collections.deque)
    #: models this worker has loaded (it loads one on its first job of that model)
    models: set[str] = field(default_factory=set)
    last_model: str | None = None
    #: toolchains it has started (it was sent a job of each), see ModelQueues
    toolchains: set[str] = field(default_factory=set)
    gone: bool = False

    @property
    def jobs(self) -> int:
        """How many jobs it has been sent and not answered yet."""
        return (self.running is not None) + sum(t.first for t in self.queued)


@dataclass(eq=False)
class Task:
    job: Job
    worker: WorkerHandle
    phase: str  # "build" | "finish" | "evaluate"
    ref: Any
    timeout: float
    deadline: float = float("inf")  # set when the worker starts it (it is then ``running``)
    started: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    #: the job's first call (a build or an evaluate); a finish follows its build
    first: bool = True


@dataclass(eq=False)
class Death:
    """A worker died during ``task``; crash or infra is decided once its node's fate is known."""

    task: Task
    error: BaseException
    decide_at: float
    #: calls were queued behind the one it ran: which of them killed it is not known
    ambiguous: bool = False


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

    def holds(self, job: Job) -> bool:
        """Whether a build job is held from the start (it would not be admitted before a
        :meth:`poll` lets it run): it waits among the deferred, not in the queues."""
        return False

    def poll(self, deferred: list[Job]) -> tuple[list[ResultRecord], list[Job]]:
        """(results now available for deferred jobs, deferred jobs this driver should now run)."""
        return [], list(deferred)

    def speculate(self, deferred: list[Job], classes: set[str]) -> list[Job]:
        """Deferred jobs that a worker of one of ``classes`` with nothing else to do may run
        now, ahead of what they wait for (they are then admitted); none by default."""
        return []


#: commits a finished result (with its packed checkpoint, outputs and reference) before the next wait;
#: returns the record as stored
ResultSink = Callable[[ResultRecord, bytes | None, bytes | None, bytes | None], ResultRecord]
#: for an evaluate job: (the stored checkpoint's bytes, the stored result it judges again)
Payload = Callable[[Job], tuple[bytes, dict[str, Any]]]


class Scheduler:
    #: a build running this long makes its toolchain worth starting on another worker (see
    #: ModelQueues): a fresh process's first compile or export costs 3 to 6 s on a small CPU
    #: machine, so only a build several times that long (a TensorRT engine's minutes) is worth it
    LONG_BUILD_S = 20.0

    def __init__(
        self,
        slots: list[Slot],
        spec_dict: dict[str, Any],
        limits: Limits,
        on_result: ResultSink,
        *,
        pool: WorkerPool,
        events: SweepEvents | None = None,
        clock: Clock | None = None,
        prefetch: int = 1,
        toolchain: Callable[[Job], str | None] | None = None,
    ) -> None:
        """``toolchain``: what a job's backend starts in a worker on its first build (see
        :class:`ModelQueues`); None treats every job alike."""
        self.pool = pool
        self.clock = clock or Clock()
        #: jobs sent to a busy worker ahead of time, at most, while more jobs wait than workers;
        #: 0: no call is ever queued on a worker (a build's finish waits for its answer too)
        self.prefetch = prefetch
        self.toolchain = toolchain
        self.slots = slots
        self.spec_dict = spec_dict
        self.limits = limits
        self.on_result = on_result
        self.events = events or SweepEvents()
        self._ids = itertools.count()
        self.workers: dict[str, WorkerHandle] = {}
        self._want_reference: Callable[[Job], bool] = lambda job: False
        self._payload: Payload | None = None
        self._tasks: dict[Any, Task] = {}
        self._starting: dict[Any, WorkerHandle] = {}
        self._waiting = collections.ChainMap(self._tasks, self._starting)  # a live view, never copied
        self._ahead: set[str] = set()  # keys of deferred jobs queued to run ahead (see JobGate.speculate)
        # what starting a toolchain costs (a worker's first build of it) and what a job costs,
        # as seen so far: whether an idle worker should start a toolchain others started
        #: key of a worker's first job of a toolchain -> the toolchain (None once its build was counted)
        self._firsts: dict[str, str | None] = {}
        self._start_s: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=64))
        self._job_s: collections.deque = collections.deque(maxlen=256)
        self._idle: dict[str, dict[str, WorkerHandle]] = collections.defaultdict(dict)  # no call at all
        self._open: dict[str, dict[str, WorkerHandle]] = collections.defaultdict(dict)  # busy, room for the next job
        self._live: collections.Counter[str] = collections.Counter()  # started workers per device class
        self._queues: dict[str, ModelQueues] = collections.defaultdict(self._new_queue)
        self._deadlines: list[tuple[float, int, Task]] = []
        self._deaths: list[Death] = []
        self._alone: set[str] = set()  # keys of jobs that run with no call before or after them
        self._next_death_check = 0.0
        self._seq = itertools.count()
        self._emit: Callable[..., None] = lambda *a: None
        self._ends_at: float | None = None  # when the total budget runs out, on self.clock

    # -- workers ------------------------------------------------------------------------------------
    def start_workers(self) -> list[WorkerInfo]:
        for slot in self.slots:
            self._spawn(slot)
        deadline = self.clock.now() + self.limits.start_timeout_s
        while self._starting and self.clock.now() < deadline:
            for ref in self.pool.wait(self._starting, max(0.1, deadline - self.clock.now())):
                w = self._starting.pop(ref, None)
                if w is not None:
                    self._on_started(w, ref)
        for w in list(self._starting.values()):
            log.warning("worker %s did not start within %.0f s; giving up on its slot", w.worker_id, self.limits.start_timeout_s)
            self._drop(w)
        live = [w.info for w in self.workers.values() if w.info is not None]
        if not live:
            raise RuntimeError("no worker could be started: check the cluster's resources (see the log above)")
        return live

    def _spawn(self, slot: Slot) -> WorkerHandle:
        worker_id = f"{slot.label}-{next(self._ids)}"
        actor, start_ref = self.pool.spawn(slot, worker_id, self.spec_dict)
        handle = WorkerHandle(slot, worker_id, actor, start_ref=start_ref, started_at=self.clock.now())
        self.workers[worker_id] = handle
        self._starting[start_ref] = handle
        return handle

    def _on_started(self, w: WorkerHandle, ref) -> bool:
        """``w`` answered its start-up call (already taken out of ``_starting``)."""
        try:
            w.info = WorkerInfo.from_dict(self.pool.get(ref))
        except Exception as exc:  # the actor failed in __init__
            log.warning("worker %s failed to start: %s", w.worker_id, exc)
            self._drop(w)
            return False
        w.start_ref = None
        self._live[w.info.device_class_key] += 1
        self._refresh(w)
        self.events.worker_ready(w.worker_id, w.info.device, w.info.node_id)
        return True

    def _refresh(self, w: WorkerHandle) -> None:
        """File ``w`` as idle, open to one more job, or full."""
        if w.info is None or w.gone:
            return
        dc = w.info.device_class_key
        idle, open_ = self._idle[dc], self._open[dc]
        jobs = w.jobs
        if jobs == 0:
            idle[w.worker_id] = w
        else:
            idle.pop(w.worker_id, None)
        # Its next job is sent only once it measures: a build may take minutes (or hang), and a
        # job queued behind it would wait all that time while another worker goes idle.
        measuring = w.running is not None and w.running.phase != "build"
        alone = w.running is not None and w.running.job.key in self._alone
        if 0 < jobs <= self.prefetch and measuring and not alone:
            open_[w.worker_id] = w
        else:
            open_.pop(w.worker_id, None)

    def _take_back(self, w: WorkerHandle) -> list[Job]:
        """Cancel the jobs sent to ``w`` ahead of the one it runs; returns them."""
        running = w.running.job.key if w.running is not None else None
        back = [t for t in w.queued if t.job.key != running]
        if not back:
            return []
        for task in back:
            self.pool.cancel(task.ref)
        w.queued = collections.deque(t for t in w.queued if t.job.key == running)  # its own finish stays
        self._refresh(w)
        return [t.job for t in back if t.first]

    def _drop(self, w: WorkerHandle) -> None:
        self.pool.kill(w.actor)
        if w.gone:
            return
        w.gone = True
        self.workers.pop(w.worker_id, None)
        if w.start_ref is not None:
            self._starting.pop(w.start_ref, None)
        if w.info is not None:
            dc = w.info.device_class_key
            self._live[dc] -= 1
            self._idle[dc].pop(w.worker_id, None)
            self._open[dc].pop(w.worker_id, None)
            for model in w.models:
                self._queues[dc].release(model)
            for chain in w.toolchains:
                self._queues[dc].stopped(chain)
        # Jobs sent ahead that it never started go back to the front, not counted as attempts; the
        # finish of the job it was running goes with it (that job's fate is the caller's to say).
        for task in w.queued:
            if task.first:
                self._queues[task.job.device_class_key].append(task.job, front=True)
        w.queued.clear()

    def _replace(self, w: WorkerHandle, why: str) -> None:
        self._drop(w)
        new = self._spawn(w.slot)
        self.events.worker_lost(w.worker_id, new.worker_id, why)

    def shutdown(self) -> None:
        for w in list(self.workers.values()):
            self._drop(w)

    def call_idle(self, calls: dict[Any, tuple[str, str | None, Callable[[], tuple]]], timeout_s: float) -> dict[Any, Any]:
        """One call per entry on the idle workers, between sweeps' job runs: each entry is (device
        class key, the worker id it would rather run on, a function giving (method, args), called
        only when it is sent, so that at most one call's arguments per worker are held at once).

        Each worker runs one of these calls at a time, the entries side by side on as many workers
        as their device class has idle; each call has ``timeout_s`` from when it is sent. Returns
        each entry's answer, or the exception it ended with: LookupError where its device class has
        no idle worker, TimeoutError where the worker did not answer in time (it is dropped: a
        worker that hangs takes nothing more)."""
        answers: dict[Any, Any] = {}
        free = {dc: dict(idle) for dc, idle in self._idle.items() if idle}
        todo = collections.deque(calls.items())
        running: dict[Any, tuple[Any, WorkerHandle, float]] = {}
        while todo or running:
            later: collections.deque = collections.deque()
            while todo:
                key, (dc, prefer, make) = todo.popleft()
                idle = free.get(dc)
                if not idle:
                    if any(w.info.device_class_key == dc for _, w, _ in running.values()):  # one will free
                        later.append((key, (dc, prefer, make)))
                    else:
                        answers[key] = LookupError(f"no idle worker of device class {dc[:12]}")
                    continue
                try:
                    method, args = make()
                except Exception as exc:  # its arguments could not be made: that entry alone fails
                    answers[key] = exc
                    continue
                w = idle.pop(prefer, None) or idle.pop(next(iter(idle)))
                running[self.pool.call(w.actor, method, *args)] = (key, w, self.clock.now() + timeout_s)
            todo = later
            if not running:
                break
            soonest = min(deadline for _, _, deadline in running.values())
            for ref in self.pool.wait(list(running), max(0.0, soonest - self.clock.now())):
                key, w, _ = running.pop(ref)
                try:
                    answers[key] = self.pool.get(ref)
                except WorkerDied as exc:
                    answers[key] = exc
                    self._drop(w)
                    continue
                except Exception as exc:  # the call failed, the worker stands
                    answers[key] = exc
                free.setdefault(w.info.device_class_key, {})[w.worker_id] = w
            now = self.clock.now()
            for ref, (key, w, deadline) in list(running.items()):
                if now >= deadline:
                    del running[ref]
                    answers[key] = TimeoutError(f"worker {w.worker_id} gave no answer within {timeout_s:.0f} s")
                    self._drop(w)
        return answers

    # -- the loop -------------------------------------------------------------------------------------
    def run(
        self,
        jobs: list[Job],
        want_reference: Callable[[Job], bool] = lambda job: False,
        gate: JobGate | None = None,
        payload: Payload | None = None,
        estimate: Callable[[Job], float] | None = None,
        limits: Limits | None = None,
    ) -> list[ResultRecord]:
        """Run ``jobs``; ``estimate`` (a job's expected seconds, if known) sends the longest first.
        ``limits`` (default: the scheduler's) bound this run: pass what is left of a total budget."""
        gate = gate or JobGate()
        clock = self.clock
        self._queues = collections.defaultdict(lambda: self._new_queue(estimate))
        for w in self.workers.values():
            if w.info is None:
                continue
            for model in w.models:
                self._queues[w.info.device_class_key].hold(model)
            for chain in w.toolchains:
                self._queues[w.info.device_class_key].started(chain)
        deferred: list[Job] = []
        for job in jobs:
            if job.mode == "build" and gate.holds(job):
                deferred.append(job)  # not counted as work waiting until it may run
            else:
                self._queues[job.device_class_key].append(job)
        self._want_reference, self._payload = want_reference, payload
        self._ahead = set()
        results: list[ResultRecord] = []
        total_s = (limits or self.limits).total_s
        self._ends_at = clock.now() + total_s if total_s is not None else None
        last_poll, polled_at = float("-inf"), 0

        def emit(record: ResultRecord, checkpoint: bytes | None = None, outputs: bytes | None = None,
                 reference: bytes | None = None) -> None:
            stored = self.on_result(record, checkpoint, outputs, reference)  # committed before the next wait
            results.append(stored if stored is not None else record)
            self._observe(record)
            self.events.result(results[-1])

        self._emit = emit
        while self._queued() or self._tasks or deferred or self._deaths:
            out_of_time = self._ends_at is not None and clock.now() > self._ends_at
            if out_of_time:
                # What has not started is skipped: queued, deferred, and sent ahead to a worker.
                sent_ahead = [job for w in list(self.workers.values()) for job in self._take_back(w)]
                for job in [j for q in self._queues.values() for j in q.drain()] + sent_ahead + deferred:
                    emit(result_for(job, R.SKIPPED, R.BUDGET_RAN_OUT, "Budget"))
                deferred.clear()
            else:
                self._assign(gate, deferred)
                self._fail_orphans()
            # Deferred jobs are looked up every POLL_S, and at once when a result came in while
            # a worker idles: a job held for another's result (a family head's) starts then.
            if deferred and (clock.now() - last_poll >= POLL_S
                             or (len(results) > polled_at and any(self._idle.values()))):
                last_poll, polled_at = clock.now(), len(results)
                done, runnable = gate.poll(deferred)
                for record in done:
                    results.append(record)
                    self.events.result(record)
                settled = {r.key for r in done} | {j.key for j in runnable}
                deferred[:] = [j for j in deferred if j.key not in settled]
                for job in runnable:
                    self._queues[job.device_class_key].append(job, front=True)
                if runnable:
                    continue
            if deferred and not out_of_time and not self._ahead:
                # A worker with nothing to do may run deferred jobs ahead (a follower's, on its
                # head's top-k so far), one batch at a time: the next once it has been taken.
                classes = {dc for dc, idle in self._idle.items() if idle}
                early = gate.speculate(deferred, classes) if classes else []
                if early:
                    keys = {j.key for j in early}
                    deferred[:] = [j for j in deferred if j.key not in keys]
                    for job in early:
                        self._queues[job.device_class_key].append(job)
                    self._ahead = keys
                    continue
            self._settle_deaths()
            if not self._tasks and not self._queued() and not deferred and not self._deaths:
                break
            if not self._tasks and not self._starting and not self._deaths:
                if self._queued():
                    continue  # a death just put its job back (a retry): the next turn sends it
                if not deferred:
                    break
                clock.sleep(POLL_S)  # only other drivers' work is left: wait for it
                continue
            now = clock.now()
            next_deadline = self._next_deadline()
            timeout = min(next_deadline - now if next_deadline is not None else 1.0, POLL_S if deferred else 1.0)
            if self._deaths:
                timeout = min(timeout, self._next_death_check - now)
            for ref in self.pool.wait(self._waiting, max(0.0, timeout)):
                task = self._tasks.pop(ref, None)
                if task is not None:
                    self._on_task_done(task, ref)
                    continue
                starting = self._starting.pop(ref, None)
                if starting is not None:  # None: dropped meanwhile (it took too long to start)
                    self._on_started(starting, ref)
            self._enforce_deadlines()
        return results

    def _queued(self) -> bool:
        return any(self._queues.values())

    def _assign(self, gate: JobGate, deferred: list[Job]) -> None:
        for dc, idle in list(self._idle.items()):
            queue = self._queues.get(dc)
            for w in list(idle.values()):
                # one worker may be given several jobs in turn (those another driver builds
                # are set aside); one for which nothing is right (pop_for) waits
                while queue and w.worker_id in idle:
                    if not self._give(w, queue, gate, deferred):
                        break
            # Send busy workers their next job while there is more waiting than workers to take
            # it; near the end, jobs wait for whichever worker frees first instead.
            open_ = self._open[dc]
            while open_ and queue and len(queue) > self._live[dc]:
                if not self._give(next(iter(open_.values())), queue, gate, deferred, ahead=True):
                    break

    def _give(self, w: WorkerHandle, queue: ModelQueues, gate: JobGate, deferred: list[Job], ahead: bool = False) -> bool:
        """Send ``w`` its next job from ``queue``; False when nothing was taken: no job is right for
        ``w`` now, or the job must wait for an idle worker."""
        job = queue.pop_for(w.models, w.last_model, w.toolchains,
                            share=False if ahead else (lambda chain: self._worth_starting(chain, w.info.device_class_key, queue)))
        if job is None:
            return False
        self._ahead.discard(job.key)
        if ahead and job.key in self._alone:
            queue.append(job, front=True)  # it runs alone: only an idle worker may take it
            return False
        if job.mode == "build" and not gate.admit(job):
            deferred.append(job)  # another driver is building it: do other work first
            return True
        try:
            self._send(w, job)
        except Exception as exc:  # its stored artifact can't be sent: build it instead
            log.warning("%s: %s; building it again", job.candidate, exc)
            job.mode, job.redo = "build", []
            queue.append(job, front=True)
            return True
        if job.model not in w.models:  # the worker loads it on this job
            w.models.add(job.model)
            queue.hold(job.model)
        chain = queue.toolchain(job)
        if chain is not None and chain not in w.toolchains:  # and starts this toolchain
            w.toolchains.add(chain)
            queue.started(chain)
            self._firsts[job.key] = chain  # its build seconds: what a start of the toolchain costs
        w.last_model = job.model
        return True

    def _worth_starting(self, chain: str, device_class_key: str, queue: ModelQueues) -> bool | None:
        """Whether an idle worker should start ``chain``, which others started: yes while all of
        those are in a long build; else, once a job and a start have been seen (a worker's first
        build of it, finished or running so far), whether the chain's jobs waiting would take its
        workers longer than a start costs; None before that (the queue's own rule then)."""
        if self._all_building(chain, device_class_key):
            return True
        now = self.clock.now()
        # a first build still running has cost at least this long already
        starts = list(self._start_s.get(chain, ())) + [
            now - w.running.started for w in self.workers.values()
            if w.running is not None and w.running.phase == "build" and self._firsts.get(w.running.job.key) == chain]
        if not starts or not self._job_s:
            return None
        return queue.waiting(chain) * statistics.median(self._job_s) > queue.starters(chain) * statistics.median(starts)

    def _observe_start(self, record: ResultRecord) -> None:
        """Learn what a toolchain's start costs from a worker's first build of it, as soon as
        that build is done (its finish may take a while yet); counted once."""
        chain = self._firsts.get(record.key)
        build = record.phases.get("build")
        if chain is not None and build is not None:
            self._start_s[chain].append(build)
            self._firsts[record.key] = None

    def _observe(self, record: ResultRecord) -> None:
        """Learn what a toolchain's start and a job cost from a result's phase seconds."""
        self._observe_start(record)  # a failed build has only this record
        first = record.key in self._firsts
        self._firsts.pop(record.key, None)
        build = record.phases.get("build")
        if not first and record.status == R.OK and build is not None:
            self._job_s.append(build + record.phases.get("check+measure", 0.0))

    def _all_building(self, chain: str, device_class_key: str) -> bool:
        """Whether every live worker of that class that started ``chain`` has been running one
        build for ``LONG_BUILD_S`` or more (one likely to go on a while yet)."""
        since = self.clock.now() - self.LONG_BUILD_S
        starters = [w for w in self.workers.values()
                    if chain in w.toolchains and w.info is not None and w.info.device_class_key == device_class_key]
        return bool(starters) and all(w.running is not None and w.running.phase == "build" and w.running.started <= since
                                      for w in starters)

    def _new_queue(self, estimate: Callable[[Job], float] | None = None) -> ModelQueues:
        return ModelQueues(estimate, self.toolchain)

    def _send(self, w: WorkerHandle, job: Job) -> None:
        """Send ``job``'s calls to ``w``: they run after whatever it was sent before."""
        job_dict = job.to_dict()
        if self._ends_at is not None:  # a job sent ahead must not start past the budget either
            job_dict["start_by"] = time.time() + (self._ends_at - self.clock.now())
        if job.mode == "evaluate":
            checkpoint, prior = self._payload(job)  # raises when the stored artifact is gone since planning
            ref = self.pool.call(w.actor, "evaluate", job_dict, checkpoint, prior, self._want_reference(job))
            w.queued.append(Task(job, w, "evaluate", ref, self.limits.measure_timeout_s))
        else:
            build = self.pool.call(w.actor, "build", job_dict)
            w.queued.append(Task(job, w, "build", build, self.limits.build_timeout_s))
            if self.prefetch and job.key not in self._alone:  # else its finish goes once its build has answered
                w.queued.append(self._finish(w, job))
        self._advance(w)

    def _finish(self, w: WorkerHandle, job: Job) -> Task:
        ref = self.pool.call(w.actor, "finish", job.to_dict(), self._want_reference(job))
        return Task(job, w, "finish", ref, self.limits.measure_timeout_s, first=False)

    def _advance(self, w: WorkerHandle) -> None:
        """If ``w`` runs nothing the loop knows of, its next call is running now: start its clock."""
        if w.running is None and w.queued and not w.gone:
            task = w.queued.popleft()
            now = self.clock.now()
            task.started, task.deadline = now, now + task.timeout
            w.running = task
            self._tasks[task.ref] = task
            heapq.heappush(self._deadlines, (task.deadline, next(self._seq), task))
            if task.first:
                self.events.started(w.worker_id, task.job)
        self._refresh(w)

    def _next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and self._tasks.get(heap[0][2].ref) is not heap[0][2]:
            heapq.heappop(heap)  # that task is done already
        return heap[0][0] if heap else None

    def _fail_orphans(self) -> None:
        """Jobs whose device class has no worker left (live or starting) can never run: infra."""
        if self._starting:
            return
        for dc, q in self._queues.items():
            if q and self._live[dc] <= 0:
                for job in q.drain():
                    self._emit(result_for(job, R.INFRA, f"no worker of device class {dc[:12]} is left", "NoWorker"))

    def _on_task_done(self, task: Task, ref) -> None:
        w = task.worker
        w.running = None
        try:
            value = self.pool.get(ref)
        except WorkerDied as exc:
            self._on_worker_death(task, exc)
            return
        except CallFailed as exc:
            if task.phase == "build":
                self._skip_finish(w, task)
            self._advance(w)
            self._emit(result_for(task.job, R.ERROR, str(exc), exc.cause, w.info))
            return
        if task.phase == "build":
            record = ResultRecord.from_dict(value)
            if record.status == R.OK:
                self._observe_start(record)  # what its toolchain's start cost, known now
                if not self._has_finish(w, task):
                    w.queued.appendleft(self._finish(w, task.job))  # it runs alone: send its finish now
                w.queued[0].phases = dict(record.phases)  # its finish: running now
                self._advance(w)
                self.events.phase(w.worker_id, task.job, "measure")
                return
            self._skip_finish(w, task)
            if not record.recycled:
                self._advance(w)
            self._emit(record)
        else:
            record_dict, checkpoint, outputs, reference = value
            record = ResultRecord.from_dict(record_dict)
            record.phases = {**task.phases, **record.phases}
            if not record.recycled:
                self._advance(w)  # the worker is on its next call already: start its clock first
            self._emit(record, checkpoint, outputs, reference)
        if record.recycled:
            # A fresh process is the only sure way to give back what a candidate leaked; what
            # was sent to it after this job goes back to the queue.
            self._replace(w, f"recycled: {record.recycled}")

    @staticmethod
    def _has_finish(w: WorkerHandle, build: Task) -> bool:
        """Whether ``build``'s finish was sent with it (it is then next on ``w``)."""
        return bool(w.queued) and not w.queued[0].first and w.queued[0].job.key == build.job.key

    def _skip_finish(self, w: WorkerHandle, build: Task) -> None:
        """The build failed: its finish (sent with it) only says so; nobody waits on it."""
        if self._has_finish(w, build):
            w.queued.popleft()

    def _on_worker_death(self, task: Task, exc: BaseException) -> None:
        """Replace the worker now; whether it crashed or lost its node is settled in the loop."""
        w = task.worker
        node_gone = w.info is None or not self.pool.node_alive(w.info.node_id)
        ambiguous = bool(w.queued) and not node_gone
        if ambiguous:  # any of the jobs it was sent may have killed it: each runs again alone
            self._alone.update(t.job.key for t in w.queued if t.first)
        self._replace(w, "its node went away" if node_gone else f"died during {task.job.candidate}")
        now = self.clock.now()
        self._deaths.append(Death(task, exc, now if node_gone else now + DEATH_GRACE_S, ambiguous))
        self._next_death_check = now
        self._settle_deaths()

    def _settle_deaths(self) -> None:
        """A death whose node went away is infra (retried); one whose node outlived the grace is a crash."""
        now = self.clock.now()
        if not self._deaths or now < self._next_death_check:
            return
        self._next_death_check = now + DEATH_POLL_S
        pending = []
        for death in self._deaths:
            info = death.task.worker.info
            if info is None or not self.pool.node_alive(info.node_id):
                self._lost_with_node(death.task)
            elif now >= death.decide_at and death.ambiguous and death.task.job.key not in self._alone:
                # The node is fine, but calls were queued behind this one: it may be innocent.
                job = death.task.job
                self._alone.add(job.key)
                self._queues[job.device_class_key].append(job, front=True)
                self.events.retry(job, "its worker died with calls queued behind it: running it alone")
            elif now >= death.decide_at:
                # The node is fine, so the candidate took its worker down (os._exit, segfault, OOM kill).
                task, w = death.task, death.task.worker
                self._emit(result_for(task.job, R.CRASH, f"worker {w.worker_id} died during {task.phase}: {death.error}",
                                      type(death.error).__name__, w.info))
            else:
                pending.append(death)
        self._deaths[:] = pending

    def _lost_with_node(self, task: Task) -> None:
        job, w = task.job, task.worker
        if job.attempt < MAX_INFRA_RETRIES:
            job.attempt += 1
            self._queues[job.device_class_key].append(job, front=True)
            self.events.retry(job, "node lost")
        else:
            self._emit(result_for(job, R.INFRA, f"worker {w.worker_id} lost with its node, {job.attempt + 1} attempts",
                                  "NodeLost", w.info))

    def _enforce_deadlines(self) -> None:
        now = self.clock.now()
        for w in [w for w in self._starting.values() if now - w.started_at > self.limits.start_timeout_s]:
            log.warning("replacement worker %s never started; giving up on its slot", w.worker_id)
            self._drop(w)
        while (deadline := self._next_deadline()) is not None and now >= deadline:
            task = heapq.heappop(self._deadlines)[2]
            self._tasks.pop(task.ref)
            task.worker.running = None
            limit = self.limits.build_timeout_s if task.phase == "build" else self.limits.measure_timeout_s
            record = result_for(task.job, R.TIMEOUT, f"{task.phase} phase passed its {limit:.0f} s timeout", "Timeout",
                                task.worker.info)
            record.phases = {**task.phases, task.phase: now - task.started}
            self._emit(record)
            self._replace(task.worker, f"timed out in {task.phase}")
