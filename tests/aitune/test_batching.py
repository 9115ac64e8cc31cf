"""aitune.batching: the row check kept with an install, the plan by the sweep's latencies, and
running several requests' rows as the tuned batch sizes, in one process without Ray."""

from __future__ import annotations

import json

import pytest
import torch

import aitune
from aitune import deploy_root as layout
from aitune.batching import RowCheck, batching_for, plan, run_rows
from aitune.checkpoint import save_checkpoint
from aitune.reference import pack_reference
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend import TorchEagerBackend

FP32 = {"atol": 1e-4, "rtol": 1e-3}


class RowWise(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x).relu()


class MixesRows(RowWise):
    """Normalises over the batch axis: a row's output depends on the other rows."""

    def forward(self, x):
        y = self.fc(x)
        return y - y.mean(0)


def rowwise():
    torch.manual_seed(0)
    return RowWise()


def mixes_rows():
    torch.manual_seed(0)
    return MixesRows()


def install(tmp_path, root, factory, batch: int, median_ms: float | None = 1.0, device: str = "cpu", backend_class=None):
    name = factory.__name__
    model = aitune.attach_factory(factory(), f"{__name__}:{name}", {})
    s = Sample.of(torch.randn(batch, 8, generator=torch.Generator().manual_seed(batch)))
    build = (backend_class or TorchEagerBackend)()
    backend = build.build(model.to(device), GraphSpec.from_sample(s), [s.to(device)], device, tmp_path / f"b-{name}-{batch}")
    path = tmp_path / f"ckpt-{name}-{batch}"
    save_checkpoint(backend, path)
    with torch.inference_mode():
        reference = pack_reference(s, factory()(*s.args))  # eager fp32 on the CPU, as a sweep's reference
    version, verified = layout.install(root, path, reference, device=device, model=name, batch_size=batch,
                                       tolerance=FP32, factory=f"{__name__}:{name}", median_ms=median_ms,
                                       positional_names=["features"])
    assert verified.ok, verified.reason
    return version, verified


def test_plan_pads_when_padding_is_cheaper_than_splitting():
    latency = {1: 1.0, 4: 1.5, 8: 2.0}
    assert plan(latency, 1) == [1]
    assert plan(latency, 3) == [4]          # one call of 4 (1.5 ms) beats 3 calls of 1 (3 ms)
    assert plan(latency, 6) == [8]
    assert plan(latency, 9) == [8, 1]
    assert plan(latency, 12) == [8, 4]
    assert sum(plan(latency, 100)) >= 100 and set(plan(latency, 100)) <= {1, 4, 8}


def test_plan_splits_when_the_large_size_is_dear():
    latency = {1: 1.0, 8: 20.0}             # a batch of 8 dearer than 8 single calls
    assert plan(latency, 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="rows must be >= 1"):
        plan(latency, 0)


def test_a_row_wise_model_is_batchable_and_its_check_is_kept_with_the_install(tmp_path):
    root = tmp_path / "deploy"
    for batch in (1, 4):
        version, verified = install(tmp_path, root, rowwise, batch)
    assert verified.row_check == RowCheck(True, 4)
    assert json.loads((version / layout.BATCHING).read_text()) == {"independent": True, "batch_size": 4, "reason": None}
    tuned = aitune.load_tuned(root, "rowwise")
    assert tuned.input_names == ["features"]
    assert tuned.batching.enabled, tuned.batching.reason
    assert tuned.batching.to_dict()["plans"]["3"] == [4]


def test_a_model_that_mixes_rows_is_refused_batching_with_the_reason(tmp_path):
    root = tmp_path / "deploy"
    for batch in (1, 4):
        install(tmp_path, root, mixes_rows, batch)
    tuned = aitune.load_tuned(root, "mixes_rows")
    assert not tuned.batching.enabled
    assert "b4" in tuned.batching.reason and "mixes the rows" in tuned.batching.reason
    x = torch.randn(4, 8)  # still served one request at a time, as tuned
    torch.testing.assert_close(tuned(x), mixes_rows()(x))


def test_an_edited_batching_file_turns_batching_off_naming_it(tmp_path):
    root = tmp_path / "deploy"
    install(tmp_path, root, rowwise, 1)
    version, _ = install(tmp_path, root, rowwise, 4)
    (version / layout.BATCHING).write_text('{"independent": "yes"}')
    batching = aitune.load_tuned(root, "rowwise").batching
    assert not batching.enabled and "batching.json can't be read" in batching.reason


def test_an_install_without_the_sweeps_latency_is_not_batched(tmp_path):
    root = tmp_path / "deploy"
    install(tmp_path, root, rowwise, 1, median_ms=None)
    install(tmp_path, root, rowwise, 4, median_ms=None)
    batching = aitune.load_tuned(root, "rowwise").batching
    assert not batching.enabled and "no latency from its sweep" in batching.reason


def test_requests_run_as_tuned_sizes_padded_and_split_back_match_each_alone(tmp_path):
    root = tmp_path / "deploy"
    for batch in (1, 4):
        install(tmp_path, root, rowwise, batch)
    tuned = aitune.load_tuned(root, "rowwise")
    calls = []

    def call(*args, **kwargs):
        calls.append(args[0].shape[0])
        return tuned(*args, **kwargs)

    rows = [torch.randn(n, 8) for n in (1, 2, 1, 3)]  # 7 rows: one call of 4 and one padded call of 4
    answers = run_rows(call, [((x,), {}) for x in rows], plan({1: 1.0, 4: 1.5}, 7))
    assert calls == [4, 4]
    eager = rowwise()
    for x, answer in zip(rows, answers):
        ((path, out),) = answer
        assert path == "output" and out.shape == (x.shape[0], 4)
        torch.testing.assert_close(out, eager(x), atol=1e-5, rtol=1e-4)


def test_batching_is_off_where_only_batch_one_was_tuned(tmp_path):
    root = tmp_path / "deploy"
    install(tmp_path, root, rowwise, 1)
    batching = batching_for(list(aitune.load_tuned(root, "rowwise").installs.values()))
    assert not batching.enabled and "only batch size 1" in batching.reason


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: batching into CUDA-graph winners")
def test_on_a_gpu_cuda_graph_winners_pass_the_row_check_and_batched_rows_match_each_alone(tmp_path):
    from aitune.torch.backend import CudaGraphBackend

    root = tmp_path / "deploy"
    for batch in (1, 4):
        _, verified = install(tmp_path, root, rowwise, batch, device="cuda", backend_class=CudaGraphBackend)
    assert verified.row_check == RowCheck(True, 4)
    tuned = aitune.load_tuned(root, "rowwise", device="cuda")
    assert tuned.batching.enabled, tuned.batching.reason
    rows = [torch.randn(n, 8, device="cuda") for n in (1, 2, 1, 3)]
    with torch.inference_mode():
        answers = run_rows(tuned, [((x,), {}) for x in rows], plan({1: 1.0, 4: 1.5}, 7))
    eager = rowwise().cuda()
    for x, ((_, out),) in zip(rows, answers):
        torch.testing.assert_close(out, eager(x), atol=1e-4, rtol=1e-3)
