"""``RayPool``: the scheduler's workers as Ray actors, one per slot, pinned to it.

The scheduler drives it through :class:`~orchestrator.dispatch.pool.WorkerPool` and never calls
Ray itself; ``run_sweep`` builds this pool and hands it in.
"""

from __future__ import annotations

from typing import Any, Collection

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError, WorkerCrashedError

from cluster.actor_options import one_life_actor, slot_options
from cluster.inventory import Inventory
from cluster.placement import Slot
from orchestrator.dispatch.pool import CallFailed, WorkerDied, WorkerPool
from orchestrator.worker.actor import TuneWorker


class RayPool(WorkerPool):
    def __init__(self, actor_class=None) -> None:
        self._ray = ray
        self._actor_class = actor_class or one_life_actor(TuneWorker)

    def spawn(self, slot: Slot, worker_id: str, spec: dict[str, Any]) -> tuple[Any, Any]:
        actor = self._actor_class.options(**slot_options(slot)).remote(
            {"kind": slot.kind, "threads": slot.threads, "label": slot.label}, spec, worker_id
        )
        return actor, actor.info.remote()

    def call(self, handle: Any, method: str, *args: Any) -> Any:
        return getattr(handle, method).remote(*args)

    def wait(self, refs: Collection[Any], timeout: float) -> list[Any]:
        if not refs:
            return []
        refs = list(refs)
        ready, rest = self._ray.wait(refs, num_returns=1, timeout=max(0.0, timeout))
        if ready and rest:  # whatever else is done already comes back in the same turn
            more, _ = self._ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return ready

    def get(self, ref: Any) -> Any:
        try:
            return self._ray.get(ref)
        except (RayActorError, ActorDiedError, WorkerCrashedError) as exc:
            raise WorkerDied(str(exc)) from exc
        except RayTaskError as exc:  # the method itself raised: the candidate, not the worker
            raise CallFailed(str(exc), type(exc.cause).__name__ if exc.cause else "RayTaskError") from exc

    def cancel(self, ref: Any) -> None:
        try:  # a queued actor call is dropped; one that has just started runs to its end
            self._ray.cancel(ref)
        except Exception:
            pass

    def kill(self, handle: Any) -> None:
        try:
            self._ray.kill(handle, no_restart=True)
        except Exception:
            pass

    def node_alive(self, node_id: str) -> bool:
        return Inventory.is_alive(node_id)

