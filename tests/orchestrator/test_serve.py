"""Ray Serve over the deploy root, on a real local Ray with HTTP on 127.0.0.1: answers, rollover, refusals."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch

from aitune import deploy_root as layout
from cluster import Inventory, plan_deploy_targets
from orchestrator.deploy.serve import start_serving, stop_serving
from orchestrator.deploy import tensor_json
from serve_helpers import (REFERENCE, batch_folder, check_answer, free_port, install_runner_up, post, request,
                           stop_streams, switched_once, tuned_store, wait_for, wait_past_switch)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_BODY, BODY_TIMEOUT_S = 1_000_000, 3.0


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    root = tmp / "deploy-root"
    spec, outcome = tuned_store(tmp, root)
    port = free_port()
    slots = plan_deploy_targets(Inventory.from_ray(), [{"cpu_slots": 1}])
    info = start_serving(str(root), ["mlp"], slots, port=port, reload_s=0.2, max_body_bytes=MAX_BODY, body_timeout_s=BODY_TIMEOUT_S)
    assert info.url == f"http://127.0.0.1:{port}"
    yield {"spec": spec, "outcome": outcome, "root": root, "url": f"{info.url}/mlp", "base": info.url}
    stop_serving()


def status(served) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{served['base']}/-status", timeout=30) as resp:
        return json.loads(resp.read())


def test_http_answers_match_the_eager_fp32_reference(served):
    current = layout.current_version(batch_folder(served["root"]))
    for seed in range(5):
        x = torch.randn(2, 16, generator=torch.Generator().manual_seed(seed))
        code, answer = post(served["url"], request(x))
        assert code == 200, answer
        assert answer["model"] == "mlp" and answer["version"] == current
        check_answer(served["root"], x, answer)


def test_a_shape_that_was_not_tuned_is_a_400_listing_the_tuned_shapes(served):
    code, answer = post(served["url"], request(torch.randn(3, 16)))
    assert code == 400
    assert answer["error"] == "mlp: input shape 3x16 was not tuned; tuned shapes: 2x16"


def test_an_unknown_model_is_a_404_and_a_bad_body_a_400(served):
    code, answer = post(f"{served['base']}/resnet", request(torch.randn(2, 16)))
    assert code == 404 and answer["error"] == "unknown model 'resnet'; served: mlp"
    code, answer = post(served["url"], {"inputs": [{"dtype": "float32", "shape": [2, 16], "data": [1.0]}]})
    assert code == 400 and answer["error"] == "inputs[0]: shape [2, 16] needs 32 values in data, got 1"


def test_a_new_version_rolls_over_during_a_stream_losing_no_request_and_answering_none_wrong(served):
    root = served["root"]
    old = layout.current_version(batch_folder(root))
    answers: list[list] = [[], []]
    failures: list = []
    stop = threading.Event()

    def stream(i: int) -> None:
        n = 0
        while not stop.is_set():
            x = torch.randn(2, 16, generator=torch.Generator().manual_seed(1000 * i + n))
            n += 1
            try:
                code, answer = post(served["url"], request(x))
            except Exception as exc:  # a lost request
                failures.append(repr(exc))
                continue
            answers[i].append((x, code, answer))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(len(a) >= 5 for a in answers))
        new = install_runner_up(served["spec"], served["outcome"], root).name
        assert new != old
        wait_past_switch(answers, lambda answer: answer[2].get("version"), new)
    finally:
        stop_streams(stop, threads)
    assert failures == []
    for stream_answers in answers:
        versions = [answer.get("version") for _, _, answer in stream_answers]
        assert all(code == 200 for _, code, _ in stream_answers), [a for _, c, a in stream_answers if c != 200][:3]
        assert switched_once(versions, old, new), versions
        for x, _, answer in stream_answers:
            check_answer(root, x, answer)


def test_an_installed_version_edited_after_install_is_refused_and_the_previous_keeps_serving(served):
    root = served["root"]
    folder = batch_folder(root)
    serving = layout.current_version(folder)
    wait_for(lambda: status(served)["versions"]["mlp"] == {"2": serving})
    (edited,) = [v for v in layout.versions(folder) if v != serving]
    weights = folder / edited / "checkpoint" / "artifacts" / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    (folder / "current").write_text(edited + "\n")  # someone points current at the edited install
    refused = wait_for(lambda: status(served)["refused"].get("mlp"))
    assert "weights.pt fails its SHA-256 check" in refused and edited in refused
    assert str(root) not in refused
    x = torch.randn(2, 16)
    code, answer = post(served["url"], request(x))
    assert code == 200 and answer["version"] == serving
    check_answer(root, x, answer)
    (folder / "current").write_text(serving + "\n")
    shutil.rmtree(folder / edited)


# -- issue 32: the serving edge under attack ---------------------------------------------------------


def raw_post(served, body: bytes, headers: dict | None = None, timeout: float = 60.0) -> tuple[int, dict]:
    """POST bytes as they are (no JSON encoding of ours: NaN, 1e400 and deep nesting go as written)."""
    import http.client
    import json
    from urllib.parse import urlparse

    url = urlparse(served["url"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request("POST", url.path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def tensor_text(dtype: str, values: str, n: int = 32, shape=(2, 16)) -> bytes:
    data = ",".join([values] + ["0.5"] * (n - 1))
    return ('{"inputs": [{"dtype": %s, "shape": %s, "data": [%s]}]}' % (dtype, list(shape), data)).encode()


@pytest.mark.parametrize("body, words", [
    (tensor_text('["float32"]', "0.5"), "inputs[0]: unknown dtype ['float32']"),
    (tensor_text('{"x": 1}', "0.5"), "inputs[0]: unknown dtype {'x': 1}"),
    (tensor_text('"float64"', "0.5"), "input dtypes float64 were not tuned for shape 2x16; tuned dtypes: float32"),
    (tensor_text('"float16"', "0.5"), "input dtypes float16 were not tuned"),
    (tensor_text('"int64"', "1"), "input dtypes int64 were not tuned"),
    (tensor_text('"bool"', "true"), "input dtypes bool were not tuned"),
    (tensor_text('"float32"', "NaN"), "inputs[0]: data[0] is nan; values must be finite numbers"),
    (tensor_text('"float32"', "Infinity"), "inputs[0]: data[0] is inf; values must be finite numbers"),
    (tensor_text('"float32"', "-Infinity"), "inputs[0]: data[0] is -inf; values must be finite numbers"),
    (tensor_text('"float32"', "1e400"), "inputs[0]: data[0] is inf; values must be finite numbers"),
    (tensor_text('"float32"', "1e39"), "inputs[0]: data[0] = 1e+39 is out of range for float32"),
    (b"[" * 100_000 + b"]" * 100_000, "the request body is nested too deep"),
    (b'{"inputs": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", "the request body is nested too deep"),
    (b"{not json", "the request body is not JSON"),
])
def test_bad_inputs_are_a_400_naming_what_is_wrong_and_the_server_stays_up(served, body, words):
    code, answer = raw_post(served, body)
    assert code == 400, answer
    assert words in answer["error"] and "\n" not in answer["error"]
    code, answer = post(served["url"], request(torch.randn(2, 16)))
    assert code == 200, answer


def test_non_finite_outputs_are_sent_as_strings_in_strict_json(served):
    import json

    x = torch.full((2, 16), 3e38)
    with torch.inference_mode():
        expected = REFERENCE(x)
    assert not bool(torch.isfinite(expected).all())  # the case this test is about
    code, answer = raw_post(served, json.dumps(request(x)).encode())
    assert code == 200, answer
    strict = json.loads(json.dumps(answer), parse_constant=lambda c: pytest.fail(f"bare {c} in the answer"))
    (out,) = tensor_json.decode_outputs(strict)
    assert torch.equal(torch.isnan(out), torch.isnan(expected)) and torch.equal(torch.isinf(out), torch.isinf(expected))


def read_answer(sock) -> bytes:
    """One HTTP answer (headers and its Content-Length of body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            return data
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        part = sock.recv(65536)
        if not part:
            break
        body += part
    return head + b"\r\n\r\n" + body


def route(served, which: str) -> str:
    """The first release's route, or the Open Inference Protocol's: the limits hold for both."""
    return served["url"] if which == "legacy" else f"{served['base']}/v2/models/mlp/infer"


BOTH_ROUTES = pytest.mark.parametrize("which", ["legacy", "v2"])


@BOTH_ROUTES
def test_a_body_over_the_limit_is_refused_from_its_content_length_before_it_is_read(served, which):
    import socket
    from urllib.parse import urlparse

    url = urlparse(route(served, which))
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(f"POST {url.path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 200000000\r\n\r\n".encode() + b"{")  # 200 MB announced, none sent
        head = read_answer(sock).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413"), head[:200]
    assert "the request body is 200000000 bytes; the limit is 1000000" in head


@BOTH_ROUTES
def test_a_chunked_body_over_the_limit_is_cut_off_while_reading(served, which):
    import http.client
    import json
    from urllib.parse import urlparse

    url = urlparse(route(served, which))
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    chunks = (b"[" + b"0," * 50_000 for _ in range(40))  # 4 MB, no Content-Length
    try:
        conn.request("POST", url.path, body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        code, answer = resp.status, json.loads(resp.read())
    except (BrokenPipeError, ConnectionResetError):  # the server may close before the client has sent it all
        code, answer = 413, {"error": "over the limit"}
    finally:
        conn.close()
    assert code == 413 and "over the limit" in answer["error"]


@BOTH_ROUTES
def test_stalled_clients_cost_themselves_and_no_one_else(served, which):
    """70 clients send headers and part of a body, then stall (more than the replica takes at once);
    4 more stall inside their headers. Other requests are answered while they all stay open, and
    each body-stalled client gets a 408 on its own connection."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(route(served, which))
    stalled, half_headers = [], []
    try:
        for _ in range(70):
            sock = socket.create_connection((url.hostname, url.port), timeout=60)
            sock.sendall(f"POST {url.path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 1000\r\n\r\n".encode() + b'{"inputs": [')
            stalled.append(sock)
        for _ in range(4):
            sock = socket.create_connection((url.hostname, url.port), timeout=60)
            sock.sendall(f"POST {url.path} HTTP/1.1\r\nHost: x\r\nCont".encode())
            half_headers.append(sock)
        served_while_stalled = 0
        for seed in range(5):
            x = torch.randn(2, 16, generator=torch.Generator().manual_seed(seed))
            code, answer = post(served["url"], request(x), timeout=120)
            assert code == 200, answer
            check_answer(served["root"], x, answer)
            served_while_stalled += 1
        assert served_while_stalled == 5
        for sock in stalled:
            answer = read_answer(sock)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"the request body did not arrive within 3 s" in answer
    finally:
        for sock in stalled + half_headers:
            sock.close()


def test_status_shows_paths_relative_to_the_deploy_root(served):
    root = served["root"]
    folder = batch_folder(root)
    serving = layout.current_version(folder)
    wait_for(lambda: status(served)["versions"]["mlp"] == {"2": serving} and not status(served)["refused"])
    broken = folder / "v0099-000000000000"
    shutil.copytree(folder / serving, broken)
    (broken / layout.INSTALL).write_text("{}")
    try:
        (folder / "current").write_text(broken.name + "\n")
        refused = wait_for(lambda: status(served)["refused"].get("mlp"))
        assert f"mlp/{folder.parent.name}/b2/{broken.name}/install.json: unreadable install record" in refused
        assert str(root) not in refused and "/tmp" not in refused
    finally:
        (folder / "current").write_text(serving + "\n")
        shutil.rmtree(broken)


def test_a_spoofed_version_or_batch_in_install_json_is_refused_and_the_verified_one_keeps_serving(served):
    """install.json's version and batch must be the folder's: a copy under another version name, or
    in another batch's folder, is refused (it used to be served under the name it claimed, and a
    batch-4 folder holding batch 2's install took batch 2's route)."""
    root = served["root"]
    folder = batch_folder(root)
    serving = layout.current_version(folder)
    wait_for(lambda: status(served)["versions"]["mlp"] == {"2": serving} and not status(served)["refused"])
    spoof = folder / f"v0042-{serving.split('-')[1]}"  # install.json inside still says `serving`
    shutil.copytree(folder / serving, spoof)
    other_batch = folder.parent / "b4"
    try:
        (folder / "current").write_text(spoof.name + "\n")
        refused = wait_for(lambda: status(served)["refused"].get("mlp"))
        assert f"describes mlp/{folder.parent.name}/b2/{serving}, not the folder" in refused and spoof.name in refused
        code, answer = post(served["url"], request(torch.randn(2, 16)))
        assert code == 200 and answer["version"] == serving
        (folder / "current").write_text(serving + "\n")
        wait_for(lambda: not status(served)["refused"].get("mlp"))
        other_batch.mkdir()
        shutil.copytree(folder / serving, other_batch / serving)
        (other_batch / "current").write_text(serving + "\n")
        refused = wait_for(lambda: status(served)["refused"].get("mlp"))
        assert f"not the folder mlp/{folder.parent.name}/b4/{serving}" in refused
        code, answer = post(served["url"], request(torch.randn(2, 16)))
        assert code == 200 and answer["version"] == serving
        assert status(served)["versions"]["mlp"] == {"2": serving}
    finally:
        (folder / "current").write_text(serving + "\n")
        shutil.rmtree(spoof, ignore_errors=True)
        shutil.rmtree(other_batch, ignore_errors=True)


def test_everything_serve_opens_listens_on_loopback_only(served):
    """The replica's inter-deployment gRPC server used to listen on [::] (every interface). Checked
    as a user meets it: ``python -m orchestrator serve`` in its own process (a fresh Ray), and only
    the sockets of that process and what it started."""
    import subprocess
    import sys
    from pathlib import Path

    from env_helpers import child_env
    from serve_helpers import descendants, is_loopback, listening_sockets

    if not Path("/proc/net/tcp").exists():
        pytest.skip("lists sockets from /proc (Linux)")
    port = free_port()
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "serve", str(served["spec"].store), "--port", str(port),
                             "--root", str(served["root"])], cwd=repo, env=child_env(repo, drop=("RAY_ADDRESS",)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        code = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                code, _ = post(f"http://127.0.0.1:{port}/mlp", request(torch.randn(2, 16)), timeout=5)
            except (OSError, ValueError):  # not up yet: refused, or a proxy's non-JSON 503
                code = None
            if code == 200:
                break
            time.sleep(1)
        assert code == 200, f"serve exited with {proc.poll()}" if proc.poll() is not None else "no answer in 180 s"
        ours = listening_sockets(within=descendants(proc.pid))
        assert any("ServeReplica:aitune" in cmd for _, _, cmd in ours), ours  # the listing sees the replica
        assert any(p == port for _, p, _ in ours), ours  # and the HTTP port
        assert [(a, p, cmd.split()[0]) for a, p, cmd in ours if not is_loopback(a)] == []
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
