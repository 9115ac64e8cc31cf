"""Choosing winners from stored results: statistics decide, wrong answers never win, near-ties are measured again."""

from __future__ import annotations

import pytest

from aitune.measure import Measurement
from aitune.strategy import Strategy
from orchestrator import records as R
from orchestrator.records import ResultRecord
from orchestrator.selection import MOST_REMEASURED, TOP_K, choose_winners

DC = "c" * 64
OTHER_DC = "g" * 64
EAGER_CONFIG = {"precision": "float32", "autocast": False, "channels_last": False, "inference_mode": True}


def times(center: float, n: int = 21, spread: float = 0.01, tail: list[float] | None = None) -> list[float]:
    """Deterministic times around ``center`` (relative spread ``spread``), plus optional tail values."""
    base = [center * (1 + spread * ((i % 7) - 3) / 3) for i in range(n)]
    return base + list(tail or [])


def measurement(center: float, batch: int = 1, **kw) -> Measurement:
    return Measurement.from_times(times(center, **kw), timer="perf_counter_ns", threads=1, batch_size=batch)


def result(key: str, median: float | None, *, backend: str = "TorchInductorJitBackend", config: dict | None = None,
           status: str = R.OK, model: str = "mlp", batch: int = 1, dc: str = DC, name: str | None = None,
           m: Measurement | None = None) -> ResultRecord:  # fmt: skip
    if m is None and median is not None:
        m = measurement(median, batch=batch)
    return ResultRecord(
        key=key, model=model, batch_size=batch, backend=backend, config=dict(config or {}), candidate=name or key,
        status=status, device_class_key=dc, measurement=m.to_dict() if m is not None else None,
        error=None if status == R.OK else f"{status}: injected",
    )


def eager(key: str = "eager", median: float | None = 10.0, **kw) -> ResultRecord:
    return result(key, median, backend="TorchEagerBackend", config=EAGER_CONFIG, name="eager fp32", **kw)


class Recorder:
    """A remeasure callback that records its calls and answers with fixed fresh measurements."""

    def __init__(self, answer: dict[str, Measurement] | None = None) -> None:
        self.answer = answer or {}
        self.calls: list[tuple[tuple, list[str]]] = []
        self.batches: list[list[tuple]] = []  # the groups of each call

    def __call__(self, asks):
        self.batches.append(list(asks))
        fresh = {}
        for group, records in asks.items():
            self.calls.append((group, [r.key for r in records]))
            fresh[group] = {k: v for k, v in self.answer.items() if k in {r.key for r in records}}
        return fresh


MIN_LATENCY = Strategy("min_latency")


def only(selections):
    assert len(selections) == 1, selections
    return selections[0]


def test_clear_winner_beats_eager_fp32_baseline():
    remeasure = Recorder()
    sel = only(choose_winners([eager(), result("fast", 5.0), result("slow", 12.0)], MIN_LATENCY, remeasure))
    assert sel.winner_key == "fast" and sel.winner == "fast"
    assert "beats eager fp32 beyond noise" in sel.reason
    assert sel.speedup == pytest.approx(2.0, rel=1e-6)
    assert sel.ties == [] and sel.remeasured is False
    assert remeasure.calls == []  # nothing close: no second measurement needed
    assert (sel.model, sel.batch_size, sel.device_class_key) == ("mlp", 1, DC)


@pytest.mark.parametrize("status", [R.INCORRECT, R.ERROR, R.CRASH, R.TIMEOUT, R.BUILD_ERROR])
def test_failed_candidate_never_wins_even_when_fastest(status):
    # A fast wrong answer keeps its measurement (it was measured before the check failed, say):
    # it must still never win, and never be re-measured.
    remeasure = Recorder()
    results = [eager(), result("wrong", 1.0, status=status), result("ok", 5.0)]
    sel = only(choose_winners(results, MIN_LATENCY, remeasure))
    assert sel.winner_key == "ok"
    assert "wrong" not in sel.ties
    for _, keys in remeasure.calls:
        assert "wrong" not in keys


def test_no_correct_candidate_means_no_winner():
    results = [eager(status=R.CRASH, median=None), result("wrong", 1.0, status=R.INCORRECT)]
    sel = only(choose_winners(results, MIN_LATENCY))
    assert sel.winner is None and sel.winner_key is None and sel.speedup is None
    assert "no candidate" in sel.reason


def test_candidate_within_noise_of_eager_keeps_eager():
    # 1% faster with overlapping intervals: not a win, and re-measuring says the same.
    remeasure = Recorder({"close": measurement(9.9), "eager": measurement(10.0)})
    sel = only(choose_winners([eager(), result("close", 9.9)], MIN_LATENCY, remeasure))
    assert sel.winner_key == "eager"
    assert "baseline kept" in sel.reason
    assert sel.speedup == pytest.approx(1.0)
    assert len(remeasure.calls) == 1  # the near-tie with eager was checked again
    assert sorted(remeasure.calls[0][1]) == ["close", "eager"]
    assert sel.remeasured is True


def test_candidate_within_noise_of_eager_keeps_eager_without_remeasure():
    sel = only(choose_winners([eager(), result("close", 9.9)], MIN_LATENCY))
    assert sel.winner_key == "eager" and sel.remeasured is False


def test_near_tie_is_remeasured_with_top_candidates_and_baseline_and_fresh_numbers_decide():
    results = [
        eager(median=10.0),
        result("a", 5.02),
        result("b", 5.0),  # first by the sweep's numbers
        result("c", 5.04),
        result("d", 5.06),  # also within noise, past the top few: a contender too
        result("e", 5.3), result("f", 5.4), result("g", 5.5),  # contenders, but past MOST_REMEASURED
        result("slow", 8.0),  # more than CLOSE behind
    ]
    remeasure = Recorder({"a": measurement(3.0), "b": measurement(5.0), "c": measurement(5.0), "eager": measurement(10.0)})
    sel = only(choose_winners(results, MIN_LATENCY, remeasure))
    assert len(remeasure.calls) == 1
    group, keys = remeasure.calls[0]
    assert group == ("mlp", 1, DC)
    # the top TOP_K by the first measurements, then the other contenders (MOST_REMEASURED in
    # all), then the baseline for reference
    assert keys[:TOP_K] == ["b", "a", "c"] and keys[TOP_K:] == ["d", "e", "f", "eager"]
    assert len(keys) == MOST_REMEASURED + 1
    assert sel.remeasured is True
    assert sel.winner_key == "a"  # the fresh interleaved measurements decided
    assert "after re-measuring 4 candidates interleaved" in sel.reason
    assert sel.ties == []
    assert sel.speedup == pytest.approx(10.0 / 3.0, rel=1e-6)


def test_near_tie_without_remeasure_lists_ties():
    results = [eager(), result("a", 5.02), result("b", 5.0)]
    sel = only(choose_winners(results, MIN_LATENCY))
    assert sel.winner_key == "b" and sel.ties == ["a"] and sel.remeasured is False


def test_still_tied_after_remeasure_lists_ties():
    results = [eager(), result("a", 5.02), result("b", 5.0)]
    remeasure = Recorder({"a": measurement(4.0), "b": measurement(4.01), "eager": measurement(10.0)})
    sel = only(choose_winners(results, MIN_LATENCY, remeasure))
    assert len(remeasure.calls) == 1
    assert sel.remeasured is True
    assert sel.winner_key == "a"  # the fresh numbers order them...
    assert sel.ties == ["b"]  # ...but cannot tell them apart
    assert sel.speedup == pytest.approx(10.0 / 4.0, rel=1e-6)


def test_failed_remeasure_keeps_first_measurements():
    results = [eager(), result("a", 5.02), result("b", 5.0)]
    remeasure = Recorder({})  # the worker was gone: nothing fresh
    sel = only(choose_winners(results, MIN_LATENCY, remeasure))
    assert len(remeasure.calls) == 1
    assert sel.remeasured is False and sel.winner_key == "b" and sel.ties == ["a"]


def test_groups_are_per_model_batch_and_device_class():
    results = [
        # mlp b1 on the CPU class: "fast" wins
        eager("e-mlp1"), result("fast-mlp1", 2.0),
        # mlp b8 on the same class: the fast backend failed there; only eager is correct
        eager("e-mlp8", batch=8), result("fast-mlp8", 0.5, status=R.INCORRECT, batch=8),
        # mlp b1 on another device class: a 1 ms result there must not take the CPU group
        eager("e-gpu", median=3.0, dc=OTHER_DC), result("fast-gpu", 1.0, dc=OTHER_DC),
        # another model: its own eager is the only candidate
        eager("e-cnn", model="cnn"),
    ]  # fmt: skip
    remeasure = Recorder()
    sels = choose_winners(results, MIN_LATENCY, remeasure)
    got = {(s.model, s.batch_size, s.device_class_key): s.winner_key for s in sels}
    assert got == {
        ("mlp", 1, DC): "fast-mlp1",
        ("mlp", 8, DC): "e-mlp8",
        ("mlp", 1, OTHER_DC): "fast-gpu",
        ("cnn", 1, DC): "e-cnn",
    }
    speedups = {(s.model, s.batch_size, s.device_class_key): s.speedup for s in sels}
    assert speedups[("mlp", 1, DC)] == pytest.approx(5.0, rel=1e-6)
    assert speedups[("mlp", 1, OTHER_DC)] == pytest.approx(3.0, rel=1e-6)
    assert remeasure.calls == []


def test_remeasure_is_called_per_group_with_that_group():
    results = [
        eager("e1"), result("a1", 5.0), result("b1", 5.02),
        eager("e2", dc=OTHER_DC), result("a2", 5.0, dc=OTHER_DC), result("b2", 5.02, dc=OTHER_DC),
    ]  # fmt: skip
    remeasure = Recorder()
    choose_winners(results, MIN_LATENCY, remeasure)
    calls = {group: sorted(keys) for group, keys in remeasure.calls}
    assert calls == {("mlp", 1, DC): ["a1", "b1", "e1"], ("mlp", 1, OTHER_DC): ["a2", "b2", "e2"]}
    assert len(remeasure.batches) == 1  # asked at once, so that the groups can be measured side by side


def test_a_fresh_measurement_of_a_key_the_group_did_not_ask_for_is_ignored():
    results = [eager("e1"), result("a1", 5.0), result("b1", 5.02), result("c1", 5.04), result("far", 20.0)]

    def remeasure(asks):
        (group, records), = asks.items()
        assert "far" not in {r.key for r in records}
        return {group: {"a1": measurement(5.0), "b1": measurement(5.02), "far": measurement(0.1)}}

    sel = only(choose_winners(results, MIN_LATENCY, remeasure))
    assert sel.winner_key in ("a1", "b1", "c1") and sel.remeasured is True


def test_latency_budget_filters_by_p99():
    budget = Strategy("latency_budget", budget_ms=8.0)
    # "spiky" has the best median but a long tail: its p99 is far past the budget
    spiky = measurement(2.0, n=40, tail=[20.0] * 4)
    assert spiky.median_ms < 3.0 and spiky.p99_ms > 8.0
    results = [eager(median=10.0), result("spiky", None, m=spiky), result("steady", 6.0)]
    sel = only(choose_winners(results, budget, Recorder()))
    assert sel.winner_key == "steady"
    # the same results by median latency alone pick the spiky one
    assert only(choose_winners(results, MIN_LATENCY)).winner_key == "spiky"


def test_latency_budget_with_nothing_inside_has_no_winner():
    budget = Strategy("latency_budget", budget_ms=1.0)
    sel = only(choose_winners([eager(median=10.0), result("a", 5.0)], budget))
    assert sel.winner is None
    assert "p99 within 1.0 ms" in sel.reason


def test_latency_budget_keeps_eager_when_it_fits_and_nothing_beats_it():
    budget = Strategy("latency_budget", budget_ms=50.0)
    sel = only(choose_winners([eager(median=10.0), result("close", 9.95)], budget))
    assert sel.winner_key == "eager"


def test_max_throughput_picks_most_samples_per_second():
    strategy = Strategy("max_throughput")
    results = [
        eager(median=10.0, batch=8, m=measurement(10.0, batch=8)),
        result("a", None, batch=8, m=measurement(4.0, batch=8)),
        result("b", None, batch=8, m=measurement(2.5, batch=8)),
        result("wrong", None, batch=8, status=R.INCORRECT, m=measurement(0.5, batch=8)),
    ]
    sel = only(choose_winners(results, strategy, Recorder()))
    assert sel.winner_key == "b"
    assert "max_throughput" in sel.reason
    assert sel.speedup == pytest.approx(4.0, rel=1e-6)


def test_runner_up_within_a_few_percent_is_remeasured_though_the_intervals_do_not_overlap():
    # 3% apart (within CLOSE) with tight intervals: "beyond noise" by each window's own statistics, but two
    # windows measured at different times drift by that much; side by side they are a tie.
    results = [eager(median=10.0), result("a", 5.15, m=measurement(5.15, spread=0.001)),
               result("b", 5.0, m=measurement(5.0, spread=0.001))]
    first = only(choose_winners(results, MIN_LATENCY))
    assert first.winner_key == "b" and first.ties == []  # what the first numbers alone say
    remeasure = Recorder({"a": measurement(5.0), "b": measurement(5.01), "eager": measurement(10.0)})
    sel = only(choose_winners(results, MIN_LATENCY, remeasure))
    assert [sorted(keys) for _, keys in remeasure.calls] == [["a", "b", "eager"]]
    assert sel.remeasured is True and sel.winner_key == "a" and sel.ties == ["b"]


def test_runner_up_well_behind_is_not_remeasured():
    remeasure = Recorder()
    sel = only(choose_winners([eager(median=10.0), result("a", 9.0, m=measurement(9.0, spread=0.001)),
                               result("b", 5.0, m=measurement(5.0, spread=0.001))],
                              MIN_LATENCY, remeasure))
    assert sel.winner_key == "b" and remeasure.calls == [] and sel.remeasured is False


def test_a_candidate_a_third_behind_in_its_own_window_is_measured_again_and_can_win():
    # This machine's windows drift by up to 1.7x (one process, one pinned core, nothing else
    # running: 17.6 to 30.1 us for one eager MLP): a candidate measured in a slow window ranks
    # behind, yet is the fastest side by side.
    results = [eager(median=10.0), result("a", 5.0, m=measurement(5.0, spread=0.001)),
               result("slow-window", 6.5, m=measurement(6.5, spread=0.001))]
    remeasure = Recorder({"a": measurement(5.0, spread=0.001), "slow-window": measurement(4.0, spread=0.001),
                          "eager": measurement(10.0)})
    sel = only(choose_winners(results, MIN_LATENCY, remeasure))
    assert [sorted(keys) for _, keys in remeasure.calls] == [["a", "eager", "slow-window"]]
    # the first window ordered them the other way, beyond its noise: they stay a tie
    assert sel.winner_key == "slow-window" and sel.ties == ["a"]


@pytest.mark.parametrize("first_a, first_b, ties", [
    (5.0, 5.3, ["a"]),  # the sweep's window says a beats b beyond noise, side by side b beats a: not settled
    (5.3, 5.0, []),     # both windows say b beats a: settled
], ids=["windows disagree: a tie", "windows agree: settled"])
def test_two_windows_that_order_a_pair_oppositely_leave_a_tie(first_a, first_b, ties):
    results = [eager(median=10.0), result("a", first_a, m=measurement(first_a, spread=0.001)),
               result("b", first_b, m=measurement(first_b, spread=0.001))]
    remeasure = Recorder({"a": measurement(4.5, spread=0.001), "b": measurement(4.0, spread=0.001),
                          "eager": measurement(10.0)})
    sel = only(choose_winners(results, MIN_LATENCY, remeasure))
    assert sel.remeasured is True and sel.winner_key == "b" and sel.ties == ties
