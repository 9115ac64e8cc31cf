"""Deciding between candidates: interleaved rounds, measured until the answer is known.

A candidate's first measurement (screening) is taken alone, in its own window, often while other
work runs on the machine: good enough to tell a 3x loser from a contender, not to choose between
contenders. The decision is taken here instead, from *rounds*: each round times one call of every
candidate still in the race, in a rotated order, so that whatever disturbs the machine during the
comparison hits all of them alike. Every comparison is paired: the ratio of two candidates' times
in the same round.

After each batch of rounds (never fewer than ``min_rounds``) each pair of candidates is compared by
the median of their paired ratios and its distribution-free confidence interval
(Bonferroni-corrected for the number of comparisons), in the rounds both ran:

- **beaten**: some other candidate is faster beyond noise (the interval is above 1, and the median
  gain is at least ``min_gain``); a beaten candidate sits the following rounds out and can't win.

The leader is the candidate with the lowest median of those not beaten; each other one is, against it:

- **tie**: the whole interval lies within ``tie`` of 1 (the two are shown to be that close);
- **open**: neither yet.

The comparison stops when nothing is open (``resolved``: all but the leader were beaten; ``tie``:
what is left is a declared tie), or at the cap (``cap``: seconds or rounds; what is still open is listed
as not separated). Among the leader and what is declared tied with it, the winner is taken by a
fixed rule: the baseline (eager fp32) first, then the candidates' order (the spec's order, cheapest
build first in the default sets), so the same rounds always give the same winner and the choice
costs at most ``tie``. At the cap, eager fp32 is kept if nothing beat it beyond noise, else the
leader wins (the best estimate there is). Either way a candidate must beat eager fp32 beyond
noise, in the same window, to replace it.

:func:`assess` is the rule on raw round times (no clock, no torch: what tests drive with fake
timings and what the driver re-runs on a worker's answer); :func:`run_rounds` measures the rounds.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from aitune.measure import _CHUNK, Measurement, _measuring, _time_calls, _warm_up, MeasureConfig, median_ci

#: why a comparison stopped; ``alone``: one contender (the others failed or were far behind in
#: screening); ``screening``: no rounds could be run, the first measurements decided
STOPS = ("resolved", "tie", "cap", "alone", "screening")
BEATEN, TIE, OPEN = "beaten", "tie", "open"
#: bootstrap resamples behind the probability that the winner is the fastest (fixed seed: the
#: same rounds always give the same figure)
BOOTSTRAP = 400


@dataclass(frozen=True)
class DecisionRule:
    """When a comparison is resolved, and what it may cost (per group)."""

    confidence: float = 0.95
    #: a win must be at least this much faster (relative), besides beyond noise
    min_gain: float = 0.02
    #: two candidates whose ratio's interval lies within 1 +- this are a declared tie
    tie: float = 0.03
    #: timed calls of every contender before anything is decided, whatever the cap
    min_rounds: int = 10
    max_rounds: int = 1000
    #: seconds of rounds per group (past min_rounds)
    cap_s: float = 30.0
    #: screening: a candidate slower than this many times the best is not compared again
    reach: float = 2.5
    #: ... unless its screening ran beside other work (a build on its node): then this many times
    reach_disturbed: float = 5.0
    #: contenders compared at most (the baseline comes on top)
    most: int = 6

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"decision confidence must be in [0.5, 1), got {self.confidence!r}")
        if not 0 <= self.min_gain < 0.5:
            raise ValueError(f"decision min_gain must be in [0, 0.5), got {self.min_gain!r}")
        if not 0 < self.tie < 0.5:
            raise ValueError(f"decision tie must be in (0, 0.5), got {self.tie!r}")
        if not 3 <= self.min_rounds <= self.max_rounds:
            raise ValueError(f"decision rounds: need 3 <= min_rounds <= max_rounds, got {self.min_rounds}, {self.max_rounds}")
        if not self.cap_s > 0:
            raise ValueError(f"decision cap_s must be > 0, got {self.cap_s!r}")
        if not 1 <= self.reach <= self.reach_disturbed:
            raise ValueError(f"decision reach: need 1 <= reach <= reach_disturbed, got {self.reach}, {self.reach_disturbed}")
        if self.most < 1:
            raise ValueError(f"decision most must be >= 1, got {self.most!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def screen(first: Mapping[str, float], baseline: str | None, rule: DecisionRule,
           disturbed: frozenset[str] | set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Who is compared again, from each candidate's first median: those within ``rule.reach`` of
    the best (``reach_disturbed`` for the ``disturbed`` ones), fastest first, ``rule.most`` at
    most, and the baseline always (when it has a first median). Returns (contenders, left out)."""
    if not first:
        return [], []
    best = min(first.values())
    ranked = sorted(first, key=lambda k: (first[k], k))
    near = [k for k in ranked
            if first[k] <= (rule.reach_disturbed if k in disturbed else rule.reach) * best][: rule.most]
    if baseline is not None and baseline in first and baseline not in near:
        near.append(baseline)  # every win is confirmed against the baseline, in the same rounds
    return near, [k for k in ranked if k not in near]


@dataclass
class Rounds:
    """Raw interleaved times: one list per candidate, ``None`` for a round it sat out."""

    times_ms: dict[str, list[float | None]]
    seconds: float = 0.0
    #: the load average (1 min) before the rounds and after each batch of them
    load: list[float] = field(default_factory=list)
    timer: str = "perf_counter_ns"
    threads: int = 1
    batch_size: int = 1
    warmup: dict[str, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return max((len(t) for t in self.times_ms.values()), default=0)

    def to_dict(self) -> dict[str, Any]:
        return {"times_ms": {k: list(v) for k, v in self.times_ms.items()}, "seconds": self.seconds,
                "load": list(self.load), "timer": self.timer, "threads": self.threads,
                "batch_size": self.batch_size, "warmup": dict(self.warmup)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Rounds":
        """Read back with checks: an answer that is not rounds raises ValueError naming what is wrong."""
        if not isinstance(data, Mapping) or not isinstance(data.get("times_ms"), Mapping):
            raise ValueError("rounds: no times_ms mapping")
        times: dict[str, list[float | None]] = {}
        lengths = set()
        for name, values in data["times_ms"].items():
            if not isinstance(values, list):
                raise ValueError(f"rounds: times of {name!r} are not a list")
            row = []
            for v in values:
                if v is None:
                    row.append(None)
                elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
                    row.append(float(v))
                else:
                    raise ValueError(f"rounds: {name!r} has a time that is not a finite number >= 0: {v!r}")
            times[str(name)] = row
            lengths.add(len(row))
        if len(lengths) > 1:
            raise ValueError(f"rounds: candidates have different round counts {sorted(lengths)}")
        load = [float(x) for x in data.get("load", []) if isinstance(x, (int, float)) and not isinstance(x, bool)]
        warmup = {str(k): int(v) for k, v in dict(data.get("warmup") or {}).items() if isinstance(v, int)}
        return cls(times, float(data.get("seconds", 0.0) or 0.0), load, str(data.get("timer", "perf_counter_ns")),
                   int(data.get("threads", 1) or 1), int(data.get("batch_size", 1) or 1), warmup)

    def measurement(self, name: str) -> Measurement | None:
        times = [t for t in self.times_ms.get(name, []) if t is not None]
        if not times:
            return None
        return Measurement.from_times(times, self.warmup.get(name, 0), self.timer, self.threads,
                                      "max_iters", self.batch_size)


@dataclass
class Pair:
    """One candidate against the winner: the median of its paired ratios (its time over the
    winner's, so above 1 means the winner is faster) with the confidence interval."""

    other: str
    ratio: float
    low: float
    high: float
    rounds: int
    verdict: str  # beaten | tie | open, of the winner against ``other``

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Verdict:
    winner: str | None
    #: None while the comparison must go on (not final and not resolved)
    stop: str | None
    leader: str | None = None
    ties: list[str] = field(default_factory=list)
    #: the candidates some other one beat beyond noise (they sit out later rounds, and can't win)
    beaten: list[str] = field(default_factory=list)
    pairs: dict[str, Pair] = field(default_factory=dict)
    medians: dict[str, float] = field(default_factory=dict)
    rounds: int = 0
    #: probability (bootstrap over rounds) that the winner is the fastest, and that it is within
    #: ``tie`` of the fastest
    p_best: float | None = None
    p_near: float | None = None


def _paired(a: Sequence[float | None], b: Sequence[float | None]) -> np.ndarray:
    """b's time over a's, in the rounds both ran."""
    out = [y / x for x, y in zip(a, b) if x is not None and y is not None and x > 0]
    return np.asarray(out, dtype=np.float64)


def paired_ratio(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """The median of b's time over a's in the rounds both ran (how many times faster a is); None
    where they shared no round."""
    ratios = _paired(a, b)
    return float(np.median(ratios)) if ratios.size else None


def pair(times: Mapping[str, Sequence[float | None]], winner: str, other: str, confidence: float,
         rule: DecisionRule) -> Pair:
    ratios = _paired(times[winner], times[other])
    if ratios.size == 0:
        return Pair(other, math.nan, math.nan, math.nan, 0, OPEN)
    median = float(np.median(ratios))
    low, high = median_ci(ratios.tolist(), confidence)
    if low > 1 and median >= 1 / (1 - rule.min_gain):
        verdict = BEATEN
    elif low >= 1 / (1 + rule.tie) and high <= 1 + rule.tie:
        verdict = TIE
    else:
        verdict = OPEN
    return Pair(other, median, low, high, int(ratios.size), verdict)


def _median(values: Sequence[float | None]) -> float:
    xs = [v for v in values if v is not None]
    return float(np.median(xs)) if xs else math.inf


def assess(times: Mapping[str, Sequence[float | None]], order: Sequence[str], rule: DecisionRule,
           final: bool = False, bootstrap: bool = False, baseline: str | None = None) -> Verdict:
    """The decision the rounds so far support.

    ``order`` ranks the candidates for the fixed tie rule (the baseline first); every name in
    ``times`` must be in it. Not ``final``: ``stop`` is None while something is open. ``final``:
    what is open is reported as not separated (``cap``); then the ``baseline``, if it is among
    them, is kept (nothing beat it beyond noise), else the leader wins: the best estimate there
    is, not the fixed rule, which is for declared ties, where any choice is within ``tie``.
    """
    names = [n for n in order if n in times]
    missing = set(times) - set(names)
    if missing:
        raise ValueError(f"assess: candidates without a place in the order: {sorted(missing)}")
    medians = {n: _median(times[n]) for n in names}
    measured = [n for n in names if math.isfinite(medians[n])]
    if not measured:
        return Verdict(None, "screening" if final else None, medians=medians)
    rounds = max(len(times[n]) for n in names)
    if len(measured) == 1:
        return Verdict(measured[0], "alone", measured[0], medians=medians, rounds=rounds, p_best=1.0, p_near=1.0)
    confidence = 1 - (1 - rule.confidence) / max(1, len(measured) - 1)
    pairs_seen: dict[tuple[str, str], Pair] = {}

    def of(a: str, b: str) -> Pair:  # each ordered pair once, however many questions ask for it
        if (a, b) not in pairs_seen:
            pairs_seen[(a, b)] = pair(times, a, b, confidence, rule)
        return pairs_seen[(a, b)]

    # Beaten by anyone, in the rounds both ran, stays beaten: a candidate that sat out the later
    # rounds after an early leader beat it is not brought back by a later leader it shared only a
    # few rounds with (their pair's interval is wide; it was beaten all the same).
    beaten = [n for n in measured if any(of(m, n).verdict == BEATEN for m in measured if m != n)]
    alive = [n for n in measured if n not in beaten] or measured
    leader = min(alive, key=lambda n: (medians[n], names.index(n)))
    against_leader = {n: of(leader, n) for n in measured if n != leader}
    open_ = [n for n in alive if n != leader and against_leader[n].verdict == OPEN]
    if open_ and not final:
        return Verdict(None, None, leader, beaten=beaten, pairs=against_leader, medians=medians, rounds=rounds)
    pool = [n for n in alive if n == leader or against_leader[n].verdict != BEATEN]
    if open_:
        winner = baseline if baseline in pool else leader
    else:
        winner = pool[0]  # measured keeps the order: the fixed tie rule
    stop = "cap" if open_ else ("tie" if len(pool) > 1 else "resolved")
    pairs = {n: of(winner, n) for n in measured if n != winner}
    verdict = Verdict(winner, stop, leader, [n for n in pool if n != winner], beaten, pairs, medians, rounds)
    if bootstrap:
        verdict.p_best, verdict.p_near = _bootstrap(times, measured, winner, rule.tie)
    return verdict


def explain(verdict: Verdict, names: Mapping[str, str], baseline: str | None, rule: DecisionRule, seconds: float) -> str:
    """Why ``verdict``'s winner won, in one sentence: the same words for a sweep and ``aitune.tune``.
    ``names``: each candidate's display name; ``baseline``: eager fp32's, if it was in the rounds."""
    base = names[baseline] if baseline is not None else "eager fp32"
    ties, n = ", ".join(names[k] for k in verdict.ties), verdict.rounds
    if verdict.stop == "resolved":
        said = (f"{base} is fastest beyond noise" if verdict.winner == baseline else
                f"beats {base} and every other contender beyond noise" if baseline is not None else
                "beats every other contender beyond noise (eager fp32 was not among them)")
        return f"{said} in {n} interleaved rounds"
    if verdict.stop == "tie":
        return (f"within +-{rule.tie:.0%} of {ties} in {n} interleaved rounds (a declared tie): "
                "the fixed rule takes eager fp32 first, then the spec's candidate order")
    return (f"not separated from {ties} at the cap ({n} rounds, {seconds:.1f} s): "
            + (f"{base} is kept, nothing beat it beyond noise" if verdict.winner == baseline
               else "the fastest by the rounds' medians wins"))


def _bootstrap(times: Mapping[str, Sequence[float | None]], names: list[str], winner: str,
               tie: float) -> tuple[float, float]:
    """How often the winner is the fastest, and within ``tie`` of the fastest, when each pair's
    rounds are resampled with replacement: paired like every other figure here (each other
    candidate's time over the winner's, in the rounds both ran), all pairs drawn together."""
    rng = np.random.default_rng(0)
    best = np.ones(BOOTSTRAP, dtype=bool)
    near = np.ones(BOOTSTRAP, dtype=bool)
    for other in names:
        if other == winner:
            continue
        ratios = _paired(times[winner], times[other])
        if ratios.size == 0:
            continue
        medians = np.median(ratios[rng.integers(0, ratios.size, (BOOTSTRAP, ratios.size))], axis=1)
        best &= medians > 1
        near &= medians * (1 + tie) >= 1
    return float(best.mean()), float(near.mean())


def load_average() -> float:
    """The 1-minute load average (-1 where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not on this platform
        return -1.0


def run_rounds(
    fns: Mapping[str, Callable[..., Any]],
    sample,
    device,
    rule: DecisionRule,
    order: Sequence[str],
    threads: int | None = None,
    warmup: MeasureConfig | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Rounds:
    """Measure ``fns`` on ``sample`` in interleaved rounds until :func:`assess` resolves them or
    the cap is reached; beaten candidates sit later rounds out. Returns the raw rounds."""
    names = [n for n in order if n in fns]
    if len(names) != len(fns):
        raise ValueError("run_rounds: every candidate needs a place in the order")
    config = warmup or MeasureConfig(threads=threads)
    if threads is not None and config.threads is None:
        config = MeasureConfig(**{**asdict(config), "threads": threads})
    calls = {n: (lambda fn=fns[n]: sample(fn)) for n in names}
    times: dict[str, list[float | None]] = {n: [] for n in names}
    load = [load_average()]
    with _measuring(config, device) as (used_threads, cuda):
        warmed = {n: _warm_up(calls[n], config, cuda) for n in names}
        active = list(names)
        done, start = 0, clock()
        per_round = sum(w[1] or 0.0 for w in warmed.values()) or None
        while True:
            elapsed = clock() - start
            if done < rule.min_rounds:
                size = rule.min_rounds - done
            else:
                size = max(1, min(max(_CHUNK, done // 5), rule.max_rounds - done))
                if per_round:
                    size = max(1, min(size, math.ceil(max(rule.cap_s - elapsed, 0.0) / per_round)))
            order_now: list[str] = []
            for r in range(done, done + size):
                shift = r % len(active)
                order_now.extend(active[shift:] + active[:shift])
            stamp = {n: [None] * size for n in names}
            slots = {n: 0 for n in names}
            for n, t in zip(order_now, _time_calls([calls[n] for n in order_now], cuda)):
                stamp[n][slots[n]] = t
                slots[n] += 1
            for n in names:
                times[n].extend(stamp[n])
            done += size
            elapsed = clock() - start
            per_round = elapsed / done
            load.append(load_average())
            verdict = assess(times, names, rule)
            if verdict.stop is not None or done >= rule.max_rounds or elapsed >= rule.cap_s:
                break
            # a candidate some other one beat beyond noise sits the next rounds out
            active = [n for n in active if n not in verdict.beaten] or active
    return Rounds(times, clock() - start, load, "cuda_event" if cuda else "perf_counter_ns", used_threads,
                  getattr(sample, "batch_size", 1), {n: w[0] for n, w in warmed.items()})
