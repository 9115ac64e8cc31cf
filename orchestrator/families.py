"""``reuse: decisions``: tune one member of a model family fully, the others only on its top-k.

A family is one architecture (the structure key: class, parameter names, shapes and dtypes),
one graph spec and one device class: fine-tunes of one base, at one batch size, on one kind of
device. The first model of the family in the spec (its *head*) is tuned fully. Each later member
whose ``reuse`` is ``decisions`` builds only the head's ``reuse_top_k`` best correct candidates,
with its own weights, each checked against its own reference and measured; its winner is chosen
among those. A member none of whose top-k candidates turns out correct with its weights runs the
rest of the candidates after all: reuse narrows the search, never leaves a model without a winner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.plan import Decision
from orchestrator.records import ResultRecord, SelectionRecord
from orchestrator.spec import SweepSpec


def _rank_value(record: ResultRecord, objective: str) -> float:
    return record.median_ms if record.median_ms is not None else float("inf")


@dataclass
class Waves:
    """Which decisions run now, and which wait for their family head's results."""

    spec: SweepSpec
    first: list[Decision] = field(default_factory=list)
    #: family key -> the head model's name
    heads: dict[str, str] = field(default_factory=dict)
    #: family key -> the followers' decisions, held back
    held: dict[str, list[Decision]] = field(default_factory=dict)
    #: (model, batch, device class) of a follower -> {"model": head, "candidates": [...]}
    sources: dict[tuple, dict] = field(default_factory=dict)
    #: decisions not in the top-k, per follower group: the fallback
    rest: dict[tuple, list[Decision]] = field(default_factory=dict)

    @classmethod
    def split(cls, spec: SweepSpec, decisions: list[Decision]) -> "Waves":
        waves = cls(spec)
        order = {m.name: i for i, m in enumerate(spec.models)}
        for d in sorted(decisions, key=lambda d: order.get(d.job.model, 0)):
            fam = d.job.family_key
            head = waves.heads.setdefault(fam, d.job.model)
            if head != d.job.model and spec.reuse_of(spec.model(d.job.model)) == "decisions":
                waves.held.setdefault(fam, []).append(d)
            else:
                waves.first.append(d)
        return waves

    def second(self, results: list[ResultRecord]) -> list[Decision]:
        """The followers' top-k decisions, from the heads' results."""
        k = self.spec.reuse_top_k
        objective = self.spec.objective
        out: list[Decision] = []
        for fam, held in self.held.items():
            head = self.heads[fam]
            ranked = sorted((r for r in results if r.model == head and r.eligible
                             and _family_of(r, held) == fam), key=lambda r: _rank_value(r, objective))
            top = ranked[:k]
            top_keys = {_candidate_key(r) for r in top}
            if not top:  # the head has no correct candidate: nothing to narrow by
                out += held
                continue
            for d in held:
                group = (d.job.model, d.job.batch_size, d.job.device_class_key)
                self.sources[group] = {"model": head, "candidates": [r.candidate for r in top]}
                if d.job.candidate_key in top_keys:
                    out.append(d)
                else:
                    self.rest.setdefault(group, []).append(d)
        return out

    def fallback(self, results: list[ResultRecord]) -> list[Decision]:
        """The other candidates of follower groups none of whose top-k turned out correct."""
        winners = {(r.model, r.batch_size, r.device_class_key) for r in results if r.eligible}
        out: list[Decision] = []
        for group, rest in self.rest.items():
            if group not in winners:
                out += rest
                self.sources.pop(group, None)
        return out

    def annotate(self, selections: list[SelectionRecord]) -> None:
        """Say on each follower's selection whose decisions it reused."""
        for s in selections:
            source = self.sources.get((s.model, s.batch_size, s.device_class_key))
            if source is not None:
                s.decisions_from = dict(source)


def _candidate_key(record: ResultRecord) -> str:
    from aitune.canonical import sha256_of

    return sha256_of({"backend": record.backend, "config": record.config})


def _family_of(record: ResultRecord, held: list[Decision]) -> str | None:
    """The family of a head's result: the one whose followers share its batch and device class."""
    for d in held:
        if d.job.batch_size == record.batch_size and d.job.device_class_key == record.device_class_key:
            return d.job.family_key
    return None
