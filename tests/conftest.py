"""Shared test setup: the repository root importable without installing, Ray kept offline."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# ONNX translations kept on disk (aitune.torch.template_dir): the session's own folder, not the
# user's cache; set before any Ray worker starts, so that the workers inherit it
_TEMPLATES = tempfile.mkdtemp(prefix="aitune-test-templates-")
os.environ["AITUNE_ONNX_TEMPLATES"] = _TEMPLATES
atexit.register(shutil.rmtree, _TEMPLATES, True)
# Inductor's vector-ISA probe answers (aitune.torch.vec_isa_memo): likewise the session's own
_ISA_MEMO = tempfile.mkdtemp(prefix="aitune-test-isa-")
os.environ["AITUNE_ISA_MEMO"] = _ISA_MEMO
atexit.register(shutil.rmtree, _ISA_MEMO, True)

ROOT = Path(__file__).resolve().parent.parent
try:
    import aitune  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))
