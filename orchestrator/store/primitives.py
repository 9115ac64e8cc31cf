"""The storage primitives a store implements: rows and files, and no rule of their own.

``ResultStore`` (``orchestrator.store.base``) writes every rule once over these; ``SqliteStore`` and
``MemoryStore`` implement them. A primitive that takes ``tx`` runs inside the one transaction that
``_write()`` (or, to read, ``_read()``) opened and yielded; it neither commits nor checks anything itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any

from orchestrator.records import ResultRecord
from orchestrator.store.rows import ResultRow, SweepRow


class Storage(ABC):
    """Where a store keeps its sweeps, results, claims, decisions and files."""

    def _require_writable(self) -> None:
        """Raise StoreError when nothing may be written here (before any file is)."""

    @abstractmethod
    def _write(self) -> AbstractContextManager[Any]:
        """One write transaction; yields the ``tx`` the primitives take."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[Any]:
        """A consistent read; yields the ``tx`` the primitives take."""

    @abstractmethod
    def _insert_sweep(self, tx: Any, row: SweepRow) -> None: ...

    @abstractmethod
    def _set_heartbeat(self, tx: Any, sweep_id: str, at: float) -> None: ...

    @abstractmethod
    def _set_finished(self, tx: Any, sweep_id: str, status: str, at: float) -> None: ...

    @abstractmethod
    def _has_sweep(self, tx: Any, sweep_id: str) -> bool: ...

    @abstractmethod
    def _sweep_ids(self, tx: Any) -> list[str]:
        """Every sweep's id, by start time, then id."""

    @abstractmethod
    def _sweep_rows(self, tx: Any, sweep_id: str | None = None) -> list[SweepRow]:
        """Every sweep (or only ``sweep_id``) with its counts of results and of those not built, by start time."""

    @abstractmethod
    def _claim_of(self, tx: Any, key: str) -> tuple[str, float] | None:
        """(owner, expires_at) of the claim on ``key``, expired or not."""

    @abstractmethod
    def _put_claim(self, tx: Any, key: str, owner: str, expires_at: float) -> None: ...

    @abstractmethod
    def _drop_claims(self, tx: Any, owner: str, key: str | None = None) -> None:
        """Delete the claims ``owner`` holds (only that on ``key``, when given)."""

    @abstractmethod
    def _renew_claims(self, tx: Any, owner: str, expires_at: float) -> None: ...

    @abstractmethod
    def _result_row(self, tx: Any, result_id: Any) -> ResultRow | None: ...

    @abstractmethod
    def _has_result(self, tx: Any, sweep_id: str, key: str) -> bool: ...

    @abstractmethod
    def _insert_result(self, tx: Any, sweep_id: str, record: ResultRecord, how: str, source_id: int | None,
                       blob: str | None, created_at: float) -> int:
        """Append a row (``blob`` None: a reuse of ``source_id``), its summary columns from ``record``; its id."""

    @abstractmethod
    def _rows_for_keys(self, tx: Any, keys: list[str]) -> list[ResultRow]:
        """The rows holding a record (no reuse rows) for any of ``keys``, newest first."""

    @abstractmethod
    def _sweep_result_rows(self, tx: Any, sweep_id: str) -> list[tuple[ResultRow, ResultRow | None]]:
        """The sweep's rows, each with the row it reuses (None: none, or missing), by model, batch, candidate, key."""

    @abstractmethod
    def _put_selection(self, tx: Any, sweep_id: str, group: tuple[str, int, str], blob: str) -> None:
        """Keep ``blob`` as the sweep's selection for ``group``, replacing any earlier one."""

    @abstractmethod
    def _selection_blobs(self, tx: Any, sweep_id: str) -> list[str]:
        """The sweep's selections, by group."""

    @abstractmethod
    def _append_deploy(self, tx: Any, sweep_id: str, blob: str) -> None: ...

    @abstractmethod
    def _deploy_blobs(self, tx: Any, sweep_id: str) -> list[str]:
        """The sweep's deployments, in the order they were added."""

    @abstractmethod
    def _append_install(self, tx: Any, sweep_id: str, at: float, blob: str) -> None: ...

    @abstractmethod
    def _install_rows(self, tx: Any) -> list[tuple[int, str]]:
        """(id, record) of every install, oldest first."""

    @abstractmethod
    def _put_checkpoint(self, data: bytes) -> tuple[str, str]:
        """Keep a packed checkpoint by its manifest's SHA-256; (where it is, that SHA). ValueError if it is none."""

    @abstractmethod
    def _put_outputs(self, data: bytes) -> str:
        """Keep outputs by their SHA-256; where they are."""

    @abstractmethod
    def _put_reference(self, ref_key: str, data: bytes) -> None: ...

    @abstractmethod
    def reference_bytes(self, ref_key: str) -> bytes | None:
        """The reference outputs under ``ref_key``, when the store has them intact."""

    @abstractmethod
    def _checkpoint_problem(self, where: str, manifest_sha: str) -> str | None: ...

    @abstractmethod
    def _checkpoint_bytes(self, where: str) -> bytes:
        """The checkpoint packed, once found sound (OSError or ValueError if it can't be)."""

    @abstractmethod
    def _outputs_bytes(self, where: str) -> bytes | None:
        """The outputs kept there, when they are intact."""
