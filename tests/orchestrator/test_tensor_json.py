"""Tensors as JSON for the HTTP API: round trips per dtype, one clear line for each bad tensor."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.deploy.tensor_json import TensorJsonError, decode, decode_outputs, decode_request, encode, encode_outputs, request


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32, torch.bool])
def test_a_tensor_round_trips_through_json_exactly(dtype):
    t = (torch.randn(2, 3, 4) * 10).to(dtype)
    again = decode(json.loads(json.dumps(encode(t))))
    assert again.dtype == dtype and torch.equal(again, t)


def test_half_precision_round_trips_through_float_values():
    t = torch.randn(5).to(torch.bfloat16)
    again = decode(json.loads(json.dumps(encode(t))))
    assert again.dtype == torch.bfloat16 and torch.equal(again, t)


def test_a_request_holds_the_positional_inputs_in_order():
    a, b = torch.randn(2, 2), torch.arange(3)
    got = decode_request(json.loads(json.dumps(request(a, b))))
    assert [g.shape for g in got] == [a.shape, b.shape] and torch.equal(got[0], a) and torch.equal(got[1], b)


def test_outputs_are_named_by_their_path_in_the_output():
    encoded = encode_outputs({"logits": torch.ones(2), "extra": (torch.zeros(1),)})
    by_path = {e["path"]: e for e in encoded}
    assert set(by_path) == {"output['logits']", "output['extra'][0]"}
    assert by_path["output['logits']"]["shape"] == [2] and by_path["output['extra'][0]"]["data"] == [0.0]
    assert sorted(t.numel() for t in decode_outputs({"outputs": encoded})) == [1, 2]


@pytest.mark.parametrize("body, message", [
    ([1, 2], 'the request body must be {"inputs": [TENSOR, ...]}'),
    ({"inputs": [[1, 2]]}, 'inputs[0]: a tensor is {"dtype": ..., "shape": [...], "data": [...]}'),
    ({"inputs": [{"dtype": "complex64", "shape": [1], "data": [1]}]}, "inputs[0]: unknown dtype 'complex64'"),
    ({"inputs": [{"dtype": "float32", "shape": [2, -1], "data": []}]}, "inputs[0]: shape must be a list of non-negative integers, got [2, -1]"),
    ({"inputs": [{"dtype": "float32", "shape": [2, 2], "data": [1, 2, 3]}]}, "inputs[0]: shape [2, 2] needs 4 values in data, got 3"),
    ({"inputs": [{"dtype": "int64", "shape": [1], "data": ["x"]}]}, "inputs[0]: data[0] is str, not a number"),
    ({"inputs": [{"dtype": ["float32"], "shape": [1], "data": [1]}]}, "inputs[0]: unknown dtype ['float32']"),
    ({"inputs": [{"dtype": {"a": 1}, "shape": [1], "data": [1]}]}, "inputs[0]: unknown dtype {'a': 1}"),
    ({"inputs": [{"dtype": "float32", "shape": [2], "data": [1.0, float("nan")]}]}, "inputs[0]: data[1] is nan; values must be finite"),
    ({"inputs": [{"dtype": "float32", "shape": [1], "data": [float("inf")]}]}, "inputs[0]: data[0] is inf; values must be finite"),
    ({"inputs": [{"dtype": "float32", "shape": [1], "data": [1e39]}]}, "inputs[0]: data[0] = 1e+39 is out of range for float32"),
    ({"inputs": [{"dtype": "int64", "shape": [1], "data": [2 ** 70]}]}, "inputs[0]: data can't be read as int64"),
    ({"inputs": [{"dtype": "float32", "shape": [1], "data": [[1.0]]}]}, "inputs[0]: data[0] is list, not a number"),
    ({"inputs": [{"dtype": "float32", "shape": [True], "data": [1.0]}]}, "inputs[0]: shape must be a list of non-negative integers"),
])
def test_a_bad_tensor_is_refused_in_one_line_naming_it(body, message):
    with pytest.raises(TensorJsonError) as info:
        decode_request(body)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_non_finite_outputs_are_sent_as_strict_json_strings_and_read_back():
    import json

    encoded = encode_outputs(torch.tensor([1.0, float("nan"), float("inf"), -float("inf")]))
    assert encoded[0]["data"][1:] == ["NaN", "Infinity", "-Infinity"]
    text = json.dumps({"outputs": encoded}, allow_nan=False)  # would raise on a bare NaN
    (back,) = decode_outputs(json.loads(text))
    assert back[0] == 1.0 and back[1].isnan() and back[2] == float("inf") and back[3] == -float("inf")
