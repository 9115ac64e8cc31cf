"""A whole simulated sweep: jobs with drawn phase times, a cluster, faults, and what came of it.

``run_simulation`` builds the jobs (log-uniform build and measure seconds over some models), a
:class:`~orchestrator.sim.pool.SimulatedPool` of nodes, picks crashing candidates and nodes to
lose, and runs the real :class:`~orchestrator.dispatch.scheduler.Scheduler` over it. Used by
``tests/orchestrator/test_simulation.py`` (small) and ``benchmarks/simulate.py`` (1,000 GPUs).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

from cluster.placement import Slot
from orchestrator import records as R
from orchestrator.dispatch.scheduler import Limits, Scheduler
from orchestrator.records import Job
from orchestrator.sim.pool import SimClock, SimNode, SimulatedPool, Timing


def log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def make_nodes(count: int, devices: int, classes: list[str]) -> list[SimNode]:
    """``count`` nodes of ``devices`` each, their device classes taken in turn from ``classes``."""
    return [SimNode(f"node-{i}", classes[i % len(classes)], devices) for i in range(count)]


def gpu_slots(count: int) -> list[Slot]:
    return [Slot(i, "gpu", 1.0, 1.0, 1, f"gpu{i}") for i in range(count)]


def make_jobs(count: int, models: int, classes: list[str], rng: random.Random,
              low_s: float = 0.02, high_s: float = 90.0) -> tuple[list[Job], dict[str, Timing]]:
    """``count`` jobs over ``models`` models and the device classes, with log-uniform phase times."""
    jobs, timings = [], {}
    for i in range(count):
        key = f"job-{i:07d}"
        jobs.append(Job(key=key, model=f"model-{rng.randrange(models)}", batch_size=1, backend="Sim", config={},
                        candidate=f"cand-{i}", device_class_key=classes[i % len(classes)], model_fingerprint="f"))
        timings[key] = Timing(log_uniform(rng, low_s, high_s), log_uniform(rng, low_s, high_s))
    return jobs, timings


@dataclass
class SimOutcome:
    results: list[R.ResultRecord]
    pool: SimulatedPool
    jobs: list[Job]
    workers: int
    makespan_s: float  # simulated, from the first dispatch to the last result
    driver_s: float  # real seconds the scheduler itself spent (waits and the pool excluded)
    wall_s: float  # real seconds of the whole run

    @property
    def work_s(self) -> float:
        """Simulated device seconds the jobs' phases need, once each (model loads excluded)."""
        return sum(t.build_s + t.measure_s for t in self.pool.timings.values())

    @property
    def ideal_s(self) -> float:
        return self.work_s / self.workers

    @property
    def efficiency(self) -> float:
        return self.ideal_s / self.makespan_s if self.makespan_s else 0.0

    @property
    def lost(self) -> list[str]:
        """Job keys with no result, or not exactly one."""
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.key] = counts.get(r.key, 0) + 1
        return [j.key for j in self.jobs if counts.get(j.key) != 1]


def run_simulation(
    *,
    nodes: int,
    devices_per_node: int,
    jobs: int,
    models: int,
    classes: list[str] = ("sim-H100",),
    crash_rate: float = 0.0,
    node_losses: int = 0,
    seed: int = 0,
    charge_driver: bool = True,
    low_s: float = 0.02,
    high_s: float = 90.0,
    estimate_error: float | None = 0.7,
    **pool_options: Any,
) -> SimOutcome:
    """The real scheduler over a simulated cluster: ``nodes`` x ``devices_per_node`` workers.

    ``estimate_error``: the scheduler is given each job's expected seconds, off from the truth
    by a lognormal factor of this sigma (0.7: within 2x either way for most jobs), as an
    estimate from the store's history of similar builds would be; None gives it none.
    """
    rng = random.Random(seed)
    classes = list(classes)
    job_list, timings = make_jobs(jobs, models, classes, rng, low_s, high_s)
    crash_keys = {j.key for j in job_list if rng.random() < crash_rate}
    clock = SimClock()
    workers = nodes * devices_per_node
    pool = SimulatedPool(clock, make_nodes(nodes, devices_per_node, classes), timings, crash_keys=crash_keys,
                         charge_driver=charge_driver, seed=seed, **pool_options)
    results: list[R.ResultRecord] = []

    def commit(record, checkpoint, outputs, reference):
        return record

    scheduler = Scheduler(gpu_slots(workers), {}, Limits(900.0, 900.0), on_result=commit, pool=pool, clock=clock)
    wall = time.perf_counter()
    scheduler.start_workers()
    # Node losses fall within the first half of the expected makespan.
    expected = sum(t.build_s + t.measure_s for t in timings.values()) / workers
    start = clock.now()
    for node_id in rng.sample(sorted(pool.nodes), node_losses):
        pool.lose_node(node_id, start + rng.uniform(0.05, 0.5) * expected)
    pool.driver_s = 0.0
    estimate = None
    if estimate_error is not None:
        guesses = {k: (t.build_s + t.measure_s) * rng.lognormvariate(0.0, estimate_error) for k, t in timings.items()}
        estimate = lambda job: guesses[job.key]  # noqa: E731
    results = scheduler.run(job_list, estimate=estimate)
    makespan = clock.now() - start
    wall = time.perf_counter() - wall
    scheduler.shutdown()
    return SimOutcome(results, pool, job_list, workers, makespan, pool.driver_s, wall)
