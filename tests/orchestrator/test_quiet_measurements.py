"""Workers on one node don't disturb each other: each slot pinned to its own cores, and with
measure: {exclusive: node} one measurement per node at a time (real Ray)."""

from __future__ import annotations


import pytest
import ray

from cluster import Inventory, plan_worker_slots
from cluster.node_share import node_share, start_node_shares
from cluster.placement import core_block
from orchestrator import records as R
from orchestrator.worker.ray_pool import RayPool
from orchestrator.sweep import run_sweep
from sweep_helpers import EAGER, EAGER_BF16, quiet, tiny_spec

pytestmark = pytest.mark.timeout(300)


def test_core_blocks_do_not_overlap_while_they_fit():
    assert [core_block([0, 1, 2, 3], i, 2) for i in range(3)] == [[0, 1], [2, 3], [0, 1]]
    assert core_block([4, 5], 0, 3) == [4, 5]


def test_each_worker_slot_is_pinned_to_its_own_cores(ray_session, tmp_path):
    spec = tiny_spec(tmp_path / "store", [EAGER])
    inventory = Inventory.from_ray()
    shares = start_node_shares([n.node_id for n in inventory.alive_nodes])  # noqa: F841
    slots = plan_worker_slots(inventory, cpu_slots=2, threads_per_slot=1, use_gpus=False)
    pool = RayPool()
    actors = []
    try:
        for slot in slots:
            actor, started = pool.spawn(slot, f"{slot.label}-0", spec.model_dump(mode="json"))
            ray.get(started)
            actors.append(actor)
        infos = [ray.get(a.cache_info.remote()) for a in actors]
    finally:
        for a in actors:
            pool.kill(a)
    cores = [set(i["cores"]) for i in infos]
    assert all(len(c) == 1 for c in cores)
    assert cores[0].isdisjoint(cores[1])
    assert all(i["threads"] == 1 for i in infos)


def test_a_node_measures_one_worker_at_a_time_and_a_dead_holder_expires(ray_session):
    share = node_share(ray.get_runtime_context().get_node_id())
    ray.get(share.acquire.remote("a", 60.0))
    waiting = share.acquire.remote("b", 60.0)
    assert not ray.wait([waiting], timeout=0.5)[0]  # a measures: b waits
    ray.get(share.release.remote("a"))
    assert ray.wait([waiting], timeout=5)[0]
    # b never releases (killed mid-measurement): its lease runs out and c goes ahead, having
    # waited for it (a 3 s lease: c must ask while b still holds it, however slow the machine)
    waited = ray.get(share.acquire.remote("c", 3.0), timeout=30)
    assert waited > 0
    ray.get(share.release.remote("c"))


def test_a_sweep_with_exclusive_measurement_records_its_waits(ray_session, tmp_path):
    spec = tiny_spec(tmp_path / "store", [EAGER, EAGER_BF16], measure={"budget_s": 0.05, "min_iters": 5, "warmup_iters": 2,
                                                                        "exclusive": "node"})
    outcome = run_sweep(spec, console=quiet(), deploy=False, write_report=False)
    assert all(r.status == R.OK for r in outcome.results)
    assert all("measure_wait" in r.phases for r in outcome.results)
    # not part of what is measured: the same results are reused by a sweep without it
    again = run_sweep(tiny_spec(tmp_path / "store", [EAGER, EAGER_BF16]), console=quiet(), deploy=False, write_report=False)
    assert again.ran == 0


@pytest.mark.parametrize("inherited, expected", [(None, 2), ("8", 2), ("1", 1)])
def test_inductor_compile_threads_are_bounded_to_the_share_without_importing_inductor_at_start(inherited, expected):
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from orchestrator.worker.process import bound_compile_threads as _bound_compile_threads\n"
        "_bound_compile_threads(2)\n"
        "assert 'torch._inductor.config' not in sys.modules, 'inductor imported at worker start'\n"
        "import torch._inductor.config as c\n"
        "print(c.compile_threads)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_COMPILE_THREADS"}
    if inherited is not None:
        env["TORCHINDUCTOR_COMPILE_THREADS"] = inherited
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(expected)
