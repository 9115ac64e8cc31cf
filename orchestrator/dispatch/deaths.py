"""A worker's death during a call, settled: a crash, an infrastructure failure, or a job to run alone.

The loop replaces a dead worker at once; what the death means is settled here, without a pause
(the grace is a deadline of the loop, not a sleep). A death is ``infra`` when the worker's node
went away: the job is retried on another worker, at most ``MAX_INFRA_RETRIES`` times. It is a
``crash`` when the node is still alive ``DEATH_GRACE_S`` later: the candidate took its worker down
(``os._exit``, a segfault, an OOM kill). A worker that dies with calls queued behind the one it
ran can't say which killed it (the answer of a call that had just ended may die with the
process): every job it held runs again *alone* (no call before or after it on its worker), and
only a job that kills its worker alone is a crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from orchestrator import records as R
from orchestrator.dispatch.fleet import Call
from orchestrator.dispatch.pool import WorkerPool
from orchestrator.records import Job, ResultRecord, result_for

MAX_INFRA_RETRIES = 2
#: how long a worker's node may take to be seen gone before its death counts as a crash
DEATH_GRACE_S = 2.0
DEATH_POLL_S = 0.25


@dataclass(eq=False)
class Death:
    """A worker died during ``call``; crash or infra is decided once its node's fate is known."""

    call: Call
    error: BaseException
    #: its node was gone when the death was seen
    node_gone: bool
    #: calls were queued behind the one it ran: which of them killed it is not known
    ambiguous: bool = False
    decide_at: float = math.inf


class Deaths:
    """One run's deaths not settled yet; ``alone``: keys of the jobs that run with no call before or
    after them on their worker since a death (the caller's set: it may outlive the run)."""

    def __init__(self, pool: WorkerPool, alone: set[str]) -> None:
        self.pool = pool
        self.pending: list[Death] = []
        self.alone = alone
        #: when the pending deaths are looked at again
        self.next_check = 0.0

    def __bool__(self) -> bool:
        return bool(self.pending)

    def judge(self, call: Call, error: BaseException) -> Death:
        """The worker of ``call`` died during it (its lane as it was): whether its node went away,
        and if not, whether calls were queued behind it (the jobs of those then run alone)."""
        w = call.worker
        node_gone = w.info is None or not self.pool.node_alive(w.info.node_id)
        ambiguous = bool(w.queued) and not node_gone
        if ambiguous:  # any of the jobs it was sent may have killed it: each runs again alone
            self.alone.update(c.job.key for c in w.queued if c.first)
        return Death(call, error, node_gone, ambiguous)

    def wait_on(self, death: Death, now: float) -> None:
        """Settle ``death`` at once if its node is gone, else once the grace has passed."""
        death.decide_at = now if death.node_gone else now + DEATH_GRACE_S
        self.pending.append(death)
        self.next_check = now

    def settle(self, now: float, retry: Callable[[Job, str], None], emit: Callable[[ResultRecord], None]) -> None:
        """A death whose node went away is infra (retried); one whose node outlived the grace is a
        crash, or, where calls were queued behind it, its job runs again alone. ``retry(job, why)``
        puts a job back at the front of its queue; ``emit`` gives a job its result."""
        if not self.pending or now < self.next_check:
            return
        self.next_check = now + DEATH_POLL_S
        pending = []
        for death in self.pending:
            info = death.call.worker.info
            if info is None or not self.pool.node_alive(info.node_id):
                self._lost_with_node(death.call, retry, emit)
            elif now >= death.decide_at and death.ambiguous and death.call.job.key not in self.alone:
                # The node is fine, but calls were queued behind this one: it may be innocent.
                self.alone.add(death.call.job.key)
                retry(death.call.job, "its worker died with calls queued behind it: running it alone")
            elif now >= death.decide_at:
                # The node is fine, so the candidate took its worker down (os._exit, segfault, OOM kill).
                call, w = death.call, death.call.worker
                emit(result_for(call.job, R.CRASH, f"worker {w.worker_id} died during {call.phase}: {death.error}",
                                type(death.error).__name__, w.info))
            else:
                pending.append(death)
        self.pending[:] = pending

    @staticmethod
    def _lost_with_node(call: Call, retry: Callable[[Job, str], None], emit: Callable[[ResultRecord], None]) -> None:
        job, w = call.job, call.worker
        if job.attempt < MAX_INFRA_RETRIES:
            job.attempt += 1
            retry(job, "node lost")
        else:
            emit(result_for(job, R.INFRA, f"worker {w.worker_id} lost with its node, {job.attempt + 1} attempts",
                            "NodeLost", w.info))
