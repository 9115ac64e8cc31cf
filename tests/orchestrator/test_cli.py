"""``python -m orchestrator``: bad specs fail early with the field path, reports come from a store; plain progress lines."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from aitune.measure import Measurement
from orchestrator import records as R
from orchestrator.dispatch.progress import Progress
from orchestrator.records import DeployRecord, Job, ResultRecord, SelectionRecord
from orchestrator.store import DB_NAME, SqliteStore
from sweep_helpers import check_result, worker_info

ROOT = Path(__file__).resolve().parents[2]
DC = "c" * 64
EAGER_CONFIG = {"precision": "float32", "autocast": False, "channels_last": False, "inference_mode": True}

pytestmark = pytest.mark.timeout(120)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p), RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], env=env, cwd=cwd or ROOT,
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip


# -- tune ---------------------------------------------------------------------------------------


def test_tune_with_invalid_spec_exits_2_and_names_each_field(tmp_path):
    store = tmp_path / "store"
    spec = {
        "name": "bad",
        "models": [{"name": "mlp", "factory": "aitune.examples:mlp", "inputs": [{"shape": [16, -1]}]}],
        "batch_sizes": [0],
        "candidates": [{"backend": "NoSuchBackend"}],
        "workers": {"cpu_slot": 2},
        "store": str(store),
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    proc = cli("tune", str(path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert f"invalid sweep spec {path}" in out
    assert "models[0].inputs[0].shape[1]" in out
    assert "batch_sizes[0]" in out
    assert "candidates[0].backend" in out and "NoSuchBackend" in out
    assert "workers.cpu_slot: unknown field" in out
    assert "Traceback" not in out
    assert not store.exists()  # nothing ran: no store, no Ray


def test_tune_refused_for_a_model_the_factory_cant_make_leaves_no_store_but_keeps_an_existing_one(tmp_path):
    """The model is refused after the store is opened (a bad store is refused first): a store this
    run made is taken away again; one that was there is left as it was."""
    spec = {"name": "bad", "models": [{"name": "m", "factory": "os:getcwd", "inputs": [{"name": "x", "shape": [4]}]}],
            "batch_sizes": [1]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    new = tmp_path / "new" / "deeper" / "store"
    proc = cli("tune", str(path), "--store", str(new))
    assert proc.returncode == 2 and "returned str, not an nn.Module" in proc.stdout + proc.stderr
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("the user's")
    assert cli("tune", str(path), "--store", str(kept)).returncode == 2
    assert sorted(p.name for p in kept.iterdir()) == ["mine.txt"]  # the database it made there is gone too
    assert (kept / "mine.txt").read_text() == "the user's"


def test_tune_with_missing_spec_file_exits_2(tmp_path):
    proc = cli("tune", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2
    assert "nope.yaml does not exist" in proc.stdout + proc.stderr


# -- report -------------------------------------------------------------------------------------


def _measurement(center: float) -> Measurement:
    times = [center * (1 + 0.01 * ((i % 5) - 2)) for i in range(15)]
    return Measurement.from_times(times, threads=1, batch_size=2)


def _result(key: str, candidate: str, backend: str, config: dict, status: str = R.OK, median: float | None = None,
            error: str | None = None) -> ResultRecord:  # fmt: skip
    return ResultRecord(
        key=key, model="mlp", batch_size=2, backend=backend, config=config, candidate=candidate, status=status,
        device_class_key=DC, error=error, phases={"build": 0.25},
        measurement=_measurement(median) if median is not None else None,
        check=check_result(1e-6) if median is not None else None,
        worker=worker_info("Test CPU", "cpu", "cpu0-0"),
        created_at=time.time(),
    )


@pytest.fixture
def handmade_store(tmp_path):
    root = tmp_path / "store"
    results = [
        _result("k-eager", "eager-fp32", "TorchEagerBackend", EAGER_CONFIG, median=4.0),
        _result("k-bf16", "eager-bf16", "TorchEagerBackend", {**EAGER_CONFIG, "precision": "bfloat16", "autocast": True},
                median=2.0),  # fmt: skip
        _result("k-boom", "fault-raise", "FaultBackend", {"fault": "raise"}, status=R.BUILD_ERROR,
                error="Traceback (most recent call last):\n  ...\nRuntimeError: FaultBackend: injected failure"),  # fmt: skip
    ]
    selection = SelectionRecord(model="mlp", batch_size=2, device_class_key=DC, winner_key="k-bf16", winner="eager-bf16",
                                reason="beats eager-fp32 beyond noise by min_latency", speedup=2.0)  # fmt: skip
    deploy = DeployRecord(model="mlp", batch_size=2, target="cpu0", status="deployed", winner_key="k-bf16",
                          max_abs_err=1e-3, median_ms=2.1)  # fmt: skip
    with SqliteStore(root) as store:
        sweep_id = store.begin_sweep("handmade", {"name": "handmade"})
        for r in results:
            store.add_result(sweep_id, r)
        store.put_selection(sweep_id, selection)
        store.put_deploy(sweep_id, deploy)
        store.finish_sweep(sweep_id, "done")
    return root, sweep_id


def test_report_prints_the_table_and_writes_every_file(handmade_store):
    root, sweep_id = handmade_store
    proc = cli("report", str(root))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for text in ("eager-fp32", "eager-bf16", "fault-raise", "build_error", "WINNER", "winners", "deployments",
                 "2.00x", "FaultBackend: injected failure"):  # fmt: skip
        assert text in out, text
    folder = root / "reports" / sweep_id
    names = {"report.json", "report.csv", "report.md", "latency.png"}
    assert names <= {p.name for p in folder.iterdir()}

    data = json.loads((folder / "report.json").read_text())
    assert data["sweep"]["id"] == sweep_id and data["sweep"]["status"] == "done"
    rows = {row["key"]: row for row in data["rows"]}
    assert set(rows) == {"k-eager", "k-bf16", "k-boom"}
    assert rows["k-bf16"]["winner"] is True and rows["k-eager"]["winner"] is False
    assert rows["k-bf16"]["speedup"] == pytest.approx(2.0, rel=0.05)
    assert rows["k-boom"]["status"] == R.BUILD_ERROR and rows["k-boom"]["median_ms"] is None
    assert [d["status"] for d in data["deployments"]] == ["deployed"]

    with (folder / "report.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert sorted(r["key"] for r in csv_rows) == ["k-bf16", "k-boom", "k-eager"]

    md = (folder / "report.md").read_text()
    assert "# Sweep handmade" in md and "**WINNER**" in md and "## Deployments" in md
    assert (folder / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in names:
        assert str(folder / name) in out.replace("\n", "")  # the paths are printed


def test_report_of_an_empty_directory_exits_2_and_creates_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = cli("report", str(empty))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "is not an orchestrator store" in out and DB_NAME in out
    assert "Traceback" not in out
    assert list(empty.iterdir()) == []  # no store.sqlite, no reports folder


def test_report_of_a_store_without_sweeps_exits_2(tmp_path):
    root = tmp_path / "store"
    SqliteStore(root).close()
    proc = cli("report", str(root))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "has no sweeps yet" in out and "Traceback" not in out
    assert not (root / "reports").exists()


def test_report_of_an_unknown_sweep_exits_2(handmade_store):
    root, sweep_id = handmade_store
    proc = cli("report", str(root), "--sweep", "no-such-sweep")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "unknown sweep id 'no-such-sweep'" in out and sweep_id in out
    assert "Traceback" not in out


# -- progress -----------------------------------------------------------------------------------


def _job(candidate: str, key: str) -> Job:
    return Job(key=key, model="mlp", batch_size=2, backend="TorchEagerBackend", config={}, candidate=candidate,
               device_class_key=DC, model_fingerprint="f" * 64)  # fmt: skip


def test_progress_plain_mode_prints_a_line_per_start_and_result_with_done_counts():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    progress = Progress(console)
    assert not progress._live_enabled  # not a terminal: plain lines
    ok = _result("k1", "cand-ok", "TorchEagerBackend", EAGER_CONFIG, median=1.5)
    ok.worker = worker_info(worker_id="cpu0-0")
    bad = _result("k2", "cand-bad", "FaultBackend", {}, status=R.CRASH,
                  error="worker cpu1-1 died during build: ActorDiedError: the actor died unexpectedly\n\tclass_name: TuneWorker")
    bad.worker = worker_info(worker_id="cpu1-1")
    with progress:
        progress.total = 4
        progress.reused(1, {"reused": 1})
        progress.worker_ready("cpu0-0", "cpu", "n")
        progress.started("cpu0-0", _job("cand-ok", "k1"))
        progress.started("cpu1-1", _job("cand-bad", "k2"))
        progress.phase("cpu0-0", _job("cand-ok", "k1"), "measure")
        progress.result(ok)
        progress.result(bad)
    lines = [line for line in buf.getvalue().splitlines() if line.strip()]
    starts = [line for line in lines if "building" in line]
    results = [line for line in lines if "/4]" in line]
    assert len(starts) == 2
    assert "cpu0-0: building mlp b2 cand-ok" in starts[0] and "cpu1-1: building mlp b2 cand-bad" in starts[1]
    assert len(results) == 2
    assert "[2/4] mlp b2 cand-ok: ok" in results[0] and "ms" in results[0]
    assert "[3/4] mlp b2 cand-bad: crash" in results[1] and "died during build" in results[1]
    assert any("1 candidates from the store (1 reused)" in line for line in lines)
    assert not any("measure" in line for line in lines)  # phases only update the live table
    assert (progress.done, progress.failed, progress.reused_count) == (3, 1, 1)
    assert progress.current == {"cpu0-0": "idle", "cpu1-1": "idle"}
    # every line carries the elapsed time
    assert all(line.lstrip().startswith("[") and "s]" in line.split()[1] for line in lines)
