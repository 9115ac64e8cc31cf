"""A sweep's report files: JSON and CSV (every row), Markdown (the tables), and a latency plot (PNG)."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

from orchestrator.outcome.rows import (
    ROW_COLUMNS,
    TABLE_NOTE,
    WINNER_HEADERS,
    batch_cell,
    fmt_ms,
    fmt_num,
    incomplete_note,
    report_rows,
    rows_by_model,
    table_cells,
    table_headers,
    winner_cells,
    winner_speedups,
)
from orchestrator.records import OK, DeployRecord, ResultRecord, SelectionRecord

log = logging.getLogger(__name__)


def _markdown_diff(diff: dict | None) -> str:
    if not diff:
        return ""
    lines = ["", f"## Changes since sweep {diff['previous_sweep']}", ""]
    rows = [g for g in diff["groups"] if g["status"] != "same" or g["trend"] or g["why"]]
    if not rows:
        return "\n".join(lines + ["Nothing changed.", ""])
    lines += _md_table(
        ("model", "batch", "device", "change", "winner before", "winner now", "latency ratio", "why"),
        ((g["model"], g["batch_size"], g["device"], g["status"], g["old_winner"] or "-", g["new_winner"] or "-",
          f"x{g['ratio']:.2f} {g['trend']}".strip() if g["ratio"] is not None else "-", ", ".join(g["why"]))
         for g in rows),
    )  # fmt: skip
    return "\n".join(lines)


def write_reports(
    out_dir: str | Path,
    sweep_info: dict,
    results: Iterable[ResultRecord],
    selections: Iterable[SelectionRecord],
    deployments: Iterable[DeployRecord],
    diff: dict | None = None,
    batch_search: list[dict] | None = None,
    buckets: list[dict] | None = None,
    shape_strategies: list[dict] | None = None,
) -> dict[str, Path]:
    """``diff``: :meth:`orchestrator.outcome.diff.SweepDiff.to_dict` against the previous sweep, if any;
    ``batch_search``: what ``batch_sizes: auto`` tuned and why each search stopped (report.json only)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, selections, deployments = list(results), list(selections), list(deployments)
    rows = report_rows(results, selections)
    paths = {name: out / name for name in ("report.json", "report.csv", "report.md", "latency.png")}

    everything = {
        "sweep": sweep_info,
        "rows": rows,
        "selections": [s.to_dict() for s in selections],
        "deployments": [d.to_dict() for d in deployments],
        "results": [r.to_dict() for r in results],
        "diff": diff,
    }
    if batch_search:
        everything["batch_search"] = batch_search
    if buckets:  # each bucketed model's winners by bucket, and the traffic mix's expected latency
        everything["buckets"] = buckets
    if shape_strategies:  # static buckets against a dynamic-shape artifact, and which serves
        everything["shape_strategies"] = shape_strategies
    paths["report.json"].write_text(json.dumps(_strict_json(everything), indent=2, default=str) + "\n")

    with paths["report.csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    paths["report.md"].write_text(_markdown(sweep_info, rows, selections, deployments) + _markdown_diff(diff))
    try:
        plot_latency(rows, paths["latency.png"])
    except ImportError as exc:  # matplotlib is a plotting nicety: the reports above still stand
        log.warning("no latency plot: %s (install matplotlib)", exc)
        del paths["latency.png"]
    return paths


def _strict_json(value: Any) -> Any:
    # json.dumps would write NaN/Infinity, which strict parsers (jq, browsers) reject; an infinite
    # error is still worth seeing, so non-finite numbers become strings rather than nulls.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    headers = list(headers)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_md_cell(str(c)) for c in row) + " |" for row in rows]
    return lines + [""]


def _markdown(sweep_info: dict, rows: list[dict], selections: list[SelectionRecord], deployments: list[DeployRecord]) -> str:
    title = sweep_info.get("name") or sweep_info.get("id") or "sweep"
    lines = [f"# Sweep {title}", ""]
    facts = [f"{name} `{sweep_info[name]}`" for name in ("id", "status") if sweep_info.get(name)]
    if facts:
        lines += [", ".join(facts), ""]
    note = incomplete_note(sweep_info)
    if note:
        lines += [f"**{note}**", ""]
    mark = "**WINNER**"
    for model, model_rows in rows_by_model(rows).items():
        lines += [f"## {model}", ""]
        gated = any(row["gates"] for row in model_rows)
        lines += _md_table(table_headers(gated), (table_cells(row, mark, gated) for row in model_rows))
        failures = [row for row in model_rows if row["error"]]
        for row in failures:
            lines.append(f"- {_md_cell(row['candidate'])} (batch {batch_cell(row['batch_size'], row.get('shape'))}): {_md_cell(row['error'])}")
        if failures:
            lines.append("")
    if selections:
        lines += ["## Winners", ""]
        lines += _md_table(WINNER_HEADERS, (winner_cells(s, sp) for s, sp in winner_speedups(selections, rows)))
        lines += [TABLE_NOTE + ". vs runner-up, vs eager: their time over the winner's in the same rounds "
                  "(95% interval); P(best): how often the winner is fastest when the rounds are resampled.", ""]
    if deployments:
        lines += ["## Deployments", ""]
        lines += _md_table(
            ("model", "batch", "target", "status", "reason", "worst error", "median ms"),
            ((d.model, batch_cell(d.batch_size, d.shape), d.target, d.status, d.reason or "", fmt_num(d.max_abs_err, "{:.2e}"), fmt_ms(d.median_ms))
             for d in deployments),
        )  # fmt: skip
    return "\n".join(lines)


def plot_latency(rows: list[dict], path: str | Path) -> Path:
    """Median latency per measured candidate, one subplot per model; p99 as a whisker, winners highlighted."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display, works on headless workers and CI
    from matplotlib.figure import Figure  # a bare Figure keeps pyplot's global figure list untouched

    measured = [r for r in rows if r["status"] == OK and r["median_ms"] is not None]
    by_model = rows_by_model(measured)
    heights = [max(len(model_rows), 1) for model_rows in by_model.values()] or [1]
    fig = Figure(figsize=(10, 1.2 + 0.32 * sum(heights) + 0.6 * len(heights)), layout="constrained")
    if not by_model:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no successful measurements", ha="center", va="center")
        ax.set_axis_off()
    else:
        axes = fig.subplots(len(by_model), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
        for ax, (model, model_rows) in zip(axes, by_model.items()):
            _plot_model(ax, model, model_rows)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def _plot_model(ax, model: str, rows: list[dict]) -> None:
    several_devices = len({r["device"] for r in rows}) > 1
    labels, medians, p99s, colors, y = [], [], [], [], []
    previous = None
    for row in rows:
        group = (row["batch_size"], row.get("shape"), row["device"])
        # A half-bar gap between (batch, device) groups keeps each group's bars visibly together.
        y.append((y[-1] + (1.0 if group == previous else 1.5)) if y else 0.0)
        previous = group
        where = f"bs {batch_cell(row['batch_size'], row.get('shape'))}" + (f", {row['device']}" if several_devices else "")
        labels.append(f"{row['candidate']} [{where}]")
        medians.append(row["median_ms"])
        p99s.append(max((row["p99_ms"] or row["median_ms"]) - row["median_ms"], 0.0))
        colors.append("tab:orange" if row["winner"] else "tab:blue")
    ax.barh(y, medians, xerr=[[0.0] * len(rows), p99s], color=colors, ecolor="0.3", capsize=3)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()  # first row on top, as in the tables
    ax.set_title(f"{model}: median latency (whisker to p99, orange = winner)", fontsize=10, loc="left")
    ax.set_xlabel("ms")
    if max(medians) / max(min(medians), 1e-9) > 50:  # batch sizes can span orders of magnitude
        ax.set_xscale("log")
