"""A model whose weights differ between processes is refused: before Ray by the driver (two builds
differ), or job by job by the worker (its build differs from the driver's fingerprint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import records as R
from orchestrator.sweep import run_sweep
from sweep_helpers import EAGER, quiet, tiny_spec

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[2]


def test_tune_refuses_an_unseeded_factory_before_ray_starts(tmp_path):
    spec = {"models": [{"name": "lin", "factory": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 2},
                        "inputs": [{"shape": [4]}]}], "batch_sizes": [1], "store": str(tmp_path / "store")}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    from env_helpers import child_env

    env = child_env(ROOT, drop=("RAY_ADDRESS",))
    done = subprocess.run([sys.executable, "-m", "orchestrator", "tune", str(path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = [ln for ln in done.stdout.splitlines() if ln.strip()]
    assert "models[0]" in line and "'lin'" in line and "not deterministic" in line and "seed it, or load its weights" in line
    assert "sweep " not in done.stdout  # no sweep began: Ray never started


def test_a_factory_that_differs_between_processes_fails_its_jobs_on_the_workers(ray_session, tmp_path):
    models = [{"name": "by-pid", "factory": "orchestrator.sim.fault_backends:process_seeded_mlp", "kwargs": {"width": 16},
               "inputs": [{"name": "x", "shape": [16]}]}]
    spec = tiny_spec(tmp_path / "store", [EAGER], models=models)
    outcome = run_sweep(spec, console=quiet(), deploy=False, write_report=False)
    (result,) = outcome.results
    assert result.status == R.ERROR
    assert "'by-pid'" in result.error and "not deterministic" in result.error and "differ from the driver" in result.error
