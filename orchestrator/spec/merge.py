"""One sweep from several spec files: ``tune A.yaml B.yaml`` and ``include: [other.yaml]``.

The rules, the same for both:

- models are concatenated in order (an including file's own models after those it includes),
  and their names must stay unique across every file;
- every other top-level setting may be given by any number of the files, but where two files
  give it, they must give the same value: a conflict is refused, naming the field and both
  files, rather than silently letting one win (a sweep that merged two specs' budgets or
  candidates one way or the other would tune something neither file says). Three settings
  are not sweep-wide in substance and do not conflict:

  - ``name`` (a label): different names are joined with ``+``;
  - ``batch_sizes`` and ``reuse``, which a model can give itself: where the files give
    different values, each file's value goes to its own models (those that don't give their
    own), as if written on each; every file with models must then give it (else which value its
    models should take is a guess), and a file without models can't give a different value
    (it would apply to nothing);
- ``include`` paths are relative to the including file; a file that includes itself, directly or
  through others, is refused; a file reached twice (a diamond) is read once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.spec.schema import SpecError, SweepSpec, parse_spec, read_spec_file


def _includes(data: dict[str, Any], path: Path) -> list[Path]:
    value = data.pop("include", [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise SpecError(f"invalid sweep spec {path}:\n  include: expected a list of spec file paths, got {value!r}")
    return [(path.parent / v).resolve() for v in value]


def _collect(path: Path, stack: tuple[Path, ...], seen: set[Path], out: list[tuple[Path, dict]]) -> None:
    """Depth first: included files before the file that includes them."""
    key = path.resolve()
    if key in stack:
        chain = " -> ".join(str(p) for p in (*stack, key))
        raise SpecError(f"sweep spec {path}: include cycle: {chain}")
    if key in seen:
        return
    seen.add(key)
    data = read_spec_file(path)
    if not isinstance(data, dict):
        raise SpecError(f"invalid sweep spec {path}:\n  (top level): expected a mapping of fields, got {type(data).__name__}")
    for included in _includes(data, path):
        if included.is_dir():
            raise SpecError(f"sweep spec {path}: include {included} is a directory; name each spec file in it")
        if not included.is_file():
            raise SpecError(f"sweep spec {path}: include {included} does not exist")
        _collect(included, (*stack, key), seen, out)
    out.append((path, data))


#: top-level settings a model can give itself: files that differ on them give them to their own models
PER_MODEL = ("batch_sizes", "reuse")


def _per_model(parts: list[tuple[Path, dict[str, Any]]], problems: list[str]) -> list[tuple[Path, dict[str, Any]]]:
    """The parts with each PER_MODEL setting the files differ on moved onto that file's own models
    (a setting that can't be moved is reported in ``problems`` and taken out of every part)."""
    moved, refused = {}, set()
    for key in PER_MODEL:
        values = [d[key] for _, d in parts if key in d]
        if all(v == values[0] for v in values):
            continue  # given alike, or by one file: sweep-wide
        lacking = [str(p) for p, d in parts if key not in d and isinstance(d.get("models"), list)
                   and any(not isinstance(m, dict) or m.get(key) is None for m in d["models"])]
        idle = [str(p) for p, d in parts if key in d and not d.get("models")]
        why = f"  {key}: the specs give different values, so each goes to its own file's models, but "
        if lacking:
            problems.append(f"{why}{', '.join(lacking)} gives none for its models; give {key} there too")
        if idle:
            problems.append(f"{why}{', '.join(idle)} has no models of its own to give it to")
        if lacking or idle:
            refused.add(key)
        else:
            moved[key] = values[0]
    if not moved and not refused:
        return parts
    out = []
    for path, data in parts:
        data = {k: v for k, v in data.items() if k not in refused}
        own = {k: data.pop(k) for k in moved if k in data}
        models = data.get("models")
        if own and isinstance(models, list):
            data["models"] = [{**m, **{k: v for k, v in own.items() if m.get(k) is None}} if isinstance(m, dict) else m
                              for m in models]
        out.append((path, data))
    # the sweep-level value is then only a default no model falls back to
    out[0][1].update(moved)
    return out


def merge_data(parts: list[tuple[Path, dict[str, Any]]]) -> dict[str, Any]:
    """The merged spec data; refuses repeated model names and conflicting settings."""
    merged: dict[str, Any] = {}
    given_by: dict[str, Path] = {}
    models: list[Any] = []
    model_from: dict[str, Path] = {}
    problems: list[str] = []
    names = list(dict.fromkeys(d["name"] for _, d in parts if isinstance(d.get("name"), str)))
    parts = _per_model(parts, problems)
    for path, data in parts:
        for i, model in enumerate(data.get("models") or []):
            name = model.get("name") if isinstance(model, dict) else None
            if isinstance(name, str) and name in model_from:
                problems.append(f"  {path}: models[{i}].name: {name!r} is also a model of {model_from[name]}; "
                                "model names must be unique across the specs")
            elif isinstance(name, str):
                model_from[name] = path
            models.append(model)
        for key, value in data.items():
            if key == "models" or key == "name" and len(names) > 1:  # different names are joined below
                continue
            if key in merged and merged[key] != value:
                problems.append(f"  {key}: {given_by[key]} gives {merged[key]!r} but {path} gives {value!r}; "
                                "give it in one file, or the same value in both")
            elif key not in merged:
                merged[key], given_by[key] = value, path
    if problems:
        raise SpecError("\n".join(["invalid sweep specs (merged):"] + problems))
    if len(names) > 1:
        merged["name"] = "+".join(names)
    if models or any("models" in d for _, d in parts):
        merged["models"] = models
    return merged


def load_specs(paths: list[str | Path]) -> SweepSpec:
    """Read one or more spec files (and what they include) into one validated spec."""
    parts: list[tuple[Path, dict]] = []
    seen: set[Path] = set()
    for p in paths:
        _collect(Path(p), (), seen, parts)
    if len(parts) == 1:
        path, data = parts[0]
        return parse_spec(data, str(path))
    source = " + ".join(str(p) for p, _ in parts)
    return parse_spec(merge_data(parts), source)


def load_spec(path: str | Path) -> SweepSpec:
    """Read a YAML or JSON spec; relative store paths stay relative to the working directory.

    ``include: [other.yaml]`` (paths relative to the including file) merges other specs in, by
    the rules above.
    """
    return load_specs([path])
