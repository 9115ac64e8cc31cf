"""The embedded store: SQLite for records, content-addressed folders for checkpoints and outputs.

Layout under the store root::

    store.sqlite                        sweeps, results (appended), claims, selections, deployments
    checkpoints/<sha[:2]>/<sha>/        one unpacked checkpoint per manifest SHA-256
    outputs/<sha>.pt                    a candidate's outputs on its check samples (for re-checks)
    references/<ref_key>.pt             reference outputs, shared by every candidate of a model

Every write is one transaction, committed before the method returns. The rules are ``ResultStore``'s
(``orchestrator.store.base``); here are only the rows they read and write, the files are ``blobs``'s,
and the database file itself (schema, migrations, opening) is ``sqlite_schema``'s.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.records import BUILT, REUSED, ResultRecord
from orchestrator.store.base import ResultStore
from orchestrator.store.blobs import BlobFolder
from orchestrator.store.rows import DEFAULT_LEASE_S, ResultRow, StoreError, SweepRow
from orchestrator.store.sqlite_schema import (
    DB_NAME,
    SCHEMA_VERSION,
    check_pages,
    connect,
    create_or_migrate,
    readable_version,
    unusable,
)

__all__ = ["DB_NAME", "SCHEMA_VERSION", "SqliteStore"]

_RESULT_COLUMNS = "id, sweep_id, key, record_json, source_id, how"


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
        self._blobs = BlobFolder(self.root)
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
        self._conn = connect(self.db_path, self.readonly)
        try:
            self._init_schema()
            check_pages(self._conn, self.db_path)
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise StoreError(unusable(self.db_path, e)) from None
        except BaseException:
            self._conn.close()
            raise

    @property
    def _where(self) -> str:
        return f"store {self.db_path}"

    def _init_schema(self) -> None:
        if self.readonly:
            found = readable_version(self._conn, self.root, self.db_path)
        else:
            with self._tx() as db:
                create_or_migrate(db, self.root)
            found = SCHEMA_VERSION
        # A store of version 2 read as it is has no objective column: every sweep's objective reads None.
        self._objective = "objective" if found >= 3 else "NULL"

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
                raise StoreError(unusable(self.db_path, e)) from None
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise

    _write = _tx

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.DatabaseError as e:
                raise StoreError(unusable(self.db_path, e)) from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- sweeps -------------------------------------------------------------------------------

    def _insert_sweep(self, db: sqlite3.Connection, row: SweepRow) -> None:
        db.execute(
            "INSERT INTO sweeps (id, name, spec_json, started_at, finished_at, status, heartbeat_at, lease_s, host, "
            "pid, objective) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.id, row.name, row.spec_json, row.started_at, row.finished_at, row.status, row.heartbeat_at,
             row.lease_s, socket.gethostname(), os.getpid(), row.objective),
        )

    def _set_heartbeat(self, db: sqlite3.Connection, sweep_id: str, at: float) -> None:
        db.execute("UPDATE sweeps SET heartbeat_at = ? WHERE id = ?", (at, sweep_id))

    def _set_finished(self, db: sqlite3.Connection, sweep_id: str, status: str, at: float) -> None:
        db.execute("UPDATE sweeps SET finished_at = ?, status = ? WHERE id = ?", (at, status, sweep_id))

    def _has_sweep(self, db: sqlite3.Connection, sweep_id: str) -> bool:
        return db.execute("SELECT 1 FROM sweeps WHERE id = ?", (sweep_id,)).fetchone() is not None

    def _sweep_ids(self, db: sqlite3.Connection) -> list[str]:
        return [r[0] for r in db.execute("SELECT id FROM sweeps ORDER BY started_at, id")]

    def _sweep_rows(self, db: sqlite3.Connection, sweep_id: str | None = None) -> list[SweepRow]:
        rows = db.execute(
            "SELECT s.id, s.name, s.spec_json, s.started_at, s.finished_at, s.status, s.heartbeat_at, s.lease_s, "
            f"{self._objective}, "
            "(SELECT COUNT(*) FROM results r WHERE r.sweep_id = s.id), "
            "(SELECT COALESCE(SUM(r.how != ?), 0) FROM results r WHERE r.sweep_id = s.id) "
            f"FROM sweeps s {'' if sweep_id is None else 'WHERE s.id = ?'} ORDER BY s.started_at, s.id",
            (BUILT,) if sweep_id is None else (BUILT, sweep_id),
        ).fetchall()
        return [SweepRow(*row) for row in rows]

    # -- claims -------------------------------------------------------------------------------

    def _claim_of(self, db: sqlite3.Connection, key: str) -> tuple[str, float] | None:
        return db.execute("SELECT owner, expires_at FROM claims WHERE key = ?", (key,)).fetchone()

    def _put_claim(self, db: sqlite3.Connection, key: str, owner: str, expires_at: float) -> None:
        db.execute(
            "INSERT INTO claims (key, owner, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at",
            (key, owner, expires_at),
        )

    def _drop_claims(self, db: sqlite3.Connection, owner: str, key: str | None = None) -> None:
        if key is None:
            db.execute("DELETE FROM claims WHERE owner = ?", (owner,))
        else:
            db.execute("DELETE FROM claims WHERE key = ? AND owner = ?", (key, owner))

    def _renew_claims(self, db: sqlite3.Connection, owner: str, expires_at: float) -> None:
        db.execute("UPDATE claims SET expires_at = ? WHERE owner = ?", (expires_at, owner))

    # -- results ------------------------------------------------------------------------------

    def _result_row(self, db: sqlite3.Connection, result_id: Any) -> ResultRow | None:
        row = db.execute(f"SELECT {_RESULT_COLUMNS} FROM results WHERE id = ?", (result_id,)).fetchone()
        return None if row is None else ResultRow(*row)

    def _has_result(self, db: sqlite3.Connection, sweep_id: str, key: str) -> bool:
        found = db.execute("SELECT 1 FROM results WHERE sweep_id = ? AND key = ?", (sweep_id, key)).fetchone()
        return found is not None

    def _insert_result(self, db: sqlite3.Connection, sweep_id: str, record: ResultRecord, how: str,
                       source_id: int | None, blob: str | None, created_at: float) -> int:
        cur = db.execute(
            "INSERT INTO results (sweep_id, key, eval_key, how, source_id, status, model, batch_size, candidate, "
            "record_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sweep_id, record.key, record.eval_key, how, source_id, record.status, record.model,
             record.batch_size, record.candidate, blob, created_at),
        )
        return cur.lastrowid

    def _rows_for_keys(self, db: sqlite3.Connection, keys: list[str]) -> list[ResultRow]:
        rows: list[tuple] = []
        for start in range(0, len(keys), 500):  # stay well under SQLite's bound-parameter limit
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows += db.execute(
                f"SELECT {_RESULT_COLUMNS} FROM results WHERE key IN ({marks}) AND how != ? ORDER BY id DESC",
                [*chunk, REUSED],
            ).fetchall()
        return [ResultRow(*row) for row in rows]

    def _sweep_result_rows(self, db: sqlite3.Connection, sweep_id: str) -> list[tuple[ResultRow, ResultRow | None]]:
        rows = db.execute(
            "SELECT r.id, r.sweep_id, r.key, r.record_json, r.source_id, r.how, "
            "s.id, s.sweep_id, s.key, s.record_json, s.source_id, s.how FROM results r "
            "LEFT JOIN results s ON s.id = r.source_id WHERE r.sweep_id = ? "
            "ORDER BY r.model, r.batch_size, r.candidate, r.key", (sweep_id,),
        ).fetchall()
        return [(ResultRow(*row[:6]), None if row[6] is None else ResultRow(*row[6:])) for row in rows]

    # -- selections and deployments -----------------------------------------------------------

    def _put_selection(self, db: sqlite3.Connection, sweep_id: str, group: tuple[str, int, str, str], blob: str) -> None:
        db.execute(
            "INSERT OR REPLACE INTO selections (sweep_id, model, batch_size, device_class_key, shape, record_json) "
            "VALUES (?, ?, ?, ?, ?, ?)", (sweep_id, *group, blob),
        )

    def _selection_blobs(self, db: sqlite3.Connection, sweep_id: str) -> list[str]:
        return _column(db.execute(
            "SELECT record_json FROM selections WHERE sweep_id = ? ORDER BY model, batch_size, device_class_key",
            (sweep_id,),
        ))

    def _append_deploy(self, db: sqlite3.Connection, sweep_id: str, blob: str) -> None:
        (seq,) = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM deployments WHERE sweep_id = ?",
                            (sweep_id,)).fetchone()
        db.execute("INSERT INTO deployments (sweep_id, seq, record_json) VALUES (?, ?, ?)", (sweep_id, seq, blob))

    def _deploy_blobs(self, db: sqlite3.Connection, sweep_id: str) -> list[str]:
        return _column(db.execute("SELECT record_json FROM deployments WHERE sweep_id = ? ORDER BY seq", (sweep_id,)))

    def _append_install(self, db: sqlite3.Connection, sweep_id: str, at: float, blob: str) -> None:
        db.execute("INSERT INTO installs (sweep_id, at, record_json) VALUES (?, ?, ?)", (sweep_id, at, blob))

    def _install_rows(self, db: sqlite3.Connection) -> list[tuple[int, str]]:
        return db.execute("SELECT id, record_json FROM installs ORDER BY id").fetchall()

    # -- files --------------------------------------------------------------------------------

    def _put_checkpoint(self, data: bytes) -> tuple[str, str]:
        return self._blobs.put_checkpoint(data)

    def _put_outputs(self, data: bytes) -> str:
        return self._blobs.put_hashed("outputs", data)

    def _put_reference(self, ref_key: str, data: bytes) -> None:
        rel = self._blobs.put_named("references", f"{ref_key}.pt", data)
        with self._tx() as db:
            db.execute('INSERT OR REPLACE INTO "references" (key, path, sha256) VALUES (?, ?, ?)',
                       (ref_key, rel, hashlib.sha256(data).hexdigest()))

    def reference_bytes(self, ref_key: str) -> bytes | None:
        with self._read() as db:
            rows = db.execute('SELECT path, sha256 FROM "references" WHERE key = ?', (ref_key,)).fetchall()
        return self._blobs.read_checked(rows[0][0], rows[0][1]) if rows else None

    def _outputs_bytes(self, where: str) -> bytes | None:
        return self._blobs.read_checked(where, Path(where).stem)

    def _checkpoint_problem(self, where: str, manifest_sha: str) -> str | None:
        return self._blobs.checkpoint_problem(where, manifest_sha)

    def _checkpoint_bytes(self, where: str) -> bytes:
        return self._blobs.checkpoint_bytes(where)

    def checkpoint_path(self, record: ResultRecord) -> Path:
        """The verified folder of a stored checkpoint (for local tools); raises DamagedCheckpoint."""
        problem = self.checkpoint_problem(record)
        if problem is not None:
            raise self._damaged(record, problem)
        return self.root / record.checkpoint


def _column(cursor: Iterable[tuple]) -> list[Any]:
    return [row[0] for row in cursor]
