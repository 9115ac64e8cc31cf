"""The max batch search (``batch_sizes: auto``) against the exhaustive grid over the same sizes.

Two sweeps of one model on fresh stores, each on its own embedded Ray: one searching the batch size
(batch 1 with every candidate, then powers of two with the fastest three of the size before, until
throughput gains under 5% twice or ``max_batch``), one tuning every candidate at every power of two
up to ``max_batch``. Prints the search's line, each sweep's builds and seconds (tuning and choosing),
the best throughput each found (rows/s of the fastest correct winner), and the ratios: the search's
time over the grid's (goal <= 0.3) and its best throughput over the grid's (goal >= 0.95).

    .venv/bin/python benchmarks/batch_search.py [--max-batch 64] [--width 512] [--depth 12]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402

from aitune.environment import cpu_name  # noqa: E402
from orchestrator.spec.schema import parse_spec  # noqa: E402
from orchestrator.sweep import run_sweep  # noqa: E402
from orchestrator.sweep.batch_search import search_lines  # noqa: E402

CANDIDATES = [
    {"backend": "TorchEagerBackend", "config": {}},
    {"backend": "TorchEagerBackend", "config": {"precision": "bfloat16", "autocast": True}},
    {"backend": "TorchInductorJitBackend", "config": {}},
    {"backend": "OnnxRuntimeBackend", "config": {}},
]


def spec_for(store: Path, batch_sizes, args) -> dict:
    return {
        "name": "batch-search", "store": str(store), "batch_sizes": batch_sizes, "max_batch": args.max_batch,
        "models": [{"name": "mlp", "factory": "aitune.examples:mlp", "kwargs": {"width": args.width, "depth": args.depth},
                    "inputs": [{"name": "x", "shape": [args.width]}]}],
        "candidates": CANDIDATES,
        "measure": {"budget_s": args.budget_s},
        "workers": {"cpu_slots": 2, "threads_per_slot": 1},
    }


def best_rows_per_s(outcome) -> tuple[float, int]:
    by_key = {r.key: r for r in outcome.results}
    best = (0.0, 0)
    for s in outcome.selections:
        r = by_key.get(s.winner_key)
        if r is not None and r.median_ms:
            best = max(best, (1000.0 * s.batch_size / r.median_ms, s.batch_size))
    return best


def run(name: str, batch_sizes, args) -> dict:
    store = Path(tempfile.mkdtemp(prefix=f"aitune-{name}-"))
    spec = parse_spec(spec_for(store, batch_sizes, args))
    start = time.perf_counter()
    outcome = run_sweep(spec, console=Console(file=io.StringIO()), write_report=False, deploy=False)
    wall = time.perf_counter() - start
    rows_per_s, at = best_rows_per_s(outcome)
    return {"outcome": outcome, "builds": outcome.ran, "tune_s": outcome.tune_s + outcome.decide_s, "wall_s": wall,
            "rows_per_s": rows_per_s, "at": at}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--budget-s", type=float, default=0.3)
    args = parser.parse_args()
    grid_sizes = [2 ** i for i in range(args.max_batch.bit_length()) if 2 ** i <= args.max_batch]
    print(f"{cpu_name()}; mlp width {args.width} depth {args.depth}; {len(CANDIDATES)} candidates; "
          f"max_batch {args.max_batch}; grid {grid_sizes}")
    search = run("search", "auto", args)
    grid = run("grid", grid_sizes, args)
    names = {r.device_class_key: r.device_name for r in search["outcome"].results}
    for line in search_lines(search["outcome"].batch_search, names):
        print(line)
    for name, r in (("search", search), ("grid", grid)):
        print(f"{name}: {r['builds']} builds, tuning and choosing {r['tune_s']:.1f} s (whole sweep {r['wall_s']:.1f} s); "
              f"best {r['rows_per_s']:,.0f} rows/s at batch {r['at']}")
        print("  winners: " + ", ".join(f"b{s.batch_size} {s.winner}" for s in sorted(r["outcome"].selections,
                                                                                      key=lambda s: s.batch_size)))
    print(f"search / grid time: {search['tune_s'] / grid['tune_s']:.2f} (goal <= 0.3); best throughput: "
          f"{search['rows_per_s'] / grid['rows_per_s']:.3f} of the grid's (goal >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
