"""The workers a scheduler drives: each one's handle and lane of calls, and the fleet of them.

A :class:`WorkerHandle` owns its lane: the call its worker runs now (the one the loop waits on,
with a deadline) and the calls sent after it, in the order the worker runs them. It sends a call,
starts the next one's clock, takes back what it was sent ahead, and knows whether a build's
finish went with it. The :class:`Fleet` spawns, replaces and drops workers, and files each live
one, per device class, as idle (no call at all) or open to one more job (see :meth:`Fleet.refresh`),
so that finding a free worker costs O(1) whatever their number. :class:`Running` holds one run's
calls in flight by ref, with their deadlines in a heap.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

from cluster.placement import Slot
from orchestrator.dispatch.clock import Clock
from orchestrator.dispatch.events import SweepEvents
from orchestrator.dispatch.pool import WorkerPool
from orchestrator.records import Job, WorkerInfo

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Call:
    """One call sent to a worker: a job's ``build``, its ``finish``, or an ``evaluate``."""

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
    #: its job runs alone: no call is sent to its worker before or after it
    alone: bool = False


@dataclass(eq=False)
class WorkerHandle:
    """A worker, and its lane of calls."""

    slot: Slot
    worker_id: str
    actor: Any
    pool: WorkerPool = field(repr=False)
    info: WorkerInfo | None = None
    start_ref: Any = None
    started_at: float = 0.0
    #: the call it runs now (the one the loop waits on, with a deadline)
    running: Call | None = None
    #: calls sent after it, in the order the worker runs them
    queued: collections.deque[Call] = field(default_factory=collections.deque)
    #: models this worker has loaded (it loads one on its first job of that model)
    models: set[str] = field(default_factory=set)
    last_model: str | None = None
    #: toolchains it has started (it was sent a job of each), see ModelQueues
    toolchains: set[str] = field(default_factory=set)
    gone: bool = False

    @property
    def jobs(self) -> int:
        """How many jobs it has been sent and not answered yet."""
        return (self.running is not None) + sum(c.first for c in self.queued)

    def call(self, method: str, *args: Any) -> Any:
        """Send ``method(*args)`` outside its lane (nothing waits on it but the caller); returns its ref."""
        return self.pool.call(self.actor, method, *args)

    def send(self, job: Job, phase: str, timeout: float, *args: Any, first: bool = True, alone: bool = False,
             front: bool = False) -> Call:
        """Send ``job``'s ``phase`` call: it runs after whatever was sent before (``front``: before
        whatever waits in the lane, right after the call it runs now)."""
        call = Call(job, self, phase, self.pool.call(self.actor, phase, *args), timeout, first=first, alone=alone)
        if front:
            self.queued.appendleft(call)
        else:
            self.queued.append(call)
        return call

    def advance(self, clock: Clock) -> Call | None:
        """If it runs nothing the loop knows of, its next call is running now: start its clock; that call."""
        if self.running is not None or not self.queued or self.gone:
            return None
        call = self.queued.popleft()
        now = clock.now()
        call.started, call.deadline = now, now + call.timeout
        self.running = call
        return call

    def take_back(self) -> list[Call]:
        """Cancel the calls sent to it for jobs after the one it runs; returns them."""
        running = self.running.job.key if self.running is not None else None
        back = [c for c in self.queued if c.job.key != running]
        if not back:
            return []
        for call in back:
            self.pool.cancel(call.ref)
        self.queued = collections.deque(c for c in self.queued if c.job.key == running)  # its own finish stays
        return back

    def has_finish(self, build: Call) -> bool:
        """Whether ``build``'s finish was sent with it (it is then next in the lane)."""
        return bool(self.queued) and not self.queued[0].first and self.queued[0].job.key == build.job.key

    def skip_finish(self, build: Call) -> None:
        """The build failed: its finish (sent with it) only says so; nobody waits on it."""
        if self.has_finish(build):
            self.queued.popleft()

    def open_to_more(self, prefetch: int) -> bool:
        """Whether it may be sent its next job now. Only once it measures: a build may take minutes
        (or hang), and a job queued behind it would wait all that time while another worker goes idle."""
        running = self.running
        measuring = running is not None and running.phase != "build"
        return 0 < self.jobs <= prefetch and measuring and not running.alone


class Running:
    """One run's calls in flight, by ref, and their deadlines."""

    def __init__(self) -> None:
        self.calls: dict[Any, Call] = {}
        self._deadlines: list[tuple[float, int, Call]] = []
        self._seq = itertools.count()

    def __bool__(self) -> bool:
        return bool(self.calls)

    def add(self, call: Call) -> None:
        self.calls[call.ref] = call
        heapq.heappush(self._deadlines, (call.deadline, next(self._seq), call))

    def pop(self, ref: Any) -> Call | None:
        return self.calls.pop(ref, None)

    def next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and self.calls.get(heap[0][2].ref) is not heap[0][2]:
            heapq.heappop(heap)  # that call is done already
        return heap[0][0] if heap else None

    def expired(self, now: float) -> Iterator[Call]:
        """The calls past their deadline, soonest first, each taken out as it is given."""
        while (deadline := self.next_deadline()) is not None and now >= deadline:
            call = heapq.heappop(self._deadlines)[2]
            self.calls.pop(call.ref)
            yield call


class Fleet:
    """The workers, by id; those starting, by their start-up call's ref; and per device class,
    those idle and those open to one more job, and how many are live."""

    def __init__(self, pool: WorkerPool, clock: Clock, spec_dict: dict[str, Any], events: SweepEvents,
                 prefetch: int) -> None:
        self.pool, self.clock, self.spec_dict, self.events = pool, clock, spec_dict, events
        #: jobs sent to a busy worker ahead of time, at most, while more jobs wait than workers;
        #: 0: no call is ever queued on a worker (a build's finish waits for its answer too)
        self.prefetch = prefetch
        self._ids = itertools.count()
        self.workers: dict[str, WorkerHandle] = {}
        self.starting: dict[Any, WorkerHandle] = {}
        self.idle: dict[str, dict[str, WorkerHandle]] = collections.defaultdict(dict)  # no call at all
        self.open: dict[str, dict[str, WorkerHandle]] = collections.defaultdict(dict)  # busy, room for the next job
        self.live: collections.Counter[str] = collections.Counter()  # started workers per device class

    def start(self, slots: list[Slot], timeout_s: float) -> list[WorkerInfo]:
        """One worker per slot; waits up to ``timeout_s`` for them to start; the ones that did."""
        for slot in slots:
            self.spawn(slot)
        deadline = self.clock.now() + timeout_s
        while self.starting and self.clock.now() < deadline:
            for ref in self.pool.wait(self.starting, max(0.1, deadline - self.clock.now())):
                w = self.starting.pop(ref, None)
                if w is not None:
                    self.on_started(w, ref)
        for w in list(self.starting.values()):
            log.warning("worker %s did not start within %.0f s; giving up on its slot", w.worker_id, timeout_s)
            self.drop(w)
        live = [w.info for w in self.workers.values() if w.info is not None]
        if not live:
            raise RuntimeError("no worker could be started: check the cluster's resources (see the log above)")
        return live

    def spawn(self, slot: Slot) -> WorkerHandle:
        worker_id = f"{slot.label}-{next(self._ids)}"
        actor, start_ref = self.pool.spawn(slot, worker_id, self.spec_dict)
        handle = WorkerHandle(slot, worker_id, actor, self.pool, start_ref=start_ref, started_at=self.clock.now())
        self.workers[worker_id] = handle
        self.starting[start_ref] = handle
        return handle

    def on_started(self, w: WorkerHandle, ref: Any) -> bool:
        """``w`` answered its start-up call (already taken out of ``starting``)."""
        try:
            w.info = WorkerInfo.from_dict(self.pool.get(ref))
        except Exception as exc:  # the actor failed in __init__
            log.warning("worker %s failed to start: %s", w.worker_id, exc)
            self.drop(w)
            return False
        w.start_ref = None
        self.live[w.info.device_class_key] += 1
        self.refresh(w)
        self.events.worker_ready(w.worker_id, w.info.device, w.info.node_id)
        return True

    def refresh(self, w: WorkerHandle) -> None:
        """File ``w`` as idle, open to one more job, or full."""
        if w.info is None or w.gone:
            return
        dc = w.info.device_class_key
        idle, open_ = self.idle[dc], self.open[dc]
        if w.jobs == 0:
            idle[w.worker_id] = w
        else:
            idle.pop(w.worker_id, None)
        if w.open_to_more(self.prefetch):
            open_[w.worker_id] = w
        else:
            open_.pop(w.worker_id, None)

    def any_idle(self) -> bool:
        return any(self.idle.values())

    def take_back(self, w: WorkerHandle) -> list[Job]:
        """Cancel the jobs sent to ``w`` ahead of the one it runs; returns them."""
        back = w.take_back()
        if not back:
            return []
        self.refresh(w)
        return [c.job for c in back if c.first]

    def drop(self, w: WorkerHandle) -> list[Job] | None:
        """Kill ``w`` and forget it; None if it was gone already, else the jobs sent to it ahead
        that it never started (the finish of the job it was running goes with it: that job's fate
        is the caller's to say). What it held (models, toolchains) is the caller's to release."""
        self.pool.kill(w.actor)
        if w.gone:
            return None
        w.gone = True
        self.workers.pop(w.worker_id, None)
        if w.start_ref is not None:
            self.starting.pop(w.start_ref, None)
        if w.info is not None:
            dc = w.info.device_class_key
            self.live[dc] -= 1
            self.idle[dc].pop(w.worker_id, None)
            self.open[dc].pop(w.worker_id, None)
        back = [c.job for c in w.queued if c.first]
        w.queued.clear()
        return back

    def replace(self, w: WorkerHandle, why: str) -> list[Job] | None:
        """Drop ``w`` and start another on its slot; what :meth:`drop` returns."""
        back = self.drop(w)
        new = self.spawn(w.slot)
        self.events.worker_lost(w.worker_id, new.worker_id, why)
        return back

    def drop_late_starters(self, now: float, timeout_s: float) -> None:
        """Give up on the slots of replacement workers that took over ``timeout_s`` to start."""
        for w in [w for w in self.starting.values() if now - w.started_at > timeout_s]:
            log.warning("replacement worker %s never started; giving up on its slot", w.worker_id)
            self.drop(w)

    def shutdown(self) -> None:
        for w in list(self.workers.values()):
            self.drop(w)
