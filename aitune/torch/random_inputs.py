"""Random tensors that match a graph spec: for warming up and checking a deployed backend."""

from __future__ import annotations

import torch

from aitune.specs import GraphSpec, Sample


def sample_from_spec(spec: GraphSpec, device: torch.device | str = "cpu", seed: int = 0, high: int = 2) -> Sample:
    """A sample of ``spec``'s shapes: normal floats, integers in ``[0, high)`` (safe token ids and masks)."""
    gen = torch.Generator().manual_seed(seed)
    args, kwargs = [], {}
    for t in spec.inputs:
        if t.torch_dtype.is_floating_point:
            value = torch.randn(t.shape, generator=gen).to(t.torch_dtype)
        elif t.torch_dtype == torch.bool:
            value = torch.ones(t.shape, dtype=torch.bool)
        else:
            value = torch.randint(0, high, t.shape, generator=gen, dtype=t.torch_dtype)
        value = value.to(device)
        if t.name in spec.kwarg_names:
            kwargs[t.name] = value
        else:
            args.append(value)
    return Sample(tuple(args), kwargs)
