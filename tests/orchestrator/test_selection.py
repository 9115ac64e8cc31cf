"""Choosing winners from stored results: screening, then interleaved decision rounds (fake,
deterministic ones here); wrong answers never win, ties are broken by a fixed rule."""

from __future__ import annotations

import pytest

from aitune.decision import DecisionRule, Rounds
from aitune.measure import Measurement
from aitune.strategy import Strategy
from orchestrator import records as R
from orchestrator.records import Group, ResultRecord, WorkerInfo
from orchestrator.outcome.selection import Answer, choose_winners, disturbed

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


def rounds_of(center: float, n: int = 40, spread: float = 0.01, phase: int = 0) -> list[float]:
    """One candidate's times in n rounds: a deterministic pattern; other phases pair differently."""
    pattern = [0.0, 0.6, -0.4, 1.0, -1.0, 0.3, -0.7, 0.8, -0.2, 0.1, -0.9]
    return [center * (1 + spread * pattern[(i * 3 + phase) % len(pattern)]) for i in range(n)]


class Rounder:
    """A decide callback: records what each group asked, answers with fixed rounds per key
    (centers, made into rounds), or with a line saying why not."""

    def __init__(self, centers: dict[str, float] | None = None, n: int = 40, spread: float = 0.01,
                 fail: str | None = None) -> None:
        self.centers, self.n, self.spread, self.fail = centers or {}, n, spread, fail
        self.calls: list[tuple[tuple, list[str]]] = []
        self.batches: list[list[tuple]] = []

    def __call__(self, asks):
        self.batches.append(list(asks))
        out = {}
        for group, ask in asks.items():
            self.calls.append((group, ask.keys))
            if self.fail:
                out[group] = self.fail
                continue
            out[group] = Answer(Rounds({k: rounds_of(self.centers[k], self.n, self.spread, phase=i)
                                        for i, k in enumerate(ask.keys)}, seconds=1.5, load=[0.5, 0.6]), wait_s=0.25)
        return out


MIN_LATENCY = Strategy("min_latency")


def only(selections):
    assert len(selections) == 1, selections
    return selections[0]


def test_a_clear_winner_is_confirmed_against_eager_in_the_same_rounds():
    decide = Rounder({"eager": 10.0, "fast": 5.0})
    sel = only(choose_winners([eager(), result("fast", 5.0), result("slow", 13.0)], MIN_LATENCY, decide))
    assert sel.winner_key == "fast" and sel.winner == "fast"
    assert "beats eager fp32 and every other contender beyond noise" in sel.reason
    # eager first (the fixed rule's order), the far one (13 ms, > 2.5x the best) left out
    assert decide.calls == [(Group("mlp", 1, DC), ["eager", "fast"])]
    assert sel.remeasured is True and sel.ties == []
    d = sel.decision
    assert d["stop"] == "resolved" and d["left_out"] == ["slow"]
    assert d["baseline"]["ratio"] == pytest.approx(2.0, rel=0.02) and d["baseline"]["low"] > 1
    assert d["runner_up"]["key"] == "eager"
    assert d["p_best"] == 1.0 and d["wait_s"] == 0.25 and d["seconds"] == 1.5
    assert d["first"] == {"eager": pytest.approx(10.0), "fast": pytest.approx(5.0)}
    assert sel.speedup == pytest.approx(2.0, rel=0.02)  # from the rounds, both in one window


def test_a_large_gain_in_screening_that_the_rounds_do_not_confirm_keeps_eager():
    # eager's first window was taken under load (20 ms); side by side the two are the same
    decide = Rounder({"eager": 10.0, "compiled": 10.0}, n=300)
    sel = only(choose_winners([eager(median=20.0), result("compiled", 10.0)], MIN_LATENCY, decide))
    assert sel.winner_key == "eager"
    assert sel.decision["stop"] == "tie" and sel.ties == ["compiled"]
    assert sel.speedup == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("status", [R.INCORRECT, R.ERROR, R.CRASH, R.TIMEOUT, R.BUILD_ERROR])
def test_failed_candidate_never_wins_even_when_fastest(status):
    # A fast wrong answer keeps its measurement (it was measured before the check failed, say):
    # it must still never win, and never be measured again.
    decide = Rounder({"eager": 10.0, "ok": 5.0})
    results = [eager(), result("wrong", 1.0, status=status), result("ok", 5.0)]
    sel = only(choose_winners(results, MIN_LATENCY, decide))
    assert sel.winner_key == "ok"
    assert "wrong" not in sel.ties
    assert all("wrong" not in keys for _, keys in decide.calls)


def test_no_correct_candidate_means_no_winner_and_no_rounds():
    decide = Rounder()
    results = [eager(status=R.CRASH, median=None), result("wrong", 1.0, status=R.INCORRECT)]
    sel = only(choose_winners(results, MIN_LATENCY, decide))
    assert sel.winner is None and sel.winner_key is None and sel.speedup is None
    assert "no candidate" in sel.reason and decide.calls == []


def test_a_declared_tie_is_broken_by_the_spec_order_whatever_the_medians():
    results = [eager(), result("a", 5.0), result("b", 5.02)]
    decide = Rounder({"eager": 10.0, "a": 5.0, "b": 5.01}, n=300)
    order = {"a": 1, "b": 0}  # the spec lists b first
    sel = only(choose_winners(results, MIN_LATENCY, decide, rank=lambda r: order.get(r.key, -1)))
    assert decide.calls[0][1] == ["eager", "b", "a"]
    assert sel.decision["stop"] == "tie" and sel.winner_key == "b" and sel.ties == ["a"]
    assert sel.decision["leader"] == "a"  # a had the lower median: the rule, not the noise, decides
    again = only(choose_winners(results, MIN_LATENCY, Rounder({"eager": 10.0, "a": 5.0, "b": 5.01}, n=300),
                                rank=lambda r: order.get(r.key, -1)))
    assert again.winner_key == "b"  # the same results, the same winner
    flipped = only(choose_winners(results, MIN_LATENCY, Rounder({"eager": 10.0, "a": 5.0, "b": 5.01}, n=300),
                                  rank=lambda r: -order.get(r.key, -1)))
    assert flipped.winner_key == "a"


def test_rounds_that_separate_nothing_by_the_cap_say_so():
    # 1% apart, 5% noise, 12 rounds: the worker stopped at its cap with the pair still open
    decide = Rounder({"eager": 10.0, "a": 5.0, "b": 5.05}, n=12, spread=0.05)
    sel = only(choose_winners([eager(), result("a", 5.0), result("b", 5.05)], MIN_LATENCY, decide))
    assert sel.decision["stop"] == "cap"
    assert sel.winner_key == "a" and sel.ties == ["b"]  # a before b by name (no spec order given)
    assert "not separated" in sel.reason


def test_a_candidate_behind_in_its_own_window_is_decided_in_the_rounds_and_can_win():
    # This machine's windows drift by up to 1.7x: a candidate measured in a slow window ranks behind
    results = [eager(median=10.0), result("a", 5.0), result("slow-window", 6.5)]
    decide = Rounder({"eager": 10.0, "a": 5.0, "slow-window": 4.0})
    sel = only(choose_winners(results, MIN_LATENCY, decide))
    assert sorted(decide.calls[0][1]) == ["a", "eager", "slow-window"]
    assert sel.winner_key == "slow-window" and sel.decision["stop"] == "resolved"
    assert sel.decision["runner_up"]["key"] == "a" and sel.decision["runner_up"]["ratio"] == pytest.approx(1.25, rel=0.02)


def test_rounds_that_could_not_run_leave_the_first_measurements_to_decide_and_say_why():
    results = [eager(), result("a", 5.02), result("b", 5.0)]
    sel = only(choose_winners(results, MIN_LATENCY, Rounder(fail="TimeoutError: worker gave no answer")))
    assert sel.remeasured is False and sel.winner_key == "b" and sel.ties == ["a"]
    assert sel.decision["stop"] == "screening"
    assert "by the first measurements alone: TimeoutError" in sel.reason


def test_rounds_naming_other_candidates_are_not_used():
    results = [eager(), result("a", 5.0), result("b", 5.02)]

    def decide(asks):
        (group, ask), = asks.items()
        return {group: Answer(Rounds({"a": rounds_of(5.0), "zzz": rounds_of(1.0)}))}

    sel = only(choose_winners(results, MIN_LATENCY, decide))
    assert sel.decision["stop"] == "screening" and "other candidates" in sel.reason


def test_a_lone_contender_needs_no_rounds():
    decide = Rounder({"eager": 10.0, "fast": 2.0})
    sel = only(choose_winners([eager(), result("fast", 2.0)], MIN_LATENCY, decide))
    assert sel.winner_key == "fast" and sel.decision["stop"] == "resolved"
    assert decide.calls == [(Group("mlp", 1, DC), ["eager", "fast"])]  # a win over eager is always confirmed
    decide = Rounder()
    sel = only(choose_winners([eager(median=2.0), result("slow", 9.0)], MIN_LATENCY, decide))
    assert decide.calls == [] and sel.winner_key == "eager" and sel.decision["stop"] == "alone"
    assert "more than 2.5x slower" in sel.reason


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
    decide = Rounder({"e-mlp1": 10.0, "fast-mlp1": 2.0, "e-gpu": 3.0, "fast-gpu": 1.0})
    sels = choose_winners(results, MIN_LATENCY, decide)
    got = {(s.model, s.batch_size, s.device_class_key): s.winner_key for s in sels}
    assert got == {
        ("mlp", 1, DC): "fast-mlp1",
        ("mlp", 8, DC): "e-mlp8",
        ("mlp", 1, OTHER_DC): "fast-gpu",
        ("cnn", 1, DC): "e-cnn",
    }
    speedups = {(s.model, s.batch_size, s.device_class_key): s.speedup for s in sels}
    assert speedups[("mlp", 1, DC)] == pytest.approx(5.0, rel=0.02)
    assert speedups[("mlp", 1, OTHER_DC)] == pytest.approx(3.0, rel=0.02)
    # every group with two contenders, asked at once so that groups can run side by side
    assert len(decide.batches) == 1 and sorted(g for g, _ in decide.calls) == [Group("mlp", 1, DC), Group("mlp", 1, OTHER_DC)]


def test_contenders_are_the_near_ones_at_most_most_plus_eager_in_the_fixed_order():
    results = [eager(median=10.0)] + [result(k, 5.0 + 0.1 * i) for i, k in enumerate("abcdefg")] + [result("far", 13.0)]
    decide = Rounder({k: 5.0 for k in "abcdef"} | {"eager": 10.0}, n=300)
    sel = only(choose_winners(results, MIN_LATENCY, decide, rule=DecisionRule(most=6)))
    assert decide.calls[0][1] == ["eager", "a", "b", "c", "d", "e", "f"]
    assert sorted(sel.decision["left_out"]) == ["far", "g"]


def _worker(wid: str, node: str = "n1") -> dict:
    return WorkerInfo(wid, node, "host", 1, "cpu", {"device_type": "cpu"}, DC, 1).to_dict()


def test_a_first_measurement_taken_beside_a_build_on_its_node_is_compared_from_further_away():
    far = result("far", 40.0)  # 4x the best: out of reach, unless its window was disturbed
    far.worker, far.context = WorkerInfo.from_dict(_worker("w1")), {"measure": [100.0, 101.0], "load": [1.0, 1.5]}
    builder = result("fast", 10.0)
    builder.worker, builder.context = WorkerInfo.from_dict(_worker("w2")), {"build": [99.0, 100.5]}
    elsewhere = result("other-node", 10.0)
    elsewhere.worker, elsewhere.context = WorkerInfo.from_dict(_worker("w3", node="n2")), {"build": [99.0, 105.0]}
    shaken = disturbed([far, builder, elsewhere])
    assert list(shaken) == ["far"] and len(shaken["far"]) == 1
    assert "build of fast" in shaken["far"][0] and "w2" in shaken["far"][0]
    decide = Rounder({"eager": 30.0, "far": 9.0, "fast": 10.0})
    sel = only(choose_winners([eager(median=30.0), far, builder], MIN_LATENCY, decide))
    assert sorted(decide.calls[0][1]) == ["eager", "far", "fast"]
    assert sel.winner_key == "far" and "far" in sel.decision["disturbed"]


def test_latency_budget_filters_by_p99():
    budget = Strategy("latency_budget", budget_ms=8.0)
    # "spiky" has the best median but a long tail: its p99 is far past the budget
    spiky = measurement(2.0, n=40, tail=[20.0] * 4)
    assert spiky.median_ms < 3.0 and spiky.p99_ms > 8.0
    results = [eager(median=10.0), result("spiky", None, m=spiky), result("steady", 6.0)]
    sel = only(choose_winners(results, budget, Rounder({"eager": 10.0, "steady": 6.0})))
    assert sel.winner_key == "steady"
    # the same results by median latency alone pick the spiky one
    assert only(choose_winners(results, MIN_LATENCY)).winner_key == "spiky"


def test_latency_budget_with_nothing_inside_has_no_winner():
    budget = Strategy("latency_budget", budget_ms=1.0)
    sel = only(choose_winners([eager(median=10.0), result("a", 5.0)], budget))
    assert sel.winner is None
    assert "p99 within 1.0 ms" in sel.reason


def test_max_throughput_picks_most_samples_per_second():
    strategy = Strategy("max_throughput")
    results = [
        eager(median=10.0, batch=8, m=measurement(10.0, batch=8)),
        result("a", None, batch=8, m=measurement(4.0, batch=8)),
        result("b", None, batch=8, m=measurement(2.5, batch=8)),
        result("wrong", None, batch=8, status=R.INCORRECT, m=measurement(0.5, batch=8)),
    ]
    decide = Rounder({"eager": 10.0, "a": 4.0, "b": 2.5})
    sel = only(choose_winners(results, strategy, decide))
    assert sel.winner_key == "b"
    assert sel.speedup == pytest.approx(4.0, rel=0.02)


def test_a_first_measurement_during_which_the_load_changed_is_disturbed_too():
    r = result("a", 5.0)
    r.worker, r.context = WorkerInfo.from_dict(_worker("w1")), {"measure": [1.0, 2.0], "load": [0.4, 1.9]}
    calm = result("b", 5.0)
    calm.worker, calm.context = WorkerInfo.from_dict(_worker("w2")), {"measure": [1.0, 2.0], "load": [0.4, 0.9]}
    shaken = disturbed([r, calm])
    assert list(shaken) == ["a"] and "from 0.40 to 1.90" in shaken["a"][0]


def test_rounds_without_a_single_time_are_not_trusted():
    results = [eager(), result("a", 5.0)]

    def decide(asks):
        (group, ask), = asks.items()
        return {group: Answer(Rounds({k: [None] * 12 for k in ask.keys}))}

    sel = only(choose_winners(results, MIN_LATENCY, decide))
    assert sel.decision["stop"] == "screening" and "hold no times" in sel.reason and sel.winner_key == "a"
