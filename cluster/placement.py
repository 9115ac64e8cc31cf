"""Worker slots: how many workers to place, and what each asks of Ray.

A slot is a plan, not a place: Ray picks the node. The plans only promise that every slot
can be scheduled on the inventory they were made from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from cluster.inventory import Inventory

SlotKind = Literal["gpu", "cpu"]
DEPLOY_TARGET_FORMS = '"all_gpus", {"gpus": N}, {"cpu_slots": N}, {"accelerator_type": NAME}'


@dataclass(frozen=True)
class Slot:
    """One worker: the Ray resources it reserves and the threads it may use."""

    index: int
    kind: SlotKind
    num_cpus: float
    num_gpus: float
    threads: int
    label: str
    #: custom resources to ask for, e.g. {"accelerator_type:H200": 0.001} to land on such a node
    resources: tuple[tuple[str, float], ...] = ()
    #: cores the worker pins itself to (its share of its node); 0: don't pin
    cores: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("gpu", "cpu"):
            raise ValueError(f"slot kind must be 'gpu' or 'cpu', not {self.kind!r}")
        if self.threads <= 0:
            raise ValueError(f"slot threads must be positive, not {self.threads}")

    def actor_options(self) -> dict[str, float]:
        """The Ray resources it reserves; ``cluster.actor_options.slot_options`` adds ``env()`` to them."""
        options: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus if self.kind == "gpu" else 0}
        if self.resources:
            options["resources"] = dict(self.resources)
        return options

    def env(self) -> dict[str, str]:
        """Environment for the worker: ``runtime_env={"env_vars": slot.env()}`` (``cluster.actor_options``).

        Ray sets CUDA_VISIBLE_DEVICES only for actors granted a GPU: a CPU worker on a GPU
        node would otherwise see every GPU. Ray also sets OMP_NUM_THREADS=1 in workers.
        """
        env = {"OMP_NUM_THREADS": str(self.threads)}
        if self.cores:
            # Inductor's compile workers (and g++ below them) inherit the affinity; bound their count too.
            env["AITUNE_SLOT_CORES"] = str(self.cores)
            env["TORCHINDUCTOR_COMPILE_THREADS"] = str(self.cores)
        if self.kind == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env


def plan_worker_slots(
    inventory: Inventory,
    *,
    cpu_slots: int | None = None,
    threads_per_slot: int | None = None,
    use_gpus: bool = True,
    max_gpu_workers: int | None = None,
) -> list[Slot]:
    """One worker per GPU where the cluster has GPUs (and ``use_gpus``), else CPU slots.

    CPU defaults: ``min(cpus, 4)`` slots sharing the CPUs evenly; explicit values win but must
    fit. ``cpu_slots`` and ``threads_per_slot`` do not apply to GPU slots (one thread each).
    """
    if max_gpu_workers is not None and max_gpu_workers <= 0:
        raise ValueError(f"max_gpu_workers must be positive, not {max_gpu_workers}")
    gpus = _whole_gpus(inventory)
    if use_gpus and gpus > 0:
        count = gpus if max_gpu_workers is None else min(gpus, max_gpu_workers)
        return _gpu_slots(inventory, count)

    if threads_per_slot is not None and threads_per_slot <= 0:
        raise ValueError(f"threads_per_slot must be positive, not {threads_per_slot}")
    if cpu_slots is not None and cpu_slots <= 0:
        raise ValueError(f"cpu_slots must be positive, not {cpu_slots}")
    total = int(inventory.total_cpus)
    if cpu_slots is None:
        cpu_slots = max(1, min(total // (threads_per_slot or 1), 4))
    if threads_per_slot is None:
        threads_per_slot = max(1, total // cpu_slots)
    _check_cpu_fit(inventory, cpu_slots, threads_per_slot)
    return _cpu_slots(cpu_slots, threads_per_slot)


def core_block(available: list[int], index: int, count: int) -> list[int]:
    """The ``index``-th block of ``count`` cores among a node's ``available`` cores.

    Blocks do not overlap while they fit; past that they wrap around (a node asked for more
    slots than it has cores shares them, as it would unpinned).
    """
    if count <= 0 or not available:
        return []
    cores = sorted(available)
    count = min(count, len(cores))
    blocks = max(1, len(cores) // count)
    start = (index % blocks) * count
    return cores[start:start + count]


def plan_deploy_targets(inventory: Inventory, targets: list[str | dict]) -> list[Slot]:
    """Slots for the devices a winner is deployed to, numbered in the order of ``targets``.

    Accepted forms: ``"all_gpus"`` (one slot per GPU), ``{"gpus": N}``, ``{"cpu_slots": N}``
    (N single-thread CPU slots), ``{"accelerator_type": "H200"}`` (every GPU of that kind: Ray
    advertises ``accelerator_type:<NAME>`` on GPU nodes).
    """
    typed = [t for t in targets if isinstance(t, dict) and set(t) == {"accelerator_type"}]
    requests = [_parse_target(inventory, target) for target in targets if target not in typed]
    gpus_wanted = sum(count for kind, count in requests if kind == "gpu")
    cpus_wanted = sum(count for kind, count in requests if kind == "cpu")
    if gpus_wanted > _whole_gpus(inventory):
        raise ValueError(
            f"deploy targets ask for {gpus_wanted} GPUs but the cluster has "
            f"{inventory.total_gpus:g}"
        )
    if cpus_wanted:
        _check_cpu_fit(inventory, cpus_wanted, 1)

    slots: list[Slot] = []
    for kind, count in requests:
        made = _gpu_slots(inventory, count) if kind == "gpu" else _cpu_slots(count, 1)
        for slot in made:
            same_kind = sum(1 for s in slots if s.kind == kind)
            slots.append(replace(slot, index=len(slots), label=f"{kind}{same_kind}"))
    for target in typed:
        for slot in _typed_gpu_slots(inventory, target["accelerator_type"]):
            slots.append(replace(slot, index=len(slots), label=f"{slot.label}{len(slots)}"))
    return slots


def _typed_gpu_slots(inventory: Inventory, name: object) -> list[Slot]:
    """One GPU slot per GPU on the nodes whose accelerator type is ``name``, pinned there."""
    if not isinstance(name, str) or not name:
        raise ValueError(f'deploy target {{"accelerator_type": {name!r}}}: give the type\'s name, e.g. "H200"')
    nodes = [n for n in inventory.gpu_nodes if n.accelerator_type == name]
    if not nodes:
        known = sorted({n.accelerator_type for n in inventory.gpu_nodes if n.accelerator_type})
        raise ValueError(f"deploy target accelerator_type {name!r}: no GPU node of that type (the cluster has {known or 'none'})")
    count = sum(int(n.gpus) for n in nodes)
    cpus_each = 1.0 if all(n.cpus >= n.gpus for n in nodes) else 0.0
    # A tiny share of the node's accelerator_type resource pins the actor to such a node.
    pin = ((f"accelerator_type:{name}", 0.001),)
    return [Slot(index=i, kind="gpu", num_cpus=cpus_each, num_gpus=1.0, threads=1, label=f"{name}-", resources=pin) for i in range(count)]


def _parse_target(inventory: Inventory, target: str | dict) -> tuple[SlotKind, int]:
    if target == "all_gpus":
        if _whole_gpus(inventory) == 0:
            raise ValueError('deploy target "all_gpus": the cluster has no GPUs')
        return "gpu", _whole_gpus(inventory)
    if isinstance(target, dict) and len(target) == 1:
        ((key, value),) = target.items()
        if key in ("gpus", "cpu_slots"):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"deploy target {target!r}: {key} must be a positive integer")
            return ("gpu" if key == "gpus" else "cpu"), value
    raise ValueError(f"unknown deploy target {target!r}; accepted forms: {DEPLOY_TARGET_FORMS}")


def _whole_gpus(inventory: Inventory) -> int:
    """GPUs a num_gpus=1 worker can be given: whole GPUs per node, summed."""
    return sum(int(n.gpus) for n in inventory.gpu_nodes)


def _gpu_slots(inventory: Inventory, count: int) -> list[Slot]:
    # One CPU per GPU worker, unless some GPU node has fewer CPUs than GPUs: reserving a CPU
    # there would leave GPUs whose worker can never be scheduled.
    cpus_each = 1.0 if all(n.cpus >= n.gpus for n in inventory.gpu_nodes) else 0.0
    # Each GPU worker's share of its node's cores: it compiles there, and launches from there.
    share = min((int(n.cpus // n.gpus) for n in inventory.gpu_nodes if n.gpus >= 1), default=0)
    return [
        Slot(index=i, kind="gpu", num_cpus=cpus_each, num_gpus=1.0, threads=1, label=f"gpu{i}", cores=max(share, 1))
        for i in range(count)
    ]


def _check_cpu_fit(inventory: Inventory, count: int, threads: int) -> None:
    total = inventory.total_cpus
    if count * threads > total:
        raise ValueError(
            f"{count} CPU slots x {threads} threads = {count * threads} CPUs, "
            f"but the cluster has {total:g} CPUs"
        )
    # Each slot's threads reserve CPUs on one node: a slot cannot span nodes.
    fits = sum(int(n.cpus // threads) for n in inventory.alive_nodes)
    if fits < count:
        largest = max((n.cpus for n in inventory.alive_nodes), default=0.0)
        raise ValueError(
            f"{count} CPU slots x {threads} threads do not fit on the nodes: only {fits} slots of "
            f"{threads} CPUs fit (the cluster has {total:g} CPUs, at most {largest:g} on one node)"
        )


def _cpu_slots(count: int, threads: int) -> list[Slot]:
    return [
        Slot(index=i, kind="cpu", num_cpus=float(threads), num_gpus=0.0, threads=threads, label=f"cpu{i}", cores=threads)
        for i in range(count)
    ]
