"""Two drivers, one store: two `python -m orchestrator tune` runs of one spec, started a second apart.

Each driver has its own embedded Ray and one CPU worker. The spec's candidates are eager fp32 and
N FaultBackend candidates that sleep in their build (a stand-in for slow compiles), so both drivers
are busy at once. Claims with leases should make each artifact key be built exactly once, the two
drivers splitting the work, and both sweeps finish with every result.

    builds per distinct key      goal: exactly 1
    both sweeps complete         goal: every key in each

Run:  PYTHONPATH=. .venv/bin/python benchmarks/two_drivers.py [--candidates 6] [--sleep 2]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def spec(store: Path, n: int, sleep_s: float) -> dict:
    cands = [{"backend": "TorchEagerBackend"}] + [
        {"backend": "orchestrator.sim.fault_backends:FaultBackend",
         "config": {"fault": "sleep", "seconds": sleep_s, "tag": f"c{i}"}} for i in range(n)
    ]
    return {
        "name": "two-drivers",
        "models": [{"name": "mlp", "factory": "aitune.examples:mlp", "kwargs": {"width": 16, "depth": 2},
                    "inputs": [{"name": "x", "shape": [16]}]}],
        "batch_sizes": [2], "candidates": cands,
        "measure": {"budget_s": 0.05, "min_iters": 5, "warmup_iters": 2},
        "workers": {"cpu_slots": 1, "threads_per_slot": 1}, "store": str(store),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--sleep", type=float, default=2.0)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p), RAY_USAGE_STATS_ENABLED="0")
    with tempfile.TemporaryDirectory(prefix="aitune-2drivers-") as tmp:
        store = Path(tmp) / "store"
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec(store, args.candidates, args.sleep)))
        t0 = time.monotonic()
        procs = []
        for i in range(2):
            log = open(Path(tmp) / f"driver{i}.log", "w")
            procs.append((subprocess.Popen([sys.executable, "-m", "orchestrator", "tune", str(path), "--no-deploy"],
                                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
            time.sleep(1.0)
        walls = []
        for proc, log in procs:
            proc.wait(timeout=900)
            walls.append(time.monotonic() - t0)
            log.close()
        conn = sqlite3.connect(store / "store.sqlite")
        built = collections.Counter(k for (k,) in conn.execute("SELECT key FROM results WHERE how = 'built'"))
        per_sweep = dict(conn.execute("SELECT s.status || ' ' || s.id, COUNT(r.id) FROM sweeps s LEFT JOIN results r "
                                      "ON r.sweep_id = s.id GROUP BY s.id"))
        split = collections.Counter(s for (s,) in conn.execute("SELECT sweep_id FROM results WHERE how = 'built'"))
        conn.close()
        keys = args.candidates + 1
        print(f"machine: {os.cpu_count()} CPU cores; {keys} distinct keys, {args.candidates} sleep {args.sleep} s in their build")
        for i, ((proc, _), wall) in enumerate(zip(procs, walls)):
            print(f"driver {i}: exit {proc.returncode}, done after {wall:.1f} s")
        print(f"results per sweep: {per_sweep}")
        print(f"builds per sweep: {sorted(split.values())}")
        most = max(built.values()) if built else 0
        ok = len(built) == keys and most == 1 and all(v == keys for v in per_sweep.values()) and \
            all(p.returncode == 0 for p, _ in procs)
        print(f"builds per distinct key: max {most}, keys built {len(built)}/{keys} (goal exactly 1 each) -> "
              f"{'MET' if ok else 'NOT MET'}")
        if not ok:
            for i in range(2):
                print(f"--- driver{i}.log (tail)\n" + (Path(tmp) / f"driver{i}.log").read_text()[-3000:])
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
