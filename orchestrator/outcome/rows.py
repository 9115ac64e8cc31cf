"""The rows every view of a sweep is built from (:func:`report_rows`: one per result), and the cells
of the tables the console and the Markdown report both show, so that they never disagree."""

from __future__ import annotations

from aitune.shapes import parse_ranges

import logging
from collections import defaultdict
from typing import Iterable

from aitune.accuracy import GATE_SIGNS
from aitune.decision import Rounds, paired_ratio
from aitune.strategy import speedup
from orchestrator.error_text import summarize
from orchestrator.outcome.selection import baseline_of
from orchestrator.records import OK, ResultRecord, SelectionRecord

log = logging.getLogger(__name__)


ROW_COLUMNS = (
    "model", "batch_size", "shape", "device", "candidate", "status", "build_s", "median_ms", "p99_ms", "speedup",
    "first_median_ms", "window", "max_abs_err", "gates", "kept_full_precision", "peak_memory_mb", "from_store", "how", "winner", "tie", "error", "key",
)  # fmt: skip


def batch_cell(batch_size: int, shape: str | None) -> str:
    """A table's batch cell: ``8``, or ``8 seq=64`` at a shape point."""
    return f"{batch_size} {shape}" if shape else str(batch_size)


def _lengths(shape: str | None) -> list[int]:
    """A shape point's sizes, for sorting (seq=8 before seq=16)."""
    return [v for lo_hi in parse_ranges(shape or "").values() for v in (lo_hi[1], lo_hi[0] != lo_hi[1])]


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
                "shape": r.shape,
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
                # the accuracy gates it was judged by: figures, limits, passed (None: a tolerance alone)
                "gates": _gates_of(r),
                # the layers a quantized candidate's build kept in full precision (None: not one of those)
                "kept_full_precision": _kept_of(r),
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


def _kept_of(record: ResultRecord) -> list[str] | None:
    """The layers a quantized candidate's build kept out of its scheme (its fallback's choice)."""
    notes = (record.context or {}).get("notes")
    kept = notes.get("kept_full_precision") if isinstance(notes, dict) else None
    return [str(k) for k in kept] if isinstance(kept, list) and kept else None


def _gates_of(record: ResultRecord) -> dict | None:
    gates = record.check.gates if record.check is not None else None
    if not isinstance(gates, dict) or not isinstance(gates.get("figures"), dict):
        return None
    limits = gates.get("limits") if isinstance(gates.get("limits"), dict) else {}
    passed = gates.get("passed") if isinstance(gates.get("passed"), dict) else {}
    out = {name: {"figure": figure, "limit": limits.get(name), "passed": passed.get(name)}
           for name, figure in gates["figures"].items()}
    task = gates.get("task")
    if isinstance(task, dict):  # the gate on the user's evaluation batches
        bound = task.get("min") if task.get("min") is not None else task.get("max")
        out[f"task {task.get('metric')}"] = {"figure": task.get("figure"), "limit": bound, "passed": task.get("passed"),
                                            "sign": ">=" if task.get("min") is not None else "<="}
    return out


_GATE_LABEL = {"cosine": ("cos", ""), "sqnr_db": ("sqnr", " dB"), "topk_rel_err": ("top-k err", "")}


def fmt_gates(gates: dict | None) -> str:
    """``cos 0.99995>=0.999 sqnr 39.6>=30 dB``: each gate's figure against its limit (``!`` where it failed)."""
    if not gates:
        return "-"
    parts = []
    for name, g in gates.items():
        label, unit = _GATE_LABEL.get(name, (name, ""))
        sign = GATE_SIGNS.get(name) or g.get("sign", "vs")
        figure, limit = g.get("figure"), g.get("limit")
        shown = f"{figure:.5g}" if isinstance(figure, (int, float)) else "?"
        bound = f"{sign}{limit:g}" if isinstance(limit, (int, float)) else ""
        parts.append(f"{label} {shown}{bound}{unit}{'' if g.get('passed') is not False else ' !'}")
    return ", ".join(parts)


def _device_name(record: ResultRecord) -> str | None:
    name = record.device_name
    if not name:
        return None
    for noise in ("NVIDIA ", "(R)", "(TM)", " CPU"):
        name = name.replace(noise, "")
    return " ".join(name.split("@")[0].split())  # "Xeon Gold 6338 @ 2.00GHz" -> "Xeon Gold 6338"


def fmt_num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def fmt_speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table_cells(row: dict, mark: str, gated: bool = True) -> list[str]:
    """A result's cells under :func:`table_headers` (``gated``: with the accuracy gates' column)."""
    kept = row.get("kept_full_precision")
    cells = [
        row["candidate"] + (f" [full precision: {', '.join(kept)}]" if kept else ""),
        batch_cell(row["batch_size"], row.get("shape")),
        row["device"] or "-",
        row["status"],
        fmt_num(row["build_s"], "{:.2f}"),
        fmt_ms(row["median_ms"]),
        fmt_ms(row["first_median_ms"]) if row["window"] == "rounds" else "",
        fmt_ms(row["p99_ms"]),
        fmt_speedup(row["speedup"]),
        fmt_num(row["max_abs_err"], "{:.2e}"),
        fmt_gates(row["gates"]),
        fmt_num(row["peak_memory_mb"], "{:.1f}"),
        row["how"] if row["from_store"] else "",
        mark if row["winner"] else ("tie" if row["tie"] else ""),
    ]
    if not gated:
        del cells[TABLE_HEADERS.index("accuracy gates")]
    return cells


def table_headers(gated: bool) -> tuple[str, ...]:
    """The table's headers; the accuracy gates' column only where a row was judged by gates (``gated``)."""
    return TABLE_HEADERS if gated else tuple(h for h in TABLE_HEADERS if h != "accuracy gates")


TABLE_HEADERS = ("candidate", "batch", "device", "status", "build s", "median ms", "first ms", "p99 ms", "speedup",
                  "worst error", "accuracy gates", "peak MB", "from store", "winner")  # fmt: skip


TABLE_NOTE = ("median ms, p99 ms and speedup: from the group's decision rounds (interleaved with eager fp32; the "
               "speedup is the median of eager's time over the candidate's, round by round) where they ran, else "
               "from the first measurement; first ms: the first (screening) measurement of those")


def rows_by_model(rows: list[dict]) -> dict[str, list[dict]]:
    by_model: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_model[row["model"]].append(row)
    for model_rows in by_model.values():
        # Within a batch: the correct ones fastest first, then the failures by name.
        model_rows.sort(key=lambda r: (r["batch_size"], _lengths(r.get("shape")), r["status"] != OK, r["median_ms"] or 0.0,
                                       r["candidate"]))
    return dict(sorted(by_model.items()))


WINNER_HEADERS = ("model", "batch", "winner", "speedup", "vs runner-up", "vs eager", "P(best)", "stopped",
                   "reason", "ties")  # fmt: skip


def _margin(pair: dict | None) -> str:
    """``1.12x (1.08-1.15)``: the other's time over the winner's in the same rounds, with its interval."""
    if not isinstance(pair, dict) or not all(isinstance(pair.get(k), (int, float)) for k in ("ratio", "low", "high")):
        return "-"
    return f"{pair['ratio']:.2f}x ({pair['low']:.2f}-{pair['high']:.2f})"


def winner_cells(s: SelectionRecord, gain: float | None, reuse: bool = True) -> tuple[str, ...]:
    d = s.decision if isinstance(s.decision, dict) else {}
    p_best = d.get("p_best")
    return (s.model, batch_cell(s.batch_size, s.shape), s.winner or "-", fmt_speedup(gain), _margin(d.get("runner_up")),
            _margin(d.get("baseline")), f"{p_best:.2f}" if isinstance(p_best, (int, float)) else "-",
            str(d.get("stop") or "-"), _reason(s, reuse=reuse) + (f"; not deployed: {s.superseded}" if s.superseded else ""),
            ", ".join(s.ties))


def _reason(s: SelectionRecord, reuse: bool = True) -> str:
    reason = f"{s.reason} (decided in sweep {s.decided_in})" if s.decided_in else s.reason
    if s.decisions_from and reuse:
        reason += f"; {reused_from(s)}"
    return reason


def reused_from(s: SelectionRecord) -> str:
    """Where a follower's decisions came from (``s.decisions_from`` is set)."""
    source = s.decisions_from or {}
    said = f"decisions reused from {source.get('model')} (tried its top {', '.join(source.get('candidates', []))}"
    if source.get("ahead"):  # run while the head was finishing, when they were among its top so far
        said += f"; also {', '.join(source['ahead'])}, run ahead of the head's end"
    return said + ")"


def incomplete_note(sweep_info: dict) -> str | None:
    """A sweep that did not finish says so wherever it is reported."""
    status = sweep_info.get("status")
    if not status or status == "done":
        return None
    if status == "running":
        return f"sweep {sweep_info.get('id')} is still running: this report is partial"
    return f"sweep {sweep_info.get('id')} did not finish ({status}): this report is incomplete"


def winner_speedups(selections: list[SelectionRecord], rows: list[dict]) -> list[tuple[SelectionRecord, float | None]]:
    # The selector's own speedup if it gave one, otherwise the winner row's speedup over the baseline.
    by_key = {row["key"]: row for row in rows}
    out = []
    for s in sorted(selections, key=lambda s: s.group):
        speedup = s.speedup
        if speedup is None and s.winner_key in by_key:
            speedup = by_key[s.winner_key]["speedup"]
        out.append((s, speedup))
    return out
