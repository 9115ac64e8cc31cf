"""One-process tuning (``aitune.tune``) of the two example models over the CPU backends.

Prints each model's table (build s, median and p99 ms, speedup over eager fp32, worst error,
status) and the winners. Timings on a shared 2-core machine vary 2-3x between runs: read the
speedups, which are measured side by side in one run, not the absolute numbers.

    .venv/bin/python benchmarks/tune_cpu.py [--batch 8] [--budget-s 1.0] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import aitune  # noqa: E402
from aitune import examples  # noqa: E402
from aitune.environment import cpu_name  # noqa: E402
from aitune.measure import MeasureConfig  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budget-s", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}")
    models = {
        "small_cnn": (aitune.attach_factory(examples.small_cnn(), "aitune.examples:small_cnn"), examples.image_sample),
        "small_encoder": (aitune.attach_factory(examples.small_encoder(), "aitune.examples:small_encoder"), examples.token_sample),
    }
    summary = []
    for name, (module, make_sample) in models.items():
        for batch in args.batch:
            start = time.perf_counter()
            result = aitune.tune(module, [make_sample(batch)], device="cpu",
                                 measure_config=MeasureConfig(budget_s=args.budget_s, threads=args.threads))
            print(f"\n== {name}, batch {batch} ({time.perf_counter() - start:.0f} s)\n{result.table()}")
            winner = result.winner
            summary.append((name, batch, winner.name if winner else "-", winner.speedup if winner else None, result.reason))
    print("\nwinners:")
    for name, batch, winner, speedup, reason in summary:
        print(f"  {name:<14} b{batch:<3} {winner:<55} {f'{speedup:.2f}x' if speedup else '-':>7}  {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
