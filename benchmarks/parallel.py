"""Parallel speed-up benchmark: the Quick start sweep on 1 CPU worker, then on 2.

The sweep is examples/sweep.yaml (2 models x 2 batch sizes x the default CPU candidates) with
deploy off, a fresh temporary store for every run and ``force=True``. Ray starts once, with
``num_cpus=2``; each run starts its own workers (``threads_per_slot=1``), so ``tune_s`` (first
dispatch to last result, Ray and worker start-up excluded) compares 1 busy core with 2.

    speed-up = tune_s(cpu_slots=1) / tune_s(cpu_slots=2)                       goal: >= 1.6

It also prints the measure phase's seconds and each candidate's median latency with 1 and with
2 workers: workers pinned to their own cores (and, with ``--exclusive``, measuring one per node
at a time) should measure the same candidates alike.

    median(2 workers) / median(1 worker), per candidate, median of those       goal: within 10 %

A run warms torch's on-disk compile caches (/tmp/torchinductor_*) for the runs after it, so the
runs go in the order 1, 2, 2, 1 (``--order``) and the speed-up is reported for each pair: the
first pair favours the 2-worker run, the second the 1-worker run. ``--warmup`` adds one
untimed 2-worker sweep first.

Run:  PYTHONPATH=. .venv/bin/python benchmarks/parallel.py [--order 1,2,2,1] [--warmup]
      [--spec examples/sweep.yaml] [--verbose]
About 3 to 4 minutes on a 2-core machine (about 1 minute more with --warmup).
"""

from __future__ import annotations

import argparse
import collections
import io
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

GOAL = 1.6


def run_once(spec_path: Path, slots: int, verbose: bool, exclusive: bool = False, medians: dict | None = None):
    from orchestrator.spec.merge import load_spec
    from orchestrator.sweep import run_sweep

    spec = load_spec(spec_path)
    if exclusive:
        spec.measure.exclusive = "node"
    spec.workers.cpu_slots = slots
    spec.workers.threads_per_slot = 1
    with tempfile.TemporaryDirectory(prefix="aitune-parallel-") as store:
        spec.store = store
        console = Console(width=200) if verbose else Console(file=io.StringIO(), width=200)
        outcome = run_sweep(spec, store_root=store, force=True, deploy=False, write_report=False, console=console, live=False)
    statuses = collections.Counter(r.status for r in outcome.results)
    work = sum(sum(r.phases.values()) for r in outcome.results)
    by_phase: dict[tuple[str, str], float] = collections.defaultdict(float)
    for r in outcome.results:
        for phase, seconds in r.phases.items():
            by_phase[(_kind(r), phase)] += seconds
        if medians is not None and r.median_ms is not None:
            medians.setdefault((r.model, r.batch_size, r.candidate), {}).setdefault(slots, []).append(r.median_ms)
    return outcome.tune_s, len(outcome.results), dict(statuses), work, by_phase


def _kind(r) -> str:
    """A short name for a candidate's backend (and precision, for eager)."""
    name = r.backend.removeprefix("Torch").removesuffix("Backend")
    precision = (r.config or {}).get("precision", "float32")
    return f"{name}/{precision}" if precision != "float32" else name


def print_phase_table(per_slots: dict[int, list[dict]]) -> None:
    """Seconds per (backend, phase), summed over a run, averaged over the runs of each worker count."""
    if not (per_slots.get(1) and per_slots.get(2)):
        return
    mean = {n: collections.defaultdict(float) for n in (1, 2)}
    for n in (1, 2):
        for by_phase in per_slots[n]:
            for key, seconds in by_phase.items():
                mean[n][key] += seconds / len(per_slots[n])
    print("\nphase seconds per run (summed over the candidates), 1 worker vs 2 workers:")
    print(f"  {'backend':22s} {'phase':8s} {'1 worker':>9s} {'2 workers':>9s} {'2w/1w':>6s}")
    for key in sorted(set(mean[1]) | set(mean[2]), key=lambda k: -mean[1].get(k, 0.0)):
        one, two = mean[1].get(key, 0.0), mean[2].get(key, 0.0)
        if max(one, two) < 0.05:
            continue
        print(f"  {key[0]:22s} {key[1]:8s} {one:9.2f} {two:9.2f} {two / one if one else float('nan'):6.2f}")


def print_measure_comparison(phases: dict[int, list[dict]], medians: dict) -> None:
    """Measure-phase seconds, and each candidate's median with 1 and with 2 workers."""
    def measure_s(runs: list[dict]) -> float:
        return sum(sum(v for (_, phase), v in r.items() if "measure" in phase and phase != "measure_wait") for r in runs) / max(len(runs), 1)

    if phases.get(1) and phases.get(2):
        one, two = measure_s(phases[1]), measure_s(phases[2])
        print(f"\nmeasure phase seconds per run: 1 worker {one:.2f} s, 2 workers {two:.2f} s: ratio {two / one:.2f}")
    ratios = []
    print("\nmedian latency of the same candidates (mean over runs), 1 worker vs 2 workers:")
    for key in sorted(medians):
        by = medians[key]
        if not (by.get(1) and by.get(2)):
            continue
        one, two = sum(by[1]) / len(by[1]), sum(by[2]) / len(by[2])
        ratios.append(two / one)
        print(f"  {key[0]:12s} b{key[1]:<3d} {key[2]:48s} {one:8.4f} ms {two:8.4f} ms  x{two / one:.2f}")
    if ratios:
        mid = sorted(ratios)[len(ratios) // 2]
        print(f"median of the per-candidate ratios: {mid:.3f} (goal: within 10% of 1) -> "
              f"{'MET' if abs(mid - 1) <= 0.10 else 'NOT MET'}; worst {max(ratios, key=lambda r: abs(r - 1)):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "examples" / "sweep.yaml"))
    parser.add_argument("--order", default="1,2,2,1", help="worker counts, in run order (1 or 2 each)")
    parser.add_argument("--warmup", action="store_true", help="an untimed 2-worker sweep first")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--exclusive", action="store_true", help="measure: {exclusive: node}")
    args = parser.parse_args()
    medians: dict = {}
    order = [int(x) for x in args.order.split(",")]

    import ray

    from cluster import connect

    print(f"machine: {os.cpu_count()} CPU cores, no GPU; load average {os.getloadavg()[0]:.2f} at start")
    handle = connect(num_cpus=2, object_store_memory=300 * 1024**2)
    runs: list[tuple[int, float]] = []
    phases: dict[int, list[dict]] = collections.defaultdict(list)
    try:
        if args.warmup:
            t0 = time.monotonic()
            tune_s, n, statuses, _, _ = run_once(Path(args.spec), 2, args.verbose)
            print(f"warm-up (2 workers, untimed): tune_s {tune_s:.1f} s, {n} candidates {statuses}; "
                  f"{time.monotonic() - t0:.0f} s in all")
        for i, slots in enumerate(order, 1):
            t0 = time.monotonic()
            tune_s, n, statuses, work, by_phase = run_once(Path(args.spec), slots, args.verbose, args.exclusive, medians)
            runs.append((slots, tune_s))
            phases[slots].append(by_phase)
            print(f"run {i}: cpu_slots={slots} threads_per_slot=1: tune_s {tune_s:6.1f} s  "
                  f"(work {work:6.1f} s in phases; {n} candidates {statuses}; {time.monotonic() - t0:.0f} s with start-up)"
                  f"  load {os.getloadavg()[0]:.2f}")
    finally:
        handle.shutdown()
        if ray.is_initialized():
            ray.shutdown()

    print()
    ratios = []
    for j in range(0, len(runs) - 1, 2):
        (a_slots, a), (b_slots, b) = runs[j], runs[j + 1]
        if {a_slots, b_slots} != {1, 2}:
            continue
        one, two = (a, b) if a_slots == 1 else (b, a)
        ratio = one / two
        ratios.append(ratio)
        print(f"pair (runs {j + 1},{j + 2}, order {a_slots},{b_slots}): 1 worker {one:.1f} s / 2 workers {two:.1f} s = {ratio:.2f}x")
    ones = [t for s, t in runs if s == 1]
    twos = [t for s, t in runs if s == 2]
    if ones and twos:
        overall = (sum(ones) / len(ones)) / (sum(twos) / len(twos))
        print(f"mean tune_s: 1 worker {sum(ones) / len(ones):.1f} s, 2 workers {sum(twos) / len(twos):.1f} s: "
              f"speed-up {overall:.2f}x (goal >= {GOAL}) -> {'MET' if overall >= GOAL else 'NOT MET'}")
        if ratios:
            geo = math.prod(ratios) ** (1 / len(ratios))
            print(f"geometric mean of the pairs' speed-ups: {geo:.2f}x")
    print_phase_table(phases)
    print_measure_comparison(phases, medians)
    return 0


if __name__ == "__main__":
    sys.exit(main())
