"""BackendConfig: describe(), JSON round trips, and keys that are the same in every process."""

from __future__ import annotations

import dataclasses
import enum
import json
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import torch

from aitune.canonical import CanonicalError, canonical_json, canonicalize, sha256_of
from aitune.torch.backend import (
    OnnxRuntimeConfig,
    TorchEagerBackend,
    TorchEagerConfig,
    TorchInductorAotConfig,
    TorchInductorJitConfig,
)
from aitune.torch.backend.backend import BackendConfig
from aitune_helpers import PYTHON, WrongOutputBackend, subprocess_env
from keyconf import KeyConf, Mode, changed

SEEDS = ("0", "1", "12345")


# -- describe ----------------------------------------------------------------------------------
def test_describe_is_empty_when_nothing_changed():
    assert KeyConf().describe() == ""
    assert TorchEagerConfig().describe() == ""
    assert OnnxRuntimeConfig().describe() == ""


def test_describe_lists_only_the_changed_fields_in_field_order():
    assert TorchEagerConfig(precision="fp16", channels_last=True).describe() == "precision=float16,channels_last=True"
    assert KeyConf(level=3).describe() == "level=3"
    assert KeyConf(dtype=torch.bfloat16, mode=Mode.SAFE).describe() == "dtype=bfloat16,mode=safe"


def test_describe_treats_equal_values_in_another_order_as_unchanged():
    default = KeyConf()
    same = KeyConf(tags=frozenset(sorted(default.tags, reverse=True)), options={"a": 1, "b": 2})
    assert same.describe() == ""


def test_describe_writes_sets_sorted():
    assert KeyConf(tags=frozenset({"b", "c", "a"})).describe() == "tags=['a', 'b', 'c']"


# -- to_dict / to_json / from_dict -------------------------------------------------------------------
CONFIGS = [
    TorchEagerConfig(),
    TorchEagerConfig(precision="bf16", autocast=True, channels_last=True, inference_mode=False),
    TorchInductorJitConfig(options={"max_autotune": False, "epilogue_fusion": True}, dynamic=False),
    TorchInductorAotConfig(precision="float16"),
    OnnxRuntimeConfig(opset=18, providers=("CUDAExecutionProvider", "CPUExecutionProvider"), intra_op_threads=2),
    KeyConf(),
    changed(),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{type(c).__name__}({c.describe()})")
def test_to_dict_is_plain_json_and_round_trips(config, tmp_path):
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON values only
    restored = type(config).from_dict(data)
    assert restored == config
    assert restored.key() == config.key()
    path = config.to_json(tmp_path / "config.json")
    assert path == tmp_path / "config.json"
    on_disk = json.loads(path.read_text())
    assert on_disk == data
    assert type(config).from_dict(on_disk) == config


def test_to_dict_writes_dtypes_by_name_enums_by_value_and_sets_sorted():
    data = changed().to_dict()
    assert data["dtype"] == "bfloat16"
    assert data["mode"] == "safe"
    assert data["tags"] == ["u", "v", "w", "x", "y", "z"]
    assert data["options"] == {"a": 1, "b": 2}


def test_from_dict_restores_typed_fields():
    restored = KeyConf.from_dict(changed().to_dict())
    assert restored.dtype is torch.bfloat16
    assert restored.mode is Mode.SAFE
    assert isinstance(restored.tags, frozenset)


def test_from_dict_refuses_unknown_fields_naming_them():
    data = TorchEagerConfig().to_dict() | {"bogus": 1, "also_bogus": 2}
    with pytest.raises(ValueError, match=r"TorchEagerConfig has no field\(s\) \['also_bogus', 'bogus'\]; known fields: \["):
        TorchEagerConfig.from_dict(data)


def test_from_dict_runs_the_configs_own_validation():
    with pytest.raises(ValueError, match="precision 'float64' is not one of"):
        TorchEagerConfig.from_dict({"precision": "float64"})


def test_from_dict_fills_missing_fields_with_defaults():
    assert TorchEagerConfig.from_dict({"channels_last": True}) == TorchEagerConfig(channels_last=True)


# -- keys ----------------------------------------------------------------------------------------
def test_key_is_a_sha256_hex_digest():
    key = KeyConf().key()
    assert len(key) == 64 and int(key, 16) >= 0


def test_equal_configs_have_equal_keys_whatever_the_order_of_sets_and_dicts():
    tags = sorted(KeyConf().tags)
    a = KeyConf(tags=frozenset(tags), options={"a": 1, "b": 2})
    b = KeyConf(tags=set(reversed(tags)), options={"b": 2, "a": 1})
    assert a.key() == b.key() == KeyConf().key()


@pytest.mark.parametrize(
    "other",
    [changed(), KeyConf(level=2), KeyConf(dtype=torch.float32), KeyConf(mode=Mode.SAFE), KeyConf(tags=frozenset({"alpha"})), KeyConf(options={"a": 1})],
    ids=["changed", "level", "dtype", "mode", "tags", "options"],
)
def test_different_configs_have_different_keys(other):
    assert other.key() != KeyConf().key()


def test_key_tells_config_classes_with_the_same_fields_apart():
    @dataclasses.dataclass
    class OtherEagerConfig(TorchEagerConfig):
        pass

    assert OtherEagerConfig().to_dict() == TorchEagerConfig().to_dict()
    assert OtherEagerConfig().key() != TorchEagerConfig().key()


def test_backend_key_tells_backend_classes_apart():
    assert TorchEagerBackend().key() == TorchEagerBackend(TorchEagerConfig()).key()
    assert TorchEagerBackend().key() != WrongOutputBackend().key()
    assert TorchEagerBackend().key() != TorchEagerBackend(TorchEagerConfig(precision="bf16")).key()


_CHILD = """
import json, keyconf
from aitune.torch.backend import TorchEagerBackend, TorchInductorJitConfig, OnnxRuntimeConfig
print(json.dumps({
    "default": keyconf.key_of("default"),
    "changed": keyconf.key_of("changed"),
    "jit": TorchInductorJitConfig(options={"b": 1, "a": 2}).key(),
    "onnx": OnnxRuntimeConfig().key(),
    "backend": TorchEagerBackend().key(),
    "tag_order": list(keyconf.KeyConf().tags),
}))
"""


def _parent_keys() -> dict[str, str]:
    return {
        "default": KeyConf().key(),
        "changed": changed().key(),
        "jit": TorchInductorJitConfig(options={"b": 1, "a": 2}).key(),
        "onnx": OnnxRuntimeConfig().key(),
        "backend": TorchEagerBackend().key(),
    }


def test_keys_are_identical_across_processes_with_different_hash_seeds():
    parent = _parent_keys()
    orders = set()
    for seed in SEEDS:
        proc = subprocess.run(
            [PYTHON, "-c", _CHILD], env=subprocess_env(PYTHONHASHSEED=seed), capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        orders.add(tuple(child.pop("tag_order")))
        assert child == parent, f"keys differ with PYTHONHASHSEED={seed}"
    # The set really iterates in another order under another seed, so a key that followed the
    # iteration order would have failed above.
    assert len(orders) > 1


# -- canonicalize ----------------------------------------------------------------------------------
def test_canonicalize_refuses_an_absolute_path():
    with pytest.raises(CanonicalError, match=r"config\.cache: absolute path '/tmp/somewhere' would make the key machine-specific"):
        canonicalize(Path("/tmp/somewhere"), "config.cache")


def test_canonicalize_keeps_a_relative_path_in_posix_form():
    assert canonicalize(Path("a") / "b.txt") == "a/b.txt"
    assert canonicalize(PurePosixPath("x/y")) == "x/y"


def test_canonicalize_refuses_arbitrary_objects():
    class Thing:
        pass

    with pytest.raises(CanonicalError, match=r"opts\.thing: Thing has no canonical JSON form"):
        canonicalize({"thing": Thing()}, "opts")
    with pytest.raises(CanonicalError):
        canonicalize(object())
    with pytest.raises(CanonicalError):
        canonicalize(lambda: 0)


def test_canonicalize_refuses_non_finite_floats_and_non_string_keys():
    with pytest.raises(CanonicalError, match="non-finite"):
        canonicalize(float("nan"))
    with pytest.raises(CanonicalError, match="must be a string"):
        canonicalize({(1, 2): "x"})


def test_canonical_error_is_a_type_error():
    assert issubclass(CanonicalError, TypeError)


def test_config_with_an_absolute_path_has_no_key():
    @dataclasses.dataclass
    class PathConfig(BackendConfig):
        cache: Path = Path("relative/dir")

    assert PathConfig().to_dict() == {"cache": "relative/dir"}
    with pytest.raises(CanonicalError, match=r"PathConfig\.cache: absolute path"):
        PathConfig(cache=Path("/abs/dir")).key()


def test_canonicalize_writes_enums_by_value_even_str_and_int_enums():
    class Color(str, enum.Enum):
        RED = "red"

    class Level(enum.IntEnum):
        HIGH = 2

    assert canonicalize({"c": Color.RED, "l": Level.HIGH, "m": Mode.FAST}) == {"c": "red", "l": 2, "m": "fast"}
    for value in canonicalize([Color.RED, Level.HIGH]):
        assert type(value) in (str, int)

    @dataclasses.dataclass
    class EnumConfig(BackendConfig):
        color: Color = Color.RED
        level: Level = Level.HIGH

    assert EnumConfig().to_dict() == {"color": "red", "level": 2}
    assert type(EnumConfig().to_dict()["color"]) is str
    assert EnumConfig(level=Level(2)).describe() == ""


def test_canonical_json_is_compact_and_sorted():
    assert canonical_json({"b": {torch.float16, torch.float32}, "a": torch.bfloat16}) == '{"a":"bfloat16","b":["float16","float32"]}'
    assert sha256_of({"a": 1, "b": 2}) == sha256_of({"b": 2, "a": 1})
