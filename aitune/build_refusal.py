"""A build a backend refuses for a reason it can name: not a crash, so no traceback in the log."""

from __future__ import annotations


class BuildRefused(ValueError):
    """The backend can't build this candidate for a known reason, which the message says in full
    (for example an ONNX opset the exporter could not convert the model down to). ``Backend.build``
    logs it in one line; any other exception there is logged with its traceback."""
