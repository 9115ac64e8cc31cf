"""A worker's garbage collection: what outlives each candidate is frozen, and thawed now and then.

What survives a release is long-lived: the models, and libraries' caches (Inductor's, the ONNX
exporter's). Once a worker has compiled and exported, that is ~400k objects, and walking them
cost 0.25 s per full collection: most of a small candidate's time. :class:`HeapClock` freezes
them, so later collections skip them, and thaws and collects the heap whole once the time since
the last full collection is enough for that collection's cost to be at most THAW_SHARE of it (and
before a suspected leak is judged), so objects that turned into garbage after being frozen are
not kept for long, and a stream of tiny candidates does not pay a full collection every few.
"""

from __future__ import annotations

import gc
import time

import torch

#: the most of a CPU worker's time that thawing its heap and collecting it whole may take: after a
#: full collection that took t seconds, the next is due t / THAW_SHARE seconds later
THAW_SHARE = 0.02


def freeze_heap() -> None:
    """Move what is alive now (torch, Ray, the models) out of the garbage collector's sight.

    Releasing a candidate runs ``gc.collect()``; over the ~250k long-lived objects of a worker
    that costs ~0.1 s a time, which on a small machine with many workers was most of the
    scheduling overhead. Frozen objects are never collected, which is right for these.
    """
    gc.collect()
    gc.freeze()


class HeapClock:
    """When this worker's next full collection (the heap thawed) falls due, and what each event does."""

    def __init__(self) -> None:
        self.thaw_at = 0.0  # time.monotonic() from which the next candidate's close thaws the heap

    def full_collection(self) -> None:
        """Collect and freeze the heap (thawed, or never frozen yet), and set when the next thaw
        is due from what this one cost."""
        start = time.monotonic()
        freeze_heap()
        now = time.monotonic()
        self.thaw_at = now + (now - start) / THAW_SHARE

    def model_loaded(self, evicted: bool) -> None:
        """After a model joined the cache: what the cache let go of (``evicted``) goes now, even where
        it is frozen garbage (a model in a reference cycle), for a model's worth of memory is worth a
        full collection. Else only the new model is frozen with the rest, and not by a full
        collection, so that the clock of the next one stays as it is: timed from this cheap one, a
        thaw would fall due within a second, after nearly every model's first candidate."""
        if evicted:
            gc.unfreeze()
            self.full_collection()
        else:
            freeze_heap()

    def freeze_or_thaw(self, device: torch.device, collected: bool) -> None:
        """Freeze what outlived the candidate just released (``collected``: the memory check has
        just collected the heap), or thaw and collect it whole where that is due.

        Only on CPU workers: on a GPU, garbage kept frozen may hold device memory, which the next
        candidate needs and the leak check (measured from each candidate's start) would not see.
        """
        if device.type != "cpu":
            return
        if time.monotonic() >= self.thaw_at:
            gc.unfreeze()
            self.full_collection()
        elif collected:
            gc.freeze()
        else:
            freeze_heap()
