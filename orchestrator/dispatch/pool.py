"""The workers a scheduler drives, behind one small interface.

A sweep hands the scheduler ``orchestrator.worker.ray_pool.RayPool`` (each worker a Ray actor
pinned to its slot). A test or a simulation drives the same scheduler with another pool
(``orchestrator.sim.pool.SimulatedPool``: no Ray, a simulated clock): the scheduler never calls
Ray itself.
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
