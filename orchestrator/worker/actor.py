"""The worker: a Ray actor pinned to one device slot that builds, checks and measures candidates.

The actor keeps each model and its eager fp32 reference between candidates. Each candidate runs
in two calls, ``build`` then ``finish`` (check, measure, save), so that the driver can hold each
phase to its own timeout and kill the actor when one hangs. Its process set-up is in
``process`` and ``on_node``, its memory checks in ``hygiene`` and ``heap``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import ray
import torch

from aitune.accuracy import Criteria
from aitune.canonical import sha256_of
from aitune.checkpoint import load_checkpoint, save_checkpoint
from aitune.checkpoint_trust import candidate_allowlists
from aitune.decision import DecisionRule, load_average, run_rounds
from aitune.environment import describe_environment
from aitune.failures import build_failure_status
from aitune.judge import judge
from aitune.reference import pack_outputs, pack_reference
from aitune.shapes import parse_label
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend.backend import Backend, build_sharing
from aitune.torch.backend.registry import make_backend
from aitune.torch.export_cache import machine_export_cache
from aitune.torch.precision import use_fp32_reference_settings
from aitune.torch.tree import map_tensors
from orchestrator import records as R
from orchestrator.planning.candidates import batches_fingerprint, evaluation_batches
from orchestrator.records import Job, ResultRecord, WorkerInfo, result_for
from orchestrator.spec.schema import SweepSpec, parse_spec
from orchestrator.transfer import pack_dir, unpack_to
from orchestrator.worker import hygiene
from orchestrator.worker.failures import NotDeterministicModel, error_of
from orchestrator.worker.heap import HeapClock
from orchestrator.worker.model_cache import ModelCache, default_limit_bytes
from orchestrator.worker.on_node import measuring_alone, pin_to_share
from orchestrator.worker.padding import bucket_latencies, candidate_padding_problem, dynamic_problem
from orchestrator.worker.pretend_gpus import pretend_device
from orchestrator.worker.process import pick_device, quiet_libraries
from orchestrator.worker.references import load_checked, run_reference


class TuneWorker:
    def __init__(self, slot: dict[str, Any], spec: dict[str, Any], worker_id: str) -> None:
        quiet_libraries()

        self.slot = slot
        self.worker_id = worker_id
        self.threads = int(slot.get("threads", 1))
        # Ray sets OMP_NUM_THREADS=1 in workers: set the count explicitly or CPU timings lie.
        torch.set_num_threads(self.threads)
        self.device = pick_device(slot.get("kind", "cpu"))
        use_fp32_reference_settings(self.device)  # TF32 off on a GPU: the fp32 reference must be real fp32
        self.spec: SweepSpec = parse_spec(spec)
        self.env = pretend_device(describe_environment(self.device), slot.get("kind"))  # test-only name
        slots_here = max(1, (os.cpu_count() or 1) // max(self.threads, 1))
        self._cache = ModelCache(default_limit_bytes(self.spec.workers.model_cache_mb, self.device, slots_here))
        self.cores = pin_to_share(slot, worker_id)
        self._info: dict[str, Any] | None = None
        self._backend: Backend | None = None
        self._built_key: str | None = None  # the job whose build ``_backend`` holds
        self._phases: dict[str, float] = {}
        #: wall-clock windows of this candidate's phases and the load around its measurement
        self._context: dict[str, Any] = {}
        self._heap = HeapClock()
        #: the last task gate's evaluation batches and their eager outputs, by (model, batch, fingerprint):
        #: consecutive jobs of one model (the scheduler keeps a worker on it) run the user's function and
        #: the eager model on them once
        self._task_last: tuple[tuple[str, int, str], tuple[list[Sample], list[Any]]] | None = None
        self._before: hygiene.MemorySnapshot | None = None
        self._scratch = Path(tempfile.mkdtemp(prefix=f"aitune-worker-{worker_id}-"))
        # the ONNX Runtime and TensorRT candidates of one model export it once between them, and
        # a graph translated before (by any worker of this machine) is filled rather than translated
        self._exports = machine_export_cache(Path(tempfile.mkdtemp(prefix=f"aitune-exports-{worker_id}-")))
        for path in (self._scratch, self._exports.root):  # gone with the process when it exits cleanly
            weakref.finalize(self, shutil.rmtree, path, True)
        self._heap.full_collection()

    # -- identity -------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        if self._info is None:  # fixed for the life of the process: worked out once
            self._info = self._describe()
        return dict(self._info)

    def _describe(self) -> dict[str, Any]:
        device_class = self.env.device_class()
        return WorkerInfo(
            worker_id=self.worker_id,
            node_id=ray.get_runtime_context().get_node_id(),
            hostname=socket.gethostname(),
            pid=os.getpid(),
            device=str(self.device),
            device_class=device_class,
            device_class_key=sha256_of(device_class),
            threads=torch.get_num_threads(),
        ).to_dict()

    # -- model, sample, reference -----------------------------------------------------------------
    def _reference(self, model_name: str, batch: int, fingerprint: str = "",
                   shape: str = "") -> tuple[torch.nn.Module, Sample, Any]:
        """The model (from the cache, else loaded and checked against the driver's fingerprint)
        and its eager fp32 reference at ``batch`` (and ``shape``: a shape point's label)."""
        start = time.perf_counter()
        module = self._cache.module(model_name)
        if module is None:
            module = load_checked(self.spec.model(model_name), fingerprint, self.device)
            evictions = self._cache.evictions
            self._cache.add_module(model_name, module)
            self._heap.model_loaded(evicted=self._cache.evictions > evictions)
        ref = self._cache.reference(model_name, (batch, shape))
        if ref is None:
            ref = run_reference(self.spec.model(model_name), module, batch, self.device, parse_label(shape))
            self._cache.add_reference(model_name, (batch, shape), *ref)
        self._phases["load"] = time.perf_counter() - start
        return module, *ref

    def cache_info(self) -> dict[str, Any]:
        """What this worker holds: models (least recently used first), bytes, loads, evictions, RSS,
        cores, and its ONNX exports (kept, their bytes, made, handed to a later candidate, and of
        those made how many were filled in from an earlier model's translation, and of those how
        many from a translation another process left on disk)."""
        return {"models": self._cache.names, "bytes": self._cache.nbytes, "limit_bytes": self._cache.limit_bytes,
                "loads": self._cache.loads, "evictions": self._cache.evictions,
                "rss_bytes": hygiene.snapshot(torch.device("cpu")).allocated,
                "peak_rss_bytes": hygiene.peak_rss_bytes(),
                **{f"{kind}_rss_bytes": n for kind, n in hygiene.rss_parts().items()},
                "cores": sorted(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
                "exports": {"entries": len(self._exports), "bytes": self._exports.nbytes,
                            "made": self._exports.misses, "shared": self._exports.hits,
                            "filled": self._exports.templates.hits, "templates": len(self._exports.templates),
                            "filled_from_disk": self._exports.templates.disk_hits}}

    # -- one candidate, phase by phase ---------------------------------------------------------------
    def build(self, job_dict: dict[str, Any]) -> dict[str, Any]:
        """Load the model (cached) and build the candidate; returns its result record (``ok`` so far,
        or the failure), as a dict: the same typed record as ``finish``, at the Ray edge."""
        job = Job.from_dict(job_dict)
        skipped = self._begin(job)
        if skipped is not None:
            return skipped.to_dict()
        try:
            module, sample, _ = self._reference(job.model, job.batch_size, job.model_fingerprint, job.shape)
            backend = make_backend(job.backend, job.config)
        except NotDeterministicModel as exc:
            failure = self._failure(job, R.ERROR, exc)
            failure["error"] = str(exc)  # the message says it all; no traceback
            return failure
        except Exception as exc:
            return self._failure(job, R.ERROR, exc)
        # Models and references stay loaded on purpose: what is above this line is not a leak.
        self._before = hygiene.snapshot(self.device)
        start, wall = time.perf_counter(), time.time()
        cache = self._scratch / job.key[:16]
        try:
            graph_spec = GraphSpec.from_dict(job.graph_spec)
            build_sharing(backend, module, graph_spec, [sample], self.device, cache, self._exports)
        except Exception as exc:  # a failed build's seconds are part of its record too
            self._phases["build"] = time.perf_counter() - start
            return self._failure(job, build_failure_status(exc), exc)
        self._phases["build"] = time.perf_counter() - start
        self._context["build"] = [wall, time.time()]
        notes = backend.build_notes()
        if notes:  # what the build chose (a quantized candidate's layers kept in full precision)
            self._context["notes"] = notes
        self._backend, self._built_key = backend, job.key
        record = self._record(job, R.OK)
        record.phases = dict(self._phases)
        record.context = dict(self._context)
        return record.to_dict()

    def _begin(self, job: Job) -> ResultRecord | None:
        """Start a job's first call afresh: the last candidate released, phases and memory figures
        reset; a ``skipped`` record instead when the sweep's budget ran out before it came to start
        (``job.start_by``: it was sent ahead)."""
        self._release()
        self._phases = {}
        self._context = {}
        self._before = None
        if job.start_by is not None and time.time() > job.start_by:
            return self._record(job, R.SKIPPED, R.BUDGET_RAN_OUT, "Budget")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return None

    def finish(self, job_dict: dict[str, Any],
               want_reference: bool = False) -> tuple[dict, bytes | None, bytes | None, bytes | None]:
        """Check, measure (if correct), save the checkpoint; returns (record, checkpoint, outputs, reference).

        The checkpoint of an incorrect candidate is kept too: a later sweep with another tolerance
        judges it again without building it.

        The scheduler sends a job's ``finish`` together with its ``build``; after a build that
        failed (whose result already said why) it answers ``(None, None, None, None)`` at once.
        """
        job = Job.from_dict(job_dict)
        if self._backend is None or self._built_key != job.key:
            return None, None, None, None
        _, sample, reference = self._reference(job.model, job.batch_size, job.model_fingerprint, job.shape)
        record = self._record(job, R.OK)
        checkpoint = outputs = None
        try:
            outputs = self._judge(self._backend, job, record, sample, reference, ["check", "measure"], None)
            start = time.perf_counter()
            path = self._scratch / f"ckpt-{job.key[:16]}"
            save_checkpoint(self._backend, path, extra={"job_key": job.key})
            checkpoint = pack_dir(path)
            shutil.rmtree(path, ignore_errors=True)
            self._phases["save"] = time.perf_counter() - start
        except Exception as exc:
            self._failed(record, exc)
            checkpoint = outputs = None
        # A poisoned CUDA context can't hand the reference back either: reading it would raise and lose the recycle
        return self._close(record, checkpoint, outputs, sample, reference, want_reference and not record.recycled)

    def evaluate(self, job_dict: dict[str, Any], checkpoint: bytes, prior_dict: dict[str, Any],
                 want_reference: bool = False) -> tuple[dict, None, bytes | None, bytes | None]:
        """Load a stored artifact and judge it again (``job.redo``: check and/or measure): no rebuild."""
        job = Job.from_dict(job_dict)
        prior = ResultRecord.from_dict(prior_dict)
        skipped = self._begin(job)
        if skipped is not None:
            return skipped.to_dict(), None, None, None
        record = self._record(job, R.OK)
        record.how = "+".join(R.RECHECKED if r == "check" else R.REMEASURED for r in job.redo) or R.REUSED
        record.source = {"sweep": prior.sweep_id, "result": prior.result_id}
        record.checkpoint, record.manifest_sha256 = prior.checkpoint, prior.manifest_sha256
        record.check, record.measurement, record.phases = prior.check, prior.measurement, dict(prior.phases)
        record.bucket_ms = prior.bucket_ms
        outputs = None
        try:
            _, sample, reference = self._reference(job.model, job.batch_size, job.model_fingerprint, job.shape)
            self._before = hygiene.snapshot(self.device)
            start = time.perf_counter()
            self._backend = self._load_stored(job, prior.manifest_sha256, checkpoint)
            self._phases["load_checkpoint"] = time.perf_counter() - start
            outputs = self._judge(self._backend, job, record, sample, reference, job.redo, prior.check)
        except Exception as exc:
            self._failed(record, exc)
            outputs = None
            sample = reference = None
        return self._close(record, None, outputs, sample, reference, want_reference and sample is not None)

    def _judge(self, backend: Backend, job: Job, record: ResultRecord, sample: Sample, reference: Any,
               redo: list[str], previous_check) -> bytes:
        config = self.spec.measure.config(self.threads)
        criteria = Criteria.from_dict(job.evaluation.get("check") or {})  # what the job's eval key says
        task = self._task_batches(job, criteria) if "check" in redo else None
        with self._quiet_node("measure" in redo):
            # after the node's lock: that is measure_wait
            start, wall, load = time.perf_counter(), time.time(), load_average()
            verdict = judge(backend.infer, [sample], [reference], self.device, criteria.tolerance,
                            config if "measure" in redo else None, check="check" in redo, previous_check=previous_check,
                            criteria=criteria, task=task)
        self._phases["check+measure" if "measure" in redo else "check"] = time.perf_counter() - start
        if "measure" in redo:
            self._context.update(measure=[wall, time.time()], load=[load, load_average()])
        record.check = verdict.check
        if "measure" in redo or verdict.status != R.OK:
            record.measurement = verdict.measurement
        if verdict.status != R.OK:
            record.status, record.error, record.error_class = R.INCORRECT, verdict.error, "IncorrectOutput"
        if verdict.status == R.OK:
            self._shape_checks(backend, job, record, criteria, config, redo)
        return pack_outputs(verdict.outputs)

    def _shape_checks(self, backend: Backend, job: Job, record: ResultRecord, criteria: Criteria, config, redo) -> None:
        """A bucket's padding check, or a dynamic-shape artifact's check at other lengths and its
        latency at every bucket (aitune.shapes; orchestrator.worker.padding)."""
        padding = (job.evaluation.get("check") or {}).get("padding")
        buckets = (job.evaluation.get("measure") or {}).get("buckets")
        model = self.spec.model(job.model)
        if padding and "check" in redo:
            module = self._cache.module(job.model) or self._reference(job.model, job.batch_size, job.model_fingerprint, job.shape)[0]
            if "range" in padding:
                problem = dynamic_problem(backend.infer, module, model, job.batch_size, padding, criteria, self.device)
                why = "DynamicShapeDiffers"
            elif padding.get("refused") is None:
                problem = candidate_padding_problem(backend.infer, module, model, job.batch_size,
                                                    job.graph_spec, padding, criteria, self.device)
                why = "PaddingChangesOutputs"
            else:
                problem = None
            if problem:
                record.status, record.error, record.error_class = R.INCORRECT, problem, why
                return
        if buckets and "measure" in redo:
            with self._quiet_node(True):
                record.bucket_ms = bucket_latencies(backend.infer, model, job.batch_size, buckets, config, self.device)

    def _task_batches(self, job: Job, criteria: Criteria) -> tuple[list[Sample], list[Any]] | None:
        """A task gate's evaluation batches (the ones the driver fingerprinted) on this device, and the
        eager fp32 model's outputs on them."""
        if criteria.task is None:
            return None
        key = (job.model, job.batch_size, criteria.task.fingerprint)
        if self._task_last is None or self._task_last[0] != key:
            batches = evaluation_batches(criteria.task.samples, job.model, job.batch_size)
            if batches_fingerprint(batches) != criteria.task.fingerprint:
                raise ValueError(f"accuracy.task.samples {criteria.task.samples} gave {job.model} other batches here "
                                 "than on the driver: make them deterministic (seeded)")
            module = self._cache.module(job.model)  # loaded with the job's reference, just before
            if module is None:
                module, _, _ = self._reference(job.model, job.batch_size, job.model_fingerprint, job.shape)
            with torch.inference_mode():
                outputs = [map_tensors(b.to(self.device)(module), lambda t: t.detach().to("cpu").clone()) for b in batches]
            self._task_last = (key, (batches, outputs))  # on the CPU: nothing held on the device between jobs
        batches, outputs = self._task_last[1]
        return [b.to(self.device) for b in batches], outputs

    def _load_stored(self, job: Job, manifest_sha: str | None, checkpoint: bytes) -> Backend:
        """Unpack and load a stored checkpoint: its manifest hash first, and only this model's factory."""
        path = self._scratch / f"stored-{job.key[:16]}-{time.monotonic_ns()}"
        unpack_to(checkpoint, path)
        factories, backends = candidate_allowlists(self.spec.model(job.model).factory, job.backend)
        backend = load_checkpoint(path, self.device, manifest_sha256=manifest_sha,
                                  allow_factories=factories, allow_backends=backends)
        backend.deploy(self.device)
        return backend

    def _failed(self, record: ResultRecord, exc: BaseException) -> None:
        record.status = R.ERROR
        record.error, record.error_class = error_of(exc)
        record.measurement = None
        poisoned = hygiene.must_recycle(exc)
        if poisoned:
            # This process must go whatever memory it left, and a poisoned CUDA context can't be
            # asked for memory figures (a sticky error makes every query raise): _close skips them.
            record.recycled, self._before = poisoned, None

    def _close(self, record, checkpoint, outputs, sample, reference, want_reference):
        if self.device.type == "cuda":
            record.peak_memory_bytes = int(torch.cuda.max_memory_allocated())
        record.phases = {**record.phases, **self._phases}
        record.context = {**record.context, **self._context}
        self._release()
        collected = self._before is not None
        if collected:
            record.memory, record.recycled = self._memory_after(record.error_class == "OutOfMemoryError")
        self._heap.freeze_or_thaw(self.device, collected)
        ref = pack_reference(sample, reference) if want_reference else None
        return record.to_dict(), checkpoint, outputs, ref

    def decide(self, checkpoints: dict[str, tuple[str | None, str | None, bytes]], model: str, batch: int,
               rule: dict[str, Any], order: list[str], shape: str = "") -> dict[str, Any]:
        """A group's decision rounds: its stored checkpoints (by result key: backend, manifest
        SHA-256, bytes) measured interleaved on this device until the rule resolves them or its
        cap is reached (aitune.decision.run_rounds); returns the raw rounds for the driver to assess."""
        start = time.perf_counter()
        _, sample, _ = self._reference(model, batch, shape=shape)
        backends = {}
        for key, (backend_name, manifest_sha, data) in checkpoints.items():
            job = Job(key=key, model=model, batch_size=batch, backend=backend_name, config={}, candidate="",
                      device_class_key="", model_fingerprint="")
            backends[key] = self._load_stored(job, manifest_sha, data)
        warmup = self.spec.measure.warmup(self.threads)
        load_s, wall = time.perf_counter() - start, time.time()
        with self._quiet_node(True):
            rounds = run_rounds({k: b.infer for k, b in backends.items()}, sample, self.device,
                                DecisionRule(**rule), order, threads=self.threads, warmup=warmup)
        backends.clear()
        return {**rounds.to_dict(), "window": [wall, time.time()], "node": self.info()["node_id"],
                "worker": self.worker_id, "load_s": load_s}

    def _quiet_node(self, measuring: bool) -> contextlib.AbstractContextManager:
        """With ``measure.exclusive: node``, hold the node's measurement lock while measuring."""
        if not measuring or self.spec.measure.exclusive != "node":
            return contextlib.nullcontext()
        return measuring_alone(self.worker_id, self.spec.budgets.measure_timeout_s, self._phases)

    # -- helpers ---------------------------------------------------------------------------------------
    def _record(self, job: Job, status: str, error: str | None = None, error_class: str | None = None) -> ResultRecord:
        return result_for(job, status, error, error_class, worker=WorkerInfo.from_dict(self.info()))

    def _failure(self, job: Job, status: str, exc: BaseException) -> dict[str, Any]:
        """A build that failed: its result record, with what it left in memory."""
        oom = hygiene.is_oom(exc)
        poisoned = hygiene.must_recycle(exc)
        if poisoned:  # no memory figures from a poisoned CUDA context (see _failed)
            self._before = None
        self._release()
        record = self._record(job, status)
        record.error, record.error_class = error_of(exc)
        record.phases = dict(self._phases)
        mem, recycled = self._memory_after(oom) if self._before is not None else ({}, None)
        record.memory, record.recycled = mem, poisoned or recycled
        return record.to_dict()

    def _memory_after(self, oom: bool) -> tuple[dict[str, int], str | None]:
        """What the candidate left behind once released, and whether this worker should be recycled."""
        return hygiene.memory_after(self._before, self.device, self.spec.workers.recycle_margin_mb, oom)

    def _release(self) -> None:
        if self._backend is not None:
            try:
                self._backend.deactivate()
            except RuntimeError:
                pass
            self._backend = None
        self._built_key = None
        self._exports.prune()  # the exports of models the cache let go of
        if not self._scratch.is_dir() or any(self._scratch.iterdir()):
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch.mkdir(parents=True, exist_ok=True)
