"""A config with every kind of field whose canonical form could depend on the process.

Importable by name (``keyconf``) so that subprocesses with other ``PYTHONHASHSEED`` values
compute the key of the very same config.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from aitune.torch.backend.backend import BackendConfig


class Mode(enum.Enum):
    FAST = "fast"
    SAFE = "safe"


@dataclass
class KeyConf(BackendConfig):
    # enough strings that their set iteration order almost surely differs between hash seeds
    tags: frozenset[str] = frozenset({"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"})
    dtype: torch.dtype = torch.float16
    mode: Mode = Mode.FAST
    options: dict[str, int] = field(default_factory=lambda: {"b": 2, "a": 1})
    level: int = 1


def changed() -> KeyConf:
    """A config different from the default in its set, dtype and enum fields."""
    return KeyConf(tags=frozenset({"x", "y", "z", "w", "v", "u"}), dtype=torch.bfloat16, mode=Mode.SAFE)


def key_of(name: str) -> str:
    return {"default": KeyConf(), "changed": changed()}[name].key()
