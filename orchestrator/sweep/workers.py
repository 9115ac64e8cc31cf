"""The sweep's side of its workers: starting them when first needed, keeping its store claims alive,
claiming keys before they are built, and asking for each model's eager fp32 reference once."""

from __future__ import annotations

import logging
import threading

from aitune.canonical import sha256_of
from aitune.environment import describe_environment
from orchestrator import records as R
from orchestrator.dispatch.gate import JobGate
from orchestrator.dispatch.scheduler import Scheduler
from orchestrator.records import Job, ResultRecord, WorkerInfo
from orchestrator.store import ResultStore

log = logging.getLogger(__name__)


class Heartbeat:
    """Renews the sweep's heartbeat and its claims while the driver lives (a thread of its own)."""

    def __init__(self, store: ResultStore, sweep_id: str) -> None:
        self.store, self.sweep_id = store, sweep_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{sweep_id}", daemon=True)

    def _beat(self) -> None:
        interval = max(self.store.lease_s / 3, 0.2)
        while not self._stop.wait(interval):
            try:
                self.store.heartbeat(self.sweep_id)
            except Exception as exc:  # a busy store: the next beat tries again
                log.warning("heartbeat of sweep %s failed: %s", self.sweep_id, exc)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class StoreGate(JobGate):
    """Claims each artifact key before it is built; defers keys another live driver holds.

    A key another driver built after this sweep was planned (its claim already released) is not
    built again either: the result is taken as any stored result.
    """

    def __init__(self, store: ResultStore, sweep_id: str, resolve, known: dict[str, set], events) -> None:
        self.store, self.sweep_id, self.resolve, self.events = store, sweep_id, resolve, events
        self.known = known  # artifact key -> the result ids the plan already took into account
        self.waiting: set[str] = set()

    def _news(self, keys) -> dict[str, list[ResultRecord]]:
        """Results other drivers stored for ``keys`` since they were planned."""
        found = self.store.results_for(keys)
        return {key: fresh for key, records in found.items()
                if (fresh := [r for r in records if r.sweep_id != self.sweep_id
                              and r.result_id not in self.known.get(key, set())
                              and r.status not in (R.INFRA, R.SKIPPED)])}

    def admit(self, job: Job) -> bool:
        owner = self.store.claim(job.key, self.sweep_id)
        if owner is not None:  # another driver is building it
            if job.key not in self.waiting:
                self.waiting.add(job.key)
                self.events.waiting(job, owner)
            return False
        if self._news([job.key]):
            self.store.release(job.key, self.sweep_id)
            return False  # another driver built it meanwhile: poll takes it
        return True

    def poll(self, deferred: list[Job]) -> tuple[list[ResultRecord], list[Job]]:
        done, runnable = [], []
        news = self._news([j.key for j in deferred])
        for job in deferred:
            fresh = news.get(job.key)
            if fresh:  # the other driver finished it: take it as any stored result
                self.known.setdefault(job.key, set()).update(r.result_id for r in fresh)
                outcome = self.resolve(job, fresh)
                (done if isinstance(outcome, ResultRecord) else runnable).append(outcome)
            elif self.store.claim(job.key, self.sweep_id) is None:
                runnable.append(job)  # its driver gave up or died: the claim expired, it is ours now
        return done, runnable


class Workers:
    """The sweep's workers, started when first needed.

    Job keys need each worker's device class. On an embedded local Ray whose slots are all CPU
    slots, the workers would run this very interpreter on this very machine, so the driver knows
    their device class without starting them; a sweep the store answers entirely then starts none.
    Anywhere else (a cluster, GPUs) the workers start first and report it.
    """

    def __init__(self, scheduler: Scheduler, slots, local: bool) -> None:
        self.scheduler, self.slots = scheduler, slots
        self.local = local and all(slot.kind == "cpu" for slot in slots)
        self._infos = None
        self._planned: set[str] = set()

    def classes(self) -> list:
        if not self.local:
            self._infos = self.scheduler.start_workers()
            return self._infos
        device_class = describe_environment("cpu").device_class()
        key = sha256_of(device_class)
        self._planned = {key}
        return [WorkerInfo(slot.label, "", "", 0, "cpu", device_class, key, slot.threads) for slot in self.slots]

    def started(self) -> Scheduler:
        if self._infos is None:
            self._infos = self.scheduler.start_workers()
            odd = {i.device_class_key for i in self._infos} - self._planned
            if odd:  # a worker that is not what the driver planned for: its jobs would never run
                raise RuntimeError(f"workers report device class(es) {sorted(k[:12] for k in odd)}, not the "
                                   f"driver's own {sorted(k[:12] for k in self._planned)}: run with --address to a cluster")
        return self.scheduler


class ReferenceAsks:
    """Which job is asked to send the eager fp32 reference of each (model, shape, samples, device class).

    One job at a time is asked; if it finishes without sending it, the next one is.
    """

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self.asked: dict[str, str] = {}  # reference key -> the job asked to send it

    def want(self, job: Job) -> bool:
        key = job.reference_key
        holder = self.asked.get(key)
        if holder is not None and holder != job.key or self.store.has_reference(key):
            return False
        self.asked[key] = job.key
        return True

    def answered(self, record: ResultRecord, sent: bool) -> None:
        if not sent and self.asked.get(record.reference_key) == record.key:
            del self.asked[record.reference_key]
