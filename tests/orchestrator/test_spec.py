"""The sweep spec: valid specs load; each kind of bad spec fails early, naming the field path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aitune.specs import Sample
from orchestrator.spec.merge import load_spec
from orchestrator.spec.schema import SpecError, parse_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


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


def with_input(**fields):
    """The base spec whose one input has these fields (besides its shape [8])."""
    return base(models=[{"name": "m", "factory": "aitune.examples:mlp", "inputs": [{"shape": [8], **fields}]}])


def with_model(**fields):
    """The base spec whose one model has these fields changed."""
    data = base()
    data["models"][0].update(fields)
    return data


def problem_lines(message: str) -> list[str]:
    return message.splitlines()[1:]


def load_error(tmp_path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / name)
    return str(info.value)


def candidate(backend: str, **config):
    return base(candidates=[{"backend": backend, "config": config}])


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


def test_a_config_the_backend_refuses_names_the_backend_once():
    message = error_of(candidate("OnnxRuntimeBackend", graph_optimization_level="turbo"))
    assert "candidates[0].config" in message and "'turbo' is not one of" in message
    assert message.count("config of OnnxRuntimeBackend") == 1, message


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
    assert "candidates[0].config.precison: TorchEagerConfig has no field 'precison'" in message
    assert "precision" in message.split("its fields:")[1]  # the known fields are listed


def test_bad_config_value_is_refused():
    message = error_of(base(candidates=[{"backend": "TorchInductorJitBackend", "config": {"mode": "ludicrous"}}]))
    assert "candidates[0].config: config of TorchInductorJitBackend" in message and "mode 'ludicrous'" in message


def test_negative_batch_size():
    message = error_of(base(batch_sizes=[4, -1]))
    assert "batch_sizes[1]" in message and "greater than 0" in message


def test_latency_budget_needs_its_number():
    assert "latency_budget_ms" in error_of(base(objective="latency_budget"))
    spec = parse_spec(base(objective="latency_budget", latency_budget_ms=5))
    assert spec.strategy().budget_ms == 5


def tiny_sample(batch_size: int, seed: int) -> Sample:
    return Sample.of(torch.randn(batch_size, 8, generator=torch.Generator().manual_seed(seed)))


def test_inputs_or_sample_factory_exactly_one():
    data = with_model(sample_factory=f"{__name__}:tiny_sample")
    assert "models[0]: give exactly one of 'inputs'" in error_of(data)
    assert "models[0]: give exactly one of 'inputs'" in error_of(with_model(inputs=None))
    assert parse_spec(with_model(inputs=None, sample_factory=f"{__name__}:tiny_sample")).models[0].inputs is None


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


def test_example_specs_still_validate():
    assert EXAMPLES, "no example specs found"
    for path in EXAMPLES:
        spec = load_spec(path)
        assert spec.models and spec.batch_sizes, path


def test_stored_spec_parses_again_as_the_worker_gets_it():
    spec = parse_spec(with_input(range=[0, 1], name="x"))
    again = parse_spec(json.loads(json.dumps(spec.model_dump(mode="json"))))
    assert again == spec


# -- 1. what can't be allocated or represented --------------------------------------------------
def test_input_larger_than_host_memory_is_refused_with_its_size_in_gib():
    data = base(batch_sizes=[1_000_000])
    data["models"][0]["inputs"] = [{"shape": [1_000_000]}]  # 4e12 bytes of float32
    message = error_of(data)
    assert "models[0].inputs[0]: at batch size 1000000 this input takes 3725.3 GiB" in message
    assert "GiB of memory this machine has" in message


def test_memory_bound_uses_the_models_own_largest_batch():
    data = with_model(batch_sizes=[1, 1_000_000], inputs=[{"shape": [8]}, {"shape": [1_000_000], "dtype": "int64"}])
    message = error_of(data)
    assert "models[0].inputs[1]: at batch size 1000000" in message
    assert "models[0].inputs[0]" not in message
    assert parse_spec(with_model(batch_sizes=[1_000], inputs=[{"shape": [1_000]}]))  # 4 MB is fine


def test_int_range_beyond_the_dtype_is_refused():
    message = error_of(with_input(dtype="int8", int_range=[0, 1000]))
    assert "models[0].inputs[0].int_range: int_range [0, 1000] does not fit int8" in message
    assert "high (exclusive) <= 128" in message
    assert parse_spec(with_input(dtype="int8", int_range=[-128, 128]))  # the whole of int8 is fine
    assert "does not fit int64" in error_of(with_input(dtype="int64", int_range=[0, 2**63]))


def test_int_range_on_bool_inputs_is_refused():
    message = error_of(with_input(dtype="bool", int_range=[0, 2]))
    assert "models[0].inputs[0].int_range: int_range does not apply to bool inputs" in message


def test_float_range_outside_the_dtype_is_refused():
    message = error_of(with_input(dtype="float16", range=[0, 70000]))
    assert "models[0].inputs[0].range: range [0.0, 70000.0] is outside float16's finite values [-65504, 65504]" in message
    assert parse_spec(with_input(dtype="float16", range=[-65504, 65504]))
    message = error_of(with_input(dtype="float64", range=[-1e300, 1e300]))
    assert "range [-1e+300, 1e+300] is outside float64's finite values" in message
    assert "(the sample maker draws float64 inputs in float32)" in message


def test_float_range_with_inf_or_nan_is_refused():
    for bad in (float("inf"), float("nan")):
        assert "models[0].inputs[0].range[1]: expected a finite number" in error_of(with_input(range=[0, bad]))


def test_range_of_booleans_or_int_range_of_floats_is_refused():
    assert "models[0].inputs[0].range: expected a list [low, high] of numbers" in error_of(with_input(range=[True, 2]))
    message = error_of(with_input(dtype="int64", int_range=[0.0, 5.0]))
    assert "models[0].inputs[0].int_range: expected a list [low, high] of integers, got the list [0.0, 5.0]" in message


# -- 2. measure and tolerance values the worker would reject --------------------------------------
def test_measure_values_the_worker_rejects_are_refused():
    message = error_of(base(measure={"target_rel_ci": 1.5, "warmup_iters": 100, "min_iters": 20_000}))
    assert "measure.target_rel_ci: Input should be less than 1" in message
    assert "measure.warmup_iters: warm-up stops at 50 iterations" in message
    assert "measure.min_iters: min_iters 20000 is above the 10000 iterations" in message


def test_measure_lower_bounds_follow_measure_config():
    message = error_of(base(measure={"min_iters": 0, "warmup_iters": -1, "target_rel_ci": 0, "budget_s": 0}))
    for field in ("min_iters", "warmup_iters", "target_rel_ci", "budget_s"):
        assert f"measure.{field}: Input should be greater than" in message
    assert parse_spec(base(measure={"warmup_iters": 0})).measure.warmup_iters == 0  # MeasureConfig allows it


def test_nan_and_inf_are_refused_in_every_float_field():
    message = error_of(base(measure={"budget_s": float("inf")}, budgets={"total_s": float("nan")},
                            tolerances={"float32": {"atol": float("nan")}}, deploy={"latency_check_s": float("inf")}))
    for path in ("measure.budget_s", "budgets.total_s", "tolerances.float32.atol", "deploy.latency_check_s"):
        assert f"{path}: expected a finite number" in message


def test_tolerance_values_the_checker_rejects_are_refused():
    message = error_of(base(tolerances={"bfloat16": {"atol": -1}, "float32": {}}))
    assert "tolerances.bfloat16.atol: Input should be greater than or equal to 0" in message
    assert "tolerances.float32: give atol, rtol or both" in message


# -- 3. dtypes the sample maker can't make -----------------------------------------------------
@pytest.mark.parametrize("dtype", ["complex64", "qint8", "float8_e4m3fn", "uint16", "int4"])
def test_dtype_the_sample_maker_cannot_make_is_refused(dtype):
    message = error_of(with_input(dtype=dtype))
    assert f"models[0].inputs[0].dtype: dtype '{dtype}' is not one the sample maker can make" in message
    assert "allowed: float16, bfloat16, float32, float64, uint8, int8, int16, int32, int64, bool" in message


def test_dtypes_the_sample_maker_makes_are_accepted():
    for dtype in ("float16", "bfloat16", "float64", "uint8", "int32", "bool", "torch.int64"):
        assert parse_spec(with_input(dtype=dtype)).models[0].inputs[0].dtype == dtype.removeprefix("torch.")


# -- 4. tolerance keys ---------------------------------------------------------------------------
def test_tolerance_key_that_is_not_a_precision_is_refused():
    message = error_of(base(tolerances={"float8": {"atol": 1}, "fp32": {"atol": 1}}))
    assert "tolerances.float8: 'float8' is not a precision the checker knows; allowed: float32, tf32, float16, bfloat16" in message
    assert "fp16" in message.split("tolerances.float8")[1]  # the aliases are listed too
    assert "tolerances.fp32" not in message


def test_two_tolerance_keys_for_one_precision_are_refused():
    message = error_of(base(tolerances={"float16": {"atol": 1}, "fp16": {"rtol": 1}}))
    assert "tolerances.fp16: 'fp16' and 'float16' are both float16; give it once" in message


# -- 5. factories ----------------------------------------------------------------------------------
def test_factory_that_is_not_callable_is_refused():
    message = error_of(with_model(factory="aitune.measure:WARMUP_MAX_ITERS"))
    assert "models[0].factory: 'aitune.measure:WARMUP_MAX_ITERS' is not callable" in message


def test_factory_annotated_to_return_no_module_is_refused():
    message = error_of(with_model(factory="aitune.examples:image_sample"))
    assert "models[0].factory: 'aitune.examples:image_sample' is annotated to return Sample, not a torch.nn.Module" in message
    assert "is a class Sample, not a torch.nn.Module" in error_of(with_model(factory="aitune.specs:Sample"))
    assert parse_spec(with_model(factory="aitune.examples:SmallCNN", kwargs={}))  # a module class is a factory


def test_factory_kwargs_its_signature_does_not_take_are_refused():
    message = error_of(with_model(kwargs={"widht": 8}))
    assert "models[0].kwargs: 'aitune.examples:mlp' can't be called with ['widht']" in message
    assert "unexpected keyword argument 'widht'" in message and "its signature is (width" in message


def test_factory_kwargs_without_a_json_form_are_refused():
    message = error_of(with_model(kwargs={"width": float("nan")}))
    assert "models[0].kwargs: kwargs.width: non-finite float nan has no JSON form" in message


def test_sample_factory_that_cannot_take_batch_size_and_seed_is_refused():
    message = error_of(with_model(inputs=None, sample_factory="aitune.examples:image_sample"))
    assert "models[0].sample_factory: 'aitune.examples:image_sample' can't be called with ['batch_size', 'seed']" in message
    assert "missing a required argument: 'batch'" in message


def test_sample_factory_annotated_to_return_a_model_is_refused():
    message = error_of(with_model(inputs=None, sample_factory="aitune.examples:mlp"))
    assert "models[0].sample_factory: 'aitune.examples:mlp' is annotated to return MLP; a sample factory returns" in message
    assert "is not callable" in error_of(with_model(inputs=None, sample_factory="aitune.measure:TIMERS"))


# -- 6. YAML aliases and repeated keys --------------------------------------------------------------
BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
models: [*h, *h, *h, *h, *h, *h, *h, *h, *h]
batch_sizes: [1]
"""


def test_yaml_billion_laughs_is_refused_before_it_expands(tmp_path):
    message = load_error(tmp_path, "laughs.yaml", BILLION_LAUGHS)
    assert message.startswith(f"invalid sweep spec {tmp_path / 'laughs.yaml'}:\n")
    assert "  a: YAML anchor &a (line 1): anchors and aliases are not allowed in a sweep spec" in message
    assert "  models[0]: YAML alias *h (line 9)" in message
    assert len(problem_lines(message)) == 8 + 8 * 9  # every anchor and every alias, each once


def test_yaml_merge_key_is_refused(tmp_path):
    message = load_error(tmp_path, "merge.yaml", "budgets: {<<: {build_timeout_s: 3}}\nmodels: []\nbatch_sizes: [1]\n")
    assert "  budgets: YAML merge key '<<' (line 1): merge keys are not allowed" in message


def test_duplicate_yaml_keys_are_refused_with_key_and_line(tmp_path):
    text = (
        "models:\n"
        "  - name: m\n"
        "    factory: 'aitune.examples:mlp'\n"
        "    inputs: [{shape: [8], dtype: float32, dtype: int64}]\n"
        "    name: n\n"
        "batch_sizes: [1]\n"
        "batch_sizes: [2]\n"
    )
    lines = problem_lines(load_error(tmp_path, "dupes.yaml", text))
    assert "  models[0].inputs[0].dtype: duplicate key 'dtype' on line 4 (first on line 4)" in lines
    assert "  models[0].name: duplicate key 'name' on line 5 (first on line 2)" in lines
    assert "  batch_sizes: duplicate key 'batch_sizes' on line 7 (first on line 6)" in lines
    assert len(lines) == 3


def test_duplicate_json_keys_are_refused(tmp_path):
    text = '{"models": [{"name": "m", "name": "n", "factory": "aitune.examples:mlp", "inputs": [{"shape": [8]}]}], "batch_sizes": [1], "store": "a", "store": "b"}'
    lines = problem_lines(load_error(tmp_path, "dupes.json", text))
    assert sorted(lines) == ["  models[0].name: duplicate key 'name' (2 times in one JSON object)",
                             "  store: duplicate key 'store' (2 times in one JSON object)"]


def test_broken_json_and_binary_files_are_named(tmp_path):
    assert "is not valid JSON" in load_error(tmp_path, "bad.json", '{"models": ')
    (tmp_path / "binary.yaml").write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SpecError, match="is not UTF-8 text"):
        load_spec(tmp_path / "binary.yaml")


# -- 7. names and the store ----------------------------------------------------------------------
@pytest.mark.parametrize("store", ["", "   "])
def test_empty_store_is_refused(store):
    assert "store: store must name a directory (it is empty)" in error_of(base(store=store))


def test_store_may_be_a_path_object(tmp_path):
    assert parse_spec(base(store=tmp_path / "s")).store == str(tmp_path / "s")


@pytest.mark.parametrize("name, words", [
    ("", "can't be empty"), ("  ", "can't be empty"), ("a/b", "has a '/'"), ("a\x07b", "control characters"),
])
def test_bad_sweep_name_is_refused(name, words):
    message = error_of(base(name=name))
    assert "\n  name: " in message and words in message


@pytest.mark.parametrize("name", ["", "x\ny", "/tmp/x", "../x", "..", ".", "a/b", "a\\b", ".hidden", "a b", "x" * 129])
def test_a_model_name_that_is_not_one_plain_folder_of_the_deploy_root_is_refused(name):
    message = error_of(with_model(name=name))
    assert "models[0].name: " in message and "can't be a folder of the deploy root: use 1 to 128 letters" in message


@pytest.mark.parametrize("name", ["mlp", "small_cnn", "bert-base.v2", "A1"])
def test_plain_model_names_are_accepted(name):
    assert [m.name for m in parse_spec(with_model(name=name)).models] == [name]


@pytest.mark.parametrize("root, words", [("/", "system folder"), ("/etc", "system folder"), ("/usr/lib/x", "system folder")])
def test_a_deploy_root_that_is_a_system_folder_is_refused(root, words):
    message = error_of(base(deploy={"targets": [{"cpu_slots": 1}], "root": root}))
    assert "deploy.root: " in message and words in message


def test_a_deploy_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    message = error_of(base(deploy={"targets": [{"cpu_slots": 1}], "root": str(tmp_path / "f")}))
    assert "deploy.root: " in message and "is a file, not a directory" in message


# -- 8. candidate configs, strictly ---------------------------------------------------------------
def test_string_boolean_in_a_candidate_config_is_refused():
    message = error_of(candidate("TorchEagerBackend", autocast="false"))
    assert "candidates[0].config.autocast: expected a boolean, got the string 'false'" in message


def test_every_wrong_type_in_a_candidate_config_is_named():
    message = error_of(candidate("OnnxRuntimeBackend", providers=["CPUExecutionProvider", 3], opset=17.0,
                                 intra_op_threads=True, io_binding=1))
    assert "candidates[0].config.providers: expected a list (each item a string), got the list ['CPUExecutionProvider', 3]" in message
    assert "candidates[0].config.opset: expected an integer or null, got the number 17.0" in message
    assert "candidates[0].config.intra_op_threads: expected an integer or null, got the boolean True" in message
    assert "candidates[0].config.io_binding: expected a boolean, got the integer 1" in message


def test_candidate_config_strings_numbers_and_mappings_are_strict():
    message = error_of(candidate("TorchInductorJitBackend", mode=3, dynamic="yes", options=[1]))
    assert "candidates[0].config.mode: expected a string, got the integer 3" in message
    assert "candidates[0].config.dynamic: expected a boolean or null, got the string 'yes'" in message
    assert "candidates[0].config.options: expected a mapping, got the list [1]" in message
    assert "expected an integer, got the string '3'" in error_of(candidate("TensorRTBackend", optimization_level="3"))


def test_candidate_config_without_a_json_form_is_refused():
    message = error_of(candidate("TorchInductorJitBackend", options={"x": float("nan")}))
    assert "candidates[0].config.options: not a plain JSON value: options.x: non-finite float nan" in message


def test_candidate_config_of_the_right_types_is_accepted():
    spec = parse_spec(candidate("OnnxRuntimeBackend", providers=["CPUExecutionProvider"], opset=17, io_binding=False))
    assert spec.candidates[0].make_config().providers == ("CPUExecutionProvider",)
    assert parse_spec(candidate("orchestrator.sim.fault_backends:FaultBackend", seconds=2)).candidates[0].make_config().seconds == 2  # int for a float


def test_wrong_types_in_the_specs_own_fields_are_refused():
    message = error_of(base(workers={"use_gpus": "false", "cpu_slots": True}, batch_sizes=["8"]))
    assert "workers.use_gpus: expected a boolean, got the string 'false'" in message
    assert "workers.cpu_slots: expected an integer, got the boolean True" in message
    assert "batch_sizes[0]: expected an integer, got the string '8'" in message


# -- 9. what else a worker would refuse -----------------------------------------------------------
def test_duplicate_input_names_are_refused():
    message = error_of(with_model(inputs=[{"name": "x", "shape": [8]}, {"name": "x", "shape": [8]}]))
    assert "models[0].inputs[1].name: input name 'x' is used twice" in message


def test_keyword_input_without_a_name_is_refused():
    assert "models[0].inputs[0].name: a keyword input needs a name" in error_of(with_input(kwarg=True))


def test_batch_axis_out_of_range_is_refused():
    assert "models[0].inputs[0].batch_axis: batch_axis 3 is outside 0..1" in error_of(with_input(batch_axis=3))


def test_latency_budget_without_its_objective_is_refused():
    message = error_of(base(latency_budget_ms=5))
    assert "latency_budget_ms: latency_budget_ms is only used with objective latency_budget, not min_latency" in message


def test_duplicate_model_names_and_batch_sizes_are_refused():
    data = base(batch_sizes=[1, 1])
    data["models"].append(dict(data["models"][0]))
    message = error_of(data)
    assert "models[1].name: model names must be unique; 'm' is also models[0]" in message
    assert "  batch_sizes: batch_sizes repeat a value: [1, 1]" in message
    assert "models[0].batch_sizes: batch_sizes repeat a value: [2, 2]" in error_of(with_model(batch_sizes=[2, 2]))


def test_deploy_target_asking_for_true_gpus_is_refused():
    assert "deploy.targets[0]: deploy target {'gpus': True} must ask for a positive number" in error_of(base(deploy={"targets": [{"gpus": True}]}))


def test_the_decision_section_has_defaults_and_refuses_bad_values_with_their_paths():
    rule = parse_spec(base()).decision.rule()
    assert (rule.cap_s, rule.min_rounds, rule.max_rounds, rule.tie, rule.reach) == (30.0, 10, 1000, 0.03, 2.5)
    custom = parse_spec(base(decision={"cap_s": 5, "min_rounds": 20, "tie": 0.01})).decision.rule()
    assert (custom.cap_s, custom.min_rounds, custom.tie) == (5.0, 20, 0.01)
    message = error_of(base(decision={"min_rounds": 50, "max_rounds": 20, "cap_s": 0, "tie": 0.7, "reach": 3,
                                      "reach_disturbed": 2, "rounds": 5}))
    for path in ("decision.cap_s", "decision.tie", "decision.rounds"):  # every field problem at once
        assert path in message, (path, message)
    assert "min_rounds 50 is above max_rounds 20" in error_of(base(decision={"min_rounds": 50, "max_rounds": 20}))
    assert "reach_disturbed 2.0 is below reach 3.0" in error_of(base(decision={"reach": 3, "reach_disturbed": 2}))


@pytest.mark.parametrize("seed", [10**23, 2**40 + 1, -1])
def test_a_seed_torch_cant_take_is_refused_before_anything_starts(seed):
    # 10**23 used to pass, start Ray, then fail with "Overflow when unpacking long long"
    assert "models[0].seed" in error_of(with_model(seed=seed))


def test_the_largest_seed_makes_samples():
    from orchestrator.planning.candidates import make_sample

    spec = parse_spec(with_model(seed=2**40))
    assert make_sample(spec.models[0], 64).args[0].shape == (64, 8)
