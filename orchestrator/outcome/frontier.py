"""The serving search's report: every measured point, the throughput/p99 frontier, the chosen point.

Takes the plain dicts the sweep's serving stage makes (orchestrator.sweep.serving): one per model
and device class, with ``points`` (settings, concurrency, throughput_rps, p50_ms, p99_ms, ...),
``chosen``, ``meets_target`` and ``target``. Console lines, Markdown, JSON and a PNG plot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _settings(point: dict[str, Any]) -> str:
    s = point["settings"]
    return f"b{s['batch_sizes']} delay {s['max_queue_delay_ms']:g} ms x{s['replicas']}"


def _is_chosen(point: dict[str, Any], chosen: dict[str, Any] | None) -> bool:
    return chosen is not None and point["settings"] == chosen["settings"] and point["concurrency"] == chosen["concurrency"]


def on_frontier(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other beats on both throughput and p99 (lost none), by p99."""
    ordered = sorted((p for p in points if p["requests"] and not p["lost"]), key=lambda p: (p["p99_ms"], -p["throughput_rps"]))
    kept: list[dict[str, Any]] = []
    for p in ordered:
        if not kept or p["throughput_rps"] > kept[-1]["throughput_rps"]:
            kept.append(p)
    return kept


def _rows(group: dict[str, Any]) -> list[list[str]]:
    target, chosen, edge = group["target"]["p99_ms"], group.get("chosen"), on_frontier(group["points"])
    rows = []
    for p in sorted(group["points"], key=lambda p: (p["p99_ms"], -p["throughput_rps"])):
        marks = ("chosen " if _is_chosen(p, chosen) else "") + ("frontier " if p in edge else "")
        rows.append([_settings(p), str(p["concurrency"]), f"{p['throughput_rps']:.1f}", f"{p['p50_ms']:.2f}",
                     f"{p['p99_ms']:.2f}", "yes" if p["p99_ms"] <= target and not p["lost"] else "no",
                     str(p["lost"]), "stored" if p.get("reused") else "measured", marks.strip()])
    return rows


HEADERS = ["settings", "conc", "req/s", "p50 ms", "p99 ms", "within", "lost", "source", ""]


def verdict(group: dict[str, Any]) -> str:
    """One line: what was chosen for a model and device class, and whether it meets the target."""
    where = f"{group['model']} on {group.get('device') or group['device_class_key'][:12]}"
    if group.get("error"):
        return f"serving settings of {where}: not searched: {group['error']}"
    chosen, target = group.get("chosen"), group["target"]["p99_ms"]
    if chosen is None:
        return f"serving settings of {where}: nothing measured"
    text = (f"serving settings of {where}: {_settings(chosen)}: {chosen['throughput_rps']:.1f} req/s, "
            f"p99 {chosen['p99_ms']:.2f} ms at concurrency {chosen['concurrency']}")
    if not group["meets_target"]:
        text += f"; NO point met the p99 target of {target:g} ms: chose the lowest p99 (misses the target)"
    else:
        text += f" (p99 target {target:g} ms)"
    return (text + f"; {group['tried']} of {group['grid']} settings tried, {group['measured']} point(s) measured, "
            f"{group['reused']} from the store")


def lines(groups: list[dict[str, Any]]) -> list[str]:
    """The console's table per model and device class, then its verdict."""
    out = []
    for group in groups:
        if group.get("points"):
            rows = [HEADERS] + _rows(group)
            widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
            out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        out.append(verdict(group))
    return out


def markdown(groups: list[dict[str, Any]]) -> str:
    parts = ["# Serving settings under a latency target", ""]
    for group in groups:
        parts += [f"## {group['model']} on {group.get('device') or group['device_class_key'][:12]}", "", verdict(group), ""]
        if group.get("points"):
            parts.append("| " + " | ".join(h or "mark" for h in HEADERS) + " |")
            parts.append("|" + "---|" * len(HEADERS))
            parts += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in _rows(group)]
            parts.append("")
    return "\n".join(parts) + "\n"


def write(out_dir: str | Path, groups: list[dict[str, Any]]) -> dict[str, Path]:
    """``frontier.md``, ``frontier.json`` and ``frontier.png`` (the plot only where matplotlib imports)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"frontier.json": out / "frontier.json", "frontier.md": out / "frontier.md"}
    paths["frontier.json"].write_text(json.dumps(groups, indent=1, default=str) + "\n")
    paths["frontier.md"].write_text(markdown(groups))
    try:
        paths["frontier.png"] = plot(groups, out / "frontier.png")
    except ImportError:  # a plotting nicety: the tables above stand
        pass
    return paths


def plot(groups: list[dict[str, Any]], path: str | Path) -> Path:
    """Throughput against p99 per model and device class: every point, the frontier, the target, the choice."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    shown = [g for g in groups if g.get("points")] or groups[:1]
    fig = Figure(figsize=(7, 3.6 * max(len(shown), 1)), layout="constrained")
    axes = fig.subplots(max(len(shown), 1), 1, squeeze=False)[:, 0]
    for ax, group in zip(axes, shown):
        points = group.get("points") or []
        ax.scatter([p["p99_ms"] for p in points], [p["throughput_rps"] for p in points], s=18, color="0.6",
                   label="measured")
        edge = on_frontier(points)
        ax.plot([p["p99_ms"] for p in edge], [p["throughput_rps"] for p in edge], "-o", color="tab:blue",
                markersize=4, label="frontier")
        ax.axvline(group["target"]["p99_ms"], color="tab:red", linestyle="--", label="p99 target")
        chosen = group.get("chosen")
        if chosen:
            ax.scatter([chosen["p99_ms"]], [chosen["throughput_rps"]], s=120, marker="*", color="tab:orange",
                       zorder=3, label=f"chosen: {_settings(chosen)} c={chosen['concurrency']}")
        ax.set_title(f"{group['model']} on {group.get('device') or group['device_class_key'][:12]}")
        ax.set_xlabel("p99 latency (ms)")
        ax.set_ylabel("throughput (req/s)")
        ax.legend(fontsize=7)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
