"""Re-check benchmark: a sweep, then the same sweep with stricter tolerances, on one store.

The second run changes only the tolerances, so every stored artifact is judged again (from its
stored outputs on the driver, or by loading it on a worker when it must be measured) and nothing
is built. By default the sweep is the Quick start's first model (small_cnn), both batch sizes,
the default CPU candidates, 2 CPU workers, deploy off; Ray starts once, outside both timings.

    share = run_sweep time (second run) / run_sweep time (first run)     goal: <= 10 %

Run:  PYTHONPATH=. .venv/bin/python benchmarks/store_recheck.py [--models small_cnn]
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

GOAL = 0.10
STRICT = {"float32": {"atol": 1e-7, "rtol": 1e-6}, "bfloat16": {"atol": 1e-3, "rtol": 1e-3}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "examples" / "sweep.yaml"))
    parser.add_argument("--models", default="small_cnn", help="comma-separated model names to keep ('all': every model)")
    args = parser.parse_args()

    from rich.console import Console

    from cluster import connect
    from orchestrator.spec.merge import load_spec
    from orchestrator.spec.sections import ToleranceSpec
    from orchestrator.sweep import run_sweep

    from benchmarks.store_reuse import time_stages

    stages = time_stages()
    spec = load_spec(args.spec)
    if args.models != "all":
        spec.models = [m for m in spec.models if m.name in args.models.split(",")]
    print(f"machine: {os.cpu_count()} CPU cores, no GPU; load average {os.getloadavg()[0]:.2f} at start")
    print(f"sweep: {[m.name for m in spec.models]} x batch {spec.batch_sizes}, default CPU candidates, deploy off")
    handle = connect(num_cpus=2, object_store_memory=300 * 1024**2)
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="aitune-recheck-") as store:
            for label, tolerances in (("first", {}), ("stricter", STRICT)):
                spec.tolerances = {k: ToleranceSpec(**v) for k, v in tolerances.items()}
                t0 = time.monotonic()
                outcome = run_sweep(spec, store_root=store, deploy=False, write_report=False,
                                    console=Console(file=io.StringIO()), live=False)
                whole = time.monotonic() - t0
                statuses = collections.Counter(r.status for r in outcome.results)
                print(f"{label:9s} run: {whole:7.2f} s (tune_s {outcome.tune_s:.2f}, starting workers "
                      f"{stages['start_workers']:.2f} s, selecting {stages['choose_winners']:.2f} s); "
                      f"{dict(sorted(outcome.how.items()))} {dict(statuses)}")
                stages.clear()
                runs.append((whole, outcome))
    finally:
        handle.shutdown()
    (first_s, _), (second_s, second) = runs
    share = second_s / first_s
    built = second.how.get("built", 0)
    print()
    print(f"stricter run / first run: {100 * share:.1f} % (goal <= {100 * GOAL:.0f} %) -> {'MET' if share <= GOAL else 'NOT MET'}")
    print(f"built again in the stricter run: {built} (goal 0) -> {'MET' if built == 0 else 'NOT MET'}")
    return 0 if share <= GOAL and built == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
