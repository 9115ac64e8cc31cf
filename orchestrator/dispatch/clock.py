"""Time as the scheduler reads it: real time here, a simulation's own clock in ``orchestrator.sim``."""

from __future__ import annotations

import time


class Clock:
    """Real time; a simulation gives the scheduler its own clock."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
