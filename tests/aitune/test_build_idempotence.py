"""build() calls each sample at most once, so a stateful module ends in the same state.

``CountingModule`` counts its calls in a buffer, in a Python attribute and in ``CALLS[tag]``,
which is shared by the deep copies backends make of the module.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from aitune.specs import GraphSpec, Sample
from aitune.torch.backend import (
    OnnxRuntimeBackend,
    TorchEagerBackend,
    TorchEagerConfig,
    TorchInductorAotBackend,
    TorchInductorJitBackend,
)
from aitune_helpers import CALLS, CountingModule, needs_onnx_export

N = 3


def samples() -> list[Sample]:
    gen = torch.Generator().manual_seed(0)
    return [Sample.of(torch.randn(2, 4, generator=gen)) for _ in range(N)]


def build(backend, tmp_path):
    tag = uuid.uuid4().hex
    module = CountingModule(tag).eval()
    data = samples()
    backend.build(module, GraphSpec.from_sample(data[0]), data, "cpu", tmp_path)
    return module, tag, data


def saved_buffer(backend) -> int:
    """The call-count buffer of the module the backend keeps, as its checkpoint would save it."""
    state = torch.load(backend.to_dict()["weights"], weights_only=True)
    return int(state["calls"])


def assert_users_module_untouched(module: CountingModule) -> None:
    assert int(module.calls) == 0
    assert module.py_calls == 0


@pytest.mark.parametrize("config", [TorchEagerConfig(), TorchEagerConfig(precision="bf16", channels_last=True)], ids=["fp32", "bf16"])
def test_eager_build_calls_no_sample(config, tmp_path):
    backend = TorchEagerBackend(config)
    module, tag, data = build(backend, tmp_path)
    assert CALLS.get(tag, 0) <= N
    assert CALLS.get(tag, 0) == 0  # eager has nothing to warm up
    assert saved_buffer(backend) == 0
    assert_users_module_untouched(module)
    backend.infer(*data[0].args)
    assert CALLS[tag] == 1  # the backend really runs a copy of the module


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_jit_build_calls_each_sample_at_most_once(tmp_path):
    backend = TorchInductorJitBackend()
    module, tag, data = build(backend, tmp_path)
    assert 1 <= CALLS[tag] <= N  # compiled at build time, not at the first inference
    assert saved_buffer(backend) <= N
    assert_users_module_untouched(module)
    before = CALLS[tag]
    backend.infer(*data[0].args)
    assert CALLS[tag] == before + 1


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("cls", [TorchInductorAotBackend, OnnxRuntimeBackend], ids=["aot", "onnx"])
def test_export_traces_at_most_once_per_sample_and_leaves_the_module_alone(cls, tmp_path):
    if cls is OnnxRuntimeBackend:
        needs_onnx_export()
    backend = cls()
    module, tag, data = build(backend, tmp_path)
    assert CALLS.get(tag, 0) <= N
    assert_users_module_untouched(module)
    out = backend.infer(*data[0].args)
    with torch.inference_mode():
        torch.testing.assert_close(out, module.lin(data[0].args[0]))
