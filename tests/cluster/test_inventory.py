"""Inventory: parsing ray.nodes(), totals, and liveness on a real (multi-node) local Ray."""

from __future__ import annotations

import json
import time

import pytest
import ray
import ray._common.utils
import ray._private.utils
from ray.cluster_utils import Cluster

from cluster import Inventory, NodeInfo, connect, loopback_only

pytestmark = pytest.mark.timeout(180)

SMALL_STORE = 200 * 1024**2


def ray_node(node_id, *, alive=True, cpus=2.0, gpus=0.0, extra=None):
    """An entry shaped like one of ray.nodes()."""
    resources = {"CPU": cpus, "memory": 1e9, f"node:10.0.0.{len(node_id)}": 1.0, **(extra or {})}
    if gpus:
        resources["GPU"] = gpus
    return {
        "NodeID": node_id,
        "Alive": alive,
        "NodeManagerAddress": "10.0.0.1",
        "NodeManagerHostname": f"host-{node_id}",
        "Resources": resources if alive else {},
    }


def test_node_info_reads_accelerator_type_from_resources():
    node = NodeInfo.from_ray(ray_node("a", gpus=8, extra={"accelerator_type:H200": 1.0}))
    assert (node.cpus, node.gpus, node.accelerator_type) == (2.0, 8.0, "H200")
    assert node.hostname == "host-a" and node.address == "10.0.0.1" and node.alive


def test_node_without_accelerator_has_none():
    assert NodeInfo.from_ray(ray_node("a")).accelerator_type is None


def test_totals_count_alive_nodes_only():
    inventory = Inventory(
        [
            NodeInfo.from_ray(ray_node("gpu", cpus=4, gpus=2)),
            NodeInfo.from_ray(ray_node("cpu", cpus=8)),
            NodeInfo("dead", "h", "10.0.0.9", False, 16.0, 4.0, None, {}),
        ]
    )
    assert inventory.total_cpus == 12 and inventory.total_gpus == 2
    assert [n.node_id for n in inventory.gpu_nodes] == ["gpu"]
    assert inventory.is_gpu_cluster
    assert not Inventory([NodeInfo.from_ray(ray_node("cpu"))]).is_gpu_cluster


def test_node_lookup_by_id_and_unknown_id_raises():
    inventory = Inventory([NodeInfo.from_ray(ray_node("a"))])
    assert inventory.node("a").hostname == "host-a"
    with pytest.raises(KeyError, match="no node"):
        inventory.node("zz")


def test_describe_has_one_line_per_node_and_to_dict_is_json():
    inventory = Inventory(
        [
            NodeInfo.from_ray(ray_node("a", gpus=2, extra={"accelerator_type:H200": 1.0})),
            NodeInfo.from_ray(ray_node("b")),
        ]
    )
    lines = inventory.describe().splitlines()
    assert len(lines) == 2 and "2 GPU (H200)" in lines[0] and "0 GPU" in lines[1]
    data = json.loads(json.dumps(inventory.to_dict()))
    assert data["total_gpus"] == 2 and len(data["nodes"]) == 2


@pytest.fixture(scope="class")
def local_ray():
    handle = connect(num_cpus=2, num_gpus=2, object_store_memory=SMALL_STORE)
    yield handle
    handle.shutdown()


@pytest.mark.usefixtures("local_ray")
class TestLocalRay:
    def test_from_ray_sees_the_pretend_gpus(self):
        inventory = Inventory.from_ray()
        assert len(inventory.nodes) == 1
        assert (inventory.total_cpus, inventory.total_gpus) == (2, 2)
        assert inventory.is_gpu_cluster

    def test_is_alive_for_own_node_and_not_for_unknown(self):
        own = ray.get_runtime_context().get_node_id()
        assert Inventory.is_alive(own)
        assert not Inventory.is_alive("ff" * 28)


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A GPU head (pretend H200s) and a CPU-only node, on loopback, with the driver joined."""
    assert not ray.is_initialized()
    # Cluster records its address in /tmp/ray/ray_current_cluster, where any plain
    # ray.init() on this machine (another test run, say) would find and join it.
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    with loopback_only():
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 2,
                "num_gpus": 2,
                "resources": {"accelerator_type:H200": 1},
                "object_store_memory": SMALL_STORE // 2,
                "include_dashboard": False,
            },
        )
        try:
            worker = cluster.add_node(num_cpus=3, object_store_memory=SMALL_STORE // 2)
            handle = connect(cluster.address)
        except BaseException:
            cluster.shutdown()
            raise
    yield cluster, worker
    handle.shutdown()
    cluster.shutdown()


def test_inventory_sees_both_nodes_and_a_removed_node_dies(two_node_cluster):
    cluster, worker = two_node_cluster
    inventory = Inventory.from_ray()
    assert len(inventory.nodes) == 2
    (gpu_node,) = inventory.gpu_nodes
    (cpu_node,) = [n for n in inventory.nodes if n.gpus == 0]
    assert (gpu_node.gpus, gpu_node.accelerator_type) == (2, "H200")
    assert (cpu_node.cpus, cpu_node.accelerator_type) == (3, None)
    assert (inventory.total_cpus, inventory.total_gpus) == (5, 2)
    assert Inventory.is_alive(cpu_node.node_id)

    cluster.remove_node(worker)
    deadline = time.monotonic() + 60
    while Inventory.is_alive(cpu_node.node_id):
        assert time.monotonic() < deadline, "Ray did not notice the removed node in 60 s"
        time.sleep(0.2)
    assert Inventory.is_alive(gpu_node.node_id)
    assert [n.node_id for n in Inventory.from_ray().nodes] == [gpu_node.node_id]
    everything = Inventory.from_ray(include_dead=True)
    assert not everything.node(cpu_node.node_id).alive
    assert everything.total_cpus == 2
