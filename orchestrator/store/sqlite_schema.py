"""The SQLite file of a store: its schema and migrations, opening it (read-only too), and its errors in one line.

Schema versions: 2 is the first this code opens; 3 adds the sweep's ``objective``; 4 adds the
selections' ``shape`` (the shape point of a model whose axes vary) to their key. A store of version 2 is
migrated when it is opened for writing, and read as it is (every objective None) when opened read-only.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from orchestrator.store.rows import StoreError

SCHEMA_VERSION = 4
DB_NAME = "store.sqlite"

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
    pid INTEGER,
    objective TEXT
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
    shape TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (sweep_id, model, batch_size, device_class_key, shape)
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
CREATE TABLE IF NOT EXISTS serving_points (
    key TEXT PRIMARY KEY,
    record_json TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS "references" (
    key TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
"""

#: version -> the statements that bring a store of that version to the next
MIGRATIONS: dict[int, tuple[str, ...]] = {
    2: ("ALTER TABLE sweeps ADD COLUMN objective TEXT",),
    3: ("CREATE TABLE selections_4 (sweep_id TEXT NOT NULL REFERENCES sweeps(id), model TEXT NOT NULL, "
        "batch_size INTEGER NOT NULL, device_class_key TEXT NOT NULL, record_json TEXT NOT NULL, "
        "shape TEXT NOT NULL DEFAULT '', PRIMARY KEY (sweep_id, model, batch_size, device_class_key, shape))",
        "INSERT INTO selections_4 (sweep_id, model, batch_size, device_class_key, record_json) "
        "SELECT sweep_id, model, batch_size, device_class_key, record_json FROM selections",
        "DROP TABLE selections",
        "ALTER TABLE selections_4 RENAME TO selections"),
}


def connect(db_path: Path, readonly: bool) -> sqlite3.Connection:
    """The store's one connection: WAL and foreign keys to write, or reading without creating any file."""
    try:
        if not readonly:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, a transaction is one method.
            conn = sqlite3.connect(db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
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
        uri = db_path.resolve().as_uri()
        if not db_path.with_name(f"{DB_NAME}-wal").exists():
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
        raise StoreError(unusable(db_path, e)) from None


def check_pages(conn: sqlite3.Connection, db_path: Path) -> None:
    """SQLite's own check of every page, at open: a damaged page is found before anything starts
    (Ray, workers), not halfway through a sweep."""
    (answer,) = conn.execute("PRAGMA quick_check(1)").fetchone()
    if answer != "ok":
        answer = " ".join(str(answer).replace("*** in database main ***", "").split())
        raise StoreError(f"store database {db_path} is damaged ({answer}): move it aside "
                         f"(or restore a backup) and run again")


def readable_version(db: sqlite3.Connection, root: Path, db_path: Path) -> int:
    """The schema version of a store opened read-only: one this code reads, or StoreError."""
    found = schema_version(db)
    if found is None:
        raise StoreError(f"{db_path} is not an orchestrator store (it has no schema version)")
    require_version(found, root)
    return found


def create_or_migrate(db: sqlite3.Connection, root: Path) -> None:
    """Inside a write transaction: create the schema, or bring an older store's to this version."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    found = schema_version(db)
    if found is not None:
        require_version(found, root)
    # Statement by statement: executescript() would COMMIT our transaction halfway.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    for version in range(found or SCHEMA_VERSION, SCHEMA_VERSION):
        for statement in MIGRATIONS[version]:
            db.execute(statement)
    if found != SCHEMA_VERSION:
        db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))


def schema_version(db: sqlite3.Connection) -> int | None:
    try:
        row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    except sqlite3.OperationalError:
        return None
    return row[0]


def require_version(found: int, root: Path) -> None:
    """Refuse a store whose schema this code neither has nor migrates, naming both versions."""
    if found != SCHEMA_VERSION and found not in MIGRATIONS:
        newer = "newer than" if found > SCHEMA_VERSION else "older than"
        raise StoreError(
            f"store {root} has schema version {found}, {newer} the version this code knows "
            f"({SCHEMA_VERSION}); use a matching aitune-orchestrator, or move {root} aside and start a new store"
        )


def _disk_full(folder: Path) -> bool:
    """Whether the file system under ``folder`` has (almost) no space left for SQLite's files."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 256 * 1024


def unusable(db_path: Path, e: Exception) -> str:
    """One line saying why the database at ``db_path`` can't be used (full disk, read-only, damaged)."""
    name = getattr(e, "sqlite_errorname", "")
    if name == "SQLITE_FULL" or "disk is full" in str(e) or ("I/O error" in str(e) and _disk_full(db_path.parent)):
        return (f"store database {db_path} can't be written: the disk is full ({e}); the store is intact: "
                f"free space on {db_path.parent} and run again")
    if name.startswith("SQLITE_READONLY") or "readonly database" in str(e):
        return f"store database {db_path} can't be written: it is read-only ({e})"
    return (f"store database {db_path} can't be read ({e}): it is damaged or not an orchestrator store; "
            f"move it aside (or restore a backup) and run again")
