"""Many-model benchmark: at least 30 small models through 2 workers; is each worker's memory flat?

``--models`` (default 32) MLPs from one factory, each with its own weights (width 512, depth 3,
seed i: about 3 MB each; batch 1), on 2 CPU workers, with only the eager fp32
candidate and a minimal measurement, so that the sweep is all model loading. The workers' model
cache is bounded (``workers.model_cache_mb``, default here 16 MB, about 5 of these models).
After each batch of models has been swept (on one store, the batches one after another, the
same 2 workers throughout), it prints each worker's resident memory, its peak, and what its
cache holds.

    goal: each worker's peak resident memory flat as models are added (the last batch's peak
    within 10 % of the first's, after the first batch warmed the worker up)

Each line splits resident memory into the worker's own pages (RssAnon), mapped files (its
libraries) and shared memory: Ray's object store, into which the worker writes each result (here
a 3 MB checkpoint per model). Those shared pages grow as the store's allocator hands out fresh
space, until it reuses what the driver let go of (about 70 MB of a 200 MB store, by some 60
models): they are the node's store, bounded by its size, not the worker's. The last lines give
both figures again from the first batch after which the cache was full (had evicted), since a
bounded cache grows until it is full by design.

Run:  PYTHONPATH=. .venv/bin/python benchmarks/many_models.py [--models 32] [--batch 8] [--cache-mb 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="models added per step")
    parser.add_argument("--cache-mb", type=float, default=16.0)
    args = parser.parse_args()

    import ray

    from cluster import Inventory, connect, plan_worker_slots
    from cluster.node_share import start_node_shares
    from orchestrator.planning.candidates import identify_models
    from orchestrator.planning.keys import expand
    from orchestrator.worker.ray_pool import RayPool
    from orchestrator.records import WorkerInfo
    from orchestrator.spec.schema import parse_spec

    models = [{"name": f"m{i:02d}", "factory": "aitune.examples:mlp", "kwargs": {"width": 512, "depth": 3, "seed": i},
               "inputs": [{"name": "x", "shape": [512]}]} for i in range(args.models)]
    spec = parse_spec({"models": models, "batch_sizes": [1], "candidates": [{"backend": "TorchEagerBackend"}],
                       "measure": {"budget_s": 0.01, "min_iters": 3, "warmup_iters": 1},
                       "workers": {"cpu_slots": 2, "threads_per_slot": 1, "use_gpus": False, "model_cache_mb": args.cache_mb},
                       "store": tempfile.mkdtemp(prefix="aitune-many-")})
    print(f"machine: {os.cpu_count()} CPU cores, no GPU; load average {os.getloadavg()[0]:.2f}; "
          f"{args.models} models, cache {args.cache_mb:g} MB per worker")
    handle = connect(num_cpus=2, object_store_memory=200 * 1024**2)
    pool = RayPool()
    actors = []
    try:
        inventory = Inventory.from_ray()
        shares = start_node_shares([n.node_id for n in inventory.alive_nodes])  # noqa: F841
        slots = plan_worker_slots(inventory, cpu_slots=2, threads_per_slot=1, use_gpus=False)
        infos = []
        for slot in slots:
            actor, started = pool.spawn(slot, f"{slot.label}-0", spec.model_dump(mode="json"))
            infos.append(WorkerInfo.from_dict(ray.get(started)))
            actors.append(actor)
        # The driver fingerprints one model at a time; the jobs go to the workers in turn.
        ids = identify_models(spec)
        jobs = expand(spec, {n: fp for n, (fp, _) in ids.items()}, {infos[0].device_class_key: infos[0].device_class},
                      {infos[0].device_class_key: 1})
        peaks: list[list[float]] = [[] for _ in actors]
        anon: list[list[float]] = [[] for _ in actors]  # RssAnon: without the object store's shared pages
        full_at: list[int | None] = [None for _ in actors]  # the first step after which its cache had evicted
        for step in range(0, len(jobs), args.batch):
            chunk = jobs[step:step + args.batch]
            refs = []
            for i, job in enumerate(chunk):  # an actor runs its calls in order: build, finish, build...
                actor = actors[i % len(actors)]
                refs.append((actor.build.remote(job.to_dict()), actor.finish.remote(job.to_dict())))
            for built, finished in refs:
                answer = ray.get(built)
                assert answer["status"] == "ok", answer.get("error")
                record = ray.get(finished)[0]
                assert record["status"] == "ok", record.get("error")
            line = [f"after {step + len(chunk):3d} models:"]
            for w, actor in enumerate(actors):
                info = ray.get(actor.cache_info.remote())
                peaks[w].append(info["peak_rss_bytes"] / MB)
                anon[w].append((info.get("anon_rss_bytes") or 0) / MB)
                if full_at[w] is None and info["evictions"]:
                    full_at[w] = len(peaks[w]) - 1
                line.append(f"worker {w}: rss {info['rss_bytes'] / MB:6.1f} MB (own {anon[w][-1]:6.1f}, "
                            f"files {(info.get('file_rss_bytes') or 0) / MB:5.1f}, "
                            f"shared {(info.get('shmem_rss_bytes') or 0) / MB:5.1f}), "
                            f"peak {info['peak_rss_bytes'] / MB:6.1f} MB, "
                            f"cache {len(info['models'])} models {info['bytes'] / MB:5.1f} MB, {info['evictions']} evicted;")
            print("  ".join(line))
    finally:
        for a in actors:
            pool.kill(a)
        handle.shutdown()
    for w, p in enumerate(peaks):
        if len(p) >= 2:
            growth = p[-1] / p[0] - 1
            print(f"worker {w}: peak resident memory {p[0]:.1f} MB after the first {args.batch} models, {p[-1]:.1f} MB "
                  f"after all {args.models}: {growth * 100:+.1f}% (goal: within 10%) -> {'MET' if abs(growth) <= 0.10 else 'NOT MET'}")
    for w, a in enumerate(anon):
        if len(a) >= 2 and a[0]:
            print(f"worker {w}: its own memory (RssAnon, without the object store's shared pages) {a[0]:.1f} MB "
                  f"after the first {args.batch} models, {a[-1]:.1f} MB after all {args.models}: {(a[-1] / a[0] - 1) * 100:+.1f}%")
    # A bounded cache grows until it is full, by design: what must not grow is what comes after.
    for w, (p, a, full) in enumerate(zip(peaks, anon, full_at)):
        if full is not None and full < len(p) - 1:
            n = (full + 1) * args.batch
            print(f"worker {w}: once its cache was full (after {n} models), to all {args.models}: peak "
                  f"{p[full]:.1f} -> {p[-1]:.1f} MB ({(p[-1] / p[full] - 1) * 100:+.1f}%), own memory "
                  f"{a[full]:.1f} -> {a[-1]:.1f} MB ({(a[-1] / a[full] - 1) * 100:+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
