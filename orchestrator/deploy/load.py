"""A closed-loop load generator for the Open Inference Protocol server (asyncio and aiohttp).

``concurrency`` virtual clients, each on one keep-alive connection of its own, send requests one
after another (the next only when the answer arrived) from precomputed bodies; each client talks
to one of the given URLs in turn (one per replica where each replica answers HTTP itself). A few
untimed requests per client come first; then the timed run, bounded by a number of requests and
by seconds. Used by the serving-settings search (orchestrator.deploy.serving_search) and by
``benchmarks/serve_load.py``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

HEADER = "Inference-Header-Content-Length"
#: answers of the timed run checked (one in this many), where a check is given
CHECK_EVERY = 20


@dataclass
class LoadRun:
    """What one closed-loop run saw: each answered request's latency, the lost ones, the checked ones."""

    concurrency: int
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    seconds: float = 0.0
    lost: int = 0
    wrong: int = 0
    checked: int = 0

    @property
    def n(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput_rps(self) -> float:
        return self.n / self.seconds if self.seconds else 0.0

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 0.5)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 0.99)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile by the nearest rank below (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


async def _client(session, url: str, bodies: list, run: LoadRun, state: dict, check) -> None:
    while state["left"] > 0 and time.perf_counter() < state["deadline"]:
        state["left"] -= 1
        i = state["next"] = state["next"] + 1
        data, headers = bodies[i % len(bodies)]
        start = time.perf_counter()
        try:
            async with session.post(url, data=data, headers=headers) as resp:
                raw, status, header = await resp.read(), resp.status, resp.headers.get(HEADER)
        except Exception:  # noqa: BLE001 (whatever the client raised, the request is lost)
            run.lost += 1
            continue
        run.latencies_ms.append((time.perf_counter() - start) * 1000)
        if status != 200:
            run.lost += 1
        elif check is not None and i % CHECK_EVERY == 0:
            run.checked += 1
            run.wrong += 0 if check(i % len(bodies), raw, header) else 1


async def closed_loop(urls: list[str], bodies: list[tuple[bytes, dict]], concurrency: int, requests: int,
                      seconds: float, *, check: Callable | None = None, warmup: int = 2,
                      before_timed: Callable[[], None] | None = None) -> LoadRun:
    """One closed-loop run: ``warmup`` untimed requests per client, then ``requests`` timed ones
    (or ``seconds``, whichever ends first). ``check(i, raw, header)`` judges one answer in
    ``CHECK_EVERY`` of body ``i``; ``before_timed`` is called right before the timed run."""
    import aiohttp

    run = LoadRun(concurrency)
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(concurrency)]
    targets = [urls[i % len(urls)] for i in range(concurrency)]
    try:
        warm = {"left": warmup * concurrency, "deadline": time.perf_counter() + seconds, "next": 0}
        await asyncio.gather(*(_client(s, u, bodies, LoadRun(concurrency), warm, None)
                               for s, u in zip(sessions, targets)))
        if before_timed is not None:
            before_timed()
        state = {"left": requests, "deadline": time.perf_counter() + seconds, "next": -1}
        start = time.perf_counter()
        await asyncio.gather(*(_client(s, u, bodies, run, state, check) for s, u in zip(sessions, targets)))
        run.seconds = time.perf_counter() - start
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    return run


def run_closed_loop(urls: list[str], bodies: list[tuple[bytes, dict]], concurrency: int, requests: int,
                    seconds: float, **options: Any) -> LoadRun:
    """:func:`closed_loop` on a fresh event loop of its own."""
    return asyncio.run(closed_loop(urls, bodies, concurrency, requests, seconds, **options))


# -- request bodies --

def request_body(inputs: list[tuple[str, str, Any]], binary: bool) -> tuple[bytes, dict[str, str]]:
    """An inference request's body and headers for ``inputs`` [(name, datatype, torch tensor)]: JSON
    data, or binary tensors after a JSON header (``Inference-Header-Content-Length``)."""
    import torch

    headers = {"Accept-Encoding": "identity"}
    specs = [{"name": n, "datatype": d, "shape": list(t.shape)} for n, d, t in inputs]
    if not binary:
        data = [t.reshape(-1).tolist() for _, _, t in inputs]
        body = json.dumps({"inputs": [{**s, "data": v} for s, v in zip(specs, data)]}).encode()
        return body, {**headers, "Content-Type": "application/json"}
    blobs = [t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for _, _, t in inputs]
    head = json.dumps({"inputs": [{**s, "parameters": {"binary_data_size": len(b)}} for s, b in zip(specs, blobs)],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + b"".join(blobs), {**headers, HEADER: str(len(head)), "Content-Type": "application/octet-stream"}


def bodies_from_metadata(metadata: dict[str, Any], count: int, binary: bool = True, seed: int = 0,
                         lengths: tuple[int, ...] = ()) -> list:
    """``count`` batch-1 request bodies for a model, from its protocol metadata (GET /v2/models/MODEL):
    floats drawn from a normal distribution, integers and booleans all ones (valid token ids and
    masks for the example models). A dimension beyond the batch that the metadata gives as -1 (a
    length that varies) takes ``lengths`` in turn, one per body (every such dimension of a body the same)."""
    import torch

    from orchestrator.deploy.open_inference import DATATYPES

    gen = torch.Generator().manual_seed(seed)
    bodies = []
    for i in range(count):
        inputs = []
        for spec in metadata["inputs"]:
            dtype = DATATYPES[spec["datatype"]]
            dims = [int(d) for d in spec["shape"][1:]]
            if any(d < 0 for d in dims) and not lengths:
                raise ValueError(f"input {spec['name']} has a length that varies ({spec['shape']}): give the lengths to send")
            shape = [1] + [lengths[i % len(lengths)] if d < 0 else d for d in dims]
            tensor = (torch.randn(shape, generator=gen).to(dtype) if dtype.is_floating_point
                      else torch.ones(shape, dtype=dtype))
            inputs.append((spec["name"], spec["datatype"], tensor))
        bodies.append(request_body(inputs, binary))
    return bodies


def model_metadata(base_url: str, model: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """GET ``/v2/models/MODEL`` of a server (its inputs' names, datatypes and shapes)."""
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/v2/models/{model}", timeout=timeout_s) as resp:
        return json.loads(resp.read())
