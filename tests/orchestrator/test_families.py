"""reuse: decisions — fine-tunes of one base: the first tuned fully, the others only on its top-k;
then plan (runs nothing) and diff (what changed since the last sweep), on real Ray and SQLite."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from orchestrator import records as R
from orchestrator.cli import main
from orchestrator.store import SqliteStore
from orchestrator.sweep import run_sweep
from sweep_helpers import EAGER, EAGER_BF16, fault, tiny_spec

pytestmark = pytest.mark.timeout(600)

CANDIDATES = [EAGER, EAGER_BF16, fault("sleep", seconds=0.01, tag="a"), fault("sleep", seconds=0.01, tag="b")]


def fine_tunes(n: int = 3, first_seed: int = 0) -> list[dict]:
    return [{"name": f"ft{i}", "factory": "aitune.examples:mlp", "kwargs": {"width": 16, "depth": 2, "seed": first_seed + i},
             "inputs": [{"name": "x", "shape": [16]}]} for i in range(n)]


@pytest.fixture(scope="module")
def family_sweep(tmp_path_factory, ray_session):
    store = tmp_path_factory.mktemp("families") / "store"
    spec = tiny_spec(store, CANDIDATES, models=fine_tunes(), reuse="decisions", reuse_top_k=2)
    console = Console(file=io.StringIO(), width=250)
    outcome = run_sweep(spec, console=console, deploy=False)
    return spec, outcome, console.file.getvalue()


def test_the_first_fine_tune_is_tuned_fully_and_the_others_on_its_top_k(family_sweep):
    _, outcome, _ = family_sweep
    by_model: dict[str, list] = {}
    for r in outcome.results:
        by_model.setdefault(r.model, []).append(r)
    assert len(by_model["ft0"]) == len(CANDIDATES)
    head_top = [r.candidate for r in sorted((r for r in by_model["ft0"] if r.eligible), key=lambda r: r.median_ms)][:2]
    selections = {s.model: s for s in outcome.selections}
    for follower in ("ft1", "ft2"):
        tried = by_model[follower]
        # and what a worker ran ahead of the head's end, when it was among the head's top so far
        ahead = selections[follower].decisions_from.get("ahead", [])
        assert sorted(r.candidate for r in tried) == sorted(head_top + ahead)
        assert len(ahead) < len(CANDIDATES) - 2
        # built with its own weights and judged against its own reference
        assert all(r.how == R.BUILT and r.status == R.OK for r in tried)
        assert {r.model_fingerprint for r in tried}.isdisjoint({r.model_fingerprint for r in by_model["ft0"]})
        assert {r.key for r in tried}.isdisjoint({r.key for r in by_model["ft0"]})


def test_the_report_says_which_decisions_were_reused_and_from_where(family_sweep):
    _, outcome, printed = family_sweep
    selections = {s.model: s for s in outcome.selections}
    assert selections["ft0"].decisions_from is None
    for follower in ("ft1", "ft2"):
        source = selections[follower].decisions_from
        assert source["model"] == "ft0" and len(source["candidates"]) == 2
        assert selections[follower].winner in source["candidates"] + source.get("ahead", [])
    for follower in ("ft1", "ft2"):  # one unwrapped line each, whatever the width of the reasons
        source = selections[follower].decisions_from
        said = f"{follower} (batch 2): decisions reused from ft0 (tried its top {', '.join(source['candidates'])}"
        if source.get("ahead"):
            said += f"; also {', '.join(source['ahead'])}, run ahead of the head's end"
        assert said + ")" in printed
    assert "decisions reused from ft0" in outcome.reports["report.md"].read_text()
    stored = json.loads(outcome.reports["report.json"].read_text())["selections"]
    assert {s["model"]: (s["decisions_from"] or {}).get("model") for s in stored} == {"ft0": None, "ft1": "ft0", "ft2": "ft0"}


def _spec_file(tmp_path, spec, **changes):
    data = spec.model_dump(mode="json", exclude_none=True)
    data.update(changes)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    return path


def test_plan_runs_nothing_and_counts_what_the_store_would_reuse(family_sweep, tmp_path, capsys):
    spec, _, _ = family_sweep
    before = SqliteStore(spec.store, readonly=True)
    sweeps_before = len(before.list_sweeps())
    before.close()
    path = _spec_file(tmp_path, spec, models=fine_tunes(4))  # one fine-tune more than was swept
    assert main(["plan", str(path), "--out", str(tmp_path / "plan")]) == 0
    printed = capsys.readouterr().out
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["source"] == "store"
    # the three swept fine-tunes: reused as they are; the new one: its family's top 2, new
    assert plan["counts"]["ft3"][next(iter(plan["counts"]["ft3"]))]["new"] == 2
    assert plan["totals"]["reuse"] == len(CANDIDATES) + 2 + 2
    assert plan["narrowed"] == 3 * (len(CANDIDATES) - 2)  # ft1, ft2, ft3 each skip the rest
    assert plan["estimate_s"] > 0
    assert "reused" in printed and "estimate" in printed
    assert "| ft3 |" in (tmp_path / "plan" / "plan.md").read_text()
    with SqliteStore(spec.store, readonly=True) as after:
        assert len(after.list_sweeps()) == sweeps_before  # nothing ran


def test_plan_without_a_store_plans_for_this_machines_cpu(tmp_path, capsys):
    spec = tiny_spec(tmp_path / "nowhere", CANDIDATES)
    path = _spec_file(tmp_path, spec)
    assert main(["plan", str(path), "--out", str(tmp_path / "plan")]) == 0
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert plan["source"] == "local" and plan["totals"] == {"jobs": len(CANDIDATES), "new": len(CANDIDATES)}
    assert plan["worker_jobs"] == plan["unestimated"] == len(CANDIDATES)
    # no history to estimate from: it says so rather than print 0 s
    assert f"estimate: none: the store has no phase history for the backends of the {len(CANDIDATES)}" in capsys.readouterr().out
    assert not (tmp_path / "nowhere").exists()  # a plan never creates a store


def test_the_diff_names_new_weights_and_a_new_candidate(family_sweep, ray_session):
    spec, first, _ = family_sweep
    models = fine_tunes()
    models[1]["kwargs"]["seed"] = 11  # ft1 re-fine-tuned
    extra = fault("sleep", seconds=0.01, tag="c")
    again = tiny_spec(spec.store, [*CANDIDATES, extra], models=models)
    console = Console(file=io.StringIO(), width=250)
    outcome = run_sweep(again, console=console, deploy=False)
    assert outcome.diff is not None and outcome.diff.previous_sweep == first.sweep_id
    groups = {g.model: g for g in outcome.diff.groups}
    assert "new weights" in groups["ft1"].why
    assert "new weights" not in groups["ft0"].why
    assert any(w.startswith("a new candidate") for w in groups["ft0"].why)
    for g in groups.values():
        assert g.ratio is not None and g.ratio > 0
    printed = console.file.getvalue()
    assert f"diff against sweep {first.sweep_id}" in printed
    report = json.loads(outcome.reports["report.json"].read_text())
    assert report["diff"]["previous_sweep"] == first.sweep_id
    assert "Changes since sweep" in outcome.reports["report.md"].read_text()
