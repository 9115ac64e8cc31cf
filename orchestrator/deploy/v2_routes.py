"""The Open Inference Protocol ("KServe v2") routes of a serving replica.

    GET  /v2                                          server metadata (name, version, extensions)
    GET  /v2/health/live | /v2/health/ready           200, or 503 while a model has nothing loaded
    GET  /v2/models/MODEL[/versions/V][/ready]        model metadata, or 200/503
    POST /v2/models/MODEL[/versions/V]/infer          JSON tensors, or binary (Inference-Header-Content-Length)

Inputs are named as the model was tuned with them (``install.json``'s ``input_names``: the spec's
names, ``input_N`` for unnamed positional ones, keyword inputs by their keyword) and reach the
model as it was called in its sweep: positional ones in order, keyword ones as keywords. Outputs
are named by their path in the output tree (:func:`orchestrator.deploy.open_inference.output_names`).
The versions of a model are the versions installed and current on this replica's device class,
one per tuned batch size; without one a request goes to the current winners (with dynamic
batching where it is on), with one only to that install, at its own batch size.
Errors are ``{"error": "..."}``: 400 for a bad request (naming the input and what is wrong), 404
for an unknown model, version or route, 405 for a wrong method, 503 while not ready.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.deploy import open_inference as oip
from orchestrator.deploy.http_errors import Refused

SERVER_NAME = "aitune-orchestrator"
EXTENSIONS = ["binary_tensor_data", "model_repository_readonly", "dynamic_batching"]
_MODEL_ROUTE = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<tail>/ready|/infer)?/?\Z")


@functools.lru_cache(maxsize=1)
def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aitune-orchestrator")
    except PackageNotFoundError:
        return "0"


@dataclass
class Face:
    """What a client sees of one loaded model: inputs, outputs, versions and batching in force."""

    inputs: list[tuple[str, str, list[int]]]
    outputs: list[tuple[str, str, list[int]]]
    output_paths: list[str]
    positional: int
    versions: list[str]
    batching: dict[str, Any]


def face_of(tuned, batching_in_force: dict[str, Any]) -> Face:
    """A TunedModel's metadata: a dimension that differs between tuned sizes (or rows under batching) is -1."""
    installs = [tuned.installs[s] for s in tuned.tuned_shapes]
    first = installs[0]
    varying = batching_in_force.get("enabled") or len({i.batch_size for i in installs}) > 1

    def shape(index: int, of) -> list[int]:
        """-1 where the tuned installs differ (a bucketed axis), and on the batch axis when it varies."""
        shapes = [list(of(i)[index]) for i in installs]
        s = [d if all(len(o) == len(shapes[0]) and o[k] == d for o in shapes) else -1 for k, d in enumerate(shapes[0])]
        return [-1, *s[1:]] if varying and s else s

    names = tuned.input_names or [f"input_{i}" for i in range(len(first.input_shapes))]
    positional = first.positional_inputs if tuned.input_names else len(first.input_shapes)
    axes_in = {(n, d) for a in (tuned.shapes.axes if tuned.shapes else ()) for n, d, _ in a.inputs}
    axes_out = {(k, d) for a in (tuned.shapes.axes if tuned.shapes else ()) for k, _, d in a.outputs}

    def varying_axes(dims: list[int], which: set, key) -> list[int]:  # an axis that varies takes any length
        return [-1 if (key, d) in which else size for d, size in enumerate(dims)]

    inputs = [(n, _datatype(d), varying_axes(shape(k, lambda i: i.input_shapes), axes_in, n))
              for k, (n, d) in enumerate(zip(names, first.input_dtypes or []))]
    paths = [p for p, _, _ in first.outputs or []]
    outputs = [(n, _datatype(d), varying_axes(shape(k, lambda i: [s for _, s, _ in i.outputs or []]), axes_out, k))
               for k, (n, (_, _, d)) in enumerate(zip(oip.output_names(paths), first.outputs or []))]
    versions = sorted({i.version for i in installs})
    return Face(inputs, outputs, paths, positional, versions, batching_in_force)


def _datatype(torch_name: str) -> str:
    """The protocol's name for a torch dtype; one it has none for is shown by torch's name (and
    refused when a request or an answer carries it)."""
    try:
        return oip.datatype_of(getattr(torch, torch_name))
    except (AttributeError, ValueError):
        return torch_name.upper()


def _json(code: int, body: Any):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=code)


def _error(code: int, message: str):
    from starlette.responses import Response

    return Response(oip.error_body(message), status_code=code, media_type="application/json")


class V2Routes:
    """Routing and protocol for one replica; ``server`` is the TunedServer holding the models."""

    def __init__(self, server) -> None:
        self.server = server

    async def handle(self, request):
        path, method = request.url.path, request.method
        if path in ("/v2", "/v2/"):
            return self._get_only(method) or _json(200, oip.server_metadata(SERVER_NAME, server_version(), EXTENSIONS))
        if path in ("/v2/health/live", "/v2/health/ready"):
            wrong = self._get_only(method)
            if wrong:
                return wrong
            ready = path.endswith("live") or self.server.ready()
            return _json(200 if ready else 503, {"live": True} if path.endswith("live") else {"ready": ready})
        match = _MODEL_ROUTE.match(path)
        if match is None:
            return _error(404, f"no route {path[:200]}; see GET /v2 and /v2/models/MODEL")
        model, version, tail = match["model"], match["version"], match["tail"]
        known = self.server.known(model, version)
        if known is not None:
            return _error(404, known)
        if tail == "/infer":
            if method != "POST":
                return _error(405, f"{path} takes POST")
            return await self.infer(request, model, version)
        wrong = self._get_only(method)
        if wrong:
            return wrong
        if tail == "/ready":
            return _json(200, {"name": model, "ready": True})
        face = self.server.face(model)
        return _json(200, oip.model_metadata(model, face.versions, "pytorch_aitune", face.inputs, face.outputs,
                                             {"batching": face.batching}))

    @staticmethod
    def _get_only(method: str):
        return None if method in ("GET", "HEAD") else _error(405, "this route takes GET")

    async def infer(self, request, model: str, version: str | None):
        from starlette.responses import Response

        from orchestrator.deploy.http_errors import BodyError

        with self.server.runner.arriving(model, version):
            try:
                raw = await self.server.read_body(request)
                header = request.headers.get("inference-header-content-length")
                if header is not None and not header.strip().isdigit():
                    raise oip.ProtocolError(f"Inference-Header-Content-Length {header[:40]!r} is not a number")
                parsed = oip.parse_infer_request(raw, int(header) if header is not None else None)
                face = self.server.face(model)
                args, kwargs = self.arguments(face, parsed.inputs)
                wanted = self.wanted(face, parsed)
                flat, answered = await self.server.runner.run(model, version, args, kwargs)
            except BodyError as exc:
                return _error(exc.code, str(exc))
            except oip.ProtocolError as exc:
                return _error(exc.status, str(exc))
            except Refused as exc:
                return _error(exc.code, str(exc))
        names = dict(zip(face.output_paths, oip.output_names(face.output_paths)))
        outputs = [(names.get(p, p), t) for p, t in flat]
        if wanted is not None:
            by_name = dict(outputs)
            outputs = [(w.name, by_name[w.name]) for w in wanted]
            binary = {w.name for w in wanted if w.binary}
        else:
            binary = {n for n, _ in outputs} if parsed.binary_output else set()
        try:
            body, headers = oip.encode_infer_response(model, answered, parsed.id, outputs, binary)
        except oip.ProtocolError as exc:  # an output the protocol has no datatype for
            return _error(exc.status, f"{model}: {exc}")
        return Response(body, status_code=200, headers=headers)

    @staticmethod
    def arguments(face: Face, inputs: dict[str, torch.Tensor]) -> tuple[tuple, dict]:
        names = [n for n, _, _ in face.inputs]
        unknown = [n for n in inputs if n not in names]
        if unknown:
            raise oip.ProtocolError(f"unknown input {unknown[0]!r}; the model takes {', '.join(names)}")
        missing = [n for n in names if n not in inputs]
        if missing:
            raise oip.ProtocolError(f"input {missing[0]!r} is missing; the model takes {', '.join(names)}")
        for name, datatype, shape in face.inputs:
            got = inputs[name]
            if oip.datatype_of(got.dtype) != datatype:
                raise oip.ProtocolError(f"input {name!r} is {oip.datatype_of(got.dtype)}; the model takes {datatype}")
            if len(got.shape) != len(shape) or any(d not in (-1, g) for d, g in zip(shape, got.shape)):
                raise oip.ProtocolError(f"input {name!r} has shape {list(got.shape)}; the model takes {shape}")
        args = tuple(inputs[n] for n in names[:face.positional])
        kwargs = {n: inputs[n] for n in names[face.positional:]}
        return args, kwargs

    @staticmethod
    def wanted(face: Face, parsed) -> list | None:
        if parsed.outputs is None:
            return None
        names = [n for n, _, _ in face.outputs]
        for w in parsed.outputs:
            if w.name not in names:
                raise oip.ProtocolError(f"unknown output {w.name!r}; the model gives {', '.join(names)}")
        return parsed.outputs


