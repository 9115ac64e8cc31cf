"""Each bucketed model's winners bucket by bucket, and what serving its traffic mix is expected to
cost: the share of calls at each bucket times that bucket's winner's latency, against always
padding to the largest bucket. One line per (model, batch size, device class) for the console, and
the same figures for ``report.json``."""

from __future__ import annotations

from typing import Any

from aitune.shapes import is_range, parse_label


def shares_of(spec, model: str, buckets: list[str]) -> dict[str, float]:
    """Each bucket's share of a model's calls under its traffic mix (label -> share)."""
    weights = spec.model(model).traffic_weights()
    shares = {}
    for shape in buckets:
        share = 1.0
        for axis, size in parse_label(shape).items():
            share *= weights.get(axis, {}).get(size, 0.0)
        shares[shape] = share
    return shares


def bucket_figures(spec, selections, results) -> list[dict[str, Any]]:
    """Per (model, batch size, device class) of a model whose axes vary: each bucket's winner and
    median ms, the traffic shares, the expected ms under the mix and always at the largest bucket."""
    by_key = {r.key: r for r in results}
    groups: dict[tuple, dict[str, Any]] = {}
    for s in selections:
        if not s.shape or is_range(s.shape) or s.winner_key not in by_key:
            continue
        winner = by_key[s.winner_key]
        group = groups.setdefault((s.model, s.batch_size, s.device_class_key),
                                  {"model": s.model, "batch_size": s.batch_size, "device_class_key": s.device_class_key,
                                   "device": winner.device_name, "buckets": {}})
        group["buckets"][s.shape] = {"winner": s.winner, "median_ms": winner.median_ms}
    out = []
    for (model, _, _), group in sorted(groups.items()):
        shares = shares_of(spec, model, list(group["buckets"]))
        figures = group["buckets"]
        known = all(f["median_ms"] is not None for f in figures.values()) and len(figures) == len(spec.model(model).points())
        largest = max(figures, key=lambda k: sorted(parse_label(k).values()))
        group["traffic"] = shares
        group["expected_ms"] = sum(shares[k] * figures[k]["median_ms"] for k in figures) if known else None
        group["largest_ms"] = figures[largest]["median_ms"] if known else None
        out.append(group)
    return out


def bucket_lines(figures: list[dict[str, Any]]) -> list[str]:
    lines = []
    for g in figures:
        order = sorted(g["buckets"], key=lambda k: sorted(parse_label(k).values()))
        each = ", ".join(f"{k} {g['buckets'][k]['median_ms']:.3f} ms ({g['traffic'][k]:.0%})"
                         if g["buckets"][k]["median_ms"] is not None else f"{k} -" for k in order)
        line = f"buckets of {g['model']} b{g['batch_size']} on {g['device'] or '?'}: {each}"
        if g["expected_ms"] is not None and g["expected_ms"] > 0:
            line += (f"; expected under the traffic mix {g['expected_ms']:.3f} ms a call, always the largest bucket "
                     f"{g['largest_ms']:.3f} ms ({g['largest_ms'] / g['expected_ms']:.2f}x)")
        lines.append(line)
    return lines
