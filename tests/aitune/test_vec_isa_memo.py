"""The vector-ISA memo (aitune.torch.vec_isa_memo): each case in a fresh Python, as a worker is,
counting the probe's child processes that Inductor spawns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from torch._inductor import cpu_vec_isa
    probes = []
    original = cpu_vec_isa.VecISA._probe_load
    def counted(self, path):
        probes.append(str(self))
        return original(self, path)
    cpu_vec_isa.VecISA._probe_load = counted
    from aitune.torch.vec_isa_memo import remember_vec_isa
    action = remember_vec_isa()
    listed = [str(i) for i in cpu_vec_isa.valid_vec_isa_list()]
    import torch._inductor.config as inductor_config
    out = {"action": action, "probes": len(probes), "listed": listed, "vec_isa_ok": inductor_config.cpp.vec_isa_ok}
    if "--compile" in sys.argv:
        f = torch.compile(lambda x: torch.relu(x) * 2 + 1)
        x = torch.randn(64)
        out["compiled_ok"] = bool(torch.allclose(f(x), torch.relu(x) * 2 + 1))
        out["probes_after_compile"] = len(probes)
    print("RESULT " + json.dumps(out))
""")


def _child(memo: Path | str, *args: str, environ: dict | None = None) -> dict:
    from env_helpers import child_env

    env = child_env(ROOT, AITUNE_ISA_MEMO=str(memo), **(environ or {}))
    env.pop("TORCHINDUCTOR_VEC_ISA_OK", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _memo_files(memo: Path) -> list[Path]:
    return sorted(p for p in memo.glob("*.json"))


def test_the_first_process_probes_and_later_ones_reuse_the_answer(tmp_path):
    memo = tmp_path / "isa"
    first = _child(memo)
    assert first["action"] == "probed"
    files = _memo_files(memo)
    assert len(files) == 1
    assert json.loads(files[0].read_text()) == {"isas": first["listed"]}
    if not first["listed"]:
        pytest.skip("this CPU claims no vector ISA Inductor knows: there is nothing to probe or reuse")
    assert first["probes"] >= 1

    later = _child(memo, "--compile")
    assert later["action"] == "reused"
    assert later["listed"] == first["listed"]  # what Inductor would have found by probing
    assert later["vec_isa_ok"] is None  # the config (a compile-cache key) is left as it was
    assert later["compiled_ok"] is True
    # the list came from the memo: fewer probe children than a process that probed them all
    assert later["probes_after_compile"] < first["probes"]


def test_a_tampered_memo_is_probed_again_and_rewritten(tmp_path):
    memo = tmp_path / "isa"
    first = _child(memo)
    if not first["listed"]:
        pytest.skip("this CPU claims no vector ISA Inductor knows")
    (path,) = _memo_files(memo)

    path.write_text("{not json")  # a file that does not parse
    again = _child(memo)
    assert again["action"] == "probed" and again["probes"] >= 1
    assert json.loads(path.read_text()) == {"isas": first["listed"]}

    # a recorded answer that is not what this CPU claims (say, a set failed its probe back then):
    # it is not assumed now, but probed
    path.write_text(json.dumps({"isas": first["listed"][1:]}))
    probed = _child(memo)
    assert probed["action"] == "probed"
    assert probed["probes"] == first["probes"]  # all of it again, nothing taken from the memo
    assert probed["listed"] == first["listed"]

    path.write_text(json.dumps({"isas": [1, 2]}))  # the wrong shape
    assert _child(memo)["action"] == "probed"


def test_off_keeps_nothing_and_probes_each_time(tmp_path):
    # where the memo would go were it on: the user's cache folder, pointed at tmp_path
    cache = {"XDG_CACHE_HOME": str(tmp_path), "HOME": str(tmp_path)}
    first = _child("off", environ=cache)
    assert first["action"] == "off"
    again = _child("off", environ=cache)
    assert again["action"] == "off"
    assert again["probes"] == first["probes"]  # nothing remembered between the two
    assert not any(tmp_path.rglob("*.json"))
