"""Where sweeps keep what they learn (results, checkpoints, references, decisions, deployments). Imports no other stage, nor Ray.

``ResultStore`` is the interface; ``SqliteStore`` (SQLite records and a content-addressed folder,
the default) and ``MemoryStore`` (for tests and simulations) implement it.
"""

from orchestrator.store.base import DEFAULT_LEASE_S, DamagedCheckpoint, ResultStore, StoreError, SweepInfo
from orchestrator.store.in_memory import MemoryStore
from orchestrator.store.sqlite import DB_NAME, SCHEMA_VERSION, SqliteStore

__all__ = [
    "DB_NAME", "DEFAULT_LEASE_S", "DamagedCheckpoint", "MemoryStore", "ResultStore", "SCHEMA_VERSION",
    "SqliteStore", "StoreError", "SweepInfo",
]
