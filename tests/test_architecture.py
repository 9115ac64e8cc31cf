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


# --- orchestrator's folders by stage -------------------------------------------------------------
# What each folder of orchestrator/ may import from the others, read from the source itself (every
# import statement, those inside functions too). The top-level modules records, error_text and
# transfer are shared by all; sweep.py and cli.py string the stages together and may import any.

SHARED = {"records", "error_text", "transfer"}
MAY_IMPORT = {
    "spec": set(),
    "store": set(),
    "dispatch": set(),
    "planning": {"spec", "store", "dispatch"},
    "worker": {"spec", "planning", "dispatch"},
    "outcome": {"spec", "store"},
    "deploy": {"spec", "store", "worker"},
    "sim": {"dispatch"},
    "records": set(), "error_text": set(), "transfer": set(),
}
NO_RAY = {"spec", "store", "dispatch", "planning", "outcome", "sim", "records", "error_text", "transfer"}


def _orchestrator_imports() -> dict[str, set[str]]:
    """Module -> the modules it imports (orchestrator's own, and ``ray`` as ``ray``), statically."""
    import ast

    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "orchestrator").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target == "ray" or target.startswith("ray."):
                    deps.add("ray")
                elif target.startswith("orchestrator.") and _is_module(target):
                    deps.add(target)
        found[name] = deps - {name}
    return found


def _is_module(dotted: str) -> bool:
    where = ROOT / dotted.replace(".", "/")
    return where.with_suffix(".py").exists() or (where / "__init__.py").exists()


def _part(module: str) -> str:
    """``orchestrator.dispatch.queues`` -> ``dispatch``; ``orchestrator.records`` -> ``records``."""
    return module.split(".")[1] if module.count(".") else "orchestrator"


def test_each_orchestrator_folder_imports_only_the_stages_before_it():
    imports = _orchestrator_imports()
    assert {"orchestrator.dispatch.scheduler", "orchestrator.worker.ray_pool", "orchestrator.store.sqlite"} <= set(imports)
    wrong = []
    for module, deps in sorted(imports.items()):
        part = _part(module)
        if part not in MAY_IMPORT:
            continue
        for dep in sorted(deps - {"ray"}):
            other = _part(dep)
            if other not in (part, "orchestrator") and other not in MAY_IMPORT[part] | (SHARED - {part}):
                wrong.append(f"{module} imports {dep}")
        if "ray" in deps and part in NO_RAY:
            wrong.append(f"{module} imports ray")
    assert not wrong, "\n".join(wrong)


def test_orchestrator_has_no_import_cycles_even_through_imports_inside_functions():
    imports = _orchestrator_imports()
    graph = {m: {d for d in deps if d in imports} for m, deps in imports.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt == "orchestrator":  # the package's own one-line __init__
                continue
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_every_orchestrator_folder_says_what_it_holds_and_may_import():
    for folder in sorted(p for p in (ROOT / "orchestrator").iterdir() if (p / "__init__.py").exists()):
        import ast

        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8"))) or ""
        assert "Import" in doc.split("\n")[0], f"{folder.name}/__init__.py: its first line says what it holds and may import"
