"""Memory hygiene for long-lived workers: what a candidate left behind, and when to recycle."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

MB = 2**20
GPU_DEFAULT_MARGIN_MB = 256.0


@dataclass(frozen=True)
class MemorySnapshot:
    allocated: int  # GPU: bytes held by tensors; CPU: resident set size
    reserved: int  # GPU: bytes the caching allocator holds; CPU: resident set size


def snapshot(device: torch.device) -> MemorySnapshot:
    if device.type == "cuda":
        return MemorySnapshot(torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))
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


def recycle_reason(before: MemorySnapshot, after: MemorySnapshot, margin: float | None, oom: bool) -> str | None:
    """Why the worker should start afresh, or None: out of memory, or more than ``margin`` MB left behind."""
    if oom:
        return "out of memory during the candidate"
    if margin is None:
        return None
    left = after.allocated - before.allocated
    if left > margin * MB:
        return f"the candidate left {left / MB:.0f} MB behind (margin {margin:.0f} MB)"
    return None


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
