"""Serving settings, measured points, and the rule that chooses among them (pure: no Ray, no HTTP).

A point is one set of settings (batch sizes kept, queue delay, replicas per device) measured at
one concurrency. The chosen point is the highest throughput whose p99 is within the target and
that lost no request; where none is, the lowest p99, marked as missing the target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class Settings:
    """What the serving search chooses: the tuned batch sizes dynamic batching may use, the queue
    delay (ms) and the replicas per device."""

    batch_sizes: tuple[int, ...]
    max_queue_delay_ms: float
    replicas: int = 1

    def __post_init__(self) -> None:
        # one batch size: nothing waits for a batch, so every delay is the same setting
        if len(self.batch_sizes) < 2 and self.max_queue_delay_ms:
            object.__setattr__(self, "max_queue_delay_ms", 0.0)
        object.__setattr__(self, "max_queue_delay_ms", float(self.max_queue_delay_ms))

    def to_dict(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes), "max_queue_delay_ms": self.max_queue_delay_ms,
                "replicas": self.replicas}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Settings":
        return cls(tuple(int(b) for b in data["batch_sizes"]), float(data["max_queue_delay_ms"]), int(data["replicas"]))

    def label(self) -> str:
        return f"b{list(self.batch_sizes)} delay {self.max_queue_delay_ms:g} ms x{self.replicas}"


@dataclass(frozen=True)
class MeasuredPoint:
    """One closed-loop run: settings, concurrency, and what the load generator saw."""

    settings: Settings
    concurrency: int
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    lost: int = 0
    #: taken from the store, not measured by this run
    reused: bool = False

    def meets(self, p99_ms: float) -> bool:
        return self.lost == 0 and self.requests > 0 and math.isfinite(self.p99_ms) and self.p99_ms <= p99_ms

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["settings"] = self.settings.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], reused: bool = False) -> "MeasuredPoint":
        return cls(Settings.from_dict(data["settings"]), int(data["concurrency"]), float(data["throughput_rps"]),
                   float(data["p50_ms"]), float(data["p99_ms"]), int(data["requests"]), int(data.get("lost", 0)), reused)


def choose(points: list[MeasuredPoint], p99_ms: float) -> tuple[MeasuredPoint | None, bool]:
    """(the chosen point, whether it meets the target). Within the target: the highest throughput
    (ties: lower p99, fewer replicas, smaller delay); none within it: the lowest p99 (ties: higher
    throughput). None for no points."""
    if not points:
        return None, False
    within = [p for p in points if p.meets(p99_ms)]
    if within:
        best = max(within, key=lambda p: (p.throughput_rps, -p.p99_ms, -p.settings.replicas,
                                          -p.settings.max_queue_delay_ms))
        return best, True
    answered = [p for p in points if p.requests > 0 and math.isfinite(p.p99_ms)] or points
    return min(answered, key=lambda p: (p.lost > 0, p.p99_ms, -p.throughput_rps)), False


def score(points: list[MeasuredPoint], p99_ms: float) -> tuple[int, float]:
    """How good one setting's points are, to compare settings: (1, best throughput within the
    target), else (0, -lowest p99)."""
    within = [p.throughput_rps for p in points if p.meets(p99_ms)]
    if within:
        return 1, max(within)
    finite = [p.p99_ms for p in points if math.isfinite(p.p99_ms)]
    return 0, -min(finite) if finite else -math.inf


def frontier(points: list[MeasuredPoint]) -> list[MeasuredPoint]:
    """The points no other point beats on both throughput (higher) and p99 (lower), by p99."""
    ordered = sorted((p for p in points if p.requests > 0 and p.lost == 0),
                     key=lambda p: (p.p99_ms, -p.throughput_rps))
    kept: list[MeasuredPoint] = []
    for p in ordered:
        if not kept or p.throughput_rps > kept[-1].throughput_rps:
            kept.append(p)
    return kept


def batch_sets(sizes: list[int]) -> list[tuple[int, ...]]:
    """The batch sizes dynamic batching may be limited to: every prefix of the tuned sizes, largest first."""
    ordered = sorted(set(sizes))
    return [tuple(ordered[:n]) for n in range(len(ordered), 0, -1)]
