"""A worker's models and their eager fp32 references: each model loaded and checked against the
driver's fingerprint, each reference run on the spec's sample, for the worker's cache to keep."""

from __future__ import annotations

from typing import Any

import torch

from aitune.specs import Sample
from aitune.torch.tree import map_tensors
from orchestrator.planning.candidates import load_model, make_sample, model_fingerprint, not_deterministic
from orchestrator.spec.models import ModelSpec
from orchestrator.worker import hygiene
from orchestrator.worker.failures import NotDeterministicModel, ReferenceFailed


def load_checked(model_spec: ModelSpec, fingerprint: str, device: torch.device) -> torch.nn.Module:
    """The model on ``device``; NotDeterministicModel where its weights are not those the driver
    fingerprinted (``fingerprint``; empty: not checked)."""
    module = load_model(model_spec)
    if fingerprint and model_fingerprint(module) != fingerprint:
        raise NotDeterministicModel(not_deterministic(model_spec.name, model_spec.factory)
                                    + " (this worker's weights differ from the driver's)")
    return module.to(device)


def run_reference(model_spec: ModelSpec, module: torch.nn.Module, batch: int,
                  device: torch.device, lengths: dict[str, int] | None = None) -> tuple[Sample, Any]:
    """The sample at ``batch`` and the model's eager outputs on it; ReferenceFailed where the model
    (or its sample factory) fails, unless the device's trouble is to blame (out of memory, a
    poisoned CUDA context), which is raised as it is and handled as such."""
    try:
        sample = make_sample(model_spec, batch, lengths).to(device)
        with torch.inference_mode():
            out = map_tensors(sample(module), lambda t: t.detach().clone())
    except Exception as exc:
        if hygiene.is_oom(exc) or hygiene.must_recycle(exc):
            raise
        raise ReferenceFailed(str(exc)) from exc
    return sample, out
