"""Quantized candidates (TorchAO int8) on the CPU against eager fp32: speed and accuracy gates.

For each example model (``small_encoder``: a 2-layer transformer encoder; ``small_cnn``, whose
one linear layer is its head) at each batch size, every candidate is built, its outputs judged
against eager fp32 by ``aitune.accuracy`` (cosine, SQNR in dB, top-5 max relative error) and the
default quantized gates (``DEFAULT_QUANTIZED_GATES``), and all candidates are timed side by side,
interleaved, in one process (``aitune.measure.interleaved``). Speedup is eager fp32's median over
the candidate's. Timings on a shared 2-core machine vary 2-3x between runs: read the speedups,
measured side by side in one run, not the absolute numbers. Nothing is asserted.

    PYTHONPATH=. .venv/bin/python benchmarks/quantized.py [--batch 1 8] [--budget-s 1.0] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from aitune import attach_factory, examples  # noqa: E402
from aitune.accuracy import DEFAULT_QUANTIZED_GATES, Gates  # noqa: E402
from aitune.environment import cpu_name, torchao_version  # noqa: E402
from aitune.measure import MeasureConfig, interleaved  # noqa: E402
from aitune.specs import GraphSpec, Sample  # noqa: E402
from aitune.torch.backend.backend import Backend, UnsupportedDeviceError  # noqa: E402
from aitune.torch.backend.registry import display_name, make_backend  # noqa: E402

EXAMPLES = "aitune.examples"
BASELINE = "eager fp32"
CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    BASELINE: ("TorchEagerBackend", {}),
    "eager bf16 (autocast)": ("TorchEagerBackend", {"precision": "bfloat16", "autocast": True}),
    "torch.compile fp32": ("TorchInductorJitBackend", {}),
    "torchao int8_weight_only": ("TorchAOBackend", {"scheme": "int8_weight_only", "compile": True}),
    "torchao int8_dynamic": ("TorchAOBackend", {"scheme": "int8_dynamic", "compile": True}),
    "torchao int8_dynamic, no compile": ("TorchAOBackend", {"scheme": "int8_dynamic", "compile": False}),
}
#: every figure is reported, whether gated or not: top-5 as well
FIGURES = Gates(cosine=0.999, sqnr_db=30.0, topk_rel_err=1.0, topk=5)


def models() -> dict[str, tuple[torch.nn.Module, Any]]:
    return {
        "small_encoder": (attach_factory(examples.small_encoder(), f"{EXAMPLES}:small_encoder"), examples.token_sample),
        "small_cnn": (attach_factory(examples.small_cnn(), f"{EXAMPLES}:small_cnn"), examples.image_sample),
    }


def build_all(module: torch.nn.Module, sample: Sample, root: Path) -> tuple[dict[str, Backend], dict[str, Any]]:
    """The candidates that built, and for each the build seconds or why it could not build."""
    spec, built, notes = GraphSpec.from_sample(sample), {}, {}
    for label, (name, fields) in CANDIDATES.items():
        backend = make_backend(name, fields)
        start = time.perf_counter()
        try:
            backend.build(module, spec, [sample], "cpu", root / label.replace(" ", "_").replace(",", ""))
        except UnsupportedDeviceError as exc:
            notes[label] = f"unsupported: {exc}"
            continue
        built[label], notes[label] = backend, time.perf_counter() - start
    return built, notes


def judge_all(built: dict[str, Backend], sample: Sample, reference: Any) -> dict[str, tuple[Any, Any]]:
    """Per candidate: (every figure, the default gates' verdict)."""
    reports = {}
    with torch.inference_mode():
        for label, backend in built.items():
            outputs = sample(backend.infer)
            reports[label] = FIGURES.judge(outputs, reference), DEFAULT_QUANTIZED_GATES.judge(outputs, reference)
    return reports


def row(label: str, build: Any, measured: Any, base_ms: float, reports: Any) -> tuple[str, ...]:
    if not isinstance(build, float):  # the reason it could not build
        return (label, "-", "-", "-", "-", "-", "-", str(build))
    figures, verdict = reports[0].figures, reports[1]
    return (
        label, f"{build:.1f}", f"{measured.median_ms:.3f}", f"{base_ms / measured.median_ms:.2f}x",
        f"{figures['cosine']:.6f}", f"{figures['sqnr_db']:.1f}", f"{figures['topk_rel_err']:.2e}",
        "pass" if verdict.ok else f"FAIL: {verdict.reason}",
    )  # fmt: skip


def table(rows: list[tuple[str, ...]]) -> str:
    head = ("candidate", "build s", "median ms", "speedup", "cosine", "sqnr dB", "top5 rel err", "default gates")
    rows = [head, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def run_group(module: torch.nn.Module, sample: Sample, config: MeasureConfig) -> str:
    with torch.inference_mode():
        reference = sample(module)
    with tempfile.TemporaryDirectory(prefix="aitune-quantized-") as root:
        built, notes = build_all(module, sample, Path(root))
        reports = judge_all(built, sample, reference)
        timings = interleaved({label: b.infer for label, b in built.items()}, sample, "cpu", config)
    base_ms = timings[BASELINE].median_ms
    rows = [row(label, notes[label], timings.get(label), base_ms, reports.get(label)) for label in CANDIDATES]
    return table(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budget-s", type=float, default=1.0, help="timing budget per candidate")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch {torch.__version__}, torchao {torchao_version()}, "
          f"Python {platform.python_version()}")  # fmt: skip
    print(f"default quantized gates: {DEFAULT_QUANTIZED_GATES}; candidates: "
          + ", ".join(f"{label} = {display_name(*d)}" for label, d in CANDIDATES.items()))  # fmt: skip
    config = MeasureConfig(budget_s=args.budget_s, threads=args.threads)
    for name, (module, make_sample) in models().items():
        for batch in args.batch:
            start = time.perf_counter()
            text = run_group(module, make_sample(batch), config)
            print(f"\n== {name}, batch {batch} ({time.perf_counter() - start:.0f} s)\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
