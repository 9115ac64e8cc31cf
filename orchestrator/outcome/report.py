"""What a sweep found, for people: rich tables on the console, and JSON, CSV, Markdown and a plot on disk.

Every view is built from the same rows (:func:`report_rows`), so the console, the files and the
plot never disagree about a number.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aitune.decision import Rounds, paired_ratio
from aitune.strategy import speedup
from orchestrator.error_text import summarize
from orchestrator.outcome.selection import baseline_of
from orchestrator.records import OK, DeployRecord, ResultRecord, SelectionRecord
from orchestrator.store import DB_NAME, SqliteStore

ROW_COLUMNS = (
    "model", "batch_size", "device", "candidate", "status", "build_s", "median_ms", "p99_ms", "speedup",
    "first_median_ms", "window", "max_abs_err", "peak_memory_mb", "from_store", "how", "winner", "tie", "error", "key",
)  # fmt: skip

log = logging.getLogger(__name__)


def decision_rounds(selection: SelectionRecord | None) -> Rounds | None:
    """A group's decision rounds (None where it had none, or its stored rounds don't read back)."""
    decision = selection.decision if selection is not None else None
    if not isinstance(decision, dict) or "times_ms" not in decision:
        return None
    try:
        return Rounds.from_dict(decision)
    except ValueError as exc:
        log.warning("the decision rounds of %s b%s don't read back: %s", selection.model, selection.batch_size, exc)
        return None


def report_rows(results: Iterable[ResultRecord], selections: Iterable[SelectionRecord]) -> list[dict]:
    """One row per result. Where its group was decided in interleaved rounds, a contender's figures
    are those of the rounds (what the decision rests on), its first measurement beside them."""
    results = list(results)
    baselines = baseline_of(results)
    chosen = {s.group: s for s in selections}
    in_rounds = {g: decision_rounds(s) for g, s in chosen.items()}
    rows = []
    for r in results:
        base = baselines.get(r.group)
        selection = chosen.get(r.group)
        ties = selection.ties if selection is not None else []
        rounds = in_rounds.get(r.group)
        mine = rounds.measurement(r.key) if rounds is not None and r.eligible else None
        # one window for both: paired in the rounds where both ran in them, else both first measurements
        if mine is not None and base is not None and base.key in rounds.times_ms:
            gain = paired_ratio(rounds.times_ms[r.key], rounds.times_ms[base.key])
        else:
            gain = speedup(base.measurement, r.measurement) if base is not None and base.eligible and r.eligible else None
        shown = mine or r.measurement
        rows.append(
            {
                "model": r.model,
                "batch_size": r.batch_size,
                "device": _device_name(r),
                "candidate": r.candidate,
                "status": r.status,
                "build_s": r.build_s,
                "median_ms": shown.median_ms if shown is not None else None,
                "p99_ms": shown.p99_ms if shown is not None else None,
                # Only a correct result gets a speedup: a fast wrong answer must not look like a win.
                "speedup": gain,
                "first_median_ms": r.median_ms,
                "window": "rounds" if mine is not None else ("first" if r.measurement is not None else None),
                "max_abs_err": r.max_abs_err,
                "peak_memory_mb": r.peak_memory_bytes / 2**20 if r.peak_memory_bytes is not None else None,
                "from_store": r.from_store,
                "how": r.how,
                "winner": selection is not None and selection.winner_key == r.key,
                # Ties may name candidates or keys depending on who wrote them; either marks the row.
                "tie": r.candidate in ties or r.key in ties,
                "error": summarize(r.error),
                "key": r.key,
            }
        )
    return rows


def _device_name(record: ResultRecord) -> str | None:
    name = record.device_name
    if not name:
        return None
    for noise in ("NVIDIA ", "(R)", "(TM)", " CPU"):
        name = name.replace(noise, "")
    return " ".join(name.split("@")[0].split())  # "Xeon Gold 6338 @ 2.00GHz" -> "Xeon Gold 6338"


# -- console -----------------------------------------------------------------------------------


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _winner_mark(console: Console) -> str:
    # A console that cannot encode the star still gets a readable marker.
    encoding = console.encoding or ""
    return "★ WINNER" if encoding.lower().startswith("utf") else "* WINNER"


def _table_cells(row: dict, mark: str) -> list[str]:
    return [
        row["candidate"],
        str(row["batch_size"]),
        row["device"] or "-",
        row["status"],
        _num(row["build_s"], "{:.2f}"),
        _ms(row["median_ms"]),
        _ms(row["first_median_ms"]) if row["window"] == "rounds" else "",
        _ms(row["p99_ms"]),
        _speedup(row["speedup"]),
        _num(row["max_abs_err"], "{:.2e}"),
        _num(row["peak_memory_mb"], "{:.1f}"),
        row["how"] if row["from_store"] else "",
        mark if row["winner"] else ("tie" if row["tie"] else ""),
    ]


_TABLE_HEADERS = ("candidate", "batch", "device", "status", "build s", "median ms", "first ms", "p99 ms", "speedup",
                  "worst error", "peak MB", "from store", "winner")  # fmt: skip
#: what the table's figures are, printed under it
_TABLE_NOTE = ("median ms, p99 ms and speedup: from the group's decision rounds (interleaved with eager fp32; the "
               "speedup is the median of eager's time over the candidate's, round by round) where they ran, else "
               "from the first measurement; first ms: the first (screening) measurement of those")

_STATUS_STYLE = {OK: "green", "incorrect": "yellow"}


def _rows_by_model(rows: list[dict]) -> dict[str, list[dict]]:
    by_model: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_model[row["model"]].append(row)
    for model_rows in by_model.values():
        # Within a batch: the correct ones fastest first, then the failures by name.
        model_rows.sort(key=lambda r: (r["batch_size"], r["status"] != OK, r["median_ms"] or 0.0, r["candidate"]))
    return dict(sorted(by_model.items()))


def render(
    console: Console,
    results: Iterable[ResultRecord],
    selections: Iterable[SelectionRecord],
    deployments: Iterable[DeployRecord],
) -> None:
    selections, deployments = list(selections), list(deployments)
    rows = report_rows(results, selections)
    mark = _winner_mark(console)
    for model, model_rows in _rows_by_model(rows).items():
        table = Table(title=escape(model), title_justify="left")
        for header in _TABLE_HEADERS:
            table.add_column(header, justify="right" if header not in ("candidate", "device", "status", "winner") else "left")
        for row in model_rows:
            # Candidate names and errors are data, not markup: "[fp16]" must print as written.
            cells = [escape(c) for c in _table_cells(row, mark)]
            style = _STATUS_STYLE.get(row["status"], "red")
            cells[3] = f"[{style}]{cells[3]}[/{style}]"
            table.add_row(*cells, style="bold" if row["winner"] else None)
        console.print(table)
        if any(r["window"] == "rounds" for r in model_rows):
            console.print(f"  {_TABLE_NOTE}", highlight=False, markup=False)
        errors = [r for r in model_rows if r["error"]]
        for row in errors:
            console.print(f"  [red]{escape(row['candidate'])} (batch {row['batch_size']})[/red]: {escape(row['error'])}", highlight=False)

    if selections:
        table = Table(title="winners", title_justify="left")
        for header in _WINNER_HEADERS:
            table.add_column(header)
        for s, gain in _winner_speedups(selections, rows):
            table.add_row(*(escape(c) for c in _winner_cells(s, gain, reuse=False)))
        console.print(table)
        # Where decisions came from, one unwrapped line each: a table cell would wrap it anywhere.
        for s in selections:
            if s.decisions_from:
                console.print(f"  {escape(s.model)} (batch {s.batch_size}): {escape(_reused(s))}",
                              soft_wrap=True, highlight=False)

    if deployments:
        table = Table(title="deployments", title_justify="left")
        for header in ("model", "batch", "target", "status", "reason", "worst error", "median ms"):
            table.add_column(header)
        for d in deployments:
            cells = (d.model, str(d.batch_size), d.target, d.status, d.reason or "",
                     _num(d.max_abs_err, "{:.2e}"), _ms(d.median_ms))  # fmt: skip
            table.add_row(*(escape(c) for c in cells))
        console.print(table)


_WINNER_HEADERS = ("model", "batch", "winner", "speedup", "vs runner-up", "vs eager", "P(best)", "stopped",
                   "reason", "ties")  # fmt: skip


def _margin(pair: dict | None) -> str:
    """``1.12x (1.08-1.15)``: the other's time over the winner's in the same rounds, with its interval."""
    if not isinstance(pair, dict) or not all(isinstance(pair.get(k), (int, float)) for k in ("ratio", "low", "high")):
        return "-"
    return f"{pair['ratio']:.2f}x ({pair['low']:.2f}-{pair['high']:.2f})"


def _winner_cells(s: SelectionRecord, gain: float | None, reuse: bool = True) -> tuple[str, ...]:
    d = s.decision if isinstance(s.decision, dict) else {}
    p_best = d.get("p_best")
    return (s.model, str(s.batch_size), s.winner or "-", _speedup(gain), _margin(d.get("runner_up")),
            _margin(d.get("baseline")), f"{p_best:.2f}" if isinstance(p_best, (int, float)) else "-",
            str(d.get("stop") or "-"), _reason(s, reuse=reuse), ", ".join(s.ties))


def decisions_line(selections: Iterable[SelectionRecord], decide_s: float, tune_s: float) -> str | None:
    """One line on what deciding cost: groups by why their rounds stopped, seconds of rounds and of
    waiting for a worker, and the share of the sweep's tuning and choosing it took."""
    decided = [s.decision for s in selections if isinstance(s.decision, dict) and not s.decided_in]
    with_rounds = [d for d in decided if "times_ms" in d]
    if not decided:
        return None
    stops = Counter(str(d.get("stop")) for d in decided)
    rounds_s = sum(float(d.get("seconds") or 0.0) for d in with_rounds)
    wait_s = sum(float(d.get("wait_s") or 0.0) for d in with_rounds)
    load_s = sum(float(d.get("load_s") or 0.0) for d in with_rounds)
    share = decide_s / (tune_s + decide_s) if tune_s + decide_s > 0 else 0.0
    return (f"decisions: {len(decided)} group(s): {', '.join(f'{n} {k}' for k, n in sorted(stops.items()))}; "
            f"{rounds_s:.1f} s of interleaved rounds, {load_s:.1f} s loading checkpoints for them, {wait_s:.1f} s "
            f"waiting for a worker; choosing took {decide_s:.1f} s, {share:.0%} of tuning and choosing")


def _reason(s: SelectionRecord, reuse: bool = True) -> str:
    reason = f"{s.reason} (decided in sweep {s.decided_in})" if s.decided_in else s.reason
    if s.decisions_from and reuse:
        reason += f"; {_reused(s)}"
    return reason


def _reused(s: SelectionRecord) -> str:
    """Where a follower's decisions came from (``s.decisions_from`` is set)."""
    source = s.decisions_from or {}
    said = f"decisions reused from {source.get('model')} (tried its top {', '.join(source.get('candidates', []))}"
    if source.get("ahead"):  # run while the head was finishing, when they were among its top so far
        said += f"; also {', '.join(source['ahead'])}, run ahead of the head's end"
    return said + ")"


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


def incomplete_note(sweep_info: dict) -> str | None:
    """A sweep that did not finish says so wherever it is reported."""
    status = sweep_info.get("status")
    if not status or status == "done":
        return None
    if status == "running":
        return f"sweep {sweep_info.get('id')} is still running: this report is partial"
    return f"sweep {sweep_info.get('id')} did not finish ({status}): this report is incomplete"


def _winner_speedups(selections: list[SelectionRecord], rows: list[dict]) -> list[tuple[SelectionRecord, float | None]]:
    # The selector's own speedup if it gave one, otherwise the winner row's speedup over the baseline.
    by_key = {row["key"]: row for row in rows}
    out = []
    for s in sorted(selections, key=lambda s: s.group):
        speedup = s.speedup
        if speedup is None and s.winner_key in by_key:
            speedup = by_key[s.winner_key]["speedup"]
        out.append((s, speedup))
    return out


# -- files -------------------------------------------------------------------------------------


def write_reports(
    out_dir: str | Path,
    sweep_info: dict,
    results: Iterable[ResultRecord],
    selections: Iterable[SelectionRecord],
    deployments: Iterable[DeployRecord],
    diff: dict | None = None,
) -> dict[str, Path]:
    """``diff``: :meth:`orchestrator.outcome.diff.SweepDiff.to_dict` against the previous sweep, if any."""
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
    for model, model_rows in _rows_by_model(rows).items():
        lines += [f"## {model}", ""]
        lines += _md_table(_TABLE_HEADERS, (_table_cells(row, mark) for row in model_rows))
        failures = [row for row in model_rows if row["error"]]
        for row in failures:
            lines.append(f"- {_md_cell(row['candidate'])} (batch {row['batch_size']}): {_md_cell(row['error'])}")
        if failures:
            lines.append("")
    if selections:
        lines += ["## Winners", ""]
        lines += _md_table(_WINNER_HEADERS, (_winner_cells(s, sp) for s, sp in _winner_speedups(selections, rows)))
        lines += [_TABLE_NOTE + ". vs runner-up, vs eager: their time over the winner's in the same rounds "
                  "(95% interval); P(best): how often the winner is fastest when the rounds are resampled.", ""]
    if deployments:
        lines += ["## Deployments", ""]
        lines += _md_table(
            ("model", "batch", "target", "status", "reason", "worst error", "median ms"),
            ((d.model, d.batch_size, d.target, d.status, d.reason or "", _num(d.max_abs_err, "{:.2e}"), _ms(d.median_ms))
             for d in deployments),
        )  # fmt: skip
    return "\n".join(lines)


def plot_latency(rows: list[dict], path: str | Path) -> Path:
    """Median latency per measured candidate, one subplot per model; p99 as a whisker, winners highlighted."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display, works on headless workers and CI
    from matplotlib.figure import Figure  # a bare Figure keeps pyplot's global figure list untouched

    measured = [r for r in rows if r["status"] == OK and r["median_ms"] is not None]
    by_model = _rows_by_model(measured)
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
        group = (row["batch_size"], row["device"])
        # A half-bar gap between (batch, device) groups keeps each group's bars visibly together.
        y.append((y[-1] + (1.0 if group == previous else 1.5)) if y else 0.0)
        previous = group
        where = f"bs {row['batch_size']}" + (f", {row['device']}" if several_devices else "")
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


# -- from a store ------------------------------------------------------------------------------


def report_store(
    store_root: str | Path,
    sweep_id: str | None = None,
    console: Console | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Path]:
    """Print and write the report of one sweep (the latest by default) from the store at ``store_root``.

    The store is opened read-only: reporting never changes it, and works on a read-only disk
    (then the files go to ``out_dir`` only, or are not written).
    """
    console = console or Console()
    root = Path(store_root)
    # Check first: opening a store on a wrong path must not quietly create an empty one there.
    if not (root / DB_NAME).is_file():
        raise FileNotFoundError(f"{root} is not an orchestrator store: {root / DB_NAME} does not exist")
    with SqliteStore(root, readonly=True) as store:
        sweep_id = sweep_id or store.latest_sweep_id()
        if sweep_id is None:
            raise LookupError(f"store {root} has no sweeps yet: run a sweep first")
        info = store.sweep_info(sweep_id).to_dict()
        results = store.sweep_results(sweep_id)
        selections = store.selections(sweep_id)
        deployments = store.deployments(sweep_id)
    note = incomplete_note(info)
    console.print(f"sweep {info['id']} ({info['name']}): {info['status']}", markup=False, highlight=False)
    render(console, results, selections, deployments)
    if note:
        console.print(f"note: {note}", markup=False, highlight=False)
    out = Path(out_dir) if out_dir else root / "reports" / sweep_id
    try:
        return write_reports(out, info, results, selections, deployments)
    except OSError as exc:
        if out_dir:
            raise
        console.print(f"reports not written: {out} is not writable ({exc.strerror or exc}); "
                      f"give --out DIR to write them elsewhere", markup=False, highlight=False)
        return {}
