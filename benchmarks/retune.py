"""Retune benchmark: 10 fine-tunes of one architecture, with ``reuse: decisions`` against a full sweep.

Ten models from one factory with different seeds (by default ``aitune.examples:small_encoder``,
dim 128, 2 layers, 64 tokens, ``seed`` 0..9 through kwargs: one architecture, ten sets of
weights; ``--model encoder-256`` is the same encoder at dim 256, 4 layers, 128 tokens, and
``--model mlp`` a width-64 MLP), batch 1, 2 CPU workers with one thread each, deploy off, each
run on a fresh temporary store. The full sweep tunes every model on every candidate; the retune
(``reuse: decisions``, ``reuse_top_k`` = k) tunes the first fully and the other nine on its top k
only.

    ratio = tune_s(retune) / tune_s(full)                                        goal: <= 0.3
    (and the same for the whole runs, selection and its re-measuring of near-ties included)
    winners: the retune's winner of each model is the full sweep's, or one of its declared ties

Candidates (``--candidates``):

- ``wide`` (the default): 16, what a platform team sweeps when it retunes: eager fp32, bf16
  (cast and autocast) and fp16; ``torch.compile`` default, static shapes, fullgraph, freezing,
  max-autotune-no-cudagraphs and bf16 autocast; ONNX Runtime at each graph optimisation level,
  without I/O binding and at opset 17.
- ``default``: the default CPU set without AOTInductor (4), so that it fits a 2-core machine in
  a minute. With 4 candidates and k = 3, no schedule can beat (4 + 9 x 3) / 40 = 0.78 of the
  full sweep's builds: the goal presumes a search wider than k.

The script prints that bound, (n + (models - 1) k) / (models n) for n candidates, next to the
measured ratio. The full sweep goes first, so the retune meets warm compile caches, as a real
retune of fine-tunes would after the base was tuned; ``--order retune,full`` swaps them.

Run:  PYTHONPATH=. .venv/bin/python benchmarks/retune.py [--models 10] [--top-k 3] [--candidates wide|default]
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

from rich.console import Console  # noqa: E402

GOAL = 0.3


EAGER, JIT, ORT = "TorchEagerBackend", "TorchInductorJitBackend", "OnnxRuntimeBackend"
WIDE = [
    (EAGER, {}), (EAGER, {"precision": "bfloat16"}), (EAGER, {"precision": "bfloat16", "autocast": True}),
    (EAGER, {"precision": "float16"}),
    (JIT, {}), (JIT, {"dynamic": False}), (JIT, {"fullgraph": True}), (JIT, {"options": {"freezing": True}}),
    (JIT, {"mode": "max-autotune-no-cudagraphs"}), (JIT, {"precision": "bfloat16", "autocast": True}),
    (ORT, {}), (ORT, {"graph_optimization_level": "extended"}), (ORT, {"graph_optimization_level": "basic"}),
    (ORT, {"graph_optimization_level": "disable"}), (ORT, {"io_binding": False}), (ORT, {"opset": 17}),
]


def candidate_set(which: str) -> list[tuple[str, dict]]:
    from aitune.defaults import candidates_for

    if which == "wide":
        return WIDE
    return [(b, c) for b, c in candidates_for("cpu") if b != "TorchInductorAotBackend"]


#: the architecture the fine-tunes share: factory, its kwargs (``seed`` added per model), inputs
ARCHITECTURES = {
    "encoder": ("aitune.examples:small_encoder", {"dim": 128, "layers": 2},
                [{"name": "tokens", "shape": [64], "dtype": "int64", "int_range": [0, 1000]}]),
    "encoder-256": ("aitune.examples:small_encoder", {"dim": 256, "layers": 4},
                    [{"name": "tokens", "shape": [128], "dtype": "int64", "int_range": [0, 1000]}]),
    "mlp": ("aitune.examples:mlp", {"width": 64, "depth": 4}, [{"name": "x", "shape": [64]}]),
}


def spec_for(models: int, reuse: str, top_k: int, which: str, store: str, architecture: str = "encoder"):
    from orchestrator.spec.schema import parse_spec

    candidates = [{"backend": b, "config": c} for b, c in candidate_set(which)]
    factory, kwargs, inputs = ARCHITECTURES[architecture]
    return parse_spec({
        "name": f"retune-{reuse}",
        "models": [{"name": f"ft{i}", "factory": factory, "kwargs": {**kwargs, "seed": i}, "inputs": inputs}
                   for i in range(models)],
        "batch_sizes": [1], "candidates": candidates,
        "measure": {"budget_s": 0.3},
        "workers": {"cpu_slots": 2, "threads_per_slot": 1, "use_gpus": False},
        "budgets": {"build_timeout_s": 600, "measure_timeout_s": 120},
        "reuse": reuse, "reuse_top_k": top_k, "store": store,
    })


def run(models: int, reuse: str, top_k: int, which: str, architecture: str = "encoder"):
    from orchestrator.sweep import run_sweep

    with tempfile.TemporaryDirectory(prefix="aitune-retune-") as store:
        spec = spec_for(models, reuse, top_k, which, store, architecture)
        start = time.monotonic()
        outcome = run_sweep(spec, deploy=False, write_report=False, console=Console(file=io.StringIO()), live=False)
        return outcome, time.monotonic() - start


def _job_seconds(results) -> float:
    return sum(sum(r.phases.values()) for r in results)


def _time_bound(full, retune, models: int) -> float:
    """(all candidates + (models - 1) x the followers' top-k) / (models x all candidates), each
    candidate weighted by its mean job seconds in the full sweep: what reuse could save at best."""
    per: dict[str, list[float]] = collections.defaultdict(list)
    for r in full:
        per[r.candidate].append(sum(r.phases.values()))
    mean = {c: sum(v) / len(v) for c, v in per.items()}
    followers = {s.model for s in retune.selections if s.decisions_from}
    top = {r.candidate for r in retune.results if r.model in followers}
    total = sum(mean.values())
    return (total + (models - 1) * sum(mean.get(c, 0.0) for c in top)) / (models * total) if total else float("nan")


def _print_phases(full, retune) -> None:
    """Each candidate's mean phase seconds over the full sweep's models, the followers' top-k marked."""
    followers = {s.model for s in retune.selections if s.decisions_from}
    top = {r.candidate for r in retune.results if r.model in followers}
    per: dict[str, list] = collections.defaultdict(list)
    for r in full:
        per[r.candidate].append(r.phases)
    print("the full sweep's mean seconds per job, by candidate and phase (* = a follower's top-k):")
    for cand, phases in sorted(per.items(), key=lambda kv: -sum(sum(p.values()) for p in kv[1])):
        names = sorted({k for p in phases for k in p})
        mean = {k: sum(p.get(k, 0.0) for p in phases) / len(phases) for k in names}
        parts = ", ".join(f"{k} {v:.2f}" for k, v in mean.items())
        print(f"  {'*' if cand in top else ' '} {sum(mean.values()):6.2f} s  {cand}: {parts}")


def _print_shares(full, retune, heads: set[str], models: int) -> None:
    """Where the ratio comes from, in worker job-seconds: the head (tuned fully in both sweeps,
    on fresh workers: their cold starts are in it) against a follower fully tuned and on its
    top-k. With w balanced workers and s seconds of worker start in both, the ratio is about
    (s + (H + (m - 1) T) / w) / (s + (H' + (m - 1) F) / w)."""
    def per_model(results):
        out = collections.defaultdict(float)
        for r in results:
            out[r.model] += sum(r.phases.values())
        return out

    f, r = per_model(full.results), per_model(retune.results)
    followers = [m for m in r if m not in heads]
    if not heads or not followers:
        return
    head_full = sum(f[h] for h in heads) / len(heads)
    head_retune = sum(r[h] for h in heads) / len(heads)
    full_f = sum(f[m] for m in followers) / len(followers)
    top_t = sum(r[m] for m in followers) / len(followers)
    print(f"job-seconds per model: the head H {head_retune:.1f} s in the retune, H' {head_full:.1f} s in the full "
          f"sweep; a follower F {full_f:.2f} s fully tuned, T {top_t:.2f} s on its top-k (T/F {top_t / full_f:.2f}); "
          f"(H + {models - 1} T) / (H' + {models - 1} F) = "
          f"{(head_retune + (models - 1) * top_t) / (head_full + (models - 1) * full_f):.2f}")


def _span(results) -> tuple[float, float]:
    """(first start, last end) of these results, in wall-clock seconds, from each record's
    creation (when its finish began) and its phase seconds."""
    before = ("load", "build")
    starts = [r.created_at - sum(v for k, v in r.phases.items() if k in before) for r in results]
    ends = [r.created_at + sum(v for k, v in r.phases.items() if k not in before) for r in results]
    return min(starts), max(ends)


def _print_timeline(results) -> None:
    """The retune's jobs per worker in the order they ran: start (s from the first), phases."""
    t0 = _span(results)[0]
    print("retune jobs per worker (start s, then phase seconds):")
    by_worker = collections.defaultdict(list)
    for r in results:
        by_worker[r.worker.worker_id if r.worker else "-"].append(r)
    for worker, rs in sorted(by_worker.items()):
        for r in sorted(rs, key=lambda r: _span([r])[0]):
            phases = " ".join(f"{k} {v:.2f}" for k, v in r.phases.items() if v >= 0.005)
            print(f"  {worker:>10s} {_span([r])[0] - t0:6.2f}  {r.model:4s} {r.status:11s} {r.candidate}: {phases}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--candidates", choices=["wide", "default"], default="wide")
    parser.add_argument("--model", choices=sorted(ARCHITECTURES), default="encoder")
    parser.add_argument("--order", default="full,retune")
    parser.add_argument("--timeline", action="store_true", help="print the retune's jobs one by one, per worker")
    args = parser.parse_args()

    from cluster import connect

    print(f"machine: {os.cpu_count()} CPU cores, no GPU; load average {os.getloadavg()[0]:.2f} at start")
    handle = connect(num_cpus=2, object_store_memory=300 * 1024**2)
    outcomes, wholes = {}, {}
    try:
        for which in args.order.split(","):
            outcome, whole = run(args.models, "decisions" if which == "retune" else "none", args.top_k, args.candidates,
                                 args.model)
            outcomes[which] = outcome
            wholes[which] = whole
            print(f"{which:6s}: {len(outcome.results)} jobs {dict(collections.Counter(r.status for r in outcome.results))}, "
                  f"tune_s {outcome.tune_s:.1f} s ({whole:.0f} s with start-up); load {os.getloadavg()[0]:.2f}")
    finally:
        handle.shutdown()
    full, retune = outcomes["full"], outcomes["retune"]
    ratio = retune.tune_s / full.tune_s
    n, m, k = len(candidate_set(args.candidates)), args.models, min(args.top_k, len(candidate_set(args.candidates)))
    print(f"\n{n} candidates, {m} models, k = {k}: builds {(n + (m - 1) * k)} of {n * m}, "
          f"a bound of {(n + (m - 1) * k) / (n * m):.2f} on the ratio")
    print(f"ratio tune_s(retune) / tune_s(full) = {ratio:.2f} (goal <= {GOAL}) -> {'MET' if ratio <= GOAL else 'NOT MET'}")
    print(f"whole runs (worker start-up, selection and its re-measuring included): {wholes['retune']:.1f} s / "
          f"{wholes['full']:.1f} s = {wholes['retune'] / wholes['full']:.2f}")
    work_full, work_retune = _job_seconds(full.results), _job_seconds(retune.results)
    print(f"worker job-seconds (build, check, measure, save): retune {work_retune:.1f} of full {work_full:.1f} = "
          f"{work_retune / work_full:.2f}; the full sweep's own per-candidate times bound it at "
          f"{_time_bound(full.results, retune, m):.2f} (the top-k cost more than the average candidate)")
    _print_phases(full.results, retune)
    heads = {s.model for s in retune.selections if not s.decisions_from}
    _print_shares(full, retune, heads, m)
    head_results = [r for r in retune.results if r.model in heads]
    if head_results and len(head_results) < len(retune.results):
        t0, head_end = _span(head_results)
        _, end = _span(retune.results)
        print(f"retune timeline: the head{'s' if len(heads) > 1 else ''} ({', '.join(sorted(heads))}) took "
              f"{head_end - t0:.1f} s on fresh workers (each worker's first torch.compile and ONNX export "
              f"included), the followers {end - head_end:.1f} s after")
    if args.timeline:
        _print_timeline(retune.results)
    full_sel = {s.model: s for s in full.selections}
    same = tied = differ = 0
    for s in sorted(retune.selections, key=lambda s: s.model):
        ref = full_sel[s.model]
        if s.winner == ref.winner:
            same += 1
            verdict = "same"
        elif s.winner in ref.ties or ref.winner in s.ties:
            tied += 1
            verdict = "within the full sweep's ties"
        else:
            differ += 1
            verdict = "DIFFERENT"
        src = (s.decisions_from or {}).get("model", "-")
        print(f"  {s.model}: full {ref.winner} (ties {', '.join(ref.ties) or '-'}); retune {s.winner} "
              f"(decisions from {src}): {verdict}")
    print(f"winners: {same} same, {tied} within ties, {differ} different of {len(retune.selections)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
