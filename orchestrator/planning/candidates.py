"""From a spec to jobs: models, samples, fingerprints, candidate sets and job keys."""

from __future__ import annotations

import hashlib

import torch

from aitune.canonical import sha256_of, update_with_tensor
from aitune.defaults import candidates_for, is_baseline
from aitune.specs import GraphSpec, Sample
from aitune.torch.backend.registry import get_backend_class
from aitune.torch.module_ref import attach_factory, import_object
from orchestrator.spec.axes import shape_at
from orchestrator.spec.models import CandidateSpec, ModelSpec
from orchestrator.spec.schema import SweepSpec


def load_model(spec: ModelSpec) -> torch.nn.Module:
    """Build the model from its factory, tagged so that eager/JIT checkpoints can rebuild it."""
    module = import_object(spec.factory)(**spec.kwargs)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"model {spec.name!r}: factory {spec.factory!r} returned {type(module).__name__}, not an nn.Module")
    return attach_factory(module.eval(), spec.factory, spec.kwargs)


def make_sample(spec: ModelSpec, batch_size: int, lengths: dict[str, int] | None = None) -> Sample:
    """The sample for one batch size (and, where axes vary, one length per axis): the same values
    in every process (seeded by the spec and the lengths)."""
    lengths = lengths or {}
    if spec.sample_factory:
        extra = {"lengths": dict(lengths)} if spec.dynamic else {}
        sample = import_object(spec.sample_factory)(batch_size=batch_size, seed=spec.seed, **extra)
        if not isinstance(sample, Sample):
            sample = Sample(tuple(sample) if isinstance(sample, (tuple, list)) else (sample,))
        return sample
    seed = spec.seed * 1_000_003 + batch_size + sum(7919 * (i + 1) * n for i, (_, n) in enumerate(sorted(lengths.items())))
    gen = torch.Generator().manual_seed(seed)
    args, kwargs = [], {}
    for i, inp in enumerate(spec.inputs):
        shape = shape_at(inp.shape, lengths)
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


def structure_key(module: torch.nn.Module) -> str:
    """The model's class and its parameter and buffer names, shapes and dtypes, not their values:
    fine-tunes of one base share it, and with the graph spec and device class it names a family."""
    klass = type(module)
    return sha256_of({
        "class": f"{klass.__module__}:{klass.__qualname__}",
        "state": [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in sorted(module.state_dict().items())],
    })


class Toolchains:
    """Each job's toolchain (``Backend.toolchain``), by backend name, looked up once per name;
    None for a backend this process can't import (its jobs fail on their own, with their error)."""

    def __init__(self) -> None:
        self._by_backend: dict[str, str | None] = {}

    def __call__(self, job) -> str | None:
        name = job.backend
        if name not in self._by_backend:
            try:
                chain = get_backend_class(name).toolchain
            except Exception:
                chain = None
            self._by_backend[name] = chain if isinstance(chain, str) else None
        return self._by_backend[name]


def candidate_specs(spec: SweepSpec, device_type: str) -> list[CandidateSpec]:
    """The spec's candidates, or the device type's default set; the eager fp32 baseline always."""
    if spec.candidates is not None:
        chosen = list(spec.candidates)
    else:
        chosen = [CandidateSpec(backend=name, config=fields) for name, fields in candidates_for(device_type)]
    if not any(is_baseline(c.backend, c.config) for c in chosen):
        chosen.insert(0, CandidateSpec(backend="TorchEagerBackend", config={}))
    return chosen


def samples_key(spec: ModelSpec, batch_size: int, lengths: dict[str, int] | None = None) -> str:
    """What decides the check samples' values: the input specs or sample factory, the seed, the batch
    (and the lengths, for a model whose axes vary)."""
    key = {
        "inputs": [i.model_dump(mode="json") for i in spec.inputs] if spec.inputs else None,
        "sample_factory": spec.sample_factory, "seed": spec.seed, "batch_size": batch_size,
    }
    if lengths:
        key["lengths"] = dict(sorted(lengths.items()))
    return sha256_of(key)


class ModelLoadError(ValueError):
    """A model's factory failed or returned something that is not a module; names the spec field."""


def not_deterministic(name: str, factory: str) -> str:
    return (f"model {name!r}: factory {factory!r} is not deterministic: it made different weights in two builds, "
            "so each worker would tune a different model under one key; seed it, or load its weights")


def _build(i: int, model: ModelSpec, seed: int) -> torch.nn.Module:
    # Under a different global seed each time: a factory that leans on torch's global RNG (an
    # unseeded nn.Linear) then shows it here, before any worker starts.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return load_model(model)
        except TypeError as exc:
            raise ModelLoadError(f"models[{i}].factory: {exc}") from None
        except Exception as exc:  # the user's factory raised: say which model and what
            raise ModelLoadError(f"models[{i}].factory: {model.factory!r} raised {type(exc).__name__}: {exc}") from None


def identify_models(spec: SweepSpec, check_deterministic: bool = True) -> dict[str, tuple[str, str]]:
    """Each model's (weights fingerprint, structure key), one model in memory at a time, before
    any worker starts. Each is built twice (``check_deterministic``) and refused if the two differ."""
    found: dict[str, tuple[str, str]] = {}
    for i, model in enumerate(spec.models):
        module = _build(i, model, 0x5EED)
        fingerprint, structure = model_fingerprint(module), structure_key(module)
        del module
        if check_deterministic:
            again = _build(i, model, 0xD1CE)
            same = model_fingerprint(again) == fingerprint
            del again
            if not same:
                raise ModelLoadError(f"models[{i}]: {not_deterministic(model.name, model.factory)}")
        found[model.name] = (fingerprint, structure)
    return found


def evaluation_batches(samples: str, model: str, batch_size: int) -> list[Sample]:
    """The user's evaluation batches for a task gate (``accuracy.task.samples``): ``fn(model,
    batch_size)``'s items as samples; empty where it returns None (no task gate for that model)."""
    found = import_object(samples)(model, batch_size)
    if found is None:
        return []
    if isinstance(found, (torch.Tensor, Sample)):
        raise ValueError(f"accuracy.task.samples {samples} returned one batch for {model}; return a list of them")
    out = []
    for item in found:
        if not isinstance(item, Sample):
            item = Sample(tuple(item) if isinstance(item, (tuple, list)) else (item,))
        if not any(isinstance(t, torch.Tensor) for t in (*item.args, *item.kwargs.values())):
            raise ValueError(f"accuracy.task.samples {samples} gave {model} a batch with no tensor in it")
        out.append(item)
    return out


def batches_fingerprint(batches: list[Sample]) -> str:
    """SHA-256 of the batches' tensors (dtype, shape, bytes) in order: other values, another key."""
    digest = hashlib.sha256()
    for i, sample in enumerate(batches):
        for name, value in [*enumerate(sample.args), *sorted(sample.kwargs.items())]:
            digest.update(f"{i}:{name}:".encode())
            if isinstance(value, torch.Tensor):
                update_with_tensor(digest, value)
            else:
                digest.update(repr(value).encode())
    return digest.hexdigest()
