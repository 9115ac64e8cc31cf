"""Shared test setup: the repository root importable without installing, Ray kept offline."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Serve's controller, proxy and replicas log to their files only, not to stderr, which Ray
# forwards to this process and which would print among the test results (set before Ray starts:
# the local cluster's processes inherit it)
os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
# The machine's shared folders (aitune.cache_folders): ONNX translations (torch/template_dir.py)
# and Inductor's vector-ISA probe answers (torch/vec_isa_memo.py), the session's own, not the
# user's cache; set before any Ray worker starts, so that the workers inherit them
for _variable, _prefix in (("AITUNE_ONNX_TEMPLATES", "templates"), ("AITUNE_ISA_MEMO", "isa")):
    os.environ[_variable] = _folder = tempfile.mkdtemp(prefix=f"aitune-test-{_prefix}-")
    atexit.register(shutil.rmtree, _folder, True)

ROOT = Path(__file__).resolve().parent.parent
try:
    import aitune  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _backend_log_filters_restored():
    """A worker made in this process (not through Ray) adds its one-line filter to the backend
    log (orchestrator.worker.process.quiet_libraries): each test gets the filters it started with."""
    log = logging.getLogger("aitune.torch.backend.backend")
    before = list(log.filters)
    yield
    log.filters[:] = before
