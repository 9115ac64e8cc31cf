"""The jobs waiting for a worker of one device class, grouped by model (model affinity).

A worker loads a model on its first job of that model and keeps it, so a worker that goes on
with a model it holds saves a load. Each model's jobs wait in their own queue, and a free worker
takes, in this order:

1. the next job of the model it ran last,
2. else a job of another model it holds,
3. else a job of the model with the most work waiting per worker that holds it: a model is
   spread over more workers as its share of what is left grows, not before.

Within that model, given ``toolchain`` (what a job's backend starts in a worker process on its
first build: ``torch.compile``'s compiler, the ONNX exporter, seconds each), it takes a job of a
toolchain it has started, else of one no live worker has started, else of one other workers
started only where the queue's start-cost rule (:mod:`orchestrator.dispatch.start_cost`) judges
it worth a start (those workers are all in one long build, or the toolchain's jobs waiting would
take its workers longer than a start costs, or, before what the start and the jobs cost has been
seen, more than twice as many of its jobs wait, in all models, as workers that started it); and
never for a job sent ahead to it while it is busy; else it tries the other models the same way,
and else it waits. Each toolchain's start is paid by one worker while the others go on with the
rest, and the last job of a toolchain is not taken, at the cost of that start, by a worker that
frees a moment before the one that has it started.

Within a model, jobs go first in, first out, unless the queue is given ``estimate`` (a job's
expected seconds): then the longest go first, so that the sweep does not end waiting on one
long build that started last (with estimates off by 2x either way, a 1,000-worker sweep of
100,000 jobs loses about 0.6% of its time at the end, against 5% in arrival order). A job put
back at the front (a retry, a job another driver gave up) goes before all of them, whatever its
toolchain.

Every operation is O(log n) but the third choice, which looks over the models still waiting, and
happens about once per (worker, model).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
from typing import Callable, Collection, Iterable, Iterator

from orchestrator.dispatch.start_cost import ByCount, StartRule
from orchestrator.records import Job

#: what ``_chain_for`` answers when a worker should leave a model's jobs to others
_WAIT = object()


class ModelQueues:
    def __init__(self, estimate: Callable[[Job], float] | None = None,
                 toolchain: Callable[[Job], str | None] | None = None, start_cost: StartRule | None = None) -> None:
        """``start_cost``: whether a worker starts a toolchain others started (:class:`ByCount` if None)."""
        self._estimate = estimate
        self._toolchain = toolchain
        self._start_cost = start_cost if start_cost is not None else ByCount()
        # model -> toolchain -> heap of (priority, sequence, job)
        self._by_model: dict[str, dict[str | None, list[tuple[float, int, Job]]]] = {}
        self._work: collections.Counter[str] = collections.Counter()  # model -> work waiting
        self._holders: collections.Counter[str] = collections.Counter()
        self._started: collections.Counter[str] = collections.Counter()  # toolchain -> live workers that started it
        self._waiting: collections.Counter[str | None] = collections.Counter()  # toolchain -> its jobs waiting
        self._seq = itertools.count()
        self._fronts = itertools.count(-1, -1)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def append(self, job: Job, *, front: bool = False) -> None:
        """Queue ``job`` among its model's jobs, or ahead of them (a retry, a job now runnable)."""
        cost = self._estimate(job) if self._estimate is not None else 1.0
        if front:
            key = (-math.inf, next(self._fronts))
        else:
            key = (-cost if self._estimate is not None else 0.0, next(self._seq))
        chain = self.toolchain(job)
        heapq.heappush(self._by_model.setdefault(job.model, {}).setdefault(chain, []), (*key, job))
        self._waiting[chain] += 1
        self._work[job.model] += cost
        self._size += 1

    def toolchain(self, job: Job) -> str | None:
        """What ``job``'s backend starts in a worker on its first build; None: nothing to speak of."""
        return self._toolchain(job) if self._toolchain is not None else None

    def pop_for(self, held: Iterable[str], last: str | None = None, started: Collection[str] = (),
                share: bool | Callable[[str], bool] = True) -> Job | None:
        """The next job for a worker that holds ``held``, ran ``last`` most recently and has
        ``started`` these toolchains; None: what waits is better left to the workers that have
        its toolchain started (it must wait). ``share``: whether it may start a toolchain other
        workers started: True, where the start-cost rule says so; False, never (for a job sent
        ahead to a busy worker, which may free after they do); a predicate, where it says so."""
        if not self._size:
            raise IndexError("pop from an empty queue")
        model = last if last in self._by_model else next((m for m in held if m in self._by_model), None)
        if model is None:
            model = max(self._by_model, key=self._share)
        chain = self._chain_for(self._by_model[model], started, share)
        if chain is _WAIT:  # the other models, in the same order of preference
            rest = [m for m in held if m in self._by_model and m != model]
            seen = {model, *rest}
            rest += sorted((m for m in self._by_model if m not in seen), key=self._share, reverse=True)
            found = next(((m, c) for m in rest for c in (self._chain_for(self._by_model[m], started, share),)
                          if c is not _WAIT), None)
            if found is None:
                return None
            model, chain = found
        chains = self._by_model[model]
        queue = chains[chain]
        job = heapq.heappop(queue)[2]
        self._waiting[chain] -= 1
        if not queue:
            del chains[chain]
        if chains:
            self._work[model] -= self._estimate(job) if self._estimate is not None else 1.0
        else:
            del self._by_model[model]
            del self._work[model]
        self._size -= 1
        return job

    def _share(self, model: str) -> float:
        return self._work[model] / (self._holders[model] + 1)

    def _chain_for(self, chains: dict[str | None, list], started: Collection[str],
                   share: bool | Callable[[str], bool] = True) -> "str | None | object":
        """The toolchain whose next job a worker that has ``started`` these takes from one
        model's queues, or ``_WAIT``."""
        if len(chains) == 1 and None in chains:  # nothing to keep to (and every job, without toolchains)
            return None
        first = {chain: queue[0][:2] for chain, queue in chains.items()}
        rules = (lambda c: first[c][0] == -math.inf, lambda c: c is None or c in started,
                 lambda c: not self._started[c], lambda c: self._shares(c, share))
        for rule in rules:  # in turn: the last asks the start-cost rule
            choice = [c for c in chains if rule(c)]
            if choice:
                return min(choice, key=first.__getitem__)
        return _WAIT

    def _shares(self, chain: str, share: bool | Callable[[str], bool]) -> bool:
        """Whether a worker takes a job of ``chain``, which other live workers started (see :meth:`pop_for`)."""
        if share is False:
            return False
        if callable(share):
            return bool(share(chain))
        return self._start_cost.worth_starting(chain, self._waiting[chain], self._started[chain])

    def waiting(self, chain: str | None) -> int:
        """How many jobs of ``chain`` wait."""
        return self._waiting[chain]

    def starters(self, chain: str) -> int:
        """How many live workers of this class started ``chain``."""
        return self._started[chain]

    def started(self, toolchain: str) -> None:
        """A live worker of this class has started ``toolchain`` (it was sent a job of it)."""
        self._started[toolchain] += 1

    def stopped(self, toolchain: str) -> None:
        """A worker that had started ``toolchain`` is gone."""
        _take_one(self._started, toolchain)

    def hold(self, model: str) -> None:
        """A live worker of this class has loaded ``model``."""
        self._holders[model] += 1

    def release(self, model: str) -> None:
        """A worker that held ``model`` is gone."""
        _take_one(self._holders, model)

    def joined(self, models: Iterable[str], toolchains: Iterable[str]) -> None:
        """A live worker of this class holds ``models`` and has started ``toolchains``."""
        for model in models:
            self.hold(model)
        for chain in toolchains:
            self.started(chain)

    def left(self, models: Iterable[str], toolchains: Iterable[str]) -> None:
        """A worker that held ``models`` and had started ``toolchains`` is gone."""
        for model in models:
            self.release(model)
        for chain in toolchains:
            self.stopped(chain)

    def drain(self) -> Iterator[Job]:
        """Every waiting job, model by model, in queue order; the queue is empty afterwards."""
        by_model, self._by_model, self._size = self._by_model, {}, 0
        self._work.clear()
        self._waiting.clear()
        for chains in by_model.values():
            queue = sorted(entry for heap in chains.values() for entry in heap)
            yield from (job for *_, job in queue)


class ClassQueues(dict[str, ModelQueues]):
    """Each device class's :class:`ModelQueues`, made by ``make(device_class_key)`` on first use."""

    def __init__(self, make: Callable[[str], ModelQueues]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, device_class_key: str) -> ModelQueues:
        queue = self[device_class_key] = self._make(device_class_key)
        return queue


def _take_one(counts: collections.Counter, key) -> None:
    """One fewer of ``key``, and none left at all once it reaches zero."""
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]
