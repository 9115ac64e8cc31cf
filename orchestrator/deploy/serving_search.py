"""The bounded search for serving settings under a p99 target, over a ``measure`` function.

Coordinate search, each coordinate climbed from its cheapest value while each next value helps:

1. the queue delay, with every tuned batch size kept and the fewest replicas;
2. the batch sizes kept (prefixes of the tuned sizes, trimmed from the largest), at that delay;
3. the replicas per device, at those.

Each setting is measured at the target's concurrencies in increasing order and stops at the first
whose p99 misses the target (a higher concurrency only queues more). :func:`grid_search` measures
every setting at every concurrency: what the search is judged against (benchmarks/serving_search.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from orchestrator.deploy.serving_choice import MeasuredPoint, Settings, batch_sets, choose, score

Measure = Callable[[Settings, int], MeasuredPoint]


@dataclass(frozen=True)
class SearchSpace:
    """What may be chosen: the batch sizes (prefixes of ``sizes`` when ``batching``), delays, replicas."""

    sizes: tuple[int, ...]
    delays_ms: tuple[float, ...]
    replicas: tuple[int, ...] = (1,)
    #: whether the model's rows may be combined at all (else one setting per replica count)
    batching: bool = True

    def sets(self) -> list[tuple[int, ...]]:
        return batch_sets(list(self.sizes)) if self.batching else [tuple(sorted(self.sizes))]

    def delays(self) -> tuple[float, ...]:
        return self.delays_ms if self.batching else (0.0,)

    def grid(self) -> list[Settings]:
        found = {Settings(s, d, r) for s in self.sets() for d in self.delays() for r in self.replicas}
        return sorted(found, key=lambda s: (s.replicas, -len(s.batch_sizes), s.max_queue_delay_ms))


@dataclass
class SearchOutcome:
    """Every point the search saw, the settings it tried, and the choice."""

    points: list[MeasuredPoint] = field(default_factory=list)
    tried: list[Settings] = field(default_factory=list)
    chosen: MeasuredPoint | None = None
    meets_target: bool = False

    @property
    def measured(self) -> int:
        return sum(not p.reused for p in self.points)

    @property
    def reused(self) -> int:
        return sum(p.reused for p in self.points)


def measure_setting(settings: Settings, concurrency: list[int], p99_ms: float, measure: Measure,
                    early_stop: bool = True) -> list[MeasuredPoint]:
    """One setting at increasing concurrency; stops after the first point that misses the target."""
    points = []
    for c in concurrency:
        point = measure(settings, c)
        points.append(point)
        if early_stop and not point.meets(p99_ms):
            break
    return points


class _Climb:
    def __init__(self, concurrency: list[int], p99_ms: float, measure: Measure, outcome: SearchOutcome) -> None:
        self.concurrency, self.p99_ms, self.measure, self.outcome = concurrency, p99_ms, measure, outcome
        self.scores: dict[Settings, tuple[int, float]] = {}

    def score_of(self, settings: Settings) -> tuple[int, float]:
        if settings not in self.scores:
            points = measure_setting(settings, self.concurrency, self.p99_ms, self.measure)
            self.outcome.points += points
            self.outcome.tried.append(settings)
            self.scores[settings] = score(points, self.p99_ms)
        return self.scores[settings]

    def climb(self, options: list[Settings]) -> Settings:
        """The best of ``options`` in order, stopping at the first that does not beat the best so far."""
        best = options[0]
        for option in options[1:]:
            if self.score_of(option) <= self.score_of(best):
                break
            best = option
        self.score_of(best)
        return best


def coordinate_search(space: SearchSpace, concurrency: list[int], p99_ms: float, measure: Measure) -> SearchOutcome:
    """Delay, then batch sizes kept, then replicas (module docstring); the choice over every point seen."""
    outcome = SearchOutcome()
    climb = _Climb(sorted(concurrency), p99_ms, measure, outcome)
    sets, fewest = space.sets(), min(space.replicas)
    best = climb.climb([Settings(sets[0], d, fewest) for d in space.delays()])
    best = climb.climb([best] + [Settings(s, best.max_queue_delay_ms, fewest) for s in sets[1:]])
    climb.climb([best] + [Settings(best.batch_sizes, best.max_queue_delay_ms, r)
                          for r in sorted(space.replicas) if r != fewest])
    outcome.chosen, outcome.meets_target = choose(outcome.points, p99_ms)
    return outcome


def grid_search(space: SearchSpace, concurrency: list[int], p99_ms: float, measure: Measure) -> SearchOutcome:
    """Every setting at every concurrency (no early stop): the exhaustive answer."""
    outcome = SearchOutcome()
    for settings in space.grid():
        outcome.points += measure_setting(settings, sorted(concurrency), p99_ms, measure, early_stop=False)
        outcome.tried.append(settings)
    outcome.chosen, outcome.meets_target = choose(outcome.points, p99_ms)
    return outcome
