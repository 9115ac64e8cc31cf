"""The sweep spec's sections: tolerances, budgets, measurement, decisions, workers, deploy.

Each is checked against what the code that gets it (aitune's checker, measurer and decision
rounds, the worker pool, the deploy root) would refuse, so that it is refused before anything starts.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PositiveFloat, PositiveInt, field_validator, model_validator

from aitune.check import DEFAULT_TOLERANCES, tolerance_for
from aitune.decision import DecisionRule
from aitune.deploy_root import root_problem
from aitune.measure import MeasureConfig, min_iters_problem, warmup_iters_problem
from aitune.torch.precision import ALIASES as PRECISION_ALIASES
from orchestrator.spec import checks
from orchestrator.spec.strict import Strict


def precision_of(name: str) -> str | None:
    """The checker's name for a tolerance key ("fp16" -> "float16"); None if it knows none."""
    try:
        tolerance = tolerance_for(name)
    except ValueError:
        return None
    # tolerance_for hands back the default object itself, which tells which precision it is.
    return next((k for k, v in DEFAULT_TOLERANCES.items() if v is tolerance), name)


def _known_precision(key: str) -> str:
    if precision_of(key) is None:
        aliases = ", ".join(a for a in PRECISION_ALIASES if precision_of(a))
        allowed = ", ".join(DEFAULT_TOLERANCES)
        raise ValueError(f"{key!r} is not a precision the checker knows; allowed: {allowed} (or {aliases})")
    return key


Precision = Annotated[str, AfterValidator(_known_precision)]


class ToleranceSpec(Strict):
    atol: float | None = Field(default=None, ge=0)
    rtol: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _something(self) -> "ToleranceSpec":
        if self.atol is None and self.rtol is None:
            raise ValueError("give atol, rtol or both")
        return self


class BudgetSpec(Strict):
    #: seconds for loading the model and building one candidate
    build_timeout_s: PositiveFloat = 900.0
    #: seconds for checking, measuring and saving one candidate
    measure_timeout_s: PositiveFloat = 300.0
    #: seconds for the whole sweep; candidates not started by then are recorded as skipped
    total_s: PositiveFloat | None = None


class MeasureSpec(Strict):
    """Passed to ``aitune.measure.MeasureConfig`` in every worker (``config``): its rules, checked here
    (aitune.measure's own, for what MeasureConfig would cut short or refuse)."""

    budget_s: PositiveFloat = 1.0
    #: stop when the median's 95% confidence half-width is this fraction of the median
    target_rel_ci: float = Field(default=0.02, gt=0, lt=1)
    warmup_iters: int = Field(default=5, ge=0)
    min_iters: PositiveInt = 10
    #: "node": one worker per node measures at a time while the others build (not part of the
    #: evaluation key: it changes how quietly a measurement is taken, not what is measured)
    exclusive: Literal["node"] | None = None

    @field_validator("warmup_iters")
    @classmethod
    def _warmup(cls, value: int) -> int:
        problem = warmup_iters_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("min_iters")
    @classmethod
    def _min_iters(cls, value: int) -> int:
        problem = min_iters_problem(value)  # the worker measures with MeasureConfig's default max_iters
        if problem:
            raise ValueError(problem)
        return value

    def config(self, threads: int) -> MeasureConfig:
        """How a worker measures a candidate with these settings, on ``threads`` threads."""
        return MeasureConfig(warmup_iters=self.warmup_iters, min_iters=self.min_iters,
                             target_rel_ci=self.target_rel_ci, budget_s=self.budget_s, threads=threads)

    def warmup(self, threads: int) -> MeasureConfig:
        """How a worker warms each contender up before decision rounds (which time it themselves)."""
        return MeasureConfig(warmup_iters=self.warmup_iters, threads=threads)


class DecisionSpec(Strict):
    """How each group's winner is decided (``aitune.decision``): its contenders and eager fp32 in
    interleaved rounds, on one worker, until the answer is known or the cap is reached."""

    #: seconds of rounds per group, past ``min_rounds``
    cap_s: PositiveFloat = 30.0
    #: rounds (timed calls of every contender) before anything is decided, whatever the cap
    min_rounds: int = Field(default=10, ge=3)
    max_rounds: int = Field(default=1000, ge=3)
    #: of each comparison (Bonferroni-corrected for the number of contenders)
    confidence: float = Field(default=0.95, ge=0.5, lt=1)
    #: two candidates whose time ratio's interval lies within 1 +- tie are a declared tie
    tie: float = Field(default=0.03, gt=0, lt=0.5)
    #: a win must also be at least this much faster (relative)
    min_gain: float = Field(default=0.02, ge=0, lt=0.5)
    #: screening: candidates slower than reach x the best first measurement are not compared again
    #: (reach_disturbed where that measurement ran beside a build on its node)
    reach: float = Field(default=2.5, ge=1)
    reach_disturbed: float = Field(default=5.0, ge=1)
    #: contenders compared at most per group (eager fp32 comes on top)
    most: PositiveInt = 6

    @model_validator(mode="after")
    def _ordered(self) -> "DecisionSpec":
        problems: checks.Problems = []
        if self.min_rounds > self.max_rounds:
            problems.append((("min_rounds",), f"min_rounds {self.min_rounds} is above max_rounds {self.max_rounds}"))
        if self.reach > self.reach_disturbed:
            problems.append((("reach_disturbed",),
                             f"reach_disturbed {self.reach_disturbed} is below reach {self.reach}"))
        if problems:
            raise checks.problems_error(problems)
        return self

    def rule(self) -> DecisionRule:
        return DecisionRule(**self.model_dump())


class WorkersSpec(Strict):
    #: CPU worker slots where there is no GPU (default: up to 4, sized to the machine)
    cpu_slots: PositiveInt | None = None
    threads_per_slot: PositiveInt | None = None
    use_gpus: bool = True
    #: recycle a worker (fresh process) when a candidate leaves more than this behind;
    #: default: 256 MB of GPU memory on GPUs, off on CPUs (resident memory there is noisy)
    recycle_margin_mb: PositiveFloat | None = None
    #: bytes of models and references each worker keeps loaded (least recently used go first);
    #: default: a quarter of host memory shared by the slots on CPUs, half the device's memory on GPUs
    model_cache_mb: PositiveFloat | None = None


class DeploySpec(Strict):
    #: "all_gpus", {"gpus": N}, {"cpu_slots": N}, {"accelerator_type": "H200"}; empty: no deploy
    targets: list[str | dict[str, Any]] = Field(default_factory=list)
    #: seconds of latency measurement on each target
    latency_check_s: PositiveFloat = 0.3
    #: where each target node installs the verified winners (aitune.deploy_root); None: the
    #: user's cache directory on that node ($XDG_CACHE_HOME/aitune/deploy, ~/.cache/aitune/deploy)
    root: str | None = None
    #: after deploying, serve the winners with Ray Serve (``python -m orchestrator serve``)
    serve: bool = False

    @field_validator("root")
    @classmethod
    def _root(cls, root):
        # relative to where the driver runs (its targets get the same absolute path)
        if root is None:
            return None
        if not root.strip():
            raise ValueError("deploy.root must name a directory (it is empty); leave it out for ~/.cache/aitune/deploy")
        problem = root_problem(root)  # a system folder, a file
        if problem:
            raise ValueError(problem)
        return os.path.abspath(os.path.expanduser(root))

    @field_validator("targets")
    @classmethod
    def _forms(cls, targets):
        problems: checks.Problems = []
        for i, t in enumerate(targets):
            key = next(iter(t)) if isinstance(t, dict) and len(t) == 1 else None
            value = t[key] if key else None
            if not (t == "all_gpus" or key in ("gpus", "cpu_slots", "accelerator_type")):
                forms = "'all_gpus', {gpus: N}, {cpu_slots: N}, {accelerator_type: NAME}"
                problems.append(((i,), f"deploy target {t!r} is not one of {forms}"))
            elif key in ("gpus", "cpu_slots") and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                problems.append(((i,), f"deploy target {t!r} must ask for a positive number"))
            elif key == "accelerator_type" and (not isinstance(value, str) or not value.strip()):
                problems.append(((i,), f"deploy target {t!r} must name an accelerator type, e.g. H200"))
        if problems:
            raise checks.problems_error(problems)
        return targets


def _increasing(values: list, what: str) -> list:
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{what} must be increasing with no repeats, got {values}")
    return values


class LatencyTargetSpec(Strict):
    """``objective: max_throughput`` under a p99 target: the serving settings (batch sizes kept,
    queue delay, replicas per device) are chosen by measuring the deployed winners under load at
    each concurrency (orchestrator.deploy.serving_search)."""

    #: the p99 latency (ms) a request may take, as the load generator sees it
    p99_ms: PositiveFloat
    #: closed-loop clients to measure at, increasing
    concurrency: list[PositiveInt] = Field(min_length=1)

    @field_validator("concurrency")
    @classmethod
    def _increasing_concurrency(cls, values: list[int]) -> list[int]:
        return _increasing(values, "concurrency")


class ServingSearchSpec(Strict):
    """The settings the serving search may choose from, and how much load each point gets."""

    #: dynamic batching's queue delays to try (ms); default 0, 1, 2, 5, 10, 20
    queue_delays_ms: list[Annotated[float, Field(ge=0, le=1000)]] = Field(
        default_factory=lambda: [0.0, 1.0, 2.0, 5.0, 10.0, 20.0], min_length=1)
    #: replicas per device to try; default [1, 2] on a GPU, [1] on a CPU slot (each CPU replica
    #: takes a slot's CPUs of its own: more only where the cluster has them)
    replicas: list[Annotated[int, Field(ge=1, le=8)]] | None = None
    #: timed requests per measured point, and the seconds a point may take at most
    requests: PositiveInt = 200
    seconds: PositiveFloat = 10.0

    @field_validator("queue_delays_ms")
    @classmethod
    def _increasing_delays(cls, values: list[float]) -> list[float]:
        return _increasing(values, "queue_delays_ms")

    @field_validator("replicas")
    @classmethod
    def _increasing_replicas(cls, values):
        if values is not None and not values:
            raise ValueError("replicas must list at least one number, or be left out")
        return values if values is None else _increasing(values, "replicas")
