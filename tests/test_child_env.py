"""Every test's child process keeps the parent's environment and ``PYTHONPATH`` (see env_helpers)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from env_helpers import ROOT, child_env

# PYTHONPATH set to one path (in a dict, a call or an update), or a child's whole environment
# written out as a literal without the parent's
REPLACING = [
    re.compile(r"""["']?PYTHONPATH["']?\s*[:=]\s*str\("""),
    re.compile(r"""\benv\s*=\s*\{(?!\s*\*\*)(?![^}]*\bfor\b)"""),
]


def offending_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if any(p.search(line) for p in REPLACING)]


def test_no_test_replaces_pythonpath_or_the_environment():
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.name in ("env_helpers.py", Path(__file__).name):
            continue
        found += [f"{path.relative_to(ROOT)}: {line}" for line in offending_lines(path.read_text())]
    assert not found, "use env_helpers.child_env instead:\n" + "\n".join(found)


def test_the_grep_finds_each_replacing_form():
    assert offending_lines('env = {**os.environ, "PYTHONPATH": str(ROOT)}')
    assert offending_lines("env.update(PYTHONPATH=str(ROOT), X='1')")
    assert offending_lines('run(cmd, env={"PYTHONPATH": p, "PATH": "/usr/bin"})')
    assert not offending_lines('env = {**os.environ, "X": "1"}')
    assert not offending_lines('runtime_env={"env_vars": {}}')
    assert not offending_lines('env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}')


def test_child_env_prepends_the_root_and_keeps_the_rest(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/carried/site", str(ROOT)]))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    env = child_env(drop=("RAY_ADDRESS",), EXTRA="1")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/carried/site"]
    assert "RAY_ADDRESS" not in env and env["EXTRA"] == "1" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["PATH"] == os.environ["PATH"]
    assert child_env("/a", "/b")["PYTHONPATH"].split(os.pathsep)[:2] == ["/a", "/b"]
