"""What the ``serve`` and ``deployments`` commands read of each model's ``serving.json``
(aitune.serving_config) on this machine's deploy root: the replicas per device, and one line each."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def serving_configs(root: Any, model: str) -> list[tuple[str, str | None, Any, str | None]]:
    """Per device class of ``model`` installed under ``root``: (class key, device name, the
    ServingConfig or None, why a serving.json was ignored or None)."""
    from aitune import deploy_root as layout
    from aitune.serving_config import read_serving

    classes: dict[str, tuple[str | None, dict[int, str]]] = {}
    for entry in layout.live(root, model):
        classes.setdefault(entry.class_key, (entry.device_name, {}))[1][entry.batch_size] = entry.version
    return [(key, name, *read_serving(root, model, key, versions)) for key, (name, versions) in sorted(classes.items())]


def serving_replicas(root: Any, models: list[str], slots: list, total_cpus: float) -> tuple[int, list[str]]:
    """(replicas per slot for ``serve``, lines to print): the most any served model's serving.json
    chose (one application serves every model), capped on CPUs by the cluster's CPUs."""
    from aitune.deploy_root import DeployRootError
    from aitune.serving_config import describe

    wanted, lines = 1, []
    for model in models:
        try:
            found = serving_configs(root, model)
        except (DeployRootError, OSError, ValueError) as exc:
            lines.append(f"  {model}: serving.json not read: {exc}")
            continue
        for _, device, config, why in found:
            if why:
                lines.append(f"  warning: {why}")
            elif config is not None:
                lines.append(f"  {model} on {device}: serving.json: {describe(config)}")
                wanted = max(wanted, config.replicas)
    if wanted > 1 and slots and slots[0].kind == "cpu":
        need = sum(s.num_cpus for s in slots)
        fits = max(1, int((total_cpus + 1e-9) // need)) if need else wanted
        if fits < wanted:
            lines.append(f"  serving.json asks for {wanted} replicas per slot; the cluster's CPUs hold {fits}")
            wanted = fits
    return wanted, lines


def serving_lines(rows: list) -> list[str]:
    """For ``deployments``: each (deploy root on this host, model)'s serving.json, one line per device class."""
    import socket

    from aitune.deploy_root import DeployRootError
    from aitune.serving_config import describe

    here, lines = socket.gethostname(), []
    for root, model in sorted({(r.root, r.model) for r in rows if r.node == here and r.root != "?"}):
        try:
            found = serving_configs(Path(root), model)
        except (DeployRootError, OSError, ValueError) as exc:
            lines.append(f"serving settings of {model} (deploy root {root}): unknown: {exc}")
            continue
        for _, device, config, why in found:
            if why or config is not None:
                lines.append(f"serving settings of {model} on {device} (deploy root {root}): "
                             + (f"warning: {why}" if why else describe(config)))
    return lines
