"""From a spec to jobs: models, samples, fingerprints, candidate sets and job keys."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from aitune.canonical import sha256_of
from aitune.defaults import candidates_for, is_baseline
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend.registry import config_fields, config_key, display_name, make_backend
from aitune.torch.module_ref import attach_factory, import_object
from orchestrator.records import Job
from orchestrator.spec import CandidateSpec, ModelSpec, SweepSpec


def load_model(spec: ModelSpec) -> torch.nn.Module:
    """Build the model from its factory, tagged so that eager/JIT checkpoints can rebuild it."""
    module = import_object(spec.factory)(**spec.kwargs)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"model {spec.name!r}: factory {spec.factory!r} returned {type(module).__name__}, not an nn.Module")
    return attach_factory(module.eval(), spec.factory, spec.kwargs)


def make_sample(spec: ModelSpec, batch_size: int) -> Sample:
    """The sample for one batch size: the same values in every process (seeded by the spec)."""
    if spec.sample_factory:
        sample = import_object(spec.sample_factory)(batch_size=batch_size, seed=spec.seed)
        if not isinstance(sample, Sample):
            sample = Sample(tuple(sample) if isinstance(sample, (tuple, list)) else (sample,))
        return sample
    gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + batch_size)
    args, kwargs = [], {}
    for i, inp in enumerate(spec.inputs):
        shape = list(inp.shape)
        shape.insert(inp.batch_axis, batch_size)
        dtype = getattr(torch, inp.dtype)
        if dtype.is_floating_point:
            if inp.range is not None:
                lo, hi = inp.range
                value = torch.rand(shape, generator=gen) * (hi - lo) + lo
            else:
                value = torch.randn(shape, generator=gen)
            value = value.to(dtype)
        elif dtype == torch.bool:
            value = torch.ones(shape, dtype=torch.bool)
        else:
            lo, hi = inp.int_range or (0, 2)
            value = torch.randint(lo, hi, shape, generator=gen, dtype=dtype)
        if inp.kwarg:
            kwargs[inp.name] = value
        else:
            args.append(value)
    return Sample(tuple(args), kwargs)


def graph_spec_of(spec: ModelSpec, sample: Sample) -> GraphSpec:
    """Input names from the spec where given; the key depends on shapes, dtypes and names only."""
    graph = GraphSpec.from_sample(sample)
    if spec.inputs:
        positional = [i.name for i in spec.inputs if not i.kwarg]
        renamed = []
        for j, t in enumerate(graph.inputs):
            name = positional[j] if j < len(positional) and positional[j] and t.name.startswith("input_") else t.name
            renamed.append(type(t)(name, t.shape, t.dtype, t.dynamic_axes))
        graph = GraphSpec(tuple(renamed), (), graph.kwarg_names)
    return graph


def model_fingerprint(module: torch.nn.Module) -> str:
    """The model's class and a hash of its weights: same factory, other weights, other model."""
    digest = hashlib.sha256()
    klass = type(module)
    digest.update(f"{klass.__module__}:{klass.__qualname__}".encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def job_key(fingerprint: str, backend: str, config_key: str, graph_spec: dict[str, Any], device_class: dict[str, Any]) -> str:
    return sha256_of(
        {"model": fingerprint, "backend": backend, "config": config_key, "graph_spec": graph_spec, "device_class": device_class}
    )


def candidate_specs(spec: SweepSpec, device_type: str) -> list[CandidateSpec]:
    """The spec's candidates, or the device type's default set; the eager fp32 baseline always."""
    if spec.candidates is not None:
        chosen = list(spec.candidates)
    else:
        chosen = [CandidateSpec(backend=name, config=fields) for name, fields in candidates_for(device_type)]
    if not any(is_baseline(c.backend, c.config) for c in chosen):
        chosen.insert(0, CandidateSpec(backend="TorchEagerBackend", config={}))
    return chosen


def expand(
    spec: SweepSpec,
    fingerprints: dict[str, str],
    device_classes: dict[str, dict[str, Any]],
) -> list[Job]:
    """Every (device class, model, batch size, candidate), with its key; equal keys appear once."""
    jobs: dict[str, Job] = {}
    for dc_key, device_class in device_classes.items():
        candidates = candidate_specs(spec, device_class["device_type"])
        for model in spec.models:
            for batch in spec.batches_of(model):
                graph = graph_spec_of(model, make_sample(model, batch)).to_dict()
                for cand in candidates:
                    backend = make_backend(cand.backend, cand.config)
                    key = job_key(fingerprints[model.name], cand.backend, config_key(backend), graph, device_class)
                    if key in jobs:
                        continue  # the same candidate written twice (or two spellings of one config)
                    jobs[key] = Job(
                        key=key,
                        model=model.name,
                        batch_size=batch,
                        backend=cand.backend,
                        config=config_fields(backend),
                        candidate=display_name(backend),
                        device_class_key=dc_key,
                        model_fingerprint=fingerprints[model.name],
                        graph_spec=graph,
                    )
    return list(jobs.values())
