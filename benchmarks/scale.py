"""Scheduler scale benchmark: 400 sleeping candidates on 16 pretend-GPU workers.

Every candidate is ``FaultBackend(fault="sleep", seconds=0.25, phase="build")`` on a tiny MLP,
so the work per candidate is known and small; what the benchmark measures is how much of the
workers' time the driver keeps busy. Ray is started with 16 pretend GPUs (``num_gpus=16``), so
``plan_worker_slots`` gives 16 GPU slots; no worker sees CUDA, so each runs on the CPU.

    efficiency = (sum of per-candidate phase seconds / workers) / tune_s        goal: >= 0.9

``tune_s`` runs from the first dispatch to the last result (Ray and worker start-up excluded).

Run:  PYTHONPATH=. .venv/bin/python benchmarks/scale.py [--candidates 400] [--workers 16]
      [--seconds 0.25] [--nodes 1] [--profile]

``--nodes N`` (N > 1) spreads the workers over N nodes of a ``ray.cluster_utils.Cluster``
(several raylets on this machine, each with workers/N pretend GPUs; the driver on a head node
with no resources), e.g. ``--nodes 4 --workers 32``.

``--profile`` also times what the driver does between results (ray.wait, the per-result
store commit, progress output, the reference check) and each job's dispatch-to-result latency
against its worker-side phase seconds, and prints the top of a cProfile of the driver.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console  # noqa: E402

GOAL = 0.9


def make_spec(store: str, candidates: int, seconds: float):
    from orchestrator.spec.schema import parse_spec

    return parse_spec({
        "name": "scale",
        "models": [{"name": "mlp", "factory": "aitune.examples:mlp", "kwargs": {"width": 8, "depth": 1},
                    "inputs": [{"name": "x", "shape": [8]}]}],
        "batch_sizes": [2],
        "candidates": [
            {"backend": "orchestrator.sim.fault_backends:FaultBackend", "config": {"fault": "sleep", "seconds": seconds, "phase": "build", "tag": str(i)}}
            for i in range(candidates)
        ],
        "measure": {"budget_s": 0.01, "min_iters": 3, "warmup_iters": 1},
        "workers": {"use_gpus": True},
        "budgets": {"build_timeout_s": 120, "measure_timeout_s": 120},
        "store": store,
    })


class DriverTimers:
    """Wall time the driver spends in each of a few calls, by monkeypatching them (no code edits)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)
        self.events: list[tuple[float, str, str, str]] = []  # (t, kind, worker, job key)
        self._undo: list = []

    def wrap(self, owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start
                self.calls[label] += 1

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))

    def install(self) -> None:
        from orchestrator.dispatch import scheduler
        from orchestrator.worker.ray_pool import RayPool
        from orchestrator.dispatch.progress import Progress
        from orchestrator.store.sqlite import SqliteStore

        self.wrap(RayPool, "wait", "pool.wait (blocked on workers)")
        self.wrap(RayPool, "get", "pool.get (results in hand)")
        self.wrap(SqliteStore, "add_result", "store.add_result (commit)")
        self.wrap(SqliteStore, "claim", "store.claim (admit)")
        self.wrap(SqliteStore, "put_reference", "store.put_reference")
        self.wrap(SqliteStore, "has_reference", "store.has_reference (want_reference)")
        self.wrap(Progress, "started", "progress.started (console)")
        self.wrap(Progress, "result", "progress.result (console)")
        self.wrap(scheduler.Scheduler, "_send", "scheduler._send (actor calls)")
        self.wrap(scheduler.Scheduler, "_fail_orphans", "scheduler._fail_orphans")
        self.wrap(scheduler.Scheduler, "_enforce_deadlines", "scheduler._enforce_deadlines")
        self.wrap(scheduler.ResultRecord, "from_dict", "ResultRecord.from_dict")
        original_started, original_result = Progress.started, Progress.result  # already timed above
        events = self.events

        def started(self_, worker, job):
            events.append((time.monotonic(), "started", worker, job.key))
            return original_started(self_, worker, job)

        def result(self_, record):
            worker = record.worker.worker_id if record.worker is not None else "?"
            events.append((time.monotonic(), "result", worker, record.key))
            return original_result(self_, record)

        Progress.started, Progress.result = started, result
        self._undo += [(Progress, "started", original_started), (Progress, "result", original_result)]

    def uninstall(self) -> None:
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


def report_profile(timers: DriverTimers, outcome, tune_s: float, workers: int) -> None:
    print("\n-- driver time by call (inside run_sweep) --")
    for label, s in sorted(timers.seconds.items(), key=lambda kv: -kv[1]):
        n = timers.calls[label]
        print(f"  {label:45s} {s:8.3f} s  {n:6d} calls  {1000 * s / max(n, 1):8.3f} ms/call")
    phases = {r.key: r.phases for r in outcome.results}
    started = {key: t for t, kind, _, key in timers.events if kind == "started"}
    finished = {key: (t, w) for t, kind, w, key in timers.events if kind == "result"}
    overheads, latencies = [], []
    for key, t0 in started.items():
        if key in finished:
            lat = finished[key][0] - t0
            latencies.append(lat)
            overheads.append(lat - sum(phases.get(key, {}).values()))
    if latencies:
        q = statistics.quantiles(overheads, n=10)
        print("\n-- per job: dispatch -> result as the driver sees it, minus worker phase seconds --")
        print(f"  latency   mean {statistics.mean(latencies) * 1000:7.1f} ms   median {statistics.median(latencies) * 1000:7.1f} ms")
        print(f"  overhead  mean {statistics.mean(overheads) * 1000:7.1f} ms   median {statistics.median(overheads) * 1000:7.1f} ms"
              f"   p10 {q[0] * 1000:7.1f} ms   p90 {q[-1] * 1000:7.1f} ms")
    # Idle gap per worker: from a result to that worker's next dispatch (driver-side turnaround).
    by_worker: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    for t, kind, w, key in timers.events:
        by_worker[w].append((t, kind))
    gaps = []
    for seq in by_worker.values():
        seq.sort()
        for (t1, k1), (t2, k2) in zip(seq, seq[1:]):
            if k1 == "result" and k2 == "started":
                gaps.append(t2 - t1)
    if gaps:
        print(f"  result -> next dispatch on the same worker: mean {statistics.mean(gaps) * 1000:.1f} ms, "
              f"max {max(gaps) * 1000:.1f} ms ({len(gaps)} gaps)")
    sum_phase = collections.defaultdict(float)
    for r in outcome.results:
        for name, s in r.phases.items():
            sum_phase[name] += s
    print("\n-- worker-side phase seconds, summed over all candidates --")
    for name, s in sorted(sum_phase.items(), key=lambda kv: -kv[1]):
        print(f"  {name:10s} {s:8.3f} s  ({1000 * s / len(outcome.results):.2f} ms/candidate)")
    lost = tune_s * workers - sum(sum_phase.values())
    print(f"  worker-seconds available {tune_s * workers:.1f}, used in phases {sum(sum_phase.values()):.1f}, "
          f"lost {lost:.1f} ({1000 * lost / len(outcome.results):.0f} ms/candidate)")


def start_cluster(nodes: int, workers: int):
    """A ``Cluster`` of ``nodes`` raylets sharing ``workers`` pretend GPUs; returns (cluster, handle)."""
    import ray
    from ray.cluster_utils import Cluster

    from cluster import connect, loopback_only

    if workers % nodes:
        raise SystemExit(f"--workers {workers} does not split evenly over --nodes {nodes}")
    per_node = workers // nodes
    ray._private.utils.write_ray_address = lambda *a, **k: None  # keep this cluster to this script
    with loopback_only():
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "num_gpus": 0, "object_store_memory": 150 * 1024**2, "include_dashboard": False})
        for _ in range(nodes):
            # logical CPUs: one per GPU worker, as plan_worker_slots asks for; the machine has 2
            cluster.add_node(num_cpus=per_node, num_gpus=per_node, object_store_memory=100 * 1024**2)
        cluster.wait_for_nodes()
        handle = connect(cluster.address)
    return cluster, handle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=400)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=0.25)
    parser.add_argument("--nodes", type=int, default=1, help="spread the workers over this many Cluster nodes")
    parser.add_argument("--profile", action="store_true", help="time the driver's calls and cProfile it")
    parser.add_argument("--verbose", action="store_true", help="show the sweep's own progress lines")
    args = parser.parse_args()

    import ray

    from cluster import connect
    from orchestrator.sweep import run_sweep

    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} at start")
    cluster = None
    if args.nodes > 1:
        cluster, handle = start_cluster(args.nodes, args.workers)
    else:
        handle = connect(num_cpus=2, num_gpus=args.workers, object_store_memory=300 * 1024**2)
    timers = DriverTimers()
    profiler = cProfile.Profile() if args.profile else None
    try:
        with tempfile.TemporaryDirectory(prefix="aitune-scale-") as store:
            spec = make_spec(store, args.candidates, args.seconds)
            console = Console(width=200) if args.verbose else Console(file=io.StringIO(), width=200)
            if args.profile:
                timers.install()
                profiler.enable()
            t0 = time.monotonic()
            outcome = run_sweep(spec, store_root=store, deploy=False, write_report=False, console=console, live=False)
            total = time.monotonic() - t0
            if args.profile:
                profiler.disable()
                timers.uninstall()
    finally:
        handle.shutdown()
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()

    statuses = collections.Counter(r.status for r in outcome.results)
    work = sum(sum(r.phases.values()) for r in outcome.results)
    workers = args.workers
    ideal = work / workers
    efficiency = ideal / outcome.tune_s if outcome.tune_s else 0.0
    sleep_bound = args.candidates * args.seconds / workers
    print(f"workers:                 {workers} (pretend GPUs, running on the CPU) on {args.nodes} node(s)")
    print(f"candidates:              {len(outcome.results)} ({dict(statuses)}; ran {outcome.ran}, reused {outcome.reused})")
    print(f"work (sum of phases):    {work:.2f} s")
    print(f"ideal = work / workers:  {ideal:.2f} s")
    print(f"pure sleep lower bound:  {sleep_bound:.2f} s  ({args.candidates} x {args.seconds} s / {workers})")
    print(f"measured tune_s:         {outcome.tune_s:.2f} s  (run_sweep total incl. Ray worker start {total:.1f} s)")
    print(f"efficiency = ideal/tune: {efficiency:.3f}  (goal >= {GOAL}) -> {'MET' if efficiency >= GOAL else 'NOT MET'}")
    print(f"sleep bound / tune_s:    {sleep_bound / outcome.tune_s:.3f}")
    print(f"load average at end:     {os.getloadavg()[0]:.2f}")
    if args.profile:
        report_profile(timers, outcome, outcome.tune_s, workers)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
        print("\n-- cProfile of the driver (run_sweep), top 20 by own time --")
        print(out.getvalue())
    return 0 if statuses.get("ok", 0) == len(outcome.results) else 1


if __name__ == "__main__":
    sys.exit(main())
