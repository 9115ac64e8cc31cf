"""``serving.json``: the serving settings chosen for a model on one device class, by measurement.

A sweep with a latency target (``objective: max_throughput`` and ``latency_target``) measures the
installed winners through the real server under load and keeps the best settings beside them::

    ROOT/MODEL/DEVICE_CLASS/serving.json

    {"format": 1, "batch_sizes": [1, 8], "max_queue_delay_ms": 2.0, "replicas": 1,
     "versions": {"1": "v0001-...", "8": "v0001-..."}, "meets_target": true,
     "target": {"p99_ms": 50.0, "concurrency": [1, 8, 32]},
     "measured": {"concurrency": 8, "throughput_rps": 412.0, "p50_ms": 9.1, "p99_ms": 21.3},
     "sweep_id": "..."}

``batch_sizes``: the tuned sizes dynamic batching may use (a prefix of those installed);
``versions``: the installed versions the settings were measured on (batch size -> version). The
file is trusted for nothing: :func:`read_serving` checks every field, and settings measured on
other versions than those current now (a later deploy, a rollback) are ignored, with the reason.
No Ray here: the deploy root is aitune's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SERVING = "serving.json"
FORMAT = 1
_FIELDS = {"format", "batch_sizes", "max_queue_delay_ms", "replicas", "versions", "meets_target", "target",
           "measured", "sweep_id"}
_MEASURED = ("concurrency", "throughput_rps", "p50_ms", "p99_ms")


@dataclass(frozen=True)
class ServingConfig:
    """The chosen serving settings of one model on one device class, and what they were chosen on."""

    batch_sizes: list[int]
    max_queue_delay_ms: float
    replicas: int
    #: batch size -> installed version the settings were measured on
    versions: dict[int, str]
    meets_target: bool
    #: {"p99_ms": float, "concurrency": [int, ...]}
    target: dict[str, Any] = field(default_factory=dict)
    #: the chosen point: {"concurrency", "throughput_rps", "p50_ms", "p99_ms"}
    measured: dict[str, Any] = field(default_factory=dict)
    sweep_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["versions"] = {str(b): v for b, v in sorted(self.versions.items())}
        return {"format": FORMAT, **data}

    @classmethod
    def from_dict(cls, data: Any) -> "ServingConfig":
        """Read back with every field checked; ValueError naming the first bad field."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if set(data) != _FIELDS:
            missing, extra = sorted(_FIELDS - set(data)), sorted(set(data) - _FIELDS)
            raise ValueError(f"fields differ from the format's: missing {missing}, unknown {extra}")
        if data["format"] != FORMAT:
            raise ValueError(f"format is {data['format']!r}, not {FORMAT}")
        sizes = data["batch_sizes"]
        if not (isinstance(sizes, list) and sizes and all(_positive_int(b) for b in sizes)
                and sizes == sorted(set(sizes))):
            raise ValueError(f"batch_sizes is {sizes!r}: expected increasing positive integers")
        delay = data["max_queue_delay_ms"]
        if not (_number(delay) and 0 <= delay <= 1000):
            raise ValueError(f"max_queue_delay_ms is {delay!r}: expected milliseconds from 0 to 1000")
        if not (_positive_int(data["replicas"]) and data["replicas"] <= 64):
            raise ValueError(f"replicas is {data['replicas']!r}: expected an integer from 1 to 64")
        versions = data["versions"]
        if not (isinstance(versions, dict) and versions and all(
                isinstance(k, str) and k.isdigit() and isinstance(v, str) and v for k, v in versions.items())):
            raise ValueError("versions is not a mapping of batch size to version")
        if not isinstance(data["meets_target"], bool):
            raise ValueError(f"meets_target is {data['meets_target']!r}: expected a boolean")
        _check_target(data["target"])
        _check_measured(data["measured"])
        if data["sweep_id"] is not None and not isinstance(data["sweep_id"], str):
            raise ValueError("sweep_id is not a string")
        return cls(list(sizes), float(delay), int(data["replicas"]), {int(k): v for k, v in versions.items()},
                   data["meets_target"], dict(data["target"]), dict(data["measured"]), data["sweep_id"])


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_target(target: Any) -> None:
    if not (isinstance(target, dict) and set(target) == {"p99_ms", "concurrency"} and _number(target["p99_ms"])
            and isinstance(target["concurrency"], list) and all(_positive_int(c) for c in target["concurrency"])):
        raise ValueError("target is not {p99_ms, concurrency}")


def _check_measured(measured: Any) -> None:
    if not (isinstance(measured, dict) and set(measured) == set(_MEASURED) and _positive_int(measured["concurrency"])
            and all(_number(measured[k]) and measured[k] >= 0 for k in _MEASURED[1:])):
        raise ValueError(f"measured is not {{{', '.join(_MEASURED)}}} with numbers")


def serving_path(root: Any, model: str, class_key: str) -> Path:
    """``ROOT/MODEL/CLASS/serving.json`` (the model name and class key checked as the deploy root does)."""
    from aitune import deploy_root as layout

    return layout.batch_dir(layout.resolve_root(root), model, class_key, 1).parent / SERVING


def write_serving(root: Any, model: str, class_key: str, config: ServingConfig) -> Path:
    """Write ``serving.json`` whole (a reader never sees half a file)."""
    from aitune import deploy_root as layout
    from aitune.files import write_atomic

    path = serving_path(root, model, class_key)
    layout.check_no_links(layout.resolve_root(root), path.parent)
    if not path.parent.is_dir():
        raise layout.DeployRootError(f"{path.parent}: nothing of {model} is installed for this device class")
    write_atomic(path, (json.dumps(config.to_dict(), indent=1, sort_keys=True) + "\n").encode())
    return path


def read_serving(root: Any, model: str, class_key: str,
                 current: dict[int, str] | None = None) -> tuple[ServingConfig | None, str | None]:
    """(the settings, None), (None, None) where there is no ``serving.json``, or (None, why it is
    ignored): damaged, hand-edited beyond the format, or measured on versions that are not
    ``current`` (batch size -> version) any more."""
    from aitune import deploy_root as layout

    try:
        path = serving_path(root, model, class_key)
        if not path.exists() and not path.is_symlink():
            return None, None
        config = ServingConfig.from_dict(json.loads(layout.read_small(path, 1 << 16)))
    except (OSError, ValueError, TypeError, RecursionError, layout.DeployRootError) as exc:
        return None, f"{SERVING} of {model} ignored ({exc}); serving with the defaults"
    if current is not None:
        if config.versions != current:
            return None, (f"{SERVING} of {model} ignored: it was measured on versions "
                          f"{_versions(config.versions)}, current are {_versions(current)}; serving with the defaults")
        missing = sorted(set(config.batch_sizes) - set(current))
        if missing:
            return None, f"{SERVING} of {model} ignored: batch sizes {missing} are not installed; serving with the defaults"
    return config, None


def _versions(table: dict[int, str]) -> str:
    return ", ".join(f"b{b} {v}" for b, v in sorted(table.items())) or "none"


def current_versions(root: Any, model: str, class_key: str) -> dict[int, str]:
    """Batch size -> the version current under ``root`` for one device class (for a model tuned at
    several lengths, every bucket's version of that batch size, joined: any of them changing counts)."""
    from aitune import deploy_root as layout

    found: dict[int, list[str]] = {}
    for e in layout.live(root, model):
        if e.class_key == class_key:
            found.setdefault(e.batch_size, []).append(f"{e.shape}:{e.version}" if e.shape else e.version)
    return {b: ",".join(sorted(v)) for b, v in found.items()}


def describe(config: ServingConfig) -> str:
    """One line: what serve does with these settings, and how they were measured."""
    m = config.measured
    verdict = "meets" if config.meets_target else "MISSES"
    target = config.target.get("p99_ms")
    return (f"batch sizes {config.batch_sizes}, queue delay {config.max_queue_delay_ms:g} ms, "
            f"{config.replicas} replica(s) per device; measured {m.get('throughput_rps', 0):.0f} req/s, "
            f"p99 {m.get('p99_ms', 0):.2f} ms at concurrency {m.get('concurrency')} ({verdict} the p99 target "
            f"of {target:g} ms)")
