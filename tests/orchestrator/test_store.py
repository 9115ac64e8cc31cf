"""The result stores: append-only history, claims and leases, sweep lifecycle, checked files.

Behaviour shared by the interface runs on both stores (``SqliteStore`` and ``MemoryStore``);
what only the embedded store can do (files on disk, several processes, schema) runs on SQLite.
No test here starts Ray.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from aitune import attach_factory, examples
from aitune.check import CheckResult, Tolerance
from aitune.checkpoint import save_checkpoint, verify_checkpoint
from aitune.measure import Measurement
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend.eager import TorchEagerBackend
from orchestrator.records import (
    BUILD_ERROR, BUILT, INCORRECT, OK, RECHECKED, REMEASURED, REUSED, DeployRecord, ResultRecord, SelectionRecord,
    WorkerInfo,
)
from orchestrator.store import DB_NAME, SCHEMA_VERSION, DamagedCheckpoint, MemoryStore, SqliteStore, StoreError
from orchestrator.store.base import DONE, INTERRUPTED, RUNNING
from orchestrator.transfer import pack_dir

ROOT = Path(__file__).resolve().parents[2]


# -- records ----------------------------------------------------------------------------------------------

def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _measurement(median: float) -> Measurement:
    times = [median - 0.25, median, median + 0.25]
    return Measurement(times_ms=times, median_ms=median, mean_ms=median, p90_ms=median + 0.2, p99_ms=median + 0.24,
                       std_ms=0.25, count=3, warmup_count=1, timer="perf_counter_ns", threads=1,
                       ci_low_ms=median - 0.25, ci_high_ms=median + 0.25, stop_reason="max_iters")


def _check(ok: bool = True, err: float = 1e-7) -> CheckResult:
    return CheckResult(ok=ok, max_abs_err=err, max_rel_err=err * 10, worst_path=None if ok else "out",
                       worst_index=None if ok else [0, 1], reason=None if ok else "out: too far",
                       tolerance=Tolerance(atol=1e-5, rtol=1e-5))


WORKER = WorkerInfo(worker_id="w0", node_id="n0", hostname="host", pid=123, device="cpu",
                    device_class={"device_name": "cpu"}, device_class_key=_key("cpu"), threads=1)


def _record(name: str = "eager", model: str = "mlp", batch: int = 1, status: str = OK, median: float = 1.5,
            **kw) -> ResultRecord:
    fields = dict(
        key=_key(f"{model}/{batch}/{name}"), model=model, batch_size=batch, backend="TorchEagerBackend",
        config={"precision": "float32"}, candidate=name, status=status, device_class_key=_key("cpu"),
        eval_key=_key(f"eval/{name}"), evaluation={"atol": 1e-5}, phases={"build": 0.25},
        measurement=_measurement(median) if status == OK else None, check=_check() if status == OK else None,
        worker=WORKER, reference_key=_key(f"ref/{model}/{batch}"), created_at=1000.0,
    )
    fields.update(kw)
    return ResultRecord(**fields)


def _rechecked(prior: ResultRecord, ok: bool = False) -> ResultRecord:
    """What the driver makes of a stored result it judges again (as orchestrator.planning.keys.recheck does)."""
    record = ResultRecord.from_dict(prior.to_dict())
    record.result_id = None
    record.how, record.source = RECHECKED, {"sweep": prior.sweep_id, "result": prior.result_id}
    record.eval_key, record.check = _key("stricter"), _check(ok=ok, err=1e-3)
    record.status = OK if ok else INCORRECT
    return record


def _files(packed: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _raised(call) -> str | None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test compares what each store raises
        return type(exc).__name__
    return None


# -- real checkpoints -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[tuple[Path, bytes]]:
    """Two real (different) eager checkpoints of a tiny MLP: their folders and their packed bytes."""
    out = []
    for seed in (0, 1):
        base = tmp_path_factory.mktemp(f"ckpt{seed}")
        module = attach_factory(examples.mlp(8, 1, seed=seed), "aitune.examples:mlp", {"width": 8, "depth": 1, "seed": seed})
        sample = Sample.of(torch.randn(2, 8, generator=torch.Generator().manual_seed(seed)))
        backend = TorchEagerBackend().build(module, GraphSpec.from_sample(sample), [sample], "cpu", base / "build")
        save_checkpoint(backend, base / "ckpt")
        out.append((base / "ckpt", pack_dir(base / "ckpt")))
    assert _files(out[0][1]) != _files(out[1][1])
    return out


@pytest.fixture
def packed(checkpoints) -> bytes:
    return checkpoints[0][1]


# -- stores -----------------------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "memory"])
def make_store(request, tmp_path):
    """Builds the parametrized kind of store (with an optional lease); closes them all afterwards."""
    made = []

    def make(lease_s: float | None = None):
        if request.param == "sqlite":
            store = SqliteStore(tmp_path / "store", lease_s=lease_s)
        else:
            store = MemoryStore() if lease_s is None else MemoryStore(lease_s=lease_s)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(make_store):
    return make_store()


@pytest.fixture
def sqlite_store(tmp_path):
    with SqliteStore(tmp_path / "store") as s:
        yield s


# == history: appended, never rewritten ===================================================================

def test_a_result_round_trips_with_its_typed_fields(store):
    sweep = store.begin_sweep("s", {"models": ["mlp"]})
    record = _record()
    stored = store.add_result(sweep, record)

    assert isinstance(stored.measurement, Measurement) and isinstance(stored.check, CheckResult)
    assert isinstance(stored.worker, WorkerInfo)
    assert stored.result_id is not None and stored.sweep_id == sweep
    (got,) = store.sweep_results(sweep)
    assert got == stored
    expected = {**record.to_dict(), "result_id": stored.result_id, "sweep_id": sweep}
    assert got.to_dict() == expected
    assert got.measurement == _measurement(1.5) and got.check == _check() and got.worker == WORKER


def test_add_result_leaves_the_callers_record_unchanged(store, packed):
    sweep = store.begin_sweep("s", {})
    record = _record()
    before = record.to_dict()
    stored = store.add_result(sweep, record, packed, outputs=b"outputs")
    assert record.to_dict() == before
    assert record.checkpoint is None and stored.checkpoint is not None and stored.outputs is not None


def test_changing_a_record_the_store_returned_does_not_change_the_store(store):
    sweep = store.begin_sweep("s", {})
    record = _record()
    returned = store.add_result(sweep, record)
    snapshot = json.loads(json.dumps(returned.to_dict()))
    for got in (returned, store.sweep_results(sweep)[0], store.results_for([returned.key])[returned.key][0]):
        got.status, got.measurement.median_ms, got.config["precision"] = BUILD_ERROR, 99.0, "int8"
        assert store.sweep_results(sweep)[0].to_dict() == snapshot
        assert store.results_for([returned.key])[returned.key][0].to_dict() == snapshot
    assert record.config == {"precision": "float32"} and record.status == OK  # the caller's record neither


def test_two_sweeps_recording_the_same_key_keep_both_results(store):
    first = store.begin_sweep("first", {})
    a = store.add_result(first, _record(median=1.5))
    second = store.begin_sweep("second", {})
    b = store.add_result(second, _record(median=3.0))

    assert a.key == b.key and a.result_id != b.result_id
    assert [r.median_ms for r in store.results_for([a.key])[a.key]] == [3.0, 1.5]
    assert [r.median_ms for r in store.sweep_results(first)] == [1.5]
    assert [r.median_ms for r in store.sweep_results(second)] == [3.0]


def test_an_earlier_sweeps_results_read_exactly_as_recorded_after_later_sweeps(store, packed):
    first = store.begin_sweep("first", {})
    store.add_result(first, _record("eager", median=1.5), packed)
    store.add_result(first, _record("aot", status=BUILD_ERROR, error="boom", error_class="RuntimeError"))
    snapshot = [r.to_dict() for r in store.sweep_results(first)]
    store.finish_sweep(first, "done")

    later = store.begin_sweep("later", {})
    prior = store.results_for([_record("eager").key])[_record("eager").key][0]
    store.add_result(later, _record("eager", median=9.75), packed)  # rebuilt: new numbers
    store.add_result(store.begin_sweep("rechecks", {}), _rechecked(prior))
    store.add_reuse(store.begin_sweep("reuses", {}), prior)

    again = store.sweep_results(first)
    assert [r.to_dict() for r in again] == snapshot
    assert [r.median_ms for r in again] == [None, 1.5]  # "aot" sorts before "eager"
    assert [r.how for r in again] == [BUILT, BUILT]


def test_a_reuse_resolves_to_its_source_with_how_reused(store, packed):
    first = store.begin_sweep("first", {})
    source = store.add_result(first, _record(median=2.5), packed)
    second = store.begin_sweep("second", {})
    returned = store.add_reuse(second, source)
    (listed,) = store.sweep_results(second)

    for reused in (returned, listed):
        assert reused.how == REUSED
        assert reused.source == {"sweep": first, "result": source.result_id}
        assert reused.sweep_id == second and reused.result_id not in (None, source.result_id)
        assert reused.measurement == source.measurement and reused.median_ms == 2.5
        assert reused.checkpoint == source.checkpoint and reused.manifest_sha256 == source.manifest_sha256
    assert returned.result_id == listed.result_id
    info = store.sweep_info(second)
    assert (info.candidates, info.from_store) == (1, 1)


def test_reusing_a_reused_record_points_at_the_original_result(store):
    first = store.begin_sweep("first", {})
    original = store.add_result(first, _record(median=4.0))
    second = store.begin_sweep("second", {})
    store.add_reuse(second, original)
    (reused,) = store.sweep_results(second)
    third = store.begin_sweep("third", {})
    again = store.add_reuse(third, reused)

    (listed,) = store.sweep_results(third)
    for record in (again, listed):
        assert record.how == REUSED and record.median_ms == 4.0
        assert record.source == {"sweep": first, "result": original.result_id}
    assert [r.result_id for r in store.results_for([original.key])[original.key]] == [original.result_id]


def test_results_for_returns_own_records_newest_first_and_never_reuse_rows(store):
    key = _record().key
    first = store.begin_sweep("first", {})
    built = store.add_result(first, _record(median=1.0))
    second = store.begin_sweep("second", {})
    store.add_reuse(second, built)
    third = store.begin_sweep("third", {})
    rechecked = store.add_result(third, _rechecked(built, ok=True))
    fourth = store.begin_sweep("fourth", {})
    rebuilt = store.add_result(fourth, _record(median=0.5))
    other = store.add_result(fourth, _record("other"))

    found = store.results_for([key, other.key, _key("missing"), key])
    assert set(found) == {key, other.key}
    assert [(r.result_id, r.how, r.sweep_id) for r in found[key]] == [
        (rebuilt.result_id, BUILT, fourth), (rechecked.result_id, RECHECKED, third), (built.result_id, BUILT, first),
    ]
    assert [r.result_id for r in found[other.key]] == [other.result_id]
    assert store.results_for([]) == {}


def test_a_rechecked_result_keeps_its_sources_checkpoint(store, packed):
    first = store.begin_sweep("first", {})
    source = store.add_result(first, _record(), packed, outputs=b"the outputs")
    second = store.begin_sweep("second", {})
    stored = store.add_result(second, _rechecked(source))

    assert stored.how == RECHECKED and stored.status == INCORRECT
    assert stored.source == {"sweep": first, "result": source.result_id}
    assert (stored.checkpoint, stored.manifest_sha256) == (source.checkpoint, source.manifest_sha256)
    assert stored.manifest_sha256 is not None
    assert store.checkpoint_problem(stored) is None
    assert _files(store.checkpoint_bytes(stored)) == _files(packed)
    (listed,) = store.sweep_results(second)
    assert (listed.checkpoint, listed.manifest_sha256) == (source.checkpoint, source.manifest_sha256)
    assert listed.check.ok is False and listed.measurement == source.measurement


def test_a_rechecked_result_takes_its_sources_checkpoint_even_if_the_record_lacks_it(store, packed):
    first = store.begin_sweep("first", {})
    source = store.add_result(first, _record(), packed)
    second = store.begin_sweep("second", {})
    remeasured = _rechecked(source, ok=True)
    remeasured.how, remeasured.checkpoint, remeasured.manifest_sha256 = REMEASURED, None, None
    stored = store.add_result(second, remeasured)

    assert (stored.checkpoint, stored.manifest_sha256) == (source.checkpoint, source.manifest_sha256)
    assert store.checkpoint_problem(store.sweep_results(second)[0]) is None


def test_a_built_result_without_checkpoint_bytes_has_no_checkpoint(store, packed):
    first = store.begin_sweep("first", {})
    with_ckpt = store.add_result(first, _record(), packed)
    # A built record that merely claims a checkpoint (copied fields, no bytes) does not get one.
    claims = _record("other", checkpoint=with_ckpt.checkpoint, manifest_sha256=with_ckpt.manifest_sha256)
    stored = store.add_result(first, claims)
    assert stored.checkpoint is None and stored.manifest_sha256 is None
    assert store.checkpoint_problem(stored) == "the result has no stored checkpoint"
    with pytest.raises(DamagedCheckpoint, match="no stored checkpoint"):
        store.checkpoint_bytes(stored)


def test_a_sweep_records_one_result_per_artifact_key(store):
    sweep = store.begin_sweep("s", {})
    built = store.add_result(sweep, _record())
    with pytest.raises(ValueError, match="already recorded"):
        store.add_result(sweep, _record(median=2.0))
    with pytest.raises(ValueError, match="already recorded"):
        store.add_reuse(sweep, built)
    assert [r.median_ms for r in store.sweep_results(sweep)] == [1.5]
    assert len(store.results_for([built.key])[built.key]) == 1


def test_reuse_goes_through_add_reuse_and_needs_a_stored_source(store):
    sweep = store.begin_sweep("s", {})
    with pytest.raises(ValueError, match="add_reuse"):
        store.add_result(sweep, _record(how=REUSED, source={"sweep": sweep, "result": 1}))
    with pytest.raises(KeyError, match="no stored result 999"):
        store.add_reuse(sweep, _record(result_id=999))
    assert store.sweep_results(sweep) == []


def test_sweep_results_are_ordered_by_model_batch_candidate(store):
    sweep = store.begin_sweep("s", {})
    for model, batch, name in [("resnet", 8, "b"), ("mlp", 8, "a"), ("resnet", 1, "z"), ("resnet", 8, "a")]:
        store.add_result(sweep, _record(name, model=model, batch=batch))
    order = [(r.model, r.batch_size, r.candidate) for r in store.sweep_results(sweep)]
    assert order == [("mlp", 8, "a"), ("resnet", 1, "z"), ("resnet", 8, "a"), ("resnet", 8, "b")]


def test_a_build_error_is_a_result_too(store):
    sweep = store.begin_sweep("s", {})
    failed = _record("aot", status=BUILD_ERROR, error="Traceback...\nRuntimeError: boom", error_class="RuntimeError")
    store.add_result(sweep, failed)
    (got,) = store.results_for([failed.key])[failed.key]
    assert got.status == BUILD_ERROR and got.error.endswith("boom") and got.error_class == "RuntimeError"
    assert got.measurement is None and not got.eligible


def test_bad_keys_and_names_are_refused(store):
    sweep = store.begin_sweep("s", {})
    for bad in ("../escape", "", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="result key"):
            store.add_result(sweep, _record(key=bad))
        with pytest.raises(ValueError, match="reference key"):
            store.put_reference(bad, b"x")
    with pytest.raises(ValueError, match="sweep name"):
        store.begin_sweep("", {})
    assert store.sweep_results(sweep) == []


def test_an_archive_without_a_manifest_is_refused_and_nothing_is_recorded(store, tmp_path):
    sweep = store.begin_sweep("s", {})
    folder = tmp_path / "no_manifest"
    (folder / "artifacts").mkdir(parents=True)
    (folder / "artifacts" / "weights.pt").write_bytes(b"w")
    for bad in (b"not a tar at all" * 64, pack_dir(folder)):
        with pytest.raises(ValueError):
            store.add_result(sweep, _record(), bad)
    assert store.sweep_results(sweep) == []
    assert store.results_for([_record().key]) == {}


def test_results_added_from_many_threads_are_all_kept(store, packed):
    sweep = store.begin_sweep("s", {})
    records = [_record(f"c{i}") for i in range(12)]
    errors = []

    def add(record):
        try:
            store.add_result(sweep, record, packed)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(r,)) for r in records]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stored = store.sweep_results(sweep)
    assert sorted(r.candidate for r in stored) == sorted(r.candidate for r in records)
    assert all(store.checkpoint_problem(r) is None for r in stored)


# == selections, deployments, references =================================================================

def test_selections_and_deployments_round_trip(store):
    sweep = store.begin_sweep("s", {})
    winner = _record("compiled")
    selection = SelectionRecord(model="mlp", batch_size=1, device_class_key=_key("cpu"), winner_key=winner.key,
                                winner="compiled", reason="fastest beyond noise", ties=["eager"], speedup=1.8)
    other = SelectionRecord(model="cnn", batch_size=4, device_class_key=_key("cpu"), winner_key=None, winner=None,
                            reason="nothing passed")
    store.put_selection(sweep, selection)
    store.put_selection(sweep, other)
    deploys = [DeployRecord(model="mlp", batch_size=1, target=f"cpu-slot-{i}", status="deployed",
                            winner_key=winner.key, max_abs_err=1e-6, median_ms=1.2) for i in range(3)]
    for d in deploys:
        store.put_deploy(sweep, d)

    assert store.selections(sweep) == [other, selection]  # ordered by model, batch, device class
    assert store.deployments(sweep) == deploys
    empty = store.begin_sweep("empty", {})
    assert store.selections(empty) == [] and store.deployments(empty) == []


def test_a_later_selection_for_the_same_group_replaces_the_earlier(store):
    sweep = store.begin_sweep("s", {})
    first = SelectionRecord(model="mlp", batch_size=1, device_class_key=_key("cpu"), winner_key="a", winner="a",
                            reason="fastest")
    store.put_selection(sweep, first)
    replaced = SelectionRecord(**{**first.to_dict(), "winner_key": "b", "winner": "b", "reason": "remeasured",
                                  "remeasured": True})
    store.put_selection(sweep, replaced)
    assert store.selections(sweep) == [replaced]


def test_references_are_stored_and_replaced(store):
    assert store.reference_bytes("mlp-1") is None and not store.has_reference("mlp-1")
    store.put_reference("mlp-1", b"tensor bytes")
    assert store.reference_bytes("mlp-1") == b"tensor bytes" and store.has_reference("mlp-1")
    store.put_reference("mlp-1", b"newer")
    assert store.reference_bytes("mlp-1") == b"newer"
    assert store.reference_bytes("mlp-2") is None


def test_outputs_are_stored_with_the_result(store):
    sweep = store.begin_sweep("s", {})
    with_outputs = store.add_result(sweep, _record(), outputs=b"candidate outputs")
    without = store.add_result(sweep, _record("other"))
    assert store.outputs_bytes(with_outputs) == b"candidate outputs"
    assert [store.outputs_bytes(r) for r in store.sweep_results(sweep)] == [b"candidate outputs", None]
    assert store.outputs_bytes(without) is None


# == claims ==============================================================================================

def test_a_claim_goes_to_the_first_owner_and_names_the_holder_to_others(store):
    assert store.claim("k1", "sweep-a") is None
    assert store.claim("k1", "sweep-b") == "sweep-a"
    assert store.claim("k1", "sweep-a") is None  # the holder may claim again
    assert store.claim("k2", "sweep-b") is None  # other keys are free
    assert store.claim("k2", "sweep-a") == "sweep-b"


def test_release_frees_only_the_owners_claim(store):
    store.claim("k", "sweep-a")
    store.release("k", "sweep-b")
    assert store.claim("k", "sweep-b") == "sweep-a"
    store.release("k", "sweep-a")
    assert store.claim("k", "sweep-b") is None


def test_an_expired_claim_goes_to_the_next_owner(make_store):
    store = make_store(lease_s=0.2)
    assert store.claim("k", "sweep-a") is None
    assert store.claim("k", "sweep-b") == "sweep-a"
    time.sleep(0.35)
    assert store.claim("k", "sweep-b") is None
    assert store.claim("k", "sweep-a") == "sweep-b"


def test_heartbeat_renews_the_sweeps_claims(make_store):
    store = make_store(lease_s=0.8)
    sweep = store.begin_sweep("s", {})
    assert store.claim("kept", sweep) is None
    assert store.claim("lapsed", "a-driver-that-stopped") is None
    time.sleep(0.5)
    store.heartbeat(sweep)
    time.sleep(0.5)  # past the first lease (1.0 > 0.8), within the renewed one (0.5 < 0.8)
    assert store.claim("kept", "other") == sweep
    assert store.claim("lapsed", "other") is None


def test_finish_sweep_releases_its_claims(store):
    sweep = store.begin_sweep("s", {})
    other = store.begin_sweep("other", {})
    for key in ("k1", "k2"):
        assert store.claim(key, sweep) is None
    assert store.claim("k3", other) is None
    store.finish_sweep(sweep, DONE)
    assert store.claim("k1", "next") is None and store.claim("k2", "next") is None
    assert store.claim("k3", "next") == other


def test_add_result_by_the_owner_releases_its_claim(store):
    owner = store.begin_sweep("owner", {})
    bystander = store.begin_sweep("bystander", {})
    record, other = _record("a"), _record("b")
    assert store.claim(record.key, owner) is None
    assert store.claim(other.key, owner) is None
    store.add_result(owner, record)
    store.add_result(bystander, other)  # another sweep's result does not free the owner's claim
    assert store.claim(record.key, "next") is None
    assert store.claim(other.key, "next") == owner


# == sweep lifecycle =====================================================================================

def test_sweep_lifecycle_and_listing(store):
    first = store.begin_sweep("first", {"a": 1})
    second = store.begin_sweep("second", {"b": [1, 2]})
    store.finish_sweep(first, DONE)
    listed = store.list_sweeps()
    assert [s.id for s in listed] == [first, second]
    assert listed[0].status == DONE and listed[0].complete and listed[0].finished_at is not None
    assert listed[1].status == RUNNING and not listed[1].complete and listed[1].spec == {"b": [1, 2]}
    assert listed[1].finished_at is None and listed[0].started_at <= listed[1].started_at
    assert store.latest_sweep_id() == second
    built = store.add_result(second, _record())
    store.add_reuse(second, store.add_result(first, _record("other")))
    info = store.sweep_info(second)
    assert (info.name, info.candidates, info.from_store) == ("second", 2, 1)
    assert info.to_dict()["complete"] is False and built.sweep_id == second


def test_a_sweep_keeps_its_objective(store):
    chosen = store.begin_sweep("chosen", {"a": 1}, objective="max_throughput")
    unsaid = store.begin_sweep("unsaid", {})
    store.finish_sweep(chosen, DONE)
    assert store.sweep_info(chosen).objective == "max_throughput"
    assert store.sweep_info(unsaid).objective is None
    assert [(s.id, s.objective) for s in store.list_sweeps()] == [(chosen, "max_throughput"), (unsaid, None)]
    assert store.sweep_info(chosen).to_dict()["objective"] == "max_throughput"
    for bad in ("", 5):
        with pytest.raises(ValueError, match="sweep objective"):
            store.begin_sweep("bad", {}, objective=bad)
    assert [s.id for s in store.list_sweeps()] == [chosen, unsaid]


def test_sweep_statuses_are_bare_words_wherever_they_are_written(store):
    done, running = store.begin_sweep("done", {}), store.begin_sweep("running", {})
    store.finish_sweep(done, DONE)
    for info, word in ((store.sweep_info(done), "done"), (store.sweep_info(running), "running")):
        assert info.status == word and str(info.status) == word and f"{info.status}" == word
        assert json.dumps(info.to_dict()["status"]) == f'"{word}"' and type(info.to_dict()["status"]) is str


def test_an_empty_store_has_no_sweeps(store):
    assert store.latest_sweep_id() is None
    assert store.list_sweeps() == []


def test_a_sweep_without_heartbeat_reads_interrupted_and_a_heartbeating_one_running(make_store):
    store = make_store(lease_s=0.8)
    silent = store.begin_sweep("silent", {})
    beating = store.begin_sweep("beating", {})
    done = store.begin_sweep("done", {})
    failed = store.begin_sweep("failed", {})
    store.finish_sweep(done, DONE)
    store.finish_sweep(failed, "failed: RuntimeError")
    assert store.sweep_info(silent).status == RUNNING  # still within its lease
    time.sleep(0.5)
    store.heartbeat(beating)
    time.sleep(0.5)

    expected = {silent: INTERRUPTED, beating: RUNNING, done: DONE, failed: "failed: RuntimeError"}
    assert {s: store.sweep_info(s).status for s in expected} == expected
    assert {s.id: s.status for s in store.list_sweeps()} == expected
    assert not store.sweep_info(silent).complete


def test_unknown_sweep_ids_raise_key_error_listing_the_known_ones(store):
    known = store.begin_sweep("s", {})
    source = store.add_result(known, _record())
    selection = SelectionRecord(model="m", batch_size=1, device_class_key="d", winner_key=None, winner=None, reason="r")
    deploy = DeployRecord(model="m", batch_size=1, target="t", status="refused", winner_key=None)
    calls = {
        "sweep_info": lambda: store.sweep_info("nope"),
        "sweep_results": lambda: store.sweep_results("nope"),
        "add_result": lambda: store.add_result("nope", _record("x")),
        "add_reuse": lambda: store.add_reuse("nope", source),
        "finish_sweep": lambda: store.finish_sweep("nope", DONE),
        "selections": lambda: store.selections("nope"),
        "deployments": lambda: store.deployments("nope"),
        "put_selection": lambda: store.put_selection("nope", selection),
        "put_deploy": lambda: store.put_deploy("nope", deploy),
    }
    refused = {}
    for name, call in calls.items():
        try:
            call()
        except KeyError as exc:
            refused[name] = bool(re.search(f"unknown sweep id 'nope'.*{known}", str(exc)))
    assert refused == dict.fromkeys(calls, True)
    assert [r.result_id for r in store.sweep_results(known)] == [source.result_id]
    assert [s.id for s in store.list_sweeps()] == [known]


# == both stores answer alike ============================================================================

def _scripted(store, checkpoints) -> dict:
    """One sequence of calls covering every kind of row; returns what the store answered, without ids or paths."""
    ck0, ck1 = checkpoints[0][1], checkpoints[1][1]
    said = []
    s1 = store.begin_sweep("first", {"models": ["mlp", "cnn"]})
    a = store.add_result(s1, _record("a"), ck0, outputs=b"outputs of a")
    store.add_result(s1, _record("b", status=BUILD_ERROR, error="boom", error_class="RuntimeError"))
    c = store.add_result(s1, _record("c", model="cnn", batch=8, median=7.0), ck1)
    said.append(("claim", store.claim(_record("d").key, s1)))
    said.append(("duplicate", _raised(lambda: store.add_result(s1, _record("a")))))
    store.put_reference("ref-1", b"reference outputs")
    store.put_selection(s1, SelectionRecord(model="mlp", batch_size=1, device_class_key=_key("cpu"),
                                            winner_key=a.key, winner="a", reason="only one ok"))
    store.finish_sweep(s1, DONE)

    s2 = store.begin_sweep("second", {"models": ["mlp", "cnn"]})
    said.append(("claim after finish", store.claim(_record("d").key, s2)))
    store.add_reuse(s2, a)
    store.add_result(s2, _rechecked(c, ok=True))
    store.add_result(s2, _record("d", median=0.75), ck0)
    said.append(("reuse twice", _raised(lambda: store.add_reuse(s2, a))))
    store.put_deploy(s2, DeployRecord(model="mlp", batch_size=1, target="cpu0", status="deployed", winner_key=a.key))
    store.finish_sweep(s2, "failed: RuntimeError")

    s3 = store.begin_sweep("third", {})
    reused_in_s2 = next(r for r in store.sweep_results(s2) if r.how == REUSED)
    store.add_reuse(s3, reused_in_s2)
    store.add_result(s3, _record("b", median=3.0), ck1)
    store.heartbeat(s3)

    sweeps = store.list_sweeps()
    index = {s.id: i for i, s in enumerate(sweeps)}
    said = [(what, index.get(answer, answer)) for what, answer in said]
    keys = [_record(n).key for n in "abd"] + [c.key, _key("missing")]
    origin = {r.result_id: (index[r.sweep_id], r.key) for rs in store.results_for(keys).values() for r in rs}

    def plain(record: ResultRecord) -> dict:
        d = record.to_dict()
        del d["result_id"], d["sweep_id"]
        d["in_sweep"] = index[record.sweep_id]
        d["checkpoint"], d["outputs"] = bool(d["checkpoint"]), bool(d["outputs"])
        if d["source"]:
            d["source"] = (index[d["source"]["sweep"]], origin[d["source"]["result"]])
        return d

    return {
        "said": said,
        "sweeps": [(s.name, s.spec, s.status, s.candidates, s.from_store, s.finished_at is None)
                   for s in (store.sweep_info(s.id) for s in sweeps)],
        "sweep_results": [[plain(r) for r in store.sweep_results(s.id)] for s in sweeps],
        "results_for": {k: [plain(r) for r in rs] for k, rs in store.results_for(keys).items()},
        "checkpoints": {(i, r.key): _files(store.checkpoint_bytes(r)) if r.checkpoint else None
                        for i, s in enumerate(sweeps) for r in store.sweep_results(s.id)},
        "outputs": [store.outputs_bytes(r) for s in sweeps for r in store.sweep_results(s.id)],
        "selections": [[x.to_dict() for x in store.selections(s.id)] for s in sweeps],
        "deployments": [[x.to_dict() for x in store.deployments(s.id)] for s in sweeps],
        "references": [store.reference_bytes("ref-1"), store.reference_bytes("ref-2")],
    }


def test_memory_and_sqlite_stores_give_the_same_answers(tmp_path, checkpoints):
    with SqliteStore(tmp_path / "store") as sqlite_store:
        on_disk = _scripted(sqlite_store, checkpoints)
    in_memory = _scripted(MemoryStore(), checkpoints)
    for part in on_disk:
        assert in_memory[part] == on_disk[part], part
    # The script did what it meant to: every kind of row, and the refusals.
    hows = [r["how"] for rs in on_disk["sweep_results"] for r in rs]
    assert sorted(set(hows)) == sorted({BUILT, REUSED, RECHECKED})
    assert on_disk["said"] == [("claim", None), ("duplicate", "ValueError"), ("claim after finish", None),
                               ("reuse twice", "ValueError")]
    assert [s[2] for s in on_disk["sweeps"]] == [DONE, "failed: RuntimeError", RUNNING]


# == SQLite only: several processes, files on disk ========================================================

def test_two_store_objects_on_one_root_see_each_others_commits(tmp_path):
    with SqliteStore(tmp_path / "s") as first, SqliteStore(tmp_path / "s") as second:
        sweep = first.begin_sweep("s", {})
        record = first.add_result(sweep, _record())
        assert second.latest_sweep_id() == sweep
        assert second.sweep_results(sweep) == [record]
        assert second.results_for([record.key]) == {record.key: [record]}

        assert second.claim("k", "driver-2") is None
        assert first.claim("k", "driver-1") == "driver-2"
        other = second.begin_sweep("other", {})
        second.add_reuse(other, record)
        second.finish_sweep(other, DONE)
        assert first.sweep_info(other).status == DONE
        assert [r.how for r in first.sweep_results(other)] == [REUSED]


def test_a_result_written_by_a_process_that_is_sigkilled_stays_readable(tmp_path, packed):
    root = tmp_path / "s"
    ckpt = tmp_path / "ckpt.tar"
    ckpt.write_bytes(packed)
    script = textwrap.dedent(
        """
        import json, sys, time
        from orchestrator.records import ResultRecord
        from orchestrator.store import SqliteStore
        store = SqliteStore(sys.argv[1], lease_s=0.2)
        sweep = store.begin_sweep("killed", {})
        record = ResultRecord.from_dict(json.loads(sys.argv[2]))
        stored = store.add_result(sweep, record, open(sys.argv[3], "rb").read())
        print(json.dumps({"sweep": sweep, "record": stored.to_dict()}), flush=True)
        time.sleep(120)  # never closes: it is killed here
        """
    )
    from env_helpers import child_env

    env = child_env(ROOT)
    proc = subprocess.Popen([sys.executable, "-c", script, str(root), json.dumps(_record().to_dict()), str(ckpt)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    written = json.loads(line)
    time.sleep(0.3)  # past the killed driver's lease

    with SqliteStore(root) as store:
        (got,) = store.sweep_results(written["sweep"])
        assert got.to_dict() == written["record"]
        assert store.checkpoint_problem(got) is None
        assert _files(store.checkpoint_bytes(got)) == _files(packed)
        assert store.sweep_info(written["sweep"]).status == INTERRUPTED


def test_a_checkpoint_lands_under_its_manifest_sha_and_round_trips(sqlite_store, checkpoints):
    src, packed = checkpoints[0]
    sha = hashlib.sha256((src / "manifest.json").read_bytes()).hexdigest()
    sweep = sqlite_store.begin_sweep("s", {})
    stored = sqlite_store.add_result(sweep, _record(), packed)

    assert stored.manifest_sha256 == sha
    assert stored.checkpoint == f"checkpoints/{sha[:2]}/{sha}"
    folder = sqlite_store.root / "checkpoints" / sha[:2] / sha
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    for f in src.rglob("*"):
        if f.is_file():
            assert (folder / f.relative_to(src)).read_bytes() == f.read_bytes()
    verify_checkpoint(folder)
    assert sqlite_store.checkpoint_problem(stored) is None
    assert _files(sqlite_store.checkpoint_bytes(stored)) == _files(packed)
    assert sqlite_store.checkpoint_path(stored) == folder
    assert [p.name for p in (sqlite_store.root / "checkpoints" / ".staging").iterdir()] == []


# Each damage returns patterns that the problem must all match: the file it is about and what is wrong.
LINKS = r"(?i)symbolic link|through a link|links are refused"


def _edit_manifest(folder: Path, outside: Path) -> list[str]:
    manifest = folder / "manifest.json"
    data = json.loads(manifest.read_text())
    data["backend"] = "SomethingElse"
    manifest.write_text(json.dumps(data))
    return [r"manifest\.json", r"(?i)changed|sha-?256|match"]


def _change_artifact(folder: Path, outside: Path) -> list[str]:
    weights = folder / "artifacts" / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, other bytes
    return [r"artifacts/weights\.pt", r"(?i)sha-?256|changed|corrupt"]


def _truncate_artifact(folder: Path, outside: Path) -> list[str]:
    weights = folder / "artifacts" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    return [r"artifacts/weights\.pt", r"(?i)bytes|size|changed"]


def _remove_artifact(folder: Path, outside: Path) -> list[str]:
    (folder / "artifacts" / "weights.pt").unlink()
    return [r"artifacts/weights\.pt", r"(?i)missing|does not exist"]


def _add_file(folder: Path, outside: Path) -> list[str]:
    (folder / "artifacts" / "extra.bin").write_bytes(b"smuggled")
    return [r"artifacts/extra\.bin", r"(?i)manifest (does not list|lists)|not listed"]


def _add_symlink(folder: Path, outside: Path) -> list[str]:
    os.symlink(outside, folder / "artifacts" / "link")
    return [r"artifacts/link", LINKS]


def _artifact_becomes_symlink(folder: Path, outside: Path) -> list[str]:
    weights = folder / "artifacts" / "weights.pt"
    outside.write_bytes(weights.read_bytes())  # the very same bytes, elsewhere
    weights.unlink()
    os.symlink(outside, weights)
    return [r"artifacts/weights\.pt", LINKS]


def _remove_folder(folder: Path, outside: Path) -> list[str]:
    for p in sorted(folder.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    folder.rmdir()
    return [r"(?i)missing|does not exist|not a checkpoint"]


DAMAGES = [_edit_manifest, _change_artifact, _truncate_artifact, _remove_artifact, _add_file, _add_symlink,
           _artifact_becomes_symlink, _remove_folder]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_checkpoint_is_named_and_refused(sqlite_store, packed, tmp_path, damage):
    sweep = sqlite_store.begin_sweep("s", {})
    stored = sqlite_store.add_result(sweep, _record(), packed)
    assert sqlite_store.checkpoint_problem(stored) is None
    patterns = damage(sqlite_store.root / stored.checkpoint, tmp_path / "outside.bin")

    found = sqlite_store.checkpoint_problem(stored)
    assert found is not None and "\n" not in found
    assert all(re.search(p, found) for p in patterns), found
    for read in (sqlite_store.checkpoint_bytes, sqlite_store.checkpoint_path):
        with pytest.raises(DamagedCheckpoint) as caught:
            read(stored)
        assert all(re.search(p, str(caught.value)) for p in patterns), caught.value
    (listed,) = sqlite_store.sweep_results(sweep)  # the record itself still reads
    assert sqlite_store.checkpoint_problem(listed) == found


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.strip("_"))
def test_adding_the_same_checkpoint_again_replaces_a_damaged_folder(sqlite_store, packed, tmp_path, damage):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not the store's")
    first = sqlite_store.begin_sweep("first", {})
    stored = sqlite_store.add_result(first, _record(), packed)
    damage(sqlite_store.root / stored.checkpoint, outside)
    assert sqlite_store.checkpoint_problem(stored) is not None

    second = sqlite_store.begin_sweep("second", {})
    again = sqlite_store.add_result(second, _record(), packed)
    assert again.checkpoint == stored.checkpoint
    assert sqlite_store.checkpoint_problem(again) is None and sqlite_store.checkpoint_problem(stored) is None
    assert _files(sqlite_store.checkpoint_bytes(stored)) == _files(packed)
    assert outside.exists()  # a link that was in the damaged folder was removed, not followed
    assert [p.name for p in (sqlite_store.root / "checkpoints" / ".staging").iterdir()] == []


def test_a_sound_checkpoint_folder_is_kept_when_added_again(sqlite_store, packed):
    first = sqlite_store.begin_sweep("first", {})
    stored = sqlite_store.add_result(first, _record(), packed)
    folder = sqlite_store.root / stored.checkpoint
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [folder, *folder.rglob("*")]}
    time.sleep(0.01)
    second = sqlite_store.add_result(sqlite_store.begin_sweep("second", {}), _record(), packed)
    assert second.checkpoint == stored.checkpoint
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in [folder, *folder.rglob("*")]} == before


def test_references_and_outputs_changed_after_writing_are_refused(sqlite_store, tmp_path):
    sqlite_store.put_reference("ref", b"reference tensors")
    ref_file = sqlite_store.root / "references" / "ref.pt"
    assert ref_file.read_bytes() == b"reference tensors"
    assert sorted(p.name for p in ref_file.parent.iterdir()) == ["ref.pt"]  # no temp files left
    sweep = sqlite_store.begin_sweep("s", {})
    stored = sqlite_store.add_result(sweep, _record(), outputs=b"candidate outputs")
    out_file = sqlite_store.root / stored.outputs
    assert stored.outputs == f"outputs/{hashlib.sha256(b'candidate outputs').hexdigest()}.pt"
    assert sqlite_store.outputs_bytes(stored) == b"candidate outputs"

    ref_file.write_bytes(b"reference tensorz")
    out_file.write_bytes(b"candidate outputz")
    assert sqlite_store.reference_bytes("ref") is None and not sqlite_store.has_reference("ref")
    assert sqlite_store.outputs_bytes(stored) is None

    # The same bytes, but behind a symbolic link (into the store, or out of it): refused as well.
    for target in (sqlite_store.root / "references" / "copy.bin", tmp_path / "ref.pt"):
        target.write_bytes(b"reference tensors")
        ref_file.unlink()
        os.symlink(target, ref_file)
        assert sqlite_store.reference_bytes("ref") is None
    out_file.unlink()
    assert sqlite_store.outputs_bytes(stored) is None
    # Writing them again makes them readable again.
    sqlite_store.put_reference("ref", b"reference tensors")
    assert sqlite_store.reference_bytes("ref") == b"reference tensors"
    again = sqlite_store.add_result(sqlite_store.begin_sweep("t", {}), _record(), outputs=b"candidate outputs")
    assert sqlite_store.outputs_bytes(again) == b"candidate outputs"


def test_an_archive_that_leaves_its_folder_is_refused_and_nothing_is_written(sqlite_store):
    sweep = sqlite_store.begin_sweep("s", {})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("manifest.json", "../escape"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="leaves the destination"):
        sqlite_store.add_result(sweep, _record(), buf.getvalue())
    assert sqlite_store.sweep_results(sweep) == []
    assert not (sqlite_store.root.parent / "escape").exists()
    checkpoints = sqlite_store.root / "checkpoints"
    assert not checkpoints.exists() or [p for p in checkpoints.rglob("*") if not p.is_dir()] == []


def test_records_that_are_not_json_or_not_records_are_refused(sqlite_store):
    sweep = sqlite_store.begin_sweep("s", {})
    with pytest.raises(TypeError, match="ResultRecord"):
        sqlite_store.add_result(sweep, {"key": "abc"})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        sqlite_store.add_result(sweep, _record(config={"not json": object()}))
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        sqlite_store.begin_sweep("x", {"spec": object()})
    assert sqlite_store.sweep_results(sweep) == []
    assert [s.id for s in sqlite_store.list_sweeps()] == [sweep]


def test_a_corrupt_database_file_is_refused_in_one_line_naming_it(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    (root / DB_NAME).write_bytes(os.urandom(8192))
    for readonly in (False, True):
        with pytest.raises(StoreError) as caught:
            SqliteStore(root, readonly=readonly)
        message = str(caught.value)
        assert str(root / DB_NAME) in message and "move it aside" in message
        assert "\n" not in message


def test_a_store_path_that_is_a_file_or_empty_is_refused(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("hello")
    with pytest.raises(StoreError, match="is a file, not a directory"):
        SqliteStore(a_file)
    assert a_file.read_text() == "hello"
    for empty in ("", "   "):
        with pytest.raises(StoreError, match="empty"):
            SqliteStore(empty)
    with pytest.raises(StoreError, match="not an orchestrator store"):
        SqliteStore(tmp_path / "missing", readonly=True)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("readonly", [False, True], ids=["writable", "readonly"])
@pytest.mark.parametrize("version", [1, SCHEMA_VERSION + 1], ids=["older", "newer"])
def test_a_store_of_another_schema_version_is_refused_naming_both(tmp_path, version, readonly):
    root = tmp_path / "s"
    root.mkdir()
    db = sqlite3.connect(root / DB_NAME)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    db.commit()
    db.close()
    older_or_newer = "older" if version < SCHEMA_VERSION else "newer"
    with pytest.raises(StoreError, match=rf"schema version {version}, {older_or_newer} .*\({SCHEMA_VERSION}\)"):
        SqliteStore(root, readonly=readonly)
    db = sqlite3.connect(root / DB_NAME)
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert tables == {"schema_version"}  # nothing of the new schema was added to the old store


# The sweeps table of schema version 2, before the objective was stored with the sweep.
V2_SWEEPS = """CREATE TABLE sweeps_v2 (id TEXT PRIMARY KEY, name TEXT NOT NULL, spec_json TEXT NOT NULL,
    started_at REAL NOT NULL, finished_at REAL, status TEXT NOT NULL, heartbeat_at REAL, lease_s REAL NOT NULL,
    host TEXT, pid INTEGER)"""


def _a_version_2_store(root: Path) -> tuple[str, ResultRecord]:
    """A store as schema version 2 left it: one finished sweep with one result, no objective column."""
    with SqliteStore(root) as store:
        sweep = store.begin_sweep("old", {"a": 1})
        built = store.add_result(sweep, _record())
        store.finish_sweep(sweep, DONE)
    db = sqlite3.connect(root / DB_NAME)
    db.executescript(f"""
        PRAGMA foreign_keys = OFF;
        {V2_SWEEPS};
        INSERT INTO sweeps_v2 SELECT id, name, spec_json, started_at, finished_at, status, heartbeat_at, lease_s,
            host, pid FROM sweeps;
        DROP TABLE sweeps;
        ALTER TABLE sweeps_v2 RENAME TO sweeps;
        DELETE FROM schema_version;
        INSERT INTO schema_version (version) VALUES (2);
    """)
    db.close()
    return sweep, built


def _columns_and_version(root: Path) -> tuple[list[str], int]:
    db = sqlite3.connect(root / DB_NAME)
    try:
        columns = [r[1] for r in db.execute("PRAGMA table_info(sweeps)")]
        return columns, db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
    finally:
        db.close()


def test_a_version_2_store_opens_read_only_as_it_is_with_no_objectives(tmp_path):
    root = tmp_path / "s"
    sweep, built = _a_version_2_store(root)
    assert "objective" not in _columns_and_version(root)[0]
    with SqliteStore(root, readonly=True) as store:
        (info,) = store.list_sweeps()
        assert (info.id, info.status, info.objective, info.candidates) == (sweep, DONE, None, 1)
        assert store.sweep_info(sweep).objective is None
        assert store.sweep_results(sweep) == [built]
    columns, version = _columns_and_version(root)
    assert "objective" not in columns and version == 2  # nothing was migrated by a reader


def test_a_version_2_store_is_migrated_when_opened_for_writing(tmp_path):
    root = tmp_path / "s"
    sweep, built = _a_version_2_store(root)
    with SqliteStore(root) as store:
        assert store.sweep_info(sweep).objective is None and store.sweep_info(sweep).status == DONE
        assert store.sweep_results(sweep) == [built]
        later = store.begin_sweep("new", {}, objective="latency_budget")
        store.add_reuse(later, built)
        assert store.sweep_info(later).objective == "latency_budget"
    columns, version = _columns_and_version(root)
    assert "objective" in columns and version == SCHEMA_VERSION
    with SqliteStore(root) as again, SqliteStore(root, readonly=True) as reader:  # migrated once, read alike
        for store in (again, reader):
            assert [(s.id, s.objective) for s in store.list_sweeps()] == [(sweep, None), (later, "latency_budget")]


def _tree(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        content = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
        out[p.relative_to(root).as_posix()] = (stat.S_IFMT(st.st_mode), content, st.st_mtime_ns)
    return out


def _chmod_tree(root: Path, dirs: int, files: int) -> None:
    for p in [root, *root.rglob("*")]:
        os.chmod(p, dirs if p.is_dir() else files)


def test_a_readonly_store_reads_everything_and_never_writes(tmp_path, packed):
    root = tmp_path / "s"
    with SqliteStore(root) as writer:
        done = writer.begin_sweep("done", {"a": 1})
        built = writer.add_result(done, _record(), packed, outputs=b"outputs")
        writer.put_reference("ref", b"reference")
        writer.put_selection(done, SelectionRecord(model="mlp", batch_size=1, device_class_key="d",
                                                   winner_key=built.key, winner="eager", reason="only one"))
        writer.finish_sweep(done, DONE)
        running = writer.begin_sweep("running", {})
        writer.add_reuse(running, built)
    before = _tree(root)
    assert DB_NAME in before
    _chmod_tree(root, 0o555, 0o444)
    try:
        if os.geteuid() != 0:  # as root permission bits block nothing: then only readonly=True is tested
            with SqliteStore(root) as detected:
                assert detected.readonly
        with SqliteStore(root, readonly=True) as store:
            assert [s.id for s in store.list_sweeps()] == [done, running]
            for s in store.list_sweeps():
                store.sweep_info(s.id)
                for r in store.sweep_results(s.id):
                    assert store.checkpoint_problem(r) is None
                    assert _files(store.checkpoint_bytes(r)) == _files(packed)
                    assert store.outputs_bytes(r) == b"outputs"
                store.selections(s.id)
                store.deployments(s.id)
            assert store.results_for([built.key])[built.key][0].result_id == built.result_id
            assert store.reference_bytes("ref") == b"reference"
            assert store.latest_sweep_id() == running

            writes = {
                "begin_sweep": lambda: store.begin_sweep("new", {}),
                "heartbeat": lambda: store.heartbeat(running),
                "finish_sweep": lambda: store.finish_sweep(running, DONE),
                "claim": lambda: store.claim("k", running),
                "release": lambda: store.release("k", running),
                "add_result": lambda: store.add_result(running, _record("new"), packed, outputs=b"more outputs"),
                "add_reuse": lambda: store.add_reuse(done, built),
                "put_reference": lambda: store.put_reference("ref2", b"new reference"),
                "put_selection": lambda: store.put_selection(running, SelectionRecord(
                    model="m", batch_size=1, device_class_key="d", winner_key=None, winner=None, reason="r")),
                "put_deploy": lambda: store.put_deploy(running, DeployRecord(
                    model="m", batch_size=1, target="t", status="refused", winner_key=None)),
            }
            refused = {}
            for name, write in writes.items():
                try:
                    write()
                except StoreError as exc:
                    refused[name] = "is read-only here" in str(exc)
            assert refused == dict.fromkeys(writes, True)
        assert _tree(root) == before
    finally:
        _chmod_tree(root, 0o755, 0o644)
    with SqliteStore(root) as store:
        assert [s.status for s in store.list_sweeps()] == [DONE, RUNNING]
        assert [r.how for r in store.sweep_results(running)] == [REUSED]


def test_the_database_is_in_wal_mode_with_foreign_keys(sqlite_store):
    db = sqlite3.connect(sqlite_store.db_path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()
    assert sqlite_store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


# == installs: every deployment and rollback, across sweeps ===============================================

def test_installs_are_appended_in_order_apart_from_the_sweeps_own_deployments(store):
    first, later = store.begin_sweep("first", {}), store.begin_sweep("later", {})
    made = [DeployRecord(model="mlp", batch_size=1, target="cpu0", status="deployed", winner_key="a", sweep_id=first,
                         version="v0001-aaaaaaaaaaaa", root="/r", at=1.0),
            DeployRecord(model="mlp", batch_size=1, target="cpu0", status="deployed", winner_key="b", sweep_id=later,
                         version="v0002-bbbbbbbbbbbb", root="/r", at=2.0),
            DeployRecord(model="mlp", batch_size=1, target="cpu0", status="deployed", winner_key="a", sweep_id=first,
                         version="v0001-aaaaaaaaaaaa", previous="v0002-bbbbbbbbbbbb", action="rollback", root="/r", at=3.0)]
    for d in made:
        store.put_install(d)
    assert store.installs() == made
    assert store.deployments(first) == [] and store.deployments(later) == []  # the sweeps' reports are unchanged


def test_an_install_must_name_a_known_sweep(store):
    with pytest.raises(TypeError, match="naming its sweep_id"):
        store.put_install(DeployRecord(model="mlp", batch_size=1, target="cpu0", status="deployed", winner_key="a"))
    with pytest.raises(KeyError):
        store.put_install(DeployRecord(model="mlp", batch_size=1, target="cpu0", status="deployed", winner_key="a", sweep_id="nope"))
    assert store.installs() == []
