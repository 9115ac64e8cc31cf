"""The GPU default candidate set (filled in by the GPU-path work; eager variants until then)."""

from __future__ import annotations

from aitune.defaults import BASELINE, CandidateDef


def gpu_candidates() -> list[CandidateDef]:
    return [
        BASELINE,
        ("TorchEagerBackend", {"precision": "float16"}),
        ("TorchEagerBackend", {"precision": "bfloat16"}),
        ("TorchInductorJitBackend", {"precision": "float16"}),
        ("TorchInductorAotBackend", {"precision": "float16"}),
    ]
