"""GPU check: a sweep through the orchestrator on real GPUs, then the winners confirmed outside it.

Runs the GPU default candidate set (no max-autotune), one worker per GPU, on three models built
from their architectures with random weights (no downloads):

- a ResNet-50-like CNN at batches 1 and 32 (224x224 images),
- a BERT-base-like encoder at batch 8 with 128 tokens,
- a 12-layer 512-wide MLP at batch 1.

It prints the sweep's table (build s, median and p99 ms, speedup over eager fp32, worst error,
peak GPU memory) and the winner per model, then loads each group's top three checkpoints from
the store and measures them again interleaved on one GPU, outside the orchestrator, with TF32
off as in the sweep's workers.

On an offline GPU machine (Python 3.12, torch with CUDA) with the wheels from
``shared/tools/gpu-wheels.sh``::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD   # absolute: Ray workers start in other directories
    python3 scripts/gpu_check.py --store /tmp/gpu-store --time-left-s 480   # the device time left

Builds cost from under a second (eager) to over a minute (AOTInductor on ResNet-50), and one
worker takes its jobs model by model, so the sweep runs in two stages, cheap builds first: one
sweep of every candidate that builds in seconds (eager, CUDA graphs, torch.compile) on every
model, then one of the whole set, which reuses the first stage's results from the store and
builds the rest (AOTInductor, TensorRT, ONNX Runtime). Models go cheapest first.

``--total-s`` caps the dispatching of new candidates over both stages; ``--time-left-s`` sizes
it (and the build timeout) from the device time really left. Whatever did not run is printed
as skipped.
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

# Cheapest to build first: the sweep takes them in this order whatever order --models names.
MODELS = {
    "mlp_12x512": {
        "factory": "aitune.examples:mlp",
        "kwargs": {"width": 512, "depth": 12},
        "inputs": [{"name": "x", "shape": [512]}],
        "batch_sizes": [1],
    },
    "bert_base": {
        "factory": "aitune.examples:bert_base",
        "inputs": [{"name": "input_ids", "shape": [128], "dtype": "int64", "int_range": [0, 30522]}],
        "batch_sizes": [8],
    },
    "resnet50": {
        "factory": "aitune.examples:resnet50",
        "inputs": [{"name": "image", "shape": [3, 224, 224]}],
        "batch_sizes": [1, 32],
    },
}

# Built from an exported program or an ONNX file: up to minutes each, where the others take
# seconds to tens of seconds. They run in the second stage.
SLOW_BUILDS = frozenset({"TorchInductorAotBackend", "TensorRTBackend", "OnnxRuntimeBackend"})
BUILD_TIMEOUT_S, MEASURE_TIMEOUT_S, TOTAL_S = 300.0, 120.0, 330.0
# Kept out of --total-s by --time-left-s: starting Ray and the workers for two stages, the top-3
# re-measure, shutting down.
RESERVE_S = 60.0


def stages(candidates: list) -> list[list | None]:
    """The candidates of each sweep: first those that build quickly, then all (``None``: the default set)."""
    quick = [c for c in candidates if c[0] not in SLOW_BUILDS]
    return [quick, None] if 0 < len(quick) < len(candidates) else [None]


def limits_for(time_left_s: float) -> dict[str, float]:
    """Budgets that fit ``time_left_s``: the last candidate dispatched may still build and measure in full."""
    build = min(BUILD_TIMEOUT_S, max(60.0, time_left_s / 4))
    measure = 60.0
    total = time_left_s - RESERVE_S - build - measure
    if total < 30:
        raise ValueError(f"--time-left-s {time_left_s:.0f}: too little for a sweep; it needs at least "
                         f"{RESERVE_S + build + measure + 30:.0f} s")
    return {"build_timeout_s": build, "measure_timeout_s": measure, "total_s": total}


def build_spec(args, candidates: list | None = None, total_s: float | None = None) -> dict:
    """The sweep spec; ``candidates`` (backend, config) pairs, ``None`` for the device's default set."""
    models = [{"name": name, **MODELS[name]} for name in MODELS if name in args.models]
    budgets = {
        "build_timeout_s": getattr(args, "build_timeout_s", BUILD_TIMEOUT_S),
        "measure_timeout_s": getattr(args, "measure_timeout_s", MEASURE_TIMEOUT_S),
        "total_s": args.total_s if total_s is None else total_s,
    }
    spec = {
        "name": "gpu-check",
        "models": models,
        "batch_sizes": [1],  # each model names its own
        "objective": "min_latency",
        "measure": {"budget_s": args.measure_s, "min_iters": 20, "warmup_iters": 10},
        "budgets": budgets,
        # fp16 on random weights: a deep stack accumulates more than the default 1e-2
        "tolerances": {"float16": {"atol": 5e-2, "rtol": 5e-2}, "bfloat16": {"atol": 1e-1, "rtol": 1e-1}},
        "store": args.store,
        "deploy": {"targets": ["all_gpus"]} if args.deploy else {"targets": []},
    }
    if candidates is not None:
        spec["candidates"] = [{"backend": name, "config": dict(config)} for name, config in candidates]
    return spec


def use_worker_tf32_settings(device: torch.device) -> None:
    """TF32 off, as in the sweep's GPU workers: re-measured under other settings, an fp32
    candidate would run faster (and compute differently) than when it was judged."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def skipped_lines(results, never_tried: list[str]) -> list[str]:
    """What did not run: candidates the time budget left undispatched, and stages never started."""
    lines = [f"  {r.model} b{r.batch_size}: {r.candidate} ({r.error or 'skipped'})" for r in results if r.status == "skipped"]
    lines += [f"  {what} (no time left for its stage)" for what in never_tried]
    return lines


def confirm_top3(outcome, console: Console, device: torch.device) -> None:
    """Load each group's top three checkpoints and measure them interleaved, outside the orchestrator."""
    from aitune.checkpoint import load_checkpoint
    from aitune.measure import MeasureConfig, interleaved
    from orchestrator.candidates import make_sample
    from orchestrator.spec import parse_spec
    from orchestrator.store import Store

    spec = parse_spec(outcome.spec_dict)
    use_worker_tf32_settings(device)
    with Store(outcome.store) as store:
        for sel in outcome.selections:
            group = [r for r in outcome.results if (r.model, r.batch_size, r.device_class_key) == (sel.model, sel.batch_size, sel.device_class_key)]
            ranked = sorted((r for r in group if r.eligible), key=lambda r: r.median_ms)[:3]
            if len(ranked) < 2:
                continue
            fns, names = {}, {}
            for r in ranked:
                backend = load_checkpoint(store.checkpoint_path(r), device, manifest_sha256=r.manifest_sha256,
                                          allow_factories=True, allow_backends=True)  # our own store
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
    parser.add_argument("--total-s", type=float, default=None,
                        help=f"stop dispatching new candidates after this, over both stages (default {TOTAL_S:.0f})")
    parser.add_argument("--time-left-s", type=float, default=None,
                        help="the device time left: sizes --total-s and the build timeout so that the run ends within it")
    parser.add_argument("--deploy", action="store_true", help="also deploy the winners to every GPU")
    parser.add_argument("--force", action="store_true",
                        help="reuse nothing from earlier runs: sweep into a new store folder inside --store")
    parser.add_argument("--cpu", action="store_true",
                        help="rehearse the whole flow on the CPU (CPU candidates, 2 CPU workers): tests the script without a GPU")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu:
        print("gpu_check: no CUDA device visible to torch; this script needs a GPU (or --cpu to rehearse)", file=sys.stderr)
        return 2
    if args.time_left_s is not None:
        try:
            limits = limits_for(args.time_left_s)
        except ValueError as exc:
            print(f"gpu_check: {exc}", file=sys.stderr)
            return 2
        args.build_timeout_s, args.measure_timeout_s = limits["build_timeout_s"], limits["measure_timeout_s"]
        if args.total_s is None:
            args.total_s = limits["total_s"]
    if args.total_s is None:
        args.total_s = TOTAL_S
    if args.force:
        # Both stages must rebuild, yet the second must reuse what the first built: a store of
        # their own does both.
        args.store = str(Path(args.store) / time.strftime("run-%Y%m%d-%H%M%S"))
    from aitune.defaults import candidates_for
    from aitune.torch.backend.registry import display_name
    from orchestrator.spec import parse_spec
    from orchestrator.sweep import run_sweep

    console = Console(width=220)
    device = torch.device("cpu" if args.cpu else "cuda:0")
    where = "the CPU (rehearsal)" if args.cpu else f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    console.print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, on {where}")
    console.print(f"budgets: dispatch {args.total_s:.0f} s over both stages, build timeout "
                  f"{getattr(args, 'build_timeout_s', BUILD_TIMEOUT_S):.0f} s; store {args.store}")
    start = time.monotonic()
    deadline = start + args.total_s
    everything = candidates_for(device.type)
    plan = stages(everything)
    outcome, never_tried = None, []
    for number, candidates in enumerate(plan, 1):
        last = number == len(plan)
        left = deadline - time.monotonic()
        if outcome is not None and left <= 0:
            never_tried = [f"every model: {display_name(name, config)}"
                           for name, config in everything if (name, config) not in plan[0]]
            break
        which = "cheap builds" if candidates is not None else "every candidate"
        console.print(f"\n[bold]stage {number}/{len(plan)}[/bold]: {which}, {max(left, 1.0):.0f} s to dispatch")
        spec_dict = build_spec(args, candidates, total_s=max(left, 1.0))
        if args.cpu:
            spec_dict["workers"] = {"use_gpus": False, "cpu_slots": 2, "threads_per_slot": 1}
        outcome = run_sweep(parse_spec(spec_dict), deploy=args.deploy and last, console=console, live=False,
                            write_report=last)
        outcome.spec_dict = spec_dict
        console.print(f"stage {number}: {outcome.ran} run, {outcome.reused} from store, tuning {outcome.tune_s:.0f} s, "
                      f"{time.monotonic() - start:.0f} s since the start", markup=False, highlight=False)
    skipped = skipped_lines(outcome.results, never_tried)
    console.print(f"skipped: {len(skipped) or 'none'}", markup=False, highlight=False)
    for line in skipped:
        console.print(line, markup=False, highlight=False)
    for sel in outcome.selections:
        speedup = f"{sel.speedup:.2f}x" if sel.speedup else "-"
        console.print(f"winner {sel.model} b{sel.batch_size}: {sel.winner} ({speedup} over eager fp32) {sel.reason}")
    confirm_top3(outcome, console, device)
    console.print(f"\ngpu_check done in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
