"""The Serve replica's rollover watcher, in one process without Ray (the replica class itself):
a broken pointer is logged once per change, not every look (issue 32, item 15)."""

from __future__ import annotations

from aitune.reference import pack_reference
import logging
import time

import pytest
import torch

import aitune
from aitune import deploy_root as layout
from aitune.checkpoint import save_checkpoint
from aitune.examples import mlp
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend import TorchEagerBackend
from orchestrator.deploy.serve import TunedServer

FACTORY, KWARGS = "aitune.examples:mlp", {"width": 16, "depth": 2}


@pytest.fixture
def root(tmp_path):
    model = aitune.attach_factory(mlp(**KWARGS), FACTORY, KWARGS)
    s = Sample.of(torch.randn(2, 16, generator=torch.Generator().manual_seed(0)))
    backend = TorchEagerBackend().build(model, GraphSpec.from_sample(s), [s], "cpu", tmp_path / "build")
    save_checkpoint(backend, tmp_path / "ckpt")
    with torch.inference_mode():
        reference = pack_reference(s, model(*s.args))
    root = tmp_path / "deploy"
    _, verified = layout.install(root, tmp_path / "ckpt", reference, device="cpu", model="mlp", batch_size=2,
                                 tolerance={"atol": 1e-4, "rtol": 1e-3}, factory=FACTORY)
    assert verified.ok, verified.reason
    return root


def test_a_broken_pointer_is_logged_once_per_change_not_every_look(root, caplog):
    server = TunedServer(str(root), ["mlp"], "cpu", reload_s=0.05)
    try:
        folder = layout.batch_dir(root, "mlp", layout.device_class_key("cpu"), 2)
        current = layout.current_version(folder)
        caplog.set_level(logging.WARNING, logger="orchestrator.deploy.serve")
        (folder / layout.CURRENT).write_text("v0007-000000000000\n")  # broken: no such version
        deadline = time.monotonic() + 30
        while not caplog.records and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # about 20 more looks at the same broken pointer
        broken = [r.getMessage() for r in caplog.records]
        assert len(broken) == 1 and "points at v0007-000000000000" in broken[0], broken
        (folder / layout.CURRENT).write_text("garbage\n")  # a different problem: logged once more
        deadline = time.monotonic() + 30
        while len(caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) == 2 and "does not name a version" in messages[1], messages
        assert "garbage" not in messages[1]
        (folder / layout.CURRENT).write_text(current + "\n")
        x = torch.randn(2, 16)
        assert server.infer("mlp", {"inputs": [{"dtype": "float32", "shape": [2, 16], "data": x.reshape(-1).tolist()}]})[0] == 200
    finally:
        server._stop.set()
