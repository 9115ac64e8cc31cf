"""What a sweep found, for people: rich tables on the console (this module), and JSON, CSV, Markdown
and a plot on disk (:mod:`orchestrator.outcome.report_files`).

Every view is built from the same rows (:func:`~orchestrator.outcome.rows.report_rows`), so the
console, the files and the plot never disagree about a number.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.outcome.report_files import write_reports
from orchestrator.outcome.rows import (
    ROW_COLUMNS,
    TABLE_NOTE,
    WINNER_HEADERS,
    batch_cell,
    fmt_ms,
    fmt_num,
    incomplete_note,
    report_rows,
    reused_from,
    rows_by_model,
    table_cells,
    table_headers,
    winner_cells,
    winner_speedups,
)
from orchestrator.records import OK, DeployRecord, ResultRecord, SelectionRecord
from orchestrator.store import DB_NAME, SqliteStore

__all__ = ["ROW_COLUMNS", "decisions_line", "incomplete_note", "render", "report_rows", "report_store", "write_reports"]


def _winner_mark(console: Console) -> str:
    # A console that cannot encode the star still gets a readable marker.
    encoding = console.encoding or ""
    return "★ WINNER" if encoding.lower().startswith("utf") else "* WINNER"


_STATUS_STYLE = {OK: "green", "incorrect": "yellow"}


def render(
    console: Console,
    results: Iterable[ResultRecord],
    selections: Iterable[SelectionRecord],
    deployments: Iterable[DeployRecord],
) -> None:
    selections, deployments = list(selections), list(deployments)
    rows = report_rows(results, selections)
    mark = _winner_mark(console)
    for model, model_rows in rows_by_model(rows).items():
        table = Table(title=escape(model), title_justify="left")
        gated = any(r["gates"] for r in model_rows)
        for header in table_headers(gated):
            left = header in ("candidate", "device", "status", "winner", "accuracy gates")
            table.add_column(header, justify="left" if left else "right")
        for row in model_rows:
            # Candidate names and errors are data, not markup: "[fp16]" must print as written.
            cells = [escape(c) for c in table_cells(row, mark, gated)]
            style = _STATUS_STYLE.get(row["status"], "red")
            cells[3] = f"[{style}]{cells[3]}[/{style}]"
            table.add_row(*cells, style="bold" if row["winner"] else None)
        console.print(table)
        if any(r["window"] == "rounds" for r in model_rows):
            console.print(f"  {TABLE_NOTE}", highlight=False, markup=False)
        errors = [r for r in model_rows if r["error"]]
        for row in errors:
            console.print(f"  [red]{escape(row['candidate'])} (batch {batch_cell(row['batch_size'], row.get('shape'))})[/red]: {escape(row['error'])}", highlight=False)

    if selections:
        table = Table(title="winners", title_justify="left")
        for header in WINNER_HEADERS:
            table.add_column(header)
        for s, gain in winner_speedups(selections, rows):
            table.add_row(*(escape(c) for c in winner_cells(s, gain, reuse=False)))
        console.print(table)
        # Where decisions came from, one unwrapped line each: a table cell would wrap it anywhere.
        for s in selections:
            if s.decisions_from:
                console.print(f"  {escape(s.model)} (batch {batch_cell(s.batch_size, s.shape)}): {escape(reused_from(s))}",
                              soft_wrap=True, highlight=False)

    if deployments:
        table = Table(title="deployments", title_justify="left")
        for header in ("model", "batch", "target", "status", "reason", "worst error", "median ms"):
            table.add_column(header)
        for d in deployments:
            cells = (d.model, batch_cell(d.batch_size, d.shape), d.target, d.status, d.reason or "",
                     fmt_num(d.max_abs_err, "{:.2e}"), fmt_ms(d.median_ms))  # fmt: skip
            table.add_row(*(escape(c) for c in cells))
        console.print(table)


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
