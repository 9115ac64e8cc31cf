"""The Open Inference Protocol ("KServe v2", REST): the codec of its requests, responses and metadata.

The protocol of Triton, KServe and MLServer, so that their clients (``tritonclient.http``, curl)
talk to ``orchestrator.deploy.serve``, whose routes this module writes and reads the bodies of
(it holds no routes itself, and no Ray): ``GET /v2`` (:func:`server_metadata`),
``GET /v2/health/live`` and ``/v2/health/ready`` (a status only), ``GET /v2/models/{m}[/versions/{v}]``
(:func:`model_metadata`) and ``.../ready`` (a status only), ``POST /v2/models/{m}[/versions/{v}]/infer``
(:func:`parse_infer_request`, :func:`encode_infer_response`); a failure is ``{"error": "..."}``.

The subset: numeric tensors of the datatypes in :data:`DATATYPES` (BOOL, UINT8, INT8, INT16, INT32,
INT64, FP16, BF16, FP32, FP64); BYTES (strings), shared memory and classification are refused.
A tensor is ``{"name", "datatype", "shape", "data"}``, ``data`` its values in row-major order
(flat or nested lists in a request, flat in a response), or, with the binary tensor data extension,
``"parameters": {"binary_data_size": N}`` and N bytes (little-endian, row-major; BOOL one byte, 0
or 1; BF16 torch's two bytes) after the JSON, whose length the ``Inference-Header-Content-Length``
header gives. An output is sent as binary where its ``parameters.binary_data`` asks, else where
the request's ``parameters.binary_data_output`` does.

Non-finite values: a JSON number in a request must be finite and one the datatype holds (NaN,
Infinity, ``1e39`` for FP32, ``300`` for UINT8 are refused); binary data is taken as sent. In a
response, a non-finite value of an output sent as JSON is the string ``"NaN"``, ``"Infinity"`` or
``"-Infinity"`` (JSON has no such numbers; ``numpy.array(data, dtype)`` reads them back); an output
sent as binary carries them exactly.
"""

from __future__ import annotations

import ast
import ctypes
import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch

DATATYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FP16": torch.float16, "BF16": torch.bfloat16, "FP32": torch.float32, "FP64": torch.float64,
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
_UNSERVED = ("UINT16", "UINT32", "UINT64", "FP8", "BYTES")  # the protocol's other datatypes
HEADER_LENGTH = "Inference-Header-Content-Length"


class ProtocolError(ValueError):
    """A request that can't be served as sent; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, torch.Tensor]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool
    parameters: dict


def datatype_of(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise ValueError(f"{dtype} has no Open Inference Protocol datatype here; served: {', '.join(DATATYPES)}")
    return _NAMES[dtype]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


_KINDS = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}


def _kind(value: Any) -> str:  # the JSON name of a parsed value's type
    return _KINDS.get(type(value), "null")


def _split(body: bytes, header_length: int | str | None) -> tuple[bytes, memoryview | None]:
    if header_length is None:
        return body, None
    text = str(header_length).strip()
    if isinstance(header_length, bool) or not (text.isascii() and text.isdigit()):
        raise ProtocolError(f"the {HEADER_LENGTH} header must be a whole number of bytes, got {_short(header_length)}")
    if int(text) > len(body):
        raise ProtocolError(f"the {HEADER_LENGTH} header says {int(text)} bytes of JSON but the body has {len(body)}")
    return body[: int(text)], memoryview(body)[int(text):]


def _load(head: bytes) -> dict:
    try:
        request = json.loads(bytes(head))  # the same object when it is bytes already
    except RecursionError:
        raise ProtocolError("the request's JSON is nested too deep") from None
    except ValueError as exc:
        raise ProtocolError(f"the request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ProtocolError(f'the request must be a JSON object {{"inputs": [...]}}, got {_kind(request)}')
    return request


def _params(value: Any, where: str) -> dict:
    """Parameters, checked: a JSON object that asks for no extension this server lacks."""
    if not isinstance(value, (dict, type(None))):
        raise ProtocolError(f"{where}: parameters must be a JSON object, got {_kind(value)}")
    for key, what in (("shared_memory_region", "shared memory"), ("classification", "the classification extension")):
        if key in (value or {}):
            raise ProtocolError(f"{where}: {what} is not served here")
    return value or {}


def _flag(params: dict, key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"{where}: parameters.{key} must be true or false, got {_short(value)}")
    return value


def _requested(outputs: Any, binary_output: bool) -> list[RequestedOutput] | None:
    if outputs is None or outputs == []:
        return None
    if not isinstance(outputs, list):
        raise ProtocolError(f'outputs must be a list of {{"name": ..., "parameters": {{...}}}}, got {_kind(outputs)}')
    found: list[RequestedOutput] = []
    for i, spec in enumerate(outputs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError(f'outputs[{i}] must be {{"name": "...", "parameters": {{...}}}}, got {_short(spec)}')
        where = f"output {spec['name']!r}"
        params = _params(spec.get("parameters"), where)
        if any(r.name == spec["name"] for r in found):
            raise ProtocolError(f"{where} is requested twice")
        found.append(RequestedOutput(spec["name"], _flag(params, "binary_data", binary_output, where)))
    return found


def _header(spec: Any, i: int, seen: dict) -> tuple[str, str, list[int], dict]:
    """An input's name, datatype, shape and parameters, each checked."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ProtocolError(f'inputs[{i}] must be {{"name": "...", "datatype": ..., "shape": [...], "data": [...]}}')
    name, where = spec["name"], f"input {spec['name']!r}"
    if name in seen:
        raise ProtocolError(f"{where} is given twice")
    datatype = spec.get("datatype")
    if datatype == "BYTES":
        raise ProtocolError(f"{where}: datatype BYTES (strings) is not served; this server serves numeric tensors")
    if datatype not in DATATYPES:
        known = "not served here" if datatype in _UNSERVED else "unknown"
        raise ProtocolError(f"{where}: datatype {_short(datatype)} is {known}; served: {', '.join(DATATYPES)}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**63 for d in shape):
        raise ProtocolError(f"{where}: shape must be a list of non-negative integers, got {_short(shape)}")
    params = _params(spec.get("parameters"), where)
    if ("data" in spec) == ("binary_data_size" in params):
        raise ProtocolError(f"{where} needs exactly one of data or parameters.binary_data_size")
    return name, datatype, shape, params


def _flatten(data: Any, where: str) -> list:
    """``data``'s values in row-major order (nested lists flattened)."""
    if not isinstance(data, list):
        raise ProtocolError(f"{where}: data must be a list of values, got {_kind(data)}")
    if list not in set(map(type, data)):
        return data
    flat: list = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if type(value) is list:
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _bad(flat: list, hit: Any, where: str, what: str) -> ProtocolError:
    """The error for the value of ``flat`` at index ``hit``, or for its first value the test ``hit`` holds for."""
    i = hit if isinstance(hit, int) else next(i for i, v in enumerate(flat) if hit(v))
    return ProtocolError(f"{where}: value {i} of data (row-major) is {_short(flat[i])}, {what}")


def _from_json(where: str, datatype: str, shape: list[int], data: Any) -> torch.Tensor:
    flat, dtype = _flatten(data, where), DATATYPES[datatype]
    if len(flat) != math.prod(shape):
        raise ProtocolError(f"{where}: shape {shape} needs {math.prod(shape)} values, data has {len(flat)}")
    kinds = set(map(type, flat))
    if dtype is torch.bool:
        if kinds - {bool}:
            raise _bad(flat, lambda v: type(v) is not bool, where, "not true or false (BOOL)")
        return torch.tensor(flat, dtype=dtype).reshape(shape)
    if kinds - {int, float}:
        raise _bad(flat, lambda v: type(v) not in (int, float), where, f"not a number ({datatype})")
    if dtype.is_floating_point:
        if float in kinds and not all(map(math.isfinite, flat)):
            raise _bad(flat, lambda v: not math.isfinite(v), where, "not finite (non-finite values go as binary data)")
        try:
            tensor = torch.tensor(flat, dtype=dtype)  # a value the dtype cannot hold becomes inf: refused below
        except (OverflowError, RuntimeError):  # an integer too big even for a double
            raise _bad(flat, lambda v: abs(v) > sys.float_info.max, where, f"out of range for {datatype}") from None
        if not bool(torch.isfinite(tensor).all()):
            raise _bad(flat, int((~torch.isfinite(tensor)).nonzero()[0]), where, f"out of range for {datatype}")
        return tensor.reshape(shape)
    if float in kinds and not all(v.is_integer() for v in flat if type(v) is float):
        raise _bad(flat, lambda v: type(v) is float and not v.is_integer(), where, f"not an integer ({datatype})")
    values, lo, hi = [int(v) for v in flat] if float in kinds else flat, torch.iinfo(dtype).min, torch.iinfo(dtype).max
    if values and (min(values) < lo or max(values) > hi):
        raise _bad(flat, lambda v: not lo <= v <= hi, where, f"out of range for {datatype} ({lo}..{hi})")
    return torch.tensor(values, dtype=dtype).reshape(shape)


def _from_bytes(where: str, datatype: str, shape: list[int], blob: memoryview) -> torch.Tensor:
    dtype = DATATYPES[datatype]
    if len(blob) == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    if dtype is torch.bool and int(raw.max()) > 1:
        i = int((raw > 1).nonzero()[0])
        raise ProtocolError(f"{where}: byte {i} of its binary data is {int(raw[i])}; BOOL bytes are 0 or 1")
    return raw.view(dtype).reshape(shape)


def parse_infer_request(body: bytes, header_length: int | str | None) -> InferRequest:
    """An inference request's body, with the ``Inference-Header-Content-Length`` header's value
    (None when the request has none: the body is all JSON); :class:`ProtocolError` names what is wrong."""
    head, blobs = _split(body, header_length)
    request = _load(head)
    if request.get("id") is not None and not isinstance(request["id"], str):
        raise ProtocolError(f"the request's id must be a string, got {_short(request['id'])}")
    parameters = _params(request.get("parameters"), "the request")
    binary_output = _flag(parameters, "binary_data_output", False, "the request")
    outputs = _requested(request.get("outputs"), binary_output)
    if not isinstance(request.get("inputs"), list):
        raise ProtocolError(f'the request needs "inputs": a list of tensors, got {_kind(request.get("inputs"))}')
    inputs: dict[str, torch.Tensor] = {}
    offset, last = 0, None
    for i, spec in enumerate(request["inputs"]):
        name, datatype, shape, params = _header(spec, i, inputs)
        where = f"input {name!r}"
        if "data" in spec:
            inputs[name] = _from_json(where, datatype, shape, spec["data"])
            continue
        size, need = params["binary_data_size"], math.prod(shape) * DATATYPES[datatype].itemsize
        if type(size) is not int or size != need:
            raise ProtocolError(f"{where}: parameters.binary_data_size is {_short(size)}, "
                                f"but shape {shape} of {datatype} takes {need} bytes")
        if blobs is None:
            raise ProtocolError(f"{where} has binary data but the request has no {HEADER_LENGTH} header "
                                "(the length of its JSON part)")
        if offset + size > len(blobs):
            raise ProtocolError(f"{where}: its {size} bytes of binary data are missing; "
                                f"the body has {len(blobs) - offset} left after the JSON and the inputs before it")
        inputs[name] = _from_bytes(where, datatype, shape, blobs[offset: offset + size])
        offset, last = offset + size, name
    if blobs is not None and offset != len(blobs):
        after = f"the binary data of input {last!r}, its last" if last else "the JSON, and no input has binary data"
        raise ProtocolError(f"the body has {len(blobs) - offset} bytes left over after {after}")
    return InferRequest(request.get("id"), inputs, outputs, binary_output, parameters)


def _json_values(t: torch.Tensor) -> list:
    values = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).reshape(-1).tolist()
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        values = [x if math.isfinite(x) else "NaN" if math.isnan(x) else "Infinity" if x > 0 else "-Infinity"
                  for x in values]
    return values


def encode_infer_response(model: str, version: str | None, request_id: str | None,
                          outputs: list[tuple[str, torch.Tensor]], binary: set[str]) -> tuple[bytes, dict[str, str]]:
    """The body and headers of an inference response: the outputs named in ``binary`` as binary
    data after the JSON, the others as JSON values. An output whose dtype has no datatype is a
    :class:`ProtocolError` with status 500."""
    head: dict[str, Any] = {"model_name": model, "model_version": version, "id": request_id}
    head = {key: value for key, value in head.items() if value is not None}
    entries, blobs, any_binary = [], [], False
    for name, tensor in outputs:
        t = tensor.detach().cpu().contiguous()
        try:
            entry = {"name": name, "datatype": datatype_of(t.dtype), "shape": list(t.shape)}
        except ValueError as exc:
            raise ProtocolError(f"output {name!r}: {exc}", 500) from None
        if name in binary:
            blobs.append(ctypes.string_at(t.data_ptr(), t.nbytes) if t.nbytes else b"")  # row-major, little-endian
            entry["parameters"], any_binary = {"binary_data_size": len(blobs[-1])}, True
        else:
            entry["data"] = _json_values(t)
        entries.append(entry)
    head["outputs"] = entries
    text = json.dumps(head, allow_nan=False, separators=(",", ":")).encode()
    if not any_binary:
        return text, {"Content-Type": "application/json"}
    return b"".join([text, *blobs]), {HEADER_LENGTH: str(len(text)), "Content-Type": "application/octet-stream"}


_KEY = re.compile(r"""\[('(?:[^'\\]|\\.)+'|"(?:[^"\\]|\\.)+")\]""")  # a dict key's repr, not empty
_FIELD = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)")


def _stripped(path: str) -> str:
    """``output['logits'][0]`` -> ``logits[0]``, ``output.logits`` -> ``logits``; others as they are."""
    rest = path[len("output"):] if path.startswith("output") else ""
    key, field = _KEY.match(rest), _FIELD.match(rest)
    if key:
        return str(ast.literal_eval(key.group(1))) + rest[key.end():]
    return field.group(1) + rest[field.end():] if field else path


def output_names(paths: list[str]) -> list[str]:
    """The protocol's output names for the paths of ``aitune.torch.tree.flatten_tensors``: the
    first dict key or field stripped of ``output`` (``output['logits']`` -> ``logits``);
    ``output`` and ``output[0]`` as they are. A name two paths would share is the full path for
    both; if even that collides, every name is its full path."""
    if len(set(paths)) != len(paths):
        raise ValueError(f"output paths must be unique: {paths}")
    names = [_stripped(p) for p in paths]
    names = [p if names.count(n) > 1 else n for p, n in zip(paths, names)]
    return names if len(set(names)) == len(names) else list(paths)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def server_metadata(name: str, version: str, extensions: list[str]) -> dict:
    return {"name": name, "version": version, "extensions": list(extensions)}


def model_metadata(name: str, versions: list[str], platform: str, inputs: list[tuple[str, str, list[int]]],
                   outputs: list[tuple[str, str, list[int]]], parameters: dict | None = None) -> dict:
    """A model's metadata; a shape's ``-1`` is a dimension of any size."""
    found = {"name": name, "versions": list(versions), "platform": platform}
    for key, specs in (("inputs", inputs), ("outputs", outputs)):
        found[key] = [{"name": n, "datatype": d, "shape": list(s)} for n, d, s in specs]
    return found if parameters is None else {**found, "parameters": dict(parameters)}
