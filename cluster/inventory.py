"""The nodes of the connected Ray cluster and the devices they offer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import ray

ACCELERATOR_PREFIX = "accelerator_type:"


@dataclass
class NodeInfo:
    """One Ray node as the GCS reports it."""

    node_id: str
    hostname: str
    address: str
    alive: bool
    cpus: float
    gpus: float
    accelerator_type: str | None
    resources: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_ray(cls, entry: dict[str, Any]) -> NodeInfo:
        """Build from one entry of ``ray.nodes()``."""
        resources = {str(k): float(v) for k, v in (entry.get("Resources") or {}).items()}
        types = sorted(k[len(ACCELERATOR_PREFIX):] for k in resources if k.startswith(ACCELERATOR_PREFIX))
        return cls(
            node_id=entry["NodeID"],
            hostname=entry.get("NodeManagerHostname", ""),
            address=entry.get("NodeManagerAddress", ""),
            alive=bool(entry.get("Alive", False)),
            cpus=resources.get("CPU", 0.0),
            gpus=resources.get("GPU", 0.0),
            accelerator_type=types[0] if types else None,
            resources=resources,
        )

    def describe(self) -> str:
        gpus = f"{self.gpus:g} GPU"
        if self.accelerator_type:
            gpus += f" ({self.accelerator_type})"
        state = "alive" if self.alive else "dead"
        return (
            f"node {self.node_id[:12]} {self.hostname} {self.address}: "
            f"{self.cpus:g} CPU, {gpus}, {state}"
        )


@dataclass
class Inventory:
    """A snapshot of the cluster's nodes; the totals count alive nodes only."""

    nodes: list[NodeInfo]

    @classmethod
    def from_ray(cls, *, include_dead: bool = False) -> Inventory:
        """Snapshot the connected cluster (``ray.nodes()``); dead nodes only when asked."""
        nodes = [NodeInfo.from_ray(entry) for entry in ray.nodes()]
        return cls([n for n in nodes if include_dead or n.alive])

    @staticmethod
    def is_alive(node_id: str) -> bool:
        """Whether the node is alive now (asks the GCS afresh; an unknown node is not alive).

        Tells a worker that crashed on a live node from a node that went away.
        """
        return any(entry["NodeID"] == node_id and entry.get("Alive", False) for entry in ray.nodes())

    @property
    def alive_nodes(self) -> list[NodeInfo]:
        return [n for n in self.nodes if n.alive]

    @property
    def total_cpus(self) -> float:
        return sum(n.cpus for n in self.alive_nodes)

    @property
    def total_gpus(self) -> float:
        return sum(n.gpus for n in self.alive_nodes)

    @property
    def gpu_nodes(self) -> list[NodeInfo]:
        return [n for n in self.alive_nodes if n.gpus > 0]

    @property
    def is_gpu_cluster(self) -> bool:
        return self.total_gpus > 0

    def node(self, node_id: str) -> NodeInfo:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(f"no node {node_id!r} in this inventory ({len(self.nodes)} nodes)")

    def describe(self) -> str:
        """One line per node."""
        return "\n".join(n.describe() for n in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [asdict(n) for n in self.nodes],
            "total_cpus": self.total_cpus,
            "total_gpus": self.total_gpus,
        }

