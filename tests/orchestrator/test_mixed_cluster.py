"""A cluster with two kinds of (pretend) GPU: jobs, winners and deploys per device class, and a
node lost mid-sweep.

Eight one-GPU nodes on a ``ray.cluster_utils.Cluster``, four advertising ``accelerator_type:H100``
and four ``accelerator_type:A100``; each node sets ``AITUNE_TEST_DEVICE_NAME`` so that its
pretend GPU takes that name as its device class (see ``orchestrator.worker.pretend_gpus``).
"""

from __future__ import annotations

import collections
import sqlite3
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from cluster import connect, loopback_only
from orchestrator import records as R
from orchestrator.worker.pretend_gpus import ENV_VAR
from orchestrator.sweep import run_sweep
from sweep_helpers import EAGER, EAGER_BF16, fault, quiet, tiny_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TYPES = ["H100", "A100"] * 4
OBJECT_STORE = 80 * 1024**2


@pytest.fixture(scope="module")
def mixed():
    """(cluster, {node_id: accelerator type}, [nodes]) with 8 GPU nodes of 1 CPU each."""
    mp = pytest.MonkeyPatch()
    # Keep this cluster to itself (not recorded for a plain ray.init() elsewhere), on 127.0.0.1.
    mp.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    mp.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    with loopback_only():
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "num_gpus": 0, "object_store_memory": OBJECT_STORE, "include_dashboard": False})
        nodes = [cluster.add_node(num_cpus=1, num_gpus=1, resources={f"accelerator_type:{t}": 1},
                                  object_store_memory=OBJECT_STORE, env_vars={ENV_VAR: t}) for t in TYPES]
        cluster.wait_for_nodes()
        connect(cluster.address)
    try:
        yield cluster, {n.node_id: t for n, t in zip(nodes, TYPES)}, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        mp.undo()


def gpu_spec(store, candidates, **changes):
    return tiny_spec(store, candidates, workers={"use_gpus": True}, **changes)


def device_name(record) -> str:
    return record.worker.device_class["device_name"]


def test_jobs_winners_and_deploys_go_by_device_class(mixed, tmp_path):
    _, node_type, _ = mixed
    spec = gpu_spec(tmp_path / "store", [EAGER, EAGER_BF16], deploy={"targets": [{"accelerator_type": "H100"}]})
    outcome = run_sweep(spec, console=quiet(), write_report=False)

    # every candidate expanded once per device class, and run on a node of that class
    assert all(r.status == R.OK for r in outcome.results), [(r.candidate, r.status, r.error) for r in outcome.results]
    per_class = collections.defaultdict(list)
    for r in outcome.results:
        per_class[device_name(r)].append(r.candidate)
        assert node_type[r.worker.node_id] == device_name(r)
    assert sorted(per_class) == ["A100", "H100"]
    assert sorted(per_class["H100"]) == sorted(per_class["A100"]) and len(per_class["H100"]) == 2
    class_of = {r.device_class_key: device_name(r) for r in outcome.results}
    assert len(class_of) == 2

    # one winner per (model, batch, device class), chosen among that class's own results
    assert sorted(class_of[s.device_class_key] for s in outcome.selections) == ["A100", "H100"]
    for s in outcome.selections:
        winner = next(r for r in outcome.results if r.key == s.winner_key)
        assert winner.device_class_key == s.device_class_key

    # {accelerator_type: H100}: one target per H100 GPU, all on H100 nodes; only the H100 winner deploys
    assert {d.target for d in outcome.deployments} and len({d.target for d in outcome.deployments}) == 4
    assert {node_type[d.worker["node_id"]] for d in outcome.deployments if d.worker} == {"H100"}
    h100 = next(s for s in outcome.selections if class_of[s.device_class_key] == "H100")
    deployed = [d for d in outcome.deployments if d.status == "deployed"]
    assert len(deployed) == 4 and {d.winner_key for d in deployed} == {h100.winner_key}
    # The A100 winner is not even sent to H100 targets: nothing is refused, nothing left undone.
    assert [d for d in outcome.deployments if d.status != "deployed"] == [] and outcome.problems == []


def test_losing_one_of_eight_nodes_retries_its_job_elsewhere(mixed, tmp_path):
    cluster, node_type, nodes = mixed
    doomed = nodes[1]  # an A100 node
    candidates = [EAGER] + [fault("sleep", seconds=4.0, tag=str(i)) for i in range(5)]
    spec = gpu_spec(tmp_path / "store", candidates)

    def remove_later():
        # Once two results are committed all 8 workers are up and busy with 4 s candidates.
        db = tmp_path / "store" / "store.sqlite"
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(db) as conn:
                    if conn.execute("SELECT count(*) FROM results").fetchone()[0] >= 2:
                        break
            except sqlite3.Error:
                pass
            time.sleep(0.2)
        time.sleep(1.0)
        cluster.remove_node(doomed)

    killer = threading.Thread(target=remove_later, daemon=True)
    killer.start()
    outcome = run_sweep(spec, console=quiet(), deploy=False, write_report=False)
    killer.join()

    # nothing lost: every candidate of both classes has one result, all correct
    assert len(outcome.results) == 2 * len(candidates)
    assert len({(r.key) for r in outcome.results}) == 2 * len(candidates)
    assert all(r.status == R.OK for r in outcome.results), [(r.candidate, r.status, r.error) for r in outcome.results]
    # the job caught on the lost node was recorded infra in the store and retried on another A100 node
    retried = [r for r in outcome.results if r.attempts > 1]
    assert retried
    for r in retried:
        assert r.worker.node_id != doomed.node_id and node_type[r.worker.node_id] == "A100" == device_name(r)
    with sqlite3.connect(tmp_path / "store" / "store.sqlite") as conn:
        statuses = [row[0] for row in conn.execute("SELECT status FROM results")]
    assert R.CRASH not in statuses
