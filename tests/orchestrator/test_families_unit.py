"""Waves of reuse: decisions, without Ray: who is held, the top-k by the head's results, and the fallback."""

from __future__ import annotations

from orchestrator import records as R
from orchestrator.records import Group
from orchestrator.planning.families import Waves
from orchestrator.planning.keys import BUILD, Decision, expand
from orchestrator.spec.schema import parse_spec
from sweep_helpers import measurement

CANDS = [{"backend": "TorchEagerBackend"}, {"backend": "TorchEagerBackend", "config": {"precision": "bfloat16", "autocast": True}},
         {"backend": "TorchEagerBackend", "config": {"channels_last": True}}]


def decisions(reuse_second: str | None = "decisions", k: int = 1):
    models = [{"name": f"m{i}", "factory": "aitune.examples:mlp", "kwargs": {"width": 8, "depth": 1, "seed": i},
               "inputs": [{"shape": [8]}], **({"reuse": reuse_second} if i == 1 and reuse_second else {})} for i in range(2)]
    models.append({"name": "other", "factory": "aitune.examples:mlp", "kwargs": {"width": 4, "depth": 1}, "inputs": [{"shape": [4]}]})
    spec = parse_spec({"models": models, "batch_sizes": [1], "candidates": CANDS, "reuse_top_k": k})
    jobs = expand(spec, {"m0": "a" * 64, "m1": "b" * 64, "other": "c" * 64}, {"d" * 64: {"device_type": "cpu"}},
                  structures={"m0": "s" * 64, "m1": "s" * 64, "other": "t" * 64})
    return spec, [Decision(j, BUILD) for j in jobs]


def result(d: Decision, ms: float | None, status: str = R.OK) -> R.ResultRecord:
    r = R.result_for(d.job, status)
    r.measurement = measurement(ms) if ms is not None else None
    return r


def test_only_members_that_ask_for_reuse_wait_for_their_family_head():
    spec, ds = decisions()
    waves = Waves.split(spec, ds)
    assert {d.job.model for d in waves.first} == {"m0", "other"}  # another architecture: its own family
    assert sum(len(h) for h in waves.held.values()) == len(CANDS)
    spec, ds = decisions(reuse_second=None)
    assert len(Waves.split(spec, ds).first) == len(ds)  # reuse: none (the default): everything runs


def test_a_follower_runs_the_heads_fastest_correct_candidates():
    spec, ds = decisions(k=1)
    waves = Waves.split(spec, ds)
    head = [d for d in waves.first if d.job.model == "m0"]
    # the fastest is incorrect: the top-1 is the fastest correct one
    results = [result(head[0], 3.0), result(head[1], 1.0, R.INCORRECT), result(head[2], 2.0)]
    (chosen,) = waves.second(results)
    assert chosen.job.model == "m1" and chosen.job.candidate == head[2].job.candidate
    assert waves.sources[Group("m1", 1, "d" * 64)]["model"] == "m0"


def test_a_follower_none_of_whose_top_k_is_correct_runs_the_rest():
    spec, ds = decisions(k=1)
    waves = Waves.split(spec, ds)
    head = [d for d in waves.first if d.job.model == "m0"]
    (chosen,) = waves.second([result(head[0], 1.0)])
    rest = waves.fallback([result(chosen, None, R.INCORRECT)])
    assert len(rest) == len(CANDS) - 1 and all(d.job.model == "m1" for d in rest)
    assert ("m1", 1, "d" * 64) not in waves.sources  # its winner no longer comes from the head's decisions


def test_a_worker_with_nothing_to_do_runs_a_follower_on_the_heads_top_k_so_far_and_the_final_top_k_decides():
    from orchestrator.planning.families import NARROWED, FamilyGate
    from orchestrator.dispatch.scheduler import JobGate
    from orchestrator.store.in_memory import MemoryStore

    spec, ds = decisions(k=1)
    waves = Waves.split(spec, ds)
    store = MemoryStore()
    sweep = store.begin_sweep("s", {})
    to_run = [d.job for d in waves.first + waves.followers()]
    gate = FamilyGate(JobGate(), waves, store, sweep, to_run, [])
    head = sorted((d for d in waves.first if d.job.model == "m0"), key=lambda d: d.job.candidate)
    deferred = [j for j in to_run if gate.holds(j)]
    assert {j.model for j in deferred} == {"m1"} and len(deferred) == len(CANDS)
    dc = deferred[0].device_class_key
    assert gate.speculate(deferred, {dc}) == []  # no head result yet: nothing to go by

    store.add_result(sweep, result(head[0], 3.0))
    store.add_result(sweep, result(head[2], 2.0))
    assert gate.speculate(deferred, {"another device class"}) == []
    (early,) = gate.speculate(deferred, {dc})  # the top-1 so far: head[2]
    assert early.model == "m1" and early.candidate == head[2].job.candidate
    assert gate.admit(early) and not any(gate.admit(j) for j in deferred if j is not early)
    deferred.remove(early)
    assert gate.speculate(deferred, {dc}) == []  # nothing else in the top-1 so far

    store.add_result(sweep, result(head[1], 1.0))  # the head's last result: the final top-1 is head[1]
    done, runnable = gate.poll(deferred)
    assert [j.candidate for j in runnable] == [head[1].job.candidate]
    assert [r.error_class for r in done] == [NARROWED]
    assert not gate.admit(early)  # not started yet: left out now (poll settles it)

    # one that had started is a result of its follower like any other, and its selection says so
    ran = result(Decision(early, BUILD), 1.5)
    selection = R.SelectionRecord(model="m1", batch_size=1, device_class_key=dc, winner_key=early.key,
                                  winner=early.candidate, reason="fastest")
    waves.annotate([selection], [ran])
    assert selection.decisions_from == {"model": "m0", "candidates": [head[1].job.candidate],
                                        "ahead": [early.candidate]}
