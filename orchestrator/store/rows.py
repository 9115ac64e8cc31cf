"""What the store hands out and keeps: its errors, a sweep's record and status, and stored rows read back.

A stored row is read back trusted for nothing: a record that is not JSON, or not the record it should be,
is a ``StoreError`` naming where it was found (:func:`decode`), never a traceback deep in a report.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from orchestrator.records import StrEnum

#: seconds a claim or a sweep's heartbeat holds without renewal
DEFAULT_LEASE_S = 30.0

# Keys become directory and file names: allow nothing that could climb out or hide.
_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


class StoreError(RuntimeError):
    """The store cannot be used (not a store, corrupt, wrong schema, unwritable); one clear line."""


class DamagedCheckpoint(StoreError):
    """A stored checkpoint is missing, changed or holds something it shouldn't; it counts as absent."""


class SweepStatus(StrEnum):
    """Where a sweep stands. A sweep that failed has the status ``failed: <why>``, a plain string.

    The members are strings (``SweepStatus.DONE == "done"``) and print, format and serialise as their value,
    so what is stored and written to JSON is the bare word.
    """

    RUNNING = "running"
    DONE = "done"
    #: a running sweep whose driver stopped heartbeating; it is read so, never stored
    INTERRUPTED = "interrupted"

    @classmethod
    def of(cls, status: str) -> SweepStatus | str:
        """``status`` as a member when it names one, else as it is (``failed: <why>``)."""
        try:
            return cls(status)
        except ValueError:
            return status


RUNNING, DONE, INTERRUPTED = SweepStatus.RUNNING, SweepStatus.DONE, SweepStatus.INTERRUPTED


@dataclass
class SweepInfo:
    id: str
    name: str
    spec: dict[str, Any]
    started_at: float
    finished_at: float | None
    #: running | done | interrupted | failed: <why>; a running sweep without heartbeat reads interrupted
    status: SweepStatus | str
    heartbeat_at: float | None = None
    candidates: int = 0
    from_store: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: what the sweep's winners were chosen for (the spec's objective), when its driver said so
    objective: str | None = None

    @property
    def complete(self) -> bool:
        return self.status == DONE

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "spec": self.spec, "started_at": self.started_at,
            "finished_at": self.finished_at, "status": str(self.status), "heartbeat_at": self.heartbeat_at,
            "candidates": self.candidates, "from_store": self.from_store, "complete": self.complete,
            "objective": self.objective,
        }


@dataclass
class SweepRow:
    """A sweep as a store keeps it (its spec as JSON, its status as written), with its result counts."""

    id: str
    name: str
    spec_json: str
    started_at: float
    finished_at: float | None
    status: str
    heartbeat_at: float | None
    lease_s: float
    objective: str | None = None
    candidates: int = 0
    from_store: int = 0


@dataclass(frozen=True)
class ResultRow:
    """One row of a store's results: a record as JSON, or (``record`` None) a reuse of the row ``source_id``."""

    id: int
    sweep_id: str
    key: str
    record: str | None
    source_id: int | None
    how: str


def effective_status(status: str, heartbeat_at: float | None, lease_s: float,
                     now: float | None = None) -> SweepStatus | str:
    """A sweep whose driver stopped renewing its heartbeat is no longer running: it was interrupted."""
    now = time.time() if now is None else now
    if status == RUNNING and (heartbeat_at is None or now - heartbeat_at > lease_s):
        return INTERRUPTED
    return SweepStatus.of(status)


def check_key(key: object, what: str) -> str:
    if not isinstance(key, str) or not _SAFE_KEY.match(key):
        raise ValueError(f"{what} must be a non-empty string of letters, digits, '_', '-' or '.', got {key!r}")
    return key


def dumps(value: Any, what: str) -> str:
    """``value`` as the JSON the store keeps; TypeError naming ``what`` if it is not JSON."""
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} is not JSON-serialisable: {e}") from e


#: field types a stored record's fields are checked against (others are left to the record's own from_dict)
_SIMPLE_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,),
                 "dict[str, Any]": (dict,), "list": (list,)}


def decode(cls, blob: Any, where: str):
    """A stored JSON record read back (trusted for nothing): StoreError naming where, if it is no ``cls``."""
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
            if base not in _SIMPLE_TYPES or (value is None and (optional or f.default is None)):
                continue
            if not isinstance(value, _SIMPLE_TYPES[base]) or (base in ("int", "float") and isinstance(value, bool)):
                raise TypeError(f"{f.name} is {type(value).__name__}, not {base}")
        return record
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        why = "nested too deep" if isinstance(e, RecursionError) else f"{type(e).__name__}: {e}"
        raise StoreError(f"{where} is not a readable record ({why}); the store was edited or damaged") from None


def sweep_info(row: SweepRow, where: str) -> SweepInfo:
    """The ``SweepInfo`` of a stored sweep: its spec read back (StoreError if it is not JSON), its status as of now."""
    try:
        spec = json.loads(row.spec_json)
    except (TypeError, ValueError, RecursionError) as e:
        raise StoreError(f"{where}: the spec of sweep {row.id} is not JSON ({type(e).__name__}); "
                         f"the store was edited or damaged") from None
    return SweepInfo(
        id=row.id, name=row.name, spec=spec, started_at=row.started_at, finished_at=row.finished_at,
        status=effective_status(row.status, row.heartbeat_at, row.lease_s), heartbeat_at=row.heartbeat_at,
        candidates=row.candidates, from_store=row.from_store, objective=row.objective,
    )
