"""A Ray Serve application over what is installed in the deploy root.

``python -m orchestrator serve STORE`` (or ``deploy: {serve: true}`` with ``tune``) starts one
application, ``aitune``, with one replica per deploy target, each pinned to its device like the
deploy actors (a GPU each, or one CPU with ``CUDA_VISIBLE_DEVICES=""``). Each replica loads what
is current for its device class with :func:`aitune.load_tuned` and speaks the Open Inference
Protocol (KServe v2) under ``/v2`` (:mod:`orchestrator.deploy.v2_routes`), with dynamic batching
into the tuned batch sizes where each install passed its row check
(:mod:`orchestrator.deploy.batcher`). The first release's route is kept, deprecated, for one release:

    POST http://127.0.0.1:8000/MODEL   {"inputs": [{"dtype": "float32", "shape": [1, 3, 32, 32], "data": [...]}]}
    ->                                 {"model": "MODEL", "version": "v0002-...", "outputs": [{"path": "output", ...}]}

(the tensor format is in :mod:`orchestrator.deploy.tensor_json`). HTTP listens on 127.0.0.1 unless told
otherwise. Rollover: every replica watches the ``current`` pointers of its models; when a deploy
(or rollback) switches one, the replica loads the new version beside the old one and swaps it in
only once it loaded and passed its checks, so no request is lost or answered by a half-loaded
model. A version that fails its checks (an installed file edited, say) is refused and the
previous one keeps serving. Errors: 404 for an unknown model, 400 for a bad body or an untuned
shape or dtype, 408 for a body that does not arrive within ``body_timeout_s``, 413 for one over
``max_body_bytes`` (from ``Content-Length`` before reading, or while reading a chunked one),
each with ``{"error": "..."}``; anything else a model raises is a 500 with ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from orchestrator.deploy.http_errors import BodyError

APP_NAME = "aitune"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
#: a request body larger than this is refused (413) before it is read
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
#: a request body that has not arrived whole within this many seconds is refused (408)
DEFAULT_BODY_TIMEOUT_S = 10.0
#: requests a replica holds at once (a slow client holds one until its body times out)
MAX_ONGOING_REQUESTS = 64

log = logging.getLogger(__name__)


def bind_replica_grpc_to_node_ip() -> str | None:
    """Ray Serve's replica opens its inter-deployment gRPC server on ``[::]:0``, every interface,
    once the user class is built. Make it listen on this node's Ray address instead (the one the
    proxies reach it by; 127.0.0.1 on an embedded local Ray). Returns the address, None where this
    Ray has no such hook (then nothing is changed)."""
    import ray

    try:
        from ray.serve._private import replica as replica_module
    except ImportError:
        return None
    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None:
        return None
    if getattr(original, "_aitune_bound", None):
        return original._aitune_bound
    ip = ray.util.get_node_ip_address()
    host = f"[{ip}]" if ":" in ip else ip

    def bound(server, address: str):
        if address.startswith(("[::]:", "0.0.0.0:")):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    bound._aitune_bound = ip
    replica_module.add_port_to_grpc_server = bound
    return ip


class TunedServer:
    """One Serve replica: every chosen model, loaded for this replica's device, kept current."""

    def __init__(self, root: str | None, models: list[str], kind: str, threads: int = 1, reload_s: float = 0.5,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
                 batching: dict[str, Any] | None = None) -> None:
        """``batching``: ``{"off": bool, "max_queue_delay_ms": {MODEL or "*": ms}}`` (default: on, 2 ms)."""
        import torch

        from aitune import deploy_root as layout
        from aitune import load_tuned
        from orchestrator.deploy.runner import BatchingSettings, Runner
        from orchestrator.deploy.v2_routes import V2Routes
        from orchestrator.worker.process import pick_device, quiet_libraries

        quiet_libraries()
        bind_replica_grpc_to_node_ip()  # before Ray Serve starts that server, right after this constructor
        torch.set_num_threads(threads)
        self._layout, self._load = layout, load_tuned
        self.root, self.device = root, pick_device(kind)
        self.root_path = layout.resolve_root(root)
        self.max_body_bytes, self.body_timeout_s = int(max_body_bytes), float(body_timeout_s)
        self._warned: dict[str, str] = {}  # model -> the last problem logged (logged once per change)
        self.class_key = layout.device_class_key(self.device)
        self.models = {m: load_tuned(root, m, self.device) for m in models}
        self._seen = {m: self._pointers(m) for m in models}
        self.refused: dict[str, str] = {}
        self.runner = Runner(self.models, self.device, BatchingSettings.from_dict(batching), threads, self._relative,
                             self._serving)
        self._faces: dict[str, tuple[Any, Any]] = {}  # model -> (the TunedModel it describes, its Face)
        self._v2 = V2Routes(self)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(reload_s,), name="aitune-rollover", daemon=True)
        self._watcher.start()

    def _pointers(self, model: str) -> tuple:
        entries = self._layout.live(self.root, model)
        return tuple(sorted((e.batch_size, e.version) for e in entries if e.class_key == self.class_key))

    def reconfigure(self, config: dict[str, Any] | None) -> None:
        """Ray Serve's user_config: ``{"batching": ...}`` (as the constructor's), applied in place,
        without restarting the replica or reloading a model (a delay or batch sizes changed)."""
        from orchestrator.deploy.runner import BatchingSettings

        self.runner.reconfigure(BatchingSettings.from_dict((config or {}).get("batching")))
        self._faces.clear()

    def _serving(self, model: str, tuned) -> tuple:
        """The model's serving.json for this device class, if it holds for the versions loaded."""
        from aitune.serving_config import read_serving

        return read_serving(self.root, model, self.class_key, dict(tuned.versions))

    def _warn_once(self, model: str, text: str) -> None:
        """Log a problem once per change, not once per look (a pointer stays broken for a while)."""
        if self._warned.get(model) != text:
            self._warned[model] = text
            log.warning("%s", text)

    def _relative(self, text: str) -> str:
        """Paths under the deploy root shown relative to it (no absolute paths leave the replica)."""
        root = str(self.root_path)
        return text.replace(root + "/", "").replace(root, ".")

    def _watch(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for model in list(self.models):
                try:
                    now = self._pointers(model)
                except Exception as exc:  # a pointer being switched or a damaged folder: look again later
                    self._warn_once(model, f"reading the deploy root for {model}: {exc}")
                    continue
                if now == self._seen[model]:
                    continue
                self._seen[model] = now  # refused versions are not retried until the pointer moves again
                try:
                    fresh = self._load(self.root, model, self.device)
                except Exception as exc:
                    self.refused[model] = self._relative(str(exc))
                    self._warn_once(model, f"not rolling {model} over: {exc}; the loaded version keeps serving")
                    continue
                self.models[model] = fresh  # one reference swap: a request sees the old model or the new
                self.runner.rolled_over(model)
                self.refused.pop(model, None)
                self._warned.pop(model, None)

    def status(self) -> dict[str, Any]:
        """The device, the versions served and any refused (paths relative to the deploy root), and
        the batching in force per model."""
        return {"device": str(self.device), "versions": {m: t.versions for m, t in self.models.items()},
                "refused": {m: self._relative(r) for m, r in self.refused.items()},
                "batching": {m: {**self.runner.batching_in_force(m), **self.runner.counters().get(m, {})}
                             for m in self.models},
                # a model tuned at buckets: its requests combined per bucket ("MODEL seq=64")
                "bucket_batches": {k: v for k, v in self.runner.counters().items() if " " in k}}

    # -- what the protocol routes ask of the replica (orchestrator.deploy.v2_routes) --

    def ready(self) -> bool:
        return all(m in self.models for m in self._seen)

    def known(self, model: str, version: str | None) -> str | None:
        """Why (model, version) is not served here (404), None when it is."""
        tuned = self.models.get(model)
        if tuned is None:
            return f"unknown model {model!r}; served: {', '.join(sorted(self.models))}"
        if version is not None and version not in set(tuned.versions.values()):
            return (f"{model} has no version {version!r} current here; current: "
                    f"{', '.join(sorted(set(tuned.versions.values())))}")
        return None

    def face(self, model: str):
        from orchestrator.deploy.v2_routes import face_of

        tuned = self.models[model]
        cached = self._faces.get(model)
        if cached is None or cached[0] is not tuned:
            cached = (tuned, face_of(tuned, self.runner.batching_in_force(model)))
            self._faces[model] = cached
        return cached[1]

    def infer(self, model: str, body: Any) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one request; also callable in-process through a handle."""
        import torch

        from aitune.loader import UntunedShape
        from orchestrator.deploy.tensor_json import TensorJsonError, decode_request, encode_outputs

        tuned = self.models.get(model)
        if tuned is None:
            return 404, {"error": f"unknown model {model!r}; served: {', '.join(sorted(self.models))}"}
        try:
            inputs = [t.to(self.device) for t in decode_request(body)]
            with torch.inference_mode():
                out = tuned(*inputs)
            # the version is the verified folder's name (load_tuned checks install.json against it)
            install = tuned.winner_for(*inputs)
            return 200, {"model": model, "version": install.version if install else None, "outputs": encode_outputs(out)}
        except (TensorJsonError, UntunedShape) as exc:
            return 400, {"error": str(exc)}
        except RecursionError:
            return 400, {"error": "the request body is nested too deep"}
        except Exception as exc:  # the model failed: still JSON, one line
            log.warning("%s failed on a request: %s: %s", model, type(exc).__name__, exc)
            return 500, {"error": f"{model} failed: {type(exc).__name__}: {self._relative(str(exc).splitlines()[0] if str(exc) else '')}"}

    async def read_body(self, request) -> bytes:
        """The request body, refused (413) past ``max_body_bytes`` before or while reading, and
        (408) when it has not arrived within ``body_timeout_s``: a slow client costs itself only."""
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise BodyError(400, f"Content-Length {length[:40]!r} is not a number")
            if int(length) > self.max_body_bytes:
                raise BodyError(413, f"the request body is {int(length)} bytes; the limit is {self.max_body_bytes}")
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise BodyError(413, f"the request body is over the limit of {self.max_body_bytes} bytes")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise BodyError(408, f"the request body did not arrive within {self.body_timeout_s:g} s") from None
        return b"".join(chunks)

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if request.url.path == "/v2" or request.url.path.startswith("/v2/"):
            return await self._v2.handle(request)
        model = request.url.path.strip("/").split("/")[-1]
        if model == "-status":
            return JSONResponse(self.status())
        try:
            raw = await self.read_body(request)
        except BodyError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.code, headers={"Connection": "close"})
        try:
            body = json.loads(raw)
        except RecursionError:
            return JSONResponse({"error": "the request body is nested too deep"}, status_code=400)
        except ValueError as exc:
            return JSONResponse({"error": f"the request body is not JSON: {exc}"}, status_code=400)
        # on the inference thread, like every call (runner.py): one call into a backend at a time
        code, answer = await self.runner.call(self.infer, model, body)
        return JSONResponse(answer, status_code=code)

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


#: how many ports above ``--port`` the replicas' own HTTP servers (direct ingress) may take
DIRECT_PORTS = 64


@contextlib.contextmanager
def direct_ingress_env(port: int):
    """Around starting an embedded Ray: Ray Serve's direct ingress on, so each replica answers HTTP
    itself on ``port`` (the next ones for more replicas) and no request pays the proxy's hop (about
    5 ms of CPU per request on a 2-core machine; see benchmarks/serve_load.py). Ray's processes read
    these variables when they start: set only while Ray starts, then put back."""
    import os

    wanted = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
              "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
              "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(min(port + DIRECT_PORTS, 65535))}
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def direct_urls(host: str) -> list[str]:
    """The replicas' own HTTP addresses when direct ingress is on (none when it is off): Ray Serve
    publishes them as the application's target groups (no public API yet: the controller's)."""
    import ray
    from ray.serve.context import _get_global_client

    try:
        groups = ray.get(_get_global_client()._controller.get_target_groups.remote(), timeout=60)
    except Exception:  # an older Ray without target groups: the proxy serves
        return []
    shown = f"[{host}]" if ":" in host else host
    return sorted(f"http://{shown}:{t.port}" for g in groups if getattr(g, "app_name", None) == APP_NAME
                  and str(getattr(g.protocol, "value", g.protocol)).upper() == "HTTP" for t in g.targets)


@dataclass
class Served:
    url: str
    models: list[str]
    replicas: int
    #: model -> the batching in force on the first replica (TunedServer.batching_in_force)
    batching: dict[str, Any] = field(default_factory=dict)
    #: each replica's own address (direct ingress), when on; ``url`` is then the first
    direct: list[str] = field(default_factory=list)
    #: Ray Serve's proxy (it also answers, one hop slower)
    proxy_url: str | None = None

    def handle(self):
        from ray import serve

        return serve.get_app_handle(APP_NAME)


def start_serving(root: str | None, models: list[str], slots, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                  reload_s: float = 0.5, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                  body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S, batching: dict[str, Any] | None = None,
                  replicas_per_slot: int = 1) -> Served:
    """Run the application on a connected Ray: ``replicas_per_slot`` replicas per slot (all slots of
    one kind; see :func:`replica_options`). The proxy listens on ``port``; where Ray was started
    under :func:`direct_ingress_env` the replicas answer on their own ports too, and ``Served.url``
    is the first of them."""
    from ray import serve

    from cluster.actor_options import slot_options

    kinds = {s.kind for s in slots}
    if len(kinds) != 1:
        raise ValueError(f"serve: the targets mix {' and '.join(sorted(kinds))} slots; serve one kind of device at a time")
    slot = slots[0]
    options = replica_options(slot_options(slot), slot.kind, replicas_per_slot)
    serve.start(http_options={"host": host, "port": port})
    app = serve.deployment(TunedServer, name="TunedServer").options(
        num_replicas=len(slots) * replicas_per_slot, ray_actor_options=options, max_ongoing_requests=MAX_ONGOING_REQUESTS,
        user_config={"batching": batching or {}},  # changed by a later call: applied in place (reconfigure)
    ).bind(root, list(models), slot.kind, slot.threads, reload_s, max_body_bytes, body_timeout_s)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except Exception as exc:  # Ray says only that the deployment failed; its status says why
        raise RuntimeError(f"{exc} {_deployment_messages()}".strip()) from None
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    try:
        batching = serve.get_app_handle(APP_NAME).status.remote().result(timeout_s=60)["batching"]
    except Exception:  # what is in force is shown best effort; serving is up
        batching = {}
    direct = [u for u in direct_urls(host) if u != url]
    return Served(direct[0] if direct else url, list(models), len(slots) * replicas_per_slot, batching, direct, url)


def replica_options(options: dict[str, Any], kind: str, replicas_per_slot: int) -> dict[str, Any]:
    """A replica's Ray resources where ``replicas_per_slot`` share a slot: a GPU's share each; on
    a CPU each replica keeps a slot's CPUs of its own (they would only take turns on shared ones)."""
    if replicas_per_slot < 1:
        raise ValueError(f"replicas per slot must be at least 1, got {replicas_per_slot}")
    if kind == "gpu" and replicas_per_slot > 1:
        return {**options, "num_gpus": options.get("num_gpus", 1) / replicas_per_slot}
    return dict(options)


def _deployment_messages() -> str:
    """The application's deployments' status messages (a failed replica's traceback is there)."""
    from ray import serve

    try:
        app = serve.status().applications.get(APP_NAME)
        return " ".join(d.message for d in app.deployments.values() if d.message) if app else ""
    except Exception:  # the status itself is best effort
        return ""


def stop_serving() -> None:
    from ray import serve

    serve.shutdown()
