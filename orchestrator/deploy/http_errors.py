"""The refusals a serving replica answers with: an HTTP status and one line for ``{"error": ...}``."""

from __future__ import annotations


class HttpRefusal(Exception):
    """A request refused with ``code`` (and the message as its error)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class BodyError(HttpRefusal):
    """The body: too large (413), too slow (408), a bad ``Content-Length`` (400)."""


class Refused(HttpRefusal):
    """What the model can't take (an untuned shape: 400) or failed on (500)."""
