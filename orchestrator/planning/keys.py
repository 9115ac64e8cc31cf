"""From a spec to jobs, and from the store's history to what each job needs.

Two keys, both SHA-256 of canonical JSON:

- the **artifact key** says what is built: the model's weights fingerprint, the backend and its
  ``BackendConfig.key()``, the backend's implementation version, the graph spec, and the device
  class (device, compute capability, driver, and every library version that changes the artifact);
- the **evaluation key** says how it is judged: the tolerance of its precision, the check samples,
  the threads and the measure settings. The limits (build and measure timeouts) are kept with the
  evaluation: a failure is reused only under limits no more generous than the ones it failed under.

:func:`decide` partitions jobs by what the store already holds: reuse, re-check (from stored
outputs, on the driver), evaluate (load the stored artifact on a worker, check and/or measure it
again), or build.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from aitune.accuracy import Criteria, TaskGate, criteria_for
from aitune.canonical import sha256_of
from aitune.check import CheckResult, compare_outputs, tolerance_for
from aitune.reference import load_reference, unpack_outputs
from aitune.torch.backend.registry import config_fields, config_key, display_name, make_backend
from orchestrator import records as R
from orchestrator.planning.candidates import batches_fingerprint, candidate_specs, evaluation_batches
from orchestrator.planning.shape_plans import variants
from orchestrator.records import Job, Redo, ResultRecord, StrEnum
from orchestrator.spec.schema import SweepSpec

#: statuses a later sweep always runs again: they say nothing about the candidate itself
NOT_REUSABLE = (R.INFRA, R.SKIPPED)



class Action(StrEnum):
    """What a planned job needs: take the stored result, re-check its stored outputs on the driver,
    evaluate the stored artifact again on a worker, or build it."""

    REUSE = "reuse"
    RECHECK = "recheck"
    EVALUATE = "evaluate"
    BUILD = "build"


REUSE, RECHECK, EVALUATE, BUILD = Action.REUSE, Action.RECHECK, Action.EVALUATE, Action.BUILD
CHECK_ONLY, CHECK_AND_MEASURE, MEASURE_ONLY = [Redo.CHECK], [Redo.CHECK, Redo.MEASURE], [Redo.MEASURE]


def implementation_version(backend_cls: type) -> str:
    """Bumped by a backend when what its build makes changes; part of every artifact key."""
    return str(getattr(backend_cls, "implementation_version", "1"))


def artifact_key(fingerprint: str, backend: str, backend_key: str, impl_version: str,
                 graph_spec: dict[str, Any], device_class: dict[str, Any]) -> str:
    return sha256_of({
        "model": fingerprint, "backend": backend, "config": backend_key, "implementation": impl_version,
        "graph_spec": graph_spec, "device_class": device_class,
    })


def evaluation_of(spec: SweepSpec, precision: str, samples: str, threads: int,
                  criteria: Criteria | None = None) -> dict[str, Any]:
    """How a candidate is judged: ``criteria`` (default: the precision's tolerance alone) on the
    check ``samples``, measured with ``threads``, within the spec's limits."""
    criteria = criteria or Criteria(tolerance_for(precision, spec.tolerance_overrides()))
    return {
        "check": {**criteria.to_dict(), "samples": samples},
        "measure": {"threads": int(threads), **spec.measure.model_dump(mode="json", exclude={"exclusive"})},
        "limits": {"build_timeout_s": spec.budgets.build_timeout_s, "measure_timeout_s": spec.budgets.measure_timeout_s},
    }


def criteria_of_candidate(spec: SweepSpec, candidate, backend_cls: type, precision: str,
                          task: TaskGate | None = None) -> Criteria:
    """A candidate's accuracy criteria: its precision's tolerance, and the gates the spec gives it
    (a quantizing backend's replace the tolerance: aitune.accuracy.criteria_for); ``task`` (the
    model's task gate, if any) for the candidates judged by gates."""
    quantizes = bool(getattr(backend_cls, "quantizes", False))
    gates = spec.gates_for(candidate, precision, quantizes)
    criteria = criteria_for(backend_cls, tolerance_for(precision, spec.tolerance_overrides()), gates)
    return dataclasses.replace(criteria, task=task) if criteria.gates is not None and task is not None else criteria


def task_gate(spec: SweepSpec, model: str, batch_size: int) -> TaskGate | None:
    """The spec's task gate for a model at a batch size: its evaluation batches fingerprinted; None
    without one (or where the batches' function returns None for the model)."""
    task = spec.accuracy.task
    if task is None:
        return None
    batches = evaluation_batches(task.samples, model, batch_size)
    if not batches:
        return None
    return TaskGate(task.samples, batches_fingerprint(batches), task.metric, task.min, task.max)


def criteria_of(evaluation: dict[str, Any]) -> Criteria:
    """The criteria an evaluation (a job's, a stored result's) judges by."""
    return Criteria.from_dict(evaluation.get("check") or {})


def evaluation_key(evaluation: dict[str, Any]) -> str:
    return sha256_of({"check": evaluation.get("check"), "measure": evaluation.get("measure")})


def expand(
    spec: SweepSpec,
    fingerprints: dict[str, str],
    device_classes: dict[str, dict[str, Any]],
    threads: dict[str, int] | None = None,
    structures: dict[str, str] | None = None,
    shapes: dict[str, Any] | None = None,
) -> list[Job]:
    """Every (device class, model, batch size, shape point, candidate), with its keys; equal artifact
    keys appear once.

    ``structures`` (model name -> structure key) names each job's family; it is not in any key.
    ``shapes`` (model name -> planning.shape_plans.ShapePlan): a model whose axes vary is tuned at
    each bucket, and with one dynamic-shape artifact per candidate that can build one; where
    padding is safe for it, each candidate's check pads the lengths between the buckets too.
    """
    jobs: dict[str, Job] = {}
    tasks: dict[tuple[str, int], TaskGate | None] = {}
    for dc_key, device_class in device_classes.items():
        candidates = candidate_specs(spec, device_class["device_type"])
        for model in spec.models:
            plan = (shapes or {}).get(model.name)
            for batch, variant in ((b, v) for b in spec.batches_of(model) for v in variants(model, b, plan)):
                graph, samples = variant.graph, variant.samples
                for cand in candidates:
                    backend = make_backend(cand.backend, cand.config)
                    if variant.dynamic and not getattr(type(backend), "dynamic_shapes", False):
                        continue  # one artifact per bucket only (an eager backend runs any shape as it is)
                    fields = config_fields(backend)
                    precision = str(fields.get("precision", "float32"))
                    if (model.name, batch) not in tasks:
                        tasks[model.name, batch] = task_gate(spec, model.name, batch)
                    criteria = criteria_of_candidate(spec, cand, type(backend), precision, tasks[model.name, batch])
                    if criteria.gates is not None and fields.get("fallback") and fields.get("fallback_gates") is None:
                        # a per-layer fallback aims for the gates the candidate is judged by (part of its key)
                        backend = make_backend(cand.backend, {**cand.config, "fallback_gates": criteria.gates.to_dict()})
                        fields = config_fields(backend)
                    key = artifact_key(fingerprints[model.name], cand.backend, config_key(backend),
                                       implementation_version(type(backend)), graph, device_class)
                    if key in jobs:
                        continue  # the same candidate written twice (or two spellings of one config)
                    evaluation = evaluation_of(spec, precision, samples, (threads or {}).get(dc_key, 1), criteria)
                    if variant.padding is not None:  # checked on the worker where safe on eager fp32 ("refused": None)
                        evaluation["check"]["padding"] = variant.padding
                    if variant.buckets is not None:  # a dynamic artifact is measured at every bucket
                        evaluation["measure"]["buckets"] = variant.buckets
                    jobs[key] = Job(
                        key=key, model=model.name, batch_size=batch, backend=cand.backend, config=fields,
                        candidate=display_name(backend), device_class_key=dc_key, model_fingerprint=fingerprints[model.name],
                        graph_spec=graph, samples_key=samples, evaluation=evaluation, eval_key=evaluation_key(evaluation),
                        structure_key=(structures or {}).get(model.name, ""), shape=variant.shape,
                    )
    return list(jobs.values())


@dataclass
class Decision:
    job: Job
    action: Action
    prior: ResultRecord | None = None
    redo: list[Redo] = field(default_factory=list)
    why: str = ""

    def __post_init__(self) -> None:
        self.action, self.redo = Action(self.action), [Redo(r) for r in self.redo]


@dataclass
class Policy:
    force: bool = False
    retry_failed: bool = False


def _limits_at_most(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether every limit now is no more generous than when the failure happened."""
    old_limits, new_limits = old.get("limits") or {}, new.get("limits") or {}
    return all(name in old_limits and new_limits.get(name, 0) <= old_limits[name] for name in new_limits)


def decide(job: Job, priors: list[ResultRecord], policy: Policy, checkpoint_problem) -> Decision:
    """What ``job`` needs, given the stored results for its artifact key (newest first)."""
    if policy.force:
        return Decision(job, BUILD, why="--force")
    usable = [p for p in priors if p.status not in NOT_REUSABLE]
    if not usable:
        return Decision(job, BUILD, why="not in the store" if not priors else f"stored as {priors[0].status}")
    # The same evaluation if the store has it, else the newest.
    prior = next((p for p in usable if p.eval_key == job.eval_key), usable[0])
    same_eval = prior.eval_key == job.eval_key
    if policy.retry_failed and prior.status != R.OK:
        return Decision(job, BUILD, prior, why=f"--retry-failed ({prior.status})")
    if prior.status in (R.BUILD_ERROR, R.UNSUPPORTED):
        return Decision(job, REUSE, prior)  # the artifact can't be made here: judging changes nothing
    if prior.status in (R.TIMEOUT, R.CRASH, R.ERROR):
        if same_eval and _limits_at_most(job.evaluation, prior.evaluation):
            return Decision(job, REUSE, prior)
        return Decision(job, BUILD, prior, why=f"{prior.status} under other settings or tighter limits")
    problem = checkpoint_problem(prior)
    if problem is not None:
        return Decision(job, BUILD, prior, why=f"stored checkpoint damaged: {problem}")
    if same_eval:
        return Decision(job, REUSE, prior)
    old, new = prior.evaluation, job.evaluation
    check_changed = old.get("check") != new.get("check")
    measure_changed = old.get("measure") != new.get("measure")
    samples_changed = (old.get("check") or {}).get("samples") != (new.get("check") or {}).get("samples")
    if check_changed:
        needs_measure = measure_changed or prior.status == R.INCORRECT or prior.measurement is None
        if samples_changed or not prior.outputs or not _task_figure_holds(old, new):
            return Decision(job, EVALUATE, prior, list(CHECK_AND_MEASURE if needs_measure else CHECK_ONLY), "other check samples")
        if needs_measure:
            return Decision(job, EVALUATE, prior, list(CHECK_AND_MEASURE), "another tolerance, and not measured as asked")
        return Decision(job, RECHECK, prior, list(CHECK_ONLY), "another tolerance")
    if measure_changed and prior.status == R.OK:
        return Decision(job, EVALUATE, prior, list(MEASURE_ONLY), "other measure settings or threads")
    return Decision(job, REUSE, prior)  # incorrect under the same check: measuring would change nothing


def _task_figure_holds(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a stored judgement's task figure answers the new task gate (only its limit changed),
    so that the driver can judge again without the evaluation batches."""
    task = (new.get("check") or {}).get("task")
    if task is None:
        return True
    before = (old.get("check") or {}).get("task")
    return before is not None and TaskGate.from_dict(task).same_figure(TaskGate.from_dict(before))


def stored_task_figure(prior: ResultRecord) -> float | None:
    """The task gate's figure a stored judgement measured (None: it had none)."""
    gates = prior.check.gates if prior.check is not None else None
    task = gates.get("task") if isinstance(gates, dict) else None
    figure = task.get("figure") if isinstance(task, dict) else None
    return float(figure) if isinstance(figure, (int, float)) and not isinstance(figure, bool) else None


def recheck(job: Job, prior: ResultRecord, outputs: bytes, reference: bytes, spec: SweepSpec) -> ResultRecord:
    """Judge stored outputs again under this sweep's tolerance: no worker, no rebuild."""
    stored = unpack_outputs(outputs)
    _, expected = load_reference(reference)
    criteria = criteria_of(job.evaluation)
    check: CheckResult = criteria.apply(compare_outputs(expected, stored[0], criteria.tolerance), stored[0], expected,
                                        stored_task_figure(prior))
    record = ResultRecord.from_dict(prior.to_dict())
    record.result_id = None
    record.how, record.source = R.RECHECKED, {"sweep": prior.sweep_id, "result": prior.result_id}
    record.eval_key, record.evaluation, record.check = job.eval_key, job.evaluation, check
    if check.ok:
        record.status, record.error, record.error_class = R.OK, None, None
    else:
        record.status, record.error, record.error_class = R.INCORRECT, check.reason, "IncorrectOutput"
    return record


def jobs_for(spec: SweepSpec, identities: dict[str, tuple[str, str]], infos, shapes: dict | None = None) -> list[Job]:
    """Every job of a sweep for the workers ``infos`` describe: ``identities`` maps each model to its
    (weights fingerprint, architecture key)."""
    device_classes = {i.device_class_key: i.device_class for i in infos}
    threads = {i.device_class_key: i.threads for i in infos}
    return expand(spec, {n: fp for n, (fp, _) in identities.items()}, device_classes, threads,
                  structures={n: st for n, (_, st) in identities.items()}, shapes=shapes)
