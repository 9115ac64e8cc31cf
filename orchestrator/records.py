"""Plain records that cross process boundaries: what a worker is asked to do and what it answers.

Everything here is a dataclass of JSON-able fields (``to_dict``/``from_dict``), so records travel
through Ray and into the SQLite store unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from aitune.canonical import sha256_of

#: Result statuses. ``ok`` is the only one eligible to win.
OK = "ok"
BUILD_ERROR = "build_error"
INCORRECT = "incorrect"
UNSUPPORTED = "unsupported"
TIMEOUT = "timeout"
CRASH = "crash"
INFRA = "infra"
ERROR = "error"  # anything else that went wrong in a phase (infer raised, measure raised)
SKIPPED = "skipped"  # not run: the sweep's total time budget ran out
STATUSES = (OK, BUILD_ERROR, INCORRECT, UNSUPPORTED, TIMEOUT, CRASH, INFRA, ERROR, SKIPPED)


class _Record:
    """JSON-able dataclass records: ``to_dict`` and a ``from_dict`` that ignores unknown keys
    (a newer writer's extra fields do not break an older reader)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class WorkerInfo(_Record):
    """Who ran a candidate: the actor, its host and node, and its device."""

    worker_id: str
    node_id: str
    hostname: str
    pid: int
    device: str  # "cuda:0" or "cpu"
    device_class: dict[str, Any]  # aitune.environment.Environment.device_class()
    device_class_key: str  # sha256 of device_class
    threads: int


@dataclass
class Job(_Record):
    """One candidate on one device class: what a worker needs to build, check and measure it."""

    key: str
    model: str
    batch_size: int
    backend: str
    config: dict[str, Any]
    candidate: str  # human name, e.g. "TorchEagerBackend(precision=bfloat16)"
    device_class_key: str
    model_fingerprint: str
    graph_spec: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0

    @property
    def reference_key(self) -> str:
        """The (model, input shapes, device class) the eager fp32 reference belongs to."""
        return sha256_of({"model": self.model_fingerprint, "graph": self.graph_spec, "device_class": self.device_class_key})


@dataclass
class ResultRecord(_Record):
    """The outcome of one job, failed or not: a failed candidate is a result too."""

    key: str
    model: str
    batch_size: int
    backend: str
    config: dict[str, Any]
    candidate: str
    status: str
    device_class_key: str
    error: str | None = None
    error_class: str | None = None  # exception class name, or the fault kind
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase: load, build, check, measure, save
    measurement: dict[str, Any] | None = None  # aitune.measure.Measurement.to_dict()
    check: dict[str, Any] | None = None  # aitune.check.CheckResult.to_dict()
    worker: dict[str, Any] | None = None  # WorkerInfo.to_dict()
    checkpoint: str | None = None  # path relative to the store root
    reference_key: str | None = None  # where the store keeps this job's sample and eager fp32 outputs
    peak_memory_bytes: int | None = None
    #: device memory after the candidate was released: allocated, reserved, left behind (bytes)
    memory: dict[str, int] = field(default_factory=dict)
    #: why the worker was recycled after this candidate (memory left behind, out of memory)
    recycled: str | None = None
    attempts: int = 1
    created_at: float = 0.0
    from_store: bool = False  # set by the driver when the result was reused, never stored

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown result status {self.status!r}; expected one of {STATUSES}")

    @property
    def eligible(self) -> bool:
        return self.status == OK and self.measurement is not None

    @property
    def median_ms(self) -> float | None:
        return self.measurement.get("median_ms") if self.measurement else None

    @property
    def p99_ms(self) -> float | None:
        return self.measurement.get("p99_ms") if self.measurement else None

    @property
    def build_s(self) -> float | None:
        return self.phases.get("build")

    @property
    def max_abs_err(self) -> float | None:
        return self.check.get("max_abs_err") if self.check else None


@dataclass
class SelectionRecord(_Record):
    """The winner of one (model, batch size, device class) group."""

    model: str
    batch_size: int
    device_class_key: str
    winner_key: str | None
    winner: str | None
    reason: str
    ties: list[str] = field(default_factory=list)
    remeasured: bool = False
    speedup: float | None = None


@dataclass
class DeployRecord(_Record):
    """One winner placed on one target device, verified there (or refused, with the reason)."""

    model: str
    batch_size: int
    target: str  # e.g. "cpu-slot-0 on node abc123" or "cuda:0 on node ..."
    status: str  # "deployed" | "refused" | "failed"
    winner_key: str | None
    reason: str | None = None
    max_abs_err: float | None = None
    median_ms: float | None = None
    worker: dict[str, Any] | None = None
