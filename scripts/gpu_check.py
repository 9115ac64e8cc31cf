"""GPU check: a sweep through the orchestrator on real GPUs, then the winners confirmed outside it.

Runs the GPU default candidate set (no max-autotune), one worker per GPU, on three models built
from their architectures with random weights (no downloads):

- a ResNet-50-like CNN at batches 1 and 32 (224x224 images),
- a BERT-base-like encoder at batch 8 with 128 tokens,
- a 12-layer 512-wide MLP at batch 1.

It prints the sweep's table (build s, median and p99 ms, speedup over eager fp32, worst error,
peak GPU memory) and the winner per model, then loads each group's top three checkpoints from
the store and measures them again interleaved on one GPU, outside the orchestrator.

On an offline GPU machine (Python 3.12, torch with CUDA) with the wheels from
``shared/tools/gpu-wheels.sh``::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD   # absolute: Ray workers start in other directories
    python3 scripts/gpu_check.py --store /tmp/gpu-store

Everything is sized to finish in under 8 minutes on one H100/H200; ``--total-s`` caps the
dispatching of new candidates (the rest are reported as skipped).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

MODELS = {
    "resnet50": {
        "factory": "aitune.examples:resnet50",
        "inputs": [{"name": "image", "shape": [3, 224, 224]}],
        "batch_sizes": [1, 32],
    },
    "bert_base": {
        "factory": "aitune.examples:bert_base",
        "inputs": [{"name": "input_ids", "shape": [128], "dtype": "int64", "int_range": [0, 30522]}],
        "batch_sizes": [8],
    },
    "mlp_12x512": {
        "factory": "aitune.examples:mlp",
        "kwargs": {"width": 512, "depth": 12},
        "inputs": [{"name": "x", "shape": [512]}],
        "batch_sizes": [1],
    },
}


def build_spec(args) -> dict:
    models = [{"name": name, **MODELS[name]} for name in args.models]
    return {
        "name": "gpu-check",
        "models": models,
        "batch_sizes": [1],  # each model names its own
        "objective": "min_latency",
        "measure": {"budget_s": args.measure_s, "min_iters": 20, "warmup_iters": 10},
        "budgets": {"build_timeout_s": 300, "measure_timeout_s": 120, "total_s": args.total_s},
        # fp16 on random weights: a deep stack accumulates more than the default 1e-2
        "tolerances": {"float16": {"atol": 5e-2, "rtol": 5e-2}, "bfloat16": {"atol": 1e-1, "rtol": 1e-1}},
        "store": args.store,
        "deploy": {"targets": ["all_gpus"]} if args.deploy else {"targets": []},
    }


def confirm_top3(outcome, console: Console, device: torch.device) -> None:
    """Load each group's top three checkpoints and measure them interleaved, outside the orchestrator."""
    from aitune.checkpoint import load_checkpoint
    from aitune.measure import MeasureConfig, interleaved
    from orchestrator.candidates import make_sample
    from orchestrator.spec import parse_spec
    from orchestrator.store import Store

    spec = parse_spec(outcome.spec_dict)
    with Store(outcome.store) as store:
        for sel in outcome.selections:
            group = [r for r in outcome.results if (r.model, r.batch_size, r.device_class_key) == (sel.model, sel.batch_size, sel.device_class_key)]
            ranked = sorted((r for r in group if r.eligible), key=lambda r: r.median_ms)[:3]
            if len(ranked) < 2:
                continue
            fns, names = {}, {}
            for r in ranked:
                backend = load_checkpoint(store.checkpoint_dir(r), device, allow_factories=True, allow_backends=True)  # our own store
                backend.deploy(device)
                fns[r.key], names[r.key] = backend.infer, r.candidate
            sample = make_sample(spec.model(sel.model), sel.batch_size).to(device)
            ms = interleaved(fns, sample, device, MeasureConfig(budget_s=2.0, min_iters=30))
            best = min(ms, key=lambda k: ms[k].median_ms)
            console.print(f"\n[bold]{sel.model} b{sel.batch_size}[/bold]: top {len(ranked)} re-measured interleaved")
            for k, m in sorted(ms.items(), key=lambda kv: kv[1].median_ms):
                mark = " <- fastest" if k == best else ""
                console.print(f"  {names[k]:<70} median {m.median_ms:8.3f} ms  p99 {m.p99_ms:8.3f} ms{mark}")
            agree = "confirmed" if best == sel.winner_key else f"NOT confirmed (sweep picked {sel.winner})"
            console.print(f"  sweep winner {agree}")
            del fns
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "aitune-gpu-check"))
    parser.add_argument("--measure-s", type=float, default=1.0)
    parser.add_argument("--total-s", type=float, default=330.0, help="stop dispatching new candidates after this")
    parser.add_argument("--deploy", action="store_true", help="also deploy the winners to every GPU")
    parser.add_argument("--force", action="store_true", help="ignore results already in the store")
    parser.add_argument("--cpu", action="store_true",
                        help="rehearse the whole flow on the CPU (CPU candidates, 2 CPU workers): tests the script without a GPU")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu:
        print("gpu_check: no CUDA device visible to torch; this script needs a GPU (or --cpu to rehearse)", file=sys.stderr)
        return 2
    from orchestrator.spec import parse_spec
    from orchestrator.sweep import run_sweep

    console = Console(width=220)
    device = torch.device("cpu" if args.cpu else "cuda:0")
    where = "the CPU (rehearsal)" if args.cpu else f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    console.print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, on {where}")
    spec_dict = build_spec(args)
    if args.cpu:
        spec_dict["workers"] = {"use_gpus": False, "cpu_slots": 2, "threads_per_slot": 1}
    start = time.monotonic()
    outcome = run_sweep(parse_spec(spec_dict), force=args.force, deploy=args.deploy, console=console, live=False)
    outcome.spec_dict = spec_dict
    console.print(f"\nsweep: {outcome.ran} run, {outcome.reused} from store, tuning {outcome.tune_s:.0f} s, total {time.monotonic() - start:.0f} s")
    for sel in outcome.selections:
        speedup = f"{sel.speedup:.2f}x" if sel.speedup else "-"
        console.print(f"winner {sel.model} b{sel.batch_size}: {sel.winner} ({speedup} over eager fp32) {sel.reason}")
    confirm_top3(outcome, console, device)
    console.print(f"\ngpu_check done in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
