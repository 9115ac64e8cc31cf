"""Measuring serving settings for real: the Ray Serve app (``start_serving``) with the settings, and
the closed-loop load generator (:mod:`orchestrator.deploy.load`) over HTTP at one concurrency.

Each point is kept in the store under the SHA-256 of what it depends on (the model, the installed
versions and their device class, the settings, the concurrency and the load), so a rerun of the
same search measures nothing twice. Needs a connected Ray and the model installed in ``root``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from aitune.canonical import sha256_of
from orchestrator.deploy.serving_choice import MeasuredPoint, Settings
from orchestrator.store.serving_points import put_point, stored_point

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Load:
    """How hard each point is driven: timed requests, at most this many seconds, the body form."""

    requests: int = 200
    seconds: float = 10.0
    binary: bool = True
    #: distinct request bodies cycled through
    bodies: int = 16
    #: a model whose lengths vary: the length of each body in turn (drawn from its traffic mix)
    lengths: tuple[int, ...] = ()


class ServingBench:
    """One model on one device class's slots: serves it with given settings (restarting the app
    when they change) and measures points, from the store where it has them."""

    def __init__(self, root: str | None, model: str, slots: list, class_key: str, versions: dict[int, str],
                 store: Any = None, load: Load = Load(), host: str = "127.0.0.1", port: int | None = None) -> None:
        from orchestrator.deploy.serve_request import free_port

        self.root, self.model, self.slots, self.class_key = root, model, slots, class_key
        self.versions, self.store, self.load, self.host = dict(versions), store, load, host
        self.port = port or free_port(host)
        self._serving: Settings | None = None
        self._urls: list[str] = []
        self._bodies: list | None = None
        #: points measured by this bench (not taken from the store)
        self.measured = 0

    def key(self, settings: Settings, concurrency: int) -> str:
        return sha256_of({"what": "serving point", "model": self.model, "device_class": self.class_key,
                          "versions": {str(b): v for b, v in sorted(self.versions.items())},
                          "slots": [len(self.slots), self.slots[0].kind, self.slots[0].threads],
                          "settings": settings.to_dict(), "concurrency": concurrency,
                          "load": [self.load.requests, self.load.seconds, self.load.binary, self.load.bodies,
                                   *([list(self.load.lengths)] if self.load.lengths else [])]})

    def __call__(self, settings: Settings, concurrency: int) -> MeasuredPoint:
        key = self.key(settings, concurrency)
        kept = stored_point(self.store, key)
        if kept is not None:
            try:
                return MeasuredPoint.from_dict(kept, reused=True)
            except (KeyError, TypeError, ValueError) as exc:  # a damaged record: measured again
                log.warning("stored serving point %s can't be read (%s); measuring it again", key[:12], exc)
        point = self._measure(settings, concurrency)
        put_point(self.store, key, point.to_dict())
        self.measured += 1
        return point

    def _measure(self, settings: Settings, concurrency: int) -> MeasuredPoint:
        from orchestrator.deploy.load import run_closed_loop

        self._serve(settings)
        run = run_closed_loop(self._urls, self._bodies, concurrency, self.load.requests, self.load.seconds)
        return MeasuredPoint(settings, concurrency, run.throughput_rps, run.p50_ms, run.p99_ms, run.n, run.lost)

    def _serve(self, settings: Settings) -> None:
        from ray import serve

        from orchestrator.deploy.load import bodies_from_metadata, model_metadata
        from orchestrator.deploy.serve import APP_NAME, start_serving

        if self._serving == settings:
            return
        if self._serving is not None and self._serving.replicas != settings.replicas and self.slots[0].kind == "gpu":
            serve.delete(APP_NAME)  # a GPU's share per replica changes: the old replicas go first
            self._serving = None
        batching = {"off": False, "max_queue_delay_ms": {self.model: settings.max_queue_delay_ms},
                    "batch_sizes": {self.model: list(settings.batch_sizes)}}
        # the same app with other settings: Serve applies them in place (TunedServer.reconfigure)
        served = start_serving(self.root, [self.model], self.slots, host=self.host, port=self.port,
                               batching=batching, replicas_per_slot=settings.replicas)
        _wait_in_force(served, self.model, settings)
        bases = served.direct or [_proxy_url(self.host, served.url)]
        self._urls = [f"{u}/v2/models/{self.model}/infer" for u in bases]
        if self._bodies is None:
            base = bases[0]
            self._bodies = bodies_from_metadata(model_metadata(base, self.model), self.load.bodies, self.load.binary,
                                                lengths=self.load.lengths)
        self._serving = settings

    def close(self) -> None:
        from ray import serve

        from orchestrator.deploy.serve import APP_NAME

        if self._serving is not None:
            serve.delete(APP_NAME)
            self._serving = None


def _proxy_url(host: str, asked: str) -> str:
    """The proxy's address: where Serve was already running, its own port (a new one is not applied)."""
    try:
        from ray.serve.context import _get_global_client

        port = _get_global_client().http_config.port
    except Exception:  # no client API on this Ray: the port asked for
        return asked
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def _wait_in_force(served, model: str, settings: Settings, timeout_s: float = 30.0) -> None:
    """Until the replicas report the settings in force (a reconfigure is applied as serve.run returns,
    checked rather than assumed); a warning if they don't within ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    force = served.batching.get(model) or {}
    while time.monotonic() < deadline:
        if force.get("max_queue_delay_ms") == settings.max_queue_delay_ms:
            return
        time.sleep(0.2)
        try:
            force = served.handle().status.remote().result(timeout_s=10)["batching"].get(model) or {}
        except Exception:  # asked again until the deadline
            force = {}
    log.warning("%s: the server did not report %s in force within %g s", model, settings.label(), timeout_s)
