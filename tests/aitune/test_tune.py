"""aitune.tune with eager candidates only, and winner selection on synthetic measurements."""

from __future__ import annotations

import math

import pytest
import torch

import aitune
from aitune.measure import MeasureConfig, Measurement
from aitune.specs import Sample
from aitune.strategy import Strategy, select
from aitune.torch.backend import BackendState, TorchEagerBackend, TorchEagerConfig
from aitune.tuning import CandidateResult, TuneResult
from aitune_helpers import (
    BuildFailsBackend,
    CountingModule,
    CudaOnlyBackend,
    DoubleWorkBackend,
    ScaledLinear,
    SleepyModule,
    WrongOutputBackend,
    tiny_mlp,
)

FAST = MeasureConfig(budget_s=0.2, min_iters=5, warmup_iters=2)
BASELINE = "TorchEagerBackend(defaults)"


def samples(n: int = 2, width: int = 16) -> list[Sample]:
    gen = torch.Generator().manual_seed(0)
    return [Sample.of(torch.randn(4, width, generator=gen)) for _ in range(n)]


def by_name(result: TuneResult) -> dict[str, CandidateResult]:
    return {r.name: r for r in result.results}


# -- tune ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One tune over every kind of outcome: ok, incorrect, build error, unsupported."""
    backends = [
        TorchEagerBackend(TorchEagerConfig(precision="bf16")),
        WrongOutputBackend(),
        BuildFailsBackend(),
        CudaOnlyBackend(),
    ]
    result = aitune.tune(tiny_mlp(), samples(), backends, "cpu", measure_config=FAST, cache_dir=tmp_path_factory.mktemp("tune"))
    return backends, result


def test_tune_returns_a_result_per_candidate_and_adds_the_baseline(mixed):
    backends, result = mixed
    assert [r.name for r in result.results] == [BASELINE] + [b.describe() for b in backends]
    assert result.baseline is result.results[0]
    assert result.baseline.status == "ok"
    assert result.baseline.speedup == pytest.approx(1.0)
    assert result.baseline.key == TorchEagerBackend().key()


def test_correct_candidate_is_checked_and_measured(mixed):
    _, result = mixed
    bf16 = by_name(result)["TorchEagerBackend(precision=bfloat16)"]
    assert bf16.status == "ok" and bf16.error is None
    assert bf16.check.ok
    assert bf16.check.tolerance == aitune.check.tolerance_for("bfloat16")
    m = bf16.measurement
    assert m.count >= FAST.min_iters and m.count == len(m.times_ms)
    assert m.warmup_count >= FAST.warmup_iters
    assert bf16.speedup is not None and bf16.speedup > 0
    assert bf16.config == TorchEagerConfig(precision="bf16").to_dict()


def test_wrong_output_is_incorrect_and_never_wins(mixed):
    _, result = mixed
    wrong = by_name(result)["WrongOutputBackend(defaults)"]
    assert wrong.status == "incorrect"
    assert not wrong.eligible
    assert not wrong.check.ok
    assert wrong.error == wrong.check.reason and wrong.error.startswith("sample[0].output")
    assert wrong.check.max_abs_err == pytest.approx(1.0, abs=1e-5)
    assert result.winner is not wrong
    assert "WrongOutputBackend(defaults)" not in result.ties


def test_failing_build_is_a_build_error_with_its_traceback(mixed):
    _, result = mixed
    failed = by_name(result)["BuildFailsBackend(defaults)"]
    assert failed.status == "build_error"
    assert failed.error.startswith("Traceback (most recent call last):")
    assert "in _build" in failed.error
    assert f"RuntimeError: {BuildFailsBackend.MESSAGE}" in failed.error
    assert failed.measurement is None and failed.check is None
    assert result.winner is not failed


def test_unsupported_device_is_recorded_as_unsupported(mixed):
    _, result = mixed
    unsupported = by_name(result)["CudaOnlyBackend(defaults)"]
    assert unsupported.status == "unsupported"
    assert "does not support device type 'cpu'" in unsupported.error
    assert unsupported.measurement is None


def test_winner_is_a_correct_measured_candidate(mixed):
    _, result = mixed
    assert result.winner is not None
    assert result.winner.status == "ok"
    assert result.winner.name in (BASELINE, "TorchEagerBackend(precision=bfloat16)")
    assert result.reason
    table = result.table()
    assert table.splitlines()[0].split()[:2] == ["candidate", "status"]
    assert "<- winner" in table and "build_error" in table and "incorrect" in table


def test_tune_deactivates_the_backends_unless_asked_to_keep_them(mixed):
    backends, result = mixed
    assert backends[0].state is BackendState.INACTIVE
    assert backends[2].state is BackendState.INIT  # its build failed
    assert all(r.backend is None for r in result.results)


def test_keep_backends_returns_active_backends():
    result = aitune.tune(tiny_mlp(), samples(1), [], "cpu", measure_config=FAST, keep_backends=True)
    assert len(result.results) == 1
    kept = result.results[0].backend
    assert kept is not None and kept.state is BackendState.ACTIVE
    x = samples(1)[0].args[0]
    with torch.inference_mode():
        torch.testing.assert_close(kept.infer(x), tiny_mlp()(x))


def test_baseline_given_explicitly_is_not_added_again():
    baseline = TorchEagerBackend()
    result = aitune.tune(tiny_mlp(), samples(1), [baseline], "cpu", measure_config=FAST)
    assert [r.name for r in result.results] == [BASELINE]
    assert result.winner is result.baseline


def test_eager_is_kept_when_no_candidate_beats_it():
    # The forward sleeps a fixed time and the candidate runs it twice: correct, never faster.
    # (Candidates of the very same speed are judged on synthetic times below: real back-to-back
    # measurements of equal work drift by a few percent on a shared machine.)
    slower = DoubleWorkBackend()
    result = aitune.tune(SleepyModule(), [Sample.of(torch.randn(2, 8))], [slower], "cpu", measure_config=FAST)
    assert [r.status for r in result.results] == ["ok", "ok"]
    assert result.winner is result.baseline
    assert "fastest beyond noise" in result.reason or result.decision["stop"] in ("tie", "cap")


def test_tune_calls_the_users_module_once_per_sample():
    module = CountingModule("tune-reference", features=16)
    aitune.tune(module, samples(3), [TorchEagerBackend(TorchEagerConfig(inference_mode=False))], "cpu", measure_config=FAST)
    assert module.py_calls == 3
    assert int(module.calls) == 3


def test_tune_accepts_samples_with_plain_keyword_arguments():
    x, bias = torch.randn(2, 8), torch.randn(2, 8)
    sample = Sample.of(x, bias=bias, scale=2.0)
    module = ScaledLinear()
    result = aitune.tune(module, [sample], [WrongOutputBackend()], "cpu", measure_config=FAST, keep_backends=True)
    assert [r.status for r in result.results] == ["ok", "incorrect"]
    with torch.inference_mode():
        expected = module(x, bias=bias, scale=2.0)
        torch.testing.assert_close(result.baseline.backend.infer(x, bias=bias, scale=2.0), expected)
    assert result.baseline.backend.graph_spec.kwarg_names == ("bias",)


def test_tune_parses_the_strategy_string():
    result = aitune.tune(tiny_mlp(), samples(1), [], "cpu", "latency_budget=1000", measure_config=FAST)
    assert result.strategy == Strategy("latency_budget", 1000.0)
    assert result.winner is result.baseline


def test_tune_refuses_no_samples_and_bad_strategies():
    with pytest.raises(ValueError, match="at least one sample"):
        aitune.tune(tiny_mlp(), [], [], "cpu", measure_config=FAST)
    with pytest.raises(ValueError, match="not one of"):
        aitune.tune(tiny_mlp(), samples(1), [], "cpu", "fastest", measure_config=FAST)


# -- strategy parsing ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("min_latency", Strategy("min_latency")),
        ("max_throughput", Strategy("max_throughput")),
        ("latency_budget=5", Strategy("latency_budget", 5.0)),
        ("latency_budget=0.25", Strategy("latency_budget", 0.25)),
    ],
)
def test_strategy_parse(text, expected):
    assert Strategy.parse(text) == expected


def test_strategy_parse_passes_a_strategy_through():
    s = Strategy("latency_budget", 3.0)
    assert Strategy.parse(s) is s
    assert s.describe() == "latency_budget=3.0ms"
    assert Strategy().describe() == "min_latency"


@pytest.mark.parametrize(
    "text",
    ["fastest", "", "latency_budget", "latency_budget=", "latency_budget=abc", "latency_budget=0",
     "latency_budget=-1", "latency_budget=nan", "min_latency=3", "latency_budgets=5", "max_throughput "],
)
def test_strategy_parse_refuses_bad_strings(text):
    with pytest.raises(ValueError):
        Strategy.parse(text)


def test_latency_budget_needs_a_budget():
    with pytest.raises(ValueError, match="needs a positive budget_ms"):
        Strategy("latency_budget")


# -- select on synthetic measurements ----------------------------------------------------------------
def timings(median: float, n: int = 60, spread: float = 0.01, batch: int = 1, tail: float | None = None) -> Measurement:
    """Times evenly spread around ``median`` (relative ``spread``); ``tail`` sets the slowest 5 %."""
    times = [median * (1 + spread * (2 * i / (n - 1) - 1)) for i in range(n)]
    if tail is not None:
        times[-max(1, n // 20):] = [tail] * max(1, n // 20)
    return Measurement.from_times(times, threads=1, batch_size=batch)


def result(name: str, m: Measurement | None, status: str = "ok") -> CandidateResult:
    return CandidateResult(name=name, backend_class="X", config={}, key=name, status=status, measurement=m)


def test_select_picks_a_clear_winner():
    base, fast, slow = result("eager", timings(10.0)), result("fast", timings(5.0)), result("slow", timings(12.0))
    choice = select([base, fast, slow], base, Strategy())
    assert choice.winner is fast
    assert choice.reason == "beats eager beyond noise by min_latency"
    assert choice.ties == ()


def test_select_reports_ties_with_the_winner():
    base = result("eager", timings(10.0))
    a, b = result("a", timings(5.0, spread=0.05)), result("b", timings(5.05, spread=0.05))
    choice = select([base, b, a], base, Strategy())
    assert choice.winner is a
    assert choice.ties == ("b",)


def test_select_keeps_the_baseline_when_not_beaten_beyond_noise():
    base = result("eager", timings(10.0, spread=0.05))
    close = result("close", timings(9.9, spread=0.05))
    choice = select([base, close], base, Strategy())
    assert choice.winner is base
    assert choice.reason == "close is not better than eager beyond noise: baseline kept"


def test_select_needs_more_than_the_minimum_gain():
    base = result("eager", timings(10.0, spread=0.001))
    tiny_gain = result("tiny", timings(9.9, spread=0.001))  # separate intervals but only 1 % faster
    assert select([base, tiny_gain], base, Strategy()).winner is base
    assert select([base, tiny_gain], base, Strategy(), min_rel_gain=0.005).winner is tiny_gain


def test_incorrect_candidates_never_win_however_fast():
    base = result("eager", timings(10.0))
    wrong = result("wrong", timings(0.1), status="incorrect")
    broken = result("broken", None, status="build_error")
    choice = select([base, wrong, broken], base, Strategy())
    assert choice.winner is base
    assert "wrong" not in choice.ties


def test_select_returns_none_when_nothing_is_eligible():
    wrong = result("wrong", timings(1.0), status="incorrect")
    choice = select([wrong, result("x", None, status="unsupported")], None, Strategy())
    assert choice.winner is None
    assert choice.reason == "no candidate was built, checked and measured successfully"


def test_select_without_baseline_takes_the_best():
    a, b = result("a", timings(3.0)), result("b", timings(2.0))
    assert select([a, b], None, Strategy()).winner is b


def test_latency_budget_filters_on_p99():
    base = result("eager", timings(10.0, tail=30.0))  # misses the budget on its tail
    steady = result("steady", timings(8.0, tail=9.0))
    bursty = result("bursty", timings(4.0, batch=1, tail=50.0))  # fastest median, but p99 over budget
    choice = select([base, steady, bursty], base, Strategy.parse("latency_budget=20"))
    assert bursty.measurement.p99_ms > 20 and steady.measurement.p99_ms <= 20
    assert choice.winner is steady


def test_latency_budget_that_nothing_meets():
    base = result("eager", timings(10.0))
    choice = select([base], base, Strategy.parse("latency_budget=1"))
    assert choice.winner is None
    assert choice.reason == "no correct candidate has p99 within 1.0 ms"


def test_latency_budget_keeps_a_baseline_within_budget_when_not_beaten():
    base = result("eager", timings(10.0, spread=0.05))
    close = result("close", timings(9.95, spread=0.05))
    choice = select([base, close], base, Strategy.parse("latency_budget=100"))
    assert choice.winner is base


def test_max_throughput_counts_the_batch():
    base = result("eager", timings(10.0, batch=8))  # 800 items/s
    bigger = result("bigger", timings(15.0, batch=16))  # ~1067 items/s, though slower per call
    assert select([base, bigger], base, Strategy.parse("max_throughput")).winner is bigger
    assert select([base, bigger], base, Strategy.parse("min_latency")).winner is base


def test_throughput_and_latency_of_synthetic_measurements():
    m = timings(4.0, batch=8)
    assert m.median_ms == pytest.approx(4.0)
    assert m.throughput == pytest.approx(2000.0)
    assert math.isfinite(m.p99_ms) and m.p99_ms >= m.median_ms


def test_tune_decides_in_interleaved_rounds_against_the_baseline():
    # the candidate runs the forward twice: within screening's reach (2.5x), beaten beyond noise
    # by eager in the same rounds
    result = aitune.tune(SleepyModule(), [Sample.of(torch.randn(2, 8))], [DoubleWorkBackend()], "cpu",
                         measure_config=FAST)
    assert result.winner is result.baseline
    d = result.decision
    assert d["stop"] == "resolved" and d["rounds"] >= 10 and d["p_best"] > 0.9
    assert d["contenders"] == [BASELINE, "DoubleWorkBackend(defaults)"]
    assert "fastest beyond noise" in result.reason
    slower = by_name(result)["DoubleWorkBackend(defaults)"]
    assert slower.speedup == pytest.approx(0.5, rel=0.2)  # paired, in the rounds
    assert slower.backend is None  # deactivated again after the rounds
    assert slower.decided is not None and slower.decided.count >= 10 and slower.decided.median_ms > slower.measurement.median_ms * 0.5
