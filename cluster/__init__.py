"""The Ray cluster side: connecting, the inventory of nodes and devices, worker placement.

Knows Ray and nothing of tuning: no torch, aitune or orchestrator imports here.
"""

from cluster.connect import (
    ClusterConnectionError,
    ClusterHandle,
    connect,
    disable_usage_stats,
    loopback_only,
)
from cluster.inventory import Inventory, NodeInfo
from cluster.placement import Slot, plan_deploy_targets, plan_worker_slots

__all__ = [
    "ClusterConnectionError",
    "ClusterHandle",
    "Inventory",
    "NodeInfo",
    "Slot",
    "connect",
    "disable_usage_stats",
    "loopback_only",
    "plan_deploy_targets",
    "plan_worker_slots",
]
