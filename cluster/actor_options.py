"""What a worker actor asks of Ray: its slot's resources and environment, and no restarts.

One rule for every actor placed on a slot: the tuning workers (orchestrator.worker.ray_pool), the
deploy workers and the Serve replicas (orchestrator.deploy); and for the nodes' NodeShare actors,
the restart policy.
"""

from __future__ import annotations

from typing import Any

import ray

from cluster.placement import Slot

#: a dead actor is its driver's to replace (and a dead worker's candidate the driver's to record):
#: Ray restarts none and retries no call on its own
NO_RESTARTS: dict[str, int] = {"max_restarts": 0, "max_task_retries": 0}


def slot_options(slot: Slot) -> dict[str, Any]:
    """Keyword arguments for ``SomeActor.options(...)``, or a Serve deployment's ``ray_actor_options``:
    the slot's resources, and its environment as ``runtime_env`` where it sets any."""
    options: dict[str, Any] = dict(slot.actor_options())
    env = slot.env()
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


def one_life_actor(cls: type, **options: Any) -> Any:
    """``cls`` as a Ray actor class (``options``: ``ray.remote``'s, such as ``num_cpus``) that Ray
    never restarts, and whose calls it never retries."""
    return ray.remote(**NO_RESTARTS, **options)(cls)
