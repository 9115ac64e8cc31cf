"""Decision benchmark: do the sweep's winners hold on real architectures, run after run?

Four Hugging Face architectures built from their configs with random weights (BERT, DistilBERT,
GPT-2, ViT: ``aitune.examples_hf``, small members of each family; 64 tokens or 64x64 images),
batch 1 and 8, the default CPU candidates, 2 CPU slots of one thread each, deploy off. ``transformers``
is installed into this interpreter if it is missing.

The sweep runs ``--runs`` times on one store. The first run builds every candidate; each later run
asks for a slightly longer first measurement (``measure.budget_s`` 1.0, 1.25, 1.5, ...), which is
another evaluation, so the stored artifacts are measured again and every group decided again,
nothing rebuilt (``--fresh``: a new store, everything rebuilt, each run). Run ``--burn`` (1-based;
0: none) has a CPU-burning process beside it on one core for as long as that run lasts (bounded).

Then, with nothing else running, every correct candidate of every group is measured again in this
one process, interleaved, ``--remeasure-s`` seconds each (3 by default), pinned to one core: the
independent answer. For each run and group the script prints the winner, why its comparison
stopped, the seconds of its rounds and of loading its contenders' checkpoints on the worker
(``load``), its margins over the runner-up and eager fp32 (their time over the winner's, in the
same rounds, with the 95% interval), P(best), and the **regret** (the winner's median in the
independent re-measure over the best one's, minus 1). Goals:

    regret <= 3% in every group of every run
    the same winner, or one within the other run's declared ties, in every run
    the decision phase (choosing: screening and rounds) <= 25% of the sweep's time (tuning and choosing)

Run:  PYTHONPATH=. .venv/bin/python benchmarks/decisions.py [--runs 3] [--burn 3] [--remeasure-s 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

GOALS = {"regret": 0.03, "share": 0.25}
MODELS = [
    ("bert", "aitune.examples_hf:bert", {"name": "input_ids", "shape": [64], "dtype": "int64", "int_range": [0, 30522]}),
    ("distilbert", "aitune.examples_hf:distilbert", {"name": "input_ids", "shape": [64], "dtype": "int64", "int_range": [0, 30522]}),
    ("gpt2", "aitune.examples_hf:gpt2", {"name": "input_ids", "shape": [64], "dtype": "int64", "int_range": [0, 50257]}),
    ("vit", "aitune.examples_hf:vit", {"name": "pixel_values", "shape": [3, 64, 64], "dtype": "float32"}),
]


def ensure_transformers() -> None:
    if importlib.util.find_spec("transformers") is not None:
        return
    print("installing transformers (the benchmark's real architectures) ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "transformers"]
    constraints = ROOT / "constraints-cpu.txt"
    if constraints.is_file():
        cmd[4:4] = ["-c", str(constraints)]  # keep this interpreter's torch as it is
    subprocess.run(cmd, check=True)


def spec_of(store: Path, run: int, budget_s: float, models: list[str]) -> dict:
    return {
        "name": f"decisions-{run}",
        "models": [{"name": n, "factory": f, "inputs": [dict(i)]} for n, f, i in MODELS if n in models],
        "batch_sizes": [1, 8],
        "measure": {"budget_s": budget_s},
        "workers": {"cpu_slots": 2, "threads_per_slot": 1},
        "budgets": {"build_timeout_s": 900, "measure_timeout_s": 300},
        "store": str(store),
    }


class Burner:
    """A process that keeps one core busy until stopped or ``limit_s`` passed."""

    def __init__(self, limit_s: float) -> None:
        code = f"import time\nend = time.time() + {limit_s}\nwhile time.time() < end:\n    pass\n"
        self.proc = subprocess.Popen([sys.executable, "-c", code])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def one_run(store: Path, run: int, budget_s: float, burn: bool, models: list[str]):
    from orchestrator.spec.schema import parse_spec
    from orchestrator.sweep import run_sweep

    spec = parse_spec(spec_of(store, run, budget_s, models))
    burner = Burner(limit_s=1800) if burn else None
    start = time.monotonic()
    try:
        outcome = run_sweep(spec, console=Console(file=io.StringIO(), width=200), write_report=False, deploy=False)
    finally:
        if burner is not None:
            burner.stop()
    return outcome, time.monotonic() - start


def remeasure(store: Path, outcome, seconds: float, models: list[str]) -> dict[tuple, dict[str, float]]:
    """Every correct candidate of every group, interleaved in this process on one core: medians by key."""
    import torch

    from aitune.checkpoint import load_checkpoint
    from aitune.measure import MeasureConfig, interleaved
    from orchestrator.planning.candidates import make_sample
    from orchestrator.spec.schema import parse_spec

    spec = parse_spec(spec_of(store, 0, 1.0, models))
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    groups: dict[tuple, list] = {}
    for r in outcome.results:
        if r.status == "ok" and r.checkpoint:
            groups.setdefault((r.model, r.batch_size), []).append(r)
    medians: dict[tuple, dict[str, float]] = {}
    for (model, batch), records in sorted(groups.items()):
        model_spec = spec.model(model)
        fns = {}
        for r in records:
            backend = load_checkpoint(store / r.checkpoint, "cpu", manifest_sha256=r.manifest_sha256,
                                      allow_factories=[model_spec.factory])
            backend.deploy("cpu")
            fns[r.key] = backend.infer
        sample = make_sample(model_spec, batch)
        config = MeasureConfig(budget_s=seconds, threads=1, target_rel_ci=0.0, min_iters=10, max_iters=1_000_000)
        measured = interleaved(fns, sample, "cpu", config)
        medians[(model, batch)] = {k: m.median_ms for k, m in measured.items()}
        print(f"  re-measured {model} b{batch}: {len(fns)} candidates, "
              f"{min(m.count for m in measured.values())} rounds", flush=True)
    return medians


def wait_idle(limit_s: float) -> float:
    start = time.monotonic()
    while os.getloadavg()[0] >= 0.7 and time.monotonic() - start < limit_s:
        time.sleep(10)
    return time.monotonic() - start


def short(name: str | None) -> str:
    return (name or "-").replace("Backend", "").replace("(defaults)", "").replace("precision=", "")


def margin(pair) -> str:
    if not isinstance(pair, dict):
        return "-"
    return f"{pair['ratio']:.2f}x ({pair['low']:.2f}-{pair['high']:.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--burn", type=int, default=3, help="the run (1-based) with a CPU burner beside it; 0: none")
    parser.add_argument("--remeasure-s", type=float, default=3.0)
    parser.add_argument("--store", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--fresh", action="store_true", help="every run on a new store (rebuild everything)")
    parser.add_argument("--models", default=",".join(n for n, _, _ in MODELS))
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                        help="before the independent re-measure, wait up to S seconds for the 1-minute load "
                             "average to fall below 0.7 (runs beside other work, a clean answer after)")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    known = [n for n, _, _ in MODELS]
    unknown = [m for m in models if m not in known]
    if unknown or not models:
        parser.error(f"--models {args.models!r}: give some of {', '.join(known)}, comma-separated")
    ensure_transformers()
    base = args.store or Path(tempfile.mkdtemp(prefix="aitune-decisions-"))
    print(f"decisions benchmark: {len(models)} models x batch 1, 8; default CPU candidates; 2 CPU slots; "
          f"{args.runs} runs (run {args.burn or '-'} beside a CPU burner); store {base}", flush=True)
    runs = []
    for i in range(1, args.runs + 1):
        store = base / f"run{i}" if args.fresh else base
        budget = 1.0 if args.fresh else 1.0 + 0.25 * (i - 1)
        print(f"run {i}: measure.budget_s {budget}{', CPU burner beside it' if i == args.burn else ''} ...", flush=True)
        outcome, wall = one_run(store, i, budget, i == args.burn, models)
        runs.append((store, outcome, wall))
        print(f"  tune {outcome.tune_s:.1f} s, choosing {outcome.decide_s:.1f} s, whole run {wall:.1f} s", flush=True)

    if args.wait_idle:
        waited = wait_idle(args.wait_idle)
        print(f"waited {waited:.0f} s for the machine to go idle (load {os.getloadavg()[0]:.2f})", flush=True)
    print(f"independent re-measure, {args.remeasure_s:g} s per candidate, one process, one core ...", flush=True)
    truth: dict[int, dict] = {}
    for i, (store, outcome, _) in enumerate(runs, 1):
        if args.fresh or i == 1:
            truth[i] = remeasure(store, outcome, args.remeasure_s, models)
        else:
            truth[i] = truth[1]  # the same artifacts: one answer serves every run

    worst, shares, winners = [], [], {}
    for i, (store, outcome, wall) in enumerate(runs, 1):
        share = outcome.decide_s / (outcome.tune_s + outcome.decide_s)
        shares.append(share)
        print(f"\nrun {i}{' (CPU burner beside it)' if i == args.burn else ''}: tune {outcome.tune_s:.1f} s, "
              f"choosing {outcome.decide_s:.1f} s = {share:.0%} of tuning and choosing (goal <= {GOALS['share']:.0%})")
        print(f"  {'group':<16} {'winner':<34} {'stopped':<9} {'rounds':>6} {'s':>5} {'load':>5} {'vs runner-up':>18} "
              f"{'vs eager':>18} {'P(best)':>7} {'regret':>7}")
        by_key = {r.key: r for r in outcome.results}
        for s in sorted(outcome.selections, key=lambda s: (s.model, s.batch_size)):
            d = s.decision or {}
            medians = truth[i].get((s.model, s.batch_size), {})
            regret = None
            if s.winner_key in medians:
                regret = medians[s.winner_key] / min(medians.values()) - 1
                worst.append(regret)
            winners.setdefault((s.model, s.batch_size), []).append((s.winner, list(s.ties)))
            best_key = min(medians, key=medians.get) if medians else None
            best = f" (best: {short(by_key[best_key].candidate)})" if best_key and best_key != s.winner_key else ""
            p_best = d.get("p_best")
            print(f"  {s.model + ' b' + str(s.batch_size):<16} {short(s.winner):<34} {str(d.get('stop')):<9} "
                  f"{d.get('rounds', 0):>6} {d.get('seconds', 0.0):>5.1f} {d.get('load_s', 0.0):>5.1f} "
                  f"{margin(d.get('runner_up')):>18} "
                  f"{margin(d.get('baseline')):>18} {p_best if p_best is None else format(p_best, '.2f'):>7} "
                  f"{'-' if regret is None else format(regret, '.1%'):>7}{best}")
    agree = 0
    for group, seen in winners.items():
        first, first_ties = seen[0]
        if all(w == first or w in first_ties or first in ties for w, ties in seen):
            agree += 1
    print(f"\nworst regret {max(worst):.1%} (goal <= {GOALS['regret']:.0%}); groups within goal "
          f"{sum(r <= GOALS['regret'] for r in worst)}/{len(worst)}")
    print(f"winners the same or within declared ties in every run: {agree}/{len(winners)} groups")
    print("decision share per run: " + ", ".join(f"{s:.0%}" for s in shares) + f" (goal <= {GOALS['share']:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
