"""Serving under load: the Open Inference Protocol server against its floor, in-process calls and MLServer.

The Quick start sweep (``examples/sweep.yaml``: ``small_cnn`` 3x32x32 float32 and ``small_encoder``
64 int64 tokens, batch sizes 1 and 8) installs its winners in a temporary deploy root (or
``--store STORE --root ROOT`` reuses one). A closed-loop load generator in this process (asyncio,
aiohttp, one keep-alive connection per virtual client, bodies precomputed) sends batch-1
``POST /v2/models/MODEL/infer`` requests to 127.0.0.1 at concurrency 1, 4 and 16, each point
bounded by ``--requests`` and ``--seconds``, in JSON and in binary (``Inference-Header-Content-Length``)
form, to:

    on        the server (orchestrator.deploy.serve, 1 CPU replica), dynamic batching on (2 ms)
    off       the same server restarted with batching={"off": True}
    floor     a Ray Serve app that only parses the body's JSON and answers a fixed small JSON
    inproc    aitune.load_tuned(root, MODEL, "cpu")(x) in this process, 1 torch thread (c=1)
    codec     orchestrator.deploy.open_inference parsing the request and encoding the answer, in-process
    handler   TunedServer.__call__ on a Starlette request, in-process, batching on: the replica without Ray
    mlserver  MLServer in its own venv (benchmarks/mlserver_runtime.py: the same model and weights,
              eager fp32, 1 thread, no parallel workers, no adaptive batching; its REST takes JSON only)

Each Ray mode of ``--ingress`` (default ``proxy,direct``) starts a fresh embedded Ray: ``proxy`` is
Serve's HTTP proxy; ``direct`` sets ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` first (every ingress
replica then serves HTTP itself, on the HTTP host and a port from 30000-31000 that the
controller's target groups name); ``optimized`` sets ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (direct
ingress, user code on the replica's main loop, and more). Every 20th answer is compared with the
in-process output of the version that answered, within the install's tolerance; lost (non-200,
exception) and wrong answers are counted. It prints throughput and p50/p99 per point, the goals'
ratios, and CPU ms per request of each process (generator, Ray proxy, replica, MLServer) from
/proc. Nothing is asserted.

Run:  PYTHONPATH=. .venv/bin/python benchmarks/serve_load.py [--quick] [--store S --root R]
      [--ingress proxy,direct,optimized] [--no-mlserver] [--out figures.json]
About 3 minutes on the 2-core machine (40 s of it the sweep), 4 with ``--ingress proxy,direct,optimized``;
the first run also installs MLServer into /tmp/mlserver-venv (a few minutes more). --quick (small_cnn,
150 requests a point) about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import namedtuple
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import mlserver_runtime as mls  # MLServer's venv, folder and process; and a free port

#: model -> (input name, one row's shape, datatype, factory kwargs of the Quick start sweep)
MODELS = {"small_cnn": ("image", [3, 32, 32], "FP32", {"channels": 32}),
          "small_encoder": ("tokens", [64], "INT64", {"dim": 128, "layers": 2})}
from orchestrator.deploy.load import CHECK_EVERY, HEADER  # noqa: E402

DISTINCT = 40
FLOOR_ANSWER = b'{"model_name":"floor","outputs":[]}'
INGRESS_ENV = {"proxy": {}, "direct": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
               "optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}
#: direct ingress holds a stopping replica 30 s by default, for outside load balancers: none here
DRAIN_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


@dataclass
class Point:
    """One measured run: who answered, in which form, at which concurrency, and what it got."""

    what: str
    model: str
    fmt: str
    conc: int
    n: int = 0
    seconds: float = 0.0
    lost: int = 0
    wrong: int = 0
    checked: int = 0
    cpu_ms: dict[str, float] = field(default_factory=dict)  # process -> CPU ms per request
    lat_ms: list[float] = field(default_factory=list, repr=False)

    rps = property(lambda self: self.n / self.seconds if self.seconds else 0.0)
    p50 = property(lambda self: statistics.median(self.lat_ms) if self.lat_ms else math.nan)
    p99 = property(lambda self: sorted(self.lat_ms)[int(0.99 * (len(self.lat_ms) - 1))] if self.lat_ms else math.nan)

    def summary(self) -> dict:
        found = {k: v for k, v in asdict(self).items() if k != "lat_ms"}
        return {**found, "rps": round(self.rps, 1), "p50_ms": round(self.p50, 3), "p99_ms": round(self.p99, 3)}

    def show(self) -> None:
        cpu = " ".join(f"{k} {v:.2f}" for k, v in self.cpu_ms.items())
        print(f"  {self.model:<13} {self.what:<15} {self.fmt:<6} c={self.conc:<3} {self.rps:7.0f} req/s  "
              f"p50 {self.p50:7.3f} ms  p99 {self.p99:7.3f} ms  n {self.n:4d} lost {self.lost} "
              f"wrong {self.wrong}/{self.checked}  cpu ms/req: {cpu}", flush=True)


# -- requests and answers --

def inputs_for(model: str, count: int) -> list:
    import torch

    _, shape, datatype, _ = MODELS[model]
    gen = torch.Generator().manual_seed(11)
    if datatype == "INT64":
        return [torch.randint(0, 1000, (1, *shape), generator=gen) for _ in range(count)]
    return [torch.randn(1, *shape, generator=gen) for _ in range(count)]


def request_body(model: str, x, binary: bool) -> tuple[bytes, dict[str, str]]:
    name, _, datatype, _ = MODELS[model]
    spec = {"name": name, "datatype": datatype, "shape": list(x.shape)}
    headers = {"Accept-Encoding": "identity"}  # no gzip from MLServer: every server sends plain bodies
    if not binary:
        body = json.dumps({"inputs": [{**spec, "data": x.reshape(-1).tolist()}]}).encode()
        return body, {**headers, "Content-Type": "application/json"}
    blob = x.contiguous().numpy().tobytes()
    head = json.dumps({"inputs": [{**spec, "parameters": {"binary_data_size": len(blob)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + blob, {**headers, HEADER: str(len(head)), "Content-Type": "application/octet-stream"}


def decode_answer(raw: bytes, header: str | None) -> tuple[str | None, list]:
    """The version that answered and the outputs (torch tensors) of an inference response."""
    import torch

    from orchestrator.deploy.open_inference import DATATYPES

    split = int(header) if header else len(raw)
    head, offset, outputs = json.loads(raw[:split]), split, []
    for out in head["outputs"]:
        dtype, size = DATATYPES[out["datatype"]], (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            outputs.append(torch.tensor(out["data"], dtype=torch.float64).reshape(out["shape"]))
        else:
            blob = bytearray(raw[offset: offset + size])
            outputs.append(torch.frombuffer(blob, dtype=torch.uint8).view(dtype).reshape(out["shape"]))
            offset += size
    return head.get("model_version"), outputs


class Checker:
    """In-process outputs of the installed versions for the generator's inputs, keyed by version:
    b1's, and row 0 of the larger sizes' on the row repeated (how the batcher pads)."""

    def __init__(self, tuned, inputs: list) -> None:
        import torch

        from aitune.torch.tree import flatten_tensors

        installs = list(tuned.installs.values())
        self.atol = max(i.tolerance["atol"] for i in installs)
        self.rtol = max(i.tolerance["rtol"] for i in installs)
        self.expected: list[dict[str, list]] = []
        with torch.inference_mode():
            for x in inputs:
                self.expected.append({i.version: [t[:1].float() for _, t in flatten_tensors(
                    tuned(x.expand(i.batch_size, *x.shape[1:]).contiguous()))] for i in installs})

    def __call__(self, i: int, raw: bytes, header: str | None) -> bool:
        import torch

        if raw == FLOOR_ANSWER:
            return True
        try:
            version, got = decode_answer(raw, header)
        except (ValueError, KeyError, TypeError, RuntimeError):  # not an answer of the protocol
            return False
        named = [v for v in (version or "").split(",") if v in self.expected[i]]
        close = torch.allclose
        return any(len(want) == len(got) and all(
            g.shape == w.shape and close(g.float(), w, atol=self.atol, rtol=self.rtol) for g, w in zip(got, want))
            for want in [self.expected[i][v] for v in named] or self.expected[i].values())


# -- the processes the load costs --

def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_point(point: Point, url: str, bodies: list, args, check, pids: dict[str, int]) -> Point:
    """One closed-loop run (orchestrator.deploy.load, the generator the serving search uses), with
    each process's CPU time over the timed part."""
    from orchestrator.deploy.load import run_closed_loop

    pids = {"generator": os.getpid(), **pids}
    before: dict[str, float] = {}
    run = run_closed_loop([url], bodies, point.conc, args.requests, args.seconds, check=check,
                          before_timed=lambda: before.update({n: cpu_seconds(p) for n, p in pids.items()}))
    point.lat_ms, point.seconds, point.n = run.latencies_ms, run.seconds, run.n
    point.lost, point.wrong, point.checked = run.lost, run.wrong, run.checked
    point.cpu_ms = {name: round((cpu_seconds(pid) - before[name]) * 1000 / max(point.n, 1), 3)
                    for name, pid in pids.items()}
    point.show()
    return point


def timed(point: Point, calls: list, args) -> Point:
    """``calls`` one after another in this process (cycled), each timed."""
    for call in calls[:10]:
        call()
    before, start = cpu_seconds(os.getpid()), time.perf_counter()
    while len(point.lat_ms) < args.requests and time.perf_counter() < start + args.seconds:
        call = calls[len(point.lat_ms) % len(calls)]
        t = time.perf_counter()
        call()
        point.lat_ms.append((time.perf_counter() - t) * 1000)
    point.seconds, point.n = time.perf_counter() - start, len(point.lat_ms)
    point.cpu_ms = {"generator": round((cpu_seconds(os.getpid()) - before) * 1000 / point.n, 3)}
    point.show()
    return point


#: one model's in-process model, inputs, request bodies in both forms ({"json": [...], "binary": [...]}), checker
Bench = namedtuple("Bench", "tuned inputs bodies check")


def handler_calls(server, model: str, bodies: list, loop) -> list:
    """``TunedServer.__call__`` on a Starlette request per body, run on ``loop``: the replica's own work, no Ray."""
    from starlette.requests import Request

    def call(data: bytes, headers: dict) -> None:
        pairs = {**headers, "Content-Length": str(len(data))}.items()
        scope = {"type": "http", "method": "POST", "path": f"/v2/models/{model}/infer", "query_string": b"",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in pairs]}

        async def receive() -> dict:
            return {"type": "http.request", "body": data, "more_body": False}

        response = loop.run_until_complete(server(Request(scope, receive)))
        if response.status_code != 200:
            raise RuntimeError(f"the handler answered {response.status_code}: {bytes(response.body)[:300]!r}")

    return [lambda b=b: call(*b) for b in bodies]


def local_points(root: str, model: str, bench: Bench, args) -> list[Point]:
    """In this process, 1 thread: the model alone (inproc), the protocol codec alone (codec), and
    the server's request handler with batching on, without Ray (handler)."""
    import torch

    from orchestrator.deploy import open_inference as oip
    from orchestrator.deploy.serve import TunedServer

    def codec(data: bytes, headers: dict, out) -> None:
        parsed = oip.parse_infer_request(data, headers.get(HEADER))
        oip.encode_infer_response(model, "v", None, [("output", out)], {"output"} if parsed.binary_output else set())

    torch.set_num_threads(1)
    with torch.inference_mode():
        points = [timed(Point("inproc", model, "-", 1), [lambda x=x: bench.tuned(x) for x in bench.inputs], args)]
    outs = [next(iter(found.values()))[0] for found in bench.check.expected]
    for fmt in ("json", "binary"):
        calls = [lambda b=b, o=o: codec(*b, o) for b, o in zip(bench.bodies[fmt], outs)]
        points.append(timed(Point("codec", model, fmt, 1), calls, args))
    server, loop = TunedServer(root, [model], "cpu"), asyncio.new_event_loop()
    try:
        for fmt in ("json", "binary"):
            calls = handler_calls(server, model, bench.bodies[fmt], loop)
            points.append(timed(Point("handler", model, fmt, 1), calls, args))
    finally:
        server._stop.set()
        server.runner.executor.shutdown()
        loop.close()
    return points


# -- Ray: the sweep, the server, the floor app, and where their processes are --

def prepare_root(args) -> tuple[str, str]:
    """The store and deploy root the Quick start sweep installed into: swept now unless given."""
    if args.root:
        return args.store, args.root
    import yaml
    from rich.console import Console

    from cluster import connect
    from orchestrator.spec.schema import parse_spec
    from orchestrator.sweep import run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    data = yaml.safe_load((ROOT / "examples" / "sweep.yaml").read_text())
    data["store"], data["deploy"]["root"] = str(tmp / "store"), str(tmp / "deploy")
    data["models"] = [m for m in data["models"] if m["name"] in args.models]
    handle, start = connect(object_store_memory=200 * 1024**2, log_to_driver=False), time.perf_counter()
    try:
        outcome = run_sweep(parse_spec(data, "examples/sweep.yaml"), console=Console(file=io.StringIO()),
                            write_report=False)
    finally:
        handle.shutdown()
    failed = [d for d in outcome.deployments if str(getattr(d.status, "value", d.status)) != "deployed"]
    if failed:
        raise SystemExit(f"the Quick start sweep did not deploy everything: {failed}")
    print(f"swept the Quick start in {time.perf_counter() - start:.0f} s; rerun with "
          f"--store {tmp / 'store'} --root {tmp / 'deploy'}")
    return str(tmp / "store"), str(tmp / "deploy")


class Floor:
    """What any Ray Serve app pays: the body read and its JSON header parsed, a fixed answer."""

    async def __call__(self, request):
        from starlette.responses import Response

        raw = await request.body()
        split = request.headers.get(HEADER)
        json.loads(raw[: int(split)] if split else raw)
        return Response(FLOOR_ANSWER, media_type="application/json")


def serve(root: str, models: list[str], port: int, batching: dict | None, floor: bool) -> None:
    from ray import serve as ray_serve

    from cluster import Inventory, plan_deploy_targets
    from orchestrator.deploy.serve import MAX_ONGOING_REQUESTS, start_serving

    slots = plan_deploy_targets(Inventory.from_ray(), [{"cpu_slots": 1}])
    start_serving(root, models, slots, port=port, batching=batching)
    if floor:  # the server's queue limit (Serve's default of 5 would queue c=16 in the proxy)
        app = ray_serve.deployment(Floor, name="Floor").options(
            ray_actor_options={"num_cpus": 0}, max_ongoing_requests=MAX_ONGOING_REQUESTS).bind()
        ray_serve.run(app, name="floor", route_prefix="/floor")


def ray_processes() -> dict[str, int]:
    """PIDs of this Ray's proxy, replicas and controller: the raylet's children, by process title."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    titles = {"ray::ProxyActor": "proxy", "ray::ServeReplica:aitune:": "replica", "ray::ServeReplica:floor:": "floor",
              "ray::ServeController": "controller"}
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == raylet:
                title = (stat.parent / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                found.update({n: int(stat.parent.name) for prefix, n in titles.items() if title.startswith(prefix)})
        except (OSError, IndexError, ValueError):
            continue
    return found


def app_urls(port: int, direct: bool) -> dict[str, str]:
    """Each app's base URL: the proxy's, or its ingress replica's own port (the controller's target groups)."""
    if not direct:
        return {"aitune": f"http://127.0.0.1:{port}", "floor": f"http://127.0.0.1:{port}/floor"}
    import ray
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote())
    urls = {g.app_name: f"http://{g.targets[0].ip}:{g.targets[0].port}{g.route_prefix.rstrip('/')}" for g in groups
            if str(getattr(g.protocol, "value", g.protocol)).upper() == "HTTP" and g.targets}
    if "aitune" not in urls or any(f":{port}" in u for u in urls.values()):
        raise RuntimeError(f"direct ingress is not in effect: the target groups are {groups}")
    return urls


def listening(port: int) -> str:
    """The address a local TCP port listens on, from /proc/net/tcp{,6}: is a server loopback only?"""
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                return socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8 else f"tcp6 {address}"
    return "nothing"


def ray_run(args, root: str, mode: str, bench: dict[str, Bench]) -> list[Point]:
    """A fresh embedded Ray with ``mode``'s environment: batching on (and the floor), then off."""
    from cluster import connect
    from orchestrator.deploy.serve import stop_serving

    env = {**INGRESS_ENV[mode], **(DRAIN_ENV if mode != "proxy" else {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read at import by the Ray processes that this Ray start spawns
    handle = connect(object_store_memory=200 * 1024**2, log_to_driver=False)  # no access log lines here
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    points, port, tag = [], mls.free_port(), "" if mode == "proxy" else f" {mode}"
    try:
        for label, batching in (("on", None), ("off", {"off": True})):
            serve(root, args.models, port, batching, floor=label == "on")
            try:
                urls, pids = app_urls(port, mode != "proxy"), ray_processes()
                binds = {app: listening(int(url.split(":")[2].split("/")[0])) for app, url in urls.items()}
                print(f"{mode}, batching {label}: {urls}, listening on {binds}; pids {pids}", flush=True)
                for what, app, proc in [(label, "aitune", "replica")] + [("floor", "floor", "floor")] * (label == "on"):
                    for model, fmt, conc in [(m, f, c) for m in args.models for f in ("json", "binary")
                                             for c in args.concurrency]:
                        used = {k: pids[k] for k in ("proxy", proc) if k in pids}
                        url = f"{urls[app]}/v2/models/{model}/infer"
                        points.append(run_point(Point(what + tag, model, fmt, conc), url, bench[model].bodies[fmt],
                                                args, bench[model].check, used))
            finally:
                stop_serving()
    finally:
        handle.shutdown()
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    return points


# -- MLServer (benchmarks/mlserver_runtime.py: its venv, folder, process and runtime) --

def mlserver_run(args, bench: dict[str, Bench]) -> list[Point]:
    exe = mls.ensure_venv(Path(args.mlserver_venv))
    folder, port = mls.write_repository({m: MODELS[m][3] for m in args.models})
    proc = mls.start(exe, folder, port, args.models) if exe else None
    if proc is None:
        return []
    base, points = f"http://127.0.0.1:{port}", []
    try:
        print(f"mlserver: {base} (pid {proc.pid}) listening on {listening(port)}; its REST takes JSON only", flush=True)
        for model, conc in [(m, c) for m in args.models for c in args.concurrency]:
            points.append(run_point(Point("mlserver", model, "json", conc), f"{base}/v2/models/{model}/infer",
                                    bench[model].bodies["json"], args, bench[model].check, {"mlserver": proc.pid}))
    finally:
        mls.stop(proc)
    return points


# -- what the figures say --

def find(points: list[Point], what: str, model: str, fmt: str, conc: int) -> Point | None:
    return next((p for p in points if (p.what, p.model, p.fmt, p.conc) == (what, model, fmt, conc) and p.n), None)


def goals(points: list[Point], models: list[str], hi: int) -> list[dict]:
    """The issue's ratios per model, ingress mode and form, each with its goal."""
    found: list[dict] = []

    def add(model, name, value, limit, above, detail):
        found.append({"model": model, "name": name, "value": round(value, 3), "detail": detail,
                      "goal": f"{'>=' if above else '<='} {limit}", "met": value >= limit if above else value <= limit})

    tags = sorted({p.what[3:] for p in points if p.what.startswith("on")}, key=lambda t: (t != "", t))
    for model, tag, fmt in [(m, t, f) for m in models for t in tags for f in ("json", "binary")]:
        inproc, ml1, mlhi = (find(points, w, model, f, c) for w, f, c in
                             (("inproc", "-", 1), ("mlserver", "json", 1), ("mlserver", "json", hi)))
        on1, onhi, offhi, floor1 = (find(points, f"{w} {tag}".strip(), model, fmt, c) for w, c in
                                    (("on", 1), ("on", hi), ("off", hi), ("floor", 1)))
        name = f"{tag or 'proxy'} {fmt}:"
        if not on1:
            continue
        if floor1 and inproc:
            add(model, f"{name} median - (floor + in-process) at c=1, ms", on1.p50 - floor1.p50 - inproc.p50, 0.5,
                False, f"{on1.p50:.3f} - ({floor1.p50:.3f} + {inproc.p50:.3f})")
        add(model, f"{name} p99 / p50 at c=1", on1.p99 / on1.p50, 3, False, f"{on1.p99:.3f} / {on1.p50:.3f} ms")
        if onhi and offhi:
            add(model, f"{name} throughput at c={hi}, batching on / off", onhi.rps / offhi.rps, 1.3, True,
                f"{onhi.rps:.0f} / {offhi.rps:.0f} req/s")
        if onhi:
            add(model, f"{name} p99 at c={hi} / p99 at c=1", onhi.p99 / on1.p99, 2, False,
                f"{onhi.p99:.3f} / {on1.p99:.3f} ms")
        for what in ("on", "floor") if tag else ():
            proxy1, moded = find(points, what, model, fmt, 1), find(points, f"{what} {tag}", model, fmt, 1)
            if proxy1 and moded:
                add(model, f"{name} {'served' if what == 'on' else 'floor'} median at c=1, {tag} / proxy",
                    moded.p50 / proxy1.p50, 0.5, False, f"{moded.p50:.3f} / {proxy1.p50:.3f} ms")
        if ml1:
            add(model, f"{name} median at c=1 / MLServer's (JSON)", on1.p50 / ml1.p50, 2, False,
                f"{on1.p50:.3f} / {ml1.p50:.3f} ms")
        if onhi and mlhi:
            add(model, f"{name} throughput at c={hi} (batching on) / MLServer's (JSON)", onhi.rps / mlhi.rps, 1, True,
                f"{onhi.rps:.0f} / {mlhi.rps:.0f} req/s")
    return found


def report(points: list[Point], args) -> list[dict]:
    hi = max(args.concurrency)
    found = goals(points, args.models, hi)
    lost, wrong, checked = (sum(getattr(p, k) for p in points) for k in ("lost", "wrong", "checked"))
    print(f"\nanswers: {sum(p.n for p in points)} timed, lost {lost}, wrong {wrong} of {checked} checked "
          "(goal: 0 and 0)")
    print("goals:")
    for g in found:
        print(f"  {g['model']:<13} {g['name']:<76} {g['value']:8.3f} (goal {g['goal']:<6}) "
              f"{'met   ' if g['met'] else 'MISSED'}  {g['detail']}")
    if lost or wrong or not all(g["met"] for g in found):
        print(f"\nwhere the time goes: CPU ms per request of each process at c=1 and c={hi}, beside the median")
        for p in points:
            if p.conc in (1, hi) and p.n and not p.what.startswith("off"):
                parts = "  ".join(f"{k} {v:.3f}" for k, v in p.cpu_ms.items())
                print(f"  {p.model:<13} {p.what:<15} {p.fmt:<6} c={p.conc:<3} p50 {p.p50:7.3f} ms   "
                      f"cpu {sum(v for v in p.cpu_ms.values() if not math.isnan(v)):6.3f} ms = {parts}")
    return found


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small_cnn only, 150 requests / 6 s a point")
    parser.add_argument("--store", help="reuse this store (with --root) instead of sweeping")
    parser.add_argument("--root", help="reuse this deploy root, where the Quick start sweep installed")
    parser.add_argument("--models", help="comma list (default: both; --quick: small_cnn)")
    parser.add_argument("--requests", type=int, help="requests per point (default 400; --quick 150)")
    parser.add_argument("--seconds", type=float, help="seconds per point at most (default 15; --quick 6)")
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop clients per point, comma list")
    parser.add_argument("--ingress", default="both", help="comma list of proxy, direct, optimized; both: proxy,direct")
    parser.add_argument("--mlserver", action=argparse.BooleanOptionalAction, default=True,
                        help="compare with MLServer (installed into --mlserver-venv the first time)")
    parser.add_argument("--mlserver-venv", default="/tmp/mlserver-venv")
    parser.add_argument("--out", help="write every figure to this JSON file")
    args = parser.parse_args()
    if bool(args.store) != bool(args.root):
        parser.error("--store and --root go together")
    args.models = args.models.split(",") if args.models else (["small_cnn"] if args.quick else list(MODELS))
    args.requests = args.requests or (150 if args.quick else 400)
    args.seconds = args.seconds or (6.0 if args.quick else 15.0)
    args.concurrency = sorted(int(c) for c in args.concurrency.split(","))
    args.ingress = ["proxy", "direct"] if args.ingress == "both" else args.ingress.split(",")
    unknown = set(args.models) - set(MODELS) | set(args.ingress) - set(INGRESS_ENV)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    return args


def main() -> None:
    args = parse_args()
    import aitune

    started = time.perf_counter()
    store, root = prepare_root(args)
    bench: dict[str, Bench] = {}
    for model in args.models:
        tuned, inputs = aitune.load_tuned(root, model, "cpu"), inputs_for(model, DISTINCT)
        bodies = {fmt: [request_body(model, x, fmt == "binary") for x in inputs] for fmt in ("json", "binary")}
        bench[model] = Bench(tuned, inputs, bodies, Checker(tuned, inputs))
        winners = ", ".join(f"b{i.batch_size} {i.version} {i.candidate}" for i in tuned.installs.values())
        batching = "on" if tuned.batching.enabled else f"off: {tuned.batching.reason}"
        print(f"{model}: {winners}; batching {batching}")
    print(f"closed loop, batch-1 requests, {args.requests} requests or {args.seconds:g} s a point, "
          f"every {CHECK_EVERY}th answer checked; deploy root {root}")
    points = [p for m in args.models for p in local_points(root, m, bench[m], args)]
    for mode in args.ingress:
        points += ray_run(args, root, mode, bench)
    if args.mlserver:
        points += mlserver_run(args, bench)
    found = report(points, args)
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    if args.out:
        Path(args.out).write_text(json.dumps({"store": store, "root": root, "requests": args.requests,
                                              "seconds": args.seconds, "points": [p.summary() for p in points],
                                              "goals": found}, indent=1))


if __name__ == "__main__":
    main()
