"""A Ray Serve application over what is installed in the deploy root.

``python -m orchestrator serve STORE`` (or ``deploy: {serve: true}`` with ``tune``) starts one
application, ``aitune``, with one replica per deploy target, each pinned to its device like the
deploy actors (a GPU each, or one CPU with ``CUDA_VISIBLE_DEVICES=""``). Each replica loads what
is current for its device class with :func:`aitune.load_tuned` and answers

    POST http://127.0.0.1:8000/MODEL   {"inputs": [{"dtype": "float32", "shape": [1, 3, 32, 32], "data": [...]}]}
    ->                                 {"model": "MODEL", "version": "v0002-...", "outputs": [{"path": "output", ...}]}

(the tensor format is in :mod:`orchestrator.tensor_json`). HTTP listens on 127.0.0.1 unless told
otherwise. Rollover: every replica watches the ``current`` pointers of its models; when a deploy
(or rollback) switches one, the replica loads the new version beside the old one and swaps it in
only once it loaded and passed its checks, so no request is lost or answered by a half-loaded
model. A version that fails its checks (an installed file edited, say) is refused and the
previous one keeps serving. Errors: 404 for an unknown model, 400 for a bad body or an untuned
shape, each with ``{"error": "..."}``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

APP_NAME = "aitune"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000

log = logging.getLogger(__name__)


class TunedServer:
    """One Serve replica: every chosen model, loaded for this replica's device, kept current."""

    def __init__(self, root: str | None, models: list[str], kind: str, threads: int = 1, reload_s: float = 0.5) -> None:
        import torch

        from aitune import load_tuned
        from aitune import deploy_root as layout
        from orchestrator.worker import pick_device, quiet_libraries

        quiet_libraries()
        torch.set_num_threads(threads)
        self._layout, self._load = layout, load_tuned
        self.root, self.device = root, pick_device(kind)
        self.class_key = layout.device_class_key(self.device)
        self.models = {m: load_tuned(root, m, self.device) for m in models}
        self._seen = {m: self._pointers(m) for m in models}
        self.refused: dict[str, str] = {}
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(reload_s,), name="aitune-rollover", daemon=True)
        self._watcher.start()

    def _pointers(self, model: str) -> tuple:
        entries = self._layout.live(self.root, model)
        return tuple(sorted((e.batch_size, e.version) for e in entries if e.class_key == self.class_key))

    def _watch(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for model in list(self.models):
                try:
                    now = self._pointers(model)
                except Exception as exc:  # a pointer being switched or a damaged folder: look again later
                    log.warning("reading the deploy root for %s: %s", model, exc)
                    continue
                if now == self._seen[model]:
                    continue
                self._seen[model] = now  # refused versions are not retried until the pointer moves again
                try:
                    fresh = self._load(self.root, model, self.device)
                except Exception as exc:
                    self.refused[model] = str(exc)
                    log.warning("not rolling %s over: %s; the loaded version keeps serving", model, exc)
                    continue
                self.models[model] = fresh  # one reference swap: a request sees the old model or the new
                self.refused.pop(model, None)

    def status(self) -> dict[str, Any]:
        return {"device": str(self.device), "versions": {m: t.versions for m, t in self.models.items()},
                "refused": dict(self.refused)}

    def infer(self, model: str, body: Any) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one request; also callable in-process through a handle."""
        import torch

        from aitune.loader import UntunedShape
        from orchestrator.tensor_json import TensorJsonError, decode_request, encode_outputs

        tuned = self.models.get(model)
        if tuned is None:
            return 404, {"error": f"unknown model {model!r}; served: {', '.join(sorted(self.models))}"}
        try:
            inputs = [t.to(self.device) for t in decode_request(body)]
            with torch.inference_mode():
                out = tuned(*inputs)
        except (TensorJsonError, UntunedShape) as exc:
            return 400, {"error": str(exc)}
        install = tuned.winner_for(*inputs)
        return 200, {"model": model, "version": install.version if install else None, "outputs": encode_outputs(out)}

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        model = request.url.path.strip("/").split("/")[-1]
        if model == "-status":
            return JSONResponse(self.status())
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the request body is not JSON"}, status_code=400)
        code, answer = self.infer(model, body)
        return JSONResponse(answer, status_code=code)

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


@dataclass
class Served:
    url: str
    models: list[str]
    replicas: int

    def handle(self):
        from ray import serve

        return serve.get_app_handle(APP_NAME)


def start_serving(root: str | None, models: list[str], slots, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                  reload_s: float = 0.5) -> Served:
    """Run the application on a connected Ray: one replica per slot (all slots of one kind)."""
    from ray import serve

    kinds = {s.kind for s in slots}
    if len(kinds) != 1:
        raise ValueError(f"serve: the targets mix {' and '.join(sorted(kinds))} slots; serve one kind of device at a time")
    slot = slots[0]
    options: dict[str, Any] = dict(slot.actor_options())
    if slot.env():
        options["runtime_env"] = {"env_vars": slot.env()}
    serve.start(http_options={"host": host, "port": port})
    app = serve.deployment(TunedServer, name="TunedServer").options(
        num_replicas=len(slots), ray_actor_options=options, max_ongoing_requests=8,
    ).bind(root, list(models), slot.kind, slot.threads, reload_s)
    serve.run(app, name=APP_NAME, route_prefix="/")
    return Served(f"http://{host}:{port}", list(models), len(slots))


def stop_serving() -> None:
    from ray import serve

    serve.shutdown()
