"""A store read back from disk is trusted for nothing (issue 32, item 7): garbage records, a garbage
spec, a damaged page and a full disk each get one line naming the store (and the sweep), exit 2,
before Ray starts wherever it can be known then."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.records import SelectionRecord
from orchestrator.store import DB_NAME, SqliteStore, StoreError
from env_helpers import child_env
from sweep_helpers import EAGER, tiny_spec

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=child_env(drop=("RAY_ADDRESS",)), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def a_store(tmp_path: Path, selections: int = 1) -> tuple[Path, str]:
    root = tmp_path / "store"
    spec = tiny_spec(root, [EAGER], deploy={"targets": [{"cpu_slots": 1}], "root": str(tmp_path / "deploy")})
    with SqliteStore(root) as store:
        sweep = store.begin_sweep("s", spec.model_dump(mode="json"))
        for i in range(selections):
            store.put_selection(sweep, SelectionRecord("mlp" if i == 0 else f"m{i}", 2, "f" * 64, "a" * 64, "eager", "fastest " * 20))
        store.finish_sweep(sweep, "done")
    return root, sweep


def edit(root: Path, sql: str) -> None:
    db = sqlite3.connect(root / DB_NAME)
    db.execute(sql)
    db.commit()
    db.close()


def one_line(proc: subprocess.CompletedProcess) -> str:
    out = (proc.stdout + proc.stderr).strip()
    assert "Traceback" not in out and "Started a local Ray" not in out, out
    lines = out.splitlines()
    assert len(lines) == 1, out
    return lines[0]


@pytest.mark.parametrize("garbage, words", [
    ("'\"garbage\"'", "a JSON str, not an object"),
    ("'[1]'", "a JSON list, not an object"),
    ("'{\"model\": 5}'", "missing 5 required positional arguments"),
    ("json_set(record_json, '$.batch_size', 'x')", "batch_size is str, not int"),
    ("'{'", "JSONDecodeError"),
])
def test_a_garbage_selection_is_one_line_naming_the_store_and_sweep(tmp_path, garbage, words):
    root, sweep = a_store(tmp_path)
    edit(root, f"UPDATE selections SET record_json = {garbage}")
    for command in ("deploy", "report") if words.startswith("a JSON str") else ("deploy",):
        proc = cli(command, str(root))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        line = one_line(proc)
        assert line.startswith(f"error: store {root / DB_NAME}: a selection of sweep {sweep} is not a readable record (")
        assert words in line and "the store was edited or damaged" in line


def test_a_garbage_install_record_is_one_line(tmp_path):
    from orchestrator.records import DeployRecord

    root, sweep = a_store(tmp_path)
    with SqliteStore(root) as store:
        store.put_install(DeployRecord("mlp", 2, "cpu0", "deployed", "a" * 64, version="v0001-aaaaaaaaaaaa", sweep_id=sweep))
    edit(root, "UPDATE installs SET record_json = json_set(record_json, '$.batch_size', json('[1]'))")
    proc = cli("deployments", str(root))
    assert proc.returncode == 2
    assert one_line(proc) == (f"error: store {root / DB_NAME}: install record 1 is not a readable record "
                              f"(TypeError: batch_size is list, not int); the store was edited or damaged")


@pytest.mark.parametrize("spec_json, words", [
    ("'{nope'", "is not JSON (JSONDecodeError)"),
    ("'{\"models\": 5}'", "can't be read: models: expected a list, got the integer 5"),
])
def test_a_garbage_stored_spec_names_the_store_and_the_sweep(tmp_path, spec_json, words):
    root, sweep = a_store(tmp_path)
    edit(root, f"UPDATE sweeps SET spec_json = {spec_json}")
    proc = cli("deploy", str(root))
    assert proc.returncode == 2
    line = one_line(proc)
    assert line.startswith(f"error: store {root}") and sweep in line and words in line


def test_a_damaged_page_is_found_when_the_store_opens_before_ray_starts(tmp_path):
    root, _ = a_store(tmp_path, selections=300)
    db = root / DB_NAME
    size = db.stat().st_size
    assert size > 16 * 4096
    with open(db, "r+b") as fh:  # a page deep in the selections table, not one opening the store reads
        fh.seek(size - 2 * 4096)
        fh.write(b"\xff" * 64)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec(root, [EAGER]).model_dump(mode="json")))
    for args in (("tune", str(spec)), ("report", str(root))):
        proc = cli(*args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        line = one_line(proc)
        assert line.startswith(f"error: store database {db} is damaged (") and "move it aside" in line


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True).returncode == 0


def test_a_full_disk_under_the_store_is_said_to_be_full_not_damaged(tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("needs root to mount a small tmpfs: a real full disk")
    try:
        root, sweep = a_store(disk)
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as fh:  # take every byte left
            try:
                while True:
                    fh.write(b"\0" * 4096)
                    fh.flush()
            except OSError:
                pass
        with pytest.raises(StoreError) as info:  # at open (SQLite's -shm file) or at a write
            with SqliteStore(root) as store:
                for i in range(200):
                    store.put_selection(sweep, SelectionRecord(f"x{i}", 2, "f" * 64, "a" * 64, "eager", "y" * 2000))
        text = str(info.value)
        assert "\n" not in text and "the disk is full" in text and "damaged" not in text and str(root / DB_NAME) in text
        filler.unlink()
        with SqliteStore(root) as store:  # intact: it opens, passes its page check, and holds what it held
            assert [s.model for s in store.selections(sweep)][:1] == ["mlp"]
    finally:
        out = subprocess.run(["umount", str(disk)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
