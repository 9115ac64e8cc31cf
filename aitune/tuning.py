"""One-process tuning: build, check and measure each candidate in turn, then pick the winner.

This is the honest, simple baseline that the distributed orchestrator is compared with.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from aitune.accuracy import criteria_for
from aitune.check import CheckResult, Tolerance, tolerance_for
from aitune.decision import DecisionRule, assess, explain, paired_ratio, run_rounds, screen
from aitune.failures import UNSUPPORTED, build_failure_status, trace
from aitune.judge import judge
from aitune.measure import MeasureConfig, Measurement
from aitune.specs import GraphSpec, Sample
from aitune.strategy import Selection, Strategy, select, speedup
from aitune.torch.backend.backend import Backend, BackendState, build_sharing
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
    #: its measurement in the decision's interleaved rounds, if it was a contender (what the table shows)
    decided: Measurement | None = None
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
            "decided": self.decided.to_dict() if self.decided else None,
        }


@dataclass
class TuneResult:
    winner: CandidateResult | None
    baseline: CandidateResult
    results: list[CandidateResult]
    strategy: Strategy
    reason: str
    ties: tuple[str, ...] = ()
    #: how the winner was decided (see aitune.decision): why the rounds stopped, how many, their
    #: seconds, P(best), the contenders and their medians in the rounds; None: nothing to compare
    decision: dict[str, Any] | None = None

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
    decision: DecisionRule | None = None,
) -> TuneResult:
    """Build, check and measure every backend on ``device``; return the winner and every result.

    ``samples`` share one input shape (their values may differ): all are used to check
    correctness, the first is used to measure. ``candidates`` are backends, names
    (``"TorchEagerBackend"``), plug-in import paths (``"package.module:MyBackend"``) or
    ``(name, config fields)`` pairs; default: the set of :mod:`aitune.defaults` for the device's
    type (the GPU set on a CUDA device). The eager fp32 baseline is always included. On a CUDA
    device TF32 is off throughout, as in the orchestrator's workers, and back as it was after.

    The winner is decided as in a sweep: the candidates within reach of the best first
    measurement, and the baseline, are measured in interleaved rounds until one beats the rest
    beyond noise, a tie is declared or ``decision``'s cap is reached (``aitune.decision``);
    ``TuneResult.decision`` says how.
    """
    if not samples:
        raise ValueError("tune needs at least one sample")
    device = torch.device(device)
    with fp32_reference_settings(device):
        return _tune(module, samples, candidates, device, strategy, measure_config, tolerances, cache_dir, keep_backends,
                     decision)


def _tune(module, samples, candidates, device, strategy, measure_config, tolerances, cache_dir, keep_backends,
          decision) -> TuneResult:
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
    built: dict[int, Backend] = {}
    for i, backend in enumerate(backends):
        result = evaluate(backend, module, graph_spec, samples, reference, device, root / f"{i:02d}", measure_config, tolerances,
                          exports=exports)
        if result.backend is not None:
            built[i] = result.backend
            if not keep_backends:
                result.backend.deactivate()  # memory back until the rounds, if it is a contender
                result.backend = None
        results.append(result)
        log.info("%s: %s", result.name, result.status)

    exports.clear()  # each candidate kept its own link to the files it was given
    base_index = next(i for i, b in enumerate(backends) if _is_baseline(b))
    baseline = results[base_index]
    for r in results:
        r.speedup = speedup(baseline.measurement, r.measurement) if r.eligible else None
    return _decide(results, built, base_index, samples[0], device, strategy, measure_config, decision or DecisionRule(),
                   keep_backends)


def _decide(results: list[CandidateResult], built: dict[int, Backend], base_index: int, sample: Sample,
            device: torch.device, strategy: Strategy, measure_config: MeasureConfig, rule: DecisionRule,
            keep_backends: bool) -> TuneResult:
    """The orchestrator's rule in one process: screen by the first measurements, then decide the
    contenders and the baseline in interleaved rounds (aitune.decision)."""
    baseline = results[base_index]
    first = {str(i): r.measurement.median_ms for i, r in enumerate(results)
             if r.eligible and r.measurement is not None and strategy.fits(r.measurement)}
    near, _ = screen(first, str(base_index) if str(base_index) in first else None, rule)
    # the fixed tie rule's order: the baseline, then the candidates as given
    order = sorted(near, key=lambda k: (int(k) != base_index, int(k)))
    if len(order) < 2:
        choice: Selection = select(results, baseline, strategy)
        stop = "alone" if order else None
        return TuneResult(choice.winner, baseline, results, strategy, choice.reason, choice.ties,
                          {"stop": stop} if stop else None)
    try:
        for k in order:
            built[int(k)].activate()
        rounds = run_rounds({k: built[int(k)].infer for k in order}, sample, device, rule, order,
                            threads=measure_config.threads, warmup=measure_config)
    except Exception as exc:  # a refinement: the first measurements still decide, saying why
        choice = select(results, baseline, strategy)
        reason = f"{choice.reason}, by the first measurements alone: the rounds failed ({type(exc).__name__}: {exc})"
        return TuneResult(choice.winner, baseline, results, strategy, reason, choice.ties, {"stop": "screening"})
    finally:
        if not keep_backends:
            for k in order:
                if built[int(k)].state == BackendState.ACTIVE:
                    built[int(k)].deactivate()
    base_key = str(base_index) if str(base_index) in rounds.times_ms else None
    verdict = assess(rounds.times_ms, order, rule, final=True, bootstrap=True, baseline=base_key)
    winner = results[int(verdict.winner)]
    for k in order:
        results[int(k)].decided = rounds.measurement(k)
        if base_key is not None:  # paired, in the same rounds, like the orchestrator's tables
            results[int(k)].speedup = paired_ratio(rounds.times_ms[k], rounds.times_ms[base_key])
    ties = tuple(results[int(k)].name for k in verdict.ties)
    reason = explain(verdict, {k: results[int(k)].name for k in order}, base_key, rule, rounds.seconds)
    decision = {"stop": verdict.stop, "rounds": verdict.rounds, "seconds": rounds.seconds, "p_best": verdict.p_best,
                "p_near": verdict.p_near, "contenders": [results[int(k)].name for k in order],
                "medians": {results[int(k)].name: m for k, m in verdict.medians.items()}}
    return TuneResult(winner, baseline, results, strategy, reason, ties, decision)


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
    except Exception as exc:
        result.status = build_failure_status(exc)
        result.error = str(exc) if result.status == UNSUPPORTED else trace(exc)
        return result
    finally:
        result.build_s = time.perf_counter() - start
    result.backend = backend
    try:
        # The same rule as the orchestrator's workers: check, then measure only what is correct.
        criteria = criteria_for(type(backend), tolerance_for(result.precision, tolerances))
        verdict = judge(backend.infer, samples, reference, device, criteria.tolerance, measure_config, criteria=criteria)
        result.status, result.error = verdict.status, verdict.error
        result.check, result.measurement = verdict.check, verdict.measurement
    except Exception as exc:
        result.status, result.error = "error", trace(exc)
    return result


def format_table(results: Sequence[CandidateResult], winner: CandidateResult | None = None) -> str:
    """A plain-text table: candidate, status, build s, median and p99 ms, speedup, worst error; a
    candidate decided in interleaved rounds shows its figures there."""
    rows = [("candidate", "status", "build s", "median ms", "p99 ms", "speedup", "max abs err", "")]
    for r in results:
        m = r.decided or r.measurement  # the rounds' figures where it was decided in them
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
