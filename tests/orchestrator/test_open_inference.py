"""The Open Inference Protocol codec: round trips through tritonclient's own encoder and decoder,
hand-built JSON and binary bodies, one clear line (and a status) for each bad request, output names."""

from __future__ import annotations

import json
import math

import pytest
import torch

from orchestrator.deploy.open_inference import (
    DATATYPES,
    InferRequest,
    ProtocolError,
    RequestedOutput,
    datatype_of,
    encode_infer_response,
    error_body,
    model_metadata,
    output_names,
    parse_infer_request,
    server_metadata,
)

HEADER = "Inference-Header-Content-Length"


def _body(*inputs: dict, **extra) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes, row-major and little-endian, built with torch alone."""
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())


def _sample(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """Values that ``dtype`` holds: normal ones for floats, small integers, both booleans."""
    if dtype.is_floating_point:
        return torch.randn(*shape).to(dtype) * 50
    low, high = {torch.bool: (0, 2), torch.uint8: (0, 256)}.get(dtype, (-100, 100))
    return torch.randint(low, high, shape).to(dtype)


def _split(body: bytes, headers: dict[str, str]) -> tuple[dict, bytes]:
    n = int(headers[HEADER]) if HEADER in headers else len(body)
    return json.loads(body[:n]), body[n:]


# --- pure: datatypes, hand-built requests and responses ------------------------------------------

def test_every_datatype_maps_to_a_torch_dtype_and_back():
    assert list(DATATYPES) == ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64"]
    assert all(datatype_of(dtype) == name for name, dtype in DATATYPES.items())
    with pytest.raises(ValueError, match="complex64 has no Open Inference Protocol datatype"):
        datatype_of(torch.complex64)


def test_a_json_request_reads_nested_or_flat_data_in_row_major_order():
    body = _body({"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4.5, 5, 6]]},
                 {"name": "m", "shape": [3], "datatype": "BOOL", "data": [True, False, True]},
                 {"name": "h", "shape": [2], "datatype": "FP16", "data": [0.5, 2]},
                 {"name": "b", "shape": [1, 2], "datatype": "BF16", "data": [[1.5], [-3]]},
                 {"name": "i", "shape": [2], "datatype": "INT64", "data": [-(2**63), 2**63 - 1]},
                 {"name": "u", "shape": [2], "datatype": "UINT8", "data": [255, 3.0]},
                 {"name": "e", "shape": [0, 4], "datatype": "INT8", "data": []},
                 id="r-7", parameters={"priority": 1})
    got = parse_infer_request(body, None)
    assert list(got.inputs) == ["x", "m", "h", "b", "i", "u", "e"] and got.id == "r-7"
    assert torch.equal(got.inputs["x"], torch.tensor([[1, 2, 3], [4.5, 5, 6]]))
    assert torch.equal(got.inputs["m"], torch.tensor([True, False, True]))
    assert torch.equal(got.inputs["h"], torch.tensor([0.5, 2], dtype=torch.float16))
    assert torch.equal(got.inputs["b"], torch.tensor([[1.5, -3]], dtype=torch.bfloat16))
    assert torch.equal(got.inputs["i"], torch.tensor([-(2**63), 2**63 - 1]))
    assert torch.equal(got.inputs["u"], torch.tensor([255, 3], dtype=torch.uint8))
    assert got.inputs["e"].shape == (0, 4) and got.inputs["e"].dtype == torch.int8
    assert got.outputs is None and got.binary_output is False and got.parameters == {"priority": 1}


def test_requested_outputs_take_the_request_binary_default_unless_they_say():
    body = _body({"name": "x", "shape": [1], "datatype": "INT32", "data": [1]},
                 outputs=[{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}],
                 parameters={"binary_data_output": True})
    got = parse_infer_request(body, None)
    assert got.outputs == [RequestedOutput("a", True), RequestedOutput("b", False)] and got.binary_output
    assert got.id is None
    assert parse_infer_request(_body(outputs=[]), None) == InferRequest(None, {}, None, False, {})


def test_a_binary_request_reads_every_datatype_exactly_bf16_and_non_finite_values_too():
    tensors = {name: _sample(dtype, 2, 3) for name, dtype in DATATYPES.items()}
    tensors["FP32"][0, 0], tensors["BF16"][1, 2] = math.nan, -math.inf  # binary carries them as sent
    specs = [{"name": f"in-{n}", "shape": [2, 3], "datatype": n, "parameters": {"binary_data_size": t.nbytes}}
             for n, t in tensors.items()]
    head = json.dumps({"inputs": specs}).encode()
    got = parse_infer_request(head + b"".join(_raw(t) for t in tensors.values()), str(len(head)))
    for name, t in tensors.items():
        assert got.inputs[f"in-{name}"].dtype == t.dtype and got.inputs[f"in-{name}"].shape == (2, 3)
        assert torch.equal(got.inputs[f"in-{name}"].view(torch.uint8), t.view(torch.uint8))
    assert tensors["BF16"].element_size() == 2


def test_a_memoryview_body_reads_like_bytes():
    head = _body({"name": "x", "shape": [1], "datatype": "INT8", "parameters": {"binary_data_size": 1}})
    got = parse_infer_request(memoryview(head + b"\xff"), len(head))
    assert torch.equal(got.inputs["x"], torch.tensor([-1], dtype=torch.int8))
    assert parse_infer_request(memoryview(_body()), None).inputs == {}


def test_json_and_binary_inputs_mix_and_an_empty_blob_is_an_empty_tensor():
    y = torch.arange(4, dtype=torch.int16)
    head = _body({"name": "x", "shape": [2], "datatype": "FP64", "data": [1, 2]},
                 {"name": "y", "shape": [4], "datatype": "INT16", "parameters": {"binary_data_size": 8}},
                 {"name": "z", "shape": [0], "datatype": "FP32", "parameters": {"binary_data_size": 0}},
                 {"name": "w", "shape": [1], "datatype": "BOOL", "parameters": {"binary_data_size": 1}})
    got = parse_infer_request(head + _raw(y) + b"\x01", len(head))
    assert torch.equal(got.inputs["x"], torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert torch.equal(got.inputs["y"], y) and got.inputs["z"].shape == (0,)
    assert torch.equal(got.inputs["w"], torch.tensor([True]))


def test_a_json_response_holds_flat_values_and_names_non_finite_ones():
    body, headers = encode_infer_response("net", None, None, [
        ("logits", torch.tensor([[1.0, math.nan], [math.inf, -math.inf]])),
        ("mask", torch.tensor([True, False])), ("h", torch.tensor([0.5], dtype=torch.bfloat16))], set())
    assert headers == {"Content-Type": "application/json"}
    assert json.loads(body) == {"model_name": "net", "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [2, 2], "data": [1.0, "NaN", "Infinity", "-Infinity"]},
        {"name": "mask", "datatype": "BOOL", "shape": [2], "data": [True, False]},
        {"name": "h", "datatype": "BF16", "shape": [1], "data": [0.5]}]}


def test_a_binary_response_puts_the_blobs_after_the_json_bf16_two_bytes_a_value():
    b = torch.tensor([1.5, -2.25, math.nan], dtype=torch.bfloat16)
    i = torch.arange(6, dtype=torch.int64).reshape(2, 3).t()  # not contiguous: sent row-major
    body, headers = encode_infer_response("net", "v0002", "r1", [("b", b), ("j", torch.ones(1)), ("i", i)], {"b", "i"})
    assert headers["Content-Type"] == "application/octet-stream"
    head, blobs = _split(body, headers)
    assert head["model_name"] == "net" and head["model_version"] == "v0002" and head["id"] == "r1"
    assert [o.get("parameters") for o in head["outputs"]] == [{"binary_data_size": 6}, None, {"binary_data_size": 48}]
    assert "data" not in head["outputs"][0] and head["outputs"][1]["data"] == [1.0]
    assert blobs == _raw(b) + _raw(i.contiguous())
    bits = torch.tensor([1.5, -2.25]).view(torch.int32) >> 16  # bf16: the top half of the fp32 bits
    assert blobs[:4] == b"".join(int(x & 0xFFFF).to_bytes(2, "little") for x in bits)


def test_an_output_dtype_without_a_datatype_is_a_server_error():
    with pytest.raises(ProtocolError, match=r"output 'z': torch.complex64 has no") as info:
        encode_infer_response("net", None, None, [("z", torch.zeros(1, dtype=torch.complex64))], set())
    assert info.value.status == 500


def test_errors_and_metadata_bodies():
    assert json.loads(error_body('no model "x"')) == {"error": 'no model "x"'}
    assert ProtocolError("bad").status == 400 and ProtocolError("gone", 404).status == 404
    assert server_metadata("aitune", "0.1", ["binary_tensor_data"]) == {
        "name": "aitune", "version": "0.1", "extensions": ["binary_tensor_data"]}
    meta = model_metadata("net", ["1"], "pytorch_torchscript", [("x", "FP32", [-1, 16])], [("logits", "FP32", [-1, 4])])
    assert meta == {"name": "net", "versions": ["1"], "platform": "pytorch_torchscript",
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
                    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 4]}]}
    assert model_metadata("n", [], "p", [], [], {"backend": "tensorrt"})["parameters"] == {"backend": "tensorrt"}


@pytest.mark.parametrize("paths, names", [
    (["output"], ["output"]),
    (["output['logits']", "output['hidden']"], ["logits", "hidden"]),
    (["output.logits", "output.past[0]"], ["logits", "past[0]"]),
    (["output[0]", "output[1]"], ["output[0]", "output[1]"]),
    (["output['a'][0]", "output['a'][1]", "output['b']['c']"], ["a[0]", "a[1]", "b['c']"]),
    (['output["it\'s"]'], ["it's"]),
    (["output['']"], ["output['']"]),
    (["output['a']", "output.a", "output['b']"], ["output['a']", "output.a", "b"]),  # "a" twice: full paths
    (["output['output[0]']", "output[0]"], ["output['output[0]']", "output[0]"]),
])
def test_output_names_strip_the_root_unless_names_would_collide(paths, names):
    assert output_names(paths) == names


# --- pure: every bad request, one line naming what is wrong --------------------------------------

def _in(name="x", shape=(2,), datatype="FP32", **fields) -> dict:
    return {"name": name, "shape": list(shape), "datatype": datatype, **fields}


def _data(values, datatype="FP32", shape=None) -> bytes:
    return _body(_in(shape=[len(values)] if shape is None else shape, datatype=datatype, data=values))


BAD_JSON = [
    (b"{nope", "the request is not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "the request's JSON is nested too deep"),
    (b"[1]", 'the request must be a JSON object {"inputs": [...]}, got a list'),
    (b"{}", 'the request needs "inputs": a list of tensors, got null'),
    (_body(3), 'inputs[0] must be {"name": "...", "datatype"'),
    (_body(_in(data=[1, 2]), _in(data=[3, 4])), "input 'x' is given twice"),
    (_body(_in(datatype="BYTES", data=["a", "b"])),
     "input 'x': datatype BYTES (strings) is not served; this server serves numeric tensors"),
    (_body(_in(datatype="FLOAT", data=[1, 2])), "input 'x': datatype 'FLOAT' is unknown; served: BOOL, UINT8"),
    (_body(_in(datatype="UINT32", data=[1, 2])), "input 'x': datatype 'UINT32' is not served here"),
    (_body(_in(shape=[2, -1], data=[])), "input 'x': shape must be a list of non-negative integers, got [2, -1]"),
    (_body(_in(shape=[True], data=[1.0])), "input 'x': shape must be a list of non-negative integers"),
    (_body(_in(data=[1, 2], parameters={"binary_data_size": 8})),
     "input 'x' needs exactly one of data or parameters.binary_data_size"),
    (_body(_in()), "input 'x' needs exactly one of data"),
    (_body(_in(data=3)), "input 'x': data must be a list of values, got a number"),
    (_data([1, 2, 3], shape=[2, 2]), "input 'x': shape [2, 2] needs 4 values, data has 3"),
    (_data([[1, 2], [3]], shape=[2, 2]), "input 'x': shape [2, 2] needs 4 values, data has 3"),
    (_data([1, "2"]), "input 'x': value 1 of data (row-major) is '2', not a number (FP32)"),
    (_data([1, True]), "input 'x': value 1 of data (row-major) is True, not a number (FP32)"),
    (_data([1, None], "INT32"), "input 'x': value 1 of data (row-major) is None, not a number (INT32)"),
    (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, NaN]}]}',
     "input 'x': value 1 of data (row-major) is nan, not finite (non-finite values go as binary data)"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [-Infinity]}]}',
     "input 'x': value 0 of data (row-major) is -inf, not finite"),
    (_data([1, 1e400]), "input 'x': value 1 of data (row-major) is inf, not finite"),
    (_data([0.0, 1e39]), "input 'x': value 1 of data (row-major) is 1e+39, out of range for FP32"),
    (_data([70000], "FP16"), "input 'x': value 0 of data (row-major) is 70000, out of range for FP16"),
    (_data([1, 10**400], "FP64"), "input 'x': value 1 of data (row-major) is 1000000000"),
    (_data([300], "UINT8"), "input 'x': value 0 of data (row-major) is 300, out of range for UINT8 (0..255)"),
    (_data([0, -1], "UINT8"), "input 'x': value 1 of data (row-major) is -1, out of range for UINT8 (0..255)"),
    (_data([2**63], "INT64"), "input 'x': value 0 of data (row-major) is 9223372036854775808, out of range for INT64"),
    (_data([1e19], "INT64"), "input 'x': value 0 of data (row-major) is 1e+19, out of range for INT64"),
    (_data([1.5], "INT32"), "input 'x': value 0 of data (row-major) is 1.5, not an integer (INT32)"),
    (_data([True, 1], "BOOL"), "input 'x': value 1 of data (row-major) is 1, not true or false (BOOL)"),
    (_body(_in(data=[1, 2]), id=7), "the request's id must be a string, got 7"),
    (_body(parameters=[1]), "the request: parameters must be a JSON object, got a list"),
    (_body(parameters={"binary_data_output": "yes"}),
     "the request: parameters.binary_data_output must be true or false, got 'yes'"),
    (_body(outputs={"name": "y"}), 'outputs must be a list of {"name": ..., "parameters": {...}}, got an object'),
    (_body(outputs=[{"parameters": {}}]), 'outputs[0] must be {"name": "...", "parameters": {...}}'),
    (_body(outputs=[{"name": "y"}, {"name": "y"}]), "output 'y' is requested twice"),
    (_body(outputs=[{"name": "y", "parameters": {"binary_data": 1}}]),
     "output 'y': parameters.binary_data must be true or false, got 1"),
    (_body(outputs=[{"name": "y", "parameters": {"classification": 3}}]),
     "output 'y': the classification extension is not served"),
    (_body(outputs=[{"name": "y", "parameters": {"shared_memory_region": "r"}}]),
     "output 'y': shared memory is not served"),
    (_body(_in(parameters={"shared_memory_region": "r", "shared_memory_byte_size": 8})),
     "input 'x': shared memory is not served"),
    (_body(_in(data=[1, 2], parameters=[])), "input 'x': parameters must be a JSON object, got a list"),
]


@pytest.mark.parametrize("body, message", BAD_JSON)
def test_a_bad_json_request_is_refused_in_one_line_naming_what_is_wrong(body, message):
    with pytest.raises(ProtocolError) as info:
        parse_infer_request(body, None)
    assert str(info.value).startswith(message) and "\n" not in str(info.value) and info.value.status == 400


_HEAD = _body(_in("x", [2], "FP32", parameters={"binary_data_size": 8}),
              _in("y", [1], "INT64", parameters={"binary_data_size": 8}))
_BLOBS = _raw(torch.tensor([1.0, 2.0])) + _raw(torch.tensor([3]))


def _bin(spec: dict, blob: bytes) -> tuple[bytes, int]:
    """A request of one input and the bytes after its JSON, with the JSON's length."""
    head = _body(spec)
    return head + blob, len(head)


BAD_BINARY = [
    (_HEAD + _BLOBS, "abc", "the Inference-Header-Content-Length header must be a whole number of bytes, got 'abc'"),
    (_HEAD + _BLOBS, -1, "the Inference-Header-Content-Length header must be a whole number of bytes, got -1"),
    (_HEAD + _BLOBS, 10**6,
     f"the Inference-Header-Content-Length header says 1000000 bytes of JSON but the body has {len(_HEAD) + 16}"),
    (_HEAD + _BLOBS, None, "the request is not JSON"),
    (_HEAD, None, "input 'x' has binary data but the request has no Inference-Header-Content-Length header"),
    (_HEAD + _BLOBS[:12], len(_HEAD), "input 'y': its 8 bytes of binary data are missing; the body has 4 left"),
    (_HEAD + _BLOBS + b"\0" * 3, len(_HEAD),
     "the body has 3 bytes left over after the binary data of input 'y', its last"),
    (*_bin(_in(data=[1, 2]), b"\0"), "the body has 1 bytes left over after the JSON, and no input has binary data"),
    (*_bin(_in("x", [4], parameters={"binary_data_size": 12}), b"\0" * 12),
     "input 'x': parameters.binary_data_size is 12, but shape [4] of FP32 takes 16 bytes"),
    (*_bin(_in("x", [1], parameters={"binary_data_size": "4"}), b"\0" * 4),
     "input 'x': parameters.binary_data_size is '4', but shape [1] of FP32 takes 4 bytes"),
    (*_bin(_in("m", [3], "BOOL", parameters={"binary_data_size": 3}), b"\1\2\0"),
     "input 'm': byte 1 of its binary data is 2; BOOL bytes are 0 or 1"),
]


@pytest.mark.parametrize("body, header_length, message", BAD_BINARY)
def test_a_bad_binary_request_is_refused_in_one_line_naming_the_input(body, header_length, message):
    with pytest.raises(ProtocolError) as info:
        parse_infer_request(body, header_length)
    assert str(info.value).startswith(message) and "\n" not in str(info.value) and info.value.status == 400


def test_the_header_length_may_be_the_whole_body_and_a_string():
    whole = _data([1, 2])
    assert torch.equal(parse_infer_request(whole, str(len(whole))).inputs["x"], torch.tensor([1.0, 2.0]))
    got = parse_infer_request(_HEAD + _BLOBS, f" {len(_HEAD)} ")
    assert torch.equal(got.inputs["x"], torch.tensor([1.0, 2.0])) and torch.equal(got.inputs["y"], torch.tensor([3]))


# --- through tritonclient's own encoder and decoder ----------------------------------------------

@pytest.fixture
def triton():
    return pytest.importorskip("tritonclient.http", reason="tritonclient[http] (the test extra) is not installed")


def _through_triton(http, inputs, outputs=None, request_id=""):
    """tritonclient's request body, parsed here, answered with each input as the output of its name."""
    body, json_size = http.InferenceServerClient.generate_request_body(inputs, outputs=outputs, request_id=request_id)
    request = parse_infer_request(body, json_size)
    wanted = request.outputs or [RequestedOutput(n, request.binary_output) for n in request.inputs]
    answer = [(o.name, request.inputs[o.name]) for o in wanted]
    body, headers = encode_infer_response("echo", "1", request.id, answer, {o.name for o in wanted if o.binary})
    length = headers.get(HEADER)
    return request, http.InferResult.from_response_body(body, header_length=None if length is None else int(length))


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
@pytest.mark.parametrize("datatype", ["FP32", "FP16", "FP64", "INT64", "INT32", "INT16", "INT8", "BOOL", "UINT8"])
def test_each_datatype_round_trips_through_tritonclient(triton, datatype, binary_in, binary_out):
    t = _sample(DATATYPES[datatype], 2, 3, 4)
    sent = t.numpy()
    data = triton.InferInput("t", list(sent.shape), datatype).set_data_from_numpy(sent, binary_data=binary_in)
    request, result = _through_triton(triton, [data], [triton.InferRequestedOutput("t", binary_data=binary_out)])
    assert request.inputs["t"].dtype == t.dtype and torch.equal(request.inputs["t"], t)
    back = result.as_numpy("t")
    assert back.dtype == sent.dtype and back.shape == sent.shape and (back == sent).all()
    assert ("parameters" in result.get_output("t")) == binary_out


def test_mixed_inputs_a_subset_of_outputs_and_the_id_through_tritonclient(triton):
    np = pytest.importorskip("numpy")
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[7, -8]], dtype=np.int64)
    m, u = np.array([True, False, True]), np.array([0, 255], dtype=np.uint8)
    inputs = [triton.InferInput("a", [2, 3], "FP32").set_data_from_numpy(a, binary_data=True),
              triton.InferInput("b", [1, 2], "INT64").set_data_from_numpy(b, binary_data=False),
              triton.InferInput("m", [3], "BOOL").set_data_from_numpy(m, binary_data=True),
              triton.InferInput("u", [2], "UINT8").set_data_from_numpy(u, binary_data=False)]
    outputs = [triton.InferRequestedOutput("m", binary_data=False), triton.InferRequestedOutput("a", binary_data=True)]
    request, result = _through_triton(triton, inputs, outputs, request_id="req-42")
    assert list(request.inputs) == ["a", "b", "m", "u"] and request.id == "req-42"
    assert request.outputs == [RequestedOutput("m", False), RequestedOutput("a", True)]
    response = result.get_response()
    assert response["id"] == "req-42" and response["model_name"] == "echo" and response["model_version"] == "1"
    assert [o["name"] for o in response["outputs"]] == ["m", "a"]
    assert (result.as_numpy("a") == a).all() and (result.as_numpy("m") == m).all() and result.as_numpy("b") is None


def test_no_requested_outputs_means_all_of_them_as_binary_through_tritonclient(triton):
    np = pytest.importorskip("numpy")
    x = np.array([1.0, np.nan, -np.inf], dtype=np.float32)
    request, result = _through_triton(triton, [triton.InferInput("x", [3], "FP32").set_data_from_numpy(x)])
    assert request.outputs is None and request.binary_output and "id" not in result.get_response()
    assert result.get_output("x")["parameters"] == {"binary_data_size": 12}
    np.testing.assert_array_equal(result.as_numpy("x"), x)


def test_non_finite_json_outputs_read_back_through_tritonclient(triton):
    np = pytest.importorskip("numpy")
    y = torch.tensor([0.5, math.nan, math.inf, -math.inf])
    body, headers = encode_infer_response("net", None, None, [("y", y)], set())
    result = triton.InferResult.from_response_body(body, header_length=headers.get(HEADER))
    np.testing.assert_array_equal(result.as_numpy("y"), np.array([0.5, np.nan, np.inf, -np.inf], dtype=np.float32))


def test_bf16_round_trips_through_tritonclient_as_binary(triton):
    np = pytest.importorskip("numpy")
    from tritonclient.utils import triton_to_np_dtype

    bf16 = triton_to_np_dtype("BF16")
    if bf16 is None or np.dtype(bf16).itemsize != 2:
        pytest.skip("this tritonclient has no numpy bfloat16 (ml_dtypes); the hand-built BF16 tests cover it")
    t = torch.tensor([[1.5, -2.25, 3e38], [0.0, -0.0, 1e-3]], dtype=torch.bfloat16)
    sent = np.frombuffer(_raw(t), dtype=bf16).reshape(2, 3)
    data = triton.InferInput("t", [2, 3], "BF16").set_data_from_numpy(sent, binary_data=True)
    request, result = _through_triton(triton, [data], [triton.InferRequestedOutput("t", binary_data=True)])
    assert request.inputs["t"].dtype == torch.bfloat16 and torch.equal(request.inputs["t"], t)
    assert result.as_numpy("t").tobytes() == _raw(t)
