"""Shared test setup: the repository root importable without installing, Ray kept offline."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parent.parent
try:
    import aitune  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))
