"""The Open Inference Protocol (KServe v2) on the served winners, on a real local Ray with HTTP on
127.0.0.1, through the protocol's own Python client (tritonclient[http], the test extra): health,
metadata, JSON and binary tensors (FP16 too), keyword inputs, dynamic batching into the tuned
batch sizes (and its refusal for a model that mixes rows), errors, limits and rollover."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from aitune import deploy_root as layout
from aitune.check import tolerance_for
from aitune.examples import batch_centred, half_linear, mlp, token_tagger
from cluster import Inventory, plan_deploy_targets
from orchestrator.deploy.serve import start_serving, stop_serving
from orchestrator.store import SqliteStore
from orchestrator.sweep import run_sweep
from serve_helpers import free_port, stop_streams, switched_once, wait_for, wait_past_switch
from sweep_helpers import EAGER, EAGER_BF16, quiet, tiny_spec

http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (in the test extra) is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MLP = mlp(width=16, depth=2)
TAGGER = token_tagger()
CENTRED = batch_centred()
HALF = half_linear()
MODELS = [
    {"name": "mlp", "factory": "aitune.examples:mlp", "kwargs": {"width": 16, "depth": 2},
     "inputs": [{"name": "x", "shape": [16]}]},
    {"name": "tagger", "factory": "aitune.examples:token_tagger",
     "inputs": [{"name": "input_ids", "shape": [8], "dtype": "int64", "int_range": [0, 100], "kwarg": True},
                {"name": "attention_mask", "shape": [8], "dtype": "int64", "int_range": [1, 2], "kwarg": True}]},
    {"name": "centred", "factory": "aitune.examples:batch_centred", "inputs": [{"name": "x", "shape": [16]}]},
    {"name": "half", "factory": "aitune.examples:half_linear", "inputs": [{"name": "x", "shape": [16], "dtype": "float16"}]},
]
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
if HAS_TRANSFORMERS:  # a real Hugging Face architecture, called with keywords like every one of them
    MODELS.append({"name": "bert", "factory": "aitune.examples_hf:bert",
                   "kwargs": {"layers": 1, "hidden": 32, "heads": 2, "vocab": 100},
                   "inputs": [{"name": "input_ids", "shape": [8], "dtype": "int64", "int_range": [0, 100], "kwarg": True},
                              {"name": "attention_mask", "shape": [8], "dtype": "int64", "int_range": [1, 2],
                               "kwarg": True}]})
MAX_BODY, BODY_TIMEOUT_S = 1_000_000, 3.0


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-v2")
    root = tmp / "deploy-root"
    spec = tiny_spec(tmp / "store", [EAGER, EAGER_BF16], models=MODELS, batch_sizes=[1, 4],
                     deploy={"targets": [{"cpu_slots": 1}], "latency_check_s": 0.05, "root": str(root)})
    outcome = run_sweep(spec, console=quiet(), write_report=False)
    assert {d.status for d in outcome.deployments} == {"deployed"}, outcome.deployments
    port = free_port()
    slots = plan_deploy_targets(Inventory.from_ray(), [{"cpu_slots": 1}])
    info = start_serving(str(root), [m["name"] for m in MODELS], slots, port=port, reload_s=0.2, max_body_bytes=MAX_BODY,
                         body_timeout_s=BODY_TIMEOUT_S, batching={"max_queue_delay_ms": {"*": 5.0}})
    client = http.InferenceServerClient(f"127.0.0.1:{port}", concurrency=16, network_timeout=60)
    yield {"spec": spec, "outcome": outcome, "root": root, "base": info.url, "port": port, "client": client,
           "info": info}
    client.close()
    stop_serving()


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def infer(client, model: str, arrays: dict[str, np.ndarray], binary: bool, outputs: list[str] | None = None, **kw):
    inputs = []
    for name, array in arrays.items():
        datatype = {"float32": "FP32", "float16": "FP16", "int64": "INT64"}[str(array.dtype)]
        one = http.InferInput(name, list(array.shape), datatype)
        one.set_data_from_numpy(array, binary_data=binary)
        inputs.append(one)
    wanted = [http.InferRequestedOutput(n, binary_data=binary) for n in outputs] if outputs else None
    return client.infer(model, inputs, outputs=wanted, **kw)


def rows(n: int, seed: int = 0, width: int = 16) -> np.ndarray:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)).numpy()


def tokens(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 8, dtype=torch.int64)
    mask[:, 6:] = 0
    return {"input_ids": torch.randint(0, 100, (n, 8), generator=gen).numpy(), "attention_mask": mask.numpy()}


def test_health_and_server_metadata_through_the_standard_client(served):
    client = served["client"]
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "aitune-orchestrator" and "binary_tensor_data" in meta["extensions"]
    for model in ("mlp", "tagger", "centred", "half"):
        assert client.is_model_ready(model)
    assert not client.is_model_ready("resnet")


def test_model_metadata_names_inputs_as_tuned_and_outputs_by_their_path(served):
    client = served["client"]
    meta = client.get_model_metadata("tagger")
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("attention_mask", "INT64", [-1, 8]), ("input_ids", "INT64", [-1, 8])]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("logits", "FP32", [-1, 8, 5]), ("pooled", "FP32", [-1, 16])]
    mlp_meta = client.get_model_metadata("mlp")
    assert mlp_meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert mlp_meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 16]}]
    folder = layout.batch_dir(served["root"], "mlp", layout.device_class_key("cpu"), 4)
    assert layout.current_version(folder) in mlp_meta["versions"] and len(mlp_meta["versions"]) == 2
    batching = mlp_meta["parameters"]["batching"]
    assert batching["enabled"] and batching["max_batch"] == 4 and batching["max_queue_delay_ms"] == 5.0
    centred = client.get_model_metadata("centred")["parameters"]["batching"]
    assert not centred["enabled"] and "mixes the rows" in centred["reason"]


@pytest.mark.parametrize("binary", [False, True])
def test_infer_json_and_binary_matches_eager(served, binary):
    x = rows(1, seed=3)
    result = infer(served["client"], "mlp", {"x": x}, binary, outputs=["output"], request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    torch.testing.assert_close(torch.from_numpy(result.as_numpy("output")), MLP(torch.from_numpy(x)).detach(),
                               atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("binary", [False, True])
def test_fp16_tensors_go_both_ways(served, binary):
    x = rows(4, seed=5).astype(np.float16)
    out = infer(served["client"], "half", {"x": x}, binary).as_numpy("output")
    assert out.dtype == np.float16
    torch.testing.assert_close(torch.from_numpy(out), HALF(torch.from_numpy(x)).detach(), atol=1e-2, rtol=1e-2)


def test_named_inputs_reach_the_model_as_its_keywords(served):
    arrays = tokens(4, seed=1)
    result = infer(served["client"], "tagger", arrays, True, outputs=["pooled"])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["pooled"]
    expected = TAGGER(**{k: torch.from_numpy(v) for k, v in arrays.items()})
    torch.testing.assert_close(torch.from_numpy(result.as_numpy("pooled")), expected["pooled"].detach(),
                               atol=1e-4, rtol=1e-3)


def test_batches_between_and_beyond_the_tuned_sizes_are_padded_and_split(served):
    for n in (3, 9):  # 3 rows: padded to a tuned size; 9: split into tuned sizes
        arrays = tokens(n, seed=n)
        result = infer(served["client"], "tagger", arrays, True)
        expected = TAGGER(**{k: torch.from_numpy(v) for k, v in arrays.items()})
        for name in ("logits", "pooled"):
            torch.testing.assert_close(torch.from_numpy(result.as_numpy(name)), expected[name].detach(),
                                       atol=1e-4, rtol=1e-3)


def test_a_model_that_mixes_rows_is_not_batched_and_untuned_batches_are_refused_naming_the_tuned(served):
    x = rows(4, seed=2)
    out = infer(served["client"], "centred", {"x": x}, True).as_numpy("output")
    torch.testing.assert_close(torch.from_numpy(out), CENTRED(torch.from_numpy(x)).detach(), atol=1e-4, rtol=1e-3)
    with pytest.raises(InferenceServerException) as info:
        infer(served["client"], "centred", {"x": rows(3)}, True)
    assert info.value.status() == "400" and "tuned shapes: 1x16; 4x16" in info.value.message()


def own_client(served):
    """A client for one thread (tritonclient's HTTP client runs on gevent: one per OS thread)."""
    return http.InferenceServerClient(f"127.0.0.1:{served['port']}", concurrency=4, network_timeout=60)


def test_concurrent_requests_are_all_answered_right(served):
    answers, failures = {}, []

    def some(first: int) -> None:
        client = own_client(served)
        try:
            for i in range(first, first + 6):
                answers[i] = infer(client, "mlp", {"x": rows(1, seed=100 + i)}, i % 2 == 0).as_numpy("output")
        except Exception as exc:  # a lost request
            failures.append(repr(exc))
        finally:
            client.close()

    threads = [threading.Thread(target=some, args=(6 * k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert failures == [] and len(answers) == 48
    for i, out in answers.items():
        expected = MLP(torch.from_numpy(rows(1, seed=100 + i))).detach()
        torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("body, words", [
    (b'{"inputs": [{"name": "y", "shape": [1, 16], "datatype": "FP32", "data": ' + b"[" + b",".join([b"1"] * 16) + b"]}]}",
     "unknown input 'y'"),
    (b'{"inputs": []}', "input 'x' is missing"),
    (b'{"inputs": [{"name": "x", "shape": [1, 16], "datatype": "INT64", "data": ' + b"[" + b",".join([b"1"] * 16) + b"]}]}",
     "input 'x' is INT64; the model takes FP32"),
    (b'{"inputs": [{"name": "x", "shape": [1, 17], "datatype": "FP32", "data": ' + b"[" + b",".join([b"1"] * 17) + b"]}]}",
     "the model takes [-1, 16]"),
    (b'{"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [1]}]}', "'x'"),
    (b"not json", "JSON"),
    (b'{"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": ' + b"[" + b",".join([b"1"] * 16) + b"]}],"
     b' "outputs": [{"name": "nope"}]}', "unknown output 'nope'"),
])
def test_bad_requests_are_a_400_naming_what_is_wrong_and_the_server_stays_up(served, body, words):
    code, answer = post(f"{served['base']}/v2/models/mlp/infer", body)
    assert code == 400 and words in answer["error"], answer
    test_infer_json_and_binary_matches_eager(served, True)


def test_binary_sizes_that_do_not_add_up_are_a_400(served):
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 64}}]}).encode()
    code, answer = post(f"{served['base']}/v2/models/mlp/infer", header + b"\0" * 10,
                        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"})
    assert code == 400 and "'x'" in answer["error"]


def test_unknown_model_version_or_route_is_a_404(served):
    base = served["base"]
    assert get(f"{base}/v2/models/resnet")[0] == 404
    code, answer = get(f"{base}/v2/models/mlp/versions/v9999-000000000000")
    assert code == 404 and "current:" in answer["error"]
    assert get(f"{base}/v2/nothing")[0] == 404
    code, _ = post(f"{base}/v2/models/resnet/infer", b"{}")
    assert code == 404


def test_a_version_answers_only_its_own_batch_size(served):
    folder = layout.batch_dir(served["root"], "mlp", layout.device_class_key("cpu"), 4)
    version = layout.current_version(folder)
    assert get(f"{served['base']}/v2/models/mlp/versions/{version}")[0] == 200
    result = infer(served["client"], "mlp", {"x": rows(4)}, True, model_version=version)
    assert result.get_response()["model_version"] == version
    with pytest.raises(InferenceServerException) as info:
        infer(served["client"], "mlp", {"x": rows(1)}, True, model_version=version)
    assert info.value.status() == "400" and "takes input shapes 4x16" in info.value.message()


def test_body_limits_hold_for_the_protocol_too(served):
    code, answer = post(f"{served['base']}/v2/models/mlp/infer", b"x" * (MAX_BODY + 1))
    assert code == 413 and "limit" in answer["error"]
    with socket.create_connection(("127.0.0.1", served["port"]), timeout=30) as sock:
        sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"inputs\"")
        reply = b""
        while b"did not arrive" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive" in reply


def test_a_rollover_under_batched_protocol_traffic_loses_nothing_and_answers_nothing_wrong(served):
    spec, outcome, root = served["spec"], served["outcome"], served["root"]
    folder = layout.batch_dir(root, "mlp", layout.device_class_key("cpu"), 4)
    answers: list[list] = [[], []]
    failures: list = []
    stop = threading.Event()

    def stream(i: int) -> None:
        n, mine = 0, own_client(served)
        while not stop.is_set():
            x = rows(4, seed=10_000 * (i + 1) + n)
            n += 1
            try:
                result = infer(mine, "mlp", {"x": x}, n % 2 == 0)
            except Exception as exc:  # a lost or failed request
                failures.append(repr(exc))
                continue
            answers[i].append((x, result.get_response()["model_version"], result.as_numpy("output")))
        mine.close()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(len(a) >= 5 for a in answers))
        old = answers[0][-1][1]  # the b4 winner, or b1's when the sweep found four b1 calls cheaper
        selection = next(s for s in outcome.selections if (s.model, s.batch_size) == ("mlp", 4))
        other = next(r for r in outcome.results
                     if (r.model, r.batch_size) == ("mlp", 4) and r.key != selection.winner_key and r.status == "ok")
        with SqliteStore(spec.store) as store:
            ckpt, reference = store.checkpoint_path(other), store.reference_bytes(other.reference_key)
        precision = other.config.get("precision", "float32")
        version, verified = layout.install(root, ckpt, reference, device="cpu", model="mlp", batch_size=4,
                                           tolerance=tolerance_for(precision, {}).to_dict(),
                                           factory="aitune.examples:mlp", median_ms=1e-6, positional_names=["x"])
        assert verified.ok, verified.reason
        new = version.name  # 4 rows now run as one call of it: its latency is the lowest
        wait_past_switch(answers, lambda answer: answer[1], new)
    finally:
        stop_streams(stop, threads)
    assert failures == []
    for stream_answers in answers:
        versions = [v for _, v, _ in stream_answers]
        assert switched_once(versions, old, new), versions
        for x, v, out in stream_answers:
            tol = layout.read_install(layout.batch_dir(root, "mlp", layout.device_class_key("cpu"), 4 if v == new else
                                                       (4 if (folder / v).is_dir() else 1)) / v).tolerance
            # a bf16 winner answers BF16 (its metadata says so once it is current)
            torch.testing.assert_close(torch.from_numpy(out.astype(np.float32)), MLP(torch.from_numpy(x)).detach(),
                                       atol=tol["atol"], rtol=tol["rtol"])




@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed (the optional 'hf' extra)")
def test_a_hugging_face_model_is_served_by_its_keywords_with_its_output_fields_named(served):
    from aitune.examples_hf import bert

    client = served["client"]
    meta = client.get_model_metadata("bert")
    assert [i["name"] for i in meta["inputs"]] == ["attention_mask", "input_ids"]
    names = [o["name"] for o in meta["outputs"]]
    assert "last_hidden_state" in names and "pooler_output" in names, names
    arrays = tokens(3, seed=11)  # 3 rows: batched into a tuned size
    result = infer(client, "bert", arrays, True)
    expected = bert(layers=1, hidden=32, heads=2, vocab=100)(**{k: torch.from_numpy(v) for k, v in arrays.items()})
    torch.testing.assert_close(torch.from_numpy(result.as_numpy("last_hidden_state")),
                               expected.last_hidden_state.detach(), atol=1e-4, rtol=1e-3)


def test_the_serve_command_answers_at_its_port_from_the_replica_itself_on_loopback(served):
    """``python -m orchestrator serve`` on its own embedded Ray: direct ingress, so --port is the
    replica's own HTTP server (no proxy hop); the standard client works there; Ctrl-C stops it."""
    import os
    import signal
    import subprocess
    import sys

    from serve_helpers import is_loopback, listening_sockets

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "serve", str(served["spec"].store), "--port", str(port),
                             "--model", "mlp", "--target", "cpu_slots=1"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[str] = []
    try:
        for line in proc.stdout:  # until it says where it serves (or exits: then the assert shows why)
            seen.append(line)
            if line.startswith("serving "):
                break
        assert proc.poll() is None, "".join(seen)
        assert f"at http://127.0.0.1:{port}/v2/models/MODEL" in seen[-1], seen[-1]
        client = http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
        assert client.is_server_ready()
        x = rows(1, seed=21)
        out = infer(client, "mlp", {"x": x}, True).as_numpy("output").astype(np.float32)
        # the rollover test may have made a bf16 winner current: its tolerance
        torch.testing.assert_close(torch.from_numpy(out), MLP(torch.from_numpy(x)).detach(), atol=5e-2, rtol=5e-2)
        client.close()
        owners = [(addr, cmd) for addr, p, cmd in listening_sockets() if p == port]
        assert owners and all(is_loopback(a) and "ServeReplica" in cmd for a, cmd in owners), owners
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=120)
