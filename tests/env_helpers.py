"""The environment of a test's child process: the one way tests build it.

The parent's environment is kept and the repository is put in front of ``PYTHONPATH``, never in
place of it: on the GPU machine the carried packages (ray, pydantic, ...) are found only through
``PYTHONPATH``, so a child given ``PYTHONPATH=ROOT`` alone, or a fresh environment, can't import
them. ``tests/test_child_env.py`` refuses any other way in the suite.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_env(*paths: str | Path, drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """``os.environ`` with ``paths`` (default: the repository root) in front of its ``PYTHONPATH``,
    usage reporting off, the variables named in ``drop`` removed and ``extra`` set."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    first = [str(p) for p in (paths or (ROOT,))]
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in first]
    env["PYTHONPATH"] = os.pathsep.join(first + rest)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env
