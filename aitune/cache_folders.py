"""Where aitune keeps what a machine's processes share between runs (translations, probe answers):
one folder per kind under the user's cache, each overridable, or turned off, by its own variable."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

#: values of a folder's variable that keep nothing on disk
OFF = frozenset({"off", "0", "false", "no", "none"})


def cache_folder(variable: str, name: str, environ: Mapping[str, str] = os.environ) -> Path | None:
    """``$variable`` where set, else ``$XDG_CACHE_HOME/aitune/<name>``, else
    ``~/.cache/aitune/<name>``; None where ``$variable`` is one of :data:`OFF`."""
    chosen = environ.get(variable, "").strip()
    if chosen.lower() in OFF:
        return None
    if chosen:
        return Path(chosen).expanduser()
    cache = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "aitune" / name
