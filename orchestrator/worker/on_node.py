"""What a worker takes from its node's NodeShare (cluster.node_share): its block of the node's
cores, and its turn to measure while the node's other workers build."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import ray

from cluster.node_share import node_share
from orchestrator.worker.process import bound_compile_threads


def pin_to_share(slot: dict[str, Any], worker_id: str) -> list[int]:
    """Pin this process (and so its compilers' child processes) to its slot's block of the
    node's cores; the node's NodeShare hands the blocks out. Unpinned if anything is missing."""
    count = int(os.environ.get("AITUNE_SLOT_CORES", "0") or 0)
    if count <= 0 or not hasattr(os, "sched_setaffinity"):
        return []
    try:
        available = sorted(os.sched_getaffinity(0))
        share = node_share(ray.get_runtime_context().get_node_id())
        cores = ray.get(share.cores.remote(str(slot.get("label", worker_id)), count, available), timeout=30)
        os.sched_setaffinity(0, cores)
    except Exception as exc:  # pinning is for quiet measurements; a worker still works without it
        logging.getLogger(__name__).warning("worker %s not pinned to cores: %s", worker_id, exc)
        return []
    bound_compile_threads(count)
    return list(cores)


@contextlib.contextmanager
def measuring_alone(worker_id: str, lease_s: float, phases: dict[str, float]) -> Iterator[None]:
    """Hold the node's measurement lock (its lease: ``lease_s``) while measuring; the seconds waited
    for it go in ``phases["measure_wait"]``."""
    share = node_share(ray.get_runtime_context().get_node_id())
    phases["measure_wait"] = ray.get(share.acquire.remote(worker_id, lease_s))
    try:
        yield
    finally:
        share.release.remote(worker_id)
