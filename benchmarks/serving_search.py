"""The serving-settings search against an exhaustive grid over the same settings.

On the Quick start winners (``examples/sweep.yaml``: ``small_cnn`` and ``small_encoder``, batch
sizes 1 and 8; ``--store S --root R`` reuses a Quick start run's store and deploy root, else the
sweep runs first into a temporary folder), for each model on one CPU slot, through the real Ray
Serve app (direct ingress, as ``tune`` measures) and the closed-loop load generator
(orchestrator.deploy.load), batch-1 binary requests:

    search  orchestrator.deploy.serving_search.coordinate_search (what ``tune`` runs)
    grid    every setting at every concurrency (grid_search)

Neither reuses stored points (each measures all it asks for). Settings: the batch sizes kept
(prefixes of the tuned sizes), the queue delays of the spec's default (0, 1, 2, 5, 10, 20 ms), the
replicas per device (``--replicas``, default 1: a 2-core machine holds one CPU replica beside the
load generator). It prints the grid's points and frontier, both choices, the search's time against
the grid's (goal <= 0.3), and whether the search's point is within 5% of the grid's best
throughput at the target. Nothing is asserted.

Run:  PYTHONPATH=. .venv/bin/python benchmarks/serving_search.py [--store S --root R] [--p99-ms 15]
About 4 to 6 minutes on the 2-core machine after the sweep.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare_root(args) -> tuple[str, str]:
    """The store and deploy root of the Quick start sweep: swept now unless given."""
    if args.root:
        return args.store, args.root
    import yaml
    from rich.console import Console

    from cluster import connect
    from orchestrator.spec.schema import parse_spec
    from orchestrator.sweep import run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="serving-search-"))
    data = yaml.safe_load((ROOT / "examples" / "sweep.yaml").read_text())
    data["store"], data["deploy"]["root"] = str(tmp / "store"), str(tmp / "deploy")
    handle = connect(object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        run_sweep(parse_spec(data, "examples/sweep.yaml"), console=Console(file=io.StringIO()), write_report=False)
    finally:
        handle.shutdown()
    return str(tmp / "store"), str(tmp / "deploy")


def one_model(model: str, root: str, slots, args) -> dict:
    from aitune import deploy_root as layout
    from aitune.batching import batching_in_root
    from aitune.serving_config import current_versions
    from orchestrator.deploy.serving_measure import Load, ServingBench
    from orchestrator.deploy.serving_search import SearchSpace, coordinate_search, grid_search

    key = layout.device_class_key("cpu")
    versions = current_versions(root, model, key)
    space = SearchSpace(tuple(sorted(versions)), tuple(args.delays), tuple(args.replicas),
                        batching_in_root(Path(root), model, key).enabled)
    load = Load(args.requests, args.seconds)
    found = {}
    for name, how in (("search", coordinate_search), ("grid", grid_search)):
        bench = ServingBench(root, model, slots, key, versions, None, load)
        start = time.perf_counter()
        try:
            outcome = how(space, args.concurrency, args.p99_ms, bench)
        finally:
            bench.close()
        found[name] = (outcome, time.perf_counter() - start)
    return {"model": model, "space": space, **found}


def show(result: dict, args) -> tuple[float, bool]:
    from orchestrator.outcome import frontier

    (search, search_s), (grid, grid_s) = result["search"], result["grid"]
    group = {"model": result["model"], "device": "cpu", "device_class_key": "cpu", "target": {"p99_ms": args.p99_ms},
             "points": [p.to_dict() for p in grid.points], "chosen": grid.chosen.to_dict() if grid.chosen else None,
             "meets_target": grid.meets_target, "tried": len(grid.tried), "grid": len(result["space"].grid()),
             "measured": grid.measured, "reused": 0}
    print(f"\n{result['model']}: the grid's {len(grid.points)} points (every setting, concurrency {args.concurrency})")
    for line in frontier.lines([group]):
        print(line)
    s, g = search.chosen, grid.chosen
    print(f"search chose: {s.settings.label()} c={s.concurrency}: {s.throughput_rps:.1f} req/s, p99 {s.p99_ms:.2f} ms"
          f" ({'meets' if search.meets_target else 'MISSES'} the target); {len(search.tried)} settings, "
          f"{len(search.points)} points")
    print(f"grid chose:   {g.settings.label()} c={g.concurrency}: {g.throughput_rps:.1f} req/s, p99 {g.p99_ms:.2f} ms"
          f" ({'meets' if grid.meets_target else 'MISSES'} the target); {len(grid.tried)} settings, {len(grid.points)} points")
    ratio = search_s / grid_s
    close = search.meets_target == grid.meets_target and (
        s.throughput_rps >= 0.95 * g.throughput_rps if grid.meets_target else s.p99_ms <= 1.05 * g.p99_ms)
    print(f"time: search {search_s:.1f} s / grid {grid_s:.1f} s = {ratio:.2f} (goal <= 0.3: "
          f"{'met' if ratio <= 0.3 else 'MISSED'}); search's point within 5% of the grid's best at the target: "
          f"{'yes' if close else 'NO'} ({s.throughput_rps / g.throughput_rps:.3f} of its throughput; the same setting "
          f"and concurrency as the grid's: {'yes' if (s.settings, s.concurrency) == (g.settings, g.concurrency) else 'no'})")
    return ratio, close


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="a Quick start run's store (with --root)")
    parser.add_argument("--root", help="a Quick start run's deploy root (with --store)")
    parser.add_argument("--models", default="small_cnn,small_encoder")
    parser.add_argument("--p99-ms", type=float, default=15.0, help="the p99 target (ms)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--delays", default="0,1,2,5,10,20", help="queue delays (ms) to choose from")
    parser.add_argument("--replicas", default="1", help="replicas per device to choose from")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per point")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per point at most")
    args = parser.parse_args()
    if bool(args.store) != bool(args.root):
        parser.error("--store and --root go together")
    args.models = args.models.split(",")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.delays = [float(d) for d in args.delays.split(",")]
    args.replicas = [int(r) for r in args.replicas.split(",")]
    return args


def main() -> None:
    args = parse_args()
    from cluster import Inventory, connect, plan_deploy_targets
    from orchestrator.deploy.serve import direct_ingress_env, stop_serving
    from orchestrator.deploy.serve_request import free_port

    started = time.perf_counter()
    _, root = prepare_root(args)
    with direct_ingress_env(free_port("127.0.0.1")):
        handle = connect(object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        slots = plan_deploy_targets(Inventory.from_ray(), [{"cpu_slots": 1}])
        print(f"deploy root {root}; p99 target {args.p99_ms:g} ms; concurrency {args.concurrency}; delays "
              f"{args.delays} ms; replicas {args.replicas}; {args.requests} requests or {args.seconds:g} s a point")
        verdicts = [show(one_model(m, root, slots, args), args) for m in args.models]
    finally:
        stop_serving()
        handle.shutdown()
    print(f"\nall models: time ratios {', '.join(f'{r:.2f}' for r, _ in verdicts)}; within 5%: "
          f"{sum(c for _, c in verdicts)}/{len(verdicts)}; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
