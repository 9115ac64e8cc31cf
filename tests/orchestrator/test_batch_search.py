"""``batch_sizes: auto``: the search's rule on its own, then a real sweep on a local Ray that
searches, stops for the reasons it says, and measures nothing twice when run again."""

from __future__ import annotations

import pytest

from aitune.measure import STOP_REASONS, TIMERS

from orchestrator import records as R
from orchestrator.records import ResultRecord
from orchestrator.spec.schema import SpecError
from orchestrator.sweep import run_sweep
from orchestrator.sweep.batch_search import FLAT_TRIES, TOP, Search
from sweep_helpers import EAGER, EAGER_BF16, fault, quiet, tiny_spec


def result(batch: int, candidate: str, median_ms: float | None, status: str = R.OK, error: str | None = None):
    return ResultRecord.from_dict({
        "key": f"{candidate}-{batch}", "model": "m", "batch_size": batch, "backend": "B", "config": {},
        "candidate": candidate, "device_class_key": "d" * 64, "status": status, "error": error,
        "measurement": None if median_ms is None else measured(median_ms, batch)})


def measured(ms: float, batch: int) -> dict:
    return {"times_ms": [ms] * 5, "median_ms": ms, "mean_ms": ms, "p90_ms": ms, "p99_ms": ms, "std_ms": 0.0,
            "count": 5, "warmup_count": 1, "timer": TIMERS[0], "threads": 1, "ci_low_ms": ms, "ci_high_ms": ms,
            "stop_reason": STOP_REASONS[0], "batch_size": batch}


def test_the_search_doubles_while_throughput_grows_and_stops_after_two_flat_doublings():
    s = Search("m", "d" * 64, max_batch=1024)
    s.take(1, [result(1, "a", 1.0), result(1, "b", 2.0)])
    assert s.stopped is None and s.last == 1 and s.next_candidates == ["a", "b"]
    s.take(2, [result(2, "a", 1.0)])            # 2000 rows/s: doubled
    s.take(4, [result(4, "a", 3.9)])            # 1026: lower (flat 1)
    assert s.stopped is None
    s.take(8, [result(8, "a", 7.9)])            # 1013: flat 2
    assert s.stopped.startswith("throughput gained under 5%") and FLAT_TRIES == 2
    assert sorted(s.throughput) == [1, 2, 4, 8]


def test_the_next_size_tries_only_the_fastest_few_and_out_of_memory_ends_it():
    s = Search("m", "d" * 64, max_batch=64)
    s.take(1, [result(1, c, ms) for c, ms in (("a", 4.0), ("b", 1.0), ("c", 3.0), ("d", 2.0))])
    assert s.next_candidates == ["b", "d", "c"][:TOP]
    s.take(2, [result(2, "b", None, R.ERROR, "OutOfMemoryError: CUDA out of memory")])
    assert s.stopped == "out of memory at batch 2" and sorted(s.throughput) == [1]


def test_max_batch_ends_it():
    s = Search("m", "d" * 64, max_batch=2)
    s.take(1, [result(1, "a", 1.0)])
    s.take(2, [result(2, "a", 1.0)])
    assert s.stopped == "max_batch 2 reached"


def test_the_spec_takes_auto_and_refuses_other_words(tmp_path):
    spec = tiny_spec(tmp_path / "store", [EAGER], batch_sizes="auto", max_batch=8)
    assert spec.batches_of(spec.models[0]) == [1] and spec.searches_batches(spec.models[0])
    with pytest.raises(SpecError, match="batch_sizes"):
        tiny_spec(tmp_path / "store", [EAGER], batch_sizes="big")
    with pytest.raises(SpecError, match=r"batch_sizes: expected a list of batch sizes or .auto., got the string .big."):
        tiny_spec(tmp_path / "store", [EAGER], batch_sizes="big")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sweep_searches_the_batch_reuses_it_all_when_run_again_and_oom_stops_only_its_candidate(ray_session, tmp_path):
    oom = fault("oom", from_batch=4, tag="oom-past-4")
    spec = tiny_spec(tmp_path / "store", [EAGER, EAGER_BF16, oom], batch_sizes="auto", max_batch=8)
    outcome = run_sweep(spec, console=quiet(), write_report=True)
    (search,) = outcome.batch_search
    sizes = search["batch_sizes"]
    assert sizes[0] == 1 and sizes == [2 ** i for i in range(len(sizes))] and sizes[-1] <= 8
    assert search["stopped"] in ("max_batch 8 reached", "throughput gained under 5% for 2 doublings in a row")
    assert {s.batch_size for s in outcome.selections} == set(sizes)
    assert all(s.winner_key for s in outcome.selections)
    # size 4 is always tried (a stop for flat gains needs two doublings); the OOM there ends only its candidate
    at_four = [r for r in outcome.results if r.batch_size == 4]
    assert [r.status for r in at_four if "Fault" in r.candidate] == [R.Status.BUILD_ERROR]
    assert any(r.status == R.OK for r in at_four if "Fault" not in r.candidate)
    report = (outcome.reports["report.json"]).read_text()
    assert '"batch_search"' in report
    again = run_sweep(spec, console=quiet(), write_report=False)
    assert again.ran == 0 and again.batch_search[0]["batch_sizes"] == sizes


def test_the_plan_counts_batch_one_and_says_the_rest_is_searched(tmp_path):
    from orchestrator.planning.forecast import forecast
    from orchestrator.store import MemoryStore

    spec = tiny_spec(tmp_path / "store", [EAGER, EAGER_BF16], batch_sizes="auto", max_batch=8)
    fc = forecast(spec, MemoryStore(), local=True)
    assert fc.totals["jobs"] == 2
    assert any("mlp: batch sizes searched (auto, up to 8)" in line for line in fc.lines())


def test_a_model_whose_lengths_vary_is_judged_at_its_largest_bucket(tmp_path):
    from orchestrator.sweep.batch_search import BatchSearch

    model = {"name": "m", "factory": "aitune.examples:token_tagger",
             "inputs": [{"name": "input_ids", "shape": ["seq"], "dtype": "int64", "int_range": [0, 100], "kwarg": True,
                         "dynamic": {"seq": {"buckets": [8, 64]}}},
                        {"name": "attention_mask", "shape": ["seq"], "dtype": "int64", "kwarg": True,
                         "dynamic": {"seq": {"pad": 0}}}]}
    search = BatchSearch(tiny_spec(tmp_path / "store", [EAGER], models=[model], batch_sizes="auto", max_batch=64))

    def at(batch, candidate, ms, shape):
        r = result(batch, candidate, ms)
        r.shape = shape
        return r

    # at seq=8 "a" is fastest; at the largest bucket, seq=64, "b" is: the next size tries what wins there
    search.take([at(1, "a", 0.1, "seq=8"), at(1, "b", 0.2, "seq=8"), at(1, "a", 4.0, "seq=64"), at(1, "b", 1.0, "seq=64")])
    (only,) = search.searches.values()
    assert only.next_candidates[0] == "b" and only.throughput[1] == pytest.approx(1000.0)


def test_a_final_round_tries_the_candidates_left_out_at_the_largest_size_and_keeps_the_best():
    s = Search("m", "d" * 64, max_batch=2)
    s.take(1, [result(1, c, ms) for c, ms in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0))]
           + [result(1, "broken", None, R.BUILD_ERROR, "no")])
    s.take(2, [result(2, c, ms) for c, ms in (("a", 1.0), ("b", 2.0), ("c", 3.0))])
    assert s.stopped == "max_batch 2 reached" and s.left_out() == ["d"]  # "broken" failed at batch 1: not retried
    s.take_final([result(2, "d", 0.5)])  # the slowest at batch 1 is the fastest at 2
    assert s.final == ["d"] and s.throughput[2] == pytest.approx(4000.0) and s.left_out() == []
    assert s.to_dict()["final_round"] == ["d"]
