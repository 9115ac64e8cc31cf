from __future__ import annotations

import csv
import json

import pytest
from rich.console import Console

from orchestrator.records import BUILD_ERROR, INCORRECT, OK, DeployRecord, Group, ResultRecord, SelectionRecord
from orchestrator.outcome.report import ROW_COLUMNS, render, report_rows, report_store, write_reports
from orchestrator.outcome.selection import baseline_of
from sweep_helpers import check_result, measurement, worker_info
from orchestrator.store import SqliteStore

DEVICE = "d" * 64
WORKER = worker_info()
EAGER = {"precision": "float32", "autocast": False, "channels_last": False, "inference_mode": True}


def _result(key, candidate, status=OK, median=None, model="resnet", batch=8, backend="TorchCompileBackend",
            config=None, **kw) -> ResultRecord:  # fmt: skip
    if kw.pop("from_store", False):
        kw["how"] = "reused"
    return ResultRecord(key=key, model=model, batch_size=batch, backend=backend, config=config or {},
                        candidate=candidate, status=status, device_class_key=DEVICE,
                        measurement=measurement(median) if median else None,
                        phases={"build": 1.5}, worker=WORKER, check=check_result(1e-5) if median else None,
                        peak_memory_bytes=64 * 2**20 if median else None, **kw)  # fmt: skip


@pytest.fixture
def sweep():
    results = [
        _result("k-eager", "eager fp32", median=8.0, backend="TorchEagerBackend", config={"precision": "float32"}),
        _result("k-fp16", "eager fp16", median=4.0, backend="TorchEagerBackend", config={**EAGER, "precision": "float16"}),
        _result("k-compile", "compile max-autotune", median=2.0, from_store=True),
        _result("k-aot", "aot inductor", status=BUILD_ERROR, error="RuntimeError: linker failed\n  at line 3"),
        _result("k-wrong", "onnx [fp16]", status=INCORRECT, median=1.0,
                error="max abs err " + "9" * 200),  # fmt: skip
        _result("k-mlp", "eager fp32", model="mlp", batch=1, median=0.4, backend="TorchEagerBackend", config=EAGER),
    ]
    selections = [
        SelectionRecord(model="resnet", batch_size=8, device_class_key=DEVICE, winner_key="k-compile",
                        winner="compile max-autotune", reason="fastest beyond noise", ties=["eager fp16"]),  # fmt: skip
        SelectionRecord(model="mlp", batch_size=1, device_class_key=DEVICE, winner_key="k-mlp", winner="eager fp32",
                        reason="only candidate", speedup=1.0),  # fmt: skip
    ]
    deployments = [
        DeployRecord(model="resnet", batch_size=8, target="cuda:0 on node-2", status="deployed",
                     winner_key="k-compile", max_abs_err=2e-5, median_ms=2.1),  # fmt: skip
        DeployRecord(model="resnet", batch_size=8, target="cpu-slot-0 on node-3", status="refused",
                     winner_key="k-compile", reason="built for H200, target is a CPU"),  # fmt: skip
    ]
    return results, selections, deployments


def _by_key(rows):
    return {row["key"]: row for row in rows}


def test_baseline_is_eager_fp32_with_defaults_filled_in(sweep):
    results, _, _ = sweep
    baselines = baseline_of(results)
    assert baselines[Group("resnet", 8, DEVICE)].key == "k-eager"  # config lacks keys: they mean defaults
    assert baselines[Group("mlp", 1, DEVICE)].key == "k-mlp"
    assert len(baselines) == 2


def test_baseline_ignores_fp16_and_channels_last_eager(sweep):
    results = [
        _result("a", "cl", median=1.0, backend="TorchEagerBackend", config={"channels_last": True}),
        _result("b", "fp16", median=1.0, backend="TorchEagerBackend", config={"precision": "float16"}),
    ]
    assert baseline_of(results) == {}


def test_rows_compute_speedup_winner_tie_and_from_store(sweep):
    results, selections, _ = sweep
    rows = _by_key(report_rows(results, selections))
    assert len(rows) == len(results)
    assert rows["k-eager"]["speedup"] == pytest.approx(1.0)
    assert rows["k-fp16"]["speedup"] == pytest.approx(2.0)
    assert rows["k-compile"]["speedup"] == pytest.approx(4.0)
    assert rows["k-aot"]["speedup"] is None and rows["k-aot"]["median_ms"] is None
    assert [k for k, r in rows.items() if r["winner"]] == ["k-compile", "k-mlp"]
    assert [k for k, r in rows.items() if r["tie"]] == ["k-fp16"]
    assert [k for k, r in rows.items() if r["from_store"]] == ["k-compile"]
    assert rows["k-compile"]["device"] == "H200"
    assert rows["k-compile"]["peak_memory_mb"] == pytest.approx(64.0)
    assert rows["k-compile"]["p99_ms"] == pytest.approx(2.4)
    assert rows["k-compile"]["build_s"] == 1.5
    assert rows["k-aot"]["error"] == "RuntimeError: linker failed"
    assert len(rows["k-wrong"]["error"]) == 120
    assert set(rows["k-eager"]) == set(ROW_COLUMNS)


def test_a_fast_wrong_answer_gets_no_speedup(sweep):
    results, selections, _ = sweep
    row = _by_key(report_rows(results, selections))["k-wrong"]
    assert row["median_ms"] == 1.0 and row["speedup"] is None


def test_error_column_shows_the_exception_of_a_traceback():
    error = 'Traceback (most recent call last):\n  File "x.py", line 1\nRuntimeError: out of memory\n'
    row = report_rows([_result("t", "aot", status=BUILD_ERROR, error=error)], [])[0]
    assert row["error"] == "RuntimeError: out of memory"


def test_speedup_is_none_without_a_baseline():
    rows = report_rows([_result("x", "compiled", median=1.0)], [])
    assert rows[0]["speedup"] is None and rows[0]["winner"] is False


def test_render_shows_candidates_and_winner(sweep):
    results, selections, deployments = sweep
    console = Console(record=True, width=200)
    render(console, results, selections, deployments)
    text = console.export_text()
    for r in results:
        assert r.candidate in text
    assert "WINNER" in text
    assert "onnx [fp16]" in text  # square brackets are text, not rich markup
    assert "4.00x" in text
    assert "fastest beyond noise" in text
    assert "cpu-slot-0 on node-3" in text and "built for H200" in text
    assert "RuntimeError: linker failed" in text


def test_write_reports_writes_all_four_files(sweep, tmp_path):
    results, selections, deployments = sweep
    info = {"id": "20260101T000000.000000Z-abc", "name": "nightly", "status": "done"}
    paths = write_reports(tmp_path / "out", info, results, selections, deployments)
    assert set(paths) == {"report.json", "report.csv", "report.md", "latency.png"}

    data = json.loads(paths["report.json"].read_text())
    assert data["sweep"] == info
    assert {r["key"] for r in data["results"]} == {r.key for r in results}
    assert {r["key"] for r in data["rows"]} == {r.key for r in results}
    assert len(data["selections"]) == 2 and len(data["deployments"]) == 2

    with paths["report.csv"].open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == ROW_COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == len(results)
    assert {r["key"]: r["winner"] for r in csv_rows}["k-compile"] == "True"

    md = paths["report.md"].read_text()
    assert "## resnet" in md and "## mlp" in md
    assert "compile max-autotune" in md and "WINNER" in md
    assert "## Winners" in md and "## Deployments" in md

    assert paths["latency.png"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_non_finite_numbers_keep_report_json_strict(tmp_path):
    record = _result("inf", "broken", status=INCORRECT, median=1.0)
    record.check = check_result(float("inf"), ok=False)
    paths = write_reports(tmp_path, {}, [record], [], [])
    text = paths["report.json"].read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_plot_without_any_success_still_writes_a_png(tmp_path):
    paths = write_reports(tmp_path, {}, [_result("f", "failed", status=BUILD_ERROR, error="boom")], [], [])
    assert paths["latency.png"].read_bytes().startswith(b"\x89PNG")


def test_report_store_reads_latest_sweep(sweep, tmp_path):
    results, selections, deployments = sweep
    root = tmp_path / "store"
    with SqliteStore(root) as store:
        old = store.begin_sweep("old", {})
        sweep_id = store.begin_sweep("new", {})
        for r in results:
            if r.from_store:  # built by the old sweep, reused by the new one
                r.how = "built"
                store.add_reuse(sweep_id, store.add_result(old, r))
            else:
                store.add_result(sweep_id, r)
        for s in selections:
            store.put_selection(sweep_id, s)
        for d in deployments:
            store.put_deploy(sweep_id, d)
        store.finish_sweep(sweep_id, "done")

    console = Console(record=True, width=200)
    paths = report_store(root, console=console)
    assert paths["report.json"].parent == root / "reports" / sweep_id
    data = json.loads(paths["report.json"].read_text())
    assert data["sweep"]["name"] == "new"
    assert {r["key"]: r["from_store"] for r in data["rows"]}["k-compile"] is True
    assert "WINNER" in console.export_text()


def test_report_store_on_empty_dir_is_a_clear_error_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an orchestrator store"):
        report_store(tmp_path, console=Console(record=True))
    assert list(tmp_path.iterdir()) == []


def test_report_store_without_sweeps_is_a_clear_error(tmp_path):
    SqliteStore(tmp_path).close()
    with pytest.raises(LookupError, match="no sweeps"):
        report_store(tmp_path, console=Console(record=True))


def test_report_store_unknown_sweep_lists_known(tmp_path):
    with SqliteStore(tmp_path) as store:
        known = store.begin_sweep("s", {})
    with pytest.raises(KeyError, match=known):
        report_store(tmp_path, sweep_id="nope", console=Console(record=True))


def test_reports_without_matplotlib_skip_only_the_plot(sweep, tmp_path, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a machine without it: import fails
    results, selections, deployments = sweep
    paths = write_reports(tmp_path, {"id": "s1", "name": "t"}, results, selections, deployments)
    assert set(paths) == {"report.json", "report.csv", "report.md"}
    assert not (tmp_path / "latency.png").exists()
    assert "no latency plot" in caplog.text


def test_where_decisions_came_from_prints_whole_however_long_the_reason(sweep):
    results, selections, deployments = sweep
    follower = SelectionRecord(
        model="mlp", batch_size=1, device_class_key=DEVICE, winner_key="k-mlp", winner="eager fp32",
        reason="beats the baseline beyond noise by min_latency (after re-measuring 4 candidates interleaved)" * 2,
        ties=["OnnxRuntimeBackend(graph_optimization_level=basic)", "OnnxRuntimeBackend(io_binding=False)"],
        decisions_from={"model": "base", "candidates": ["eager fp32", "compile max-autotune"]},
    )
    console = Console(record=True, width=100)
    render(console, results, [selections[0], follower], deployments)
    lines = console.export_text().splitlines()
    assert "  mlp (batch 1): decisions reused from base (tried its top eager fp32, compile max-autotune)" in lines


def _decided(results, times: dict[str, list[float]], winner: str):
    """A group decided in rounds: the selection as orchestrator.outcome.selection makes it, from these times."""
    from aitune.decision import Rounds
    from orchestrator.outcome.selection import Answer, choose_winners
    from aitune.strategy import Strategy

    def decide(asks):
        return {g: Answer(Rounds({k: times[k] for k in a.keys})) for g, a in asks.items()}

    (sel,) = choose_winners(results, Strategy("min_latency"), decide)
    assert sel.winner_key == winner
    return sel


def test_the_table_shows_the_rounds_a_decision_rests_on_and_agrees_with_the_winners_line():
    # first measurements: eager in a slow window (8 ms), compile 2 ms (4x); in the rounds 2x
    results = [
        _result("k-eager", "eager fp32", median=8.0, backend="TorchEagerBackend", config=EAGER),
        _result("k-compile", "compile", median=2.0),
        _result("k-far", "far behind", median=9.0),
    ]
    wobble = [1.0, 1.01, 0.99, 1.02, 0.98, 1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0]
    sel = _decided(results, {"k-eager": [4.0 * w for w in wobble], "k-compile": [2.0 * w for w in reversed(wobble)]},
                   "k-compile")
    rows = _by_key(report_rows(results, [sel]))
    assert rows["k-compile"]["window"] == rows["k-eager"]["window"] == "rounds"
    assert rows["k-compile"]["median_ms"] == pytest.approx(2.0, rel=0.02)
    assert rows["k-compile"]["first_median_ms"] == pytest.approx(2.0)
    assert rows["k-eager"]["median_ms"] == pytest.approx(4.0, rel=0.02) and rows["k-eager"]["first_median_ms"] == pytest.approx(8.0)
    assert rows["k-compile"]["speedup"] == pytest.approx(sel.speedup) == pytest.approx(2.0, rel=0.03)
    # a row left out of the rounds keeps its first measurement, its speedup against eager's first one
    assert rows["k-far"]["window"] == "first" and rows["k-far"]["speedup"] == pytest.approx(8.0 / 9.0)
    console = Console(record=True, width=260)
    render(console, results, [sel], [])
    text = console.export_text()
    winners = text[text.index("winners"):]
    assert f"{sel.speedup:.2f}x" in winners and "resolved" in winners
    compile_line = next(line for line in text.splitlines() if "│ compile " in line and "WINNER" in line)
    assert f"{sel.speedup:.2f}x" in compile_line  # the table and the winners line say the same
    assert "first (screening) measurement" in " ".join(text.split())  # however the note wraps
