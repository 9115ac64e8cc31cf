"""Fixtures shared by the sweep tests: one local Ray per test module, and a silent console."""

from __future__ import annotations

import pytest

from cluster import connect
from sweep_helpers import RAY_INIT


@pytest.fixture(scope="module")
def ray_session():
    handle = connect(**RAY_INIT)
    yield handle
    handle.shutdown()
