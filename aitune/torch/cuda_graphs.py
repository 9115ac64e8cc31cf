"""Capture a callable into CUDA graphs, one per input shape, and replay it.

Replaying a graph launches every kernel with one call, removing the per-kernel CPU overhead that
dominates small batches. A graph runs on fixed memory: inputs are copied into static buffers
and outputs come back in static buffers that the next replay overwrites.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from aitune.specs import Sample
from aitune.torch.tree import map_tensors


def shape_key(sample: Sample) -> tuple:
    """What a graph is specialised for: every tensor's shape, dtype and layout."""
    return tuple(
        (name, tuple(t.shape), str(t.dtype), t.is_contiguous(memory_format=torch.channels_last) if t.dim() == 4 else None)
        for name, t in sample.named_tensors().items()
    )


class CudaGraphRunner:
    """Wraps ``fn``; the first call with a new input shape captures a graph, later ones replay it."""

    def __init__(self, fn: Callable[..., Any], warmup_iters: int = 3, clone_outputs: bool = False) -> None:
        self.fn = fn
        self.warmup_iters = warmup_iters
        self.clone_outputs = clone_outputs
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Sample, Any]] = {}
        self._pool = None

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def _capture(self, sample: Sample) -> tuple[torch.cuda.CUDAGraph, Sample, Any]:
        static = sample.map(lambda t: t.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # Warm up on a side stream: lazy initialisation (cuBLAS handles, autotuning) must not
        # happen inside the capture.
        with torch.cuda.stream(stream):
            for _ in range(self.warmup_iters):
                static(self.fn)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one pool shared by every shape
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = static(self.fn)
        return graph, static, out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sample = Sample(args, kwargs)
        key = shape_key(sample)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(sample)
        graph, static, out = entry
        for dst, src in zip(static.named_tensors().values(), sample.named_tensors().values()):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return map_tensors(out, lambda t: t.clone()) if self.clone_outputs else out

    def reset(self) -> None:
        """Drop every graph and its memory."""
        self._graphs.clear()
        self._pool = None
