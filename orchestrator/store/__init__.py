"""Where sweeps keep results, checkpoints, references, decisions and deployments. Imports no other stage, nor Ray.

``ResultStore`` is the interface; ``SqliteStore`` (SQLite records and a content-addressed folder,
the default) and ``MemoryStore`` (for tests and simulations) implement it. Its modules:

- ``base``: ``ResultStore``, every rule written once over the storage primitives of ``primitives``
- ``rows``: errors, ``SweepInfo`` and ``SweepStatus``, stored rows and how they are read back
- ``sqlite`` and ``sqlite_schema``: the embedded store, and its database file (schema, migrations)
- ``blobs``: the content-addressed checkpoint and outputs folder, and reference files
- ``in_memory``: ``MemoryStore``
- ``serving_points``: the serving search's measured points, kept so a rerun measures nothing twice
"""

from orchestrator.store.base import DEFAULT_LEASE_S, DamagedCheckpoint, ResultStore, StoreError, SweepInfo
from orchestrator.store.in_memory import MemoryStore
from orchestrator.store.rows import SweepStatus
from orchestrator.store.sqlite import DB_NAME, SCHEMA_VERSION, SqliteStore

__all__ = [
    "DB_NAME", "DEFAULT_LEASE_S", "SCHEMA_VERSION", "DamagedCheckpoint", "MemoryStore", "ResultStore", "SqliteStore",
    "StoreError", "SweepInfo", "SweepStatus",
]
