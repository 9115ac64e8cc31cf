"""The typed records that cross process boundaries: what a worker is asked to do and what it answers.

Records hold objects (``Measurement``, ``CheckResult``, ``WorkerInfo``); they become JSON only at
the edges, through ``to_dict``/``from_dict``: the Ray calls and the SQLite store.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aitune.canonical import sha256_of
from aitune.check import CheckResult
from aitune.measure import Measurement

try:
    from enum import StrEnum
except ImportError:  # Python 3.10
    class StrEnum(str, enum.Enum):  # type: ignore[no-redef]
        """A string that is also an enum member (``enum.StrEnum`` from Python 3.11)."""

        def __str__(self) -> str:
            return str(self.value)

        __format__ = str.__format__


class Status(StrEnum):
    """A result's status. ``ok`` is the only one eligible to win."""

    OK = "ok"
    BUILD_ERROR = "build_error"
    INCORRECT = "incorrect"
    UNSUPPORTED = "unsupported"
    TIMEOUT = "timeout"
    CRASH = "crash"
    INFRA = "infra"
    ERROR = "error"  # anything else that went wrong in a phase (infer raised, measure raised)
    SKIPPED = "skipped"  # not run: the sweep's total time budget ran out


class How(StrEnum):
    """How a sweep came by a result: it built it, took it from the store as it was, or took the
    stored artifact and judged it again under this sweep's settings."""

    BUILT = "built"
    REUSED = "reused"
    RECHECKED = "re-checked"
    REMEASURED = "re-measured"
    RECHECKED_REMEASURED = "re-checked+re-measured"


class JobMode(StrEnum):
    """What a worker does with a job: build it (build, check, measure, save), or evaluate the
    stored artifact again (load it, then check and/or measure it: the job's ``redo``)."""

    BUILD = "build"
    EVALUATE = "evaluate"


class Redo(StrEnum):
    """What an evaluation job does again."""

    CHECK = "check"
    MEASURE = "measure"


class Phase(StrEnum):
    """The timed phases of a job (``ResultRecord.phases``)."""

    LOAD = "load"
    BUILD = "build"
    CHECK = "check"
    MEASURE = "measure"
    SAVE = "save"


class DeployStatus(StrEnum):
    DEPLOYED = "deployed"
    REFUSED = "refused"
    FAILED = "failed"


class DeployAction(StrEnum):
    DEPLOY = "deploy"
    ROLLBACK = "rollback"


OK, BUILD_ERROR, INCORRECT, UNSUPPORTED = Status.OK, Status.BUILD_ERROR, Status.INCORRECT, Status.UNSUPPORTED
TIMEOUT, CRASH, INFRA, ERROR, SKIPPED = Status.TIMEOUT, Status.CRASH, Status.INFRA, Status.ERROR, Status.SKIPPED
STATUSES = tuple(Status)
BUILT, REUSED, RECHECKED, REMEASURED = How.BUILT, How.REUSED, How.RECHECKED, How.REMEASURED
HOWS = tuple(How)
BUDGET_RAN_OUT = "the sweep's total time budget ran out"  # a skipped result's error
#: error_class of a job whose model's eager fp32 reference itself failed on the spec's inputs
REFERENCE_FAILED = "ReferenceFailed"


class Group(NamedTuple):
    """What one decision is about: a model at a batch size (and, for a model whose axes vary, a
    shape point such as ``seq=64``: aitune.shapes.label) on a device class."""

    model: str
    batch_size: int
    device_class_key: str
    shape: str = ""


def candidate_key(backend: str, config: dict[str, Any]) -> str:
    """The candidate itself, whatever model it is built for."""
    return sha256_of({"backend": backend, "config": config})


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
    """One candidate on one device class: what a worker needs to build, check and measure it.

    ``key`` is the artifact key (what is built); ``eval_key`` and ``evaluation`` say how it is
    judged. ``mode`` is ``build`` (build, check, measure, save) or ``evaluate`` (load the stored
    artifact and check and/or measure it again: ``redo`` names which).
    """

    key: str
    model: str
    batch_size: int
    backend: str
    config: dict[str, Any]
    candidate: str  # human name, e.g. "TorchEagerBackend(precision=bfloat16)"
    device_class_key: str
    model_fingerprint: str
    graph_spec: dict[str, Any] = field(default_factory=dict)
    samples_key: str = ""
    evaluation: dict[str, Any] = field(default_factory=dict)
    eval_key: str = ""
    mode: JobMode = JobMode.BUILD
    redo: list[Redo] = field(default_factory=list)  # for mode "evaluate": what it does again
    attempt: int = 0
    #: the model's architecture (class, parameter names, shapes, dtypes), not its weights
    structure_key: str = ""
    #: wall-clock time (``time.time()``) after which the worker skips it rather than start it:
    #: set when it is sent, from the sweep's total budget (None: no budget)
    start_by: float | None = None
    #: the shape point of a model whose axes vary (``seq=64``; aitune.shapes.label); '' for fixed shapes
    shape: str = ""

    def __post_init__(self) -> None:
        self.mode = JobMode(self.mode)
        self.redo = [Redo(r) for r in self.redo]

    @property
    def group(self) -> Group:
        return Group(self.model, self.batch_size, self.device_class_key, self.shape)

    @property
    def family_key(self) -> str:
        """Models whose decisions can stand for each other: one architecture, graph spec, device class."""
        return sha256_of({"structure": self.structure_key or self.model_fingerprint, "graph": self.graph_spec,
                          "device_class": self.device_class_key})

    @property
    def candidate_key(self) -> str:
        """The candidate itself, whatever model it is built for."""
        return candidate_key(self.backend, self.config)

    @property
    def reference_key(self) -> str:
        """The (model, input shapes, samples, device class) the eager fp32 reference belongs to."""
        return sha256_of({"model": self.model_fingerprint, "graph": self.graph_spec, "samples": self.samples_key,
                          "device_class": self.device_class_key})

    @property
    def precision(self) -> str:
        return str(self.config.get("precision", "float32"))


@dataclass
class ResultRecord(_Record):
    """The outcome of one job, failed or not: a failed candidate is a result too."""

    key: str  # the artifact key
    model: str
    batch_size: int
    backend: str
    config: dict[str, Any]
    candidate: str
    status: Status
    device_class_key: str
    eval_key: str = ""
    evaluation: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_class: str | None = None  # exception class name, or the fault kind
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase: load, build, check, measure, save
    measurement: Measurement | None = None
    check: CheckResult | None = None
    worker: WorkerInfo | None = None
    checkpoint: str | None = None  # where the store keeps it, relative to the store root
    manifest_sha256: str | None = None  # of the checkpoint's manifest.json, recorded at commit
    outputs: str | None = None  # where the store keeps the candidate's outputs on the check samples
    reference_key: str | None = None  # where the store keeps this job's sample and eager fp32 outputs
    peak_memory_bytes: int | None = None
    #: device memory after the candidate was released: allocated, reserved, left behind (bytes)
    memory: dict[str, int] = field(default_factory=dict)
    #: why the worker was recycled after this candidate (memory left behind, out of memory)
    recycled: str | None = None
    attempts: int = 1
    created_at: float = 0.0
    how: How = How.BUILT
    #: for a result this sweep did not build: the stored result it came from ({"sweep", "result"})
    source: dict[str, Any] | None = None
    #: the weights and architecture it was built from (for diffs: why a key changed)
    model_fingerprint: str | None = None
    structure_key: str | None = None
    #: the shape point of a model whose axes vary (``seq=64``, or a dynamic-shape artifact's range
    #: ``seq=2..64``); '' for fixed shapes
    shape: str = ""
    #: a dynamic-shape artifact's median ms at each bucket (label -> ms); None for any other
    bucket_ms: dict[str, float] | None = None
    #: what the worker saw around its phases: wall-clock windows ``build`` and ``measure``
    #: ([start, end], ``time.time()``) and the load average (1 min) before and after measuring
    context: dict[str, Any] = field(default_factory=dict)
    #: the store's row id and sweep of this very record (set by the store, never written into it)
    result_id: int | None = None
    sweep_id: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown result status {str(self.status)!r}; expected one of {tuple(map(str, STATUSES))}")
        if self.how not in HOWS:
            raise ValueError(f"unknown result origin {str(self.how)!r}; expected one of {tuple(map(str, HOWS))}")
        self.status, self.how = Status(self.status), How(self.how)
        if isinstance(self.measurement, dict):
            self.measurement = Measurement.from_dict(self.measurement)
        if isinstance(self.check, dict):
            self.check = CheckResult.from_dict(self.check)
        if isinstance(self.worker, dict):
            self.worker = WorkerInfo.from_dict(self.worker)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["measurement"] = self.measurement.to_dict() if self.measurement else None
        d["check"] = self.check.to_dict() if self.check else None
        d["worker"] = self.worker.to_dict() if self.worker else None
        return d

    @property
    def group(self) -> Group:
        return Group(self.model, self.batch_size, self.device_class_key, self.shape)

    @property
    def candidate_key(self) -> str:
        """The candidate itself, whatever model it was built for."""
        return candidate_key(self.backend, self.config)

    @property
    def from_store(self) -> bool:
        """Whether this sweep took the artifact from the store rather than building it."""
        return self.how != BUILT

    @property
    def eligible(self) -> bool:
        return self.status == OK and self.measurement is not None

    @property
    def median_ms(self) -> float | None:
        return self.measurement.median_ms if self.measurement else None

    @property
    def p99_ms(self) -> float | None:
        return self.measurement.p99_ms if self.measurement else None

    @property
    def build_s(self) -> float | None:
        return self.phases.get("build")

    @property
    def max_abs_err(self) -> float | None:
        return self.check.max_abs_err if self.check else None

    @property
    def worker_id(self) -> str | None:
        return self.worker.worker_id if self.worker else None

    @property
    def device_name(self) -> str | None:
        return (self.worker.device_class or {}).get("device_name") if self.worker else None


def result_for(job: Job, status: str, error: str | None = None, error_class: str | None = None,
               worker: WorkerInfo | None = None) -> ResultRecord:
    """The one mapping from a job to its (not yet filled) result record."""
    return ResultRecord(
        key=job.key, model=job.model, batch_size=job.batch_size, backend=job.backend, config=job.config,
        candidate=job.candidate, status=status, device_class_key=job.device_class_key, eval_key=job.eval_key,
        evaluation=job.evaluation, error=error, error_class=error_class, worker=worker,
        attempts=job.attempt + 1, created_at=time.time(), reference_key=job.reference_key,
        model_fingerprint=job.model_fingerprint or None, structure_key=job.structure_key or None, shape=job.shape,
    )


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
    #: the sweep that made this decision, when this one took it over unchanged
    decided_in: str | None = None
    #: how the winner was decided (aitune.decision): why the comparison stopped ("resolved", "tie",
    #: "cap", "alone", "screening"), the rounds' raw times by result key, each contender's median in
    #: them and first (screening) median, the winner's margins over the runner-up and eager fp32 with
    #: their intervals, the probability that it is the fastest, the seconds it took and waited
    decision: dict[str, Any] | None = None
    #: ``reuse: decisions``: the family member whose full tuning chose the candidates tried here
    #: ({"model", "candidates"}); None when this group was tuned fully
    decisions_from: dict[str, Any] | None = None
    #: the group's shape point (``seq=64``, or a dynamic-shape artifact's range ``seq=2..64``); '' for fixed shapes
    shape: str = ""
    #: why this winner is not deployed: the other shape strategy serves its model and batch size
    #: (orchestrator.outcome.shape_strategy); None: it is deployed
    superseded: str | None = None

    @property
    def group(self) -> Group:
        return Group(self.model, self.batch_size, self.device_class_key, self.shape)


@dataclass
class DeployRecord(_Record):
    """One winner placed on one target device, verified there (or refused, with the reason)."""

    model: str
    batch_size: int
    target: str  # e.g. "cpu-slot-0 on node abc123" or "cuda:0 on node ..."
    status: DeployStatus
    winner_key: str | None
    reason: str | None = None
    max_abs_err: float | None = None
    median_ms: float | None = None
    worker: dict[str, Any] | None = None
    #: what was installed where (aitune.deploy_root): None for a deploy that installs nothing
    action: DeployAction = DeployAction.DEPLOY
    sweep_id: str | None = None
    device_class_key: str | None = None
    root: str | None = None
    version: str | None = None
    previous: str | None = None
    at: float | None = None
    #: the shape point installed (``seq=64``); '' for fixed shapes
    shape: str = ""

    def __post_init__(self) -> None:
        self.status, self.action = DeployStatus(self.status), DeployAction(self.action)
