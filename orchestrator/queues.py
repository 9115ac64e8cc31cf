"""The jobs waiting for a worker of one device class, grouped by model (model affinity).

A worker loads a model on its first job of that model and keeps it, so a worker that goes on
with a model it holds saves a load. Each model's jobs wait in their own FIFO, and a free worker
takes, in this order:

1. the next job of the model it ran last,
2. else a job of another model it holds,
3. else a job of the model the fewest workers hold (of those, the one with the most jobs
   waiting): a model is spread over more workers only when no other work is left.

With one model this is plain first in, first out. Every operation is O(1) but the third choice,
which looks over the models still waiting, and happens about once per (worker, model).
"""

from __future__ import annotations

import collections
from typing import Iterable, Iterator

from orchestrator.records import Job


class ModelQueues:
    def __init__(self) -> None:
        self._by_model: dict[str, collections.deque[Job]] = {}
        self._holders: collections.Counter[str] = collections.Counter()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def append(self, job: Job, *, front: bool = False) -> None:
        """Queue ``job`` behind its model's jobs, or ahead of them (a retry, a job now runnable)."""
        queue = self._by_model.get(job.model)
        if queue is None:
            queue = self._by_model[job.model] = collections.deque()
        queue.appendleft(job) if front else queue.append(job)
        self._size += 1

    def pop_for(self, held: Iterable[str], last: str | None = None) -> Job:
        """The next job for a worker that holds ``held`` and ran ``last`` most recently."""
        if not self._size:
            raise IndexError("pop from an empty queue")
        model = last if last in self._by_model else next((m for m in held if m in self._by_model), None)
        if model is None:
            model = min(self._by_model, key=lambda m: (self._holders[m], -len(self._by_model[m])))
        queue = self._by_model[model]
        job = queue.popleft()
        if not queue:
            del self._by_model[model]
        self._size -= 1
        return job

    def hold(self, model: str) -> None:
        """A live worker of this class has loaded ``model``."""
        self._holders[model] += 1

    def release(self, model: str) -> None:
        """A worker that held ``model`` is gone."""
        self._holders[model] -= 1
        if self._holders[model] <= 0:
            del self._holders[model]

    def drain(self) -> Iterator[Job]:
        """Every waiting job, model by model; the queue is empty afterwards."""
        by_model, self._by_model, self._size = self._by_model, {}, 0
        for queue in by_model.values():
            yield from queue
