"""Sequence buckets on a text model (a Hugging Face BERT built from a config, random weights) with a
declared traffic mix: static artifacts, one per bucket, against one dynamic-shape artifact
covering the range, per backend; and serving the mix padded to each call's bucket against always
padding to the largest bucket, every output checked against eager fp32 on the unpadded call.

    .venv/bin/python benchmarks/buckets.py [--backends ...] [--calls 300] [--threads N]

Prints, per backend, each bucket's median ms for the static and the dynamic artifact and the
expected latency of each under the mix; then the mix served both ways, with the ratio (goal: the
buckets >= 1.5x better than always the largest) and how many answers were verified. Latencies
are measured side by side in one run; read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from aitune.check import compare_outputs, tolerance_for  # noqa: E402
from aitune.environment import cpu_name  # noqa: E402
from aitune.examples_hf import bert  # noqa: E402
from aitune.measure import MeasureConfig, measure  # noqa: E402
from aitune.shapes import Axis, Shapes, pad_sample  # noqa: E402
from aitune.specs import GraphSpec, Sample, TensorSpec  # noqa: E402
from aitune.torch.backend.registry import make_backend  # noqa: E402
from aitune.torch.module_ref import attach_factory  # noqa: E402

BUCKETS = (32, 64, 128)
MIX = {32: 0.5, 64: 0.3, 128: 0.2}  # share of calls whose length falls in each bucket
KWARGS = {"layers": 2, "hidden": 128, "heads": 4, "vocab": 30522}
SHAPES = Shapes((Axis("seq", BUCKETS, (("input_ids", 1, 0), ("attention_mask", 1, 0)),
                      ((0, "output['last_hidden_state']", 1),)),))
ROUNDS = 5
BACKENDS = ["TorchEagerBackend", "TorchInductorJitBackend", "TorchInductorAotBackend", "OnnxRuntimeBackend"]


def call_at(length: int, seed: int = 0) -> Sample:
    gen = torch.Generator().manual_seed(seed * 1000 + length)
    return Sample((), {"input_ids": torch.randint(0, 30522, (1, length), generator=gen),
                       "attention_mask": torch.ones(1, length, dtype=torch.int64)})


def graph_of(length: int, dynamic: tuple[int, int] | None) -> GraphSpec:
    axes = {1: dynamic} if dynamic else {}
    inputs = tuple(TensorSpec(n, (1, length), "int64", axes) for n in ("input_ids", "attention_mask"))
    return GraphSpec(inputs, (), ("input_ids", "attention_mask"))


def build(module, name: str, length: int, dynamic: tuple[int, int] | None, cache: Path):
    backend = make_backend(name, {})
    start = time.perf_counter()
    backend.build(module, graph_of(length, dynamic), [call_at(length)], "cpu", cache)
    return backend, time.perf_counter() - start


def median_ms(fn, sample: Sample, budget_s: float) -> float:
    return measure(fn, sample, "cpu", MeasureConfig(budget_s=budget_s, min_iters=10)).median_ms


def per_backend(module, name: str, budget_s: float, cache: Path) -> dict:
    """Static artifacts (one per bucket) and one dynamic artifact, each timed at every bucket."""
    static, build_s = {}, 0.0
    for b in BUCKETS:
        static[b], seconds = build(module, name, b, None, cache / f"{name}-{b}")
        build_s += seconds
    try:
        dynamic, dyn_s = build(module, name, BUCKETS[1], (2, BUCKETS[-1]), cache / f"{name}-dyn")
    except Exception as exc:  # a backend that can't make this model's shapes dynamic
        dynamic, dyn_s = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    figures = {"static": {}, "dynamic": {}, "static_build_s": build_s, "dynamic_build_s": dyn_s,
               "static_backends": static}
    for b in BUCKETS:  # side by side: rounds of one then the other, the median of each's rounds
        sample = call_at(b)
        rounds = {"static": [], "dynamic": []}
        for _ in range(ROUNDS):
            rounds["static"].append(median_ms(static[b].infer, sample, budget_s / ROUNDS))
            if dynamic is not None:
                rounds["dynamic"].append(median_ms(dynamic.infer, sample, budget_s / ROUNDS))
        figures["static"][b] = statistics.median(rounds["static"])
        if dynamic is not None:
            figures["dynamic"][b] = statistics.median(rounds["dynamic"])
    return figures


def expected(ms: dict[int, float]) -> float | None:
    return sum(MIX[b] * ms[b] for b in BUCKETS) if len(ms) == len(BUCKETS) else None


def mix_lengths(count: int, seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    lows = {b: (BUCKETS[i - 1] + 1 if i else 1) for i, b in enumerate(BUCKETS)}
    return [rng.randint(lows[b], b) for b in rng.choices(BUCKETS, weights=[MIX[b] for b in BUCKETS], k=count)]


def serve_mix(static: dict, module, lengths: list[int]) -> dict:
    """Each call of the mix answered padded to its bucket and padded to the largest, interleaved call
    by call (the order alternating): per-call seconds of each, and how many answers of each matched
    eager fp32 on the unpadded call."""
    tolerance = tolerance_for("float32")
    for b, backend in static.items():  # warm: a first call's set-up is not serving
        for _ in range(10):
            call_at(b)(backend.infer)
    times = {"buckets": [], "largest": []}
    verified = {"buckets": 0, "largest": 0}
    for i, n in enumerate(lengths):
        call = call_at(n, seed=i + 1)
        with torch.inference_mode():
            want = call(module)
            for which in ("buckets", "largest") if i % 2 == 0 else ("largest", "buckets"):
                bucket = SHAPES.bucket({"seq": n}) if which == "buckets" else {"seq": BUCKETS[-1]}
                start = time.perf_counter()
                got = SHAPES.cut(pad_sample(call, SHAPES, bucket, [])(static[bucket["seq"]].infer), {"seq": n})
                times[which].append(time.perf_counter() - start)
                verified[which] += compare_outputs(want, got, tolerance).ok
    return {"times": times, "verified": verified}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=BACKENDS)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--budget-s", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"model: BERT {KWARGS}, batch 1; buckets {list(BUCKETS)}; traffic mix {MIX}")
    module = attach_factory(bert(**KWARGS), "aitune.examples_hf:bert", KWARGS)
    cache = Path(tempfile.mkdtemp(prefix="aitune-buckets-"))
    results = {}
    for name in args.backends:
        fig = results[name] = per_backend(module, name, args.budget_s, cache)
        s, d = expected(fig["static"]), expected(fig["dynamic"])
        cells = "  ".join(f"{b}: {fig['static'][b]:.3f} / " + (f"{fig['dynamic'][b]:.3f}" if b in fig["dynamic"] else "-")
                          for b in BUCKETS)
        dyn_build = fig["dynamic_build_s"]
        print(f"{name}: static / dynamic median ms per bucket  {cells}")
        print(f"  expected under the mix: static {s:.3f} ms, dynamic " + (f"{d:.3f} ms ({d / s:.2f}x static)" if d else
              f"- (no dynamic artifact: {dyn_build})") + f"; builds: static {fig['static_build_s']:.1f} s for "
              f"{len(BUCKETS)}, dynamic " + (f"{dyn_build:.1f} s" if isinstance(dyn_build, float) else "failed"))
    best = min(results, key=lambda n: expected(results[n]["static"]))
    lengths = mix_lengths(args.calls)
    served = serve_mix(results[best]["static_backends"], module, lengths)
    t, ok = served["times"], served["verified"]
    mean = {k: 1000 * statistics.fmean(v) for k, v in t.items()}
    median = {k: 1000 * statistics.median(v) for k, v in t.items()}
    print(f"serving the mix ({len(lengths)} calls, lengths 1..{BUCKETS[-1]}, median length {statistics.median(lengths)}) "
          f"on {best}'s static artifacts, ms a call (mean / median): padded to each call's bucket "
          f"{mean['buckets']:.3f} / {median['buckets']:.3f}, always to the largest {mean['largest']:.3f} / "
          f"{median['largest']:.3f}: buckets {mean['largest'] / mean['buckets']:.2f}x better by the mean (goal >= 1.5x); "
          f"outputs verified against eager fp32 unpadded: {ok['buckets']}/{len(lengths)} and {ok['largest']}/{len(lengths)}")
    return 0 if ok["buckets"] == ok["largest"] == len(lengths) else 1


if __name__ == "__main__":
    sys.exit(main())
