"""GPU check: a sweep through the orchestrator on real GPUs, sized to the device time left.

Runs the GPU default candidate set (no max-autotune), one worker per GPU, on models built from
their architectures with random weights (no downloads):

- a ResNet-50-like CNN at batches 1 and 32 (224x224 images),
- a BERT-base-like encoder at batch 8 with 128 tokens,
- a 12-layer 512-wide MLP at batch 1.

With ``--time-left-s`` (a lent machine, whose minutes are counted) it takes fewer models by
default (the MLP at batch 1, ResNet-50 at batch 32: a CUDA-graph win and an AOTInductor win),
and everything it does is planned to end with ``SPARE_S`` (60 s) of that time to spare. The plan
is printed before anything starts:

1. stage 1: AOTInductor first (the slowest builds, and the winner at large batches), its package
   compiled once per model and shape and run both with and without CUDA graphs, beside eager fp32;
2. stage 2: every other candidate (eager fp16/bf16, CUDA graphs, torch.compile, and TensorRT or
   ONNX Runtime where installed), reusing stage 1's results from the store;
3. each stage's tail: the last build and measurement in flight when its dispatching stops, then
   the winners' decision rounds (capped per group), then the report;
4. optionally (``--confirm``) each group's top three reloaded from the store and re-measured
   interleaved outside the orchestrator (TF32 off, as in the workers), group by group while the
   plan's time lasts.

A hard stop guards the plan: where builds run past what was planned, the sweep is interrupted at
``time-left - SPARE_S - SHUTDOWN_S`` (what finished is kept in the store) and the script ends
with exit code 3. Whatever did not run is printed as skipped.

On an offline GPU machine (Python 3.12, torch with CUDA) with the wheels from
``shared/tools/gpu-wheels.sh`` (``scripts/gpu_first_run.sh`` does all of this)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD   # absolute: Ray workers start in other directories
    python3 scripts/gpu_check.py --store /tmp/gpu-store --time-left-s 360   # the device time left
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import tempfile
import threading
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
# On a lent machine (--time-left-s) by default: one CUDA-graph win, one AOTInductor win.
LENT_MODELS = {"mlp_12x512": [1], "resnet50": [32]}

#: the candidates of the first stage: the slowest builds, whose package serves two candidates
FIRST = "TorchInductorAotBackend"

# The plan's figures, in seconds. Startup: Ray, a worker per GPU (torch, CUDA, the model). Tail:
# what a stage's last build and measurement typically take once dispatching stops (the hard stop
# covers the rest). Decision rounds: the cap per group, plus its first rounds.
SPARE_S = 60.0
SHUTDOWN_S = 15.0
STARTUP_S = 20.0
TAIL_S = 45.0
REPORT_S = 10.0
DECISION_CAP_S = {1: 2.0, 2: 8.0}
DECISION_FIRST_ROUNDS_S = 3.0
CONFIRM_S = 25.0  # per group: three checkpoints loaded (a JIT one compiles again) and re-measured
#: of the time for dispatching, what stage 1 may take at most (it usually needs less, and stage 2
#: then starts earlier with the same end)
FIRST_SHARE = 0.45
BUILD_TIMEOUT_S, MEASURE_TIMEOUT_S = 150.0, 30.0
DEFAULT_TIME_LEFT_S = 900.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """When each step runs, in seconds from the start; built by :func:`make_plan`."""

    time_left_s: float
    groups: int
    confirm: bool
    stage1_dispatch_end: float
    stage1_end: float
    stage2_start: float
    stage2_dispatch_end: float
    stage2_end: float
    confirm_end: float
    hard_stop: float
    build_timeout_s: float
    measure_timeout_s: float

    def lines(self) -> list[str]:
        g = self.groups
        dec = {n: g * (DECISION_CAP_S[n] + DECISION_FIRST_ROUNDS_S) for n in (1, 2)}
        out = [
            f"plan: {self.time_left_s:.0f} s of device time left, {g} group(s); all done by {self.hard_stop + SHUTDOWN_S:.0f} s, "
            f"{SPARE_S:.0f} s to spare",
            f"  {0:5.0f} s  start Ray and one worker per GPU (~{STARTUP_S:.0f} s)",
            f"  {STARTUP_S:5.0f} s  stage 1: {FIRST} (one package per group, with and without CUDA graphs) and eager fp32; "
            f"dispatch until {self.stage1_dispatch_end:.0f} s",
            f"  {self.stage1_dispatch_end:5.0f} s  stage 1 tail: last build and measure (~{TAIL_S:.0f} s), decision rounds "
            f"{g} x {DECISION_CAP_S[1] + DECISION_FIRST_ROUNDS_S:.0f} s; ends by {self.stage1_end:.0f} s (earlier: stage 2 starts then)",
            f"  {self.stage2_start:5.0f} s  stage 2: every other candidate, stage 1 reused from the store; dispatch until "
            f"{self.stage2_dispatch_end:.0f} s",
            f"  {self.stage2_dispatch_end:5.0f} s  stage 2 tail: last build and measure (~{TAIL_S:.0f} s), decision rounds "
            f"{g} x {DECISION_CAP_S[2] + DECISION_FIRST_ROUNDS_S:.0f} s = {dec[2]:.0f} s, report {REPORT_S:.0f} s; ends by "
            f"{self.stage2_end:.0f} s",
            (f"  {self.stage2_end:5.0f} s  confirmation: top 3 per group re-measured outside the orchestrator, "
             f"{CONFIRM_S:.0f} s a group while time lasts; ends by {self.confirm_end:.0f} s") if self.confirm else
            f"  {self.stage2_end:5.0f} s  confirmation: off (--confirm re-measures each group's top 3 outside the orchestrator)",
            f"  {self.hard_stop:5.0f} s  hard stop: whatever still runs is interrupted (finished results stay in the store); "
            f"shutting down takes up to {SHUTDOWN_S:.0f} s",
            f"  limits: build timeout {self.build_timeout_s:.0f} s, measure timeout {self.measure_timeout_s:.0f} s",
        ]
        return out


def make_plan(time_left_s: float, groups: int, confirm: bool = False) -> Plan:
    """The plan that fits ``time_left_s``, with ``SPARE_S`` to spare; ``ValueError`` where none does."""
    hard_stop = time_left_s - SPARE_S - SHUTDOWN_S
    dec = {n: groups * (DECISION_CAP_S[n] + DECISION_FIRST_ROUNDS_S) for n in (1, 2)}
    confirm_s = groups * CONFIRM_S if confirm else 0.0
    fixed = 2 * STARTUP_S + 2 * TAIL_S + dec[1] + dec[2] + REPORT_S + confirm_s
    dispatch = hard_stop - fixed
    if dispatch < 60:
        raise ValueError(f"--time-left-s {time_left_s:.0f}: too little for a sweep of {groups} group(s); it needs at least "
                         f"{time_left_s - dispatch + 60:.0f} s" + (" (or leave out --confirm)" if confirm else ""))
    first = dispatch * FIRST_SHARE
    stage1_dispatch_end = STARTUP_S + first
    stage1_end = stage1_dispatch_end + TAIL_S + dec[1]
    stage2_start = stage1_end + STARTUP_S
    stage2_dispatch_end = stage2_start + (dispatch - first)
    stage2_end = stage2_dispatch_end + TAIL_S + dec[2] + REPORT_S
    build = min(BUILD_TIMEOUT_S, max(60.0, dispatch))
    return Plan(time_left_s, groups, confirm, stage1_dispatch_end, stage1_end, stage2_start, stage2_dispatch_end,
                stage2_end, stage2_end + confirm_s, hard_stop, build, MEASURE_TIMEOUT_S)


def stages(candidates: list) -> list[list | None]:
    """The candidates of each sweep: AOTInductor first, then all (``None``: the default set)."""
    first = [c for c in candidates if c[0] == FIRST]
    return [first, None] if 0 < len(first) < len(candidates) else [None]


def chosen_models(args) -> dict[str, list[int]]:
    """Model name -> batch sizes: those named by --models, else the lent machine's few, else all."""
    if args.models:
        return {name: MODELS[name]["batch_sizes"] for name in MODELS if name in args.models}
    if args.time_left_s is not None:
        return dict(LENT_MODELS)
    return {name: m["batch_sizes"] for name, m in MODELS.items()}


def build_spec(args, candidates: list | None = None, total_s: float = 300.0, decision_cap_s: float | None = None) -> dict:
    """The sweep spec; ``candidates`` (backend, config) pairs, ``None`` for the device's default set."""
    from orchestrator.spec.schema import SweepSpec

    chosen = chosen_models(args)
    models = [{"name": name, **MODELS[name], "batch_sizes": chosen[name]} for name in MODELS if name in chosen]
    spec = {
        "name": "gpu-check",
        "models": models,
        "batch_sizes": [1],  # each model names its own
        "objective": "min_latency",
        "measure": {"budget_s": args.measure_s, "min_iters": 20, "warmup_iters": 10},
        "budgets": {"build_timeout_s": args.build_timeout_s, "measure_timeout_s": args.measure_timeout_s,
                    "total_s": max(total_s, 1.0)},
        # fp16 on random weights: a deep stack accumulates more than the default 1e-2
        "tolerances": {"float16": {"atol": 5e-2, "rtol": 5e-2}, "bfloat16": {"atol": 1e-1, "rtol": 1e-1}},
        "store": args.store,
        "deploy": {"targets": ["all_gpus"]} if args.deploy else {"targets": []},
    }
    if decision_cap_s is not None and "decision" in SweepSpec.model_fields:  # the decision rounds' cap per group
        spec["decision"] = {"cap_s": decision_cap_s}
    if candidates is not None:
        spec["candidates"] = [{"backend": name, "config": dict(config)} for name, config in candidates]
    return spec


def skipped_lines(results, never_tried: list[str]) -> list[str]:
    """What did not run: candidates the time budget left undispatched, and stages never started."""
    lines = [f"  {r.model} b{r.batch_size}: {r.candidate} ({r.error or 'skipped'})" for r in results if r.status == "skipped"]
    lines += [f"  {what} (no time left for its stage)" for what in never_tried]
    return lines


def confirm_top3(outcome, console: Console, device: torch.device, deadline: float) -> list[str]:
    """Load each group's top three checkpoints and measure them interleaved, outside the orchestrator,
    group by group while ``CONFIRM_S`` still fits before ``deadline`` (``time.monotonic()``); returns
    the groups left unconfirmed."""
    from aitune.checkpoint import load_checkpoint
    from aitune.measure import MeasureConfig, interleaved
    from aitune.torch.precision import use_fp32_reference_settings
    from aitune.shapes import parse_label
    from orchestrator.planning.candidates import make_sample
    from orchestrator.spec.schema import parse_spec
    from orchestrator.store import SqliteStore

    spec = parse_spec(outcome.spec_dict)
    use_fp32_reference_settings(device)  # as in the sweep's GPU workers
    left_out = []
    with SqliteStore(outcome.store) as store:
        for sel in outcome.selections:
            if time.monotonic() + CONFIRM_S > deadline:
                left_out.append(f"{sel.model} b{sel.batch_size}")
                continue
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
            sample = make_sample(spec.model(sel.model), sel.batch_size, parse_label(sel.shape)).to(device)
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
    return left_out


class HardStop:
    """Sends the main thread SIGINT at ``at`` (``time.monotonic()``): the main thread gets a
    ``KeyboardInterrupt`` as from Ctrl-C, even where it waits in a blocking call, and the sweep
    stops its workers and keeps what finished in the store."""

    def __init__(self, at: float) -> None:
        self.fired = False
        self._timer = threading.Timer(max(at - time.monotonic(), 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # wakes a blocking call there too

    def cancel(self) -> None:
        self._timer.cancel()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                        help=f"default: all; with --time-left-s {', '.join(f'{m} b{b[0]}' for m, b in LENT_MODELS.items())}")
    parser.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "aitune-gpu-check"))
    parser.add_argument("--measure-s", type=float, default=1.0)
    parser.add_argument("--time-left-s", type=float, default=None,
                        help=f"the device time left (a lent machine): the plan ends {SPARE_S:.0f} s before it "
                             f"(default {DEFAULT_TIME_LEFT_S:.0f}, and every model)")
    parser.add_argument("--confirm", action="store_true",
                        help="re-measure each group's top three outside the orchestrator, while the plan's time lasts")
    parser.add_argument("--deploy", action="store_true", help="also deploy the winners to every GPU")
    parser.add_argument("--force", action="store_true",
                        help="reuse nothing from earlier runs: sweep into a new store folder inside --store")
    parser.add_argument("--cpu", action="store_true",
                        help="rehearse the whole flow on the CPU (CPU candidates, 2 CPU workers): tests the script without a GPU")
    parser.add_argument("--plan-only", action="store_true", help="print the plan and stop")
    args = parser.parse_args(argv)
    start = time.monotonic()
    if not torch.cuda.is_available() and not args.cpu:
        print("gpu_check: no CUDA device visible to torch; this script needs a GPU (or --cpu to rehearse)", file=sys.stderr)
        return 2
    groups = sum(len(b) for b in chosen_models(args).values())
    try:
        plan = make_plan(args.time_left_s if args.time_left_s is not None else DEFAULT_TIME_LEFT_S, groups, args.confirm)
    except ValueError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    args.build_timeout_s, args.measure_timeout_s = plan.build_timeout_s, plan.measure_timeout_s
    if args.force:
        # Both stages must rebuild, yet the second must reuse what the first built: a store of
        # their own does both.
        args.store = str(Path(args.store) / time.strftime("run-%Y%m%d-%H%M%S"))

    console = Console(width=220)
    device = torch.device("cpu" if args.cpu else "cuda:0")
    where = "the CPU (rehearsal)" if args.cpu else f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    console.print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, on {where}; store {args.store}",
                  markup=False, highlight=False)
    console.print(f"models: {', '.join(f'{m} b{b}' for m, bs in chosen_models(args).items() for b in bs)}",
                  markup=False, highlight=False)
    for line in plan.lines():
        console.print(line, markup=False, highlight=False)
    if args.plan_only:
        return 0
    stop = HardStop(start + plan.hard_stop)
    try:
        return _run(args, plan, console, device, start, stop)
    except KeyboardInterrupt:
        if not stop.fired:
            raise
        console.print(f"hard stop at {time.monotonic() - start:.0f} s: the sweep was interrupted as planned; what finished "
                      f"is in the store {args.store}", markup=False, highlight=False)
        return 3
    finally:
        stop.cancel()


def _run(args, plan: Plan, console: Console, device: torch.device, start: float, stop: HardStop) -> int:
    from aitune.defaults import candidates_for
    from aitune.torch.backend.registry import display_name
    from orchestrator.spec.schema import parse_spec
    from orchestrator.sweep import run_sweep

    everything = candidates_for(device.type)
    staged = stages(everything)
    ends = [plan.stage1_dispatch_end, plan.stage2_dispatch_end][-len(staged):]
    outcome, never_tried = None, []
    for number, (candidates, dispatch_end) in enumerate(zip(staged, ends), 1):
        last = number == len(staged)
        left = start + dispatch_end - time.monotonic()
        if outcome is not None and left <= 5:
            never_tried = [f"every model: {display_name(name, config)}"
                           for name, config in everything if (name, config) not in staged[0]]
            break
        which = f"{FIRST} and eager fp32" if candidates is not None else "every candidate"
        console.print(f"\n[bold]stage {number}/{len(staged)}[/bold] at {time.monotonic() - start:.0f} s: {which}, "
                      f"{max(left, 1.0):.0f} s to dispatch")
        cap = DECISION_CAP_S[2 if last else 1]
        spec_dict = build_spec(args, candidates, total_s=left, decision_cap_s=cap)
        if args.cpu:
            spec_dict["workers"] = {"use_gpus": False, "cpu_slots": 2, "threads_per_slot": 1}
        outcome = run_sweep(parse_spec(spec_dict), deploy=args.deploy and last, console=console, live=False,
                            write_report=last)
        outcome.spec_dict = spec_dict
        console.print(f"stage {number}: {outcome.ran} run, {outcome.reused} from store, tuning {outcome.tune_s:.0f} s, "
                      f"ended at {time.monotonic() - start:.0f} s (planned by {plan.stage2_end if last else plan.stage1_end:.0f} s)",
                      markup=False, highlight=False)
    skipped = skipped_lines(outcome.results, never_tried)
    console.print(f"skipped: {len(skipped) or 'none'}", markup=False, highlight=False)
    for line in skipped:
        console.print(line, markup=False, highlight=False)
    for sel in outcome.selections:
        speedup = f"{sel.speedup:.2f}x" if sel.speedup else "-"
        console.print(f"winner {sel.model} b{sel.batch_size}: {sel.winner} ({speedup} over eager fp32) {sel.reason}")
    if args.confirm:
        left_out = confirm_top3(outcome, console, device, start + plan.hard_stop)
        if left_out:
            console.print(f"not confirmed (no time left): {', '.join(left_out)}", markup=False, highlight=False)
    console.print(f"\ngpu_check done in {time.monotonic() - start:.0f} s (planned by {plan.confirm_end:.0f} s, "
                  f"hard stop {plan.hard_stop:.0f} s, device time left {plan.time_left_s:.0f} s)", markup=False, highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
