"""The embedded store: SQLite for records, a content-addressed folder for checkpoints.

Layout under the store root::

    store.sqlite                     sweeps, results, per-sweep candidates, selections, deployments
    checkpoints/<key[:2]>/<key>/     one unpacked checkpoint per job key
    references/<ref_key>.pt          reference outputs, shared by every candidate of a model

Every write is one transaction, committed before the method returns: a driver killed between two
results loses nothing it already stored, and the next run finds those results by key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator.records import DeployRecord, ResultRecord, SelectionRecord
from orchestrator.transfer import unpack_to

SCHEMA_VERSION = 1
DB_NAME = "store.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    record_json TEXT NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sweep_candidates (
    sweep_id TEXT NOT NULL REFERENCES sweeps(id),
    key TEXT NOT NULL REFERENCES results(key),
    model TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    candidate TEXT NOT NULL,
    from_store INTEGER NOT NULL,
    PRIMARY KEY (sweep_id, key)
);
CREATE TABLE IF NOT EXISTS selections (
    sweep_id TEXT NOT NULL REFERENCES sweeps(id),
    model TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    device_class_key TEXT NOT NULL,
    record_json TEXT NOT NULL,
    PRIMARY KEY (sweep_id, model, batch_size, device_class_key)
);
CREATE TABLE IF NOT EXISTS deployments (
    sweep_id TEXT NOT NULL REFERENCES sweeps(id),
    seq INTEGER NOT NULL,
    record_json TEXT NOT NULL,
    PRIMARY KEY (sweep_id, seq)
);
CREATE TABLE IF NOT EXISTS "references" (
    key TEXT PRIMARY KEY,
    path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_by_group ON results(model, batch_size);
"""

# Keys become directory and file names: allow nothing that could climb out or hide.
_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


class StoreError(RuntimeError):
    """The store on disk cannot be used by this code (wrong schema version, not a store)."""


class Store:
    """One SQLite connection and one checkpoint folder under ``root``; safe to share between threads."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / DB_NAME
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly one method.
        self._conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._init_schema()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise StoreError(f"cannot open store {self.root}: {self.db_path} is not a usable SQLite store ({e})") from e
        except BaseException:
            self._conn.close()
            raise

    def _init_schema(self) -> None:
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
            found = row[0]
            if found is not None and found != SCHEMA_VERSION:
                newer = "newer than" if found > SCHEMA_VERSION else "older than"
                raise StoreError(
                    f"store {self.root} has schema version {found}, {newer} the version this code "
                    f"knows ({SCHEMA_VERSION}); use a matching aitune-orchestrator or a new store root"
                )
            # Statement by statement: executescript() would COMMIT our transaction halfway.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if found is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    # -- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE so two processes on one store queue instead of deadlocking."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sweeps -------------------------------------------------------------------------------

    def begin_sweep(self, name: str, spec: dict) -> str:
        if not isinstance(name, str) or not name:
            raise ValueError(f"sweep name must be a non-empty string, got {name!r}")
        spec_json = _dumps(spec, what="sweep spec")
        now = time.time()
        # UTC timestamp to the microsecond first, so ids sort by start time; the suffix breaks ties.
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        sweep_id = f"{stamp}-{secrets.token_hex(3)}"
        with self._tx() as db:
            db.execute(
                "INSERT INTO sweeps (id, name, spec_json, started_at, finished_at, status) VALUES (?, ?, ?, ?, NULL, ?)",
                (sweep_id, name, spec_json, now, "running"),
            )
        return sweep_id

    def finish_sweep(self, sweep_id: str, status: str) -> None:
        if not isinstance(status, str) or not status:
            raise ValueError(f"sweep status must be a non-empty string, got {status!r}")
        with self._tx() as db:
            self._require_sweep(db, sweep_id)
            db.execute("UPDATE sweeps SET finished_at = ?, status = ? WHERE id = ?", (time.time(), status, sweep_id))

    def list_sweeps(self) -> list[dict]:
        rows = self._query(
            "SELECT id, name, spec_json, started_at, finished_at, status FROM sweeps ORDER BY started_at, id"
        )
        return [_sweep_dict(row) for row in rows]

    def latest_sweep_id(self) -> str | None:
        rows = self._query("SELECT id FROM sweeps ORDER BY started_at DESC, id DESC LIMIT 1")
        return rows[0][0] if rows else None

    def sweep_info(self, sweep_id: str) -> dict:
        with self._lock:
            db = self._conn
            self._require_sweep(db, sweep_id)
            row = db.execute(
                "SELECT id, name, spec_json, started_at, finished_at, status FROM sweeps WHERE id = ?", (sweep_id,)
            ).fetchone()
            total, reused = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(from_store), 0) FROM sweep_candidates WHERE sweep_id = ?", (sweep_id,)
            ).fetchone()
        info = _sweep_dict(row)
        info.update(candidates=total, from_store=reused)
        return info

    def _require_sweep(self, db: sqlite3.Connection, sweep_id: str) -> None:
        if db.execute("SELECT 1 FROM sweeps WHERE id = ?", (sweep_id,)).fetchone() is None:
            known = [r[0] for r in db.execute("SELECT id FROM sweeps ORDER BY started_at, id")]
            raise KeyError(f"unknown sweep id {sweep_id!r} in store {self.root}; known sweeps: {known or 'none'}")

    # -- results ------------------------------------------------------------------------------

    def get_result(self, key: str) -> ResultRecord | None:
        rows = self._query("SELECT record_json FROM results WHERE key = ?", (key,))
        return _load_result(rows[0][0]) if rows else None

    def get_results(self, keys: Iterable[str]) -> dict[str, ResultRecord]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, ResultRecord] = {}
        for start in range(0, len(keys), 500):  # stay well under SQLite's bound-parameter limit
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, blob in self._query(f"SELECT key, record_json FROM results WHERE key IN ({marks})", chunk):
                found[key] = _load_result(blob)
        return found

    def put_result(self, sweep_id: str, record: ResultRecord, checkpoint: bytes | None = None) -> ResultRecord:
        """Store ``record`` (and its packed checkpoint) for ``sweep_id``; returns the stored copy.

        The copy's ``checkpoint`` is the CAS path relative to the store root when bytes were given.
        The caller's record is left unchanged.
        """
        if not isinstance(record, ResultRecord):
            raise TypeError(f"put_result expects a ResultRecord, got {type(record).__name__}")
        _check_key(record.key, "result key")
        if checkpoint is not None and not isinstance(checkpoint, (bytes, bytearray, memoryview)):
            raise TypeError(f"checkpoint must be bytes from transfer.pack_dir, got {type(checkpoint).__name__}")
        with self._lock:
            self._require_sweep(self._conn, sweep_id)  # fail before unpacking anything
        stored = dataclasses.replace(record, from_store=False, created_at=record.created_at or time.time())

        created: Path | None = None
        if checkpoint is not None:
            target = self._cas_path(record.key)
            if not target.exists():  # same key, same content: an existing folder is kept as it is
                try:
                    unpack_to(bytes(checkpoint), target)
                    created = target
                except FileExistsError:
                    pass  # another process stored the same key between our check and our rename
                except OSError:
                    if not target.is_dir():
                        raise
            stored.checkpoint = target.relative_to(self.root).as_posix()

        try:
            blob = _dumps(stored.to_dict(), what=f"result record {record.key}")
            with self._tx() as db:
                self._require_sweep(db, sweep_id)
                db.execute(
                    "INSERT INTO results (key, record_json, status, model, batch_size, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET record_json = excluded.record_json, "
                    "status = excluded.status, model = excluded.model, batch_size = excluded.batch_size, "
                    "created_at = excluded.created_at",
                    (stored.key, blob, stored.status, stored.model, stored.batch_size, stored.created_at),
                )
                db.execute(
                    "INSERT INTO sweep_candidates (sweep_id, key, model, batch_size, candidate, from_store) "
                    "VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (sweep_id, key) DO UPDATE SET from_store = 0, "
                    "model = excluded.model, batch_size = excluded.batch_size, candidate = excluded.candidate",
                    (sweep_id, stored.key, stored.model, stored.batch_size, stored.candidate),
                )
        except BaseException:
            # No row, so the folder we just made would be an orphan nobody points at
            # (unless another thread stored the same key meanwhile and now relies on it).
            if created is not None and self.get_result(record.key) is None:
                shutil.rmtree(created, ignore_errors=True)
            raise
        return stored

    def mark_reused(self, sweep_id: str, record: ResultRecord | str) -> None:
        """Record that ``sweep_id`` took this already-stored result instead of building it again."""
        key = record if isinstance(record, str) else record.key
        with self._tx() as db:
            self._require_sweep(db, sweep_id)
            row = db.execute("SELECT record_json FROM results WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise KeyError(f"cannot mark {key!r} as reused in sweep {sweep_id}: no stored result has that key")
            stored = _load_result(row[0])
            # DO NOTHING: a result this sweep produced itself stays "not from store".
            db.execute(
                "INSERT INTO sweep_candidates (sweep_id, key, model, batch_size, candidate, from_store) "
                "VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT (sweep_id, key) DO NOTHING",
                (sweep_id, key, stored.model, stored.batch_size, stored.candidate),
            )

    def sweep_results(self, sweep_id: str) -> list[ResultRecord]:
        with self._lock:
            self._require_sweep(self._conn, sweep_id)
            rows = self._conn.execute(
                "SELECT r.record_json, c.from_store FROM sweep_candidates c JOIN results r ON r.key = c.key "
                "WHERE c.sweep_id = ? ORDER BY c.model, c.batch_size, c.candidate, c.key",
                (sweep_id,),
            ).fetchall()
        out = []
        for blob, from_store in rows:
            record = _load_result(blob)
            record.from_store = bool(from_store)
            out.append(record)
        return out

    # -- selections and deployments -----------------------------------------------------------

    def put_selection(self, sweep_id: str, selection: SelectionRecord) -> None:
        if not isinstance(selection, SelectionRecord):
            raise TypeError(f"put_selection expects a SelectionRecord, got {type(selection).__name__}")
        blob = _dumps(selection.to_dict(), what="selection record")
        with self._tx() as db:
            self._require_sweep(db, sweep_id)
            db.execute(
                "INSERT OR REPLACE INTO selections (sweep_id, model, batch_size, device_class_key, record_json) "
                "VALUES (?, ?, ?, ?, ?)",
                (sweep_id, selection.model, selection.batch_size, selection.device_class_key, blob),
            )

    def selections(self, sweep_id: str) -> list[SelectionRecord]:
        with self._lock:
            self._require_sweep(self._conn, sweep_id)
            rows = self._conn.execute(
                "SELECT record_json FROM selections WHERE sweep_id = ? ORDER BY model, batch_size, device_class_key",
                (sweep_id,),
            ).fetchall()
        return [SelectionRecord.from_dict(json.loads(blob)) for (blob,) in rows]

    def put_deploy(self, sweep_id: str, deploy: DeployRecord) -> None:
        if not isinstance(deploy, DeployRecord):
            raise TypeError(f"put_deploy expects a DeployRecord, got {type(deploy).__name__}")
        blob = _dumps(deploy.to_dict(), what="deploy record")
        with self._tx() as db:
            self._require_sweep(db, sweep_id)
            (seq,) = db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM deployments WHERE sweep_id = ?", (sweep_id,)
            ).fetchone()
            db.execute("INSERT INTO deployments (sweep_id, seq, record_json) VALUES (?, ?, ?)", (sweep_id, seq, blob))

    def deployments(self, sweep_id: str) -> list[DeployRecord]:
        with self._lock:
            self._require_sweep(self._conn, sweep_id)
            rows = self._conn.execute(
                "SELECT record_json FROM deployments WHERE sweep_id = ? ORDER BY seq", (sweep_id,)
            ).fetchall()
        return [DeployRecord.from_dict(json.loads(blob)) for (blob,) in rows]

    # -- files --------------------------------------------------------------------------------

    def put_reference(self, ref_key: str, data: bytes) -> Path:
        """Write reference outputs (a torch.save blob) under ``ref_key``; readers never see half a file."""
        _check_key(ref_key, "reference key")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"reference data must be bytes, got {type(data).__name__}")
        folder = self.root / "references"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{ref_key}.pt"
        fd, tmp = tempfile.mkstemp(prefix=f".{ref_key}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._tx() as db:
            db.execute(
                'INSERT OR REPLACE INTO "references" (key, path) VALUES (?, ?)',
                (ref_key, path.relative_to(self.root).as_posix()),
            )
        return path

    def reference_path(self, ref_key: str) -> Path | None:
        rows = self._query('SELECT path FROM "references" WHERE key = ?', (ref_key,))
        if not rows:
            return None
        path = self.root / rows[0][0]
        return path if path.is_file() else None

    def checkpoint_dir(self, record_or_key: ResultRecord | str) -> Path | None:
        """The stored checkpoint folder of a result, or None when it has none on disk."""
        if isinstance(record_or_key, ResultRecord):
            if record_or_key.checkpoint:
                path = self.root / record_or_key.checkpoint
                if path.is_dir():
                    return path
            key = record_or_key.key
        else:
            key = record_or_key
        _check_key(key, "result key")
        path = self._cas_path(key)
        return path if path.is_dir() else None

    def _cas_path(self, key: str) -> Path:
        return self.root / "checkpoints" / key[:2] / key


def _check_key(key: object, what: str) -> None:
    if not isinstance(key, str) or not _SAFE_KEY.match(key):
        raise ValueError(f"{what} must be a non-empty string of letters, digits, '_', '-' or '.', got {key!r}")


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} is not JSON-serialisable: {e}") from e


def _load_result(blob: str) -> ResultRecord:
    record = ResultRecord.from_dict(json.loads(blob))
    record.from_store = False  # a per-sweep fact; only sweep_results knows it
    return record


def _sweep_dict(row: tuple) -> dict:
    sweep_id, name, spec_json, started_at, finished_at, status = row
    return {
        "id": sweep_id,
        "name": name,
        "spec": json.loads(spec_json),
        "started_at": started_at,
        "finished_at": finished_at,
        "status": status,
    }
