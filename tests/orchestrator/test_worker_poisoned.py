"""A candidate that poisons the CUDA context in ``finish``: the worker's answer still comes back,
marked to recycle (issue 31, item 13)."""

from __future__ import annotations

from orchestrator import records as R
from orchestrator.worker import actor as worker_module
from orchestrator.planning.candidates import identify_models
from orchestrator.planning.keys import expand
from orchestrator.spec.schema import parse_spec

FAULT = "orchestrator.sim.fault_backends:FaultBackend"


def _worker_and_job():
    spec = parse_spec({
        "models": [{"name": "m", "factory": "aitune.examples:mlp", "kwargs": {"width": 8, "depth": 1},
                    "inputs": [{"shape": [8]}]}],
        "batch_sizes": [1],
        "candidates": [{"backend": FAULT, "config": {"fault": "capture", "phase": "infer"}}],
    })
    worker = worker_module.TuneWorker({"kind": "cpu", "threads": 1, "label": "t"}, spec.model_dump(mode="json"), "t-0")
    fingerprints = {name: fp for name, (fp, _) in identify_models(spec).items()}
    job = next(j for j in expand(spec, fingerprints, {"d" * 64: {"device_type": "cpu"}}) if j.backend == FAULT)
    return worker, job


def test_a_poisoned_finish_answers_marked_to_recycle_without_reading_the_reference(monkeypatch):
    """The candidate fails as a CUDA graph capture does (a poisoned context); reading the
    reference then raises, as any tensor read in a poisoned CUDA context does. This machine has no
    CUDA context to poison, so the read is replaced by one that raises like it."""
    worker, job = _worker_and_job()

    def poisoned_read(sample, outputs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(worker_module, "pack_reference", poisoned_read)
    assert worker.build(job.to_dict())["status"] == R.OK
    record, checkpoint, outputs, reference = worker.finish(job.to_dict(), want_reference=True)
    assert record["status"] == R.ERROR and "capture" in record["error"]
    assert record["recycled"] and "CUDA graph capture failed" in record["recycled"]
    assert checkpoint is None and outputs is None and reference is None
