"""A node lost mid-candidate: the job is recorded as infra and retried on another worker."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster
from rich.console import Console

from cluster import connect, loopback_only
from orchestrator import records as R
from orchestrator.sweep import run_sweep
from sweep_helpers import EAGER, fault, tiny_spec

pytestmark = pytest.mark.timeout(300)


def test_node_loss_is_infra_and_the_job_is_retried(tmp_path, monkeypatch):
    # Keep this cluster to itself: not recorded where a plain ray.init() elsewhere would join it,
    # and serving on 127.0.0.1 only.
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *a, **k: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *a, **k: None)
    with loopback_only():
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "object_store_memory": 150 * 1024**2, "include_dashboard": False},
        )
        doomed = cluster.add_node(num_cpus=1, object_store_memory=150 * 1024**2)
        cluster.wait_for_nodes()
        connect(cluster.address)
    try:
        # Each sleeping candidate keeps its worker busy for a while, so the doomed node is
        # in the middle of one when it goes.
        candidates = [EAGER] + [fault("sleep", seconds=4.0, tag=str(i)) for i in range(6)]
        spec = tiny_spec(tmp_path / "store", candidates)

        def remove_later():
            # Once the first result is committed both workers are up and busy with 4 s
            # candidates: removing the doomed node then catches one of them mid-build.
            db = tmp_path / "store" / "store.sqlite"
            deadline = time.monotonic() + 120
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
        outcome = run_sweep(spec, console=Console(file=open("/dev/null", "w")), deploy=False, write_report=False)
        killer.join()
    finally:
        ray.shutdown()
        cluster.shutdown()

    statuses = [r.status for r in outcome.results]
    assert statuses.count(R.OK) == len(candidates), [(r.candidate, r.status, r.error) for r in outcome.results]
    retried = [r for r in outcome.results if r.attempts > 1]
    assert retried, [(r.candidate, r.status, r.attempts, r.worker.node_id[:8], doomed.node_id[:8]) for r in outcome.results]
    assert all(r.worker.node_id != doomed.node_id for r in retried)
    assert R.CRASH not in statuses
