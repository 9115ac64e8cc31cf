"""Calls on the idle workers between runs of jobs (a sweep's decision rounds, re-measuring).

Each entry is one call: (its device class key, the worker id it would rather run on, a function
giving (method, args), called only when it is sent, so that at most one call's arguments per
worker are held at once). The entries run side by side on as many workers as their device class
has idle, each worker one call at a time, each call with its own deadline from when it is sent.
These calls go around the workers' lanes of jobs: no run is going on meanwhile.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable

from orchestrator.dispatch.fleet import Fleet, WorkerHandle
from orchestrator.dispatch.pool import WorkerDied

#: (device class key, the worker id it would rather run on, a function giving (method, args))
Entry = tuple[str, str | None, Callable[[], tuple]]


def call_idle(fleet: Fleet, calls: dict[Any, Entry], timeout_s: float) -> dict[Any, Any]:
    """One call per entry on ``fleet``'s idle workers, each with ``timeout_s`` from when it is sent.
    Returns each entry's answer, or the exception it ended with: LookupError where its device class
    has no idle worker, TimeoutError where the worker did not answer in time (it is dropped: a
    worker that hangs takes nothing more)."""
    return _IdleCalls(fleet, timeout_s).run(calls)


@dataclass
class _IdleCalls:
    """One :func:`call_idle`: the workers free for its calls, the calls out, the answers in."""

    fleet: Fleet
    timeout_s: float
    answers: dict[Any, Any] = field(default_factory=dict)
    free: dict[str, dict[str, WorkerHandle]] = field(default_factory=dict)
    #: ref -> (entry key, its worker, its deadline)
    out: dict[Any, tuple[Any, WorkerHandle, float]] = field(default_factory=dict)

    def run(self, calls: dict[Any, Entry]) -> dict[Any, Any]:
        self.free = {dc: dict(idle) for dc, idle in self.fleet.idle.items() if idle}
        todo: collections.deque = collections.deque(calls.items())
        while todo or self.out:
            todo = self._send(todo)
            if not self.out:
                break
            self._collect()
            self._expire()
        return self.answers

    def _send(self, todo: collections.deque) -> collections.deque:
        """Send what a free worker can take; returns the entries that wait for one to free."""
        later: collections.deque = collections.deque()
        while todo:
            key, (dc, prefer, make) = todo.popleft()
            idle = self.free.get(dc)
            if not idle:
                if any(w.info.device_class_key == dc for _, w, _ in self.out.values()):  # one will free
                    later.append((key, (dc, prefer, make)))
                else:
                    self.answers[key] = LookupError(f"no idle worker of device class {dc[:12]}")
                continue
            try:
                method, args = make()
            except Exception as exc:  # its arguments could not be made: that entry alone fails
                self.answers[key] = exc
                continue
            w = idle.pop(prefer, None) or idle.pop(next(iter(idle)))
            self.out[w.call(method, *args)] = (key, w, self.fleet.clock.now() + self.timeout_s)
        return later

    def _collect(self) -> None:
        """Take the answers in until the soonest deadline."""
        pool, clock = self.fleet.pool, self.fleet.clock
        soonest = min(deadline for _, _, deadline in self.out.values())
        for ref in pool.wait(list(self.out), max(0.0, soonest - clock.now())):
            key, w, _ = self.out.pop(ref)
            try:
                self.answers[key] = pool.get(ref)
            except WorkerDied as exc:
                self.answers[key] = exc
                self.fleet.drop(w)
                continue
            except Exception as exc:  # the call failed, the worker stands
                self.answers[key] = exc
            self.free.setdefault(w.info.device_class_key, {})[w.worker_id] = w

    def _expire(self) -> None:
        """Calls past their deadline: their workers are dropped."""
        now = self.fleet.clock.now()
        for ref, (key, w, deadline) in list(self.out.items()):
            if now >= deadline:
                del self.out[ref]
                self.answers[key] = TimeoutError(f"worker {w.worker_id} gave no answer within {self.timeout_s:.0f} s")
                self.fleet.drop(w)
