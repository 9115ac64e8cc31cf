"""Static buckets against one dynamic-shape artifact, judged on the model's traffic mix.

For each (model, batch size, device class) whose axes vary, the buckets' winners (one artifact per
bucket, a call padded up to its bucket) and the dynamic-shape group's winner (one artifact over the
range, measured at every bucket) are each worth the share of calls at each bucket times their
latency there. The cheaper strategy serves: the other's selections are marked ``superseded`` (kept,
with the reason, and not deployed). A strategy that lacks a figure for some bucket can't win."""

from __future__ import annotations

from typing import Any

from aitune.shapes import is_range, label
from orchestrator.outcome.buckets import shares_of


def _expected(shares: dict[str, float], ms: dict[str, float | None]) -> float | None:
    if any(ms.get(shape) is None for shape in shares):
        return None
    return sum(share * ms[shape] for shape, share in shares.items())


def choose_strategies(spec, selections: list, results: list) -> list[dict[str, Any]]:
    """Mark the losing strategy's selections ``superseded``; return each comparison's figures."""
    by_key = {r.key: r for r in results}
    out = []
    for dynamic in [s for s in selections if is_range(s.shape)]:
        group = (dynamic.model, dynamic.batch_size, dynamic.device_class_key)
        static = {s.shape: s for s in selections
                  if (s.model, s.batch_size, s.device_class_key) == group and s.shape and not is_range(s.shape)}
        buckets = [label(p) for p in spec.model(dynamic.model).points()]
        shares = shares_of(spec, dynamic.model, buckets)
        static_ms = {b: _median(by_key, static.get(b)) for b in buckets}
        winner = by_key.get(dynamic.winner_key)
        dynamic_ms = dict((winner.bucket_ms or {}) if winner is not None else {})
        figures = {"model": dynamic.model, "batch_size": dynamic.batch_size, "device_class_key": dynamic.device_class_key,
                   "device": winner.device_name if winner is not None else None, "traffic": shares,
                   "static": {b: {"winner": static[b].winner if b in static else None, "median_ms": static_ms[b]}
                              for b in buckets},
                   "dynamic": {"range": dynamic.shape, "winner": dynamic.winner, "bucket_ms": dynamic_ms},
                   "static_expected_ms": _expected(shares, static_ms),
                   "dynamic_expected_ms": _expected(shares, dynamic_ms)}
        s_ms, d_ms = figures["static_expected_ms"], figures["dynamic_expected_ms"]
        figures["chosen"] = "dynamic" if d_ms is not None and (s_ms is None or d_ms < s_ms) else "static"
        said = (f"expected {d_ms:.3f} ms a call under the traffic mix" if d_ms is not None else "no figure for every bucket",
                f"{s_ms:.3f} ms" if s_ms is not None else "no figure for every bucket")
        if figures["chosen"] == "dynamic":
            for s in static.values():
                s.superseded = f"the dynamic-shape artifact ({dynamic.shape}) serves instead: {said[0]} against {said[1]} for the buckets"
        else:
            dynamic.superseded = f"the buckets serve instead: {said[1]} under the traffic mix against {said[0].removeprefix('expected ')} for the dynamic-shape artifact"
        out.append(figures)
    return out


def _median(by_key: dict, selection) -> float | None:
    record = by_key.get(selection.winner_key) if selection is not None else None
    return record.median_ms if record is not None else None


def strategy_lines(figures: list[dict[str, Any]]) -> list[str]:
    lines = []
    for f in figures:
        static = ", ".join(f"{b} {v['median_ms']:.3f}" if v["median_ms"] is not None else f"{b} -"
                           for b, v in f["static"].items())
        dynamic = ", ".join(f"{b} {f['dynamic']['bucket_ms'][b]:.3f}" if b in f["dynamic"]["bucket_ms"] else f"{b} -"
                            for b in f["static"])
        s_ms, d_ms = f["static_expected_ms"], f["dynamic_expected_ms"]
        lines.append(
            f"shapes of {f['model']} b{f['batch_size']} on {f['device'] or '?'}: static buckets ({static} ms) "
            f"{'-' if s_ms is None else f'{s_ms:.3f} ms'} expected, dynamic {f['dynamic']['winner'] or '(no winner)'} "
            f"{f['dynamic']['range']} ({dynamic} ms) {'-' if d_ms is None else f'{d_ms:.3f} ms'} expected: "
            f"{f['chosen']} chosen")
    return lines
