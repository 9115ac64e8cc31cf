"""The real scheduler over a simulated 1,000-GPU cluster: no Ray, a simulated clock.

1,000 workers on 125 nodes of 8, 100,000 jobs over 200 models, build and measure times each
log-uniform from 0.02 s to 90 s, a model load of 2 s on a worker's first job of that model,
0.1% of candidates crashing their worker, 3 nodes lost mid-sweep (a fresh node joins 60 s later).
The scheduler is given estimates of each job's seconds off by a lognormal factor (sigma 0.7).
The driver's own real compute time is charged to the simulated clock, so a slow driver shows as
lost efficiency.

Prints:
    driver time per job     real seconds the scheduler spent (the pool's own time excluded) / jobs
    efficiency              ideal makespan (work / workers) / simulated makespan   goal >= 0.99
    peak memory             the driver process's peak RSS (the simulated pool and its records included)
    jobs lost               jobs with no result or more than one                  goal 0

Run:  PYTHONPATH=. .venv/bin/python benchmarks/simulate.py [--nodes 125] [--gpus-per-node 8]
      [--jobs 100000] [--models 200] [--crash-rate 0.001] [--node-losses 3] [--no-estimates]
      [--tracemalloc]
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.sim.sweep import run_simulation  # noqa: E402

GOAL = 0.99


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=125)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--crash-rate", type=float, default=0.001)
    parser.add_argument("--node-losses", type=int, default=3)
    parser.add_argument("--no-estimates", action="store_true", help="give the scheduler no job estimates (FIFO per model)")
    parser.add_argument("--tracemalloc", action="store_true", help="also trace Python allocations (slower)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} at start; driver RSS {rss_mb():.0f} MB before")
    if args.tracemalloc:
        tracemalloc.start()
    t0 = time.perf_counter()
    outcome = run_simulation(nodes=args.nodes, devices_per_node=args.gpus_per_node, jobs=args.jobs, models=args.models,
                             crash_rate=args.crash_rate, node_losses=args.node_losses, seed=args.seed,
                             estimate_error=None if args.no_estimates else 0.7)
    wall = time.perf_counter() - t0
    traced = tracemalloc.get_traced_memory()[1] / 1024**2 if args.tracemalloc else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    pool = outcome.pool
    statuses = collections.Counter(r.status for r in outcome.results)
    retried = sum(1 for r in outcome.results if r.attempts > 1)
    in_flight = sum(len(v) for v in pool.lost.values())
    print(f"cluster:                 {outcome.workers} workers on {args.nodes} nodes x {args.gpus_per_node} (simulated)")
    print(f"jobs:                    {len(outcome.jobs)} over {args.models} models; results {dict(statuses)}")
    print(f"faults:                  {len(set(pool.crashed))} crashing candidates, {len(pool.lost)} nodes lost "
          f"({in_flight} jobs in flight on them, {retried} results after a retry)")
    print(f"model loads:             {pool.loads} ({pool.loads / outcome.workers:.2f} per worker)")
    print(f"work / workers (ideal):  {outcome.ideal_s:.1f} s simulated")
    print(f"simulated makespan:      {outcome.makespan_s:.1f} s")
    print(f"efficiency = ideal/span: {outcome.efficiency:.4f}  (goal >= {GOAL}) -> {'MET' if outcome.efficiency >= GOAL else 'NOT MET'}")
    print(f"driver time per job:     {1e6 * outcome.driver_s / len(outcome.jobs):.0f} us real "
          f"({outcome.driver_s:.1f} s in all, charged to the simulated clock; the pool's own {pool.pool_s:.1f} s not)")
    print(f"driver peak memory:      {peak_rss:.0f} MB peak RSS" + (f", {traced:.0f} MB traced peak" if traced else ""))
    print(f"jobs lost:               {len(outcome.lost)}  (goal 0) -> {'MET' if not outcome.lost else 'NOT MET'}")
    print(f"real wall time:          {wall:.1f} s; load average at end {os.getloadavg()[0]:.2f}")
    return 0 if not outcome.lost else 1


if __name__ == "__main__":
    sys.exit(main())
