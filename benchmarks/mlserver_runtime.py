"""MLServer for ``serve_load.py``: its venv, its model repository and process, and the runtime it serves.

:class:`ExampleModel` is an MLServer runtime serving one of ``aitune.examples``' models, eager fp32,
on one torch thread: ``model-settings.json``'s ``parameters.extra`` is ``{"factory": "small_cnn",
"kwargs": {...}, "threads": 1}``, the factory called with the Quick start sweep's kwargs and its
default seed, so the weights are those the sweep tuned. MLServer runs it from its own venv
(``ensure_venv``: MLServer and CPU torch, made once) with this folder and the repository on
PYTHONPATH (``aitune.examples`` needs only torch). The helpers above it run in the benchmark's
own interpreter, which has no MLServer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_venv(venv: Path) -> Path | None:
    """The ``mlserver`` executable of ``venv``, made the first time; None, saying why, where it can't be had."""
    if not (venv / "bin" / "mlserver").exists():
        print(f"installing MLServer and CPU torch into {venv} (once) ...", flush=True)
        try:
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(ROOT / "constraints-cpu.txt"),
                            "mlserver", "torch"], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"MLServer left out: {exc}")
            return None
    return venv / "bin" / "mlserver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_repository(models: dict[str, dict]) -> tuple[Path, int]:
    """A folder MLServer starts from: ``settings.json`` (127.0.0.1, free ports, no parallel workers,
    no metrics server) and a ``model-settings.json`` per model (name -> factory kwargs; no adaptive
    batching). Returns it and its HTTP port."""
    folder, port = Path(tempfile.mkdtemp(prefix="serve-load-mlserver-")), free_port()
    settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
                "metrics_endpoint": None, "parallel_workers": 0, "debug": False}
    (folder / "settings.json").write_text(json.dumps(settings))
    for name, kwargs in models.items():
        (folder / name).mkdir()
        (folder / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "mlserver_runtime.ExampleModel", "max_batch_size": 0, "max_batch_time": 0,
            "parallel_workers": 0, "parameters": {"extra": {"factory": name, "kwargs": kwargs, "threads": 1}}}))
    return folder, port


def start(exe: Path, folder: Path, port: int, models: list[str], timeout_s: float = 180) -> subprocess.Popen | None:
    """``mlserver start FOLDER``, once it and every model answer ready; None (its log's end shown) if not."""
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}:{ROOT}", "OMP_NUM_THREADS": "1"}
    with open(folder / "mlserver.log", "wb") as log:
        proc = subprocess.Popen([str(exe), "start", str(folder)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=folder)
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            for path in ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in models)]:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                    resp.read()
            return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    print(f"MLServer did not get ready; {folder / 'mlserver.log'} ends:\n"
          f"{(folder / 'mlserver.log').read_text(errors='replace')[-3000:]}")
    return None


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


try:
    import torch
    from mlserver import MLModel
    from mlserver.codecs import NumpyCodec
    from mlserver.types import InferenceRequest, InferenceResponse

    from aitune import examples
except ImportError:  # the benchmark's interpreter, which imports only the helpers above
    MLModel = object


class ExampleModel(MLModel):
    async def load(self) -> bool:
        extra = self.settings.parameters.extra or {}
        torch.set_num_threads(int(extra.get("threads", 1)))
        self._model = getattr(examples, extra["factory"])(**extra.get("kwargs", {})).eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = torch.from_numpy(NumpyCodec.decode_input(payload.inputs[0]))
        with torch.inference_mode():
            out = self._model(x)
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output("output", out.numpy())])
