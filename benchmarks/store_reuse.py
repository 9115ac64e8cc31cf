"""Store reuse benchmark: the same sweep twice on one store; the second run should build nothing.

By default the sweep is the Quick start's (examples/sweep.yaml) cut down to its first model
(small_cnn), both batch sizes, the default CPU candidates (real backends: eager fp32/bf16,
torch.compile, AOTInductor, ONNX Runtime), 2 CPU workers, deploy off. Both runs use one fresh
temporary store and ``force=False``; Ray starts once.

    ratio = tune_s(second run) / tune_s(first run)      goal: <= 5 %
    reused in the second run                            goal: every candidate

``tune_s`` runs from the first dispatch to the last result (Ray and worker start-up excluded);
each run's whole ``run_sweep`` time (worker start-up, selection, re-measuring) is printed too.

Run:  PYTHONPATH=. .venv/bin/python benchmarks/store_reuse.py [--models small_cnn] [--spec examples/sweep.yaml]
About 1 to 2 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console

GOAL = 0.05


def time_stages() -> dict[str, float]:
    """Seconds run_sweep spends starting workers and choosing winners (patched in, no code edits)."""
    from orchestrator.dispatch.scheduler import Scheduler
    from orchestrator.sweep import session as sweep

    seconds: dict[str, float] = collections.defaultdict(float)

    def timed(fn, label):
        def wrapper(*args, **kwargs):
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] += time.monotonic() - start
        return wrapper

    Scheduler.start_workers = timed(Scheduler.start_workers, "start_workers")
    sweep.choose_winners = timed(sweep.choose_winners, "choose_winners")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "examples" / "sweep.yaml"))
    parser.add_argument("--models", default="small_cnn", help="comma-separated model names to keep ('all': every model)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    import ray

    from cluster import connect
    from orchestrator.spec.merge import load_spec
    from orchestrator.sweep import run_sweep

    spec = load_spec(args.spec)
    if args.models != "all":
        keep = args.models.split(",")
        spec.models = [m for m in spec.models if m.name in keep]
        if not spec.models:
            raise SystemExit(f"no model of {args.spec} is named {keep}")
    print(f"machine: {os.cpu_count()} CPU cores, no GPU; load average {os.getloadavg()[0]:.2f} at start")
    print(f"sweep: {[m.name for m in spec.models]} x batch {spec.batch_sizes}, default CPU candidates, "
          f"{spec.workers.cpu_slots} CPU workers x {spec.workers.threads_per_slot} thread(s), deploy off")
    stages = time_stages()
    handle = connect(num_cpus=2, object_store_memory=300 * 1024**2)
    outcomes, wholes = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="aitune-reuse-") as store:
            spec.store = store
            for i in (1, 2):
                console = Console(width=200) if args.verbose else Console(file=io.StringIO(), width=200)
                t0 = time.monotonic()
                outcome = run_sweep(spec, store_root=store, deploy=False, write_report=False, console=console, live=False)
                whole = time.monotonic() - t0
                statuses = collections.Counter(r.status for r in outcome.results)
                print(f"run {i}: tune_s {outcome.tune_s:8.3f} s; ran {outcome.ran}, reused {outcome.reused} "
                      f"of {len(outcome.results)} {dict(statuses)}; run_sweep {whole:.1f} s in all "
                      f"(starting workers {stages['start_workers']:.1f} s, selecting/re-measuring "
                      f"{stages['choose_winners']:.1f} s)")
                stages.clear()
                outcomes.append(outcome)
                wholes.append(whole)
    finally:
        handle.shutdown()
        if ray.is_initialized():
            ray.shutdown()

    first, second = outcomes
    ratio = second.tune_s / first.tune_s if first.tune_s else float("inf")
    all_reused = second.reused == len(second.results) and second.ran == 0
    winners_same = {(s.model, s.batch_size): s.winner_key for s in first.selections} == \
                   {(s.model, s.batch_size): s.winner_key for s in second.selections}
    print()
    print(f"first run tune_s:   {first.tune_s:.3f} s")
    print(f"second run tune_s:  {second.tune_s:.3f} s")
    print(f"ratio:              {100 * ratio:.2f} % (goal <= {100 * GOAL:.0f} %) -> {'MET' if ratio <= GOAL else 'NOT MET'}")
    print(f"reused on run 2:    {second.reused}/{len(second.results)} (goal: all) -> {'MET' if all_reused else 'NOT MET'}")
    print(f"same winners:       {winners_same}")
    print(f"whole run_sweep:    {wholes[0]:.1f} s then {wholes[1]:.1f} s ({100 * wholes[1] / wholes[0]:.0f} %; "
          "worker start-up and re-measuring the winners are outside tune_s)")
    return 0 if ratio <= GOAL and all_reused else 1


if __name__ == "__main__":
    sys.exit(main())
