"""One line that says what went wrong, from a stored error text (often a whole traceback).

A record keeps the whole traceback; tables, progress lines and selection reasons show one line.
A traceback's last line is often boilerplate (torch.export ends with "(Refer to the full stack
trace above for more information.)"), so the line shown is the final exception's own header
(its class, unqualified, and the first line of its message); where it was raised from another
exception, the final class and the first exception's header, the cause a user can act on.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_TRACEBACK = "Traceback (most recent call last):"
# An exception header: a (possibly dotted) class name, then ": message" or nothing.
_HEADER = re.compile(r"^(?P<cls>[A-Za-z_][\w.]*)(?::\s?(?P<msg>.*))?$")


def _headers(lines: list[str]) -> list[str]:
    """Each chained traceback's exception header, oldest first ("Class: first line")."""
    headers: list[str] = []
    in_traceback = False
    for line in lines:
        if line.startswith(_TRACEBACK):
            in_traceback = True
        elif in_traceback and line.strip() and not line[0].isspace():
            in_traceback = False
            match = _HEADER.match(line.strip())
            if match:  # the first unindented line after the frames
                cls = match["cls"].rsplit(".", 1)[-1]
                msg = (match["msg"] or "").strip()
                headers.append(f"{cls}: {msg}" if msg else cls)
    return headers


def _clip(line: str, limit: int) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."


def summarize(text: str | None, limit: int = 120) -> str | None:
    """The line worth showing for ``text``, at most ``limit`` characters (None for no text)."""
    lines = [_ANSI.sub("", line).rstrip() for line in (text or "").splitlines()]
    if not any(line.strip() for line in lines):
        return None
    headers = _headers(lines)
    if not headers:  # not a traceback: its first line says it
        return _clip(next(line.strip() for line in lines if line.strip()), limit)
    last, first = headers[-1], headers[0]
    if last.partition(": ")[2] and last.partition(": ")[2] == first.partition(": ")[2]:
        return _clip(first, limit)  # re-raised with the same message: the original class says more
    if len(headers) > 1 and first != last:
        # A wrapper's message is mostly its own boilerplate ("Failed to export the model..."):
        # its class, then the cause a user can act on.
        return _clip(f"{last.partition(':')[0]} from {first}", limit)
    return _clip(last, limit)
