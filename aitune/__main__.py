"""``python -m aitune``: tune the example CNN on this machine's CPU in one process and print the table."""

from __future__ import annotations

import argparse
import warnings

import torch

import aitune
from aitune import examples
from aitune.measure import MeasureConfig


def main(argv: list[str] | None = None) -> int:
    # torch's own pytree deprecation, raised inside torch.export: nothing a user can act on
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    parser = argparse.ArgumentParser(prog="python -m aitune", description=__doc__)
    parser.add_argument("--model", choices=["cnn", "encoder"], default="cnn")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=1.0, help="measuring time per candidate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.model == "cnn":
        module = aitune.attach_factory(examples.small_cnn(), "aitune.examples:small_cnn")
        sample = examples.image_sample(args.batch)
    else:
        module = aitune.attach_factory(examples.small_encoder(), "aitune.examples:small_encoder")
        sample = examples.token_sample(args.batch)
    result = aitune.tune(module, [sample], device="cpu", measure_config=MeasureConfig(budget_s=args.budget_s, threads=args.threads))
    print(result.table())
    winner = result.winner.name if result.winner else "none"
    print(f"\nwinner: {winner} ({result.reason}); threads={torch.get_num_threads()}")
    d = result.decision or {}
    if d.get("rounds"):
        print(f"decided in {d['rounds']} interleaved rounds ({d['seconds']:.1f} s): {d['stop']}, "
              f"P(best) {d['p_best']:.2f}; the table's speedups for {', '.join(d['contenders'])} are from those rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
