"""A job sent ahead to a worker carries the sweep's deadline: past it, the worker skips the job
at once (no model load, no build) instead of running it after the total budget ran out."""

from __future__ import annotations

import time

from orchestrator import records as R
from orchestrator.planning.candidates import identify_models
from orchestrator.planning.keys import expand
from orchestrator.spec.schema import parse_spec
from orchestrator.worker.actor import TuneWorker


def _worker_and_job(start_by: float | None):
    spec = parse_spec({"models": [{"name": "m", "factory": "aitune.examples:mlp", "kwargs": {"width": 8, "depth": 1},
                                   "inputs": [{"shape": [8]}]}],
                       "batch_sizes": [1], "candidates": [{"backend": "TorchEagerBackend"}],
                       "measure": {"budget_s": 0.01, "min_iters": 3, "warmup_iters": 1}})
    worker = TuneWorker({"kind": "cpu", "threads": 1, "label": "t"}, spec.model_dump(mode="json"), "t-0")
    fingerprints = {name: fp for name, (fp, _) in identify_models(spec).items()}
    job = expand(spec, fingerprints, {"d" * 64: {"device_type": "cpu"}})[0]
    job.start_by = start_by
    return worker, job


def test_a_job_whose_start_by_has_passed_is_skipped_without_loading_anything():
    worker, job = _worker_and_job(time.time() - 1.0)
    answer = worker.build(job.to_dict())
    assert answer["status"] == R.SKIPPED and answer["error"] == R.BUDGET_RAN_OUT and answer["error_class"] == "Budget"
    assert worker.cache_info()["loads"] == 0
    assert worker.finish(job.to_dict()) == (None, None, None, None)  # nothing was built
    record, *_ = worker.evaluate(job.to_dict(), b"", R.result_for(job, R.OK).to_dict())
    assert record["status"] == R.SKIPPED and worker.cache_info()["loads"] == 0


def test_a_job_still_within_its_start_by_runs():
    worker, job = _worker_and_job(time.time() + 600.0)
    assert worker.build(job.to_dict())["status"] == R.OK
    record, checkpoint, *_ = worker.finish(job.to_dict())
    assert record["status"] == R.OK and checkpoint


def test_a_workers_log_says_a_failed_build_in_one_line_and_keeps_the_traceback_out(caplog):
    import logging

    from orchestrator.worker.process import quiet_libraries

    quiet_libraries()
    quiet_libraries()  # once is enough: a second call adds no second filter
    log = logging.getLogger("aitune.torch.backend.backend")
    assert sum(type(f).__name__ == "OneLineFailures" for f in log.filters) == 1
    try:
        try:
            raise KeyError("weight")
        except KeyError as cause:
            raise RuntimeError("Failed to export the model with torch.export.\nlong advice") from cause
    except RuntimeError:
        with caplog.at_level(logging.ERROR, logger=log.name):
            log.exception("Backend %s failed to build on %s", "OnnxRuntimeBackend", "cpu")
    (record,) = [r for r in caplog.records if r.name == log.name]
    assert record.exc_info is None and "Traceback" not in caplog.text
    assert record.getMessage() == ("Backend OnnxRuntimeBackend failed to build on cpu: RuntimeError from KeyError: 'weight' "
                                   "(its traceback: the result's error, in report.json)")
