"""A fresh process's first ONNX export of a fine-tune: translated, against filled from the machine's template folder.

Each round starts two fresh Python processes one after the other, each exporting one fine-tune
of the example encoder (``aitune.examples:small_encoder``, ``--dim``/``--layers``, its own seed)
through an ``ExportCache`` as a sweep's worker has it:

- *cold*: an empty template folder: the process builds the exporter's table and translates;
- *warm*: the folder another process left behind: the process fills that translation with its
  own weights.

Both then optimise and write the model, and the export is run with ONNX Runtime and compared
with the module's own outputs (a wrong export fails the round). It prints each round's seconds
(the export alone, inside the process) and the median ratio warm / cold.

    python benchmarks/onnx_templates.py [--rounds 3] [--dim 128] [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from aitune.examples import small_encoder
from aitune.specs import GraphSpec, Sample
from aitune.torch.export_cache import machine_export_cache

dim, layers, seed, work = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
module = small_encoder(dim=dim, layers=layers, seed=seed).eval()
tokens = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
sample = Sample((tokens,), {})
with torch.no_grad():
    expected = module(tokens)
spec = GraphSpec.from_sample(sample, expected)
exports = machine_export_cache(work + "/exports")
start = time.perf_counter()
made = exports.onnx(module, sample, spec, work + "/model.onnx", opset=None, variant="fp32",
                    prepare=lambda: (module, sample))
seconds = time.perf_counter() - start
import onnxruntime as ort
session = ort.InferenceSession(str(made.model), providers=["CPUExecutionProvider"])
got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: tokens.numpy()})[0])
torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
print(json.dumps({"seconds": seconds, "filled": exports.templates.hits, "from_disk": exports.templates.disk_hits}))
"""


def export_in_fresh_process(templates: Path, seed: int, dim: int, layers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="aitune-bench-export-") as work:
        env = dict(os.environ, AITUNE_ONNX_TEMPLATES=str(templates), OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(dim), str(layers), str(seed), work],
                              env=env, check=True, capture_output=True, text=True, timeout=600)
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.2f} at start; "
          f"small_encoder(dim={args.dim}, layers={args.layers}), batch 1 x 64 tokens")
    cold, warm = [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="aitune-bench-templates-") as folder:
            first = export_in_fresh_process(Path(folder), 2 * r, args.dim, args.layers)
            second = export_in_fresh_process(Path(folder), 2 * r + 1, args.dim, args.layers)
        if first["from_disk"] or not second["from_disk"]:
            print(f"round {r}: the template folder was not used as expected: {first} {second}")
            return 1
        cold.append(first["seconds"])
        warm.append(second["seconds"])
        print(f"round {r}: translated {first['seconds']:.2f} s, filled from the folder {second['seconds']:.2f} s")
    ratio = statistics.median(w / c for w, c in zip(warm, cold))
    print(f"first export in a fresh process: median {statistics.median(cold):.2f} s translated, "
          f"{statistics.median(warm):.2f} s filled; ratio filled / translated {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
