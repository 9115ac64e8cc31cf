"""The sweep's serving stage (``latency_target``): after the winners are deployed, each model and
device class gets serving settings chosen by measurement (orchestrator.deploy.serving_search),
installed beside its versions as ``serving.json``, and reported as a throughput/p99 frontier.

Measured where the deploy root is this machine's (an embedded Ray, or a root this driver shares
with its targets): the installed versions are read from it and ``serving.json`` written to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from orchestrator.records import DeployRecord, DeployStatus
from orchestrator.spec.schema import SweepSpec

log = logging.getLogger(__name__)


def serving_ingress(spec: SweepSpec, address: str | None):
    """Around starting an embedded Ray for a sweep with a latency target: direct ingress on, so the
    search measures what ``serve`` serves (each replica answering HTTP itself, no proxy hop)."""
    import ray

    from orchestrator.deploy.serve import direct_ingress_env
    from orchestrator.deploy.serve_request import free_port

    embedded = not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    if spec.latency_target is None or not embedded:
        return contextlib.nullcontext()
    return direct_ingress_env(free_port("127.0.0.1"))


def _groups(deployments: list[DeployRecord]) -> dict[tuple[str, str], tuple[str, str, str | None]]:
    """(model, device class key) -> (deploy root, slot kind, device name) of what was deployed."""
    found = {}
    for d in deployments:
        if d.status == DeployStatus.DEPLOYED and d.device_class_key and d.root:
            worker = d.worker or {}
            kind = "gpu" if str(worker.get("device", "cpu")).startswith("cuda") else "cpu"
            found[(d.model, d.device_class_key)] = (d.root, kind, worker.get("device_name"))
    return found


def search_serving(spec: SweepSpec, store, sweep_id: str, deployments: list[DeployRecord], inventory,
                   say=print) -> list[dict[str, Any]]:
    """Each deployed (model, device class): its search's points and choice, serving.json installed."""
    from cluster import plan_deploy_targets

    slots = plan_deploy_targets(inventory, spec.deploy.targets)
    found = []
    for (model, class_key), (root, kind, device) in sorted(_groups(deployments).items()):
        mine = [s for s in slots if s.kind == kind]
        try:
            found.append(_search_one(spec, store, sweep_id, model, class_key, root, mine, inventory, device, say))
        except Exception as exc:  # the winners stay deployed; serve falls back to the defaults
            log.warning("serving search for %s failed", model, exc_info=True)
            found.append({"model": model, "device_class_key": class_key, "device": device,
                          "error": f"{type(exc).__name__}: {exc}", "points": []})
            say(f"serving settings of {model} on {device}: not searched: {type(exc).__name__}: {exc}")
    return found


def replica_options(spec: SweepSpec, kind: str, slots: list, inventory) -> tuple[list[int], list[int]]:
    """(replica counts to try, those left out because the cluster lacks the CPUs for them)."""
    wanted = spec.serving().replicas or ([1, 2] if kind == "gpu" else [1])
    if kind == "gpu":
        return list(wanted), []
    need = sum(s.num_cpus for s in slots)
    fits = [r for r in wanted if r * need <= inventory.total_cpus + 1e-9]
    return fits or [min(wanted)], [r for r in wanted if r not in fits]


def traffic_lengths(model, count: int) -> tuple[int, ...]:
    """``count`` request lengths following a model's traffic mix over its first axis that varies
    (each bucket's share of the bodies, at lengths spread over the range it pads up from); ()
    for a model whose shapes are fixed."""
    axes = model.axes()
    if not axes:
        return ()
    name, buckets = next(iter(axes.items()))
    shares = model.traffic_weights()[name]
    out, cumulative, below = [], 0.0, 0
    edges = []
    for b in buckets:
        cumulative += shares[b]
        edges.append((cumulative, below, b))
        below = b
    for i in range(count):
        at = (i + 0.5) / count
        _, low, high = next((e for e in edges if at <= e[0] + 1e-12), edges[-1])
        out.append(low + 1 + (i * 7919) % (high - low))
    return tuple(out)


def _search_one(spec, store, sweep_id, model, class_key, root, slots, inventory, device, say) -> dict[str, Any]:
    from aitune.batching import batching_in_root
    from aitune.serving_config import ServingConfig, current_versions, write_serving
    from orchestrator.deploy.serving_measure import Load, ServingBench
    from orchestrator.deploy.serving_search import SearchSpace, coordinate_search

    target, options = spec.latency_target, spec.serving()
    versions = current_versions(root, model, class_key)
    if not versions:
        raise RuntimeError(f"nothing of {model} is installed for this device class in {root} on this machine")
    replicas, left_out = replica_options(spec, slots[0].kind, slots, inventory)
    space = SearchSpace(tuple(sorted(versions)), tuple(options.queue_delays_ms), tuple(replicas),
                        batching_in_root(Path(root), model, class_key).enabled)
    lengths = traffic_lengths(spec.model(model), Load().bodies)
    bench = ServingBench(root, model, slots, class_key, versions, store, Load(options.requests, options.seconds,
                                                                             lengths=lengths))
    try:
        outcome = coordinate_search(space, list(target.concurrency), target.p99_ms, bench)
    finally:
        bench.close()
    report = {"model": model, "device_class_key": class_key, "device": device, "target": target.model_dump(),
              "points": [p.to_dict() for p in outcome.points], "tried": len(outcome.tried),
              "grid": len(space.grid()), "measured": outcome.measured, "reused": outcome.reused,
              "replicas_left_out": left_out, "meets_target": outcome.meets_target,
              "chosen": outcome.chosen.to_dict() if outcome.chosen else None, "serving_json": None}
    chosen = outcome.chosen
    if chosen is not None:
        config = ServingConfig(list(chosen.settings.batch_sizes), chosen.settings.max_queue_delay_ms,
                               chosen.settings.replicas, versions, outcome.meets_target, target.model_dump(),
                               {"concurrency": chosen.concurrency, "throughput_rps": round(chosen.throughput_rps, 3),
                                "p50_ms": round(chosen.p50_ms, 3), "p99_ms": round(chosen.p99_ms, 3)}, sweep_id)
        report["serving_json"] = str(write_serving(root, model, class_key, config))
    return report
