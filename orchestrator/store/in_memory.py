"""A store that lives in one process's memory: the rules of ``ResultStore``, rows in dicts, for tests and simulations.

Records are kept as the JSON SQLite would keep, so what is read back is a fresh copy that shares nothing
with the caller's, exactly as from the embedded store.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from orchestrator.records import BUILT, REUSED, ResultRecord
from orchestrator.store.base import ResultStore
from orchestrator.store.blobs import manifest_sha
from orchestrator.store.rows import DEFAULT_LEASE_S, ResultRow, SweepRow

_PREFIX = "memory:"


class MemoryStore(ResultStore):
    root = None
    _where = "memory store"

    def __init__(self, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.lease_s = lease_s
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._sweeps: dict[str, SweepRow] = {}
        #: id -> the row, and what it sorts by within its sweep (model, batch size, candidate, key)
        self._rows: dict[int, tuple[ResultRow, tuple]] = {}
        self._recorded: set[tuple[str, str]] = set()  # (sweep id, key) of every row
        self._claims: dict[str, tuple[str, float]] = {}
        self._selections: dict[str, dict[tuple, str]] = {}
        self._deploys: dict[str, list[str]] = {}
        self._installs: list[str] = []
        self._refs: dict[str, bytes] = {}
        self._blobs: dict[str, bytes] = {}  # sha256 -> bytes (checkpoints by manifest sha, outputs by their own)

    @contextmanager
    def _write(self) -> Iterator[None]:
        with self._lock:
            yield None

    _read = _write

    # -- sweeps -------------------------------------------------------------------------------

    def _insert_sweep(self, tx: None, row: SweepRow) -> None:
        self._sweeps[row.id] = SweepRow(**row.__dict__)

    def _set_heartbeat(self, tx: None, sweep_id: str, at: float) -> None:
        if sweep_id in self._sweeps:
            self._sweeps[sweep_id].heartbeat_at = at

    def _set_finished(self, tx: None, sweep_id: str, status: str, at: float) -> None:
        self._sweeps[sweep_id].status, self._sweeps[sweep_id].finished_at = status, at

    def _has_sweep(self, tx: None, sweep_id: str) -> bool:
        return sweep_id in self._sweeps

    def _sweep_ids(self, tx: None) -> list[str]:
        return [s.id for s in sorted(self._sweeps.values(), key=lambda s: (s.started_at, s.id))]

    def _sweep_rows(self, tx: None, sweep_id: str | None = None) -> list[SweepRow]:
        counts: dict[str, list[int]] = {}
        for row, _ in self._rows.values():
            n = counts.setdefault(row.sweep_id, [0, 0])
            n[0], n[1] = n[0] + 1, n[1] + (row.how != BUILT)
        return [SweepRow(**{**self._sweeps[i].__dict__, "candidates": counts.get(i, [0, 0])[0],
                            "from_store": counts.get(i, [0, 0])[1]})
                for i in self._sweep_ids(tx) if sweep_id in (None, i)]

    # -- claims -------------------------------------------------------------------------------

    def _claim_of(self, tx: None, key: str) -> tuple[str, float] | None:
        return self._claims.get(key)

    def _put_claim(self, tx: None, key: str, owner: str, expires_at: float) -> None:
        self._claims[key] = (owner, expires_at)

    def _drop_claims(self, tx: None, owner: str, key: str | None = None) -> None:
        if key is None:
            self._claims = {k: v for k, v in self._claims.items() if v[0] != owner}
        elif self._claims.get(key, ("",))[0] == owner:
            del self._claims[key]

    def _renew_claims(self, tx: None, owner: str, expires_at: float) -> None:
        for key, (held_by, _) in list(self._claims.items()):
            if held_by == owner:
                self._claims[key] = (owner, expires_at)

    # -- results ------------------------------------------------------------------------------

    def _result_row(self, tx: None, result_id: Any) -> ResultRow | None:
        found = self._rows.get(result_id) if isinstance(result_id, int) else None
        return None if found is None else found[0]

    def _has_result(self, tx: None, sweep_id: str, key: str) -> bool:
        return (sweep_id, key) in self._recorded

    def _insert_result(self, tx: None, sweep_id: str, record: ResultRecord, how: str, source_id: int | None,
                       blob: str | None, created_at: float) -> int:
        rid = next(self._ids)
        order = (record.model, record.batch_size, record.candidate, record.key)
        self._rows[rid] = (ResultRow(rid, sweep_id, record.key, blob, source_id, how), order)
        self._recorded.add((sweep_id, record.key))
        return rid

    def _rows_for_keys(self, tx: None, keys: list[str]) -> list[ResultRow]:
        wanted = set(keys)
        return [row for row, _ in sorted(self._rows.values(), key=lambda r: -r[0].id)
                if row.key in wanted and row.how != REUSED]

    def _sweep_result_rows(self, tx: None, sweep_id: str) -> list[tuple[ResultRow, ResultRow | None]]:
        mine = sorted((r for r in self._rows.values() if r[0].sweep_id == sweep_id), key=lambda r: r[1])
        return [(row, self._result_row(tx, row.source_id)) for row, _ in mine]

    # -- selections and deployments -----------------------------------------------------------

    def _put_selection(self, tx: None, sweep_id: str, group: tuple[str, int, str, str], blob: str) -> None:
        self._selections.setdefault(sweep_id, {})[group] = blob

    def _selection_blobs(self, tx: None, sweep_id: str) -> list[str]:
        return [blob for _, blob in sorted(self._selections.get(sweep_id, {}).items())]

    def _append_deploy(self, tx: None, sweep_id: str, blob: str) -> None:
        self._deploys.setdefault(sweep_id, []).append(blob)

    def _deploy_blobs(self, tx: None, sweep_id: str) -> list[str]:
        return list(self._deploys.get(sweep_id, []))

    def _append_install(self, tx: None, sweep_id: str, at: float, blob: str) -> None:
        self._installs.append(blob)

    def _install_rows(self, tx: None) -> list[tuple[int, str]]:
        return list(enumerate(self._installs, start=1))

    # -- files --------------------------------------------------------------------------------

    def _put_checkpoint(self, data: bytes) -> tuple[str, str]:
        sha = manifest_sha(data)
        self._blobs[sha] = data
        return f"{_PREFIX}{sha}", sha

    def _put_outputs(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self._blobs[sha] = data
        return f"{_PREFIX}{sha}"

    def _put_reference(self, ref_key: str, data: bytes) -> None:
        self._refs[ref_key] = data

    def reference_bytes(self, ref_key: str) -> bytes | None:
        return self._refs.get(ref_key)

    def _checkpoint_problem(self, where: str, manifest_sha: str) -> str | None:
        return None if manifest_sha in self._blobs else "the result has no stored checkpoint"

    def _checkpoint_bytes(self, where: str) -> bytes:
        return self._blobs[where.removeprefix(_PREFIX)]

    def _outputs_bytes(self, where: str) -> bytes | None:
        return self._blobs.get(where.removeprefix(_PREFIX))
