"""Whether a worker should start a toolchain other live workers have started already.

A toolchain (``torch.compile``'s compiler, the ONNX exporter) costs a worker process seconds to
start on its first build of it (see :class:`~orchestrator.dispatch.queues.ModelQueues`). A
worker free for a job of a toolchain others started starts it too only where that is worth it:

1. yes while every worker of its device class that started it is in one long build
   (``LONG_BUILD_S`` or more: one likely to go on a while yet);
2. else, once a start and a job have been seen (a worker's first build of the toolchain,
   finished or running so far, and the phases of the other jobs), whether the toolchain's jobs
   waiting would take its workers longer than a start costs;
3. else, before that (:class:`ByCount`), while more than twice as many of its jobs wait as
   workers that started it (fewer, and those are likely done with them before this one has
   started it).

A queue is handed a rule for its device class (:meth:`StartCost.rule`); a queue with none keeps
to the third.
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass
from typing import Protocol

from orchestrator import records as R
from orchestrator.dispatch.clock import Clock
from orchestrator.dispatch.fleet import Fleet
from orchestrator.records import ResultRecord


class StartRule(Protocol):
    def worth_starting(self, chain: str, waiting: int, starters: int) -> bool:
        """Whether a worker starts ``chain``, which ``starters`` live workers of its class started,
        for one of the ``waiting`` jobs of it that wait."""


class ByCount:
    """Start it while more than twice as many of its jobs wait as workers that started it."""

    def worth_starting(self, chain: str, waiting: int, starters: int) -> bool:
        return waiting > 2 * starters


class StartCost:
    """What starting a toolchain (a worker's first build of it) and what a job cost, as seen so
    far over the fleet's workers, kept from one run to the next."""

    #: a build running this long makes its toolchain worth starting on another worker: a fresh
    #: process's first compile or export costs 3 to 6 s on a small CPU machine, so only a build
    #: several times that long (a TensorRT engine's minutes) is worth it
    LONG_BUILD_S = 20.0

    def __init__(self, fleet: Fleet, clock: Clock) -> None:
        self.fleet, self.clock = fleet, clock
        #: key of a worker's first job of a toolchain -> the toolchain (None once its build was counted)
        self._firsts: dict[str, str | None] = {}
        self._start_s: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=64))
        self._job_s: collections.deque = collections.deque(maxlen=256)

    def rule(self, device_class_key: str) -> ClassStartCost:
        """The rule for the queue of one device class."""
        return ClassStartCost(self, device_class_key)

    def first_build(self, job_key: str, chain: str) -> None:
        """A worker starts ``chain`` on this job: its build seconds are what a start costs."""
        self._firsts[job_key] = chain

    def worth_starting(self, chain: str, device_class_key: str, waiting: int, starters: int) -> bool:
        if self._all_building(chain, device_class_key):
            return True
        now = self.clock.now()
        # a first build still running has cost at least this long already
        starts = list(self._start_s.get(chain, ())) + [
            now - w.running.started for w in self.fleet.workers.values()
            if w.running is not None and w.running.phase == "build" and self._firsts.get(w.running.job.key) == chain]
        if not starts or not self._job_s:
            return ByCount().worth_starting(chain, waiting, starters)
        return waiting * statistics.median(self._job_s) > starters * statistics.median(starts)

    def observe_start(self, record: ResultRecord) -> None:
        """Learn what a toolchain's start costs from a worker's first build of it, as soon as
        that build is done (its finish may take a while yet); counted once."""
        chain = self._firsts.get(record.key)
        build = record.phases.get("build")
        if chain is not None and build is not None:
            self._start_s[chain].append(build)
            self._firsts[record.key] = None

    def observe(self, record: ResultRecord) -> None:
        """Learn what a toolchain's start and a job cost from a result's phase seconds."""
        self.observe_start(record)  # a failed build has only this record
        first = record.key in self._firsts
        self._firsts.pop(record.key, None)
        build = record.phases.get("build")
        if not first and record.status == R.OK and build is not None:
            self._job_s.append(build + record.phases.get("check+measure", 0.0))

    def _all_building(self, chain: str, device_class_key: str) -> bool:
        """Whether every live worker of that class that started ``chain`` has been running one
        build for ``LONG_BUILD_S`` or more (one likely to go on a while yet)."""
        since = self.clock.now() - self.LONG_BUILD_S
        starters = [w for w in self.fleet.workers.values()
                    if chain in w.toolchains and w.info is not None and w.info.device_class_key == device_class_key]
        return bool(starters) and all(
            w.running is not None and w.running.phase == "build" and w.running.started <= since for w in starters)


@dataclass(frozen=True)
class ClassStartCost:
    """:class:`StartCost`'s rule for the workers of one device class."""

    costs: StartCost
    device_class_key: str

    def worth_starting(self, chain: str, waiting: int, starters: int) -> bool:
        return self.costs.worth_starting(chain, self.device_class_key, waiting, starters)
