"""``batch_sizes: auto``: the largest batch worth tuning, searched rather than guessed.

Each model whose batch sizes are ``auto`` is tuned at batch 1 with every candidate; then, per
device class, at 2, 4, 8... with only the ``TOP`` fastest candidates of the size before, measuring
throughput (rows per second of the fastest correct candidate: batch size / its median). The
search stops for a (model, device class) when the throughput gained by doubling was under 5%
for two sizes in a row, at ``max_batch``, when no candidate of a size succeeded (an out-of-memory
error included: its worker is recycled as for any failed build), or when the sweep's budget ran
out. The fastest candidates change with the batch size (bf16 on a CPU loses at batch 1 and wins
at 64), so a final round tries every candidate that was correct at batch 1 and was left out, at
the largest size the search tuned. Every size is a group like any other: keyed, stored and reused by the same rules, so a
rerun measures nothing twice. :meth:`BatchSearch.outcome` lists the sizes tuned and why each
search stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aitune.shapes import label
from orchestrator import records as R
from orchestrator.records import Job, ResultRecord
from orchestrator.spec.schema import SweepSpec

#: the candidates of one size that the next size tries
TOP = 3
#: a doubling that gains less than this (a fraction of throughput) is flat
FLAT_GAIN = 0.05
#: flat doublings in a row that end a search
FLAT_TRIES = 2
BUDGET = "the sweep's budget ran out"


@dataclass
class Search:
    """One (model, device class)'s search."""

    model: str
    device_class_key: str
    max_batch: int
    #: batch size -> rows per second of its fastest correct candidate
    throughput: dict[int, float] = field(default_factory=dict)
    #: the candidates (display names) the next size tries
    next_candidates: list[str] = field(default_factory=list)
    flat: int = 0
    stopped: str | None = None
    #: the candidates correct at batch 1, and those tried at each size
    candidates: set[str] = field(default_factory=set)
    tried: dict[int, set[str]] = field(default_factory=dict)
    #: the candidates the final round tried at the largest size (None: no final round yet)
    final: list[str] | None = None

    @property
    def last(self) -> int:
        return max(self.throughput, default=1)

    def take(self, size: int, results: list[ResultRecord]) -> None:
        """Judge one size's results; decide whether the search goes on."""
        ok = sorted((r for r in results if r.status == R.OK and r.median_ms), key=lambda r: (r.median_ms, r.candidate))
        self.tried.setdefault(size, set()).update(r.candidate for r in results)
        if not self.throughput:
            self.candidates = {r.candidate for r in ok}
        if not ok:
            errors = " ".join(str(r.error or "") for r in results).lower()
            why = "out of memory" if "out of memory" in errors else "no candidate succeeded"
            self.stopped = f"{why} at batch {size}"
            return
        self.throughput[size] = size * 1000.0 / ok[0].median_ms
        self.next_candidates = [r.candidate for r in ok[:TOP]]
        before = self.throughput.get(size // 2)
        if before is not None:
            self.flat = self.flat + 1 if self.throughput[size] < before * (1 + FLAT_GAIN) else 0
        if self.flat >= FLAT_TRIES:
            self.stopped = f"throughput gained under {FLAT_GAIN:.0%} for {FLAT_TRIES} doublings in a row"
        elif size * 2 > self.max_batch:
            self.stopped = f"max_batch {self.max_batch} reached"

    def left_out(self) -> list[str]:
        """The candidates correct at batch 1 not yet tried at the largest size tuned."""
        return sorted(self.candidates - self.tried.get(self.last, set())) if self.throughput else []

    def take_final(self, results: list[ResultRecord]) -> None:
        """The final round at the largest size: its throughput is the best of every candidate tried there."""
        size = self.last
        self.final = sorted({r.candidate for r in results})
        self.tried.setdefault(size, set()).update(self.final)
        ok = [r for r in results if r.status == R.OK and r.median_ms]
        if ok:
            self.throughput[size] = max(self.throughput[size], size * 1000.0 / min(r.median_ms for r in ok))

    def to_dict(self) -> dict:
        return {"model": self.model, "device_class_key": self.device_class_key,
                "batch_sizes": sorted(self.throughput),
                "rows_per_s": {str(b): round(t, 3) for b, t in sorted(self.throughput.items())},
                "stopped": self.stopped, "final_round": self.final}


class BatchSearch:
    """The searches of one sweep, size by size."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.models = [m.name for m in spec.models if spec.searches_batches(m)]
        self.searches: dict[tuple[str, str], Search] = {}
        #: a model whose lengths vary is judged at its largest bucket (what fills memory first)
        self.judged_at = {m.name: label({n: b[-1] for n, b in m.axes().items()}) for m in spec.models}

    @property
    def active(self) -> bool:
        return bool(self.models)

    def take(self, results: list[ResultRecord]) -> None:
        """The results of the sizes just tuned (batch 1 with the rest of the sweep, then one size a round)."""
        by_group: dict[tuple[str, str, int], list[ResultRecord]] = {}
        for r in results:
            if r.model in self.models and r.shape == self.judged_at[r.model]:
                by_group.setdefault((r.model, r.device_class_key, r.batch_size), []).append(r)
        for (model, dc, size), group in sorted(by_group.items()):
            search = self.searches.get((model, dc))
            if search is None:
                search = self.searches[(model, dc)] = Search(model, dc, self.spec.max_batch_of(self.spec.model(model)))
            if search.stopped is None and size not in search.throughput:
                search.take(size, group)

    def next_spec(self) -> SweepSpec | None:
        """The spec of the next round: each model still searched, at its next size (None: all done)."""
        going = {}
        for s in self.searches.values():
            if s.stopped is None:
                going[s.model] = min(going.get(s.model, s.last * 2), s.last * 2)
        if not going:
            return None
        models = [m.model_copy(update={"batch_sizes": [going[m.name]]}) for m in self.spec.models if m.name in going]
        return self.spec.model_copy(update={"models": models})

    def wanted(self, job: Job) -> bool:
        """A job of the next round runs when its (model, device class) search goes on, at its next
        size, with one of the size before's fastest candidates."""
        search = self.searches.get((job.model, job.device_class_key))
        return (search is not None and search.stopped is None and job.batch_size == search.last * 2
                and job.candidate in search.next_candidates)

    def final_spec(self) -> SweepSpec | None:
        """The final round's spec: each model at its largest size tuned, where some candidate correct
        at batch 1 was left out there (None: nothing to try; a search stopped by the budget gets none)."""
        going = {s.model: s.last for s in self.searches.values()
                 if s.final is None and s.left_out() and s.stopped != BUDGET}
        if not going:
            return None
        models = [m.model_copy(update={"batch_sizes": [going[m.name]]}) for m in self.spec.models if m.name in going]
        return self.spec.model_copy(update={"models": models})

    def wanted_final(self, job: Job) -> bool:
        search = self.searches.get((job.model, job.device_class_key))
        return (search is not None and search.final is None and job.batch_size == search.last
                and job.candidate in search.left_out())

    def take_final(self, results: list[ResultRecord]) -> None:
        by_search: dict[tuple[str, str], list[ResultRecord]] = {}
        for r in results:
            if r.model in self.models and r.shape == self.judged_at[r.model]:
                by_search.setdefault((r.model, r.device_class_key), []).append(r)
        for key, group in by_search.items():
            if key in self.searches:
                self.searches[key].take_final(group)

    def out_of_budget(self) -> None:
        self._stop_all(BUDGET)

    def nothing_to_try(self) -> None:
        self._stop_all("no candidate left to try at the next size")

    def _stop_all(self, why: str) -> None:
        for s in self.searches.values():
            if s.stopped is None:
                s.stopped = why

    def realized(self) -> SweepSpec:
        """The spec as tuned: each searched model's batch sizes the ones it reached (for the later stages)."""
        sizes: dict[str, set[int]] = {}
        for s in self.searches.values():
            sizes.setdefault(s.model, set()).update(s.throughput or {1: 0.0})
        models = [m.model_copy(update={"batch_sizes": sorted(sizes.get(m.name, {1}))}) if m.name in self.models else m
                  for m in self.spec.models]
        return self.spec.model_copy(update={"models": models})

    def outcome(self) -> list[dict]:
        return [s.to_dict() for _, s in sorted(self.searches.items())]


def search_lines(outcome: list[dict], names: dict[str, str]) -> list[str]:
    """One console line per search: the sizes with their rows per second, and why it stopped."""
    out = []
    for s in outcome:
        figures = ", ".join(f"b{b} {float(t):,.0f} rows/s" for b, t in s["rows_per_s"].items())
        where = names.get(s["device_class_key"]) or s["device_class_key"][:12]
        final = f"; final round at b{max(map(int, s['rows_per_s']))}: {', '.join(s['final_round'])}" \
            if s.get("final_round") and s["rows_per_s"] else ""
        out.append(f"batch search {s['model']} on {where}: {figures or 'nothing tuned'}; stopped: {s['stopped']}{final}")
    return out
