"""Memory hygiene for long-lived workers: what a candidate left behind, and when to recycle."""

from __future__ import annotations

import gc
import os
import resource
from dataclasses import dataclass

import torch

from aitune.torch.cuda_graphs import CudaGraphCaptureError

MB = 2**20
GPU_DEFAULT_MARGIN_MB = 256.0

# CUDA errors after which the context can't be trusted: the sticky ones (every later call fails
# too) and the capture ones (the caching allocator may still believe a capture is under way).
_POISONING_CUDA_ERRORS = (
    "an illegal memory access was encountered",
    "device-side assert triggered",
    "unspecified launch failure",
    "misaligned address",
    "an illegal instruction was encountered",
    "operation not permitted when stream is capturing",
    "operation not permitted on an event last recorded in a capturing stream",
    "operation failed due to a previous error during capture",
    "capture sequence",  # a fork never joined, a capture ended from another thread
)


@dataclass(frozen=True)
class MemorySnapshot:
    allocated: int  # GPU: bytes held by tensors; CPU: resident set size
    reserved: int  # GPU: bytes the caching allocator holds; CPU: resident set size
    #: GPU only: bytes in use on the whole device (``torch.cuda.mem_get_info``). It also counts
    #: what the caching allocator never sees: AOTInductor weights, TensorRT engines, the context.
    device_used: int | None = None

    @property
    def outside_allocator(self) -> int | None:
        """GPU: device memory in use that the caching allocator does not hold (None on a CPU)."""
        return None if self.device_used is None else self.device_used - self.reserved


def snapshot(device: torch.device) -> MemorySnapshot:
    if device.type == "cuda":
        allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        try:
            free, total = torch.cuda.mem_get_info(device)
            used = total - free
        except RuntimeError:  # a broken context answers nothing; the allocator's figures still stand
            used = None
        return MemorySnapshot(allocated, reserved, used)
    rss = _rss_bytes()
    return MemorySnapshot(rss, rss)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def margin_mb(configured: float | None, device: torch.device) -> float | None:
    """The configured margin, else 256 MB on a GPU and none on a CPU (its resident size is noisy)."""
    if configured is not None:
        return configured
    return GPU_DEFAULT_MARGIN_MB if device.type == "cuda" else None


def left_behind(before: MemorySnapshot, after: MemorySnapshot) -> tuple[int, int]:
    """Bytes a candidate left behind, and how many of them lie outside the caching allocator.

    The allocator's tensors always count. On a GPU, so does growth of what the device uses beyond
    the allocator's own reserve (weights an AOTInductor package or a TensorRT engine allocated
    themselves); memory the allocator merely caches does not: it is reused by the next candidate.
    """
    tensors = after.allocated - before.allocated
    if before.outside_allocator is None or after.outside_allocator is None:
        return tensors, 0
    outside = max(0, after.outside_allocator - before.outside_allocator)
    return tensors + outside, outside


def recycle_reason(before: MemorySnapshot, after: MemorySnapshot, margin: float | None, oom: bool) -> str | None:
    """Why the worker should start afresh, or None: out of memory, or more than ``margin`` MB left behind."""
    if oom:
        return "out of memory during the candidate"
    if margin is None:
        return None
    left, outside = left_behind(before, after)
    if left > margin * MB:
        where = f", {outside / MB:.0f} MB of it outside the caching allocator" if outside else ""
        return f"the candidate left {left / MB:.0f} MB behind{where} (margin {margin:.0f} MB)"
    return None


def memory_after(before: MemorySnapshot, device: torch.device, configured_margin_mb: float | None,
                 oom: bool) -> tuple[dict[str, int], str | None]:
    """What a candidate left behind once released (``before``: at its start), as a record's memory
    figures, and why the worker should be recycled (None: it need not be)."""
    gc.collect()
    after = snapshot(device)
    margin = margin_mb(configured_margin_mb, device)
    reason = recycle_reason(before, after, margin, oom)
    if reason is not None and not oom and gc.get_freeze_count():
        # Before calling it a leak: garbage among frozen objects (see worker/heap.py) counts too.
        gc.unfreeze()
        gc.collect()
        after = snapshot(device)
        reason = recycle_reason(before, after, margin, oom)
    left, outside = left_behind(before, after)
    figures = {"allocated_after": after.allocated, "reserved_after": after.reserved, "left_behind": left}
    if after.device_used is not None:  # GPUs: what the caching allocator does not see counts too
        figures.update(device_used_after=after.device_used, left_outside_allocator=outside)
    return figures, reason


def rss_parts() -> dict[str, int]:
    """This process's resident memory by kind, from /proc (empty where it does not say): its own
    pages (``anon``), mapped files (``file``: libraries), and shared memory (``shmem``: Ray's
    object store, whose pages count in RSS once the worker has written results there)."""
    fields = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    parts: dict[str, int] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                name = fields.get(line.partition(":")[0])
                if name:
                    parts[name] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return parts


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: kilobytes


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def must_recycle(exc: BaseException) -> str | None:
    """Why a worker must not run another candidate after ``exc``, or None.

    A failed CUDA graph capture or a sticky CUDA error leaves the process's CUDA context
    unusable or untrustworthy, whatever memory the candidate left: only a fresh process helps.
    Looks through the exception's causes too (a backend may wrap the CUDA error).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, CudaGraphCaptureError):
            return f"a CUDA graph capture failed ({_first_line(current)}): the CUDA context can't be trusted"
        text = str(current).lower()
        for marker in _POISONING_CUDA_ERRORS:
            if marker in text:
                return f"CUDA error '{marker}': the CUDA context can't be trusted"
        current = current.__cause__ or current.__context__
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:200]
