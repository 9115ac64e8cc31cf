"""Ray Serve over the deploy root, on a real local Ray with HTTP on 127.0.0.1: answers, rollover, refusals."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch

from aitune import deploy_root as layout
from cluster import Inventory, plan_deploy_targets
from orchestrator.serve import start_serving, stop_serving
from serve_helpers import batch_folder, check_answer, free_port, install_runner_up, post, request, tuned_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    root = tmp / "deploy-root"
    spec, outcome = tuned_store(tmp, root)
    port = free_port()
    slots = plan_deploy_targets(Inventory.from_ray(), [{"cpu_slots": 1}])
    info = start_serving(str(root), ["mlp"], slots, port=port, reload_s=0.2)
    assert info.url == f"http://127.0.0.1:{port}"
    yield {"spec": spec, "outcome": outcome, "root": root, "url": f"{info.url}/mlp", "base": info.url}
    stop_serving()


def status(served) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{served['base']}/-status", timeout=30) as resp:
        return json.loads(resp.read())


def wait_for(predicate, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


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
        wait_for(lambda: all(a and a[-1][2].get("version") == new for a in answers))
        counts = [len(a) for a in answers]
        wait_for(lambda: all(len(a) >= c + 5 for a, c in zip(answers, counts)))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == []
    for stream_answers in answers:
        versions = [answer.get("version") for _, _, answer in stream_answers]
        assert all(code == 200 for _, code, _ in stream_answers), [a for _, c, a in stream_answers if c != 200][:3]
        assert set(versions) == {old, new}
        switch = versions.index(new)
        assert versions[:switch] == [old] * switch and versions[switch:] == [new] * (len(versions) - switch)
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
    x = torch.randn(2, 16)
    code, answer = post(served["url"], request(x))
    assert code == 200 and answer["version"] == serving
    check_answer(root, x, answer)
    (folder / "current").write_text(serving + "\n")
    shutil.rmtree(folder / edited)
