"""Setting up a worker process: its device, its logs, its compilers' threads.

Shared by the tuning workers and the deploy workers and Serve replicas (orchestrator.deploy).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch

from aitune.failures import trace
from aitune.torch.backend.backend import Backend
from orchestrator.error_text import summarize


def pick_device(kind: str) -> torch.device:
    """What torch sees decides the device, not what Ray granted (pretend GPUs have no CUDA)."""
    if kind == "gpu" and torch.cuda.is_available():
        return torch.device("cuda:0")  # Ray's CUDA_VISIBLE_DEVICES leaves this actor one GPU
    return torch.device("cpu")


class OneLineFailures(logging.Filter):
    """A failed build's traceback is its result's error (in the store and report.json); the
    worker's log, which Ray prints on the driver's console, says it in one line: a sweep of many
    models whose exports fail would otherwise print a page of torch.export's traceback for each."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            said = summarize(trace(exc), 240)
            record.msg = f"{record.getMessage()}: {said} (its traceback: the result's error, in report.json)"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


def quiet_libraries() -> None:
    """Keep worker logs to what matters: the ONNX exporter and torch's pytree are chatty, and a
    failed build is a line, not its traceback."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # a data-dependent branch makes it print the graph it traced, page after page, before the
    # export fails with an error that says the same in a line (the result's)
    logging.getLogger("torch.fx.experimental.symbolic_shapes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    backend_log = logging.getLogger(Backend.__module__)
    if not any(isinstance(f, OneLineFailures) for f in backend_log.filters):
        backend_log.addFilter(OneLineFailures())


def bound_compile_threads(count: int) -> None:
    """At most ``count`` Inductor compile threads. Inductor reads TORCHINDUCTOR_COMPILE_THREADS
    when its config is first imported; importing it here only to set it would add a second or
    more to every worker's start, so that is done only where something imported it already."""
    current = int(os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "0") or 0)
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(min(current, count) if current > 0 else count)
    config = sys.modules.get("torch._inductor.config")
    if config is not None and hasattr(config, "compile_threads"):
        config.compile_threads = min(config.compile_threads or count, count)
