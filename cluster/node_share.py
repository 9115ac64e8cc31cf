"""What the worker slots of one node share: its cores, and (optionally) one measurement at a time.

One small named actor per node (``aitune-node-<node id>``), started by the driver so that it
lives as long as the sweep and not as long as whichever worker happened to ask first. It hands
each slot label a block of the node's cores (a replacement worker takes its slot's block again),
and is a lock with a lease around measurements: a worker killed while measuring holds it no
longer than the lease.
"""

from __future__ import annotations

import asyncio
import time

from cluster.actor_options import one_life_actor
from cluster.placement import core_block

PREFIX = "aitune-node-"


class NodeShare:
    def __init__(self) -> None:
        self.blocks: dict[str, list[int]] = {}
        self.holder: str | None = None
        self.since = 0.0

    async def cores(self, label: str, count: int, available: list[int]) -> list[int]:
        if label not in self.blocks:
            used = {c for block in self.blocks.values() for c in block}
            free = [c for c in sorted(available) if c not in used]
            self.blocks[label] = free[:count] if len(free) >= count else core_block(available, len(self.blocks), count)
        return self.blocks[label]

    async def acquire(self, who: str, lease_s: float) -> float:
        """Wait until no other worker measures (or its lease ran out); returns the seconds waited."""
        start = time.monotonic()
        while self.holder not in (None, who) and time.monotonic() - self.since < lease_s:
            await asyncio.sleep(0.002)
        self.holder, self.since = who, time.monotonic()
        return self.since - start

    async def release(self, who: str) -> None:
        if self.holder == who:
            self.holder = None


def _actor_class():
    return one_life_actor(NodeShare, num_cpus=0)


def start_node_shares(node_ids: list[str]) -> list:
    """One NodeShare per node, owned by the caller (the driver); keep the handles alive."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cls = _actor_class()
    return [cls.options(name=PREFIX + node_id, get_if_exists=True,
                        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=True)).remote()
            for node_id in node_ids]


def node_share(node_id: str):
    """This node's NodeShare: the driver's, else one started now (a node that joined later)."""
    import ray

    try:
        return ray.get_actor(PREFIX + node_id)
    except ValueError:
        return _actor_class().options(name=PREFIX + node_id, get_if_exists=True).remote()
