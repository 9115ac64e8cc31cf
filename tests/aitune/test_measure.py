"""Measurement statistics and stopping rules, on callables whose timing is known from below.

No test asserts a real speed: sleeps give lower bounds, and upper bounds are kept generous.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from aitune.measure import (
    MeasureConfig,
    Measurement,
    interleaved,
    measure,
    median_ci,
    significantly_faster,
)
from aitune.specs import Sample

SAMPLE = Sample.of(torch.zeros(4, 3))


def sleeper(seconds: float):
    def fn(x: torch.Tensor) -> torch.Tensor:
        time.sleep(seconds)
        return x

    return fn


def noop(x: torch.Tensor) -> torch.Tensor:
    return x


def test_sleep_statistics_are_consistent():
    config = MeasureConfig(warmup_iters=3, warmup_s=0.0, max_iters=30, target_rel_ci=0.0, budget_s=5.0)
    m = measure(sleeper(0.002), SAMPLE, "cpu", config)

    assert m.median_ms >= 2.0
    assert m.median_ms < 2.0 * 5
    assert min(m.times_ms) >= 2.0
    assert m.count == len(m.times_ms) == 30
    assert m.stop_reason == "max_iters"
    assert m.warmup_count >= config.warmup_iters
    assert m.timer == "perf_counter_ns"
    assert m.threads == torch.get_num_threads()
    assert m.median_ms <= m.p90_ms <= m.p99_ms <= max(m.times_ms)
    assert min(m.times_ms) <= m.ci_low_ms <= m.median_ms <= m.ci_high_ms <= max(m.times_ms)
    assert m.mean_ms == pytest.approx(np.mean(m.times_ms))
    assert m.batch_size == 4
    assert m.throughput == pytest.approx(4 * 1000 / m.median_ms)
    assert m.rel_ci == pytest.approx((m.ci_high_ms - m.ci_low_ms) / 2 / m.median_ms)


def test_warmup_reaches_both_iterations_and_seconds():
    config = MeasureConfig(warmup_iters=2, warmup_s=0.03, max_iters=10, budget_s=5.0)
    m = measure(sleeper(0.002), SAMPLE, "cpu", config)
    # 30 ms of 2 ms calls takes more than the 2 iterations asked for, and stays under the cap of 50.
    assert 2 < m.warmup_count <= 16


def test_warmup_is_capped_at_50_iterations():
    config = MeasureConfig(warmup_iters=500, warmup_s=0.0, max_iters=10)
    assert measure(noop, SAMPLE, "cpu", config).warmup_count == 50


def test_stops_on_budget():
    config = MeasureConfig(warmup_iters=1, warmup_s=0.0, target_rel_ci=1e-12, budget_s=0.05)
    m = measure(sleeper(0.001), SAMPLE, "cpu", config)
    assert m.stop_reason == "budget"
    assert 3 <= m.count < config.max_iters
    # It may overrun the budget by one chunk only; one second is far beyond that for 1 ms calls.
    assert sum(m.times_ms) / 1000 < config.budget_s + 1.0


def test_budget_still_gets_a_few_times_of_a_slow_callable():
    config = MeasureConfig(warmup_iters=0, warmup_s=0.0, target_rel_ci=0.0, budget_s=0.001)
    m = measure(sleeper(0.005), SAMPLE, "cpu", config)
    assert m.stop_reason == "budget"
    assert m.count == 3  # min(min_iters, 3), one call per chunk once the budget is spent


def test_stops_when_converged():
    # A 1 ms sleep never varies by a factor of ten, so the first check after min_iters converges.
    config = MeasureConfig(warmup_iters=1, warmup_s=0.0, target_rel_ci=10.0, budget_s=10.0)
    m = measure(sleeper(0.001), SAMPLE, "cpu", config)
    assert m.stop_reason == "converged"
    assert m.count == config.min_iters
    assert m.rel_ci <= 10.0


def test_stops_at_max_iters():
    config = MeasureConfig(warmup_iters=1, warmup_s=0.0, max_iters=15, target_rel_ci=0.0, budget_s=10.0)
    m = measure(noop, SAMPLE, "cpu", config)
    assert m.stop_reason == "max_iters"
    assert m.count == 15


def test_calls_run_under_inference_mode_with_the_sample():
    seen = []

    def fn(x, *, scale):
        seen.append((torch.is_inference_mode_enabled(), x.shape, scale))
        return x * scale

    measure(fn, Sample.of(torch.ones(2, 5), scale=3), "cpu", MeasureConfig(warmup_iters=1, warmup_s=0.0, max_iters=10))
    assert seen and all(s == (True, torch.Size([2, 5]), 3) for s in seen)


def test_threads_are_set_and_restored():
    before = torch.get_num_threads()
    want = 2 if before == 1 else 1
    seen = []

    def fn(x):
        seen.append(torch.get_num_threads())
        return x

    m = measure(fn, SAMPLE, "cpu", MeasureConfig(warmup_iters=1, warmup_s=0.0, max_iters=10, threads=want))
    assert set(seen) == {want}
    assert m.threads == want
    assert torch.get_num_threads() == before

    def boom(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure(boom, SAMPLE, "cpu", MeasureConfig(threads=want))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"warmup_iters": -1}, "warmup_iters"),
        ({"warmup_s": -0.1}, "warmup_s"),
        ({"min_iters": 0}, "min_iters"),
        ({"min_iters": 10, "max_iters": 5}, "max_iters"),
        ({"target_rel_ci": -0.01}, "target_rel_ci"),
        ({"budget_s": 0}, "budget_s"),
        ({"threads": 0}, "threads"),
        ({"max_iters": 10.5}, "max_iters"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"MeasureConfig\.{field}"):
        MeasureConfig(**kwargs)


def test_from_times_computes_exact_statistics():
    times = [float(t) for t in range(1, 11)]
    m = Measurement.from_times(times, warmup_count=4, threads=3, stop_reason="converged", batch_size=8)
    assert m.median_ms == 5.5
    assert m.mean_ms == 5.5
    assert m.p90_ms == pytest.approx(9.1)
    assert m.p99_ms == pytest.approx(9.91)
    assert m.std_ms == pytest.approx(np.std(times, ddof=1))
    assert (m.ci_low_ms, m.ci_high_ms) == (2.0, 9.0)  # exact binomial order statistics for n = 10
    assert m.iqr_ms == pytest.approx(7.75 - 3.25)
    assert (m.count, m.warmup_count, m.threads, m.stop_reason) == (10, 4, 3, "converged")
    assert m.throughput == pytest.approx(8 * 1000 / 5.5)

    with pytest.raises(ValueError):
        Measurement.from_times([])
    with pytest.raises(ValueError, match="stop_reason"):
        Measurement.from_times([1.0], stop_reason="bored")


def test_measurement_round_trips_through_json():
    m = Measurement.from_times([1.0, 2.0, 4.0, 3.0], warmup_count=2, threads=1, batch_size=2)
    again = Measurement.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m
    assert again.times_ms == [1.0, 2.0, 4.0, 3.0]


def _coverage(n: int, k: int) -> float:
    """Probability that [x_(k), x_(n-1-k)] (0-indexed) holds the true median."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n


@pytest.mark.parametrize("n", [6, 7, 10, 25, 60, 100, 101, 500, 2000])
def test_median_ci_has_the_asked_coverage_and_no_more(n):
    lo, hi = median_ci(list(range(n))[::-1])  # unsorted on purpose
    k = int(lo)
    assert hi == n - 1 - k
    slack = 0.0 if n <= 100 else 0.005  # the normal approximation may be a hair off
    assert _coverage(n, k) >= 0.95 - slack
    if n <= 100:
        assert _coverage(n, k + 1) < 0.95  # exact: the narrowest interval that covers


def test_median_ci_of_few_times_is_the_range():
    assert median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)
    assert median_ci([7.0]) == (7.0, 7.0)
    with pytest.raises(ValueError):
        median_ci([])


def test_significantly_faster():
    fast = Measurement.from_times([1.0 + 0.01 * i for i in range(20)])
    slow = Measurement.from_times([2.0 + 0.01 * i for i in range(20)])
    assert significantly_faster(fast, slow)
    assert not significantly_faster(slow, fast)

    overlapping = Measurement.from_times([1.05 + 0.01 * i for i in range(20)])
    assert not significantly_faster(fast, overlapping)

    # Separated intervals but a 1% gain: real, yet below the minimum gain asked.
    tight_fast = Measurement.from_times([1.0] * 20)
    tight_slow = Measurement.from_times([1.01] * 20)
    assert not significantly_faster(tight_fast, tight_slow)
    assert significantly_faster(tight_fast, tight_slow, min_rel_gain=0.0)


def test_interleaved_rotates_the_order_each_round():
    log = []

    def make(name):
        def fn(x):
            log.append(name)
            return x

        return fn

    config = MeasureConfig(warmup_iters=2, warmup_s=0.0)
    result = interleaved({"a": make("a"), "b": make("b"), "c": make("c")}, SAMPLE, "cpu", config, rounds=4)

    assert set(result) == {"a", "b", "c"}
    assert log[:6] == ["a", "a", "b", "b", "c", "c"]  # each warmed up in turn
    assert log[6:] == list("abc" "bca" "cab" "abc")
    for name, m in result.items():
        assert m.count == 4
        assert m.warmup_count == 2
        assert m.stop_reason == "max_iters"
        assert m.batch_size == 4


def test_interleaved_stops_on_budget_or_convergence():
    config = MeasureConfig(warmup_iters=1, warmup_s=0.0, target_rel_ci=1e-12, budget_s=0.02)
    result = interleaved({"slow": sleeper(0.002), "fast": noop}, SAMPLE, "cpu", config)
    assert result["slow"].stop_reason == result["fast"].stop_reason == "budget"
    assert result["slow"].count == result["fast"].count >= 3
    assert result["slow"].median_ms >= 2.0

    config = MeasureConfig(warmup_iters=1, warmup_s=0.0, target_rel_ci=10.0, budget_s=10.0)
    result = interleaved({"x": sleeper(0.001), "y": sleeper(0.001)}, SAMPLE, "cpu", config)
    assert {m.stop_reason for m in result.values()} == {"converged"}
    assert {m.count for m in result.values()} == {config.min_iters}

    with pytest.raises(ValueError):
        interleaved({}, SAMPLE, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_events_time_device_work():
    sample = Sample.of(torch.randn(256, 256, device="cuda"))
    config = MeasureConfig(warmup_iters=2, warmup_s=0.0, max_iters=20, budget_s=2.0)
    m = measure(lambda x: x @ x, sample, "cuda", config)
    assert m.timer == "cuda_event"
    assert m.count == len(m.times_ms) >= 3
    assert all(t > 0 for t in m.times_ms)
    both = interleaved({"a": lambda x: x @ x, "b": lambda x: x + 1}, sample, torch.device("cuda"), config, rounds=5)
    assert {m.timer for m in both.values()} == {"cuda_event"}
    assert {m.count for m in both.values()} == {5}
