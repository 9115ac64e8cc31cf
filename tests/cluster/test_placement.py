"""Worker and deploy slots: pure planning, and real Ray actors placed by the plans."""

from __future__ import annotations

import pytest
import ray

from cluster import Inventory, NodeInfo, Slot, connect, plan_deploy_targets, plan_worker_slots

pytestmark = pytest.mark.timeout(180)

SMALL_STORE = 200 * 1024**2


def node(node_id, cpus, gpus=0.0, alive=True):
    return NodeInfo(node_id, f"host-{node_id}", "10.0.0.1", alive, float(cpus), float(gpus), None, {})


def inventory(*nodes):
    return Inventory(list(nodes))


# --- worker slots ----------------------------------------------------------------------


def test_one_gpu_slot_per_gpu_with_one_cpu_each():
    slots = plan_worker_slots(inventory(node("a", 8, 2), node("b", 8, 2)))
    assert [s.label for s in slots] == ["gpu0", "gpu1", "gpu2", "gpu3"]
    assert all((s.kind, s.num_gpus, s.num_cpus, s.threads) == ("gpu", 1, 1, 1) for s in slots)
    assert [s.index for s in slots] == [0, 1, 2, 3]


def test_gpu_slots_ask_no_cpu_when_a_gpu_node_has_fewer_cpus_than_gpus():
    slots = plan_worker_slots(inventory(node("a", 2, 16)))
    assert len(slots) == 16 and all(s.num_cpus == 0 for s in slots)


def test_max_gpu_workers_caps_the_gpu_slots():
    assert len(plan_worker_slots(inventory(node("a", 8, 4)), max_gpu_workers=3)) == 3
    with pytest.raises(ValueError, match="max_gpu_workers"):
        plan_worker_slots(inventory(node("a", 8, 4)), max_gpu_workers=0)


def test_use_gpus_false_plans_cpu_slots_on_a_gpu_cluster():
    slots = plan_worker_slots(inventory(node("a", 8, 4)), use_gpus=False)
    assert {s.kind for s in slots} == {"cpu"} and all(s.num_gpus == 0 for s in slots)


def test_cpu_defaults_share_the_cpus_across_at_most_four_slots():
    slots = plan_worker_slots(inventory(node("a", 16)))
    assert [(s.kind, s.threads, s.num_cpus) for s in slots] == [("cpu", 4, 4.0)] * 4
    assert [s.label for s in plan_worker_slots(inventory(node("a", 2)))] == ["cpu0", "cpu1"]
    (single,) = plan_worker_slots(inventory(node("a", 1)))
    assert single.threads == 1


def test_explicit_cpu_slots_and_threads_win():
    slots = plan_worker_slots(inventory(node("a", 16)), cpu_slots=2, threads_per_slot=3)
    assert [(s.threads, s.num_cpus) for s in slots] == [(3, 3.0)] * 2
    # threads alone: as many slots as fit, still at most four
    assert len(plan_worker_slots(inventory(node("a", 16)), threads_per_slot=8)) == 2


def test_too_many_cpus_asked_names_both_numbers_and_the_cpus():
    with pytest.raises(ValueError, match=r"3 CPU slots x 2 threads = 6 CPUs, but the cluster has 4 CPUs"):
        plan_worker_slots(inventory(node("a", 4)), cpu_slots=3, threads_per_slot=2)


def test_a_slot_may_not_span_nodes():
    with pytest.raises(ValueError, match="do not fit on the nodes"):
        plan_worker_slots(inventory(node("a", 2), node("b", 2)), cpu_slots=1, threads_per_slot=4)


@pytest.mark.parametrize("kwargs", [{"cpu_slots": 0}, {"threads_per_slot": 0}, {"cpu_slots": -1}])
def test_non_positive_cpu_slots_or_threads_are_refused(kwargs):
    with pytest.raises(ValueError, match="must be positive"):
        plan_worker_slots(inventory(node("a", 4)), **kwargs)


def test_slot_options_and_env():
    gpu = Slot(0, "gpu", 1.0, 1.0, 1, "gpu0")
    cpu = Slot(1, "cpu", 2.0, 0.0, 2, "cpu0")
    assert gpu.actor_options() == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert gpu.env() == {"OMP_NUM_THREADS": "1"}  # Ray sets CUDA_VISIBLE_DEVICES for GPU actors
    assert cpu.actor_options() == {"num_cpus": 2.0, "num_gpus": 0}
    assert cpu.env() == {"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": ""}
    with pytest.raises(ValueError):
        Slot(0, "tpu", 1.0, 0.0, 1, "x")


# --- deploy targets ---------------------------------------------------------------------


def test_deploy_all_gpus_and_cpu_slots_are_numbered_in_order():
    slots = plan_deploy_targets(inventory(node("a", 8, 2)), ["all_gpus", {"cpu_slots": 2}])
    assert [(s.index, s.kind, s.label) for s in slots] == [
        (0, "gpu", "gpu0"),
        (1, "gpu", "gpu1"),
        (2, "cpu", "cpu0"),
        (3, "cpu", "cpu1"),
    ]
    assert all(s.threads == 1 for s in slots)


def test_deploy_labels_stay_unique_across_targets():
    slots = plan_deploy_targets(inventory(node("a", 8, 2)), [{"gpus": 1}, {"gpus": 1}])
    assert [s.label for s in slots] == ["gpu0", "gpu1"]


def test_deploy_more_gpus_than_exist_is_refused():
    with pytest.raises(ValueError, match="ask for 3 GPUs but the cluster has 2"):
        plan_deploy_targets(inventory(node("a", 8, 2)), [{"gpus": 3}])
    with pytest.raises(ValueError, match="no GPUs"):
        plan_deploy_targets(inventory(node("a", 8)), ["all_gpus"])


@pytest.mark.parametrize("target", ["all_cpus_please", {"tpus": 1}, {"gpus": 1, "cpu_slots": 1}, 3])
def test_unknown_deploy_target_lists_the_accepted_forms(target):
    with pytest.raises(ValueError, match=r'accepted forms: "all_gpus", \{"gpus": N\}, \{"cpu_slots": N\}'):
        plan_deploy_targets(inventory(node("a", 8, 2)), [target])


@pytest.mark.parametrize("count", [0, -1, 1.5, True])
def test_deploy_counts_must_be_positive_integers(count):
    with pytest.raises(ValueError, match="positive integer"):
        plan_deploy_targets(inventory(node("a", 8, 2)), [{"gpus": count}])


# --- real actors ------------------------------------------------------------------------


def make_probe():
    """An actor reporting its environment (made here so Ray ships it by value)."""

    @ray.remote
    class Probe:
        def env(self, name):
            import os

            return os.environ.get(name)

    return Probe


@pytest.fixture
def local_ray(request):
    assert not ray.is_initialized()
    handle = connect(object_store_memory=SMALL_STORE, **request.param)
    yield handle
    handle.shutdown()


@pytest.mark.parametrize("local_ray", [{"num_cpus": 2, "num_gpus": 2}], indirect=True)
def test_gpu_actors_get_their_own_gpu_and_cpu_actor_sees_none(local_ray):
    probe = make_probe()
    gpu_slots = plan_worker_slots(Inventory.from_ray())
    assert [s.kind for s in gpu_slots] == ["gpu", "gpu"]
    gpu_actors = [probe.options(**s.actor_options(), runtime_env={"env_vars": s.env()}).remote() for s in gpu_slots]
    seen = ray.get([a.env.remote("CUDA_VISIBLE_DEVICES") for a in gpu_actors])
    assert sorted(seen) == ["0", "1"]
    for actor in gpu_actors:
        ray.kill(actor)

    (cpu_slot,) = plan_worker_slots(Inventory.from_ray(), use_gpus=False, cpu_slots=1, threads_per_slot=2)
    cpu_actor = probe.options(**cpu_slot.actor_options(), runtime_env={"env_vars": cpu_slot.env()}).remote()
    assert ray.get(cpu_actor.env.remote("CUDA_VISIBLE_DEVICES")) == ""
    assert ray.get(cpu_actor.env.remote("OMP_NUM_THREADS")) == "2"


@pytest.mark.parametrize("local_ray", [{"num_cpus": 2, "num_gpus": 16}], indirect=True)
def test_all_gpu_slots_schedule_when_gpus_outnumber_cpus(local_ray):
    probe = make_probe()
    slots = plan_worker_slots(Inventory.from_ray())
    assert len(slots) == 16
    actors = [probe.options(**s.actor_options(), runtime_env={"env_vars": s.env()}).remote() for s in slots]
    # With one CPU per slot only two would ever start; the timeout turns a hang into a failure.
    seen = ray.get([a.env.remote("CUDA_VISIBLE_DEVICES") for a in actors], timeout=120)
    assert sorted(seen, key=int) == [str(i) for i in range(16)]


def test_accelerator_type_target_pins_one_slot_per_gpu_of_that_type():
    from cluster.inventory import Inventory, NodeInfo

    def node(i, gpus, kind):
        res = {"CPU": 8.0, "GPU": float(gpus)}
        if kind:
            res[f"accelerator_type:{kind}"] = 1.0
        return NodeInfo(f"n{i}", f"h{i}", "127.0.0.1", True, 8.0, float(gpus), kind, res)

    inv = Inventory([node(0, 2, "H200"), node(1, 4, "H100"), node(2, 0, None)])
    slots = plan_deploy_targets(inv, [{"accelerator_type": "H200"}, {"cpu_slots": 1}])
    h200 = [s for s in slots if s.kind == "gpu"]
    assert len(h200) == 2
    assert all(s.actor_options()["resources"] == {"accelerator_type:H200": 0.001} for s in h200)
    assert all(s.actor_options()["num_gpus"] == 1.0 for s in h200)
    assert len({s.label for s in slots}) == len(slots)
    with pytest.raises(ValueError, match=r"no GPU node of that type \(the cluster has \['H100', 'H200'\]\)"):
        plan_deploy_targets(inv, [{"accelerator_type": "A100"}])
