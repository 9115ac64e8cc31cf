"""The sequential decision rule on deterministic fake rounds, and real interleaved rounds of real callables.

The rule (:func:`aitune.decision.assess`) sees only raw times, so these tests give it exact
numbers: it stops when it can, resolves, declares ties and breaks them by the fixed order, and
reports ``cap`` where the rounds could not separate two candidates.
"""

from __future__ import annotations

import time

import pytest
import torch

from aitune.decision import BEATEN, OPEN, TIE, DecisionRule, Rounds, assess, run_rounds
from aitune.specs import Sample

RULE = DecisionRule()


def noisy(center: float, n: int, spread: float = 0.05, phase: int = 0) -> list[float]:
    """Deterministic times around ``center``: a repeating pattern of relative size ``spread``;
    different phases make two candidates' paired ratios vary from round to round."""
    pattern = [0.0, 0.6, -0.4, 1.0, -1.0, 0.3, -0.7, 0.8, -0.2, 0.1, -0.9]
    return [center * (1 + spread * pattern[(i * 3 + phase) % len(pattern)]) for i in range(n)]


def test_a_clear_leader_is_resolved_and_beats_everyone_beyond_noise():
    times = {"eager": noisy(10.0, 12, phase=0), "fast": noisy(5.0, 12, phase=4), "mid": noisy(7.0, 12, phase=7)}
    v = assess(times, ["eager", "fast", "mid"], RULE, bootstrap=True)
    assert v.stop == "resolved" and v.winner == "fast" and v.ties == []
    assert v.pairs["eager"].verdict == BEATEN and v.pairs["mid"].verdict == BEATEN
    assert v.pairs["eager"].ratio == pytest.approx(2.0, rel=0.1)  # eager's time over the winner's
    assert v.pairs["eager"].low > 1
    assert v.p_best == 1.0 and v.p_near == 1.0


def test_while_a_comparison_is_open_the_rule_asks_for_more_rounds_and_names_who_is_beaten():
    # a and b 1% apart with 5% noise over 12 rounds: neither separated nor shown to be a tie
    times = {"eager": noisy(10.0, 12), "a": noisy(5.0, 12, phase=2), "b": noisy(5.05, 12, phase=5)}
    v = assess(times, ["eager", "a", "b"], RULE)
    assert v.stop is None and v.winner is None
    assert v.pairs["b"].verdict == OPEN
    assert v.beaten == ["eager"]  # it may sit the next rounds out


def test_at_the_cap_what_is_open_is_not_separated_and_the_leader_wins_unless_eager_is_among_them():
    times = {"eager": noisy(10.0, 12), "a": noisy(5.0, 12, phase=2), "b": noisy(5.05, 12, phase=5)}
    v = assess(times, ["eager", "b", "a"], RULE, final=True, baseline="eager")
    assert v.stop == "cap"
    assert v.leader == "a"
    # eager was beaten: the best estimate wins, whatever the order (which is for declared ties)
    assert v.winner == "a" and v.ties == ["b"]
    # eager open against the leader at the cap: nothing beat it beyond noise, it is kept
    close = {"eager": noisy(5.1, 12, phase=1), "a": noisy(5.0, 12, phase=2)}
    v = assess(close, ["eager", "a"], RULE, final=True, baseline="eager")
    assert v.stop == "cap" and v.winner == "eager" and v.ties == ["a"]


def test_two_candidates_shown_to_be_within_the_tie_band_are_a_declared_tie():
    # 0.5% apart, 1% noise, 200 rounds: the ratio's interval lies inside 1 +- 3%
    times = {"eager": noisy(10.0, 200), "a": noisy(5.0, 200, spread=0.01, phase=1),
             "b": noisy(5.025, 200, spread=0.01, phase=6)}
    v = assess(times, ["eager", "a", "b"], RULE)
    assert v.stop == "tie" and v.winner == "a" and v.ties == ["b"]
    assert v.pairs["b"].verdict == TIE
    # the order decides, whichever is faster: the same rounds always give the same winner
    again = assess(times, ["eager", "b", "a"], RULE)
    assert again.stop == "tie" and again.winner == "b" and again.ties == ["a"]


def test_eager_tied_with_the_leader_is_kept():
    times = {"eager": noisy(5.02, 200, spread=0.01, phase=3), "fast": noisy(5.0, 200, spread=0.01, phase=8)}
    v = assess(times, ["eager", "fast"], RULE)
    assert v.stop == "tie" and v.winner == "eager" and v.leader == "fast"


def test_a_large_apparent_gain_is_confirmed_or_not_by_the_rounds_alone():
    # Screening said 2x (eager measured under load); side by side they are the same.
    same = {"eager": noisy(10.0, 300, spread=0.01, phase=0), "compiled": noisy(10.0, 300, spread=0.01, phase=5)}
    v = assess(same, ["eager", "compiled"], RULE)
    assert v.winner == "eager" and v.stop == "tie"
    assert v.pairs["compiled"].ratio == pytest.approx(1.0, abs=0.02)


def test_the_bootstrap_is_deterministic_and_low_for_a_coin_flip():
    times = {"a": noisy(5.0, 40, phase=1), "b": noisy(5.0, 40, phase=6)}
    first = assess(times, ["a", "b"], RULE, final=True, bootstrap=True)
    second = assess(times, ["a", "b"], RULE, final=True, bootstrap=True)
    assert (first.p_best, first.p_near) == (second.p_best, second.p_near)
    assert 0.05 < first.p_best < 0.95


def test_one_measured_candidate_is_alone_and_sat_out_rounds_are_paired_only_where_both_ran():
    assert assess({"a": [1.0, 1.1], "b": [None, None]}, ["a", "b"], RULE, final=True).stop == "alone"
    # b sat out the last rounds: its pair uses only the rounds both ran
    times = {"a": noisy(5.0, 20), "b": noisy(10.0, 10) + [None] * 10}
    v = assess(times, ["a", "b"], RULE, final=True)
    assert v.winner == "a" and v.pairs["b"].rounds == 10


def test_every_candidate_needs_a_place_in_the_order():
    with pytest.raises(ValueError, match="without a place in the order"):
        assess({"a": [1.0], "b": [1.0]}, ["a"], RULE)


@pytest.mark.parametrize("bad, match", [
    ({"times_ms": {"a": [1.0, "x"]}}, "not a finite number"),
    ({"times_ms": {"a": [1.0, float("nan")]}}, "not a finite number"),
    ({"times_ms": {"a": [1.0], "b": [1.0, 2.0]}}, "different round counts"),
    ({"times_ms": {"a": "1.0"}}, "not a list"),
    ({"times": {}}, "no times_ms"),
    ([1, 2], "no times_ms"),
])
def test_rounds_read_back_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        Rounds.from_dict(bad)


@pytest.mark.parametrize("kw, match", [
    ({"min_rounds": 2}, "min_rounds"), ({"min_rounds": 50, "max_rounds": 20}, "min_rounds"),
    ({"tie": 0}, "tie"), ({"confidence": 1.0}, "confidence"), ({"cap_s": 0}, "cap_s"),
    ({"reach": 3.0, "reach_disturbed": 2.0}, "reach"),
])
def test_a_bad_rule_is_refused_naming_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        DecisionRule(**kw)


def _spin(seconds: float):
    def fn(x):
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
        return x

    return fn


def test_real_rounds_resolve_a_tenfold_difference_and_the_loser_sits_out():
    sample = Sample((torch.zeros(1),), {})
    fns = {"slow": _spin(0.002), "fast": _spin(0.0002)}
    rule = DecisionRule(min_rounds=10, cap_s=20.0)
    rounds = run_rounds(fns, sample, "cpu", rule, ["slow", "fast"], threads=1)
    assert rounds.count >= rule.min_rounds
    verdict = assess(rounds.times_ms, ["slow", "fast"], rule, final=True)
    assert verdict.winner == "fast" and verdict.stop == "resolved"
    # every round up to min_rounds timed both
    assert all(t is not None for t in rounds.times_ms["slow"][: rule.min_rounds])
    assert len(rounds.load) >= 2 and rounds.timer == "perf_counter_ns"


def test_real_rounds_of_the_same_callable_stop_at_a_tie_or_the_cap_and_take_the_first_in_order():
    sample = Sample((torch.zeros(1),), {})
    same = _spin(0.0002)
    rule = DecisionRule(min_rounds=10, max_rounds=200, cap_s=2.0)
    rounds = run_rounds({"a": same, "b": same}, sample, "cpu", rule, ["b", "a"], threads=1)
    assert rule.min_rounds <= rounds.count <= rule.max_rounds
    verdict = assess(rounds.times_ms, ["b", "a"], rule, final=True)
    # one callable can't beat itself beyond noise in rotated rounds: a tie or the cap, and the order decides
    assert verdict.stop in ("tie", "cap")
    assert verdict.winner == "b" and verdict.ties == ["a"]


def test_screening_keeps_the_near_ones_the_disturbed_from_further_and_the_baseline_always():
    from aitune.decision import screen

    first = {"eager": 40.0, "a": 10.0, "b": 14.0, "c": 16.0, "d": 24.0, "e": 30.0}
    rule = DecisionRule(reach=1.5, reach_disturbed=2.5)
    near, out = screen(first, "eager", rule)
    assert near == ["a", "b", "eager"] and out == ["c", "d", "e"]  # 1.5x of the best, eager on top
    near, _ = screen(first, "eager", rule, disturbed={"d", "e"})
    assert near == ["a", "b", "d", "eager"]  # d within 2.5x, measured beside a build: compared again
    near, _ = screen(first, None, DecisionRule(most=1))
    assert near == ["a"]
    assert screen({}, "eager", DecisionRule()) == ([], [])


def test_a_candidate_beaten_early_stays_beaten_when_a_later_leader_shared_few_rounds_with_it():
    # eager is beaten beyond noise by a in the first 10 rounds and sits out the rest; b, whose
    # first rounds were wild, leads at the end but shares only those 10 rounds with eager (a wide
    # interval). Eager must not come back as "not separated" and be kept at the cap.
    wild = [2.0, 20.0] * 5
    times = {
        "eager": noisy(10.0, 10, spread=0.01) + [None] * 30,
        "a": noisy(5.0, 40, spread=0.05, phase=3),
        "b": wild + noisy(4.98, 30, spread=0.05, phase=7),
    }
    from aitune.decision import pair

    conf = 1 - (1 - RULE.confidence) / 2
    assert pair(times, "b", "eager", conf, RULE).verdict == OPEN  # what the old rule looked at
    v = assess(times, ["eager", "a", "b"], RULE, final=True, baseline="eager")
    assert "eager" in v.beaten and v.winner != "eager"
    assert v.stop == "cap" and v.winner == v.leader
