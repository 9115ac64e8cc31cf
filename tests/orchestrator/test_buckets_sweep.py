"""Sequence buckets through a real sweep on a real local Ray: tune (one group per bucket, each
candidate's padding checked on its worker), deploy into ``bN-seq=L`` folders, ``load_tuned`` padding
calls between buckets and slicing back (refusing beyond the largest bucket, and between buckets
for a model padding is refused for), a rerun taking everything from the store, and the Open
Inference Protocol with variable lengths through tritonclient. A real Hugging Face BERT (random
weights, built from a config; ``transformers`` is in the test extra) takes part throughout."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import aitune
from aitune import deploy_root as layout
from aitune.check import compare_outputs, tolerance_for
from aitune.examples import small_encoder, token_tagger
from aitune.loader import UntunedShape
from cluster import Inventory, plan_deploy_targets
from orchestrator.deploy.serve import start_serving, stop_serving
from orchestrator.sweep import run_sweep
from serve_helpers import free_port
from sweep_helpers import EAGER, quiet, tiny_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
BUCKETS = [8, 16]
IDS = {"name": "input_ids", "shape": ["seq"], "dtype": "int64", "int_range": [0, 100], "kwarg": True,
       "dynamic": {"seq": {"buckets": BUCKETS, "pad": 0}}}
MASK = {"name": "attention_mask", "shape": ["seq"], "dtype": "int64", "int_range": [1, 2], "kwarg": True,
        "dynamic": {"seq": {"pad": 0}}}
BERT_KWARGS = {"layers": 1, "hidden": 32, "heads": 2, "vocab": 100}
MODELS = [
    {"name": "tagger", "factory": "aitune.examples:token_tagger", "inputs": [IDS, MASK],
     "traffic": {"seq": {5: 0.7, 16: 0.3}}},
    {"name": "enc", "factory": "aitune.examples:small_encoder", "kwargs": {"dim": 32, "layers": 1},
     "inputs": [{"name": "tokens", "shape": ["seq"], "dtype": "int64", "int_range": [0, 1000],
                 "dynamic": {"seq": {"buckets": BUCKETS, "pad": 0}}}]},
]
if HAS_TRANSFORMERS:
    MODELS.append({"name": "bert", "factory": "aitune.examples_hf:bert", "kwargs": BERT_KWARGS, "inputs": [IDS, MASK]})
#: right on every unpadded sample, wrong once padding is masked: its padding check must fail it
UNMASK = {"backend": "orchestrator.sim.fault_backends:FaultBackend", "config": {"fault": "unmask", "phase": "infer"}}


def eager_models() -> dict:
    models = {"tagger": token_tagger(), "enc": small_encoder(dim=32, layers=1)}
    if HAS_TRANSFORMERS:
        from aitune.examples_hf import bert

        models["bert"] = bert(**BERT_KWARGS)
    return models


def text_call(length: int, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + length)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[-1, max(1, length // 2):] = 0  # a row shorter than the call: padding of its own
    return {"input_ids": torch.randint(0, 100, (batch, length), generator=gen), "attention_mask": mask}


def close(want, got) -> bool:
    return compare_outputs(want, got, tolerance_for("float32")).ok


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("buckets")
    root = tmp / "deploy-root"
    spec = tiny_spec(tmp / "store", [EAGER, UNMASK], models=MODELS, batch_sizes=[1, 2],
                     deploy={"targets": [{"cpu_slots": 1}], "latency_check_s": 0.05, "root": str(root)})
    outcome = run_sweep(spec, console=quiet(), write_report=False)
    return {"spec": spec, "outcome": outcome, "root": root, "eager": eager_models()}


def test_each_bucket_is_its_own_group_and_its_own_install(swept):
    outcome, root = swept["outcome"], swept["root"]
    groups = {(s.model, s.batch_size, s.shape) for s in outcome.selections}
    assert groups == {(m["name"], b, f"seq={n}") for m in MODELS for b in (1, 2) for n in BUCKETS}
    assert {d.status for d in outcome.deployments} == {"deployed"}, outcome.deployments
    folders = {e.folder.parent.name for e in layout.live(root, "tagger")}
    assert folders == {f"b{b}-seq={n}" for b in (1, 2) for n in BUCKETS}
    assert {e.shape for e in layout.live(root, "tagger")} == {"seq=8", "seq=16"}


def test_a_candidate_that_breaks_padding_is_failed_by_its_padding_check(swept):
    by = {(r.model, r.candidate): r for r in swept["outcome"].results if r.backend.endswith("FaultBackend")}
    for model in [m["name"] for m in MODELS if m["name"] != "enc"]:
        record = by[model, next(c for (m, c) in by if m == model)]
        assert record.status == "incorrect" and record.error_class == "PaddingChangesOutputs", record
        assert "changes the outputs" in record.error
    # enc: padding is refused for the model itself, so no candidate is held to it
    assert all(r.status == "ok" for r in swept["outcome"].results if r.model == "enc")


@pytest.mark.parametrize("model", [m["name"] for m in MODELS if m["name"] != "enc"])
def test_load_tuned_pads_between_buckets_and_slices_back(swept, model):
    tuned = aitune.load_tuned(swept["root"], model)
    eager = swept["eager"][model]
    for length in (3, 8, 11, 16):
        call = text_call(length)
        with torch.inference_mode():
            got, want = tuned(**call), eager(**call)
        assert close(want, got), (model, length)
        assert tuned.winner_for(**call).shape == f"seq={8 if length <= 8 else 16}"
    with pytest.raises(UntunedShape, match=r"seq 17 is longer than the largest bucket: tuned seq 1\.\.16"):
        tuned(**text_call(17))


def test_load_tuned_refuses_between_buckets_where_padding_is_refused_and_a_fallback_takes_it(swept):
    tuned = aitune.load_tuned(swept["root"], "enc")
    tokens = torch.randint(0, 1000, (2, 8))
    assert tuned(tokens).shape == (2, 32)  # a bucket's own length needs no padding
    with pytest.raises(UntunedShape, match="padding is refused for this model: padding seq 1 up to 8 changes the outputs"):
        tuned(torch.randint(0, 1000, (2, 5)))
    eager = swept["eager"]["enc"]
    with_fallback = aitune.load_tuned(swept["root"], "enc", fallback=eager)
    short = torch.randint(0, 1000, (2, 5))
    with torch.inference_mode():
        assert torch.equal(with_fallback(short), eager(short))


def test_a_rerun_takes_every_bucket_from_the_store(swept):
    again = run_sweep(swept["spec"], console=quiet(), write_report=False, deploy=False)
    assert again.ran == 0 and again.reused == len(swept["outcome"].results)
    assert {(s.model, s.batch_size, s.shape, s.winner_key) for s in again.selections} == {
        (s.model, s.batch_size, s.shape, s.winner_key) for s in swept["outcome"].selections}


def test_the_open_inference_protocol_takes_any_length_up_to_the_largest_bucket(swept):
    http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (in the test extra) is not installed")
    from tritonclient.utils import InferenceServerException

    port = free_port()
    slots = plan_deploy_targets(Inventory.from_ray(), [{"cpu_slots": 1}])
    names = [m["name"] for m in MODELS]
    start_serving(str(swept["root"]), names, slots, port=port, reload_s=0.2)
    client = http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
    try:
        meta = client.get_model_metadata("tagger")
        assert {i["name"]: i["shape"] for i in meta["inputs"]} == {"input_ids": [-1, -1], "attention_mask": [-1, -1]}
        for model in [n for n in names if n != "enc"]:
            for length, binary in ((5, True), (12, False), (16, True)):
                call = text_call(length, batch=1)
                inputs = []
                for name, tensor in call.items():
                    one = http.InferInput(name, list(tensor.shape), "INT64")
                    one.set_data_from_numpy(tensor.numpy(), binary_data=binary)
                    inputs.append(one)
                answer = client.infer(model, inputs)
                with torch.inference_mode():
                    want = swept["eager"][model](**call)
                first = "logits" if model == "tagger" else "last_hidden_state"
                got = torch.from_numpy(answer.as_numpy(first).copy())
                assert got.shape[1] == length and close(want[first], got), (model, length)
        concurrent_requests(http, port, swept["eager"]["tagger"])
        too_long = http.InferInput("tokens", [1, 5], "INT64")
        too_long.set_data_from_numpy(np.zeros((1, 5), dtype=np.int64))
        with pytest.raises(InferenceServerException, match="padding is refused for this model"):
            client.infer("enc", [too_long])
    finally:
        client.close()
        stop_serving()


def concurrent_requests(http, port: int, eager) -> None:
    """Requests of many lengths from several threads at once (each its own client: tritonclient's HTTP
    client is not for sharing across threads): combined within their buckets, each answered at its
    own length as eager answers it; every one goes through its bucket's queue."""
    import threading

    from ray import serve

    lengths = [3, 5, 8, 9, 12, 16] * 4
    wrong: list = []

    def send(part: list[int]) -> None:
        client = http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
        try:
            for length in part:
                call = text_call(length, batch=1, seed=length)
                inputs = []
                for name, tensor in call.items():
                    one = http.InferInput(name, list(tensor.shape), "INT64")
                    one.set_data_from_numpy(tensor.numpy(), binary_data=True)
                    inputs.append(one)
                got = torch.from_numpy(client.infer("tagger", inputs).as_numpy("logits").copy())
                with torch.inference_mode():
                    if got.shape[1] != length or not close(eager(**call)["logits"], got):
                        wrong.append(length)
        finally:
            client.close()

    before = serve.get_app_handle("aitune").status.remote().result(timeout_s=60)["bucket_batches"]
    threads = [threading.Thread(target=send, args=(lengths[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert wrong == []
    after = serve.get_app_handle("aitune").status.remote().result(timeout_s=60)
    rows = {k: v["rows"] - before.get(k, {}).get("rows", 0) for k, v in after["bucket_batches"].items() if k.startswith("tagger ")}
    assert rows == {"tagger seq=8": 12, "tagger seq=16": 12}  # every request through its bucket's queue
    assert set(after["batching"]["tagger"]["buckets"]) == {"seq=8", "seq=16"}


# -- one dynamic-shape artifact against the static buckets ---------------------------------------------
ONNX = {"backend": "OnnxRuntimeBackend", "config": {}}


@pytest.fixture(scope="module")
def dynamic_swept(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dynamic")
    spec = tiny_spec(tmp / "store", [EAGER, ONNX], models=[MODELS[0]], batch_sizes=[2],
                     deploy={"targets": [{"cpu_slots": 1}], "latency_check_s": 0.05, "root": str(tmp / "deploy-root")})
    outcome = run_sweep(spec, console=quiet(), write_report=False)
    return {"spec": spec, "outcome": outcome, "tmp": tmp}


def test_a_dynamic_shape_artifact_is_built_checked_at_other_lengths_and_measured_at_every_bucket(dynamic_swept):
    outcome = dynamic_swept["outcome"]
    dynamic = [r for r in outcome.results if r.shape == "seq=2..16"]
    assert [r.backend for r in dynamic] == ["OnnxRuntimeBackend"]  # eager runs any shape as it is: no such job
    (record,) = dynamic
    assert record.status == "ok" and set(record.bucket_ms) == {"seq=8", "seq=16"}
    assert all(ms > 0 for ms in record.bucket_ms.values())
    assert {s.shape for s in outcome.selections} == {"seq=8", "seq=16", "seq=2..16"}


def test_one_strategy_serves_and_the_other_is_superseded_saying_why(dynamic_swept):
    outcome = dynamic_swept["outcome"]
    (figures,) = outcome.shape_strategies
    assert figures["chosen"] in ("static", "dynamic") and figures["traffic"] == pytest.approx({"seq=8": 0.7, "seq=16": 0.3})
    served = {d.shape for d in outcome.deployments if d.status == "deployed"}
    superseded = {s.shape: s.superseded for s in outcome.selections if s.superseded}
    if figures["chosen"] == "static":
        assert served == {"seq=8", "seq=16"} and set(superseded) == {"seq=2..16"}
        assert superseded["seq=2..16"].startswith("the buckets serve instead")
    else:
        assert served == {"seq=2..16"} and set(superseded) == {"seq=8", "seq=16"}
    # whichever serves, load_tuned answers every length up to the largest bucket
    tuned = aitune.load_tuned(dynamic_swept["tmp"] / "deploy-root", "tagger")
    eager = token_tagger()
    for length in (3, 8, 11, 16):
        with torch.inference_mode():
            assert close(eager(**text_call(length)), tuned(**text_call(length))), length


def test_a_dynamic_install_takes_every_length_in_its_range_unpadded(dynamic_swept, tmp_path):
    from orchestrator.deploy.install import shapes_of_winner
    from orchestrator.store import SqliteStore

    outcome, spec = dynamic_swept["outcome"], dynamic_swept["spec"]
    (record,) = [r for r in outcome.results if r.shape == "seq=2..16"]
    root = tmp_path / "root"
    with SqliteStore(spec.store) as store:
        folder, reference = store.checkpoint_path(record), store.reference_bytes(record.reference_key)
    _, verified = layout.install(root, folder, reference, device="cpu", model="tagger", batch_size=2,
                                 tolerance=tolerance_for("float32", {}).to_dict(), factory="aitune.examples:token_tagger",
                                 shape="seq=2..16", shapes=shapes_of_winner(record))
    assert verified.ok, verified.reason
    assert [e.folder.parent.name for e in layout.live(root, "tagger")] == ["b2-seq=2..16"]
    tuned = aitune.load_tuned(root, "tagger")
    eager = token_tagger()
    for length in (1, 2, 5, 9, 16):  # 1 is padded up to the range's low end, 2
        call = text_call(length)
        with torch.inference_mode():
            got = tuned(**call)
            assert got["logits"].shape[1] == length and close(eager(**call), got), length
        assert tuned.winner_for(**call).shape == "seq=2..16"
    with pytest.raises(UntunedShape, match="seq 17 is longer than the largest bucket"):
        tuned(**text_call(17))
    with pytest.raises(UntunedShape):
        tuned(**text_call(5, batch=3))  # a batch size the range install was not built for
    with pytest.raises(UntunedShape, match="input dtypes int32, int32 were not tuned; tuned dtypes: int64, int64"):
        tuned(**{k: v.to(torch.int32) for k, v in text_call(5).items()})


def test_the_deploy_command_installs_the_serving_strategy_and_deployments_names_each_bucket(dynamic_swept, capsys):
    from orchestrator.cli import main

    outcome = dynamic_swept["outcome"]
    other = dynamic_swept["tmp"] / "second-root"
    capsys.readouterr()
    code = main(["deploy", str(dynamic_swept["spec"].store), "--root", str(other), "--target", "cpu_slots=1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert code == 0, lines
    served = sorted(s.shape for s in outcome.selections if not s.superseded)
    assert sorted(e.shape for e in layout.live(other, "tagger")) == served  # the superseded strategy stays out
    assert all(line.startswith("deploy: tagger b2 seq=") and "verified" in line for line in lines), lines
    code = main(["deployments", str(dynamic_swept["spec"].store)])
    listed = capsys.readouterr().out
    assert code == 0 and all(f"tagger b2 {shape} on " in listed for shape in served)
