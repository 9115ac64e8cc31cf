"""The sweep pipeline's parts on their own: options, and how an earlier sweep's objective is found."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.store import MemoryStore, SweepStatus
from orchestrator.sweep import SweepOptions
from orchestrator.sweep.deciding import EarlierDecisions, objective_of
from orchestrator.sweep.run import run_sweep
from sweep_helpers import EAGER, tiny_spec


def test_the_objective_stored_with_a_sweep_is_used_without_reading_its_spec(tmp_path):
    store = MemoryStore()
    spec = tiny_spec(tmp_path / "s", [EAGER])
    garbage = {"not": "a spec"}  # a foreign or damaged spec: parsing it would fail
    stored = store.begin_sweep("old", garbage, objective="min_latency(p50)")
    unknown = store.begin_sweep("older", garbage)
    parsed = store.begin_sweep("spec only", spec.model_dump(mode="json"))
    infos = {s.id: s for s in store.list_sweeps()}
    assert objective_of(infos[stored]) == "min_latency(p50)"
    assert objective_of(infos[unknown]) is None  # nothing to go on: its decisions are not reused
    assert objective_of(infos[parsed]) == spec.strategy().describe()


def test_an_earlier_decision_is_only_looked_for_in_finished_sweeps_of_the_same_objective(tmp_path):
    store = MemoryStore()
    spec = tiny_spec(tmp_path / "s", [EAGER])
    other = store.begin_sweep("other", {"x": 1}, objective="another objective")
    store.finish_sweep(other, SweepStatus.DONE)
    same = store.begin_sweep("same", {"x": 1}, objective=spec.strategy().describe())
    store.finish_sweep(same, SweepStatus.DONE)
    earlier = EarlierDecisions(store, spec.strategy().describe(), this_sweep="now")
    infos = {s.id: s for s in store.list_sweeps()}
    assert earlier._same_objective(infos[same]) and not earlier._same_objective(infos[other])


def test_run_sweep_takes_its_options_as_one_object_or_as_keywords():
    fields = {f.name for f in dataclasses.fields(SweepOptions)}
    assert {"address", "store_root", "force", "retry_failed", "deploy", "console", "live", "ray_init",
            "write_report", "store"} == fields
    with pytest.raises(TypeError, match="no_such_option"):
        run_sweep(None, SweepOptions(), no_such_option=True)
