"""Choosing a winner: by latency, by throughput, or by throughput within a latency budget.

The rules are shared by one-process tuning and the orchestrator: only correct candidates are
eligible, and a winner must beat the eager fp32 baseline beyond measurement noise, otherwise the
baseline is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from aitune.measure import Measurement, significantly_faster


class Measured(Protocol):
    """What selection needs of a result: a name, whether it is correct, and its measurement."""

    name: str

    @property
    def eligible(self) -> bool: ...

    @property
    def measurement(self) -> Measurement | None: ...


@dataclass(frozen=True)
class Strategy:
    """``min_latency``, ``max_throughput``, or ``latency_budget`` with ``budget_ms`` (checked on p99)."""

    kind: str = "min_latency"
    budget_ms: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("min_latency", "max_throughput", "latency_budget"):
            raise ValueError(f"strategy {self.kind!r} is not one of min_latency, max_throughput, latency_budget")
        if self.kind == "latency_budget" and (self.budget_ms is None or not self.budget_ms > 0):  # NaN too
            raise ValueError("strategy latency_budget needs a positive budget_ms")

    @classmethod
    def parse(cls, value: "Strategy | str") -> "Strategy":
        if isinstance(value, Strategy):
            return value
        text = str(value)
        kind, _, ms = text.partition("=")
        if kind == "latency_budget":  # not startswith: "latency_budgets=5" is a typo, not a budget
            if not ms:
                raise ValueError("write a latency budget as 'latency_budget=5.0' (milliseconds)")
            try:
                budget = float(ms)
            except ValueError:
                raise ValueError(f"latency budget {ms!r} is not a number of milliseconds") from None
            return cls("latency_budget", budget)
        return cls(text)

    def describe(self) -> str:
        return f"latency_budget={self.budget_ms}ms" if self.kind == "latency_budget" else self.kind

    def fits(self, m: Measurement) -> bool:
        return self.kind != "latency_budget" or m.p99_ms <= self.budget_ms

    def score(self, m: Measurement) -> float:
        """Higher is better."""
        return -m.median_ms if self.kind == "min_latency" else m.throughput

    def beats(self, a: Measurement, b: Measurement, min_rel_gain: float = 0.02) -> bool:
        """Whether ``a`` is better than ``b`` beyond noise under this strategy."""
        if self.kind == "latency_budget" and self.fits(a) and not self.fits(b):
            return True
        if self.kind == "max_throughput" or self.kind == "latency_budget":
            # throughput is batch / median: compare the per-item time the same way as latency
            return significantly_faster(_per_item(a), _per_item(b), min_rel_gain)
        return significantly_faster(a, b, min_rel_gain)


def _per_item(m: Measurement) -> Measurement:
    scale = 1.0 / max(m.batch_size, 1)
    return Measurement.from_times(
        [t * scale for t in m.times_ms], warmup_count=m.warmup_count, timer=m.timer, threads=m.threads,
        stop_reason=m.stop_reason, batch_size=1,
    )


@dataclass
class Selection:
    winner: Measured | None
    reason: str
    #: names of candidates that could not be told apart from the winner
    ties: tuple[str, ...] = ()


def select(results: Sequence[Measured], baseline: Measured | None, strategy: Strategy, min_rel_gain: float = 0.02) -> Selection:
    """Best eligible result by ``strategy``; it must beat ``baseline`` beyond noise, else the baseline wins."""
    pool = [r for r in results if r.eligible and r.measurement is not None and strategy.fits(r.measurement)]
    if not pool:
        if strategy.kind == "latency_budget":
            return Selection(None, f"no correct candidate has p99 within {strategy.budget_ms} ms")
        return Selection(None, "no candidate was built, checked and measured successfully")
    pool.sort(key=lambda r: strategy.score(r.measurement), reverse=True)
    best = pool[0]
    ties = tuple(
        r.name for r in pool[1:] if not strategy.beats(best.measurement, r.measurement, min_rel_gain)
    )
    if baseline is None or best is baseline:
        return Selection(best, "best by " + strategy.describe(), ties)
    base_ok = baseline.eligible and baseline.measurement is not None
    if not base_ok or strategy.beats(best.measurement, baseline.measurement, min_rel_gain):
        return Selection(best, f"beats {baseline.name} beyond noise by {strategy.describe()}", ties)
    if strategy.fits(baseline.measurement):
        return Selection(baseline, f"{best.name} is not better than {baseline.name} beyond noise: baseline kept", ())
    return Selection(best, f"{baseline.name} misses the latency budget", ties)


def speedup(baseline: Measurement | None, candidate: Measurement | None) -> float | None:
    """How many times faster than the baseline at the median: the one definition every table uses."""
    if baseline is None or candidate is None or candidate.median_ms <= 0:
        return None
    return baseline.median_ms / candidate.median_ms
