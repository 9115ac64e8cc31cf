"""The workers a scheduler drives, behind one small interface.

``RayPool`` runs each worker as a Ray actor pinned to its slot. A test or a simulation can drive
the same scheduler with another pool (``orchestrator.simulation.SimulatedPool``: no Ray, a
simulated clock): the scheduler never calls Ray itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Collection

from cluster.placement import Slot


class WorkerDied(Exception):
    """The worker process went away during a call (crash, kill, or its node was lost)."""


class CallFailed(Exception):
    """The call raised inside a live worker; ``cause`` names the exception class."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


class WorkerPool(ABC):
    @abstractmethod
    def spawn(self, slot: Slot, worker_id: str, spec: dict[str, Any]) -> tuple[Any, Any]:
        """Start a worker on ``slot``; returns (handle, a call ref that answers its WorkerInfo dict)."""

    @abstractmethod
    def call(self, handle: Any, method: str, *args: Any) -> Any:
        """Start ``method(*args)`` on the worker; returns a ref to wait on."""

    @abstractmethod
    def wait(self, refs: Collection[Any], timeout: float) -> list[Any]:
        """The refs among ``refs`` that are done (at least one unless ``timeout`` passes first).

        ``refs`` is a live view of what the scheduler waits on (it supports ``in``, ``len`` and
        iteration); a pool that can answer without looking at every ref need not copy it.
        """

    @abstractmethod
    def get(self, ref: Any) -> Any:
        """The value of a finished call; raises WorkerDied or CallFailed."""

    @abstractmethod
    def kill(self, handle: Any) -> None: ...

    def cancel(self, ref: Any) -> None:
        """Take back a call its worker has not started (nobody waits on it after this); a pool
        that cannot does nothing, and the call runs when its turn comes."""

    @abstractmethod
    def node_alive(self, node_id: str) -> bool: ...



class RayPool(WorkerPool):
    def __init__(self, actor_class=None) -> None:
        import ray

        from orchestrator.worker import TuneWorker

        self._ray = ray
        self._actor_class = actor_class or ray.remote(max_restarts=0, max_task_retries=0)(TuneWorker)

    def spawn(self, slot: Slot, worker_id: str, spec: dict[str, Any]) -> tuple[Any, Any]:
        options = dict(slot.actor_options())
        env = slot.env()
        if env:
            options["runtime_env"] = {"env_vars": env}
        actor = self._actor_class.options(**options).remote(
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
        from ray.exceptions import ActorDiedError, RayActorError, RayTaskError, WorkerCrashedError

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
        from cluster.inventory import Inventory

        return Inventory.is_alive(node_id)

