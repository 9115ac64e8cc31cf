"""ONNX exports shared between the candidates of one process (``ExportCache``).

Candidates that export the same module object on the same sample object the same way get one
export between them, each its own files; another module (other weights), precision or opset is
exported again; failures are not kept; the bound and dead modules let entries go without
taking files from a candidate that holds them.
"""

from __future__ import annotations

import gc

import pytest
import torch

from aitune.checkpoint import load_checkpoint, save_checkpoint
from aitune.specs import GraphSpec, Sample
from aitune.torch import export_cache as EC
from aitune.torch.backend import OnnxRuntimeBackend, OnnxRuntimeConfig
from aitune.torch.backend.backend import Backend, build_sharing
from aitune.torch.backend.eager import TorchEagerBackend
from aitune.torch.export_cache import ExportCache
from aitune.tuning import tune

from aitune_helpers import needs_onnx_export, tiny_mlp

TRUST = {"allow_factories": True}


@pytest.fixture(autouse=True)
def _onnx():
    needs_onnx_export()


@pytest.fixture
def counted(monkeypatch):
    """How many times the cache really exported (the real exporter, counted)."""
    calls = []
    real = EC.export_onnx

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(EC, "export_onnx", counting)
    return calls


def _sample():
    return Sample((torch.randn(2, 16, generator=torch.Generator().manual_seed(1)),), {})


def _ort(tmp_path, name, module, sample, exports, **config):
    backend = OnnxRuntimeBackend(OnnxRuntimeConfig(**config))
    spec = GraphSpec.from_sample(sample, module(*sample.args))
    return build_sharing(backend, module, spec, [sample], "cpu", tmp_path / name, exports)


def test_candidates_of_one_module_share_one_export_and_each_holds_its_own_files(tmp_path, counted):
    module, sample = tiny_mlp(), _sample()
    exports = ExportCache(tmp_path / "exports")
    a = _ort(tmp_path, "a", module, sample, exports)
    b = _ort(tmp_path, "b", module, sample, exports, graph_optimization_level="basic")
    c = _ort(tmp_path, "c", module, sample, exports, io_binding=False)
    assert len(counted) == 1 and (exports.misses, exports.hits) == (1, 2)
    expected = module(*sample.args)
    for backend in (a, b, c):
        torch.testing.assert_close(backend.infer(*sample.args), expected, rtol=1e-4, atol=1e-5)
    models = {backend._model for backend in (a, b, c)}
    assert len(models) == 3 and all(tmp_path / n in {m.parent for m in models} for n in "abc")
    # the cache's files may go: a candidate saved afterwards still has all of its own
    exports.clear()
    assert not any((tmp_path / "exports").iterdir())
    save_checkpoint(b, tmp_path / "ckpt-b")
    loaded = load_checkpoint(tmp_path / "ckpt-b", "cpu", **TRUST)
    loaded.deploy("cpu")
    torch.testing.assert_close(loaded.infer(*sample.args), expected, rtol=1e-4, atol=1e-5)


def test_other_weights_precision_or_opset_are_exported_again(tmp_path, counted):
    sample = _sample()
    first, second = tiny_mlp(seed=0), tiny_mlp(seed=1)  # one architecture, two sets of weights
    exports = ExportCache(tmp_path / "exports")
    a = _ort(tmp_path, "a", first, sample, exports)
    b = _ort(tmp_path, "b", second, sample, exports)
    assert len(counted) == 2
    # each runs its own weights, not the first export's
    torch.testing.assert_close(b.infer(*sample.args), second(*sample.args), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a.infer(*sample.args), b.infer(*sample.args))
    _ort(tmp_path, "c", first, sample, exports, precision="float16")
    _ort(tmp_path, "d", first, sample, exports, opset=18)
    assert len(counted) == 4
    # another sample object of the same shape is another export too (the cache keys by identity)
    _ort(tmp_path, "e", first, _sample(), exports)
    assert len(counted) == 5 and exports.hits == 0


def test_a_failed_export_is_not_kept_and_leaves_no_files(tmp_path):
    module, sample = tiny_mlp(), _sample()
    exports = ExportCache(tmp_path / "exports")
    spec = GraphSpec.from_sample(sample, module(*sample.args))
    tries = []

    def failing():
        tries.append(1)
        raise RuntimeError("export refused")

    for _ in range(2):
        with pytest.raises(RuntimeError, match="export refused"):
            exports.onnx(module, sample, spec, tmp_path / "x" / "model.onnx", opset=None, variant="float32", prepare=failing)
    assert len(tries) == 2 and len(exports) == 0
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())


def test_the_bound_and_dead_modules_let_entries_go_but_not_a_candidates_files(tmp_path, counted):
    sample = _sample()
    exports = ExportCache(tmp_path / "exports", limit_bytes=1)  # every export alone is over it
    first, second = tiny_mlp(seed=0), tiny_mlp(seed=1)
    a = _ort(tmp_path, "a", first, sample, exports)
    _ort(tmp_path, "b", second, sample, exports)
    assert len(exports) == 1  # the newest stays, the older one went
    torch.testing.assert_close(a.infer(*sample.args), first(*sample.args), rtol=1e-4, atol=1e-5)
    assert a._model.is_file()
    _ort(tmp_path, "c", first, sample, exports)
    assert len(counted) == 3  # evicted: exported again

    roomy = ExportCache(tmp_path / "roomy")
    third = tiny_mlp(seed=2)
    _ort(tmp_path, "d", third, sample, roomy)
    _ort(tmp_path, "e", first, sample, roomy)
    assert len(roomy) == 2
    assert len(list((tmp_path / "roomy").iterdir())) == 2
    del third
    gc.collect()
    roomy.prune()  # what a worker does when it lets a candidate go
    assert len(roomy) == 1 and len(list((tmp_path / "roomy").iterdir())) == 1  # its files went with it
    _ort(tmp_path, "f", second, sample, roomy)
    assert len(roomy) == 2
    _ort(tmp_path, "g", tiny_mlp(seed=3), sample, roomy)  # a module gone by the next export
    gc.collect()
    _ort(tmp_path, "h", first, sample, roomy)  # a hit: nothing is dropped on a hit
    _ort(tmp_path, "i", tiny_mlp(seed=4), sample, roomy)
    assert len(roomy) == 3  # the seed-3 export went when the seed-4 one came; the new one stays


def test_a_backend_that_overrides_build_with_the_published_signature_is_built_without_exports(tmp_path):
    seen = []

    class Published(TorchEagerBackend):
        def build(self, module, graph_spec, data, device, cache_dir=None):  # no room for ``exports``
            seen.append(cache_dir)
            return super().build(module, graph_spec, data, device, cache_dir)

    module, sample = tiny_mlp(), _sample()
    spec = GraphSpec.from_sample(sample, module(*sample.args))
    backend = build_sharing(Published(), module, spec, [sample], "cpu", tmp_path / "p", ExportCache(tmp_path / "x"))
    assert seen == [tmp_path / "p"] and backend.is_active
    assert isinstance(backend, Backend)


def test_tune_exports_once_for_all_its_onnx_runtime_candidates(tmp_path, counted):
    module, sample = tiny_mlp(), _sample()
    result = tune(module, [sample], [("OnnxRuntimeBackend", {}), ("OnnxRuntimeBackend", {"graph_optimization_level": "basic"}),
                                     ("OnnxRuntimeBackend", {"io_binding": False})], cache_dir=tmp_path)
    assert [r.status for r in result.results].count("ok") == 4, [(r.name, r.status, r.error) for r in result.results]
    assert len(counted) == 1
