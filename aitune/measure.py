"""Timing one callable on one sample, and deciding whether one candidate beats another beyond noise.

Every timed iteration is kept. Timings have a long right tail (GC pauses, other processes, clock
changes), so decisions rest on the median and its distribution-free confidence interval rather
than on the mean, and the raw times let a report redo the statistics later.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from statistics import NormalDist
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils import benchmark

from aitune.specs import Sample
from aitune.torch.cuda_graphs import without_output_clones

TIMERS = ("cuda_event", "perf_counter_ns")
STOP_REASONS = ("converged", "budget", "max_iters")

# Warm-up only has to get past lazy initialisation, autotuning and cold caches; a model that is
# not steady after this is not helped by warming it longer, and the time is better spent timing.
WARMUP_MAX_ITERS = 50
WARMUP_MAX_S = 1.0
#: the timed iterations a measurement takes at most, unless its config says otherwise
MAX_ITERS = 10_000

_CHUNK = 10
# Up to here the binomial sums are cheap and exact; beyond, the normal approximation is within a
# rank of them.
_EXACT_CI_MAX_N = 100


@dataclass
class MeasureConfig:
    """How long to warm up and when to stop timing.

    Warm-up runs until both ``warmup_iters`` and ``warmup_s`` are reached, but never beyond
    ``WARMUP_MAX_ITERS`` iterations or ``WARMUP_MAX_S`` seconds, whichever comes first.
    ``threads`` pins ``torch.set_num_threads`` for the measurement (restored afterwards).
    """

    warmup_iters: int = 5
    warmup_s: float = 0.1
    min_iters: int = 10
    max_iters: int = MAX_ITERS
    target_rel_ci: float = 0.02
    budget_s: float = 1.0
    threads: int | None = None

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"MeasureConfig.{name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        require(is_int(self.warmup_iters) and self.warmup_iters >= 0, "warmup_iters", "an int >= 0")
        require(is_number(self.warmup_s) and self.warmup_s >= 0, "warmup_s", "a number >= 0")
        require(is_int(self.min_iters) and self.min_iters >= 1, "min_iters", "an int >= 1")
        require(
            is_int(self.max_iters) and min_iters_problem(self.min_iters, self.max_iters) is None,
            "max_iters",
            f"an int >= min_iters ({self.min_iters})",
        )
        require(is_number(self.target_rel_ci) and self.target_rel_ci >= 0, "target_rel_ci", "a number >= 0")
        require(is_number(self.budget_s) and self.budget_s > 0, "budget_s", "a number > 0")
        require(self.threads is None or (is_int(self.threads) and self.threads >= 1), "threads", "None or an int >= 1")


def warmup_iters_problem(warmup_iters: int) -> str | None:
    """Why ``warmup_iters`` asks for what no measurement does (warm-up stops at WARMUP_MAX_ITERS
    whatever is asked), for a caller that refuses it rather than have it cut short; None: it is fine."""
    if warmup_iters > WARMUP_MAX_ITERS:
        return f"warm-up stops at {WARMUP_MAX_ITERS} iterations whatever is asked; give 0 to {WARMUP_MAX_ITERS}"
    return None


def min_iters_problem(min_iters: int, max_iters: int = MAX_ITERS) -> str | None:
    """Why ``min_iters`` can't be met by a measurement of at most ``max_iters``; None: it can."""
    if min_iters > max_iters:
        return (f"min_iters {min_iters} is above the {max_iters} iterations a measurement may take; "
                f"give 1 to {max_iters}")
    return None


def _median_ci_sorted(xs: Sequence[float], confidence: float) -> tuple[float, float]:
    n = len(xs)
    half = (1 - confidence) / 2
    # The median lies below the (k+1)-th smallest time unless at most k times fall below it, which
    # happens with probability P(B <= k), B ~ Binomial(n, 1/2); cut k times off each side while
    # that stays within the allowed miss on each side.
    if n <= _EXACT_CI_MAX_N:
        k, cdf = -1, 0.0
        while k + 1 < n:
            cdf_next = cdf + math.comb(n, k + 1) / 2**n
            if cdf_next > half:
                break
            k, cdf = k + 1, cdf_next
    else:
        z = NormalDist().inv_cdf(1 - half)
        k = math.floor(n / 2 - z * math.sqrt(n) / 2 - 0.5)  # 0.5: continuity correction
    # k == -1: too few times for the asked confidence (n < 6 at 95%); (min, max) is the best there is.
    k = min(max(k, 0), (n - 1) // 2)
    return float(xs[k]), float(xs[n - 1 - k])


def median_ci(times: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median, from binomial order statistics.

    Exact for up to 100 times, normal approximation beyond; ``(min, max)`` when there are too few
    times to reach ``confidence`` at all (fewer than 6 at 95%).
    """
    if len(times) == 0:
        raise ValueError("median_ci needs at least one time")
    if not 0 < confidence < 1:
        raise ValueError(f"median_ci: confidence must be in (0, 1), got {confidence!r}")
    return _median_ci_sorted(sorted(times), confidence)


def _rel_ci(times: Sequence[float]) -> float:
    xs = sorted(times)
    median = float(np.median(xs))
    lo, hi = _median_ci_sorted(xs, 0.95)
    return (hi - lo) / 2 / median if median > 0 else math.inf


def _torch_summary(times_ms: Sequence[float], threads: int) -> benchmark.Measurement:
    # number_per_run=1: each raw time is one call, so torch's statistics apply to them unchanged.
    spec = benchmark.TaskSpec(stmt="sample(fn)", setup="", num_threads=threads)
    return benchmark.Measurement(number_per_run=1, raw_times=list(times_ms), task_spec=spec)


@dataclass
class Measurement:
    """Every timed iteration of one callable on one sample, in milliseconds, and their statistics."""

    times_ms: list[float]
    median_ms: float
    mean_ms: float
    p90_ms: float
    p99_ms: float
    std_ms: float
    count: int
    warmup_count: int
    timer: str
    threads: int
    ci_low_ms: float
    ci_high_ms: float
    stop_reason: str
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.timer not in TIMERS:
            raise ValueError(f"Measurement.timer must be one of {TIMERS}, got {self.timer!r}")
        if self.stop_reason not in STOP_REASONS:
            raise ValueError(f"Measurement.stop_reason must be one of {STOP_REASONS}, got {self.stop_reason!r}")
        if self.count != len(self.times_ms):
            raise ValueError(f"Measurement.count is {self.count} but there are {len(self.times_ms)} times")

    @classmethod
    def from_times(
        cls,
        times_ms: Sequence[float],
        warmup_count: int = 0,
        timer: str = "perf_counter_ns",
        threads: int | None = None,
        stop_reason: str = "max_iters",
        batch_size: int = 1,
    ) -> "Measurement":
        """Statistics of raw times; ``threads`` defaults to the current ``torch.get_num_threads()``."""
        times = [float(t) for t in times_ms]
        if not times:
            raise ValueError("Measurement needs at least one timed iteration")
        threads = torch.get_num_threads() if threads is None else int(threads)
        summary = _torch_summary(times, threads)
        arr = np.asarray(times, dtype=np.float64)
        p90, p99 = np.percentile(arr, [90, 99])
        lo, hi = median_ci(times)
        return cls(
            times_ms=times,
            median_ms=float(summary.median),
            mean_ms=float(summary.mean),
            p90_ms=float(p90),
            p99_ms=float(p99),
            std_ms=float(arr.std(ddof=1)) if len(times) > 1 else 0.0,
            count=len(times),
            warmup_count=int(warmup_count),
            timer=timer,
            threads=threads,
            ci_low_ms=lo,
            ci_high_ms=hi,
            stop_reason=stop_reason,
            batch_size=int(batch_size),
        )

    @property
    def rel_ci(self) -> float:
        """Half-width of the median's 95% confidence interval relative to the median."""
        half = (self.ci_high_ms - self.ci_low_ms) / 2
        return half / self.median_ms if self.median_ms > 0 else math.inf

    @property
    def iqr_ms(self) -> float:
        return float(_torch_summary(self.times_ms, self.threads).iqr)

    @property
    def throughput(self) -> float:
        """Samples (batch elements) per second at the median latency."""
        return self.batch_size * 1000.0 / self.median_ms if self.median_ms > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        # Flat fields: a plain copy is enough, and far cheaper than asdict's deep copy of every time.
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["times_ms"] = list(self.times_ms)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Measurement":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["times_ms"] = [float(t) for t in values["times_ms"]]
        return cls(**values)


def significantly_faster(a: Measurement, b: Measurement, min_rel_gain: float = 0.02) -> bool:
    """Whether ``a`` beats ``b`` beyond noise: this is how "beats eager beyond noise" is decided.

    Both must hold: the confidence intervals of the medians do not overlap (a's upper bound is
    below b's lower bound), and a's median is at least ``min_rel_gain`` below b's, so that a
    real but negligible gain does not count as a win.
    """
    return a.ci_high_ms < b.ci_low_ms and a.median_ms <= b.median_ms * (1 - min_rel_gain)


@contextmanager
def _measuring(config: MeasureConfig, device: torch.device | str) -> Iterator[tuple[int, bool]]:
    """Threads pinned, inference mode on, the CUDA device current, outputs not cloned (nothing
    keeps them past the next call: see ``clone_outputs``); yields (threads, is_cuda)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    previous = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        # Events record on the current device's stream, so it must be the measured device.
        with torch.inference_mode(), without_output_clones(), (torch.cuda.device(device) if cuda else nullcontext()):
            yield torch.get_num_threads(), cuda
    finally:
        if config.threads is not None:
            torch.set_num_threads(previous)


def _warm_up(call: Callable[[], Any], config: MeasureConfig, cuda: bool) -> tuple[int, float | None]:
    """Returns the warm-up count and the seconds per call it saw (None when it ran none)."""
    count, start = 0, time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if count >= WARMUP_MAX_ITERS or elapsed >= WARMUP_MAX_S:
            break
        if count >= config.warmup_iters and elapsed >= config.warmup_s:
            break
        call()
        if cuda:
            torch.cuda.synchronize()  # the time limits above are meant for the device's work too
        count += 1
    return count, (elapsed / count if count else None)


def _time_calls(calls: Sequence[Callable[[], Any]], cuda: bool) -> list[float]:
    """Times each call once, in order, in milliseconds."""
    if cuda:
        events = []
        for call in calls:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            events.append((start, end))
        # One synchronisation per chunk: per call it would add host latency to the device's idle time.
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for call in calls:
        t0 = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return times


def _chunk_size(done: int, limit: int, budget_left_s: float, per_step_s: float | None) -> int:
    """How many steps (calls, or rounds of calls) to run before checking whether to stop."""
    # Checking sorts every time so far; growing the chunk with the count keeps that a small share
    # of a fast callable's loop.
    size = min(max(_CHUNK, done // 10), limit - done)
    if per_step_s is None:
        return min(size, 1)  # nothing known yet: one step tells how long steps take
    # A slow callable would otherwise run a whole chunk past the budget.
    return max(1, min(size, math.ceil(max(budget_left_s, 0.0) / per_step_s)))


def _stop_reason(series: Sequence[Sequence[float]], config: MeasureConfig, elapsed_s: float, budget_s: float) -> str | None:
    count = min(len(times) for times in series)
    if count >= config.min_iters and all(_rel_ci(times) <= config.target_rel_ci for times in series):
        return "converged"
    if count >= config.max_iters:
        return "max_iters"
    # A few times are needed for any median at all, even when one call eats the whole budget.
    if elapsed_s >= budget_s and count >= min(config.min_iters, 3):
        return "budget"
    return None


def measure(
    fn: Callable[..., Any],
    sample: Sample,
    device: torch.device | str,
    config: MeasureConfig | None = None,
) -> Measurement:
    """Warm ``fn`` up on ``sample``, then time it until the median converges, the budget runs out
    or ``max_iters`` is reached. CUDA devices are timed with events, the CPU with ``perf_counter_ns``."""
    config = config or MeasureConfig()

    def call() -> Any:
        return sample(fn)

    with _measuring(config, device) as (threads, cuda):
        warmup_count, per_call_s = _warm_up(call, config, cuda)
        times: list[float] = []
        start = time.perf_counter()
        while True:
            elapsed = time.perf_counter() - start
            size = _chunk_size(len(times), config.max_iters, config.budget_s - elapsed, per_call_s)
            times.extend(_time_calls([call] * size, cuda))
            elapsed = time.perf_counter() - start
            per_call_s = elapsed / len(times)
            reason = _stop_reason([times], config, elapsed, config.budget_s)
            if reason is not None:
                break
    timer = "cuda_event" if cuda else "perf_counter_ns"
    return Measurement.from_times(times, warmup_count, timer, threads, reason, sample.batch_size)


def interleaved(
    fns: Mapping[str, Callable[..., Any]],
    sample: Sample,
    device: torch.device | str,
    config: MeasureConfig | None = None,
    rounds: int | None = None,
) -> dict[str, Measurement]:
    """Time several candidates round-robin, to separate near-ties on a noisy machine.

    Each round times one call of every candidate, starting one candidate later than the round
    before, so that drift (thermal, other processes) and the position in the round hit all alike.
    Without ``rounds`` it stops when every candidate converged, after ``budget_s`` per candidate,
    or after ``max_iters`` rounds; with ``rounds`` it runs exactly that many (stop reason
    ``"max_iters"``).
    """
    if not fns:
        raise ValueError("interleaved needs at least one candidate")
    if rounds is not None and (not isinstance(rounds, int) or rounds < 1):
        raise ValueError(f"interleaved: rounds must be None or an int >= 1, got {rounds!r}")
    config = config or MeasureConfig()
    names = list(fns)
    calls = {name: (lambda fn=fn: sample(fn)) for name, fn in fns.items()}
    budget_s = config.budget_s * len(names)
    limit = rounds if rounds is not None else config.max_iters

    with _measuring(config, device) as (threads, cuda):
        warmed = {name: _warm_up(calls[name], config, cuda) for name in names}
        estimates = [per_call for _, per_call in warmed.values()]
        per_round_s = None if None in estimates else sum(estimates)
        times: dict[str, list[float]] = {name: [] for name in names}
        done, start = 0, time.perf_counter()
        while True:
            elapsed = time.perf_counter() - start
            if rounds is not None:
                size = min(_CHUNK, rounds - done)
            else:
                size = _chunk_size(done, limit, budget_s - elapsed, per_round_s)
            order: list[str] = []
            for r in range(done, done + size):
                shift = r % len(names)
                order.extend(names[shift:] + names[:shift])
            for name, t in zip(order, _time_calls([calls[name] for name in order], cuda)):
                times[name].append(t)
            done += size
            elapsed = time.perf_counter() - start
            per_round_s = elapsed / done
            if rounds is not None:
                reason = "max_iters" if done >= rounds else None
            else:
                reason = _stop_reason(list(times.values()), config, elapsed, budget_s)
            if reason is not None:
                break

    timer = "cuda_event" if cuda else "perf_counter_ns"
    return {
        name: Measurement.from_times(times[name], warmed[name][0], timer, threads, reason, sample.batch_size)
        for name in names
    }
