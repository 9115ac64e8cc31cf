"""A driver killed mid-sweep loses nothing it finished: the same sweep run again reuses it and runs only the rest.

The first run is ``python -m orchestrator tune SPEC`` in its own session, with its own embedded Ray;
it is SIGKILLed (its whole process group) once two results are committed, while a third candidate
still sleeps in its build. The second run is the same spec, in this process.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator import records as R
from orchestrator.store import DB_NAME, SqliteStore
from orchestrator.sweep import run_sweep
from sweep_helpers import EAGER, EAGER_BF16, RAY_INIT, fault, tiny_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
SLEEP_S = 20  # long enough that the driver is surely still running when it is killed
WAIT_FOR_RESULTS_S = 180
REAP_GRACE_S = 30
LEASE_S = 2.0  # the killed driver's heartbeat lease: its sweep reads "interrupted" this long after


def count_results(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return 0
    try:
        return conn.execute("SELECT count(*) FROM results").fetchone()[0]
    except sqlite3.Error:  # the schema is not there yet
        return 0
    finally:
        conn.close()


def stored_rows(db: Path) -> dict[str, str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    try:
        return dict(conn.execute("SELECT key, record_json FROM results WHERE how = 'built'").fetchall())
    finally:
        conn.close()


def session_processes(driver_pid: int) -> dict[int, str]:
    """Processes of the killed driver's session: its session id, or its Ray session directory in their command line.

    ``start_new_session`` made the driver a session leader, so everything it started (Ray's GCS, raylet,
    workers; they may make their own process groups, not their own sessions) has its pid as session id;
    Ray names its session directory ``session_<date>_<driver pid>``.
    """
    found = {}
    marker = f"_{driver_pid}/"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        state, sid = fields[0], int(fields[3])
        if state == "Z":
            continue
        if sid == driver_pid or ("/session_" in cmdline and marker in cmdline):
            found[int(entry)] = cmdline[:160]
    return found


def test_killed_driver_resumes_without_redoing_finished_candidates(tmp_path):
    store_root = tmp_path / "store"
    spec = tiny_spec(store_root, [EAGER, EAGER_BF16, fault("sleep", seconds=SLEEP_S)], name="resume")
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec.model_dump(mode="json")))
    db = store_root / DB_NAME

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray, not ours
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
               RAY_USAGE_STATS_ENABLED="0", AITUNE_LEASE_S=str(LEASE_S))
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "tune", str(spec_path)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT_FOR_RESULTS_S
        while count_results(db) < 2:
            if driver.poll() is not None:
                pytest.fail(f"the driver ended (rc {driver.returncode}) before it was killed:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no 2 results within {WAIT_FOR_RESULTS_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    assert driver.returncode == -signal.SIGKILL  # killed, not finished on its own

    # Nothing the driver started may outlive it: Ray's processes go with their driver.
    deadline = time.monotonic() + REAP_GRACE_S
    left = session_processes(driver.pid)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = session_processes(driver.pid)
    for pid in left:  # clean up what this test started, by pid, before failing on it
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes of the killed driver still run {REAP_GRACE_S} s later: {left}"

    before = stored_rows(db)
    assert len(before) == 2, "the killed driver should have committed exactly the two quick candidates"
    time.sleep(LEASE_S + 0.5)  # its heartbeat has stopped for longer than its lease
    with SqliteStore(store_root) as store:
        (killed,) = store.list_sweeps()
        assert killed.status == "interrupted" and killed.finished_at is None  # it never finished
        finished = {r.key: r for r in store.sweep_results(killed.id)}
        assert set(finished) == set(before)
        assert {r.config.get("precision") for r in finished.values()} == {"float32", "bfloat16"}
        for r in finished.values():
            assert r.status == R.OK and store.checkpoint_problem(r) is None  # committed with its checkpoint

    again = run_sweep(spec, console=Console(file=io.StringIO(), width=200), deploy=False, write_report=False,
                      ray_init=RAY_INIT)  # fmt: skip

    assert again.reused == 2 and again.ran == 1
    reused = {r.key for r in again.results if r.from_store}
    ran = [r for r in again.results if not r.from_store]
    assert reused == set(before)
    (sleeper,) = ran
    assert sleeper.backend == "orchestrator.sim.fault_backends:FaultBackend" and sleeper.config["fault"] == "sleep"
    assert sleeper.status == R.OK
    assert sleeper.key not in before
    assert len(again.selections) == 1 and again.selections[0].winner_key is not None

    after = stored_rows(db)
    assert set(after) == set(before) | {sleeper.key}  # one row per key, no duplicates
    for key in before:  # the finished ones were not redone: their stored records are untouched
        assert after[key] == before[key]
    with SqliteStore(store_root) as store:
        sweeps = store.list_sweeps()
        assert len(sweeps) == 2 and sweeps[-1].id == again.sweep_id and sweeps[-1].status == "done"
        assert sweeps[0].status == "interrupted"
        info = store.sweep_info(again.sweep_id)
        assert (info.candidates, info.from_store) == (3, 2)
        marks = {r.key: r.from_store for r in store.sweep_results(again.sweep_id)}
        assert marks == {**{k: True for k in before}, sleeper.key: False}
        assert store.checkpoint_problem(sleeper) is None
