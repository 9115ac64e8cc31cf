"""``reuse: decisions``: tune one member of a model family fully, the others only on its top-k.

A family is one architecture (the structure key: class, parameter names, shapes and dtypes),
one graph spec and one device class: fine-tunes of one base, at one batch size, on one kind of
device. The first model of the family in the spec (its *head*) is tuned fully. Each later member
whose ``reuse`` is ``decisions`` builds only the head's ``reuse_top_k`` best correct candidates,
with its own weights, each checked against its own reference and measured; its winner is chosen
among those. A member none of whose top-k candidates turns out correct with its weights runs the
rest of the candidates after all: reuse narrows the search, never leaves a model without a winner.

In a sweep, :class:`FamilyGate` does this inside one scheduler run: each follower waits only
for its own family head, and a worker that would idle while the head's last jobs run takes a
follower's jobs of the head's top-k so far (:meth:`FamilyGate.speculate`). :meth:`Waves.second`
does it all at once (the plan command).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator import records as R
from orchestrator.dispatch.gate import JobGate
from orchestrator.planning.keys import Decision
from orchestrator.records import ResultRecord, SelectionRecord
from orchestrator.spec.schema import SweepSpec


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
    #: keys of followers' jobs let run ahead of their head's end (see FamilyGate.speculate)
    ahead: set[str] = field(default_factory=set)

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

    def release(self, fam: str, results: list[ResultRecord]) -> list[Decision]:
        """The family's followers' top-k decisions, from its head's results; the rest kept for
        :meth:`fallback`. All of them when the head has no correct candidate."""
        held = self.held.get(fam, [])
        head = self.heads[fam]
        ranked = self.ranked(fam, results)
        top_keys = {r.candidate_key for r in ranked[:self.spec.reuse_top_k]}
        if not top_keys:  # the head has no correct candidate: nothing to narrow by
            return list(held)
        chosen = []
        for d in held:
            group = d.job.group
            self.sources[group] = {"model": head, "candidates": [r.candidate for r in ranked[:self.spec.reuse_top_k]]}
            if d.job.candidate_key in top_keys:
                chosen.append(d)
            else:
                self.rest.setdefault(group, []).append(d)
        return chosen

    def ranked(self, fam: str, results: list[ResultRecord]) -> list[ResultRecord]:
        """The family head's correct results among ``results``, fastest first."""
        held = self.held.get(fam, [])
        head = self.heads[fam]
        return sorted((r for r in results if r.model == head and r.eligible and _family_of(r, held) == fam),
                      key=lambda r: _rank_value(r, self.spec.objective))

    def second(self, results: list[ResultRecord]) -> list[Decision]:
        """Every family's followers' top-k decisions, from the heads' results."""
        return [d for fam in self.held for d in self.release(fam, results)]

    def followers(self) -> list[Decision]:
        return [d for held in self.held.values() for d in held]

    def fallback(self, results: list[ResultRecord]) -> list[Decision]:
        """The other candidates of follower groups none of whose top-k turned out correct."""
        winners = {r.group for r in results if r.eligible}
        have = {r.key for r in results}
        out: list[Decision] = []
        for group, rest in self.rest.items():
            if group not in winners:
                out += [d for d in rest if d.job.key not in have]
                self.sources.pop(group, None)
        return out

    def annotate(self, selections: list[SelectionRecord], results: list[ResultRecord] = ()) -> None:
        """Say on each follower's selection whose decisions it reused, and which other candidates
        of ``results`` it ran ahead of its head's end (``ahead``: they were its top-k so far)."""
        for s in selections:
            group = s.group
            source = self.sources.get(group)
            if source is not None:
                s.decisions_from = dict(source)
                extra = sorted({r.candidate for r in results if r.key in self.ahead and r.status != R.SKIPPED
                                and r.group == group} - set(source["candidates"]))
                if extra:
                    s.decisions_from["ahead"] = extra


def _family_of(record: ResultRecord, held: list[Decision]) -> str | None:
    """The family of a head's result: the one whose followers share its batch and device class."""
    for d in held:
        if d.job.batch_size == record.batch_size and d.job.device_class_key == record.device_class_key:
            return d.job.family_key
    return None


#: the error class of a follower's job left out because it is not among its family's top-k
NARROWED = "NotInTopK"


class FamilyGate(JobGate):
    """Holds each follower's build jobs until its own family head is done, then lets the top-k
    through and leaves the rest out: one scheduler run, no wave waiting for another family.

    Wraps the sweep's store gate (claims) for every job it lets through. A left-out job comes
    back from :meth:`poll` as a result with error class :data:`NARROWED`, which the sweep drops
    (it is never stored); the job is kept in ``waves.rest`` for the fallback.
    """

    def __init__(self, inner, waves: Waves, store, sweep_id: str, to_run: list, done: list[ResultRecord]) -> None:
        self.inner, self.waves, self.store, self.sweep_id = inner, waves, store, sweep_id
        self.family_of = {d.job.key: fam for fam, held in waves.held.items() for d in held}
        self.results = list(done)
        running = {j.key for j in to_run}
        self.pending: dict[str, set[str]] = {
            fam: {d.job.key for d in waves.first if d.job.model == waves.heads[fam] and d.job.family_key == fam
                  and d.job.key in running}
            for fam in waves.held
        }
        self.top: dict[str, set[str]] = {}
        self._release_done()

    def _release_done(self) -> None:
        waiting = {k for fam, keys in self.pending.items() if fam not in self.top for k in keys}
        if waiting:
            stored = self.store.results_for(waiting)
            for key in list(waiting):
                mine = [r for r in stored.get(key, []) if r.sweep_id == self.sweep_id]
                if mine:
                    self.results.append(mine[0])
                    for keys in self.pending.values():
                        keys.discard(key)
        for fam, keys in self.pending.items():
            if fam not in self.top and not keys:
                self.top[fam] = {d.job.candidate_key for d in self.waves.release(fam, self.results)}

    def holds(self, job) -> bool:
        fam = self.family_of.get(job.key)
        return fam is not None and fam not in self.top

    def admit(self, job) -> bool:
        fam = self.family_of.get(job.key)
        if fam is None:
            return self.inner.admit(job)
        if fam not in self.top:  # its head is still tuning: only a job let run ahead goes
            return job.key in self.waves.ahead and self.inner.admit(job)
        if job.candidate_key not in self.top[fam]:
            return False  # not among the top-k (one let run ahead that fell out of it too): poll settles it
        return self.inner.admit(job)

    def speculate(self, deferred: list, classes: set[str]) -> list:
        """For a worker of one of ``classes`` that has nothing else to do: the next follower's
        jobs of the candidates in its head's top-k so far (its results in so far), one follower
        at a time. The head's last results may still change the top-k: a job let run ahead that
        is not in the final top-k is left out if it has not started, and kept as a result of
        that follower (said on its selection) if it has."""
        self._release_done()
        provisional: dict[str, set[str]] = {}
        for job in deferred:
            fam = self.family_of.get(job.key)
            if fam is None or fam in self.top or job.device_class_key not in classes or job.key in self.waves.ahead:
                continue
            if fam not in provisional:
                provisional[fam] = {r.candidate_key for r in self.waves.ranked(fam, self.results)[:self.waves.spec.reuse_top_k]}
            if job.candidate_key not in provisional[fam]:
                continue
            group = job.group
            chosen = [j for j in deferred if j.group == group
                      and self.family_of.get(j.key) == fam and j.candidate_key in provisional[fam]
                      and j.key not in self.waves.ahead]
            self.waves.ahead.update(j.key for j in chosen)
            return chosen
        return []

    def poll(self, deferred: list) -> tuple[list[ResultRecord], list]:
        self._release_done()
        mine = [j for j in deferred if j.key in self.family_of]
        others = [j for j in deferred if j.key not in self.family_of]
        done, runnable = self.inner.poll(others) if others else ([], [])
        for job in mine:
            fam = self.family_of[job.key]
            if fam not in self.top:
                continue
            if job.candidate_key in self.top[fam]:
                runnable.append(job)
            else:
                done.append(R.result_for(job, R.SKIPPED, "not among its family's top-k", NARROWED))
        return done, runnable
