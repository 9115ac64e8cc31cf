"""The driver's dispatch loop: keeps every worker busy, enforces phase timeouts, survives faults.

A ``build`` job runs as two calls (``build``, then ``finish``); an ``evaluate`` job (a stored
artifact judged again) as one. The loop waits on whichever call or worker start-up finishes first,
so that no worker idles while another runs a slow candidate. Calls are pipelined: a build job's
``finish`` is sent with its ``build`` (the worker runs its calls in order and skips the finish of a
failed build), and while more jobs wait than there are workers, each worker is sent its next job
once its current one is measuring (``prefetch``; never behind a build, which may take minutes),
so that it never waits on the driver's round trip or on the commit of its last result. Only the
call a worker is running has a deadline; the next starts its clock when the one before it
answers. A worker that hangs past its phase's deadline is killed; one that dies is replaced at
once, and what its death means (a crash, a lost node, or a job to run again alone) is settled by
:mod:`orchestrator.dispatch.deaths` while the other workers go on.

The scheduler drives a :class:`~orchestrator.dispatch.pool.WorkerPool` (handed to it; it never
calls Ray itself) through a :class:`~orchestrator.dispatch.fleet.Fleet` of worker handles, and
reads time from a :class:`Clock` (a simulation passes its own). A
:class:`~orchestrator.dispatch.gate.JobGate` decides, job by job, whether this driver builds it
now (another driver sharing the store may be building the same artifact) and resolves the jobs
it deferred. Each :meth:`Scheduler.run` keeps what it works with in its own :class:`_Run`, and
is given its budget; what outlives a run is the fleet, what toolchain starts cost
(:mod:`orchestrator.dispatch.start_cost`), and which jobs run alone since a death.

Each event costs O(1) whatever the number of workers: free workers are kept per device class,
deadlines in a heap, and jobs wait per device class and model (:mod:`orchestrator.dispatch.queues`), so
that a worker is given jobs of the models it already holds.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cluster.placement import Slot
from orchestrator import records as R
from orchestrator.dispatch.clock import Clock
from orchestrator.dispatch.deaths import Deaths
from orchestrator.dispatch.events import SweepEvents
from orchestrator.dispatch.fleet import Call, Fleet, Running, WorkerHandle
from orchestrator.dispatch.gate import JobGate
from orchestrator.dispatch.idle import Entry, call_idle
from orchestrator.dispatch.pool import CallFailed, WorkerDied, WorkerPool
from orchestrator.dispatch.queues import ClassQueues, ModelQueues
from orchestrator.dispatch.start_cost import StartCost
from orchestrator.records import Job, ResultRecord, WorkerInfo, result_for

log = logging.getLogger(__name__)

#: how often deferred jobs are looked up again while another driver builds them
POLL_S = 0.5


@dataclass(frozen=True)
class Limits:
    """Seconds a phase may take; ``total_s``: a run's budget, unless :meth:`Scheduler.run` is given its own."""

    build_timeout_s: float
    measure_timeout_s: float
    total_s: float | None = None
    start_timeout_s: float = 180.0


#: commits a finished result (with its packed checkpoint, outputs and reference) before the next wait;
#: returns the record as stored
ResultSink = Callable[[ResultRecord, bytes | None, bytes | None, bytes | None], ResultRecord]
#: for an evaluate job: (the stored checkpoint's bytes, the stored result it judges again)
Payload = Callable[[Job], tuple[bytes, dict[str, Any]]]


@dataclass(eq=False)
class _Run:
    """What one :meth:`Scheduler.run` works with; none of it outlives the run."""

    gate: JobGate
    queues: ClassQueues
    want_reference: Callable[[Job], bool]
    payload: Payload | None
    #: when its budget runs out, on the scheduler's clock; None: it has none
    ends_at: float | None
    running: Running
    #: what the loop waits on: the calls running and the workers starting (a live view, never copied)
    waiting: collections.ChainMap
    deaths: Deaths
    deferred: list[Job] = field(default_factory=list)
    results: list[ResultRecord] = field(default_factory=list)
    #: keys of deferred jobs queued to run ahead (see JobGate.speculate)
    ahead: set[str] = field(default_factory=set)
    last_poll: float = float("-inf")
    polled_at: int = 0

    def queued(self) -> bool:
        return any(self.queues.values())


class Scheduler:
    """Runs jobs on a fleet of workers, one :meth:`run` at a time; see the module's docstring."""

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
        """``prefetch``: jobs sent to a busy worker ahead of time, at most, while more jobs wait
        than workers (0: none, and a build's finish waits for its answer too). ``toolchain``: what
        a job's backend starts in a worker on its first build (see :class:`ModelQueues`); None
        treats every job alike."""
        self.pool = pool
        self.clock = clock or Clock()
        self.toolchain = toolchain
        self.slots = slots
        self.limits = limits
        self.on_result = on_result
        self.events = events or SweepEvents()
        self.fleet = Fleet(pool, self.clock, spec_dict, self.events, prefetch)
        self.start_cost = StartCost(self.fleet, self.clock)
        #: keys of jobs that run alone (no call before or after them on their worker) since theirs
        #: died with calls queued behind the one it ran: what a death taught, kept from run to run
        self.alone: set[str] = set()

    @property
    def workers(self) -> dict[str, WorkerHandle]:
        return self.fleet.workers

    def start_workers(self) -> list[WorkerInfo]:
        return self.fleet.start(self.slots, self.limits.start_timeout_s)

    def shutdown(self) -> None:
        self.fleet.shutdown()

    def call_idle(self, calls: dict[Any, Entry], timeout_s: float) -> dict[Any, Any]:
        """One call per entry on the idle workers, between runs: see :func:`orchestrator.dispatch.idle.call_idle`."""
        return call_idle(self.fleet, calls, timeout_s)

    # -- the loop -------------------------------------------------------------------------------------
    def run(
        self,
        jobs: list[Job],
        want_reference: Callable[[Job], bool] = lambda job: False,
        gate: JobGate | None = None,
        payload: Payload | None = None,
        estimate: Callable[[Job], float] | None = None,
        *,
        budget_s: float | None = None,
    ) -> list[ResultRecord]:
        """Run ``jobs``; ``estimate`` (a job's expected seconds, if known) sends the longest first.
        ``budget_s``: the seconds this run may take (None: the limits' ``total_s``); what has not
        started when it runs out is skipped."""
        run = self._begin(jobs, want_reference, gate or JobGate(), payload, estimate, budget_s)
        while run.queued() or run.running or run.deferred or run.deaths:
            if not self._turn(run):
                break
        return run.results

    def _begin(self, jobs: list[Job], want_reference: Callable[[Job], bool], gate: JobGate, payload: Payload | None,
               estimate: Callable[[Job], float] | None, budget_s: float | None) -> _Run:
        queues = ClassQueues(lambda dc: ModelQueues(estimate, self.toolchain, self.start_cost.rule(dc)))
        for w in self.fleet.workers.values():
            if w.info is not None:
                queues[w.info.device_class_key].joined(w.models, w.toolchains)
        deferred: list[Job] = []
        for job in jobs:
            if job.mode == "build" and gate.holds(job):
                deferred.append(job)  # not counted as work waiting until it may run
            else:
                queues[job.device_class_key].append(job)
        budget = self.limits.total_s if budget_s is None else budget_s
        ends_at = self.clock.now() + budget if budget is not None else None
        running = Running()
        return _Run(gate, queues, want_reference, payload, ends_at, running,
                    collections.ChainMap(running.calls, self.fleet.starting), Deaths(self.pool, self.alone), deferred)

    def _turn(self, run: _Run) -> bool:
        """One turn of the loop; False once nothing is left to wait for."""
        out_of_time = run.ends_at is not None and self.clock.now() > run.ends_at
        if out_of_time:
            self._skip_the_rest(run)
        else:
            self._assign(run)
            self._fail_orphans(run)
        if self._poll(run) or (not out_of_time and self._run_ahead(run)):
            return True  # jobs now runnable: the next turn sends them
        self._settle_deaths(run)
        if not run.running and not run.queued() and not run.deferred and not run.deaths:
            return False
        if not run.running and not self.fleet.starting and not run.deaths:
            if run.queued():
                return True  # a death just put its job back (a retry): the next turn sends it
            if not run.deferred:
                return False
            self.clock.sleep(POLL_S)  # only other drivers' work is left: wait for it
            return True
        self._wait(run)
        self._enforce_deadlines(run)
        return True

    def _skip_the_rest(self, run: _Run) -> None:
        """The budget ran out: what has not started is skipped (queued, deferred, and sent ahead to a worker)."""
        sent_ahead = [job for w in list(self.fleet.workers.values()) for job in self.fleet.take_back(w)]
        for job in [j for q in run.queues.values() for j in q.drain()] + sent_ahead + run.deferred:
            self._emit(run, result_for(job, R.SKIPPED, R.BUDGET_RAN_OUT, "Budget"))
        run.deferred.clear()

    def _poll(self, run: _Run) -> bool:
        """Look deferred jobs up every POLL_S, and at once when a result came in while a worker
        idles (a job held for another's result, a family head's, starts then); whether some may run now."""
        if not run.deferred or not (self.clock.now() - run.last_poll >= POLL_S
                                    or (len(run.results) > run.polled_at and self.fleet.any_idle())):
            return False
        run.last_poll, run.polled_at = self.clock.now(), len(run.results)
        done, runnable = run.gate.poll(run.deferred)
        for record in done:
            run.results.append(record)
            self.events.result(record)
        resolved = {r.key for r in done} | {j.key for j in runnable}
        run.deferred[:] = [j for j in run.deferred if j.key not in resolved]
        for job in runnable:
            run.queues[job.device_class_key].append(job, front=True)
        return bool(runnable)

    def _run_ahead(self, run: _Run) -> bool:
        """A worker with nothing to do may run deferred jobs ahead (a follower's, on its head's
        top-k so far), one batch at a time: the next once it has been taken. Whether some were queued."""
        if not run.deferred or run.ahead:
            return False
        classes = {dc for dc, idle in self.fleet.idle.items() if idle}
        early = run.gate.speculate(run.deferred, classes) if classes else []
        if not early:
            return False
        keys = {j.key for j in early}
        run.deferred[:] = [j for j in run.deferred if j.key not in keys]
        for job in early:
            run.queues[job.device_class_key].append(job)
        run.ahead = keys
        return True

    def _wait(self, run: _Run) -> None:
        """Wait for the next call or worker start-up to finish, or the next deadline."""
        now = self.clock.now()
        next_deadline = run.running.next_deadline()
        timeout = min(next_deadline - now if next_deadline is not None else 1.0, POLL_S if run.deferred else 1.0)
        if run.deaths:
            timeout = min(timeout, run.deaths.next_check - now)
        for ref in self.pool.wait(run.waiting, max(0.0, timeout)):
            call = run.running.pop(ref)
            if call is not None:
                self._on_call_done(run, call, ref)
                continue
            starting = self.fleet.starting.pop(ref, None)
            if starting is not None:  # None: dropped meanwhile (it took too long to start)
                self.fleet.on_started(starting, ref)

    # -- sending jobs -----------------------------------------------------------------------------------
    def _assign(self, run: _Run) -> None:
        for dc, idle in list(self.fleet.idle.items()):
            queue = run.queues.get(dc)
            for w in list(idle.values()):
                # one worker may be given several jobs in turn (those another driver builds
                # are set aside); one for which nothing is right (pop_for) waits
                while queue and w.worker_id in idle:
                    if not self._give(run, w, queue):
                        break
            # Send busy workers their next job while there is more waiting than workers to take
            # it; near the end, jobs wait for whichever worker frees first instead.
            open_ = self.fleet.open[dc]
            while open_ and queue and len(queue) > self.fleet.live[dc]:
                if not self._give(run, next(iter(open_.values())), queue, ahead=True):
                    break

    def _give(self, run: _Run, w: WorkerHandle, queue: ModelQueues, ahead: bool = False) -> bool:
        """Send ``w`` its next job from ``queue``; False when nothing was taken: no job is right for
        ``w`` now, or the job must wait for an idle worker."""
        job = queue.pop_for(w.models, w.last_model, w.toolchains, share=not ahead)
        if job is None:
            return False
        run.ahead.discard(job.key)
        if ahead and job.key in run.deaths.alone:
            queue.append(job, front=True)  # it runs alone: only an idle worker may take it
            return False
        if job.mode == "build" and not run.gate.admit(job):
            run.deferred.append(job)  # another driver is building it: do other work first
            return True
        try:
            self._send(run, w, job)
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
            self.start_cost.first_build(job.key, chain)
        w.last_model = job.model
        return True

    def _send(self, run: _Run, w: WorkerHandle, job: Job) -> None:
        """Send ``job``'s calls to ``w``: they run after whatever it was sent before."""
        job_dict = job.to_dict()
        if run.ends_at is not None:  # a job sent ahead must not start past the budget either
            job_dict["start_by"] = time.time() + (run.ends_at - self.clock.now())
        alone = job.key in run.deaths.alone
        if job.mode == "evaluate":
            checkpoint, prior = run.payload(job)  # raises when the stored artifact is gone since planning
            w.send(job, "evaluate", self.limits.measure_timeout_s, job_dict, checkpoint, prior, run.want_reference(job),
                   alone=alone)
        else:
            w.send(job, "build", self.limits.build_timeout_s, job_dict, alone=alone)
            if self.fleet.prefetch and not alone:  # else its finish goes once its build has answered
                self._send_finish(run, w, job)
        self._advance(run, w)

    def _send_finish(self, run: _Run, w: WorkerHandle, job: Job, front: bool = False) -> None:
        w.send(job, "finish", self.limits.measure_timeout_s, job.to_dict(), run.want_reference(job), first=False,
               alone=job.key in run.deaths.alone, front=front)

    def _advance(self, run: _Run, w: WorkerHandle) -> None:
        """If ``w`` runs nothing the loop knows of, its next call is running now: the loop waits on it."""
        call = w.advance(self.clock)
        if call is not None:
            run.running.add(call)
            if call.first:
                self.events.started(w.worker_id, call.job)
        self.fleet.refresh(w)

    # -- answers, faults, deadlines ---------------------------------------------------------------------
    def _on_call_done(self, run: _Run, call: Call, ref: Any) -> None:
        w = call.worker
        w.running = None
        try:
            value = self.pool.get(ref)
        except WorkerDied as exc:
            self._on_worker_death(run, call, exc)
            return
        except CallFailed as exc:
            if call.phase == "build":
                w.skip_finish(call)
            self._advance(run, w)
            self._emit(run, result_for(call.job, R.ERROR, str(exc), exc.cause, w.info))
            return
        record = self._on_built(run, call, value) if call.phase == "build" else self._on_measured(run, call, value)
        if record is not None and record.recycled:
            # A fresh process is the only sure way to give back what a candidate leaked; what
            # was sent to it after this job goes back to the queue.
            self._replace(run, w, f"recycled: {record.recycled}")

    def _on_built(self, run: _Run, build: Call, value: Any) -> ResultRecord | None:
        """A build answered: its finish is running now (None), or it failed: its result."""
        w, record = build.worker, ResultRecord.from_dict(value)
        if record.status == R.OK:
            self.start_cost.observe_start(record)  # what its toolchain's start cost, known now
            if not w.has_finish(build):
                self._send_finish(run, w, build.job, front=True)  # it runs alone: send its finish now
            w.queued[0].phases = dict(record.phases)  # its finish: running now
            self._advance(run, w)
            self.events.phase(w.worker_id, build.job, "measure")
            return None
        w.skip_finish(build)
        if not record.recycled:
            self._advance(run, w)
        self._emit(run, record)
        return record

    def _on_measured(self, run: _Run, call: Call, value: Any) -> ResultRecord:
        """A finish or an evaluate answered: the job's result."""
        record_dict, checkpoint, outputs, reference = value
        record = ResultRecord.from_dict(record_dict)
        record.phases = {**call.phases, **record.phases}
        if not record.recycled:
            self._advance(run, call.worker)  # the worker is on its next call already: start its clock first
        self._emit(run, record, checkpoint, outputs, reference)
        return record

    def _on_worker_death(self, run: _Run, call: Call, exc: BaseException) -> None:
        """Replace the worker now; whether it crashed or lost its node is settled in the loop."""
        death = run.deaths.judge(call, exc)
        why = "its node went away" if death.node_gone else f"died during {call.job.candidate}"
        self._replace(run, call.worker, why)
        run.deaths.wait_on(death, self.clock.now())
        self._settle_deaths(run)

    def _settle_deaths(self, run: _Run) -> None:
        run.deaths.settle(self.clock.now(), lambda job, why: self._retry(run, job, why),
                          lambda record: self._emit(run, record))

    def _retry(self, run: _Run, job: Job, why: str) -> None:
        run.queues[job.device_class_key].append(job, front=True)
        self.events.retry(job, why)

    def _enforce_deadlines(self, run: _Run) -> None:
        now = self.clock.now()
        self.fleet.drop_late_starters(now, self.limits.start_timeout_s)
        for call in run.running.expired(now):
            call.worker.running = None
            limit = self.limits.build_timeout_s if call.phase == "build" else self.limits.measure_timeout_s
            record = result_for(call.job, R.TIMEOUT, f"{call.phase} phase passed its {limit:.0f} s timeout", "Timeout",
                                call.worker.info)
            record.phases = {**call.phases, call.phase: now - call.started}
            self._emit(run, record)
            self._replace(run, call.worker, f"timed out in {call.phase}")

    def _fail_orphans(self, run: _Run) -> None:
        """Jobs whose device class has no worker left (live or starting) can never run: infra."""
        if self.fleet.starting:
            return
        for dc, q in run.queues.items():
            if q and self.fleet.live[dc] <= 0:
                why = f"no worker of device class {dc[:12]} is left"
                for job in q.drain():
                    self._emit(run, result_for(job, R.INFRA, why, "NoWorker"))

    def _replace(self, run: _Run, w: WorkerHandle, why: str) -> None:
        """Replace ``w``; what it held is released in the run's queues, what it was sent ahead goes back to them."""
        back = self.fleet.replace(w, why)
        if back is None:
            return
        if w.info is not None:
            run.queues[w.info.device_class_key].left(w.models, w.toolchains)
        # Jobs sent ahead that it never started go back to the front, not counted as attempts.
        for job in back:
            run.queues[job.device_class_key].append(job, front=True)

    def _emit(self, run: _Run, record: ResultRecord, checkpoint: bytes | None = None, outputs: bytes | None = None,
              reference: bytes | None = None) -> None:
        stored = self.on_result(record, checkpoint, outputs, reference)  # committed before the next wait
        run.results.append(stored if stored is not None else record)
        self.start_cost.observe(record)
        self.events.result(run.results[-1])
