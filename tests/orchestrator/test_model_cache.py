"""Each worker's models and references are bounded by bytes, least recently used first out; a
factory whose weights differ between builds is refused, by the driver and by the worker."""

from __future__ import annotations

import pytest
import torch

from orchestrator import records as R
from orchestrator.planning.candidates import ModelLoadError, identify_models, structure_key
from orchestrator.planning.keys import expand
from orchestrator.worker.model_cache import ModelCache, tensor_bytes
from orchestrator.spec.schema import parse_spec


def linear(n: int) -> torch.nn.Module:
    return torch.nn.Linear(n, n)


def test_the_cache_evicts_the_least_recently_used_model_beyond_its_bytes():
    size = tensor_bytes(linear(16))
    cache = ModelCache(limit_bytes=2 * size)
    for name in ("a", "b"):
        cache.add_module(name, linear(16))
    cache.module("a")  # a is used again: b is now the oldest
    cache.add_module("c", linear(16))
    assert cache.names == ["a", "c"]
    assert cache.evictions == 1
    assert cache.nbytes <= 2 * size


def test_the_model_in_use_stays_even_when_it_alone_is_over_the_bound():
    cache = ModelCache(limit_bytes=1)
    cache.add_module("a", linear(8))
    cache.add_module("b", linear(8))
    assert cache.names == ["b"]


def test_references_count_towards_the_bound():
    module = linear(64)
    cache = ModelCache(limit_bytes=tensor_bytes(module) * 2)
    cache.add_module("a", module)
    cache.add_module("b", linear(64))
    # a's reference outputs push the total over: b, the least recently used, goes
    cache.add_reference("a", 1, torch.zeros(1, 64), torch.zeros(4096, 64))
    assert cache.names == ["a"]
    assert cache.reference("a", 1) is not None


def _spec(**model):
    base = {"name": "m", "factory": "aitune.examples:mlp", "kwargs": {"width": 8, "depth": 1}, "inputs": [{"shape": [8]}]}
    return parse_spec({"models": [{**base, **model}], "batch_sizes": [1]})


def test_an_unseeded_factory_is_refused_naming_the_model():
    spec = _spec(name="lin", factory="torch.nn:Linear", kwargs={"in_features": 4, "out_features": 4}, inputs=[{"shape": [4]}])
    with pytest.raises(ModelLoadError) as err:
        identify_models(spec)
    text = str(err.value)
    assert "'lin'" in text and "torch.nn:Linear" in text and "not deterministic" in text and "seed it" in text


def test_a_seeded_factory_passes_and_its_structure_ignores_the_weights():
    a = identify_models(_spec(kwargs={"width": 8, "depth": 1, "seed": 1}))["m"]
    b = identify_models(_spec(kwargs={"width": 8, "depth": 1, "seed": 2}))["m"]
    assert a[0] != b[0]  # other weights, other fingerprint
    assert a[1] == b[1]  # one architecture
    assert structure_key(linear(4)) != structure_key(linear(5))


def test_the_worker_fails_a_job_whose_model_is_not_the_drivers(monkeypatch):
    from orchestrator.worker.actor import TuneWorker

    spec = _spec(factory="orchestrator.sim.fault_backends:process_seeded_mlp", kwargs={"width": 8, "depth": 1})
    worker = TuneWorker({"kind": "cpu", "threads": 1, "label": "t"}, spec.model_dump(mode="json"), "t-0")
    job = R.Job(key="k" * 64, model="m", batch_size=1, backend="TorchEagerBackend", config={}, candidate="eager",
                device_class_key="d" * 64, model_fingerprint="0" * 64)  # as the driver saw it in another process
    answer = worker.build(job.to_dict())
    assert answer["status"] == R.ERROR
    assert "'m'" in answer["error"] and "not deterministic" in answer["error"] and "differ from the driver" in answer["error"]


def test_a_worker_keeps_at_most_its_cache_bound_of_models():
    from orchestrator.worker.actor import TuneWorker

    models = [{"name": f"m{i}", "factory": "aitune.examples:mlp", "kwargs": {"width": 32, "depth": 2, "seed": i},
               "inputs": [{"shape": [32]}]} for i in range(4)]
    spec = parse_spec({"models": models, "batch_sizes": [1], "workers": {"model_cache_mb": 0.02},
                       "candidates": [{"backend": "TorchEagerBackend"}]})
    worker = TuneWorker({"kind": "cpu", "threads": 1, "label": "t"}, spec.model_dump(mode="json"), "t-0")
    fingerprints = {name: fp for name, (fp, _) in identify_models(spec).items()}
    jobs = expand(spec, fingerprints, {"d" * 64: {"device_type": "cpu"}})
    assert [j.model for j in jobs] == ["m0", "m1", "m2", "m3"]
    for job in jobs:
        answer = worker.build(job.to_dict())
        assert answer["status"] == R.OK, answer.get("error")
    info = worker.cache_info()
    assert info["bytes"] <= info["limit_bytes"] or len(info["models"]) == 1
    assert info["models"][-1] == "m3"
    assert info["loads"] == 4 and info["evictions"] >= 2
    # its own pages (no shared memory, no mapped files): part of its resident memory
    assert 0 < info["anon_rss_bytes"] < info["rss_bytes"]
    assert 0 < info["file_rss_bytes"] < info["rss_bytes"]  # its libraries
    assert info["anon_rss_bytes"] + info["file_rss_bytes"] + info["shmem_rss_bytes"] <= info["rss_bytes"] * 1.05


def test_a_workers_onnx_candidates_of_one_model_export_it_once_each_checked_on_its_own_weights(tmp_path, monkeypatch):
    # ft1 is ft0's architecture with other weights: its export is ft0's translation filled in
    pytest.importorskip("onnxscript", reason="the ONNX exporter's packages (onnx, onnxscript) are not installed")
    from orchestrator.worker.actor import TuneWorker

    monkeypatch.setenv("AITUNE_ONNX_TEMPLATES", str(tmp_path / "templates"))  # nothing translated yet

    models = [{"name": f"ft{i}", "factory": "aitune.examples:mlp", "kwargs": {"width": 16, "depth": 2, "seed": i},
               "inputs": [{"shape": [16]}]} for i in range(2)]
    ort = "OnnxRuntimeBackend"
    spec = parse_spec({"models": models, "batch_sizes": [1], "measure": {"budget_s": 0.01, "min_iters": 3, "warmup_iters": 1},
                       "candidates": [{"backend": ort}, {"backend": ort, "config": {"graph_optimization_level": "basic"}},
                                      {"backend": ort, "config": {"io_binding": False}}]})
    fingerprints = {name: fp for name, (fp, _) in identify_models(spec).items()}
    jobs = sorted(expand(spec, fingerprints, {"d" * 64: {"device_type": "cpu"}}), key=lambda j: j.model)
    # three ONNX Runtime candidates per model, and the eager fp32 baseline every model gets
    assert sorted(j.backend for j in jobs).count(ort) == 6 and len(jobs) == 8

    def run_all(worker_id, jobs):
        worker = TuneWorker({"kind": "cpu", "threads": 1, "label": "t"}, spec.model_dump(mode="json"), worker_id)
        for job in jobs:
            assert worker.build(job.to_dict())["status"] == R.OK
            record = worker.finish(job.to_dict())[0]
            # checked against its own model's reference: ft1 given ft0's export would be wrong
            assert record["status"] == R.OK, (job.model, record.get("error"))
        return worker.cache_info()["exports"]

    exports = run_all("t-0", jobs)
    assert (exports["made"], exports["shared"]) == (2, 4)
    assert exports["entries"] == 2 and exports["bytes"] > 0
    assert (exports["filled"], exports["templates"], exports["filled_from_disk"]) == (1, 1, 0)
    assert len(list((tmp_path / "templates").glob("*/*.onnx"))) == 1  # the translation, kept for the machine
    # another worker of the machine, ft1 only: it fills the translation the first one left on disk
    exports = run_all("t-1", [j for j in jobs if j.model == "ft1"])
    assert (exports["made"], exports["filled"], exports["filled_from_disk"]) == (1, 1, 1)


def test_a_worker_that_exits_leaves_no_scratch_or_export_directories_behind(tmp_path):
    # The exports outlive each candidate's scratch (they are shared between candidates): both
    # directories go when the worker's process exits.
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import json, sys\n"
        "from orchestrator.spec.schema import parse_spec\n"
        "from orchestrator.worker.actor import TuneWorker\n"
        "spec = parse_spec({'models': [{'name': 'm', 'factory': 'aitune.examples:mlp', 'kwargs': {'width': 8, 'depth': 1},"
        " 'inputs': [{'shape': [8]}]}], 'batch_sizes': [1]})\n"
        "w = TuneWorker({'kind': 'cpu', 'threads': 1, 'label': 't'}, spec.model_dump(mode='json'), 't-0')\n"
        "(w._scratch / 'x').write_text('x'); (w._exports.root / 'y').mkdir()\n"
        "print(json.dumps([str(w._scratch), str(w._exports.root)]))\n"
    )
    env = {**__import__("os").environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    dirs = [Path(p) for p in json.loads(done.stdout.strip().splitlines()[-1])]
    assert all(str(d).startswith(str(tmp_path)) for d in dirs)
    assert not [d for d in dirs if d.exists()]


def test_a_model_load_leaves_the_next_full_collection_where_it_was():
    # A load collects what is not frozen and freezes the new model; timed from that cheap
    # collection, the next full one (the heap thawed, ~0.25 s on a worker that has exported)
    # fell due within a second, after nearly every model's first candidate.
    import gc
    import time

    from orchestrator.worker.actor import TuneWorker

    spec = parse_spec({"models": [{"name": "m", "factory": "aitune.examples:mlp", "kwargs": {"width": 16, "depth": 2},
                                   "inputs": [{"shape": [16]}]}], "batch_sizes": [1]})
    worker = TuneWorker({"kind": "cpu", "threads": 1, "label": "t"}, spec.model_dump(mode="json"), "t-0")
    worker._heap.thaw_at = due = time.monotonic() + 3600
    frozen = gc.get_freeze_count()
    module, _, _ = worker._reference("m", 1)
    assert worker._heap.thaw_at == due
    assert gc.get_freeze_count() > frozen  # the new model is out of the collector's sight
    assert worker.cache_info()["models"] == ["m"] and isinstance(module, torch.nn.Module)


def test_a_model_load_that_evicts_one_collects_it_even_from_among_the_frozen():
    import gc
    import time
    import weakref

    from orchestrator.worker.actor import TuneWorker

    models = [{"name": n, "factory": "aitune.examples:mlp", "kwargs": {"width": 16, "depth": 2},
               "inputs": [{"shape": [16]}]} for n in ("a", "b")]
    spec = parse_spec({"models": models, "batch_sizes": [1], "workers": {"model_cache_mb": 0.001}})
    worker = TuneWorker({"kind": "cpu", "threads": 1, "label": "t"}, spec.model_dump(mode="json"), "t-0")
    first, _, _ = worker._reference("a", 1)
    first.me = first  # a model in a reference cycle: only a collection of the thawed heap frees it
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is not None  # frozen: a collection of what is not frozen does not see it
    worker._heap.thaw_at = due = time.monotonic() + 3600
    worker._reference("b", 1)
    assert worker.cache_info()["models"] == ["b"] and worker.cache_info()["evictions"] == 1
    assert gone() is None  # the evicted model went at once
    assert worker._heap.thaw_at != due  # that was a full collection, and the clock starts from it


def test_a_failed_build_records_how_long_it_took():
    # the plan's estimates and the job-seconds of a sweep count failed builds too
    pytest.importorskip("onnxscript", reason="the ONNX exporter's packages (onnx, onnxscript) are not installed")
    from orchestrator.worker.actor import TuneWorker

    spec = parse_spec({"models": [{"name": "enc", "factory": "aitune.examples:small_encoder",
                                   "kwargs": {"dim": 32, "layers": 1},
                                   "inputs": [{"name": "tokens", "shape": [16], "dtype": "int64", "int_range": [0, 1000]}]}],
                       "batch_sizes": [1], "candidates": [{"backend": "OnnxRuntimeBackend", "config": {"opset": 17}}]})
    worker = TuneWorker({"kind": "cpu", "threads": 1, "label": "t"}, spec.model_dump(mode="json"), "t-0")
    fingerprints = {name: fp for name, (fp, _) in identify_models(spec).items()}
    (job,) = [j for j in expand(spec, fingerprints, {"d" * 64: {"device_type": "cpu"}}) if j.backend == "OnnxRuntimeBackend"]
    answer = worker.build(job.to_dict())
    # the encoder's attention can't be converted down to opset 17: refused, after trying
    assert answer["status"] == R.BUILD_ERROR and answer["error_class"] == "BuildRefused"
    assert answer["phases"]["build"] > 0.01
