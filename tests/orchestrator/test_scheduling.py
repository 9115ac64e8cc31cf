"""The driver keeps every worker busy: short candidates flow past a slow one on the other worker."""

from __future__ import annotations

import pytest
from rich.console import Console

from cluster import connect
from orchestrator import records as R
from orchestrator.sweep import run_sweep
from sweep_helpers import EAGER, RAY_INIT, fault, tiny_spec

pytestmark = pytest.mark.timeout(300)


def test_no_worker_waits_for_the_slowest_candidate(tmp_path):
    handle = connect(**RAY_INIT)
    try:
        slow = fault("sleep", seconds=15.0, tag="slow")
        quick = [fault("sleep", seconds=0.5, tag=f"q{i}") for i in range(5)]
        spec = tiny_spec(tmp_path / "store", [slow, EAGER, *quick])
        outcome = run_sweep(spec, console=Console(file=open("/dev/null", "w")), deploy=False, write_report=False)
    finally:
        handle.shutdown()
    assert all(r.status == R.OK for r in outcome.results)
    slow_result = next(r for r in outcome.results if r.config.get("tag") == "slow")
    others = [r for r in outcome.results if r is not slow_result]
    # every other candidate ran on the other worker and finished while the slow one was building
    assert {r.worker["worker_id"] for r in others}.isdisjoint({slow_result.worker["worker_id"]})
    assert all(r.created_at < slow_result.created_at for r in others)
    # and the results arrived in the order they finished, not in the order they were queued
    assert outcome.results[-1].key == slow_result.key
