"""The embedded store: SQLite for records, content-addressed folders for checkpoints and outputs.

Layout under the store root::

    store.sqlite                        sweeps, results (appended), claims, selections, deployments
    checkpoints/<sha[:2]>/<sha>/        one unpacked checkpoint per manifest SHA-256
    outputs/<sha>.pt                    a candidate's outputs on its check samples (for re-checks)
    references/<ref_key>.pt             reference outputs, shared by every candidate of a model

Every write is one transaction, committed before the method returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aitune.canonical import sha256_file
from aitune.files import write_atomic
from orchestrator.records import BUILT, REUSED, DeployRecord, ResultRecord, SelectionRecord
from orchestrator.store.base import (
    DEFAULT_LEASE_S,
    RUNNING,
    DamagedCheckpoint,
    ResultStore,
    StoreError,
    SweepInfo,
    check_key,
    effective_status,
)
from orchestrator.transfer import pack_dir, unpack_to

SCHEMA_VERSION = 2
DB_NAME = "store.sqlite"
MANIFEST = "manifest.json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL,
    heartbeat_at REAL,
    lease_s REAL NOT NULL,
    host TEXT,
    pid INTEGER
);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sweep_id TEXT NOT NULL REFERENCES sweeps(id),
    key TEXT NOT NULL,
    eval_key TEXT NOT NULL,
    how TEXT NOT NULL,
    source_id INTEGER REFERENCES results(id),
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    candidate TEXT NOT NULL,
    record_json TEXT,
    created_at REAL NOT NULL,
    UNIQUE (sweep_id, key)
);
CREATE INDEX IF NOT EXISTS results_by_key ON results(key, id);
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
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
CREATE TABLE IF NOT EXISTS installs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sweep_id TEXT NOT NULL REFERENCES sweeps(id),
    at REAL NOT NULL,
    record_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS "references" (
    key TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
"""


class SqliteStore(ResultStore):
    """One SQLite connection and the file folders under ``root``; safe to share between threads.

    ``readonly=True`` opens an existing store without writing anything (a store on a read-only
    disk can still be reported).
    """

    def __init__(self, root: str | Path, *, readonly: bool = False, lease_s: float | None = None) -> None:
        if root is None or not str(root).strip():
            raise StoreError("the store path is empty: give a directory (--store DIR or 'store:' in the spec)")
        self.root = Path(root)
        self.readonly = readonly
        self.lease_s = float(lease_s or os.environ.get("AITUNE_LEASE_S") or DEFAULT_LEASE_S)
        self.db_path = self.root / DB_NAME
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.root} is a file, not a directory: give a directory for the store")
        if readonly or self.root.exists() and not os.access(self.root, os.W_OK):
            self.readonly = True
            if not self.db_path.is_file():
                raise StoreError(f"{self.root} is not an orchestrator store: {self.db_path} does not exist")
        else:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the store directory {self.root}: {e.strerror or e}") from None
        self._lock = threading.Lock()
        self._conn = self._connect()
        try:
            self._init_schema()
            self._check_pages()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise StoreError(_unusable(self.db_path, e)) from None
        except BaseException:
            self._conn.close()
            raise

    def _check_pages(self) -> None:
        """SQLite's own check of every page, at open: a damaged page is found before anything starts
        (Ray, workers), not halfway through a sweep."""
        (answer,) = self._conn.execute("PRAGMA quick_check(1)").fetchone()
        if answer != "ok":
            answer = " ".join(str(answer).replace("*** in database main ***", "").split())
            raise StoreError(f"store database {self.db_path} is damaged ({answer}): move it aside "
                             f"(or restore a backup) and run again")

    def _connect(self) -> sqlite3.Connection:
        try:
            if not self.readonly:
                # isolation_level=None: we issue BEGIN/COMMIT ourselves, a transaction is one method.
                conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    # WAL + NORMAL: a commit survives the process being killed (what a driver fears); only a
                    # power cut may drop the last commits, never corrupt the store. FULL would fsync each.
                    conn.execute("PRAGMA synchronous=NORMAL")
                    conn.execute("PRAGMA foreign_keys=ON")
                except BaseException:
                    conn.close()  # not left open (holding the file) by a store that can't be used
                    raise
                return conn
            uri = self.db_path.resolve().as_uri()
            if not self.db_path.with_name(f"{DB_NAME}-wal").exists():
                # Nothing beyond the main file to read: ``mode=ro`` would still create -wal and -shm
                # files next to it, so read the file as it is and create nothing.
                return sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None, check_same_thread=False)
            try:
                conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
                conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
                return conn
            except sqlite3.OperationalError:
                # A WAL database on a read-only disk can't make its -shm file: read it as immutable.
                return sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None, check_same_thread=False)
        except sqlite3.DatabaseError as e:
            raise StoreError(_unusable(self.db_path, e)) from None

    def _init_schema(self) -> None:
        if self.readonly:
            found = self._version(self._conn)
            if found is None:
                raise StoreError(f"{self.db_path} is not an orchestrator store (it has no schema version)")
            self._require_version(found)
            return
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            found = self._version(db)
            if found is not None:
                self._require_version(found)
            # Statement by statement: executescript() would COMMIT our transaction halfway.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if found is None:
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    @staticmethod
    def _version(db: sqlite3.Connection) -> int | None:
        try:
            row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        except sqlite3.OperationalError:
            return None
        return row[0]

    def _require_version(self, found: int) -> None:
        if found != SCHEMA_VERSION:
            newer = "newer than" if found > SCHEMA_VERSION else "older than"
            raise StoreError(
                f"store {self.root} has schema version {found}, {newer} the version this code knows "
                f"({SCHEMA_VERSION}); use a matching aitune-orchestrator, or move {self.root} aside and start a new store"
            )

    # -- plumbing -----------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if self.readonly:
            raise StoreError(f"store {self.root} is read-only here: it can be reported, not written")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE so two processes on one store queue instead of deadlocking."""
        self._require_writable()
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise StoreError(f"cannot write to store {self.db_path}: {e}") from None
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except sqlite3.IntegrityError:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise
            except sqlite3.DatabaseError as e:  # a full disk, an I/O error: one line, saying which
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise StoreError(_unusable(self.db_path, e)) from None
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.DatabaseError as e:
                raise StoreError(_unusable(self.db_path, e)) from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

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
                "INSERT INTO sweeps (id, name, spec_json, started_at, finished_at, status, heartbeat_at, lease_s, host, pid) "
                "VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, ?)",
                (sweep_id, name, spec_json, now, RUNNING, now, self.lease_s, socket.gethostname(), os.getpid()),
            )
        return sweep_id

    def heartbeat(self, sweep_id: str) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE sweeps SET heartbeat_at = ? WHERE id = ?", (now, sweep_id))
            db.execute("UPDATE claims SET expires_at = ? WHERE owner = ?", (now + self.lease_s, sweep_id))

    def finish_sweep(self, sweep_id: str, status: str) -> None:
        if not isinstance(status, str) or not status:
            raise ValueError(f"sweep status must be a non-empty string, got {status!r}")
        with self._tx() as db:
            self._require_sweep(db, sweep_id)
            db.execute("UPDATE sweeps SET finished_at = ?, status = ? WHERE id = ?", (time.time(), status, sweep_id))
            db.execute("DELETE FROM claims WHERE owner = ?", (sweep_id,))

    _SWEEP_COLUMNS = "id, name, spec_json, started_at, finished_at, status, heartbeat_at, lease_s"

    def list_sweeps(self) -> list[SweepInfo]:
        rows = self._query(f"SELECT {self._SWEEP_COLUMNS} FROM sweeps ORDER BY started_at, id")
        return [_sweep_info(row, self.db_path) for row in rows]

    def latest_sweep_id(self) -> str | None:
        rows = self._query("SELECT id FROM sweeps ORDER BY started_at DESC, id DESC LIMIT 1")
        return rows[0][0] if rows else None

    def sweep_info(self, sweep_id: str) -> SweepInfo:
        with self._lock:
            db = self._conn
            self._require_sweep(db, sweep_id)
            row = db.execute(f"SELECT {self._SWEEP_COLUMNS} FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
            total, reused = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(how != ?), 0) FROM results WHERE sweep_id = ?", (BUILT, sweep_id)
            ).fetchone()
        info = _sweep_info(row, self.db_path)
        info.candidates, info.from_store = total, reused
        return info

    def _require_sweep(self, db: sqlite3.Connection, sweep_id: str) -> None:
        if db.execute("SELECT 1 FROM sweeps WHERE id = ?", (sweep_id,)).fetchone() is None:
            known = [r[0] for r in db.execute("SELECT id FROM sweeps ORDER BY started_at, id")]
            raise KeyError(f"unknown sweep id {sweep_id!r} in store {self.root}; known sweeps: {known or 'none'}")

    # -- claims -------------------------------------------------------------------------------

    def claim(self, key: str, owner: str) -> str | None:
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT owner, expires_at FROM claims WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] != owner and row[1] > now:
                return row[0]
            db.execute(
                "INSERT INTO claims (key, owner, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at",
                (key, owner, now + self.lease_s),
            )
        return None

    def release(self, key: str, owner: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    # -- results ------------------------------------------------------------------------------

    def add_result(self, sweep_id: str, record: ResultRecord, checkpoint: bytes | None = None,
                   outputs: bytes | None = None) -> ResultRecord:
        if not isinstance(record, ResultRecord):
            raise TypeError(f"add_result expects a ResultRecord, got {type(record).__name__}")
        check_key(record.key, "result key")
        if record.how == REUSED:
            raise ValueError("a reused result is recorded with add_reuse, which points at what it reuses")
        self._require_writable()  # fail before writing any file
        with self._lock:
            self._require_sweep(self._conn, sweep_id)
        # Only top-level keys of this dict are replaced: the caller's record is never changed, and the
        # record returned is rebuilt from the JSON written, so it shares nothing with the caller's.
        d = record.to_dict()
        d.update(created_at=record.created_at or time.time(), result_id=None, sweep_id=sweep_id)
        if checkpoint is not None:
            d["checkpoint"], d["manifest_sha256"] = self._put_checkpoint(bytes(checkpoint))
        elif record.source is None:
            d["checkpoint"] = d["manifest_sha256"] = None
        if outputs is not None:
            d["outputs"] = self._put_blob("outputs", bytes(outputs))
        source_id = (record.source or {}).get("result")
        with self._tx() as db:
            self._require_sweep(db, sweep_id)
            self._require_new(db, sweep_id, record.key)
            if record.source is not None:
                origin = self._origin(db, source_id, record.key)
                if origin is None:
                    raise KeyError(f"result {record.key[:12]} names source result {source_id}, which the store does not hold")
                source_id, source_sweep, source_blob = origin
                d["source"] = {"sweep": source_sweep, "result": source_id}
                if checkpoint is None:  # it judged the source's artifact again: it keeps that checkpoint
                    kept = json.loads(source_blob)
                    d["checkpoint"], d["manifest_sha256"] = kept.get("checkpoint"), kept.get("manifest_sha256")
            blob = _dumps(d, what=f"result record {record.key}")
            cur = db.execute(
                "INSERT INTO results (sweep_id, key, eval_key, how, source_id, status, model, batch_size, candidate, "
                "record_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sweep_id, record.key, record.eval_key, record.how, source_id, record.status, record.model,
                 record.batch_size, record.candidate, blob, d["created_at"]),
            )
            rid = cur.lastrowid
            db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (record.key, sweep_id))
        stored = ResultRecord.from_dict(json.loads(blob))
        stored.result_id, stored.sweep_id = rid, sweep_id
        return stored

    def add_reuse(self, sweep_id: str, source: ResultRecord) -> ResultRecord:
        if source.result_id is None:
            raise ValueError(f"cannot reuse {source.key[:12]}: it is not a stored result (no result id)")
        with self._tx() as db:
            self._require_sweep(db, sweep_id)
            # A reused record stands for what it reuses: point at that, never at another reuse row.
            origin = self._origin(db, source.result_id, source.key)
            if origin is None:
                raise KeyError(f"cannot mark {source.key!r} as reused in sweep {sweep_id}: no stored result {source.result_id}")
            self._require_new(db, sweep_id, source.key)
            source_id, source_sweep, source_blob = origin
            reused = self._load(source_blob, source_id, source_sweep)
            cur = db.execute(
                "INSERT INTO results (sweep_id, key, eval_key, how, source_id, status, model, batch_size, candidate, "
                "record_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                (sweep_id, reused.key, reused.eval_key, REUSED, source_id, reused.status, reused.model,
                 reused.batch_size, reused.candidate, time.time()),
            )
            rid = cur.lastrowid
        reused.how, reused.source = REUSED, {"sweep": source_sweep, "result": source_id}
        reused.result_id, reused.sweep_id = rid, sweep_id
        return reused

    @staticmethod
    def _origin(db: sqlite3.Connection, result_id: int | None, key: str) -> tuple[int, str, str] | None:
        """(id, sweep, record) of the stored result ``result_id`` stands for: itself, or what it reuses."""
        row = db.execute("SELECT id, sweep_id, record_json, source_id FROM results WHERE id = ? AND key = ?",
                         (result_id, key)).fetchone()
        if row is not None and row[2] is None:
            row = db.execute("SELECT id, sweep_id, record_json, source_id FROM results WHERE id = ? AND record_json IS NOT NULL",
                             (row[3],)).fetchone()
        return None if row is None else row[:3]

    @staticmethod
    def _require_new(db: sqlite3.Connection, sweep_id: str, key: str) -> None:
        if db.execute("SELECT 1 FROM results WHERE sweep_id = ? AND key = ?", (sweep_id, key)).fetchone() is not None:
            raise ValueError(f"sweep {sweep_id} already recorded a result for {key[:12]}")

    def results_for(self, keys: Iterable[str]) -> dict[str, list[ResultRecord]]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, list[ResultRecord]] = {}
        for start in range(0, len(keys), 500):  # stay well under SQLite's bound-parameter limit
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._query(
                f"SELECT id, sweep_id, key, record_json FROM results WHERE key IN ({marks}) AND how != ? "
                "ORDER BY id DESC", [*chunk, REUSED],
            )
            for rid, sweep_id, key, blob in rows:
                found.setdefault(key, []).append(self._load(blob, rid, sweep_id))
        return found

    def sweep_results(self, sweep_id: str) -> list[ResultRecord]:
        with self._lock:
            self._require_sweep(self._conn, sweep_id)
        rows = self._query(
            "SELECT r.id, r.how, r.source_id, r.record_json, s.record_json, s.sweep_id FROM results r "
            "LEFT JOIN results s ON s.id = r.source_id WHERE r.sweep_id = ? "
            "ORDER BY r.model, r.batch_size, r.candidate, r.key", (sweep_id,),
        )
        out = []
        for rid, how, source_id, blob, source_blob, source_sweep in rows:
            if how == REUSED:
                if source_blob is None:
                    raise StoreError(f"store {self.db_path}: result {rid} reuses result {source_id}, which is missing")
                record = self._load(source_blob, rid, sweep_id)
                record.how, record.source = REUSED, {"sweep": source_sweep, "result": source_id}
            else:
                record = self._load(blob, rid, sweep_id)
            out.append(record)
        return out

    def _load(self, blob: str, rid: int, sweep_id: str) -> ResultRecord:
        record = _decode(ResultRecord, blob, f"store {self.db_path}: result {rid} of sweep {sweep_id}")
        record.result_id, record.sweep_id = rid, sweep_id
        return record

    # -- selections and deployments -----------------------------------------------------------

    def put_selection(self, sweep_id: str, selection: SelectionRecord) -> None:
        if not isinstance(selection, SelectionRecord):
            raise TypeError(f"put_selection expects a SelectionRecord, got {type(selection).__name__}")
        blob = _dumps(selection.to_dict(), what="selection record")
        with self._tx() as db:
            self._require_sweep(db, sweep_id)
            db.execute(
                # A later decision for the same group replaces the sweep's earlier one.
                "INSERT OR REPLACE INTO selections (sweep_id, model, batch_size, device_class_key, record_json) "
                "VALUES (?, ?, ?, ?, ?)",
                (sweep_id, selection.model, selection.batch_size, selection.device_class_key, blob),
            )

    def selections(self, sweep_id: str) -> list[SelectionRecord]:
        with self._lock:
            self._require_sweep(self._conn, sweep_id)
        rows = self._query(
            "SELECT record_json FROM selections WHERE sweep_id = ? ORDER BY model, batch_size, device_class_key", (sweep_id,)
        )
        return [_decode(SelectionRecord, blob, f"store {self.db_path}: a selection of sweep {sweep_id}") for (blob,) in rows]

    def put_deploy(self, sweep_id: str, deploy: DeployRecord) -> None:
        if not isinstance(deploy, DeployRecord):
            raise TypeError(f"put_deploy expects a DeployRecord, got {type(deploy).__name__}")
        blob = _dumps(deploy.to_dict(), what="deploy record")
        with self._tx() as db:
            self._require_sweep(db, sweep_id)
            (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM deployments WHERE sweep_id = ?", (sweep_id,)).fetchone()
            db.execute("INSERT INTO deployments (sweep_id, seq, record_json) VALUES (?, ?, ?)", (sweep_id, seq, blob))

    def deployments(self, sweep_id: str) -> list[DeployRecord]:
        with self._lock:
            self._require_sweep(self._conn, sweep_id)
        rows = self._query("SELECT record_json FROM deployments WHERE sweep_id = ? ORDER BY seq", (sweep_id,))
        return [_decode(DeployRecord, blob, f"store {self.db_path}: a deployment of sweep {sweep_id}") for (blob,) in rows]

    def put_install(self, deploy: DeployRecord) -> None:
        if not isinstance(deploy, DeployRecord) or not deploy.sweep_id:
            raise TypeError("put_install expects a DeployRecord naming its sweep_id")
        blob = _dumps(deploy.to_dict(), what="install record")
        with self._tx() as db:
            self._require_sweep(db, deploy.sweep_id)
            db.execute("INSERT INTO installs (sweep_id, at, record_json) VALUES (?, ?, ?)",
                       (deploy.sweep_id, deploy.at or time.time(), blob))

    def installs(self) -> list[DeployRecord]:
        rows = self._query("SELECT id, record_json FROM installs ORDER BY id")
        return [_decode(DeployRecord, blob, f"store {self.db_path}: install record {rid}") for rid, blob in rows]

    # -- files --------------------------------------------------------------------------------

    def put_reference(self, ref_key: str, data: bytes) -> None:
        """Write reference outputs (a torch.save blob) under ``ref_key``; readers never see half a file."""
        check_key(ref_key, "reference key")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"reference data must be bytes, got {type(data).__name__}")
        self._require_writable()  # before the file is written
        folder = self.root / "references"
        path = _write_atomic(folder, f"{ref_key}.pt", bytes(data))
        with self._tx() as db:
            db.execute(
                'INSERT OR REPLACE INTO "references" (key, path, sha256) VALUES (?, ?, ?)',
                (ref_key, path.relative_to(self.root).as_posix(), hashlib.sha256(data).hexdigest()),
            )

    def reference_bytes(self, ref_key: str) -> bytes | None:
        rows = self._query('SELECT path, sha256 FROM "references" WHERE key = ?', (ref_key,))
        return self._read_checked(rows[0][0], rows[0][1]) if rows else None

    def outputs_bytes(self, record: ResultRecord) -> bytes | None:
        if not record.outputs:
            return None
        return self._read_checked(record.outputs, Path(record.outputs).stem)

    def _read_checked(self, rel: str, sha: str) -> bytes | None:
        """A stored file, only if it is still a plain file inside the store with its recorded hash."""
        path = self._inside(rel, "file")
        if path is None or path.is_symlink() or not path.is_file():
            return None
        data = path.read_bytes()
        return data if hashlib.sha256(data).hexdigest() == sha else None

    def _put_blob(self, folder: str, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.root / folder / f"{sha}.pt"
        if not (path.is_file() and not path.is_symlink() and sha256_file(path) == sha):
            path.unlink(missing_ok=True)
            _write_atomic(path.parent, path.name, data)
        return path.relative_to(self.root).as_posix()

    def _put_checkpoint(self, data: bytes) -> tuple[str, str]:
        """Unpack a checkpoint into its content address; a damaged folder there is replaced."""
        staging = self.root / "checkpoints" / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / f"{secrets.token_hex(8)}"
        unpack_to(data, tmp)
        try:
            manifest = tmp / MANIFEST
            if not manifest.is_file():
                raise ValueError("the worker's checkpoint has no manifest.json")
            sha = sha256_file(manifest)
            target = self.root / "checkpoints" / sha[:2] / sha
            rel = target.relative_to(self.root).as_posix()
            if target.is_dir() and not target.is_symlink() and _checkpoint_problem(target, sha) is None:
                return rel, sha  # same manifest, same content, and the folder is sound: keep it
            target.parent.mkdir(parents=True, exist_ok=True)
            trash = None
            if target.exists() or target.is_symlink():
                trash = staging / f"damaged-{secrets.token_hex(8)}"
                os.replace(target, trash)
            try:
                os.replace(tmp, target)
            except OSError:
                # Another writer put the same checkpoint there between our check and our rename:
                # same manifest, same content; keep theirs if it is sound.
                if not (target.is_dir() and _checkpoint_problem(target, sha) is None):
                    raise
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() and not trash.is_symlink() else trash.unlink()
            return rel, sha
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _inside(self, rel: str | None, what: str) -> Path | None:
        if not rel:
            return None
        path = self.root / rel
        try:
            path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return None  # an edited record pointing out of the store
        return path

    def checkpoint_problem(self, record: ResultRecord) -> str | None:
        if not record.checkpoint or not record.manifest_sha256:
            return "the result has no stored checkpoint"
        path = self._inside(record.checkpoint, "checkpoint")
        if path is None:
            return f"its checkpoint path {record.checkpoint!r} leaves the store"
        return _checkpoint_problem(path, record.manifest_sha256)

    def checkpoint_bytes(self, record: ResultRecord) -> bytes:
        problem = self.checkpoint_problem(record)
        if problem is not None:
            raise DamagedCheckpoint(f"stored checkpoint of {record.candidate} ({record.key[:12]}): {problem}")
        try:
            return pack_dir(self.root / record.checkpoint)
        except (OSError, ValueError) as e:
            raise DamagedCheckpoint(f"stored checkpoint of {record.candidate} ({record.key[:12]}): {e}") from None

    def checkpoint_path(self, record: ResultRecord) -> Path:
        """The verified folder of a stored checkpoint (for local tools); raises DamagedCheckpoint."""
        problem = self.checkpoint_problem(record)
        if problem is not None:
            raise DamagedCheckpoint(f"stored checkpoint of {record.candidate} ({record.key[:12]}): {problem}")
        return self.root / record.checkpoint


def _checkpoint_problem(path: Path, manifest_sha: str) -> str | None:
    """The manifest's hash first, then every file: only listed artifacts, no links, every hash right."""
    from aitune.checkpoint import CheckpointError, verify_checkpoint

    if path.is_symlink() or not path.is_dir():
        return f"{path} is missing"
    manifest = path / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        return f"{manifest} is missing"
    if sha256_file(manifest) != manifest_sha:
        return f"{manifest} was changed after it was stored (its SHA-256 no longer matches the store's record)"
    try:
        listed = {a.path for a in verify_checkpoint(path).artifacts}
    except CheckpointError as e:
        return str(e)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = full.relative_to(path).as_posix()
            if full.is_symlink():
                return f"{rel} in {path} is a symbolic link; checkpoints hold only their own files"
            if full.is_file() and rel != MANIFEST and rel not in listed:
                return f"{rel} in {path} is not an artifact the manifest lists"
    return None


def _write_atomic(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / name, data)
    return folder / name


def _disk_full(folder: Path) -> bool:
    """Whether the file system under ``folder`` has (almost) no space left for SQLite's files."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 256 * 1024


def _unusable(db_path: Path, e: Exception) -> str:
    name = getattr(e, "sqlite_errorname", "")
    if name == "SQLITE_FULL" or "disk is full" in str(e) or ("I/O error" in str(e) and _disk_full(db_path.parent)):
        return (f"store database {db_path} can't be written: the disk is full ({e}); the store is intact: "
                f"free space on {db_path.parent} and run again")
    if name.startswith("SQLITE_READONLY") or "readonly database" in str(e):
        return f"store database {db_path} can't be written: it is read-only ({e})"
    return (f"store database {db_path} can't be read ({e}): it is damaged or not an orchestrator store; "
            f"move it aside (or restore a backup) and run again")


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} is not JSON-serialisable: {e}") from e


#: field types a stored record's fields are checked against (others are left to the record's own from_dict)
_SIMPLE_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,),
                 "dict[str, Any]": (dict,), "list": (list,)}


def _decode(cls, blob: Any, where: str):
    """A stored JSON record read back (trusted for nothing): StoreError naming where, if it is no ``cls``."""
    import dataclasses

    try:
        data = json.loads(blob)
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        record = cls.from_dict(data)
        for f in dataclasses.fields(record):
            kind = str(f.type).replace(" ", "")
            optional = kind.endswith("|None")
            base = kind.removesuffix("|None").replace(",", ", ")
            value = getattr(record, f.name)
            if base in _SIMPLE_TYPES and not (value is None and (optional or f.default is None)):
                if not isinstance(value, _SIMPLE_TYPES[base]) or (base in ("int", "float") and isinstance(value, bool)):
                    raise TypeError(f"{f.name} is {type(value).__name__}, not {base}")
        return record
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        why = "nested too deep" if isinstance(e, RecursionError) else f"{type(e).__name__}: {e}"
        raise StoreError(f"{where} is not a readable record ({why}); the store was edited or damaged") from None


def _sweep_info(row: tuple, db_path: Path | None = None) -> SweepInfo:
    sweep_id, name, spec_json, started_at, finished_at, status, heartbeat_at, lease_s = row
    try:
        spec = json.loads(spec_json)
    except (TypeError, ValueError, RecursionError) as e:
        raise StoreError(f"store {db_path}: the spec of sweep {sweep_id} is not JSON ({type(e).__name__}); "
                         f"the store was edited or damaged") from None
    return SweepInfo(
        id=sweep_id, name=name, spec=spec, started_at=started_at, finished_at=finished_at,
        status=effective_status(status, heartbeat_at, lease_s), heartbeat_at=heartbeat_at,
    )
