"""The worker: a Ray actor pinned to one device slot that builds, checks and measures candidates.

The actor keeps each model and its eager fp32 reference between candidates. Each candidate runs
in two calls, ``build`` then ``finish`` (check, measure, save), so that the driver can hold each
phase to its own timeout and kill the actor when one hangs.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch

from aitune.canonical import sha256_of
from aitune.check import tolerance_for
from aitune.checkpoint import load_checkpoint, save_checkpoint
from aitune.decision import DecisionRule, load_average, run_rounds
from aitune.environment import describe_environment
from aitune.judge import judge
from aitune.measure import MeasureConfig
from aitune.reference import pack_outputs, pack_reference
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend.backend import Backend, UnsupportedDeviceError, build_sharing
from aitune.torch.backend.registry import make_backend
from aitune.torch.export_cache import machine_export_cache
from aitune.torch.precision import use_fp32_reference_settings
from aitune.torch.tree import map_tensors
from orchestrator import records as R
from orchestrator.error_text import summarize
from orchestrator.planning.candidates import load_model, make_sample, model_fingerprint, not_deterministic
from orchestrator.records import Job, ResultRecord, WorkerInfo, result_for
from orchestrator.spec.schema import SweepSpec, parse_spec
from orchestrator.transfer import pack_dir, unpack_to
from orchestrator.worker import hygiene
from orchestrator.worker.model_cache import ModelCache, default_limit_bytes
from orchestrator.worker.pretend_gpus import pretend_device


def pick_device(kind: str) -> torch.device:
    """What torch sees decides the device, not what Ray granted (pretend GPUs have no CUDA)."""
    if kind == "gpu" and torch.cuda.is_available():
        return torch.device("cuda:0")  # Ray's CUDA_VISIBLE_DEVICES leaves this actor one GPU
    return torch.device("cpu")


class OneLineFailures(logging.Filter):
    """A failed build's traceback is its result's error (in the store and report.json); the
    worker's log, which Ray prints on the driver's console, says it in one line: a sweep of many
    models whose exports fail would otherwise print a page of torch.export's traceback for each."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            said = summarize("".join(traceback.format_exception(exc)), 240)
            record.msg, record.args = f"{record.getMessage()}: {said} (its traceback: the result's error, in report.json)", None
            record.exc_info = record.exc_text = None
        return True


def quiet_libraries() -> None:
    """Keep worker logs to what matters: the ONNX exporter and torch's pytree are chatty, and a
    failed build is a line, not its traceback."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # a data-dependent branch makes it print the graph it traced, page after page, before the
    # export fails with an error that says the same in a line (the result's)
    logging.getLogger("torch.fx.experimental.symbolic_shapes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    backend_log = logging.getLogger(Backend.__module__)
    if not any(isinstance(f, OneLineFailures) for f in backend_log.filters):
        backend_log.addFilter(OneLineFailures())


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
        self.cores = _pin_to_share(slot, worker_id)
        self._info: dict[str, Any] | None = None
        self._backend: Backend | None = None
        self._built_key: str | None = None  # the job whose build ``_backend`` holds
        self._phases: dict[str, float] = {}
        #: wall-clock windows of this candidate's phases and the load around its measurement
        self._context: dict[str, Any] = {}
        self._thaw_at = 0.0  # time.monotonic() from which the next candidate's close thaws the heap
        self._before: hygiene.MemorySnapshot | None = None
        self._scratch = Path(tempfile.mkdtemp(prefix=f"aitune-worker-{worker_id}-"))
        # the ONNX Runtime and TensorRT candidates of one model export it once between them, and
        # a graph translated before (by any worker of this machine) is filled rather than translated
        self._exports = machine_export_cache(Path(tempfile.mkdtemp(prefix=f"aitune-exports-{worker_id}-")))
        for path in (self._scratch, self._exports.root):  # gone with the process when it exits cleanly
            weakref.finalize(self, shutil.rmtree, path, True)
        self._full_collection()

    # -- identity -------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        if self._info is None:  # fixed for the life of the process: worked out once
            self._info = self._describe()
        return dict(self._info)

    def _describe(self) -> dict[str, Any]:
        import ray

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
    def _reference(self, model_name: str, batch: int, fingerprint: str = "") -> tuple[torch.nn.Module, Sample, Any]:
        """The model (from the cache, else loaded and checked against the driver's fingerprint)
        and its eager fp32 reference at ``batch``."""
        start = time.perf_counter()
        module = self._cache.module(model_name)
        if module is None:
            model_spec = self.spec.model(model_name)
            module = load_model(model_spec)
            if fingerprint and model_fingerprint(module) != fingerprint:
                raise NotDeterministicModel(not_deterministic(model_name, model_spec.factory)
                                            + " (this worker's weights differ from the driver's)")
            module = module.to(self.device)
            evictions = self._cache.evictions
            self._cache.add_module(model_name, module)
            if self._cache.evictions > evictions:
                # What the cache let go of goes now, even where it is frozen garbage (a model in
                # a reference cycle): a model's worth of memory is worth a full collection.
                gc.unfreeze()
                self._full_collection()
            else:
                # Only the new model is frozen with the rest. Not a full collection, so the clock
                # of the next one stays as it is: timed from this cheap one, a thaw would fall
                # due within a second, after nearly every model's first candidate.
                _freeze_heap()
        ref = self._cache.reference(model_name, batch)
        if ref is None:
            try:
                sample = make_sample(self.spec.model(model_name), batch).to(self.device)
                with torch.inference_mode():
                    out = map_tensors(sample(module), lambda t: t.detach().clone())
            except Exception as exc:
                if hygiene.is_oom(exc) or hygiene.must_recycle(exc):
                    raise  # the device's trouble, not the model's: handled as such
                raise ReferenceFailed(str(exc)) from exc
            self._cache.add_reference(model_name, batch, sample, out)
            ref = (sample, out)
        self._phases["load"] = time.perf_counter() - start
        return module, *ref

    def cache_info(self) -> dict[str, Any]:
        """What this worker holds: models (least recently used first), bytes, loads, evictions, RSS,
        cores, and its ONNX exports (kept, their bytes, made, handed to a later candidate, and of
        those made how many were filled in from an earlier model's translation, and of those how
        many from a translation another process left on disk)."""
        return {"models": self._cache.names, "bytes": self._cache.nbytes, "limit_bytes": self._cache.limit_bytes,
                "loads": self._cache.loads, "evictions": self._cache.evictions,
                "rss_bytes": hygiene.snapshot(torch.device("cpu")).allocated, "peak_rss_bytes": _peak_rss_bytes(),
                **{f"{kind}_rss_bytes": n for kind, n in _rss_parts().items()},
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
            module, sample, _ = self._reference(job.model, job.batch_size, job.model_fingerprint)
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
            build_sharing(backend, module, GraphSpec.from_dict(job.graph_spec), [sample], self.device, cache, self._exports)
        except Exception as exc:  # a failed build's seconds are part of its record too
            self._phases["build"] = time.perf_counter() - start
            return self._failure(job, R.UNSUPPORTED if isinstance(exc, UnsupportedDeviceError) else R.BUILD_ERROR, exc)
        self._phases["build"] = time.perf_counter() - start
        self._context["build"] = [wall, time.time()]
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

    def finish(self, job_dict: dict[str, Any], want_reference: bool = False) -> tuple[dict, bytes | None, bytes | None, bytes | None]:
        """Check, measure (if correct), save the checkpoint; returns (record, checkpoint, outputs, reference).

        The checkpoint of an incorrect candidate is kept too: a later sweep with another tolerance
        judges it again without building it.

        The scheduler sends a job's ``finish`` together with its ``build``; after a build that
        failed (whose result already said why) it answers ``(None, None, None, None)`` at once.
        """
        job = Job.from_dict(job_dict)
        if self._backend is None or self._built_key != job.key:
            return None, None, None, None
        _, sample, reference = self._reference(job.model, job.batch_size, job.model_fingerprint)
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
        outputs = None
        try:
            _, sample, reference = self._reference(job.model, job.batch_size, job.model_fingerprint)
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
        m = self.spec.measure
        config = MeasureConfig(
            warmup_iters=m.warmup_iters, min_iters=m.min_iters, target_rel_ci=m.target_rel_ci,
            budget_s=m.budget_s, threads=self.threads,
        )
        tolerance = tolerance_for(job.precision, self.spec.tolerance_overrides())
        with self._quiet_node("measure" in redo):
            start, wall, load = time.perf_counter(), time.time(), load_average()  # after the node's lock: that is measure_wait
            verdict = judge(backend.infer, [sample], [reference], self.device, tolerance,
                            config if "measure" in redo else None, check="check" in redo, previous_check=previous_check)
        self._phases["check+measure" if "measure" in redo else "check"] = time.perf_counter() - start
        if "measure" in redo:
            self._context.update(measure=[wall, time.time()], load=[load, load_average()])
        record.check = verdict.check
        if "measure" in redo or verdict.status != R.OK:
            record.measurement = verdict.measurement
        if verdict.status != R.OK:
            record.status, record.error, record.error_class = R.INCORRECT, verdict.error, "IncorrectOutput"
        return pack_outputs(verdict.outputs)

    def _load_stored(self, job: Job, manifest_sha: str | None, checkpoint: bytes) -> Backend:
        """Unpack and load a stored checkpoint: its manifest hash first, and only this model's factory."""
        path = self._scratch / f"stored-{job.key[:16]}-{time.monotonic_ns()}"
        unpack_to(checkpoint, path)
        backend = load_checkpoint(
            path, self.device, manifest_sha256=manifest_sha,
            allow_factories=[self.spec.model(job.model).factory],
            allow_backends=[job.backend] if ":" in job.backend else [],
        )
        backend.deploy(self.device)
        return backend

    def _failed(self, record: ResultRecord, exc: BaseException) -> None:
        record.status = R.ERROR
        record.error, record.error_class = _error_of(exc)
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
        self._settle_heap(collected)
        ref = pack_reference(sample, reference) if want_reference else None
        return record.to_dict(), checkpoint, outputs, ref

    def decide(self, checkpoints: dict[str, tuple[str | None, str | None, bytes]], model: str, batch: int,
               rule: dict[str, Any], order: list[str]) -> dict[str, Any]:
        """A group's decision rounds: its stored checkpoints (by result key: backend, manifest
        SHA-256, bytes) measured interleaved on this device until the rule resolves them or its
        cap is reached (aitune.decision.run_rounds); returns the raw rounds for the driver to assess."""
        start = time.perf_counter()
        _, sample, _ = self._reference(model, batch)
        backends = {}
        for key, (backend_name, manifest_sha, data) in checkpoints.items():
            job = Job(key=key, model=model, batch_size=batch, backend=backend_name, config={}, candidate="",
                      device_class_key="", model_fingerprint="")
            backends[key] = self._load_stored(job, manifest_sha, data)
        m = self.spec.measure
        warmup = MeasureConfig(warmup_iters=m.warmup_iters, threads=self.threads)
        load_s, wall = time.perf_counter() - start, time.time()
        with self._quiet_node(True):
            rounds = run_rounds({k: b.infer for k, b in backends.items()}, sample, self.device,
                                DecisionRule(**rule), order, threads=self.threads, warmup=warmup)
        backends.clear()
        return {**rounds.to_dict(), "window": [wall, time.time()], "node": self.info()["node_id"],
                "worker": self.worker_id, "load_s": load_s}

    @contextlib.contextmanager
    def _quiet_node(self, measuring: bool):
        """With ``measure.exclusive: node``, hold the node's measurement lock while measuring."""
        if not measuring or self.spec.measure.exclusive != "node":
            yield
            return
        import ray

        from cluster.node_share import node_share

        share = node_share(ray.get_runtime_context().get_node_id())
        self._phases["measure_wait"] = ray.get(share.acquire.remote(self.worker_id, self.spec.budgets.measure_timeout_s))
        try:
            yield
        finally:
            share.release.remote(self.worker_id)

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
        record.error, record.error_class = _error_of(exc)
        record.phases = dict(self._phases)
        mem, recycled = self._memory_after(oom) if self._before is not None else ({}, None)
        record.memory, record.recycled = mem, poisoned or recycled
        return record.to_dict()

    def _memory_after(self, oom: bool) -> tuple[dict[str, int], str | None]:
        """What the candidate left behind once released, and whether this worker should be recycled."""
        gc.collect()
        after = hygiene.snapshot(self.device)
        margin = hygiene.margin_mb(self.spec.workers.recycle_margin_mb, self.device)
        reason = hygiene.recycle_reason(self._before, after, margin, oom)
        if reason is not None and not oom and gc.get_freeze_count():
            # Before calling it a leak: garbage among frozen objects (see _settle_heap) counts too.
            gc.unfreeze()
            gc.collect()
            after = hygiene.snapshot(self.device)
            reason = hygiene.recycle_reason(self._before, after, margin, oom)
        left, outside = hygiene.left_behind(self._before, after)
        figures = {"allocated_after": after.allocated, "reserved_after": after.reserved, "left_behind": left}
        if after.device_used is not None:  # GPUs: what the caching allocator does not see counts too
            figures.update(device_used_after=after.device_used, left_outside_allocator=outside)
        return figures, reason

    def _settle_heap(self, collected: bool) -> None:
        """Freeze what outlived the candidate just released (``collected``: the memory check has
        just collected the heap), so later collections skip it.

        What survives a release is long-lived: the models, and libraries' caches (Inductor's,
        the ONNX exporter's). Once a worker has compiled and exported, that is ~400k objects, and
        walking them cost 0.25 s per full collection: most of a small candidate's time. The heap
        is thawed and collected whole once the time since the last full collection is enough for
        that collection's cost to be at most THAW_SHARE of it (and before a suspected leak is
        judged), so objects that turned into garbage after being frozen are not kept for long, and
        a stream of tiny candidates does not pay a full collection every few of them.

        Only on CPU workers: on a GPU, garbage kept frozen may hold device memory, which the next
        candidate needs and the leak check (measured from each candidate's start) would not see.
        """
        if self.device.type != "cpu":
            return
        if time.monotonic() >= self._thaw_at:
            gc.unfreeze()
            self._full_collection()
        elif collected:
            gc.freeze()
        else:
            _freeze_heap()

    def _full_collection(self) -> None:
        """Collect and freeze the heap (thawed, or never frozen yet), and set when the next thaw
        is due from what this one cost."""
        start = time.monotonic()
        _freeze_heap()
        now = time.monotonic()
        self._thaw_at = now + (now - start) / THAW_SHARE

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


class NotDeterministicModel(RuntimeError):
    """The model this worker built is not the one the driver fingerprinted."""


class ReferenceFailed(RuntimeError):
    """The model in eager fp32 failed on its spec's inputs (or its sample factory failed)."""


def _rss_parts() -> dict[str, int]:
    """This process's resident memory by kind, from /proc (empty where it does not say): its own
    pages (``anon``), mapped files (``file``: libraries), and shared memory (``shmem``: Ray's
    object store, whose pages count in RSS once the worker has written results there)."""
    fields = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    parts: dict[str, int] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                name = fields.get(line.partition(":")[0])
                if name:
                    parts[name] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return parts


def _peak_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: kilobytes


def _pin_to_share(slot: dict[str, Any], worker_id: str) -> list[int]:
    """Pin this process (and so its compilers' child processes) to its slot's block of the
    node's cores; the node's NodeShare hands the blocks out. Unpinned if anything is missing."""
    count = int(os.environ.get("AITUNE_SLOT_CORES", "0") or 0)
    if count <= 0 or not hasattr(os, "sched_setaffinity"):
        return []
    try:
        import ray

        from cluster.node_share import node_share

        available = sorted(os.sched_getaffinity(0))
        share = node_share(ray.get_runtime_context().get_node_id())
        cores = ray.get(share.cores.remote(str(slot.get("label", worker_id)), count, available), timeout=30)
        os.sched_setaffinity(0, cores)
    except Exception as exc:  # pinning is for quiet measurements; a worker still works without it
        logging.getLogger(__name__).warning("worker %s not pinned to cores: %s", worker_id, exc)
        return []
    _bound_compile_threads(count)
    return list(cores)


def _bound_compile_threads(count: int) -> None:
    """At most ``count`` Inductor compile threads. Inductor reads TORCHINDUCTOR_COMPILE_THREADS
    when its config is first imported; importing it here only to set it would add a second or
    more to every worker's start, so that is done only where something imported it already."""
    current = int(os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "0") or 0)
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(min(current, count) if current > 0 else count)
    config = sys.modules.get("torch._inductor.config")
    if config is not None and hasattr(config, "compile_threads"):
        config.compile_threads = min(config.compile_threads or count, count)


#: the most of a CPU worker's time that thawing its heap and collecting it whole may take: after a
#: full collection that took t seconds, the next is due t / THAW_SHARE seconds later (see _settle_heap)
THAW_SHARE = 0.02


def _freeze_heap() -> None:
    """Move what is alive now (torch, Ray, the models) out of the garbage collector's sight.

    Releasing a candidate runs ``gc.collect()``; over the ~250k long-lived objects of a worker
    that costs ~0.1 s a time, which on a small machine with many workers was most of the
    scheduling overhead. Frozen objects are never collected, which is right for these.
    """
    gc.collect()
    gc.freeze()


def _trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).strip()


def _error_of(exc: BaseException) -> tuple[str, str]:
    """(error, error_class) of a failed record: a model that failed on its spec's inputs keeps its
    own traceback, marked so (no candidate of it can be checked)."""
    if isinstance(exc, ReferenceFailed):
        return _trace(exc.__cause__ or exc), R.REFERENCE_FAILED
    return _trace(exc), "OutOfMemoryError" if hygiene.is_oom(exc) else type(exc).__name__
