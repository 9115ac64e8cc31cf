"""The dependency direction: aitune knows torch, not Ray; cluster knows Ray, not tuning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules_after_import(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    from env_helpers import child_env

    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=child_env(ROOT))
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_aitune_does_not_import_ray():
    every_aitune_module = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "aitune").rglob("*.py")
        if p.name != "__main__.py"
    )
    loaded = modules_after_import("\n".join(f"import {m.removesuffix('.__init__')}" for m in every_aitune_module))
    assert "aitune.torch.backend.tensorrt" in loaded
    assert not {m for m in loaded if m == "ray" or m.startswith("ray.")}


def test_cluster_does_not_import_tuning_code():
    loaded = modules_after_import("import cluster, cluster.connect, cluster.inventory, cluster.placement")
    assert "ray" in loaded
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "aitune", "orchestrator")}
