"""Several spec files make one sweep: models concatenated, other settings given once or alike; include: with cycles refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.spec.merge import load_spec
from orchestrator.spec.schema import SpecError
from orchestrator.spec.merge import load_specs


def model(name: str, seed: int = 0) -> dict:
    return {"name": name, "factory": "aitune.examples:mlp", "kwargs": {"width": 8, "depth": 1, "seed": seed},
            "inputs": [{"name": "x", "shape": [8]}]}


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_two_specs_concatenate_their_models_and_share_settings(tmp_path):
    a = write(tmp_path / "a.yaml", {"models": [model("a1"), model("a2")], "batch_sizes": [1]})
    b = write(tmp_path / "b.yaml", {"models": [model("b1")], "batch_sizes": [1], "reuse": "decisions"})
    spec = load_specs([a, b])
    assert [m.name for m in spec.models] == ["a1", "a2", "b1"]
    assert spec.reuse == "decisions"  # given by one file only: taken
    assert spec.batch_sizes == [1]


def test_a_model_name_in_two_specs_is_refused_naming_both_files(tmp_path):
    a = write(tmp_path / "a.yaml", {"models": [model("m")], "batch_sizes": [1]})
    b = write(tmp_path / "b.yaml", {"models": [model("m", seed=1)], "batch_sizes": [1]})
    with pytest.raises(SpecError) as err:
        load_specs([a, b])
    text = str(err.value)
    assert "models[0].name" in text and "'m'" in text and str(a.resolve()) in text and "unique" in text


def test_conflicting_settings_are_refused_naming_the_field(tmp_path):
    a = write(tmp_path / "a.yaml", {"models": [model("a")], "batch_sizes": [1], "reuse_top_k": 2})
    b = write(tmp_path / "b.yaml", {"models": [model("b")], "batch_sizes": [1], "reuse_top_k": 4})
    with pytest.raises(SpecError) as err:
        load_specs([a, b])
    line = next(line for line in str(err.value).splitlines() if "reuse_top_k" in line)
    assert "gives 2" in line and "gives 4" in line and str(a.resolve()) in line


def test_specs_of_different_names_batch_sizes_and_reuse_make_one_sweep_each_keeping_its_own(tmp_path):
    a = write(tmp_path / "a.yaml", {"name": "vision", "models": [model("a1"), {**model("a2"), "batch_sizes": [2]}],
                                    "batch_sizes": [1, 8], "reuse": "none"})
    b = write(tmp_path / "b.yaml", {"name": "text", "models": [model("b1")], "batch_sizes": [4], "reuse": "decisions"})
    c = write(tmp_path / "c.yaml", {"name": "text", "models": [model("c1")], "batch_sizes": [4], "reuse": "none"})
    spec = load_specs([a, b, c])
    assert spec.name == "vision+text"
    got = {m.name: (m.batch_sizes, m.reuse) for m in spec.models}
    # each file's value on its own models; a model's own value stands
    assert got == {"a1": ([1, 8], "none"), "a2": ([2], "none"), "b1": ([4], "decisions"), "c1": ([4], "none")}
    assert [spec.reuse_of(m) for m in spec.models] == ["none", "none", "decisions", "none"]


@pytest.mark.parametrize("second, why", [
    ({"models": [model("b")]}, "gives none for its models"),  # which batch sizes would b get?
    ({"batch_sizes": [4]}, "has no models of its own"),  # a batch size for no model
])
def test_differing_per_model_settings_that_cant_go_to_models_are_refused(tmp_path, second, why):
    a = write(tmp_path / "a.yaml", {"models": [model("a")], "batch_sizes": [1]})
    c = write(tmp_path / "c.yaml", {"models": [model("c")], "batch_sizes": [2]})
    b = write(tmp_path / "b.yaml", second)
    with pytest.raises(SpecError) as err:
        load_specs([a, c, b])
    lines = [line for line in str(err.value).splitlines() if "batch_sizes" in line]
    assert len(lines) == 1 and why in lines[0] and str(b.resolve()) in lines[0]


def test_include_is_relative_to_the_including_file(tmp_path):
    write(tmp_path / "sub" / "base.yaml", {"models": [model("base")], "batch_sizes": [2]})
    top = write(tmp_path / "sub" / "top.yaml", {"include": ["base.yaml"], "models": [model("tuned", seed=3)]})
    spec = load_spec(top)
    assert [m.name for m in spec.models] == ["base", "tuned"]
    assert spec.batch_sizes == [2]


def test_an_include_cycle_is_refused(tmp_path):
    write(tmp_path / "a.yaml", {"include": ["b.yaml"], "models": [model("a")], "batch_sizes": [1]})
    write(tmp_path / "b.yaml", {"include": ["a.yaml"], "models": [model("b")]})
    with pytest.raises(SpecError, match="include cycle"):
        load_spec(tmp_path / "a.yaml")


def test_a_missing_include_is_refused_with_its_path(tmp_path):
    a = write(tmp_path / "a.yaml", {"include": ["nope.yaml"], "models": [model("a")], "batch_sizes": [1]})
    with pytest.raises(SpecError, match="nope.yaml does not exist"):
        load_spec(a)


def test_an_included_directory_is_refused_as_one(tmp_path):
    (tmp_path / "models").mkdir()
    a = write(tmp_path / "a.yaml", {"include": ["models"], "models": [model("a")], "batch_sizes": [1]})
    with pytest.raises(SpecError, match="models is a directory; name each spec file in it"):
        load_spec(a)
    with pytest.raises(SpecError, match="is a directory, not a spec file"):
        load_specs([tmp_path / "models", a])


def test_a_file_included_twice_is_read_once(tmp_path):
    write(tmp_path / "base.yaml", {"models": [model("base")], "batch_sizes": [1]})
    write(tmp_path / "x.yaml", {"include": ["base.yaml"], "models": [model("x")]})
    top = write(tmp_path / "top.yaml", {"include": ["base.yaml", "x.yaml"], "models": [model("top")]})
    assert [m.name for m in load_spec(top).models] == ["base", "x", "top"]


@pytest.mark.parametrize("command", ["tune", "plan"])
def test_the_cli_refuses_conflicting_specs_before_anything_starts(tmp_path, capsys, command):
    from orchestrator.cli import EXIT_BAD_INPUT, main

    a = write(tmp_path / "a.yaml", {"models": [model("a")], "batch_sizes": [1], "store": str(tmp_path / "s1")})
    b = write(tmp_path / "b.yaml", {"models": [model("b")], "batch_sizes": [1], "store": str(tmp_path / "s2")})
    assert main([command, str(a), str(b)]) == EXIT_BAD_INPUT
    out = capsys.readouterr().out
    assert "store:" in out and "s1" in out and "s2" in out
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()
