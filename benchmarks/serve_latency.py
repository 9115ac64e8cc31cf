"""Serving latency: an HTTP round trip through Ray Serve against an in-process call of the same backend.

A tiny sweep (the MLP of the tests, width 16, depth 2, batch 2, eager fp32 only, one CPU slot)
installs its winner in a temporary deploy root. The same installed version is then called two
ways, interleaved in one run (one of each per iteration, order alternating):

    in-process   aitune.load_tuned(root, "mlp", "cpu")(x)                  (1 torch thread)
    HTTP         POST http://127.0.0.1:PORT/mlp with the JSON tensor body   (1 replica, 1 CPU, keep-alive)

It prints the median and p99 of each and their ratio (HTTP / in-process): the cost of the HTTP
proxy, the Serve router, JSON encoding and the replica hop. Nothing is asserted.

Run:  PYTHONPATH=. .venv/bin/python benchmarks/serve_latency.py [--n 300] [--width 16]
About half a minute on a 2-core machine.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300, help="calls of each kind")
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args()

    import socket

    import torch
    from rich.console import Console

    import aitune
    from cluster import Inventory, connect, plan_deploy_targets
    from orchestrator.deploy import tensor_json
    from orchestrator.deploy.serve import start_serving, stop_serving
    from orchestrator.spec.schema import parse_spec
    from orchestrator.sweep import run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="serve-latency-"))
    deploy_root = tmp / "deploy"
    spec = parse_spec({
        "name": "serve-latency",
        "models": [{"name": "mlp", "factory": "aitune.examples:mlp", "kwargs": {"width": args.width, "depth": 2},
                    "inputs": [{"name": "x", "shape": [args.width]}]}],
        "batch_sizes": [2], "candidates": [{"backend": "TorchEagerBackend"}],
        "measure": {"budget_s": 0.05, "min_iters": 5, "warmup_iters": 2},
        "workers": {"cpu_slots": 1, "threads_per_slot": 1, "use_gpus": False},
        "store": str(tmp / "store"),
        "deploy": {"targets": [{"cpu_slots": 1}], "latency_check_s": 0.05, "root": str(deploy_root)},
    })
    handle = connect(num_cpus=2, num_gpus=0, object_store_memory=200 * 1024**2)
    try:
        outcome = run_sweep(spec, console=Console(file=io.StringIO()), write_report=False)
        assert all(d.status == "deployed" for d in outcome.deployments), outcome.deployments
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        slots = plan_deploy_targets(Inventory.from_ray(), [{"cpu_slots": 1}])
        start_serving(str(deploy_root), ["mlp"], slots, port=port)
        torch.set_num_threads(1)
        local = aitune.load_tuned(deploy_root, "mlp", "cpu")
        x = torch.randn(2, args.width)
        body = json.dumps(tensor_json.request(x))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def over_http() -> None:
            conn.request("POST", "/mlp", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200, data

        def in_process() -> None:
            with torch.inference_mode():
                local(x)

        for _ in range(20):  # warm both paths
            over_http()
            in_process()
        times: dict[str, list[float]] = {"in-process": [], "HTTP": []}
        for i in range(args.n):
            order = [("in-process", in_process), ("HTTP", over_http)]
            for name, call in order if i % 2 == 0 else reversed(order):
                start = time.perf_counter_ns()
                call()
                times[name].append((time.perf_counter_ns() - start) / 1e6)
        conn.close()
        print(f"serve latency, {args.n} calls each, interleaved; model mlp width {args.width} batch 2, "
              f"version {local.versions[2]}, 1 CPU replica")
        for name, values in times.items():
            print(f"  {name:<11} median {statistics.median(values):8.3f} ms   p99 {percentile(values, 0.99):8.3f} ms")
        ratio_med = statistics.median(times["HTTP"]) / statistics.median(times["in-process"])
        ratio_p99 = percentile(times["HTTP"], 0.99) / percentile(times["in-process"], 0.99)
        print(f"  HTTP / in-process: median {ratio_med:.1f}x, p99 {ratio_p99:.1f}x")
    finally:
        try:
            stop_serving()
        finally:
            handle.shutdown()


if __name__ == "__main__":
    main()
