"""ONNX export with the exporter's ATen-to-ONNX table built once per process, against
``torch.onnx.export`` building it at every call, side by side in one process.

For each model, exports alternate between the two paths (``--rounds`` each, after one warm-up
export of each), one thread, each to a fresh directory; the script prints the median seconds
per export of each path and their ratio. What an ONNX Runtime or TensorRT candidate's build
saves is the difference.

Run:  PYTHONPATH=. .venv/bin/python benchmarks/onnx_export.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    import torch

    from aitune import examples
    from aitune.specs import GraphSpec, Sample
    from aitune.torch import onnx_export

    torch.set_num_threads(1)
    if onnx_export._exporter_core() is None:
        print("this torch's exporter has no core that takes a registry: both paths are torch.onnx.export")
        return 1
    core = onnx_export._exporter_core

    def public():
        return None

    models = {
        "mlp (width 64, depth 4), batch 1": (examples.mlp(width=64, depth=4), Sample.of(torch.randn(1, 64))),
        "small_encoder (dim 128, 2 layers), batch 1": (examples.small_encoder(), examples.token_sample(1)),
        "small_cnn, batch 8": (examples.small_cnn(), examples.image_sample(8)),
    }
    print(f"machine: {os.cpu_count()} CPU cores; torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="aitune-onnx-bench-") as root:
        n = 0
        for name, (module, sample) in models.items():
            module.eval()
            spec = GraphSpec.from_sample(sample)
            times: dict[str, list[float]] = {"cached table": [], "torch.onnx.export": []}
            for round_ in range(args.rounds + 1):
                for path, exporter in (("cached table", core), ("torch.onnx.export", public)):
                    onnx_export._exporter_core = exporter
                    n += 1
                    out = Path(root) / str(n)
                    out.mkdir()
                    start = time.perf_counter()
                    onnx_export.export_onnx(module, spec, sample, out / "model.onnx")
                    if round_:  # the first round warms both up
                        times[path].append(time.perf_counter() - start)
            onnx_export._exporter_core = core
            fast, slow = (statistics.median(times[k]) for k in ("cached table", "torch.onnx.export"))
            print(f"{name:45s} torch.onnx.export {slow:.3f} s, cached table {fast:.3f} s per export: "
                  f"x{slow / fast:.2f} ({slow - fast:.3f} s saved per ONNX candidate)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
