"""One-process tuning: build, check and measure each candidate in turn, then pick the winner.

This is the honest, simple baseline that the distributed orchestrator is compared with.
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from aitune.check import CheckResult, Tolerance, tolerance_for
from aitune.judge import judge
from aitune.measure import MeasureConfig, Measurement
from aitune.specs import GraphSpec, Sample
from aitune.strategy import Selection, Strategy, select, speedup
from aitune.torch.backend.backend import Backend, UnsupportedDeviceError, build_sharing
from aitune.torch.export_cache import ExportCache, machine_export_cache
from aitune.defaults import CPU_CANDIDATES, candidates_for, is_baseline, make_backend
from aitune.torch.backend.eager import TorchEagerBackend
from aitune.torch.backend import registry
from aitune.torch.precision import fp32_reference_settings
from aitune.torch.tree import map_tensors

log = logging.getLogger(__name__)


def default_cpu_candidates() -> list[Backend]:
    """The CPU default set of :mod:`aitune.defaults`, as backends ready to build."""
    return [make_backend(definition) for definition in CPU_CANDIDATES]


@dataclass
class CandidateResult:
    name: str
    backend_class: str
    config: dict[str, Any]
    key: str
    #: ok | build_error | incorrect | unsupported | error
    status: str
    error: str | None = None
    build_s: float = 0.0
    measurement: Measurement | None = None
    check: CheckResult | None = None
    speedup: float | None = None
    backend: Backend | None = field(default=None, repr=False, compare=False)

    @property
    def eligible(self) -> bool:
        return self.status == "ok"

    @property
    def precision(self) -> str:
        return self.config.get("precision", "float32")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend_class": self.backend_class,
            "config": self.config,
            "key": self.key,
            "status": self.status,
            "error": self.error,
            "build_s": self.build_s,
            "measurement": self.measurement.to_dict() if self.measurement else None,
            "check": self.check.to_dict() if self.check else None,
            "speedup": self.speedup,
        }


@dataclass
class TuneResult:
    winner: CandidateResult | None
    baseline: CandidateResult
    results: list[CandidateResult]
    strategy: Strategy
    reason: str
    ties: tuple[str, ...] = ()

    def table(self) -> str:
        return format_table(self.results, self.winner)


def _detach(outputs: Any) -> Any:
    return map_tensors(outputs, lambda t: t.detach().to("cpu").clone())


#: a candidate for :func:`tune`: a backend, a backend's name or import path, or (name, config fields)
Candidate = Backend | str | tuple[str, dict[str, Any]]


def as_backend(candidate: Candidate) -> Backend:
    """A ready-to-build backend from any :data:`Candidate` form; a bad one says which and why."""
    if isinstance(candidate, Backend):
        return candidate
    if isinstance(candidate, str):
        return registry.make_backend(candidate)
    if isinstance(candidate, tuple) and len(candidate) == 2 and isinstance(candidate[0], str):
        return registry.make_backend(candidate[0], candidate[1])
    raise TypeError(
        f"candidate {candidate!r} is not a Backend, a backend name or import path, or a (name, config) pair"
    )


def tune(
    module: torch.nn.Module,
    samples: Sequence[Sample],
    candidates: Sequence[Candidate] | None = None,
    device: torch.device | str = "cpu",
    strategy: Strategy | str = "min_latency",
    *,
    measure_config: MeasureConfig | None = None,
    tolerances: dict[str, dict[str, float] | Tolerance] | None = None,
    cache_dir: str | Path | None = None,
    keep_backends: bool = False,
) -> TuneResult:
    """Build, check and measure every backend on ``device``; return the winner and every result.

    ``samples`` share one input shape (their values may differ): all are used to check
    correctness, the first is used to measure. ``candidates`` are backends, names
    (``"TorchEagerBackend"``), plug-in import paths (``"package.module:MyBackend"``) or
    ``(name, config fields)`` pairs; default: the set of :mod:`aitune.defaults` for the device's
    type (the GPU set on a CUDA device). The eager fp32 baseline is always included. On a CUDA
    device TF32 is off throughout, as in the orchestrator's workers, and back as it was after.
    """
    if not samples:
        raise ValueError("tune needs at least one sample")
    device = torch.device(device)
    with fp32_reference_settings(device):
        return _tune(module, samples, candidates, device, strategy, measure_config, tolerances, cache_dir, keep_backends)


def _tune(module, samples, candidates, device, strategy, measure_config, tolerances, cache_dir, keep_backends) -> TuneResult:
    strategy = Strategy.parse(strategy)
    measure_config = measure_config or MeasureConfig()
    module = module.eval()
    samples = [s.to(device) for s in samples]
    with torch.inference_mode():
        # Computed once: the module may carry state, and the reference must not drift.
        reference = [_detach(s(module)) for s in samples]
    graph_spec = GraphSpec.from_sample(samples[0], reference[0])
    backends = [as_backend(c) for c in (candidates if candidates is not None else candidates_for(device.type))]
    if not any(_is_baseline(b) for b in backends):
        backends.insert(0, TorchEagerBackend())
    root = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="aitune-tune-"))

    # the ONNX Runtime and TensorRT candidates export the module once between them
    exports = machine_export_cache(root / "exports")
    results = []
    for i, backend in enumerate(backends):
        result = evaluate(backend, module, graph_spec, samples, reference, device, root / f"{i:02d}", measure_config, tolerances,
                          exports=exports)
        if not keep_backends and result.backend is not None:
            result.backend.deactivate()
            result.backend = None
        results.append(result)
        log.info("%s: %s", result.name, result.status)

    exports.clear()  # each candidate kept its own link to the files it was given
    baseline = next(r for r, b in zip(results, backends) if _is_baseline(b))
    for r in results:
        r.speedup = speedup(baseline.measurement, r.measurement) if r.eligible else None
    choice: Selection = select(results, baseline, strategy)
    return TuneResult(choice.winner, baseline, results, strategy, choice.reason, choice.ties)


def _is_baseline(backend: Backend) -> bool:
    return is_baseline(registry.backend_ref(type(backend)), registry.config_fields(backend))


def evaluate(
    backend: Backend,
    module: torch.nn.Module,
    graph_spec: GraphSpec,
    samples: Sequence[Sample],
    reference: Sequence[Any],
    device: torch.device,
    cache_dir: Path,
    measure_config: MeasureConfig,
    tolerances: dict | None = None,
    *,
    exports: ExportCache | None = None,
) -> CandidateResult:
    """Build, check, then measure one candidate; every failure becomes a classified result.
    ``exports``: the ONNX exports this candidate may share with others (see ``Backend.build``)."""
    result = CandidateResult(
        name=registry.display_name(backend), backend_class=backend.name, config=registry.config_fields(backend), key=backend.key(), status="ok"
    )
    start = time.perf_counter()
    try:
        build_sharing(backend, module, graph_spec, samples, device, cache_dir, exports)
    except UnsupportedDeviceError as exc:
        result.status, result.error = "unsupported", str(exc)
        return result
    except Exception as exc:
        result.status, result.error = "build_error", _format_error(exc)
        return result
    finally:
        result.build_s = time.perf_counter() - start
    result.backend = backend
    try:
        # The same rule as the orchestrator's workers: check, then measure only what is correct.
        verdict = judge(backend.infer, samples, reference, device, tolerance_for(result.precision, tolerances), measure_config)
        result.status, result.error = verdict.status, verdict.error
        result.check, result.measurement = verdict.check, verdict.measurement
    except Exception as exc:
        result.status, result.error = "error", _format_error(exc)
    return result


def _format_error(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).strip()


def format_table(results: Sequence[CandidateResult], winner: CandidateResult | None = None) -> str:
    """A plain-text table: candidate, status, build s, median and p99 ms, speedup, worst error."""
    rows = [("candidate", "status", "build s", "median ms", "p99 ms", "speedup", "max abs err", "")]
    for r in results:
        m = r.measurement
        rows.append((
            r.name,
            r.status,
            f"{r.build_s:.2f}",
            f"{m.median_ms:.3f}" if m else "-",
            f"{m.p99_ms:.3f}" if m else "-",
            f"{r.speedup:.2f}x" if r.speedup else "-",
            f"{r.check.max_abs_err:.2e}" if r.check else "-",
            "<- winner" if r is winner else "",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
