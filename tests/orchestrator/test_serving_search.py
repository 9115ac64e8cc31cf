"""Serving settings under a latency target: the spec's checks (before Ray), the choice rule and the
search on made-up points, and, on a real local Ray, a sweep whose winners are measured through the
real Ray Serve app: the choice obeys the target, serving.json is installed and used by the server,
a tampered one is ignored with a warning, and a rerun measures nothing twice."""

from __future__ import annotations

import json

import pytest

from aitune import deploy_root as layout
from aitune.serving_config import SERVING, ServingConfig, read_serving, serving_path
from orchestrator.deploy.serving_choice import MeasuredPoint, Settings, batch_sets, choose, frontier
from orchestrator.deploy.serving_search import SearchSpace, coordinate_search, grid_search
from orchestrator.spec.schema import SpecError, parse_spec
from sweep_helpers import EAGER, quiet, tiny_spec

TARGET = {"p99_ms": 5000.0, "concurrency": [1, 4]}


def _spec_data(**changes):
    data = {"models": [{"name": "mlp", "factory": "aitune.examples:mlp", "inputs": [{"name": "x", "shape": [16]}]}],
            "batch_sizes": [1, 2], "deploy": {"targets": [{"cpu_slots": 1}]}, "objective": "max_throughput",
            "latency_target": {"p99_ms": 20, "concurrency": [1, 8]}}
    data.update(changes)
    return data


@pytest.mark.parametrize("changes, wanted", [
    ({"latency_target": {"p99_ms": 0, "concurrency": [1]}}, "latency_target.p99_ms: Input should be greater than 0"),
    ({"latency_target": {"p99_ms": 5, "concurrency": []}}, "latency_target.concurrency: List should have at least 1"),
    ({"latency_target": {"p99_ms": 5, "concurrency": [8, 1]}}, "latency_target.concurrency: concurrency must be increasing"),
    ({"latency_target": {"p99_ms": 5, "concurrency": [1, 0]}}, "latency_target.concurrency[1]: Input should be greater than 0"),
    ({"latency_target": {"p99_ms": 5, "concurrency": [1], "p50": 3}}, "latency_target.p50: unknown field"),
    ({"objective": "min_latency"}, "latency_target: latency_target is only used with objective max_throughput"),
    ({"deploy": {}}, "latency_target: latency_target measures the deployed winners: give deploy.targets"),
    ({"serving_search": {"queue_delays_ms": [5, 1]}}, "serving_search.queue_delays_ms: queue_delays_ms must be increasing"),
    ({"serving_search": {"replicas": [0]}}, "serving_search.replicas[0]: Input should be greater than or equal to 1"),
    ({"latency_target": None, "serving_search": {"replicas": [1]}}, "serving_search: serving_search is only used with latency_target"),
])
def test_bad_latency_targets_are_refused_with_their_field_before_ray(changes, wanted):
    with pytest.raises(SpecError) as err:
        parse_spec(_spec_data(**changes))
    assert wanted in str(err.value)


def test_a_good_latency_target_parses_with_the_default_search_bounds():
    spec = parse_spec(_spec_data())
    assert spec.latency_target.concurrency == [1, 8]
    assert spec.serving().queue_delays_ms[0] == 0 and spec.serving().replicas is None


def _point(sizes=(1, 2), delay=2.0, replicas=1, c=1, rps=100.0, p99=10.0, lost=0):
    return MeasuredPoint(Settings(tuple(sizes), delay, replicas), c, rps, p99 / 2, p99, 100, lost)


def test_the_choice_is_the_highest_throughput_within_the_target():
    points = [_point(c=1, rps=100, p99=5), _point(c=8, rps=400, p99=18), _point(c=32, rps=900, p99=45),
              _point(delay=5, c=8, rps=500, p99=19.9), _point(delay=5, c=32, rps=950, p99=60, lost=0),
              _point(delay=10, c=32, rps=2000, p99=12, lost=3)]  # lost requests never qualify
    chosen, meets = choose(points, 20.0)
    assert meets and chosen.throughput_rps == 500 and chosen.settings.max_queue_delay_ms == 5


def test_with_no_point_within_the_target_the_lowest_p99_is_chosen_and_marked():
    points = [_point(c=1, rps=100, p99=25), _point(c=8, rps=400, p99=60), _point(delay=0, c=1, rps=90, p99=22)]
    chosen, meets = choose(points, 20.0)
    assert not meets and chosen.p99_ms == 22


def test_the_frontier_keeps_only_points_no_other_beats_on_both():
    points = [_point(rps=100, p99=5), _point(rps=90, p99=6), _point(rps=300, p99=9), _point(rps=250, p99=12)]
    assert [(p.throughput_rps, p.p99_ms) for p in frontier(points)] == [(100, 5), (300, 9)]


def test_batch_sets_are_the_prefixes_of_the_tuned_sizes_largest_first():
    assert batch_sets([8, 1, 4]) == [(1, 4, 8), (1, 4), (1,)]
    assert Settings((1,), 5.0).max_queue_delay_ms == 0  # one size: no batch to wait for


def _fake(table):
    """A measure function from made-up figures: throughput grows with concurrency and batching."""
    calls = []

    def measure(settings, c):
        calls.append((settings, c))
        rps, p99 = table(settings, c)
        return MeasuredPoint(settings, c, rps, p99 / 2, p99, 100)
    return measure, calls


def test_the_search_measures_fewer_points_than_the_grid_and_stops_at_a_missed_target():
    def table(s, c):
        gain = len(s.batch_sizes) * (1 + s.max_queue_delay_ms / 10) * s.replicas
        return 50 * c * gain, 2 * c * (1 + s.max_queue_delay_ms / 4)
    space = SearchSpace((1, 2, 4), (0, 1, 2, 5, 10), (1, 2))
    search_measure, searched = _fake(table)
    grid_measure, gridded = _fake(table)
    found = coordinate_search(space, [1, 4, 16], 20.0, search_measure)
    best = grid_search(space, [1, 4, 16], 20.0, grid_measure)
    assert len(searched) < len(gridded) == len(space.grid()) * 3
    assert found.meets_target and found.chosen.p99_ms <= 20
    assert found.chosen.throughput_rps >= 0.95 * best.chosen.throughput_rps
    for settings in found.tried:  # a missed target ends a setting's run of concurrencies
        runs = [c for s, c in searched if s == settings]
        misses = [c for c in runs if table(settings, c)[1] > 20]
        assert not misses or runs[-1] == misses[0]


def test_serving_json_is_checked_when_read(tmp_path):
    from aitune.serving_config import write_serving

    key = layout.device_class_key("cpu")
    (tmp_path / "mlp" / layout.class_dir_name(key)).mkdir(parents=True)
    config = ServingConfig([1, 2], 2.0, 1, {1: "v0001-aaaaaaaaaaaa", 2: "v0001-bbbbbbbbbbbb"}, True,
                           {"p99_ms": 20.0, "concurrency": [1, 8]},
                           {"concurrency": 8, "throughput_rps": 10.0, "p50_ms": 1.0, "p99_ms": 2.0}, "s1")
    path = write_serving(tmp_path, "mlp", key, config)
    assert read_serving(tmp_path, "mlp", key, config.versions) == (config, None)
    found, why = read_serving(tmp_path, "mlp", key, {1: "v0002-cccccccccccc", 2: config.versions[2]})
    assert found is None and "measured on versions" in why
    data = json.loads(path.read_text())
    for field, value in (("replicas", 0), ("batch_sizes", [2, 1]), ("max_queue_delay_ms", "2"), ("extra", 1)):
        path.write_text(json.dumps({**data, field: value}))
        found, why = read_serving(tmp_path, "mlp", key, config.versions)
        assert found is None and why.startswith(f"{SERVING} of mlp ignored") and "defaults" in why
    path.write_text("{not json")
    assert read_serving(tmp_path, "mlp", key)[0] is None


# -- on a real local Ray: tune, search, serve --

@pytest.fixture(scope="module")
def searched(ray_session, tmp_path_factory):
    from orchestrator.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("serving-search")
    spec = tiny_spec(tmp / "store", [EAGER], batch_sizes=[1, 2], objective="max_throughput",
                     deploy={"targets": [{"cpu_slots": 1}], "latency_check_s": 0.05, "root": str(tmp / "root")},
                     latency_target=TARGET,
                     serving_search={"queue_delays_ms": [0, 2], "requests": 60, "seconds": 5})
    first = run_sweep(spec, console=quiet())
    second = run_sweep(spec, console=quiet())
    return {"spec": spec, "first": first, "second": second, "root": tmp / "root"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_search_measures_through_the_server_and_obeys_the_target(searched):
    (group,) = searched["first"].serving
    assert group["measured"] == len(group["points"]) > 0 and group["reused"] == 0
    chosen = MeasuredPoint.from_dict(group["chosen"])
    points = [MeasuredPoint.from_dict(p) for p in group["points"]]
    assert (chosen, group["meets_target"]) == choose(points, TARGET["p99_ms"])
    assert {p.concurrency for p in points} <= set(TARGET["concurrency"])
    assert all(p.requests > 0 for p in points)
    reports = searched["first"].reports
    assert {"frontier.md", "frontier.json", "frontier.png"} <= set(reports)
    assert "chosen" in reports["frontier.md"].read_text()


@pytest.mark.slow
def test_a_rerun_measures_nothing_twice(searched):
    (first,), (second,) = searched["first"].serving, searched["second"].serving
    assert second["measured"] == 0 and second["reused"] == len(second["points"]) == len(first["points"])
    assert second["chosen"]["settings"] == first["chosen"]["settings"]


@pytest.mark.slow
def test_deployments_and_serve_show_the_installed_serving_settings(searched, capsys):
    from cluster import Inventory, plan_deploy_targets
    from orchestrator.cli import main
    from orchestrator.deploy.serving_files import serving_replicas

    assert main(["deployments", str(searched["spec"].store)]) == 0
    shown = capsys.readouterr().out
    assert "serving settings of mlp on" in shown and "req/s" in shown and "p99 target" in shown
    slots = plan_deploy_targets(Inventory.from_ray(), [{"cpu_slots": 1}])
    replicas, lines = serving_replicas(searched["root"], ["mlp"], slots, 2.0)
    assert replicas == searched["first"].serving[0]["chosen"]["settings"]["replicas"]
    assert any("serving.json:" in line for line in lines)


@pytest.mark.slow
def test_serving_json_is_installed_and_used_by_serve_and_a_tampered_one_is_ignored(searched, caplog):
    from cluster import Inventory, plan_deploy_targets
    from ray import serve

    from orchestrator.deploy.serve import APP_NAME, start_serving, stop_serving
    from serve_helpers import free_port

    root, (group,) = searched["root"], searched["first"].serving
    key = layout.device_class_key("cpu")
    path = serving_path(root, "mlp", key)
    assert str(path) == group["serving_json"]
    config, why = read_serving(root, "mlp", key, {1: _current(root, 1), 2: _current(root, 2)})
    assert why is None and config.to_dict()["batch_sizes"] == group["chosen"]["settings"]["batch_sizes"]
    slots = plan_deploy_targets(Inventory.from_ray(), [{"cpu_slots": 1}])
    served = start_serving(str(root), ["mlp"], slots, port=free_port())
    try:
        force = served.batching["mlp"]
        assert force["settings_from"] == "serving.json" and force["serving_json"] == "used"
        assert force["max_queue_delay_ms"] == config.max_queue_delay_ms
        assert force["batch_sizes"] == config.batch_sizes or not force["enabled"]
    finally:
        serve.delete(APP_NAME)  # the controller stays: no restart race with the next start
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "replicas": "many"}))
    served = start_serving(str(root), ["mlp"], slots, port=free_port())
    try:
        force = served.batching["mlp"]
        assert force["settings_from"] == "defaults" and "ignored" in force["serving_json"]
        assert force["max_queue_delay_ms"] == 2.0
    finally:
        stop_serving()


def _current(root, batch):
    return layout.current_version(layout.batch_dir(root, "mlp", layout.device_class_key("cpu"), batch))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_model_tuned_at_buckets_is_searched_with_lengths_from_its_traffic_mix(ray_session, tmp_path):
    from orchestrator.spec.schema import parse_spec
    from orchestrator.sweep import run_sweep
    from orchestrator.sweep.serving import traffic_lengths

    seq = {"buckets": [8, 16], "pad": 0}
    tagger = {"name": "tagger", "factory": "aitune.examples:token_tagger", "traffic": {"seq": {5: 0.75, 16: 0.25}},
              "inputs": [{"name": "input_ids", "shape": ["seq"], "dtype": "int64", "int_range": [0, 100], "kwarg": True,
                          "dynamic": {"seq": seq}},
                         {"name": "attention_mask", "shape": ["seq"], "dtype": "int64", "int_range": [1, 2], "kwarg": True,
                          "dynamic": {"seq": {"pad": 0}}}]}
    lengths = traffic_lengths(parse_spec({"models": [tagger], "batch_sizes": [1]}).models[0], 16)
    assert sum(n <= 8 for n in lengths) == 12 and all(1 <= n <= 16 for n in lengths)  # 75% pad up to 8
    spec = tiny_spec(tmp_path / "store", [EAGER], models=[tagger], batch_sizes=[1, 2], objective="max_throughput",
                     deploy={"targets": [{"cpu_slots": 1}], "latency_check_s": 0.05, "root": str(tmp_path / "root")},
                     latency_target=TARGET, serving_search={"queue_delays_ms": [0, 2], "requests": 40, "seconds": 5})
    outcome = run_sweep(spec, console=quiet())
    (group,) = outcome.serving
    assert group["points"] and all(p["requests"] > 0 and p["lost"] == 0 for p in group["points"]), group
    assert group["chosen"] is not None
