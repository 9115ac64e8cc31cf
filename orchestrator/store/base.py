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

The rules are written once, here: every public method of ``ResultStore`` that carries one is concrete
and reaches what is stored only through the small storage primitives of ``primitives.Storage``, which
``SqliteStore`` and ``MemoryStore`` each implement and which hold no rule of their own.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator.records import REUSED, DeployRecord, ResultRecord, SelectionRecord
from orchestrator.store.primitives import Storage
from orchestrator.store.rows import (
    DEFAULT_LEASE_S,
    DONE,
    INTERRUPTED,
    RUNNING,
    DamagedCheckpoint,
    ResultRow,
    StoreError,
    SweepInfo,
    SweepRow,
    SweepStatus,
    check_key,
    decode,
    dumps,
    effective_status,
    sweep_info,
)

__all__ = [
    "DEFAULT_LEASE_S", "DONE", "INTERRUPTED", "RUNNING", "DamagedCheckpoint", "ResultStore", "StoreError",
    "SweepInfo", "SweepStatus", "check_key", "effective_status",
]


class ResultStore(Storage):
    """What the sweep pipeline needs from a store; every method is one transaction."""

    lease_s: float = DEFAULT_LEASE_S
    #: the store's folder (None: it has none)
    root: Path | None = None
    #: how errors about what was read back name the store
    _where: str = "the store"

    # -- sweeps ---------------------------------------------------------------------------------
    def begin_sweep(self, name: str, spec: dict, *, objective: str | None = None) -> str:
        """Record a sweep ``name`` of ``spec`` (JSON) that chooses winners for ``objective``; returns its id."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"sweep name must be a non-empty string, got {name!r}")
        if objective is not None and (not isinstance(objective, str) or not objective):
            raise ValueError(f"sweep objective must be a non-empty string or None, got {objective!r}")
        spec_json = dumps(spec, what="sweep spec")
        now = time.time()
        # UTC timestamp to the microsecond first, so ids sort by start time; the suffix breaks ties.
        stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        row = SweepRow(id=f"{stamp}-{secrets.token_hex(3)}", name=name, spec_json=spec_json, started_at=now,
                       finished_at=None, status=RUNNING.value, heartbeat_at=now, lease_s=self.lease_s,
                       objective=None if objective is None else str(objective))
        with self._write() as tx:
            self._insert_sweep(tx, row)
        return row.id

    def heartbeat(self, sweep_id: str) -> None:
        """Renew the sweep's heartbeat and every claim it holds."""
        now = time.time()
        with self._write() as tx:
            self._set_heartbeat(tx, sweep_id, now)
            self._renew_claims(tx, sweep_id, now + self.lease_s)

    def finish_sweep(self, sweep_id: str, status: SweepStatus | str) -> None:
        """End the sweep with ``status`` (``done``, or ``failed: <why>``...) and release its claims."""
        if not isinstance(status, str) or not status:
            raise ValueError(f"sweep status must be a non-empty string, got {status!r}")
        with self._write() as tx:
            self._require_sweep(tx, sweep_id)
            self._set_finished(tx, sweep_id, str(status), time.time())
            self._drop_claims(tx, sweep_id)

    def list_sweeps(self) -> list[SweepInfo]:
        """Every sweep, by start time."""
        with self._read() as tx:
            rows = self._sweep_rows(tx)
        return [sweep_info(row, self._where) for row in rows]

    def sweep_info(self, sweep_id: str) -> SweepInfo:
        with self._read() as tx:
            self._require_sweep(tx, sweep_id)
            (row,) = self._sweep_rows(tx, sweep_id)
        return sweep_info(row, self._where)

    def latest_sweep_id(self) -> str | None:
        with self._read() as tx:
            ids = self._sweep_ids(tx)
        return ids[-1] if ids else None

    def _require_sweep(self, tx: Any, sweep_id: str) -> None:
        if not self._has_sweep(tx, sweep_id):
            where = "" if self.root is None else f" in store {self.root}"
            raise KeyError(f"unknown sweep id {sweep_id!r}{where}; known sweeps: {self._sweep_ids(tx) or 'none'}")

    # -- claims ---------------------------------------------------------------------------------
    def claim(self, key: str, owner: str) -> str | None:
        """Claim ``key`` for ``owner``; returns None when claimed, else the owner that holds it."""
        now = time.time()
        with self._write() as tx:
            held = self._claim_of(tx, key)
            if held is not None and held[0] != owner and held[1] > now:
                return held[0]
            self._put_claim(tx, key, owner, now + self.lease_s)
        return None

    def release(self, key: str, owner: str) -> None:
        with self._write() as tx:
            self._drop_claims(tx, owner, key)

    # -- results --------------------------------------------------------------------------------
    def add_result(self, sweep_id: str, record: ResultRecord, checkpoint: bytes | None = None,
                   outputs: bytes | None = None) -> ResultRecord:
        """Append what ``sweep_id`` found for one artifact key; returns the stored copy (with its id).

        A re-checked or re-measured record (``record.source`` set) keeps its source's checkpoint.
        """
        if not isinstance(record, ResultRecord):
            raise TypeError(f"add_result expects a ResultRecord, got {type(record).__name__}")
        check_key(record.key, "result key")
        if record.how == REUSED:
            raise ValueError("a reused result is recorded with add_reuse, which points at what it reuses")
        self._require_writable()  # fail before writing any file
        with self._read() as tx:
            self._require_sweep(tx, sweep_id)
        d = self._result_dict(sweep_id, record, checkpoint, outputs)
        with self._write() as tx:
            self._require_sweep(tx, sweep_id)
            self._require_new(tx, sweep_id, record.key)
            source_id = None if record.source is None else self._take_source(tx, d, record, checkpoint is None)
            blob = dumps(d, what=f"result record {record.key}")
            rid = self._insert_result(tx, sweep_id, record, record.how, source_id, blob, d["created_at"])
            self._drop_claims(tx, sweep_id, record.key)
        stored = ResultRecord.from_dict(json.loads(blob))
        stored.result_id, stored.sweep_id = rid, sweep_id
        return stored

    def _result_dict(self, sweep_id: str, record: ResultRecord, checkpoint: bytes | None,
                     outputs: bytes | None) -> dict[str, Any]:
        """What will be stored of ``record``, its files written first."""
        # Only top-level keys of this dict are replaced: the caller's record is never changed, and the
        # record returned is rebuilt from the JSON written, so it shares nothing with the caller's.
        d = record.to_dict()
        d.update(created_at=record.created_at or time.time(), result_id=None, sweep_id=sweep_id)
        if checkpoint is not None:
            d["checkpoint"], d["manifest_sha256"] = self._put_checkpoint(bytes(checkpoint))
        elif record.source is None:
            d["checkpoint"] = d["manifest_sha256"] = None
        if outputs is not None:
            d["outputs"] = self._put_outputs(bytes(outputs))
        return d

    def _take_source(self, tx: Any, d: dict[str, Any], record: ResultRecord, keep_checkpoint: bool) -> int:
        """Point ``d`` at the stored result ``record`` judged again; returns that result's id."""
        source_id = record.source.get("result")
        origin = self._origin(tx, source_id, record.key)
        if origin is None:
            raise KeyError(f"result {record.key[:12]} names source result {source_id}, which the store does not hold")
        d["source"] = {"sweep": origin.sweep_id, "result": origin.id}
        if keep_checkpoint:  # it judged the source's artifact again: it keeps that checkpoint
            kept = json.loads(origin.record)
            d["checkpoint"], d["manifest_sha256"] = kept.get("checkpoint"), kept.get("manifest_sha256")
        return origin.id

    def add_reuse(self, sweep_id: str, source: ResultRecord) -> ResultRecord:
        """Record that ``sweep_id`` took the stored result ``source`` unchanged."""
        if source.result_id is None:
            raise ValueError(f"cannot reuse {source.key[:12]}: it is not a stored result (no result id)")
        with self._write() as tx:
            self._require_sweep(tx, sweep_id)
            # A reused record stands for what it reuses: point at that, never at another reuse row.
            origin = self._origin(tx, source.result_id, source.key)
            if origin is None:
                raise KeyError(f"cannot mark {source.key!r} as reused in sweep {sweep_id}: "
                               f"no stored result {source.result_id}")
            self._require_new(tx, sweep_id, source.key)
            reused = self._load(origin.record, origin.id, origin.sweep_id)
            rid = self._insert_result(tx, sweep_id, reused, REUSED, origin.id, None, time.time())
        reused.how, reused.source = REUSED, {"sweep": origin.sweep_id, "result": origin.id}
        reused.result_id, reused.sweep_id = rid, sweep_id
        return reused

    def _origin(self, tx: Any, result_id: Any, key: str) -> ResultRow | None:
        """The stored result ``result_id`` stands for (itself, or what it reuses); None if it holds none for ``key``."""
        row = self._result_row(tx, result_id)
        if row is None or row.key != key:
            return None
        if row.record is None:
            row = self._result_row(tx, row.source_id)
        return row if row is not None and row.record is not None else None

    def _require_new(self, tx: Any, sweep_id: str, key: str) -> None:
        if self._has_result(tx, sweep_id, key):
            raise ValueError(f"sweep {sweep_id} already recorded a result for {key[:12]}")

    def results_for(self, keys: Iterable[str]) -> dict[str, list[ResultRecord]]:
        """Every result stored for each artifact key (reuses not repeated), newest first."""
        keys = list(dict.fromkeys(keys))
        with self._read() as tx:
            rows = self._rows_for_keys(tx, keys) if keys else []
        found: dict[str, list[ResultRecord]] = {}
        for row in rows:
            found.setdefault(row.key, []).append(self._load(row.record, row.id, row.sweep_id))
        return found

    def sweep_results(self, sweep_id: str) -> list[ResultRecord]:
        """What ``sweep_id`` recorded, reuses resolved to what they reuse (``how == "reused"``)."""
        with self._read() as tx:
            self._require_sweep(tx, sweep_id)
            rows = self._sweep_result_rows(tx, sweep_id)
        out = []
        for row, source in rows:
            if row.how == REUSED:
                if source is None or source.record is None:
                    raise StoreError(f"{self._where}: result {row.id} reuses result {row.source_id}, which is missing")
                record = self._load(source.record, row.id, sweep_id)
                record.how, record.source = REUSED, {"sweep": source.sweep_id, "result": row.source_id}
            else:
                record = self._load(row.record, row.id, sweep_id)
            out.append(record)
        return out

    def _load(self, blob: Any, rid: int, sweep_id: str) -> ResultRecord:
        record = decode(ResultRecord, blob, f"{self._where}: result {rid} of sweep {sweep_id}")
        record.result_id, record.sweep_id = rid, sweep_id
        return record

    # -- selections and deployments -------------------------------------------------------------
    def put_selection(self, sweep_id: str, selection: SelectionRecord) -> None:
        if not isinstance(selection, SelectionRecord):
            raise TypeError(f"put_selection expects a SelectionRecord, got {type(selection).__name__}")
        blob = dumps(selection.to_dict(), what="selection record")
        with self._write() as tx:
            self._require_sweep(tx, sweep_id)
            # A later decision for the same group replaces the sweep's earlier one.
            self._put_selection(tx, sweep_id, selection.group, blob)

    def selections(self, sweep_id: str) -> list[SelectionRecord]:
        """The sweep's decisions, by model, batch size and device class."""
        with self._read() as tx:
            self._require_sweep(tx, sweep_id)
            blobs = self._selection_blobs(tx, sweep_id)
        return [decode(SelectionRecord, blob, f"{self._where}: a selection of sweep {sweep_id}") for blob in blobs]

    def put_deploy(self, sweep_id: str, deploy: DeployRecord) -> None:
        if not isinstance(deploy, DeployRecord):
            raise TypeError(f"put_deploy expects a DeployRecord, got {type(deploy).__name__}")
        blob = dumps(deploy.to_dict(), what="deploy record")
        with self._write() as tx:
            self._require_sweep(tx, sweep_id)
            self._append_deploy(tx, sweep_id, blob)

    def deployments(self, sweep_id: str) -> list[DeployRecord]:
        with self._read() as tx:
            self._require_sweep(tx, sweep_id)
            blobs = self._deploy_blobs(tx, sweep_id)
        return [decode(DeployRecord, blob, f"{self._where}: a deployment of sweep {sweep_id}") for blob in blobs]

    def put_install(self, deploy: DeployRecord) -> None:
        """Record one install or rollback on a target (``deploy.sweep_id`` names the winners' sweep).

        Kept apart from a sweep's own ``deployments`` so that deploying past winners later never
        changes that sweep's report; every install is appended, never rewritten.
        """
        if not isinstance(deploy, DeployRecord) or not deploy.sweep_id:
            raise TypeError("put_install expects a DeployRecord naming its sweep_id")
        blob = dumps(deploy.to_dict(), what="install record")
        with self._write() as tx:
            self._require_sweep(tx, deploy.sweep_id)
            self._append_install(tx, deploy.sweep_id, deploy.at or time.time(), blob)

    def installs(self) -> list[DeployRecord]:
        """Every install and rollback, oldest first: the last one per place is what is live there."""
        with self._read() as tx:
            rows = self._install_rows(tx)
        return [decode(DeployRecord, blob, f"{self._where}: install record {rid}") for rid, blob in rows]

    # -- files ----------------------------------------------------------------------------------
    def put_reference(self, ref_key: str, data: bytes) -> None:
        """Keep reference outputs (a torch.save blob) under ``ref_key``; readers never see half of them."""
        check_key(ref_key, "reference key")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"reference data must be bytes, got {type(data).__name__}")
        self._require_writable()  # before the file is written
        self._put_reference(ref_key, bytes(data))

    def has_reference(self, ref_key: str) -> bool:
        return self.reference_bytes(ref_key) is not None

    def checkpoint_problem(self, record: ResultRecord) -> str | None:
        """Why the stored checkpoint of ``record`` can't be used (None: it is sound)."""
        if not record.checkpoint or not record.manifest_sha256:
            return "the result has no stored checkpoint"
        return self._checkpoint_problem(record.checkpoint, record.manifest_sha256)

    def checkpoint_bytes(self, record: ResultRecord) -> bytes:
        """The packed checkpoint of ``record``, its manifest checked first; raises DamagedCheckpoint."""
        problem = self.checkpoint_problem(record)
        if problem is not None:
            raise self._damaged(record, problem)
        try:
            return self._checkpoint_bytes(record.checkpoint)
        except (OSError, ValueError) as e:
            raise self._damaged(record, str(e)) from None

    @staticmethod
    def _damaged(record: ResultRecord, why: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(f"stored checkpoint of {record.candidate} ({record.key[:12]}): {why}")

    def outputs_bytes(self, record: ResultRecord) -> bytes | None:
        """The candidate's stored outputs on its check samples, when the store has them intact."""
        return self._outputs_bytes(record.outputs) if record.outputs else None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
