"""A simulated cluster for the real scheduler: no Ray, no processes, a simulated clock.

:class:`SimulatedPool` is a :class:`~orchestrator.dispatch.pool.WorkerPool` whose workers are records on
simulated nodes, and whose calls finish at simulated times drawn by the caller. It lets the real
:class:`~orchestrator.dispatch.scheduler.Scheduler` run a thousand workers and a hundred thousand jobs on
one core in a minute, with worker crashes and node losses, to find what the driver costs at a
scale no test machine has.

- Time is :class:`SimClock`: it jumps from one call's end to the next. The driver's own real
  compute time between two waits is added to it too (``charge_driver``), so a slow driver shows
  as lost efficiency, as it would on a real cluster. Time spent inside the pool is not charged.
- A worker loads a model on its first job of that model (``load_s``), as a real one does.
- ``crash_keys``: jobs whose candidate kills its worker part way through its build (a crash).
- ``lose_node(node_id, at)``: the node goes away at that time with every worker on it; its
  calls fail with :class:`~orchestrator.dispatch.pool.WorkerDied` and ``node_alive`` turns false. A fresh
  node of the same class joins ``node_return_s`` later (as an autoscaler would bring one).
- A worker takes ``start_s`` to start; a worker that finds no free device waits for one.
- A worker runs its calls one after another, in the order they were made, as a Ray actor does: a
  call made while it is busy starts when the one before it ends.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Collection

from cluster.placement import Slot
from orchestrator import records as R
from orchestrator.dispatch.clock import Clock
from orchestrator.dispatch.pool import WorkerDied, WorkerPool
from orchestrator.records import Job, WorkerInfo, result_for


class SimClock(Clock):
    def __init__(self, start: float = 0.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)


@dataclass
class SimNode:
    node_id: str
    device_class_key: str
    devices: int
    alive: bool = True
    workers: set[str] = field(default_factory=set)


@dataclass
class SimWorker:
    worker_id: str
    node: SimNode | None  # None: waiting for a free device
    slot: Slot
    alive: bool = True
    models: set[str] = field(default_factory=set)
    calls: list = field(default_factory=list)  # the refs of its calls not yet answered, in order
    busy_until: float = 0.0  # when its last call made ends
    dies_at: float | None = None  # a call it runs kills it then: later calls fail with it


@dataclass
class _Call:
    worker: SimWorker | None
    done_at: float
    value: Any
    key: str | None = None  # the job's, for a build or finish call
    start: float = 0.0  # when the worker starts it (later than it was made, if it was busy)


@dataclass
class Timing:
    """Seconds a job's phases take on a simulated device."""

    build_s: float
    measure_s: float


class SimulatedPool(WorkerPool):
    def __init__(
        self,
        clock: SimClock,
        nodes: list[SimNode],
        timings: dict[str, Timing],
        *,
        crash_keys: Collection[str] = (),
        start_s: float = 5.0,
        load_s: float = 2.0,
        node_return_s: float = 60.0,
        charge_driver: bool = True,
        seed: int = 0,
    ) -> None:
        self.clock = clock
        self.nodes = {n.node_id: n for n in nodes}
        self.timings = timings
        self.crash_keys = set(crash_keys)
        self.start_s, self.load_s, self.node_return_s = start_s, load_s, node_return_s
        self.charge_driver = charge_driver
        self.rng = random.Random(seed)
        self._refs = itertools.count()
        self._seq = itertools.count()
        self._events: list[tuple[float, int, str, Any]] = []  # (time, seq, kind, ref or node id)
        self._calls: dict[int, _Call] = {}
        self._ready: set[int] = set()  # finished calls nobody waited on yet
        self._waiting_for_device: list[tuple[SimWorker, int]] = []
        self._workers: dict[str, SimWorker] = {}
        self._node_ids = itertools.count(len(nodes))
        #: what happened, for tests and the benchmark
        self.loads = 0
        self.pairs: set[tuple[str, str]] = set()  # (worker, model) loads
        self.crashed: list[str] = []  # job keys whose worker crashed
        self.lost: dict[str, list[str]] = {}  # node id -> job keys running when it went
        self.pool_s = 0.0  # real seconds spent inside the pool (not the driver's)
        self.driver_s = 0.0  # real seconds the driver spent between waits
        self._since = None  # real time of the last return to the driver
        self._outside = 0.0  # pool seconds since then (calls, gets, spawns, kills)

    # -- the faults a run is given ---------------------------------------------------------------
    def lose_node(self, node_id: str, at: float) -> None:
        heapq.heappush(self._events, (at, next(self._seq), "lose", node_id))

    # -- WorkerPool --------------------------------------------------------------------------------
    def spawn(self, slot: Slot, worker_id: str, spec: dict[str, Any]) -> tuple[Any, Any]:
        t0 = time.perf_counter()
        worker = SimWorker(worker_id, None, slot)
        self._workers[worker_id] = worker
        ref = next(self._refs)
        self._calls[ref] = _Call(worker, math.inf, None)
        worker.calls.append(ref)
        worker.busy_until = math.inf
        self._waiting_for_device.append((worker, ref))
        self._place_waiting()
        self._spent(t0)
        return worker, ref

    def call(self, handle: SimWorker, method: str, *args: Any) -> Any:
        t0 = time.perf_counter()
        ref = next(self._refs)
        job = args[0]
        timing = self.timings[job["key"]]
        now = max(self.clock.now(), handle.busy_until)  # it starts once the calls before it are done
        if method == "build":
            load = 0.0
            if job["model"] not in handle.models:
                handle.models.add(job["model"])
                self.loads += 1
                self.pairs.add((handle.worker_id, job["model"]))
                load = self.load_s
            if job["key"] in self.crash_keys:
                call = _Call(handle, now + load + timing.build_s * self.rng.random(), WorkerDied("simulated crash"),
                             job["key"])
                self.crashed.append(job["key"])
                handle.dies_at = call.done_at if handle.dies_at is None else handle.dies_at
            else:
                call = _Call(handle, now + load + timing.build_s, ("build", job, {"load": load, "build": timing.build_s}),
                             job["key"])
        elif method == "finish":
            call = _Call(handle, now + timing.measure_s, ("finish", job), job["key"])
        else:
            raise NotImplementedError(f"the simulated pool does not run {method!r}")
        call.start = now
        if not handle.alive:
            call.value, call.done_at = WorkerDied("the worker is gone"), self.clock.now()
        elif handle.dies_at is not None and handle.dies_at < call.done_at:
            call.value, call.done_at = WorkerDied("the worker died during an earlier call"), max(handle.dies_at, self.clock.now())
        self._calls[ref] = call
        handle.calls.append(ref)
        handle.busy_until = max(handle.busy_until, call.done_at)
        heapq.heappush(self._events, (call.done_at, next(self._seq), "call", ref))
        self._spent(t0)
        return ref

    def wait(self, refs: Collection[Any], timeout: float) -> list[Any]:
        real = time.perf_counter()
        if self._since is not None:
            spent = max(0.0, real - self._since - self._outside)
            self.driver_s += spent
            if self.charge_driver:
                self.clock.t += spent
        ready = [r for r in self._ready if r in refs]
        end = self.clock.now() + max(0.0, timeout)
        while not ready and self._events and self._events[0][0] <= end:
            at, _, kind, what = heapq.heappop(self._events)
            self.clock.t = max(self.clock.t, at)
            if kind == "lose":
                self._lose(self.nodes[what])
                continue
            if kind == "return":
                self._add_node(what)
                continue
            call = self._calls.get(what)
            if call is None or call.done_at != at:
                continue  # killed, or finished earlier (its node went)
            if what in refs:
                ready.append(what)
                # everything else finishing at this very instant comes back too
                while self._events and self._events[0][0] == at and self._events[0][2] == "call":
                    _, _, _, other = heapq.heappop(self._events)
                    c = self._calls.get(other)
                    if c is not None and c.done_at == at:
                        if other in refs:
                            ready.append(other)
                        else:
                            self._ready.add(other)
            else:
                self._ready.add(what)
        if not ready:
            self.clock.t = max(self.clock.t, end)
        for r in ready:
            self._ready.discard(r)
        self._since = time.perf_counter()
        self._outside = 0.0
        self.pool_s += self._since - real
        return ready

    def get(self, ref: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._get(ref)
        finally:
            self._spent(t0)

    def _spent(self, t0: float) -> None:
        spent = time.perf_counter() - t0
        self.pool_s += spent
        self._outside += spent

    def _get(self, ref: Any) -> Any:
        call = self._calls.pop(ref)
        if call.worker is not None and ref in call.worker.calls:
            call.worker.calls.remove(ref)
        value = call.value
        if isinstance(value, Exception):
            raise value
        if isinstance(value, tuple) and value and value[0] == "build":  # the typed record, as the worker sends it
            record = result_for(Job.from_dict(value[1]), R.OK, worker=self._info(call.worker))
            record.phases = value[2]
            return record.to_dict()
        if isinstance(value, tuple) and value and value[0] == "finish":
            job = Job.from_dict(value[1])
            record = result_for(job, R.OK, worker=self._info(call.worker))
            record.phases = {"check+measure": self.timings[job.key].measure_s}
            return record.to_dict(), b"checkpoint", None, None
        return value

    def kill(self, handle: SimWorker) -> None:
        t0 = time.perf_counter()
        try:
            self._kill(handle)
        finally:
            self._spent(t0)

    def _kill(self, handle: SimWorker) -> None:
        if not handle.alive:
            return
        handle.alive = False
        for ref in handle.calls:
            self._calls.pop(ref, None)
            self._ready.discard(ref)
        handle.calls.clear()
        self._waiting_for_device = [(w, r) for w, r in self._waiting_for_device if w is not handle]
        if handle.node is not None:
            handle.node.workers.discard(handle.worker_id)
            self._place_waiting()

    def node_alive(self, node_id: str) -> bool:
        node = self.nodes.get(node_id)
        return node is not None and node.alive

    # -- inside the simulated cluster --------------------------------------------------------------
    def _info(self, worker: SimWorker) -> WorkerInfo:
        node = worker.node
        return WorkerInfo(worker.worker_id, node.node_id, node.node_id, 0, "cuda:0",
                          {"device_type": "cuda", "device_name": node.device_class_key}, node.device_class_key, 1)

    def _place_waiting(self) -> None:
        still = []
        for worker, ref in self._waiting_for_device:
            node = next((n for n in self.nodes.values() if n.alive and len(n.workers) < n.devices), None)
            if node is None:
                still.append((worker, ref))
                continue
            worker.node = node
            node.workers.add(worker.worker_id)
            done_at = self.clock.now() + self.start_s
            self._calls[ref] = _Call(worker, done_at, self._info(worker).to_dict())
            worker.busy_until = done_at
            heapq.heappush(self._events, (done_at, next(self._seq), "call", ref))
        self._waiting_for_device = still

    def _lose(self, node: SimNode) -> None:
        if not node.alive:
            return
        node.alive = False
        now = self.clock.now()
        in_flight = self.lost.setdefault(node.node_id, [])
        for worker_id in list(node.workers):
            worker = self._workers[worker_id]
            for ref in worker.calls:
                call = self._calls.get(ref)
                if call is None:
                    continue
                if call.key is not None and call.start <= now and call.key not in in_flight:
                    in_flight.append(call.key)  # running: a job sent ahead and not started is not lost
                call.value, call.done_at = WorkerDied(f"node {node.node_id} went away"), now
                heapq.heappush(self._events, (now, next(self._seq), "call", ref))
        heapq.heappush(self._events, (now + self.node_return_s, next(self._seq), "return", node.device_class_key))

    def _add_node(self, device_class_key: str) -> None:
        devices = max(n.devices for n in self.nodes.values())
        node = SimNode(f"node-{next(self._node_ids)}", device_class_key, devices)
        self.nodes[node.node_id] = node
        self._place_waiting()
