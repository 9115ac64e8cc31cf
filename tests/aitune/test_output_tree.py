"""Outputs torch's pytree can't keep (named tuples, dataclasses, objects) through a flat form and back."""

from __future__ import annotations

import collections
import dataclasses
import sys
import types

import pytest
import torch

from aitune.torch.output_tree import OutputTree, OutputTreeError, describe, exportable
from structured_outputs import Boxes, Scores, box_head, named_head


def _roundtrip(value):
    tensors: list[torch.Tensor] = []
    tree = describe(value, tensors)
    return OutputTree(tree).rebuild(tensors), tree, tensors


def test_a_named_tuple_comes_back_as_its_own_type_with_the_same_tensors():
    value = Scores(torch.randn(2, 5), torch.tensor([1, 3]))
    back, tree, tensors = _roundtrip(value)
    assert type(back) is Scores and back.logits is value.logits and back.best is value.best
    assert tree["namedtuple"] == "structured_outputs:Scores" and len(tensors) == 2


def test_a_frozen_dataclass_with_constants_and_nested_containers_comes_back_whole():
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    value = Boxes(a, {"count": 4, "label": "x", "parts": (b, None), "ratios": [0.5, 2.0]})
    back, _, _ = _roundtrip(value)
    assert type(back) is Boxes and back.boxes is a
    assert back.meta == {"count": 4, "label": "x", "parts": (b, None), "ratios": [0.5, 2.0]}


def test_dict_subclasses_and_plain_objects_keep_their_type():
    class Holder:  # a local class: no import path, so a namespace stands in for it
        def __init__(self, t):
            self.t = t

    value = collections.OrderedDict(first=torch.ones(1), second=Holder(torch.zeros(2)))
    back, _, _ = _roundtrip(value)
    assert type(back) is collections.OrderedDict and list(back) == ["first", "second"]
    assert isinstance(back["second"], types.SimpleNamespace) and torch.equal(back["second"].t, torch.zeros(2))


def test_a_type_not_imported_where_the_tree_is_read_gets_a_stand_in_of_the_same_shape():
    tensors: list[torch.Tensor] = []
    tree = describe(Scores(torch.randn(2, 5), torch.tensor([0, 1])), tensors)
    tree["namedtuple"] = "not_imported_anywhere:Scores"
    assert "not_imported_anywhere" not in sys.modules
    back = OutputTree(tree).rebuild(tensors)
    assert back._fields == ("logits", "best") and back.best is tensors[1]
    assert "not_imported_anywhere" not in sys.modules  # reading a tree imports nothing

    tensors = []
    tree = describe(Boxes(torch.randn(1), {}), tensors)
    tree["dataclass"] = "not_imported_anywhere:Boxes"
    back = OutputTree(tree).rebuild(tensors)
    assert dataclasses.is_dataclass(back) and [f.name for f in dataclasses.fields(back)] == ["boxes", "meta"]


def test_a_leaf_that_is_not_a_tensor_or_a_json_constant_is_refused_naming_where_it_is():
    with pytest.raises(OutputTreeError, match=r"output\[1\]\.meta\['when'\] is a set"):
        describe((torch.ones(1), Boxes(torch.ones(1), {"when": {1, 2}})), [])
    with pytest.raises(OutputTreeError, match="output is nan"):
        describe(float("nan"), [])


@pytest.mark.parametrize("tree, words", [
    ({"tensor": 1}, "tensor slots [1] are not 0..0"),
    ({"tuple": [{"tensor": 0}, {"tensor": 0}]}, "tensor slot 0 is not a new"),
    ({"tensor": True}, "tensor slot True"),
    ({"pickle": "os:system"}, "unknown node ['pickle']"),
    ({"namedtuple": "os.system", "fields": ["a"], "items": [{"tensor": 0}]}, "not 'module:qualname'"),
    ({"namedtuple": "m:T", "fields": ["a b"], "items": [{"tensor": 0}]}, "fields must be a list of names"),
    ({"namedtuple": "m:T", "fields": ["a", "b"], "items": [{"tensor": 0}]}, "has 2 fields but not as many items"),
    ({"dict": [["k"]]}, "list of [key, item] pairs"),
    ({"value": [1, 2]}, "is not a JSON constant"),
    ([], "is not a node"),
])
def test_a_tree_read_back_that_this_module_did_not_write_is_refused(tree, words):
    with pytest.raises(OutputTreeError) as info:
        OutputTree(tree)
    assert words in str(info.value)


def test_rebuilding_from_the_wrong_number_of_tensors_is_refused():
    tree = OutputTree({"tuple": [{"tensor": 0}, {"tensor": 1}]})
    with pytest.raises(OutputTreeError, match="returned 3 tensors, the tree holds 2"):
        tree.rebuild([torch.ones(1)] * 3)


def test_the_exportable_view_flattens_only_what_torch_cant_keep():
    model, x = named_head(), torch.randn(2, 8)
    view, record = exportable(model)
    flat = view(x)
    assert isinstance(flat, tuple) and type(flat) is tuple and len(flat) == 2
    rebuilt = OutputTree(record["tree"]).rebuild(list(flat))
    assert type(rebuilt) is Scores and torch.equal(rebuilt.logits, model(x).logits)
    # the view shares the model's parameters and names: an export of it has the same weights
    assert dict(view.named_parameters()) == dict(model.named_parameters())
    assert model.forward.__func__ is type(model).forward  # the model itself is left as it was

    plain = torch.nn.Linear(8, 2).eval()
    view, record = exportable(plain)
    assert torch.equal(view(x), plain(x)) and record == {}
    view, record = exportable(box_head())
    assert len(view(x)) == 2 and record["tree"]["dataclass"] == "structured_outputs:Boxes"
