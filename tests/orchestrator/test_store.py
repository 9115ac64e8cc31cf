from __future__ import annotations

import hashlib
import io
import sqlite3
import subprocess
import sys
import tarfile
import textwrap
import threading
from pathlib import Path

import pytest

from orchestrator.records import BUILD_ERROR, OK, DeployRecord, ResultRecord, SelectionRecord
from orchestrator.store import SCHEMA_VERSION, Store, StoreError
from orchestrator.transfer import pack_dir

ROOT = Path(__file__).resolve().parents[2]


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _result(name: str = "eager", model: str = "mlp", batch: int = 1, status: str = OK, **kw) -> ResultRecord:
    fields = dict(
        key=_key(f"{model}/{batch}/{name}"),
        model=model,
        batch_size=batch,
        backend="TorchEagerBackend",
        config={"precision": "float32"},
        candidate=name,
        status=status,
        device_class_key=_key("cpu"),
        measurement={"median_ms": 1.5, "p99_ms": 2.0} if status == OK else None,
        phases={"build": 0.25},
    )
    fields.update(kw)
    return ResultRecord(**fields)


def _checkpoint(tmp_path: Path, content: bytes = b"weights") -> tuple[Path, bytes]:
    src = tmp_path / "ckpt_src"
    (src / "artifacts").mkdir(parents=True)
    (src / "manifest.json").write_text('{"format": 1}')
    (src / "artifacts" / "model.bin").write_bytes(content)
    return src, pack_dir(src)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store") as s:
        yield s


def test_put_get_round_trip(store):
    sweep = store.begin_sweep("first", {"models": ["mlp"]})
    record = _result(error=None, worker={"hostname": "h", "device_class": {"device_name": "cpu"}})
    stored = store.put_result(sweep, record)

    assert store.get_result(record.key) == stored
    assert stored.created_at > 0
    assert store.get_result(_key("missing")) is None
    assert store.get_results([record.key, _key("missing")]) == {record.key: stored}


def test_put_result_leaves_callers_record_unchanged(store, tmp_path):
    sweep = store.begin_sweep("s", {})
    record = _result()
    _, packed = _checkpoint(tmp_path)
    stored = store.put_result(sweep, record, packed)
    assert record.checkpoint is None and stored.checkpoint is not None


def test_committed_results_are_seen_by_a_second_store_object(tmp_path):
    first = Store(tmp_path / "s")
    sweep = first.begin_sweep("s", {})
    record = first.put_result(sweep, _result())
    with Store(tmp_path / "s") as second:
        assert second.get_result(record.key) == record
        assert second.latest_sweep_id() == sweep
    first.close()


def test_results_survive_a_driver_killed_without_closing(tmp_path):
    root = tmp_path / "s"
    script = textwrap.dedent(
        f"""
        import os
        from orchestrator.records import ResultRecord
        from orchestrator.store import Store
        store = Store({str(root)!r})
        sweep = store.begin_sweep("killed", {{}})
        store.put_result(sweep, ResultRecord(key="k" * 64, model="mlp", batch_size=4, backend="B",
                                             config={{}}, candidate="c", status="ok", device_class_key="d"))
        print(sweep, flush=True)
        os._exit(1)  # no close, no atexit: what a SIGKILLed driver leaves behind
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=60)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    with Store(root) as store:
        sweep = proc.stdout.strip()
        assert [r.key for r in store.sweep_results(sweep)] == ["k" * 64]
        assert store.get_result("k" * 64).batch_size == 4


def test_from_store_is_per_sweep_and_never_stored(store):
    first = store.begin_sweep("first", {})
    record = store.put_result(first, _result())
    second = store.begin_sweep("second", {})
    store.mark_reused(second, record)

    assert [r.from_store for r in store.sweep_results(first)] == [False]
    assert [r.from_store for r in store.sweep_results(second)] == [True]
    assert store.get_result(record.key).from_store is False
    # Even a record that arrives flagged is stored unflagged.
    flagged = _result("other", from_store=True)
    assert store.put_result(first, flagged).from_store is False
    assert store.get_result(flagged.key).from_store is False


def test_mark_reused_does_not_override_a_result_the_sweep_built(store):
    sweep = store.begin_sweep("s", {})
    record = store.put_result(sweep, _result())
    store.mark_reused(sweep, record)
    assert [r.from_store for r in store.sweep_results(sweep)] == [False]


def test_mark_reused_of_unknown_key_is_an_error(store):
    sweep = store.begin_sweep("s", {})
    with pytest.raises(KeyError, match="no stored result"):
        store.mark_reused(sweep, _result())


def test_sweep_results_are_ordered_by_model_batch_candidate(store):
    sweep = store.begin_sweep("s", {})
    for model, batch, name in [("resnet", 8, "b"), ("mlp", 8, "a"), ("resnet", 1, "z"), ("resnet", 8, "a")]:
        store.put_result(sweep, _result(name, model=model, batch=batch))
    order = [(r.model, r.batch_size, r.candidate) for r in store.sweep_results(sweep)]
    assert order == [("mlp", 8, "a"), ("resnet", 1, "z"), ("resnet", 8, "a"), ("resnet", 8, "b")]


def test_checkpoint_bytes_land_in_cas_with_their_content(store, tmp_path):
    sweep = store.begin_sweep("s", {})
    src, packed = _checkpoint(tmp_path, b"\x00\x01weights")
    record = _result()
    stored = store.put_result(sweep, record, packed)

    folder = store.checkpoint_dir(stored)
    assert folder == store.root / "checkpoints" / record.key[:2] / record.key
    assert stored.checkpoint == f"checkpoints/{record.key[:2]}/{record.key}"
    assert store.checkpoint_dir(record.key) == folder
    for f in src.rglob("*"):
        copy = folder / f.relative_to(src)
        assert copy.is_dir() if f.is_dir() else copy.read_bytes() == f.read_bytes()
    assert store.get_result(record.key).checkpoint == stored.checkpoint


def test_existing_checkpoint_folder_is_kept(store, tmp_path):
    sweep = store.begin_sweep("s", {})
    record = _result()
    store.put_result(sweep, record, _checkpoint(tmp_path / "a", b"first")[1])
    store.put_result(sweep, record, _checkpoint(tmp_path / "b", b"second")[1])
    assert (store.checkpoint_dir(record) / "artifacts" / "model.bin").read_bytes() == b"first"


def test_checkpoint_dir_is_none_without_checkpoint(store):
    sweep = store.begin_sweep("s", {})
    record = store.put_result(sweep, _result())
    assert store.checkpoint_dir(record) is None
    assert store.checkpoint_dir(record.key) is None


def test_corrupt_checkpoint_leaves_neither_row_nor_folder(store):
    sweep = store.begin_sweep("s", {})
    record = _result()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))

    for bad in (b"not a tar at all" * 50, buf.getvalue()):
        with pytest.raises(ValueError):
            store.put_result(sweep, record, bad)
        assert store.get_result(record.key) is None
        assert store.sweep_results(sweep) == []
        cas = store.root / "checkpoints"
        assert not cas.exists() or [p for p in cas.rglob("*") if p.is_file()] == []
        assert store.checkpoint_dir(record.key) is None


def test_failed_row_write_removes_the_checkpoint_it_unpacked(store, tmp_path):
    sweep = store.begin_sweep("s", {})
    record = _result(config={"not json": object()})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        store.put_result(sweep, record, _checkpoint(tmp_path)[1])
    assert store.get_result(record.key) is None
    assert store.checkpoint_dir(record.key) is None


def test_bad_input_is_refused_clearly(store):
    sweep = store.begin_sweep("s", {})
    with pytest.raises(TypeError, match="ResultRecord"):
        store.put_result(sweep, {"key": "abc"})
    with pytest.raises(ValueError, match="result key"):
        store.put_result(sweep, _result(key="../escape"))
    with pytest.raises(TypeError, match="checkpoint must be bytes"):
        store.put_result(sweep, _result(), checkpoint="path/to/dir")
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        store.begin_sweep("x", {"spec": object()})
    with pytest.raises(ValueError, match="sweep name"):
        store.begin_sweep("", {})


def test_selections_and_deployments_round_trip(store):
    sweep = store.begin_sweep("s", {})
    winner = _result("compiled")
    selection = SelectionRecord(model="mlp", batch_size=1, device_class_key=_key("cpu"), winner_key=winner.key,
                                winner="compiled", reason="fastest beyond noise", ties=["eager"], speedup=1.8)  # fmt: skip
    store.put_selection(sweep, selection)
    replaced = SelectionRecord(**{**selection.to_dict(), "reason": "remeasured", "remeasured": True})
    store.put_selection(sweep, replaced)
    deploys = [
        DeployRecord(model="mlp", batch_size=1, target=f"cpu-slot-{i}", status="deployed", winner_key=winner.key,
                     max_abs_err=1e-6, median_ms=1.2)  # fmt: skip
        for i in range(3)
    ]
    for d in deploys:
        store.put_deploy(sweep, d)

    assert store.selections(sweep) == [replaced]
    assert store.deployments(sweep) == deploys


def test_sweep_lifecycle_and_listing(store):
    first = store.begin_sweep("first", {"a": 1})
    second = store.begin_sweep("second", {"b": [1, 2]})
    assert first < second  # ids sort by start time
    store.finish_sweep(first, "done")
    listed = store.list_sweeps()
    assert [s["id"] for s in listed] == [first, second]
    assert listed[0]["status"] == "done" and listed[0]["finished_at"] is not None
    assert listed[1]["status"] == "running" and listed[1]["spec"] == {"b": [1, 2]}
    assert store.latest_sweep_id() == second
    store.put_result(second, _result())
    info = store.sweep_info(second)
    assert info["name"] == "second" and info["candidates"] == 1 and info["from_store"] == 0


def test_empty_store_has_no_latest_sweep(store):
    assert store.latest_sweep_id() is None
    assert store.list_sweeps() == []


def test_unknown_sweep_id_lists_known_ids(store):
    known = store.begin_sweep("s", {})
    for call in (
        lambda: store.sweep_info("nope"),
        lambda: store.sweep_results("nope"),
        lambda: store.put_result("nope", _result()),
        lambda: store.finish_sweep("nope", "done"),
        lambda: store.selections("nope"),
        lambda: store.deployments("nope"),
    ):
        with pytest.raises(KeyError, match=f"unknown sweep id 'nope'.*{known}"):
            call()
    assert store.get_result(_result().key) is None


def test_newer_schema_version_is_refused(tmp_path):
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "store.sqlite")
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        Store(tmp_path)


def test_a_file_that_is_not_sqlite_is_refused(tmp_path):
    (tmp_path / "store.sqlite").write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite store"):
        Store(tmp_path)


def test_store_uses_wal_and_foreign_keys(store):
    with sqlite3.connect(store.db_path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_references_are_written_atomically_and_found(store):
    assert store.reference_path("mlp-1") is None
    path = store.put_reference("mlp-1", b"tensor bytes")
    assert path == store.root / "references" / "mlp-1.pt"
    assert path.read_bytes() == b"tensor bytes"
    assert store.reference_path("mlp-1") == path
    store.put_reference("mlp-1", b"newer")
    assert path.read_bytes() == b"newer"
    assert sorted(p.name for p in path.parent.iterdir()) == ["mlp-1.pt"]  # no temp files left
    with pytest.raises(ValueError, match="reference key"):
        store.put_reference("../x", b"")


def test_concurrent_puts_from_threads(store, tmp_path):
    sweep = store.begin_sweep("s", {})
    _, packed = _checkpoint(tmp_path)
    records = [_result(f"c{i}") for i in range(16)]
    threads = [threading.Thread(target=store.put_result, args=(sweep, r, packed)) for r in records]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.sweep_results(sweep)) == 16
    assert all(store.checkpoint_dir(r) is not None for r in records)


def test_a_build_error_is_a_result_too(store):
    sweep = store.begin_sweep("s", {})
    failed = _result("aot", status=BUILD_ERROR, error="Traceback...\nRuntimeError: boom", error_class="RuntimeError")
    store.put_result(sweep, failed)
    got = store.get_result(failed.key)
    assert got.status == BUILD_ERROR and got.error.endswith("boom") and not got.eligible
