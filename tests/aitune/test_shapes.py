"""aitune.shapes: buckets, padding up to a bucket and slicing back, tracing the outputs that follow
an axis, the lengths padding is checked at, and the padding check itself on real models."""

from __future__ import annotations

import pytest
import torch

from aitune.check import compare_outputs, tolerance_for
from aitune.examples import small_encoder, token_tagger
from aitune.shapes import (
    Axis,
    Shapes,
    ShapeError,
    at,
    held_out_lengths,
    label,
    pad_sample,
    padding_problem,
    parse_label,
    trace_outputs,
)
from aitune.specs import Sample

TAGGER_SHAPES = Shapes((Axis("seq", (8, 16), (("input_ids", 1, 0), ("attention_mask", 1, 0)),
                             ((0, "output['logits']", 1),)),))


def tagger_sample(batch: int, lengths: dict[str, int]) -> Sample:
    n = lengths["seq"]
    ids = torch.randint(0, 100, (batch, n), generator=torch.Generator().manual_seed(n))
    mask = torch.ones(batch, n, dtype=torch.int64)
    if batch > 1:
        mask[1, n // 2:] = 0  # a row with padding of its own
    return Sample((), {"input_ids": ids, "attention_mask": mask})


def compare(want, got):
    result = compare_outputs(want, got, tolerance_for("float32"))
    return None if result.ok else result.reason


def test_labels_name_points_and_read_back():
    assert label({"seq": 64}) == "seq=64" and label({"seq": 8, "img": 224}) == "img=224,seq=8" and label({}) == ""
    assert parse_label("img=224,seq=8") == {"img": 224, "seq": 8} and parse_label("") == {}
    assert at(4) == "b4" and at(4, "seq=64") == "b4 seq=64"
    for bad in ("seq", "seq=", "=4", "seq=x"):
        with pytest.raises(ValueError, match="axis=size"):
            parse_label(bad)


def test_a_length_goes_to_the_smallest_bucket_that_holds_it_and_beyond_the_largest_is_refused():
    axis = TAGGER_SHAPES.axes[0]
    assert [axis.bucket_for(n) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    with pytest.raises(ShapeError, match=r"seq 17 is longer than the largest bucket: tuned seq 1\.\.16 \(buckets 8, 16\)"):
        axis.bucket_for(17)


@pytest.mark.parametrize("buckets", [(), (16, 8), (8, 8), (0, 8)])
def test_buckets_must_be_increasing_positive_sizes(buckets):
    with pytest.raises(ValueError, match="increasing positive"):
        Axis("seq", buckets, (("x", 1, 0),))


def test_held_out_lengths_lie_between_the_buckets_and_under_the_first():
    assert held_out_lengths([8, 16]) == [1, 4, 7, 9, 12, 15]
    assert held_out_lengths([1, 2]) == []  # nothing lies between: nothing to check
    assert all(n not in (32, 64) for n in held_out_lengths([32, 64]))


def test_padding_and_slicing_back_gives_the_unpadded_outputs_of_a_masked_model():
    model = token_tagger()
    sample = tagger_sample(2, {"seq": 5})
    padded = pad_sample(sample, TAGGER_SHAPES, {"seq": 8}, [])
    assert padded.kwargs["input_ids"].shape == (2, 8) and padded.kwargs["attention_mask"][:, 5:].eq(0).all()
    with torch.inference_mode():
        got = TAGGER_SHAPES.cut(padded(model), {"seq": 5})
        want = sample(model)
    assert got["logits"].shape == (2, 5, 5) and compare(want, got) is None


def test_inputs_that_disagree_on_an_axis_are_named():
    with pytest.raises(ShapeError, match="inputs disagree on axis seq: 5 and 6"):
        TAGGER_SHAPES.lengths({"input_ids": torch.zeros(1, 5), "attention_mask": torch.zeros(1, 6)})


def test_tracing_finds_the_outputs_that_follow_the_axis_and_names_one_that_cannot_be_sliced():
    model = token_tagger()
    with torch.inference_mode():
        a, b = tagger_sample(1, {"seq": 16})(model), tagger_sample(1, {"seq": 15})(model)
    assert trace_outputs(a, b, 16, 15) == [(0, "output['logits']", 1)]  # pooled does not follow seq
    flat = trace_outputs(torch.zeros(1, 16 * 3), torch.zeros(1, 15 * 3), 16, 15)
    assert isinstance(flat, str) and "output dimension 1 is 48 at length 16 and 45 at 15: it can't be sliced back" in flat


def test_the_padding_check_passes_a_masked_model_and_names_one_that_pools_over_padding():
    tagger = token_tagger()
    assert padding_problem(tagger, tagger, TAGGER_SHAPES, lambda n: tagger_sample(2, n), [], compare) is None
    encoder = small_encoder(dim=32, layers=1)
    shapes = Shapes((Axis("seq", (8, 16), (("tokens", 1, 0),)),))

    def make(n):
        return Sample((torch.randint(0, 1000, (2, n["seq"]), generator=torch.Generator().manual_seed(0)),))

    with torch.inference_mode():
        problem = padding_problem(encoder, encoder, shapes, make, ["tokens"], compare)
    assert problem is not None and problem.startswith("padding seq 1 up to 8 changes the outputs")
    assert "does not mask its padding, or pools over the padded axis" in problem


def test_a_candidate_that_breaks_padding_is_caught_at_its_own_bucket_only():
    tagger = token_tagger()

    def unmasked(input_ids, attention_mask):  # a candidate that loses the mask
        return tagger(input_ids=input_ids, attention_mask=torch.ones_like(attention_mask))

    make = lambda n: tagger_sample(2, n)  # noqa: E731
    problem = padding_problem(unmasked, tagger, TAGGER_SHAPES, make, [], compare, point={"seq": 16})
    assert problem is not None and "padding seq 9 up to 16" in problem
    # At the smallest bucket only lengths 1..7 pad up to it
    problem = padding_problem(unmasked, tagger, TAGGER_SHAPES, make, [], compare, point={"seq": 8})
    assert problem is not None and "up to 8" in problem


def test_shapes_read_back_as_written():
    again = Shapes.from_dict(TAGGER_SHAPES.to_dict())
    assert again == TAGGER_SHAPES and again.points() == [{"seq": 8}, {"seq": 16}]


@pytest.mark.parametrize("inputs, outputs", [
    ((("x", -1, 0),), ()), ((("x", 1, float("nan")),), ()), ((("x", 1, "0"),), ()), ((("x", 1, 0),), ((0, "output", -1),)),
])
def test_axes_read_back_are_checked(inputs, outputs):
    with pytest.raises(ValueError, match="axis 'seq'"):
        Axis("seq", (8,), inputs, outputs)
