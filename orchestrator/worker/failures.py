"""How a worker's candidate fails: the model's own faults, and the error a failed record keeps."""

from __future__ import annotations

from aitune.failures import trace
from orchestrator import records as R
from orchestrator.worker import hygiene


class NotDeterministicModel(RuntimeError):
    """The model this worker built is not the one the driver fingerprinted."""


class ReferenceFailed(RuntimeError):
    """The model in eager fp32 failed on its spec's inputs (or its sample factory failed)."""


def error_of(exc: BaseException) -> tuple[str, str]:
    """(error, error_class) of a failed record: a model that failed on its spec's inputs keeps its
    own traceback, marked so (no candidate of it can be checked)."""
    if isinstance(exc, ReferenceFailed):
        return trace(exc.__cause__ or exc), R.REFERENCE_FAILED
    return trace(exc), "OutOfMemoryError" if hygiene.is_oom(exc) else type(exc).__name__
