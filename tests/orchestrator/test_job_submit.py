"""scripts/ray_job_submit.sh end to end: a loopback Ray head, `ray job submit`, the head stopped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ray_job_submit.sh"
SPEC = ROOT / "scripts" / "job_spec.yaml"
# The script runs `ray` and `python` from this environment (AITUNE_VENV/bin): the one running the tests.
VENV = Path(sys.executable).parent.parent
RAY_CLI = Path(sys.executable).parent / "ray"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.mark.skipif(not RAY_CLI.is_file(), reason=f"the `ray` CLI is not next to {sys.executable} (install ray[default] in this environment)")
def test_job_submit_runs_the_sweep_and_stops_the_head(tmp_path):
    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(AITUNE_JOB_STORE=str(store), AITUNE_VENV=str(VENV), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(SPEC.relative_to(ROOT))],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=540,
    )
    out = proc.stdout
    log = tmp_path / "ray_job_submit.log"
    log.write_text(out)
    tail = f"(whole output in {log})\n" + out[-12000:]
    assert proc.returncode == 0, f"ray_job_submit.sh exited {proc.returncode}:\n{tail}"

    # The sweep's own summary line, printed by the job's driver and streamed back by `ray job submit`.
    summary = re.search(r"sweep \S+: (\d+) run, (\d+) from store \([^)]*\), (\d+) winner group\(s\), (\d+)/(\d+) deployments verified", out)
    assert summary, f"no sweep summary line in the job output:\n{tail}"
    ran, reused, groups, deployed, deploys = map(int, summary.groups())
    assert (ran, reused) == (2, 0), summary.group(0)
    assert groups == 1 and deploys == 1 and deployed == 1, summary.group(0)
    assert "WINNER" in out and "deployed" in out, tail
    assert re.search(r"Job '[^']+' succeeded", out), tail
    assert (store / "store.sqlite").is_file(), "the job wrote no store where AITUNE_JOB_STORE pointed"

    # The script stopped the head it started (by its pid, not with a machine-wide `ray stop`).
    stopped = re.search(r"stopping the Ray head \(pid (\d+)\)", out)
    assert stopped, tail
    pid = int(stopped.group(1))
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid), f"the Ray head (pid {pid}) still runs after the script exited"


@pytest.mark.skipif(not RAY_CLI.is_file(), reason=f"the `ray` CLI is not next to {sys.executable} (install ray[default] in this environment)")
def test_two_job_submit_sweeps_share_one_store_and_build_each_key_once(tmp_path):
    import sqlite3
    from collections import Counter

    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(AITUNE_JOB_STORE=str(store), AITUNE_VENV=str(VENV), RAY_USAGE_STATS_ENABLED="0", AITUNE_JOBS="2")
    spec = ROOT / "scripts" / "job_spec_shared.yaml"
    proc = subprocess.run(["bash", str(SCRIPT), str(spec.relative_to(ROOT))], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=540)
    out = proc.stdout
    (tmp_path / "ray_job_submit.log").write_text(out)
    assert proc.returncode == 0, out[-12000:]
    assert out.count(": SUCCEEDED") == 2, out[-6000:]
    conn = sqlite3.connect(store / "store.sqlite")
    try:
        built = Counter(k for (k,) in conn.execute("SELECT key FROM results WHERE how = 'built'"))
        sweeps = conn.execute("SELECT id, status FROM sweeps").fetchall()
        per_sweep = Counter(s for (s,) in conn.execute("SELECT sweep_id FROM results"))
    finally:
        conn.close()
    assert len(built) == 4 and set(built.values()) == {1}, built  # every key built once, by one of the two
    assert [s for _, s in sweeps] == ["done", "done"]
    assert sorted(per_sweep.values()) == [4, 4]  # both sweeps have every result
