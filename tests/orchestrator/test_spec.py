"""The sweep spec: valid specs load; each kind of bad spec fails early, naming the field path."""

from __future__ import annotations

import json

import pytest

from orchestrator.spec import SpecError, load_spec, parse_spec


def base(**changes):
    spec = {
        "models": [{"name": "m", "factory": "aitune.examples:mlp", "kwargs": {"width": 8, "depth": 1},
                    "inputs": [{"shape": [8]}]}],
        "batch_sizes": [1, 4],
    }
    spec.update(changes)
    return spec


def error_of(data) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return str(info.value)


def test_minimal_spec_loads_with_defaults():
    spec = parse_spec(base())
    assert spec.objective == "min_latency"
    assert spec.candidates is None
    assert spec.budgets.build_timeout_s > 0
    assert spec.strategy().kind == "min_latency"


def test_yaml_and_json_files_load(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(base()))
    (tmp_path / "s.yaml").write_text("models:\n  - {name: m, factory: 'aitune.examples:mlp', inputs: [{shape: [8]}]}\nbatch_sizes: [2]\n")
    assert load_spec(tmp_path / "s.json").batch_sizes == [1, 4]
    assert load_spec(tmp_path / "s.yaml").batch_sizes == [2]


def test_missing_file_and_broken_yaml_are_named(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("models: [\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_missing_field_names_its_path():
    data = base()
    del data["models"][0]["factory"]
    assert "models[0].factory: missing required field" in error_of(data)


def test_unknown_field_names_its_path():
    assert "budgets.build_timeout: unknown field" in error_of(base(budgets={"build_timeout": 3}))
    assert "colour: unknown field" in error_of(base(colour="red"))


def test_unknown_backend_lists_the_known_ones():
    message = error_of(base(candidates=[{"backend": "TurboBackend"}]))
    assert "candidates[0].backend" in message
    assert "unknown backend 'TurboBackend'" in message
    assert "TorchEagerBackend" in message and "OnnxRuntimeBackend" in message


def test_factory_that_cannot_be_imported_gives_the_import_error():
    data = base()
    data["models"][0]["factory"] = "no_such_package.models:make"
    message = error_of(data)
    assert "models[0].factory" in message
    assert "ModuleNotFoundError" in message and "no_such_package" in message


def test_factory_attribute_missing_is_named():
    data = base()
    data["models"][0]["factory"] = "aitune.examples:no_such_model"
    assert "has no attribute 'no_such_model'" in error_of(data)


def test_config_field_the_backend_does_not_have():
    message = error_of(base(candidates=[{"backend": "TorchEagerBackend", "config": {"precison": "float16"}}]))
    assert "candidates[0]" in message
    assert "no field(s) ['precison']" in message
    assert "precision" in message  # the known fields are listed


def test_bad_config_value_is_refused():
    message = error_of(base(candidates=[{"backend": "TorchInductorJitBackend", "config": {"mode": "ludicrous"}}]))
    assert "mode 'ludicrous'" in message


def test_negative_batch_size():
    message = error_of(base(batch_sizes=[4, -1]))
    assert "batch_sizes[1]" in message and "greater than 0" in message


def test_latency_budget_needs_its_number():
    assert "latency_budget_ms" in error_of(base(objective="latency_budget"))
    spec = parse_spec(base(objective="latency_budget", latency_budget_ms=5))
    assert spec.strategy().budget_ms == 5


def test_inputs_or_sample_factory_exactly_one():
    data = base()
    data["models"][0]["sample_factory"] = "aitune.examples:image_sample"
    assert "exactly one of 'inputs'" in error_of(data)


def test_int_range_only_for_integer_inputs():
    data = base()
    data["models"][0]["inputs"] = [{"shape": [4], "dtype": "float32", "int_range": [0, 5]}]
    assert "int_range is for integer inputs" in error_of(data)


def test_bad_deploy_target():
    assert "deploy.targets" in error_of(base(deploy={"targets": ["everywhere"]}))


def test_every_problem_is_listed_at_once():
    message = error_of(base(batch_sizes=[0], candidates=[{"backend": "Nope"}], extra=1))
    assert message.count("\n") >= 3


def test_deploy_target_forms():
    spec = parse_spec(base(deploy={"targets": ["all_gpus", {"gpus": 2}, {"cpu_slots": 1}, {"accelerator_type": "H200"}]}))
    assert len(spec.deploy.targets) == 4
    assert "must ask for a positive number" in error_of(base(deploy={"targets": [{"gpus": 0}]}))
    assert "must name an accelerator type" in error_of(base(deploy={"targets": [{"accelerator_type": 3}]}))
