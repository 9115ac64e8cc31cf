"""The store as trusted memory (issue 7): each problem found by trying the CLI as a new user, on a real
store, real Ray and real processes.

- a result is judged under this sweep's settings: another tolerance re-checks, never reuses blindly
  and never rebuilds; the same spec gives the same winner whatever ran in between;
- a failure is reused only under limits no more generous;
- history is appended: a past sweep's report is the same after ``--force``;
- an edited manifest runs no code; damaged checkpoints are rebuilt, not fatal;
- bad stores and bad input get one clear line.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator import records as R
from orchestrator.dispatch.progress import Progress
from orchestrator.outcome.report import report_store
from orchestrator.store import DB_NAME, SqliteStore
from orchestrator.sweep import run_sweep
from sweep_helpers import EAGER, EAGER_BF16, fault, quiet, result_stub, tiny_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parents[2]
STRICT_BF16 = {"bfloat16": {"atol": 0.0, "rtol": 0.0}}


def sweep(spec, **kw):
    return run_sweep(spec, console=quiet(), write_report=kw.pop("write_report", False), deploy=kw.pop("deploy", False), **kw)


def by_candidate(outcome) -> dict[str, R.ResultRecord]:
    return {r.candidate: r for r in outcome.results}


def cli(*args: str, env_extra: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p), RAY_USAGE_STATS_ENABLED="0")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# -- judged under this sweep's settings ------------------------------------------------------------


def test_another_tolerance_rechecks_without_rebuilding_and_history_does_not_change_the_winner(ray_session, tmp_path):
    store = tmp_path / "store"
    loose = tiny_spec(store, [EAGER, EAGER_BF16])
    first = sweep(loose)
    assert first.how == {"built": 2}
    assert by_candidate(first)[first.selections[0].winner].status == R.OK

    strict = sweep(tiny_spec(store, [EAGER, EAGER_BF16], tolerances=STRICT_BF16))
    # Only bf16's tolerance changed: it is judged again from its stored outputs; fp32 is reused; nothing is built.
    assert strict.how == {"re-checked": 1, "reused": 1}
    bf16 = next(r for r in strict.results if r.config.get("precision") == "bfloat16")
    assert bf16.status == R.INCORRECT and bf16.check.tolerance.atol == 0.0
    assert bf16.source["sweep"] == first.sweep_id
    assert strict.selections[0].winner_key == next(r.key for r in strict.results if r.config.get("precision") == "float32")

    again = sweep(loose)
    assert again.how == {"reused": 2}
    assert {r.key: r.status for r in again.results} == {r.key: r.status for r in first.results}
    (selection,) = again.selections
    assert selection.winner_key == first.selections[0].winner_key
    assert selection.decided_in == first.sweep_id, "the decision comes from the sweep judged the same way"


def test_a_timeout_is_reused_only_under_limits_no_more_generous(ray_session, tmp_path):
    store = tmp_path / "store"
    slow = fault("sleep", seconds=4.0, tag="slow-build")
    tight = tiny_spec(store, [EAGER, slow], budgets={"build_timeout_s": 1.5, "measure_timeout_s": 60},
                      workers={"cpu_slots": 1, "threads_per_slot": 1, "use_gpus": False})
    first = sweep(tight)
    assert by_candidate(first)[next(c for c in by_candidate(first) if "sleep" in c)].status == R.TIMEOUT

    same = sweep(tight)
    timed_out = [r for r in same.results if r.backend.endswith("FaultBackend")]
    assert [(r.status, r.how) for r in timed_out] == [(R.TIMEOUT, R.REUSED)]

    generous = sweep(tiny_spec(store, [EAGER, slow], budgets={"build_timeout_s": 60, "measure_timeout_s": 60},
                               workers={"cpu_slots": 1, "threads_per_slot": 1, "use_gpus": False}))
    rebuilt = [r for r in generous.results if r.backend.endswith("FaultBackend")]
    assert [(r.status, r.how) for r in rebuilt] == [(R.OK, R.BUILT)]


# -- history ------------------------------------------------------------------------------------------


def test_a_past_sweeps_report_is_unchanged_after_force(ray_session, tmp_path):
    store = tmp_path / "store"
    spec = tiny_spec(store, [EAGER, EAGER_BF16])
    first = sweep(spec)
    before = json.loads(report_store(store, first.sweep_id, console=quiet(), out_dir=tmp_path / "r1")["report.json"].read_text())
    forced = sweep(spec, force=True)
    assert forced.how == {"built": 2}
    after = json.loads(report_store(store, first.sweep_id, console=quiet(), out_dir=tmp_path / "r2")["report.json"].read_text())
    assert after["rows"] == before["rows"] and after["results"] == before["results"]
    assert after["selections"] == before["selections"]
    old_times = {r["key"]: r["measurement"]["times_ms"] for r in before["results"]}
    with SqliteStore(store) as s:
        new_times = {r.key: r.measurement.times_ms for r in s.sweep_results(forced.sweep_id)}
        assert len(s.results_for(old_times)[next(iter(old_times))]) == 2  # both builds kept, newest first
    assert new_times != old_times  # the forced sweep measured again, and kept its own numbers


# -- checkpoints whose manifest can't be edited into code -------------------------------------------


def _winner_checkpoint(store_root: Path, outcome) -> Path:
    winner = next(r for r in outcome.results if r.key == outcome.selections[0].winner_key)
    return store_root / winner.checkpoint


def _tamper(folder: Path, how: str, marker: Path) -> None:
    manifest = folder / "manifest.json"
    data = json.loads(manifest.read_text())

    def walk(value):
        if isinstance(value, dict):
            if how == "factory" and "factory" in value:
                value["factory"], value["kwargs"] = "os:system", {"command": f"touch {marker}"}
            if how == "weights" and "weights" in value:
                value["weights"] = str(marker.parent / "outside.pt")
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(data["state"])
    if how == "backend_module":
        data["backend"], data["backend_module"] = "system", "os"
    manifest.write_text(json.dumps(data))


@pytest.mark.parametrize("how", ["factory", "weights", "backend_module"])
def test_an_edited_manifest_runs_no_code_and_the_artifact_is_rebuilt(ray_session, tmp_path, how):
    store = tmp_path / "store"
    marker = tmp_path / "marker"
    spec = tiny_spec(store, [EAGER], deploy={"targets": [{"cpu_slots": 1}]})
    first = sweep(spec)
    folder = _winner_checkpoint(store, first)
    _tamper(folder, how, marker)

    again = sweep(spec, deploy=True)
    (rebuilt,) = again.results
    assert rebuilt.how == R.BUILT and rebuilt.status == R.OK, "a changed manifest counts as no checkpoint at all"
    assert [d.status for d in again.deployments] == ["deployed"]
    assert not marker.exists(), "no code named by the edited manifest may run"
    with SqliteStore(store) as s:
        assert s.checkpoint_problem(rebuilt) is None  # the edited folder was replaced by the rebuilt one


# -- damage repaired, not fatal --------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["symlink", "missing_file", "extra_file"])
def test_a_damaged_checkpoint_is_rebuilt_and_the_sweep_goes_on(ray_session, tmp_path, damage):
    store = tmp_path / "store"
    spec = tiny_spec(store, [EAGER, EAGER_BF16])
    first = sweep(spec)
    victim = next(r for r in first.results if r.config.get("precision") == "bfloat16")
    folder = store / victim.checkpoint
    artifact = next(p for p in (folder / "artifacts").rglob("*") if p.is_file())
    if damage == "symlink":
        (folder / "artifacts" / "link").symlink_to("/etc/passwd")
    elif damage == "missing_file":
        artifact.unlink()
    else:
        (folder / "artifacts" / "extra.py").write_text("print('not part of the checkpoint')\n")

    again = sweep(spec, write_report=True)
    how = {r.key: r.how for r in again.results}
    assert how[victim.key] == R.BUILT and list(how.values()).count(R.REUSED) == 1
    assert again.reports and all(p.exists() for p in again.reports.values())
    with SqliteStore(store) as s:
        assert s.checkpoint_problem(next(r for r in again.results if r.key == victim.key)) is None
    assert not (folder / "artifacts" / "link").exists() and not (folder / "artifacts" / "extra.py").exists()


def test_a_corrupt_store_gets_one_clear_line_and_exit_2(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / DB_NAME).write_bytes(os.urandom(4096))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec(store, [EAGER]).model_dump(mode="json")))
    for args in (("tune", str(spec)), ("report", str(store))):
        proc = cli(*args)
        out = (proc.stdout + proc.stderr).strip()
        assert proc.returncode == 2, out
        assert str(store / DB_NAME) in out and "move it aside" in out and "Traceback" not in out
        assert "Started a local Ray" not in out  # refused before Ray


def test_a_store_that_is_a_file_or_empty_is_refused_before_ray(tmp_path):
    file = tmp_path / "store"
    file.write_text("not a directory")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec(file, [EAGER]).model_dump(mode="json")))
    proc = cli("tune", str(spec))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "is a file, not a directory" in out and "Started a local Ray" not in out
    proc = cli("tune", str(spec), "--store", " ")
    assert proc.returncode == 2 and "--store is empty" in proc.stdout + proc.stderr


def test_a_read_only_store_can_still_be_reported(ray_session, tmp_path):
    store = tmp_path / "store"
    outcome = sweep(tiny_spec(store, [EAGER]))
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(store), str(ro)], capture_output=True).returncode != 0:
        pytest.skip("this machine can't make a read-only bind mount (needs root and mount rights)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True, capture_output=True)
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")  # really read-only
        proc = cli("report", str(ro))
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert outcome.sweep_id in out and "TorchEagerBackend" in out and "not writable" in out
        proc = cli("report", str(ro), "--out", str(tmp_path / "out"))
        assert proc.returncode == 0 and (tmp_path / "out" / "report.json").is_file()
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


# -- lifecycle and bad input ---------------------------------------------------------------------------


def test_an_interrupted_sweep_reports_itself_incomplete(tmp_path):
    store = tmp_path / "store"
    with SqliteStore(store, lease_s=0.1) as s:
        sweep_id = s.begin_sweep("cut-short", {"name": "cut-short"})
        s.add_result(sweep_id, result_stub())
    import time

    time.sleep(0.3)
    console = Console(file=io.StringIO(), width=200)
    paths = report_store(store, console=console)
    text = console.file.getvalue()
    assert "interrupted" in text and "incomplete" in text
    assert "incomplete" in paths["report.md"].read_text()
    assert json.loads(paths["report.json"].read_text())["sweep"]["status"] == "interrupted"


def test_a_factory_that_returns_no_module_is_refused_before_ray(tmp_path):
    store = tmp_path / "store"
    data = tiny_spec(store, [EAGER]).model_dump(mode="json")
    data["models"][0]["factory"] = "builtins:dict"
    data["models"][0]["kwargs"] = {}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(data))
    proc = cli("tune", str(spec))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "models[0].factory" in out and "Started a local Ray" not in out and "Traceback" not in out


def test_deploy_targets_the_cluster_cannot_satisfy_are_refused_before_any_worker(tmp_path):
    store = tmp_path / "store"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec(store, [EAGER], deploy={"targets": [{"cpu_slots": 64}]}).model_dump(mode="json")))
    proc = cli("tune", str(spec))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "deploy.targets" in out and "64 CPU slots" in out and "Traceback" not in out
    with SqliteStore(store) as s:
        assert s.list_sweeps() == []  # nothing was recorded: nothing ran


@pytest.mark.parametrize("live", [False, True])
def test_markup_in_names_and_errors_prints_as_written(live):
    buf = io.StringIO()
    console = Console(file=buf, width=200, force_terminal=live)
    record = result_stub(model="[/bold]", candidate="[red]x[/]", status=R.BUILD_ERROR, error="boom [/] [bold")
    with Progress(console, total=1, live=live) as progress:
        progress.result(record)
    if not live:
        assert "[/bold] b1 [red]x[/]: build_error boom [/] [bold" in buf.getvalue()


def test_tune_exits_3_and_names_what_was_not_done_when_a_deploy_fails(tmp_path):
    store = tmp_path / "store"
    winner_that_fails_to_deploy = fault("raise", phase="deploy", fast=True)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec(store, [EAGER, winner_that_fails_to_deploy],
                                         deploy={"targets": [{"cpu_slots": 1}]}).model_dump(mode="json")))
    proc = cli("tune", str(spec))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert "not done: mlp b2 on" in out and "injected failure" in out
    with SqliteStore(store) as s:
        (info,) = s.list_sweeps()
        assert info.status == "done"  # the sweep itself finished; the exit code says what did not happen
        assert [d.status for d in s.deployments(info.id)] == ["refused"]


# -- concurrent drivers ----------------------------------------------------------------------------------


def _slow_spec(tmp_path, n: int, seconds: float) -> Path:
    store = tmp_path / "store"
    cands = [EAGER] + [fault("sleep", seconds=seconds, tag=f"c{i}") for i in range(n)]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec(store, cands, workers={"cpu_slots": 1, "threads_per_slot": 1, "use_gpus": False})
                               .model_dump(mode="json")))
    return spec


def _driver(spec: Path, log: Path, lease_s: float = 30.0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
               RAY_USAGE_STATS_ENABLED="0", AITUNE_LEASE_S=str(lease_s))
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "tune", str(spec), "--no-deploy"], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _built_per_key(store: Path) -> dict[str, int]:
    from collections import Counter

    conn = sqlite3.connect(store / DB_NAME)
    try:
        return dict(Counter(k for (k,) in conn.execute("SELECT key FROM results WHERE how = 'built'")))
    finally:
        conn.close()


def test_two_drivers_on_one_store_build_each_key_once_and_both_complete(tmp_path):
    import time

    spec = _slow_spec(tmp_path, n=4, seconds=2.0)
    first = _driver(spec, tmp_path / "a.log")
    time.sleep(1.0)
    second = _driver(spec, tmp_path / "b.log")
    for proc, name in ((first, "a"), (second, "b")):
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
    built = _built_per_key(tmp_path / "store")
    assert len(built) == 5 and set(built.values()) == {1}, built
    with SqliteStore(tmp_path / "store") as s:
        sweeps = s.list_sweeps()
        assert [i.status for i in sweeps] == ["done", "done"]
        assert [len(s.sweep_results(i.id)) for i in sweeps] == [5, 5]


def test_a_dead_drivers_claims_expire_and_another_driver_builds_them(tmp_path):
    import signal
    import time

    spec = _slow_spec(tmp_path, n=1, seconds=12.0)  # the dead driver dies holding this claim (killed within 1 s of it)
    store = tmp_path / "store"
    doomed = _driver(spec, tmp_path / "doomed.log", lease_s=3.0)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until it holds the sleeper's claim
        if (store / DB_NAME).exists():
            conn = sqlite3.connect(store / DB_NAME)
            try:
                held = conn.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
            except sqlite3.Error:
                held = 0
            finally:
                conn.close()
            if held and _built_per_key(store):  # eager done, the sleeper claimed and building
                break
        time.sleep(0.3)
    else:
        pytest.fail("the first driver never claimed a key:\n" + (tmp_path / "doomed.log").read_text()[-3000:])
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait(timeout=30)
    survivor = _driver(spec, tmp_path / "survivor.log", lease_s=3.0)
    assert survivor.wait(timeout=300) == 0, (tmp_path / "survivor.log").read_text()[-4000:]
    built = _built_per_key(store)
    assert set(built.values()) == {1} and len(built) == 2, built  # the sleeper built once, by the survivor
    with SqliteStore(store) as s:
        dead, alive = s.list_sweeps()
        assert dead.status == "interrupted" and alive.status == "done"
        assert len(s.sweep_results(alive.id)) == 2
