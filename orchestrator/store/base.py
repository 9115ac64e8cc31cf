"""The store's interface and the rules every implementation keeps.

The guarantees (the README states them for users):

- History is appended, never rewritten: each sweep adds one row per artifact key it looked at.
  A row the sweep took unchanged points at the row it reuses, so a sweep's report can be
  regenerated exactly at any later time.
- Every finished result is committed before the driver waits for the next one.
- Checkpoints are kept by the SHA-256 of their manifest, recorded at commit; every read checks
  it before anything else in the folder is read.
- Drivers that share a store claim an artifact key before building it, with a lease their
  heartbeat renews. A claim whose driver stopped heartbeating expires; so does its sweep, which
  then shows as ``interrupted``.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.records import DeployRecord, ResultRecord, SelectionRecord

#: seconds a claim or a sweep's heartbeat holds without renewal
DEFAULT_LEASE_S = 30.0

RUNNING, DONE, INTERRUPTED = "running", "done", "interrupted"

# Keys become directory and file names: allow nothing that could climb out or hide.
_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


class StoreError(RuntimeError):
    """The store cannot be used (not a store, corrupt, wrong schema, unwritable); one clear line."""


class DamagedCheckpoint(StoreError):
    """A stored checkpoint is missing, changed or holds something it shouldn't; it counts as absent."""


@dataclass
class SweepInfo:
    id: str
    name: str
    spec: dict[str, Any]
    started_at: float
    finished_at: float | None
    #: running | done | interrupted | failed: <why>; a running sweep without heartbeat reads interrupted
    status: str
    heartbeat_at: float | None = None
    candidates: int = 0
    from_store: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == DONE

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "spec": self.spec, "started_at": self.started_at,
            "finished_at": self.finished_at, "status": self.status, "heartbeat_at": self.heartbeat_at,
            "candidates": self.candidates, "from_store": self.from_store, "complete": self.complete,
        }


def effective_status(status: str, heartbeat_at: float | None, lease_s: float, now: float | None = None) -> str:
    """A sweep whose driver stopped renewing its heartbeat is no longer running: it was interrupted."""
    now = time.time() if now is None else now
    if status == RUNNING and (heartbeat_at is None or now - heartbeat_at > lease_s):
        return INTERRUPTED
    return status


def check_key(key: object, what: str) -> str:
    if not isinstance(key, str) or not _SAFE_KEY.match(key):
        raise ValueError(f"{what} must be a non-empty string of letters, digits, '_', '-' or '.', got {key!r}")
    return key


class ResultStore(ABC):
    """What the sweep pipeline needs from a store; every method is one transaction."""

    lease_s: float = DEFAULT_LEASE_S

    # -- sweeps ---------------------------------------------------------------------------------
    @abstractmethod
    def begin_sweep(self, name: str, spec: dict) -> str: ...

    @abstractmethod
    def heartbeat(self, sweep_id: str) -> None:
        """Renew the sweep's heartbeat and every claim it holds."""

    @abstractmethod
    def finish_sweep(self, sweep_id: str, status: str) -> None: ...

    @abstractmethod
    def list_sweeps(self) -> list[SweepInfo]: ...

    @abstractmethod
    def sweep_info(self, sweep_id: str) -> SweepInfo: ...

    def latest_sweep_id(self) -> str | None:
        sweeps = self.list_sweeps()
        return sweeps[-1].id if sweeps else None

    # -- claims ---------------------------------------------------------------------------------
    @abstractmethod
    def claim(self, key: str, owner: str) -> str | None:
        """Claim ``key`` for ``owner``; returns None when claimed, else the owner that holds it."""

    @abstractmethod
    def release(self, key: str, owner: str) -> None: ...

    # -- results --------------------------------------------------------------------------------
    @abstractmethod
    def add_result(self, sweep_id: str, record: ResultRecord, checkpoint: bytes | None = None,
                   outputs: bytes | None = None) -> ResultRecord:
        """Append what ``sweep_id`` found for one artifact key; returns the stored copy (with its id).

        A re-checked or re-measured record (``record.source`` set) keeps its source's checkpoint.
        """

    @abstractmethod
    def add_reuse(self, sweep_id: str, source: ResultRecord) -> ResultRecord:
        """Record that ``sweep_id`` took the stored result ``source`` unchanged."""

    @abstractmethod
    def results_for(self, keys: Iterable[str]) -> dict[str, list[ResultRecord]]:
        """Every result stored for each artifact key (reuses not repeated), newest first."""

    @abstractmethod
    def sweep_results(self, sweep_id: str) -> list[ResultRecord]:
        """What ``sweep_id`` recorded, reuses resolved to what they reuse (``how == "reused"``)."""

    # -- selections and deployments -------------------------------------------------------------
    @abstractmethod
    def put_selection(self, sweep_id: str, selection: SelectionRecord) -> None: ...

    @abstractmethod
    def selections(self, sweep_id: str) -> list[SelectionRecord]: ...

    @abstractmethod
    def put_deploy(self, sweep_id: str, deploy: DeployRecord) -> None: ...

    @abstractmethod
    def deployments(self, sweep_id: str) -> list[DeployRecord]: ...

    @abstractmethod
    def put_install(self, deploy: DeployRecord) -> None:
        """Record one install or rollback on a target (``deploy.sweep_id`` names the winners' sweep).

        Kept apart from a sweep's own ``deployments`` so that deploying past winners later never
        changes that sweep's report; every install is appended, never rewritten.
        """

    @abstractmethod
    def installs(self) -> list[DeployRecord]:
        """Every install and rollback, oldest first: the last one per place is what is live there."""

    # -- files ----------------------------------------------------------------------------------
    @abstractmethod
    def put_reference(self, ref_key: str, data: bytes) -> None: ...

    @abstractmethod
    def reference_bytes(self, ref_key: str) -> bytes | None: ...

    def has_reference(self, ref_key: str) -> bool:
        return self.reference_bytes(ref_key) is not None

    @abstractmethod
    def checkpoint_bytes(self, record: ResultRecord) -> bytes:
        """The packed checkpoint of ``record``, its manifest checked first; raises DamagedCheckpoint."""

    @abstractmethod
    def checkpoint_problem(self, record: ResultRecord) -> str | None:
        """Why the stored checkpoint of ``record`` can't be used (None: it is sound)."""

    @abstractmethod
    def outputs_bytes(self, record: ResultRecord) -> bytes | None:
        """The candidate's stored outputs on its check samples, when the store has them intact."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
