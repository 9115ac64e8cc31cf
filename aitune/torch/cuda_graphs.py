"""Capture a callable into CUDA graphs, one per input shape, and replay it.

Replaying a graph launches every kernel with one call, removing the per-kernel CPU overhead that
dominates small batches. A graph runs on fixed memory: inputs are copied into static buffers
and outputs come back in static buffers that the next replay overwrites, unless the runner
clones them (``clone_outputs``, on by default).

Measuring and checking read each output before the next call, so they turn the clones off with
:func:`without_output_clones`: what they time is the graph, not the copy.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Callable, Iterator

import torch

from aitune.specs import Sample
from aitune.torch.tree import map_tensors

log = logging.getLogger(__name__)

#: the capture's cudaStreamCaptureMode: "thread_local" forbids unsafe CUDA calls (a cudaMalloc,
#: a sync) only in the capturing thread, so a served model whose new version is captured on a
#: loader thread doesn't fail, nor make fail, the requests another thread is answering
CAPTURE_ERROR_MODE = "thread_local"


class CudaGraphCaptureError(RuntimeError):
    """A CUDA graph capture failed.

    The caller's stream is current again when this is raised, but the CUDA context may still be
    unusable (the caching allocator's capture bookkeeping, a sticky CUDA error): a long-lived
    process should start afresh rather than run the next candidate in it.
    """


_OUTPUTS_READ_AT_ONCE: contextvars.ContextVar[bool] = contextvars.ContextVar("aitune_outputs_read_at_once", default=False)


@contextlib.contextmanager
def without_output_clones() -> Iterator[None]:
    """Within this block, backends skip their ``clone_outputs`` copy.

    For callers that read or copy every output before the next call (measuring, checking): for
    them the copy is wasted work, and it would be timed as part of the candidate.
    """
    token = _OUTPUTS_READ_AT_ONCE.set(True)
    try:
        yield
    finally:
        _OUTPUTS_READ_AT_ONCE.reset(token)


def clones_wanted(clone_outputs: bool) -> bool:
    """Whether a backend configured with ``clone_outputs`` should copy its outputs now."""
    return clone_outputs and not _OUTPUTS_READ_AT_ONCE.get()


def clone_tensors(value: Any) -> Any:
    """``value`` with every tensor cloned, through tuples, lists, dicts, model outputs and dataclasses."""
    return map_tensors(value, lambda t: t.clone())


def shape_key(sample: Sample) -> tuple:
    """What a graph is specialised for: every tensor's device, shape, dtype and layout."""
    return tuple(
        (name, str(t.device), tuple(t.shape), str(t.dtype),
         t.is_contiguous(memory_format=torch.channels_last) if t.dim() == 4 else None)
        for name, t in sample.named_tensors().items()
    )


def sample_device(sample: Sample) -> torch.device:
    """The CUDA device of the sample's first CUDA tensor (else the current CUDA device)."""
    for t in sample.named_tensors().values():
        if t.is_cuda:
            return t.device
    return torch.device("cuda", torch.cuda.current_device())


def capture(graph: torch.cuda.CUDAGraph, call: Callable[[], Any], stream: torch.cuda.Stream, pool=None) -> Any:
    """Record ``call()`` into ``graph`` on ``stream`` (on the current device); returns its outputs.

    ``pool``: the memory pool the graph allocates from (a new one from ``graph_pool_handle()``
    when None). Unlike ``torch.cuda.graph``, a failure leaves the caller's stream current (there,
    a failing ``capture_end`` skips restoring it, and every later kernel of the process lands on
    the capture stream), tells the caching allocator that the capture is over (else every later
    capture in the process fails with "already recording to mempool_id") and raises
    :class:`CudaGraphCaptureError`.
    """
    if pool is None:
        pool = torch.cuda.graph_pool_handle()
    device_index = torch.cuda.current_device()
    previous = torch.cuda.current_stream()
    error: BaseException | None = None
    began = False
    out = None
    torch.cuda.set_stream(stream)
    try:
        try:
            graph.capture_begin(pool=pool, capture_error_mode=CAPTURE_ERROR_MODE)
            began = True
            out = call()
        except Exception as exc:  # the capture must still be ended, or the stream stays capturing
            error = exc
        if began:
            try:
                graph.capture_end()
            except Exception as exc:
                error = error or exc
    finally:
        torch.cuda.set_stream(previous)
    if error is not None:
        _stop_allocating_to_pool(graph, device_index, pool, began)
        raise CudaGraphCaptureError(
            f"CUDA graph capture failed: {type(error).__name__}: {error}; "
            "the CUDA context may be unusable now, start a fresh process before trusting it"
        ) from error
    return out


def _stop_allocating_to_pool(graph: torch.cuda.CUDAGraph, device_index: int, pool, began: bool) -> None:
    """After a failed capture: end allocation to ``pool`` and drop the failed capture's hold on it.

    ``capture_end`` tells the caching allocator that the capture is over only once
    ``cudaStreamEndCapture`` succeeded; failing before that, the allocator keeps sending this
    thread's allocations to ``pool``, and the next capture into it fails with "already recording
    to mempool_id". The capture also took a reference to the pool that only a graph whose capture
    ended gives back (``graph.pool()`` raises for one that did not): without giving it back here,
    the pool's memory is never freed. ``capture_begin`` itself may fail after redirecting the
    allocator (``began`` False): then too, where the allocator was recording to the pool.
    """
    end = getattr(torch._C, "_cuda_endAllocateToPool", None)
    ended_here = False
    if end is not None:
        try:
            end(device_index, pool)
            ended_here = True
        except Exception as exc:  # capture_end got that far itself, or capture_begin never got there
            log.debug("after a failed CUDA graph capture, the allocator was not recording to pool %s: %s", pool, exc)
    if not began and not ended_here:
        return  # capture_begin failed before it touched the allocator: the pool was never taken
    try:
        graph.pool()
        return  # the capture ended: the graph gives its pool reference back when it goes
    except Exception:
        pass  # never ended: nothing else will release the capture's reference
    release = getattr(torch._C, "_cuda_releasePool", None)
    if release is None:
        log.warning("after a failed CUDA graph capture: this torch has no _cuda_releasePool; pool %s keeps its memory", pool)
        return
    try:
        release(device_index, pool)
    except Exception as exc:
        log.warning("after a failed CUDA graph capture: releasing pool %s failed: %s", pool, exc)


class CudaGraphRunner:
    """Wraps ``fn``; the first call with a new input shape captures a graph, later ones replay it.

    Buffers are made, captured, filled and replayed under ``torch.inference_mode`` on the inputs'
    device: a graph replays kernels, autograd has no part in it, and a static buffer made under
    inference mode can only be written there. ``clone_outputs`` returns copies that the next call
    leaves alone; off, the outputs are the graph's own buffers (see :func:`without_output_clones`).
    """

    def __init__(self, fn: Callable[..., Any], warmup_iters: int = 3, clone_outputs: bool = True) -> None:
        self.fn = fn
        self.warmup_iters = warmup_iters
        self.clone_outputs = clone_outputs
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Sample, Any, torch.device]] = {}
        self._pools: dict[torch.device, Any] = {}  # one pool per device, shared by its shapes
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def _capture(self, sample: Sample, device: torch.device) -> tuple[torch.cuda.CUDAGraph, Sample, Any, torch.device]:
        static = sample.map(lambda t: t.clone())
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        # Warm up on the side stream: lazy initialisation (cuBLAS handles, autotuning) must not
        # happen inside the capture.
        with torch.cuda.stream(stream):
            for _ in range(self.warmup_iters):
                static(self.fn)
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        if device not in self._pools:
            self._pools[device] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            out = capture(graph, lambda: static(self.fn), stream, self._pools[device])
        except CudaGraphCaptureError:
            if not any(static_device == device for _, _, _, static_device in self._graphs.values()):
                # the failed capture gave back the pool's only reference: the allocator may be
                # freeing it, and a capture into a pool nothing holds is refused; start a new one
                del self._pools[device]
            raise
        return graph, static, out, device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sample = Sample(args, kwargs)
        device = sample_device(sample)
        key = shape_key(sample)
        with torch.cuda.device(device), torch.inference_mode():
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._graphs[key] = self._capture(sample, device)
            graph, static, out, _ = entry
            for dst, src in zip(static.named_tensors().values(), sample.named_tensors().values()):
                dst.copy_(src, non_blocking=True)
            graph.replay()
        # Cloned in the caller's mode: outside inference mode the copies are ordinary tensors.
        return clone_tensors(out) if clones_wanted(self.clone_outputs) else out

    def capture_now(self, sample: Sample) -> None:
        """Capture ``sample``'s shape now (if not captured yet), without keeping the outputs.

        For a model being loaded to serve: every tuned shape is captured while the version
        loads, before it answers requests, not on the first request of each shape.
        """
        with without_output_clones():
            sample(self)

    def reset(self) -> None:
        """Drop every graph and its memory."""
        self._graphs.clear()
        self._pools.clear()
        self._streams.clear()
