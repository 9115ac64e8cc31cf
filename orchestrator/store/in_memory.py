"""A store that lives in one process's memory: the same rules as SQLite, for tests and simulations."""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import secrets
import tarfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from orchestrator.records import BUILT, REUSED, DeployRecord, ResultRecord, SelectionRecord
from orchestrator.store.base import (
    DEFAULT_LEASE_S,
    RUNNING,
    DamagedCheckpoint,
    ResultStore,
    SweepInfo,
    check_key,
    effective_status,
)


@dataclass
class _Sweep:
    info: SweepInfo
    lease_s: float


class MemoryStore(ResultStore):
    root = None

    def __init__(self, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.lease_s = lease_s
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._sweeps: dict[str, _Sweep] = {}
        self._rows: dict[int, tuple[str, str, ResultRecord | None, int | None]] = {}  # id -> sweep, how, record, source
        self._claims: dict[str, tuple[str, float]] = {}
        self._selections: dict[str, list[SelectionRecord]] = {}
        self._deploys: dict[str, list[DeployRecord]] = {}
        self._refs: dict[str, bytes] = {}
        self._installs: list[DeployRecord] = []
        self._blobs: dict[str, bytes] = {}  # sha256 -> bytes (checkpoints by manifest sha, outputs by their own)

    def _sweep(self, sweep_id: str) -> _Sweep:
        if sweep_id not in self._sweeps:
            raise KeyError(f"unknown sweep id {sweep_id!r}; known sweeps: {sorted(self._sweeps) or 'none'}")
        return self._sweeps[sweep_id]

    def begin_sweep(self, name: str, spec: dict) -> str:
        if not isinstance(name, str) or not name:
            raise ValueError(f"sweep name must be a non-empty string, got {name!r}")
        now = time.time()
        sweep_id = f"{now:.6f}-{secrets.token_hex(3)}"
        with self._lock:
            self._sweeps[sweep_id] = _Sweep(SweepInfo(sweep_id, name, dict(spec), now, None, RUNNING, now), self.lease_s)
        return sweep_id

    def heartbeat(self, sweep_id: str) -> None:
        now = time.time()
        with self._lock:
            self._sweep(sweep_id).info.heartbeat_at = now
            for key, (owner, _) in list(self._claims.items()):
                if owner == sweep_id:
                    self._claims[key] = (owner, now + self.lease_s)

    def finish_sweep(self, sweep_id: str, status: str) -> None:
        with self._lock:
            sweep = self._sweep(sweep_id)
            sweep.info.status, sweep.info.finished_at = status, time.time()
            self._claims = {k: v for k, v in self._claims.items() if v[0] != sweep_id}

    def _info(self, sweep: _Sweep) -> SweepInfo:
        info = SweepInfo(**{**sweep.info.__dict__})
        info.status = effective_status(info.status, info.heartbeat_at, sweep.lease_s)
        rows = [r for r in self._rows.values() if r[0] == info.id]
        info.candidates, info.from_store = len(rows), sum(1 for r in rows if r[1] != BUILT)
        return info

    def list_sweeps(self) -> list[SweepInfo]:
        with self._lock:
            return [self._info(s) for s in sorted(self._sweeps.values(), key=lambda s: (s.info.started_at, s.info.id))]

    def sweep_info(self, sweep_id: str) -> SweepInfo:
        with self._lock:
            return self._info(self._sweep(sweep_id))

    def claim(self, key: str, owner: str) -> str | None:
        now = time.time()
        with self._lock:
            held = self._claims.get(key)
            if held is not None and held[0] != owner and held[1] > now:
                return held[0]
            self._claims[key] = (owner, now + self.lease_s)
        return None

    def release(self, key: str, owner: str) -> None:
        with self._lock:
            if self._claims.get(key, ("",))[0] == owner:
                del self._claims[key]

    def add_result(self, sweep_id, record, checkpoint=None, outputs=None) -> ResultRecord:
        check_key(record.key, "result key")
        if record.how == REUSED:
            raise ValueError("a reused result is recorded with add_reuse, which points at what it reuses")
        stored = _copy(record)
        stored.created_at = record.created_at or time.time()
        if checkpoint is not None:
            sha = _manifest_sha(bytes(checkpoint))
            self._blobs[sha] = bytes(checkpoint)
            stored.checkpoint, stored.manifest_sha256 = f"memory:{sha}", sha
        elif record.source is None:
            stored.checkpoint = stored.manifest_sha256 = None
        if outputs is not None:
            sha = hashlib.sha256(outputs).hexdigest()
            self._blobs[sha] = bytes(outputs)
            stored.outputs = f"memory:{sha}"
        with self._lock:
            self._sweep(sweep_id)
            self._require_new(sweep_id, record.key)
            if record.source is not None:
                origin = self._origin((record.source or {}).get("result"), record.key)
                if origin is None:
                    raise KeyError(f"result {record.key[:12]} names source result {record.source.get('result')}, "
                                   "which the store does not hold")
                stored.source = {"sweep": self._rows[origin][0], "result": origin}
                if checkpoint is None:  # it judged the source's artifact again: it keeps that checkpoint
                    kept = self._rows[origin][2]
                    stored.checkpoint, stored.manifest_sha256 = kept.checkpoint, kept.manifest_sha256
            rid = next(self._ids)
            stored.result_id, stored.sweep_id = rid, sweep_id
            self._rows[rid] = (sweep_id, stored.how, stored, None)
            if self._claims.get(record.key, ("",))[0] == sweep_id:
                del self._claims[record.key]
        return _copy(stored)

    def add_reuse(self, sweep_id: str, source: ResultRecord) -> ResultRecord:
        with self._lock:
            self._sweep(sweep_id)
            # A reused record stands for what it reuses: point at that, never at another reuse row.
            origin = self._origin(source.result_id, source.key)
            if origin is None:
                raise KeyError(f"cannot mark {source.key!r} as reused in sweep {sweep_id}: no stored result {source.result_id}")
            self._require_new(sweep_id, source.key)
            rid = next(self._ids)
            self._rows[rid] = (sweep_id, REUSED, None, origin)
            reused = _copy(self._rows[origin][2])
        reused.how, reused.source = REUSED, {"sweep": self._rows[origin][0], "result": origin}
        reused.result_id, reused.sweep_id = rid, sweep_id
        return reused

    def _origin(self, result_id: int | None, key: str) -> int | None:
        """The id of the stored result ``result_id`` stands for: itself, or what it reuses."""
        row = self._rows.get(result_id)
        if row is not None and row[2] is None:
            result_id, row = row[3], self._rows.get(row[3])
        return result_id if row is not None and row[2] is not None and row[2].key == key else None

    def _require_new(self, sweep_id: str, key: str) -> None:
        if any(r[0] == sweep_id and (r[2] or self._rows[r[3]][2]).key == key for r in self._rows.values()):
            raise ValueError(f"sweep {sweep_id} already recorded a result for {key[:12]}")

    def results_for(self, keys: Iterable[str]) -> dict[str, list[ResultRecord]]:
        wanted = set(keys)
        found: dict[str, list[ResultRecord]] = {}
        with self._lock:
            for rid in sorted(self._rows, reverse=True):
                _, how, record, _ = self._rows[rid]
                if record is not None and record.key in wanted:
                    found.setdefault(record.key, []).append(_copy(record))
        return found

    def sweep_results(self, sweep_id: str) -> list[ResultRecord]:
        out = []
        with self._lock:
            self._sweep(sweep_id)
            for rid, (sweep, how, record, source) in sorted(self._rows.items()):
                if sweep != sweep_id:
                    continue
                if record is None:
                    record = _copy(self._rows[source][2])
                    record.how, record.source = REUSED, {"sweep": self._rows[source][0], "result": source}
                    record.result_id, record.sweep_id = rid, sweep_id
                out.append(_copy(record))
        return sorted(out, key=lambda r: (r.model, r.batch_size, r.candidate, r.key))

    def put_selection(self, sweep_id, selection) -> None:
        with self._lock:
            self._sweep(sweep_id)
            group = (selection.model, selection.batch_size, selection.device_class_key)
            # A later decision for the same group replaces the sweep's earlier one.
            kept = [s for s in self._selections.get(sweep_id, []) if (s.model, s.batch_size, s.device_class_key) != group]
            self._selections[sweep_id] = [*kept, SelectionRecord.from_dict(selection.to_dict())]

    def selections(self, sweep_id):
        with self._lock:
            self._sweep(sweep_id)
            return sorted((SelectionRecord.from_dict(s.to_dict()) for s in self._selections.get(sweep_id, [])),
                          key=lambda s: (s.model, s.batch_size, s.device_class_key))

    def put_deploy(self, sweep_id, deploy) -> None:
        with self._lock:
            self._sweep(sweep_id)
            self._deploys.setdefault(sweep_id, []).append(DeployRecord.from_dict(deploy.to_dict()))

    def deployments(self, sweep_id):
        with self._lock:
            self._sweep(sweep_id)
            return [DeployRecord.from_dict(d.to_dict()) for d in self._deploys.get(sweep_id, [])]

    def put_install(self, deploy) -> None:
        if not isinstance(deploy, DeployRecord) or not deploy.sweep_id:
            raise TypeError("put_install expects a DeployRecord naming its sweep_id")
        with self._lock:
            self._sweep(deploy.sweep_id)
            self._installs.append(DeployRecord.from_dict(deploy.to_dict()))

    def installs(self):
        with self._lock:
            return [DeployRecord.from_dict(d.to_dict()) for d in self._installs]

    def put_reference(self, ref_key: str, data: bytes) -> None:
        check_key(ref_key, "reference key")
        self._refs[ref_key] = bytes(data)

    def reference_bytes(self, ref_key: str) -> bytes | None:
        return self._refs.get(ref_key)

    def checkpoint_problem(self, record: ResultRecord) -> str | None:
        if not record.manifest_sha256 or record.manifest_sha256 not in self._blobs:
            return "the result has no stored checkpoint"
        return None

    def checkpoint_bytes(self, record: ResultRecord) -> bytes:
        problem = self.checkpoint_problem(record)
        if problem:
            raise DamagedCheckpoint(f"stored checkpoint of {record.candidate} ({record.key[:12]}): {problem}")
        return self._blobs[record.manifest_sha256]

    def outputs_bytes(self, record: ResultRecord) -> bytes | None:
        return self._blobs.get((record.outputs or "").removeprefix("memory:"))


def _copy(record: ResultRecord) -> ResultRecord:
    """A deep copy: records hold dicts and lists, which the caller must not share with the store."""
    return copy.deepcopy(record)


def _manifest_sha(packed: bytes) -> str:
    try:
        with tarfile.open(fileobj=io.BytesIO(packed), mode="r:") as tar:
            member = tar.extractfile("manifest.json")
            if member is None:
                raise KeyError("manifest.json")
            return hashlib.sha256(member.read()).hexdigest()
    except KeyError:
        raise ValueError("the worker's checkpoint has no manifest.json") from None
    except tarfile.TarError as e:
        raise ValueError(f"not a valid checkpoint archive ({e})") from None
