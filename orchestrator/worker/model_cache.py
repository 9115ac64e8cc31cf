"""A worker's loaded models and their eager fp32 references, bounded by bytes, least recently used first out.

A worker that tunes many models in turn would otherwise hold every model it has ever seen.
The bound counts each model's parameters and buffers and its references' samples and outputs;
the model in use is never evicted, even when it alone is over the bound.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from aitune.torch.tree import flatten_tensors

MB = 2**20


def tensor_bytes(obj: Any) -> int:
    """Bytes held by the tensors of a module, a sample, or any nested output."""
    if isinstance(obj, torch.nn.Module):
        seen: set[int] = set()
        total = 0
        for t in [*obj.parameters(), *obj.buffers()]:
            if id(t) not in seen:  # tied weights count once
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total
    if hasattr(obj, "args") and hasattr(obj, "kwargs"):  # an aitune Sample
        return tensor_bytes(list(obj.args)) + tensor_bytes(dict(obj.kwargs))
    return sum(t.numel() * t.element_size() for _, t in flatten_tensors(obj))


@dataclass
class Entry:
    module: torch.nn.Module
    refs: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # batch -> (sample, outputs)
    nbytes: int = 0


class ModelCache:
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = int(limit_bytes)
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        #: models loaded and evicted so far (a model loaded twice counts twice)
        self.loads = 0
        self.evictions = 0

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    @property
    def names(self) -> list[str]:
        """Least recently used first."""
        return list(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def module(self, name: str) -> torch.nn.Module | None:
        entry = self._entries.get(name)
        if entry is None:
            return None
        self._entries.move_to_end(name)
        return entry.module

    def add_module(self, name: str, module: torch.nn.Module) -> None:
        self._entries[name] = Entry(module, nbytes=tensor_bytes(module))
        self._entries.move_to_end(name)
        self.loads += 1
        self._evict(keep=name)

    def reference(self, name: str, batch: int) -> tuple[Any, Any] | None:
        entry = self._entries.get(name)
        return None if entry is None else entry.refs.get(batch)

    def add_reference(self, name: str, batch: int, sample: Any, outputs: Any) -> None:
        entry = self._entries[name]
        entry.refs[batch] = (sample, outputs)
        entry.nbytes += tensor_bytes(sample) + tensor_bytes(outputs)
        self._entries.move_to_end(name)
        self._evict(keep=name)

    def _evict(self, keep: str) -> None:
        while self.nbytes > self.limit_bytes and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            del self._entries[oldest]
            self.evictions += 1


def default_limit_bytes(configured_mb: float | None, device: torch.device, slots_per_node: int = 1) -> int:
    """The configured bound, else half the device's memory on a GPU (the rest is for candidates),
    else a quarter of the host's memory shared by the node's worker slots."""
    if configured_mb is not None:
        return int(configured_mb * MB)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory // 2)
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        host = 8 * 1024 * MB
    return int(host // 4 // max(1, slots_per_node))
