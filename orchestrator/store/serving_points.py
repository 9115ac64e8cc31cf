"""Measured serving points (orchestrator.deploy.serving_search), kept so that a rerun measures nothing twice.

One row per point, keyed by the SHA-256 of what the point depends on (the installed versions,
the device class, the settings, the concurrency and the load parameters): a plain JSON record.
In a SQLite store the ``serving_points`` table (created with the schema; a store opened
read-only before it existed reads none); in a MemoryStore a dictionary of its own.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from orchestrator.store.base import ResultStore


def stored_point(store: ResultStore | None, key: str) -> dict[str, Any] | None:
    """The record kept under ``key``, or None (no store, nothing kept, or a record that is not JSON)."""
    if store is None:
        return None
    table = getattr(store, "_serving_points", None)
    if table is not None or not hasattr(store, "_conn"):
        return (table or {}).get(key)
    try:
        with store._read() as db:
            row = db.execute("SELECT record_json FROM serving_points WHERE key = ?", (key,)).fetchone()
    except sqlite3.OperationalError:  # a store written before the table existed, opened read-only
        return None
    try:
        record = json.loads(row[0]) if row else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def put_point(store: ResultStore | None, key: str, record: dict[str, Any]) -> None:
    """Keep ``record`` under ``key`` (a later one under the same key replaces it)."""
    if store is None:
        return
    if not hasattr(store, "_conn"):
        if getattr(store, "_serving_points", None) is None:
            store._serving_points = {}
        store._serving_points[key] = dict(record)
        return
    with store._tx() as db:
        db.execute("INSERT OR REPLACE INTO serving_points (key, record_json, created_at) VALUES (?, ?, ?)",
                   (key, json.dumps(record, sort_keys=True), time.time()))
