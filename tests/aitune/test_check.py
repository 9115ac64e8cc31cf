"""Comparing candidate outputs with the eager fp32 reference."""

from __future__ import annotations

import json
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch

from aitune.check import (
    DEFAULT_TOLERANCES,
    CheckResult,
    Tolerance,
    check_samples,
    compare_outputs,
    tolerance_for,
)

FP32 = DEFAULT_TOLERANCES["float32"]


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_exact_match_is_ok():
    ref = (rand(2, 3), {"logits": rand(4, seed=1)})
    result = compare_outputs(ref, (ref[0].clone(), {"logits": ref[1]["logits"].clone()}), FP32)
    assert result.ok
    assert result.reason is None
    assert result.max_abs_err == 0.0 and result.max_rel_err == 0.0
    assert result.tolerance == FP32


def test_wrong_value_fails_naming_path_and_index():
    ref = (rand(2, 3), rand(2, 3, seed=1))
    bad = ref[1].clone()
    bad[1, 2] += 0.5
    result = compare_outputs(ref, (ref[0], bad), FP32)
    assert not result.ok
    assert result.worst_path == "output[1]"
    assert result.worst_index == [1, 2]
    assert result.max_abs_err == pytest.approx(0.5)
    assert result.max_rel_err == pytest.approx(0.5 / abs(float(ref[1][1, 2])))
    assert result.reason.startswith("output[1]: max abs error 0.5 at (1, 2) exceeds atol 0.0001 + rtol 0.001*|ref|")
    assert "1 of 6 elements" in result.reason


def test_small_error_within_tolerance_passes_and_reports_where_it_was():
    ref = rand(3, 4)
    cand = ref.clone()
    cand[2, 1] += 5e-5
    result = compare_outputs(ref, cand, FP32)
    assert result.ok
    assert result.worst_path == "output"
    assert result.worst_index == [2, 1]
    assert 0 < result.max_abs_err < 1e-4


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_candidate_fails(value):
    ref = {"logits": rand(2, 3)}
    cand = {"logits": ref["logits"].clone()}
    cand["logits"][0, 1] = value
    cand["logits"][1, 0] = value
    cand["logits"][1, 2] = value
    result = compare_outputs(ref, cand, FP32)
    assert not result.ok
    assert result.worst_path == "output['logits']"
    assert result.worst_index == [0, 1]
    assert result.reason.startswith("output['logits']: 3 NaN/Inf values")


def test_non_finite_reference_must_be_matched():
    ref = torch.tensor([1.0, float("nan"), float("inf")])
    assert compare_outputs(ref, ref.clone(), FP32).ok
    result = compare_outputs(ref, torch.tensor([1.0, 0.0, float("inf")]), FP32)
    assert not result.ok
    assert result.worst_index == [1]
    assert "differ from the reference's NaN/Inf" in result.reason


Pair = namedtuple("Pair", "first second")


@dataclass
class Encoded:
    hidden: torch.Tensor
    note: str = "enc"


class Holder:
    def __init__(self, feat: torch.Tensor):
        self.feat = feat
        self.steps = 3


def nested(a, b, c, d):
    return ({"logits": a, "enc": Encoded(b)}, Pair(c, Holder(d)))


def test_nested_outputs_are_walked_and_the_worst_path_reported():
    parts = [rand(2, 2, seed=i) for i in range(4)]
    ref = nested(*parts)
    b, d = parts[1].clone(), parts[3].clone()
    b[0, 1] += 0.1
    d[1, 1] += 0.3
    result = compare_outputs(ref, nested(parts[0], b, parts[2], d), FP32)
    assert not result.ok
    assert result.worst_path == "output[1][1].feat"
    assert result.worst_index == [1, 1]
    assert result.reason.startswith("output[1][1].feat:")
    assert result.max_abs_err == pytest.approx(0.3)

    b[0, 1] += 1.0  # now the dataclass field is worse
    result = compare_outputs(ref, nested(parts[0], b, parts[2], d), FP32)
    assert result.worst_path == "output[0]['enc'].hidden"
    assert result.worst_index == [0, 1]


def test_shape_mismatch():
    ref = (rand(2, 3), rand(2, 4))
    result = compare_outputs(ref, (ref[0], rand(2, 3)), FP32)
    assert not result.ok
    assert result.worst_path == "output[1]"
    assert result.reason == "output[1]: shape (2, 3) != reference (2, 4)"


def test_structure_mismatch():
    ref = {"logits": rand(2), "hidden": rand(2)}
    missing = compare_outputs(ref, {"logits": ref["logits"]}, FP32)
    assert not missing.ok
    assert missing.worst_path == "output['hidden']"
    assert missing.reason.startswith("output['hidden']: reference tensor missing")

    extra = compare_outputs(ref, {**ref, "extra": rand(2)}, FP32)
    assert not extra.ok
    assert extra.reason.startswith("output['extra']: tensor not in the reference")

    as_tuple = compare_outputs((rand(2),), [rand(2), rand(2)], FP32)
    assert not as_tuple.ok and as_tuple.worst_path == "output[1]"

    none_instead = compare_outputs((rand(2), rand(2)), (rand(2), None), FP32)
    assert not none_instead.ok and none_instead.worst_path == "output[1]"

    # as many tensors, laid out otherwise: the reason says where the candidate's are
    renamed = compare_outputs((rand(2),), {"y": rand(2)}, FP32)
    assert renamed.reason == ("output[0]: reference tensor missing from the candidate (candidate has 1 tensors, "
                              "reference 1; the candidate's are at output['y'])")


def test_non_tensor_leaves_must_match():
    t = rand(3)
    assert compare_outputs({"x": t, "n": 3, "s": "a", "z": None}, {"x": t, "n": 3, "s": "a", "z": None}, FP32).ok
    result = compare_outputs({"x": t, "n": 3}, {"x": t, "n": 4}, FP32)
    assert not result.ok
    assert result.worst_path == "output['n']"
    assert result.reason == "output['n']: 4 != reference 3"
    # The attribute of an object holding tensors counts as a leaf as well.
    different = Holder(t)
    different.steps = 4
    assert compare_outputs(Holder(t), different, FP32).worst_path == "output.steps"


def test_fp16_candidate_passes_fp16_tolerance_but_not_fp32():
    x = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference = (x + 10) - 10
    candidate = (x.half() + 10) - 10  # rounding at the magnitude of 10 loses about 4e-3
    assert candidate.dtype == torch.float16

    fp16 = compare_outputs(reference, candidate, tolerance_for("float16"))
    assert fp16.ok, fp16.reason
    fp32 = compare_outputs(reference, candidate, tolerance_for("float32"))
    assert not fp32.ok
    assert fp16.max_abs_err == fp32.max_abs_err > 1e-4


def test_bf16_candidate_passes_bf16_tolerance():
    ref = rand(64, 64)
    assert compare_outputs(ref, ref.bfloat16(), tolerance_for("bf16")).ok


def test_tolerance_aliases():
    assert tolerance_for("fp32") == tolerance_for("float32") == Tolerance(1e-4, 1e-3)
    assert tolerance_for("fp16") == tolerance_for(torch.float16) == Tolerance(1e-2, 1e-2)
    assert tolerance_for("bf16") == tolerance_for("bfloat16") == Tolerance(5e-2, 5e-2)
    assert tolerance_for("tf32") == Tolerance(1e-2, 1e-2)


def test_tolerance_overrides():
    assert tolerance_for("fp16", {"float16": {"atol": 0.5}}) == Tolerance(0.5, 1e-2)
    assert tolerance_for("float16", {"fp16": {"rtol": 0.2}}) == Tolerance(1e-2, 0.2)
    assert tolerance_for("bf16", {"bfloat16": Tolerance(1.0, 2.0)}) == Tolerance(1.0, 2.0)
    assert tolerance_for("float32", {"float16": {"atol": 0.5}}) == DEFAULT_TOLERANCES["float32"]
    assert tolerance_for("int8", {"int8": {"atol": 1, "rtol": 0}}) == Tolerance(1.0, 0.0)

    with pytest.raises(ValueError, match="unknown keys"):
        tolerance_for("fp16", {"fp16": {"atl": 0.5}})
    with pytest.raises(ValueError, match="float32"):
        tolerance_for("int8")
    with pytest.raises(ValueError, match="int8"):
        tolerance_for("int8", {"int8": {"atol": 1}})
    with pytest.raises(ValueError, match="atol"):
        Tolerance(-1.0, 0.0)


def test_check_result_round_trips_through_json():
    ref = rand(2, 3)
    bad = ref.clone()
    bad[0, 2] = 9.0
    result = compare_outputs(ref, bad, FP32)
    again = CheckResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result
    assert again.worst_index == [0, 2]


def test_check_samples_prefixes_paths_and_keeps_the_first_failure():
    refs = [(rand(3, seed=i),) for i in range(3)]
    cands = [(r[0].clone(),) for r in refs]
    assert check_samples(refs, cands, FP32).ok

    cands[1][0][2] += 0.5
    cands[2][0][0] += 2.0
    result = check_samples(refs, cands, FP32)
    assert not result.ok
    assert result.worst_path == "sample[1].output[0]"
    assert result.worst_index == [2]
    assert result.reason.startswith("sample[1].output[0]: max abs error 0.5")
    assert result.max_abs_err == pytest.approx(2.0)  # worst over all samples


def test_check_samples_reports_the_largest_error_when_all_pass():
    refs = [rand(3, seed=i) for i in range(3)]
    cands = [r.clone() for r in refs]
    cands[2][1] += 5e-5
    result = check_samples(refs, cands, FP32)
    assert result.ok
    assert result.worst_path == "sample[2].output"
    assert result.max_abs_err == pytest.approx(5e-5, rel=1e-3)


def test_check_samples_needs_one_output_per_sample():
    result = check_samples([rand(2), rand(2)], [rand(2)], FP32)
    assert not result.ok
    assert "1 candidate outputs for 2 reference samples" in result.reason
    with pytest.raises(ValueError):
        check_samples([], [], FP32)
