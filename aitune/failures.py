"""How a candidate's failure is told, one rule for ``aitune.tune`` and the orchestrator's workers:
the status of a failed build, and an exception's traceback as a failed result keeps it."""

from __future__ import annotations

import traceback

from aitune.torch.backend.backend import UnsupportedDeviceError

UNSUPPORTED, BUILD_ERROR = "unsupported", "build_error"


def build_failure_status(exc: BaseException) -> str:
    """``unsupported`` where the backend can't run on the device (``UnsupportedDeviceError``: the
    device's lack, not the candidate's fault), ``build_error`` for any other failed build."""
    return UNSUPPORTED if isinstance(exc, UnsupportedDeviceError) else BUILD_ERROR


def trace(exc: BaseException) -> str:
    """``exc``'s whole traceback, its causes' too, as a failed result keeps it."""
    return "".join(traceback.format_exception(exc)).strip()
