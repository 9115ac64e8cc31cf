"""Deploy: put each winner's checkpoint on every target device, verify it there and install it.

A deploy actor pinned to the target loads the checkpoint with ``from_dict`` (every checksum
verified, device-bound artifacts checked against the device), calls ``deploy(device)``, checks the
outputs against the stored eager fp32 reference and runs a short latency check. With an install
(``deploy_winners`` always asks for one) the checkpoint is first put in a new version folder of
the node's deploy root (:mod:`aitune.deploy_root`), verified where it lies, and only then made
``current``; a version that fails stays out. A target that refuses one checkpoint goes on with
the others. ``rollback`` switches a target back to the version before, verified the same way.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from aitune import deploy_root as layout
from aitune.accuracy import Criteria
from aitune.canonical import sha256_of
from aitune.check import compare_outputs, tolerance_for
from aitune.checkpoint import CheckpointError, load_checkpoint
from aitune.checkpoint_trust import candidate_allowlists
from aitune.environment import describe_environment
from aitune.measure import MeasureConfig, measure
from aitune.reference import load_reference
from aitune.shapes import at
from aitune.torch.tree import flatten_tensors
from orchestrator.records import DeployAction, DeployRecord, DeployStatus
from orchestrator.store import DamagedCheckpoint
from orchestrator.transfer import unpack_to
from orchestrator.worker.pretend_gpus import pretend_device
from orchestrator.worker.process import pick_device, quiet_libraries

DEPLOYED, REFUSED, FAILED = DeployStatus.DEPLOYED, DeployStatus.REFUSED, DeployStatus.FAILED


class DeployWorker:
    def __init__(self, slot: dict[str, Any], target: str) -> None:
        quiet_libraries()

        self.threads = int(slot.get("threads", 1))
        torch.set_num_threads(self.threads)
        self.device = pick_device(slot.get("kind", "cpu"))
        self.target = target
        self.env = pretend_device(describe_environment(self.device), slot.get("kind"))  # test-only name
        self.device_class_key = sha256_of(self.env.device_class())
        self._served: list[Any] = []  # deployed backends stay loaded, ready to serve

    def info(self) -> dict[str, Any]:
        import ray

        return {"target": self.target, "device": str(self.device), "node_id": ray.get_runtime_context().get_node_id(),
                "hostname": socket.gethostname(),
                "device_class_key": self.device_class_key, "device_name": self.env.device_name}

    def deploy(
        self,
        checkpoint: bytes,
        reference: bytes | None,
        selection: dict[str, Any],
        precision: str,
        tolerances: dict[str, dict[str, float]],
        latency_s: float,
        trust: dict[str, Any] | None = None,
        install: dict[str, Any] | None = None,
        criteria: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``trust``: the manifest's SHA-256 the store recorded, and the factories and backends the spec
        names (nothing else is imported). ``install``: ``root`` (None: this node's default) and
        ``sweep_id``; the verified checkpoint becomes current there. ``criteria``: how it was judged
        in its sweep (aitune.accuracy.Criteria); None: ``precision``'s tolerance under ``tolerances``."""
        trust, criteria = trust or {}, criteria or Criteria(tolerance_for(precision, tolerances)).to_dict()
        record = DeployRecord(
            model=selection["model"], batch_size=selection["batch_size"], target=self.target, status=REFUSED,
            winner_key=selection.get("winner_key"), worker=self.info(), device_class_key=self.device_class_key,
            at=time.time(), shape=selection.get("shape") or "",
        )
        if selection["device_class_key"] != self.device_class_key:
            record.reason = (
                f"checkpoint was built for device class {selection['device_class_key'][:12]}, "
                f"this target ({self.env.device_name}) is {self.device_class_key[:12]}"
            )
            return record.to_dict()
        if reference is None:
            record.reason = "no stored reference outputs to verify against"
            return record.to_dict()
        if install is not None:
            return self._install(checkpoint, reference, selection, criteria, latency_s, trust, install, record)
        return self._load_and_verify(checkpoint, reference, criteria, latency_s, trust, record)

    def _load_and_verify(self, checkpoint, reference, criteria, latency_s, trust, record: DeployRecord) -> dict[str, Any]:
        """Deploy in this actor only (no deploy root): load, check against the reference, measure."""
        root = Path(tempfile.mkdtemp(prefix="aitune-deploy-"))
        try:
            path = unpack_to(checkpoint, root / "checkpoint")
            backend = load_checkpoint(
                path, self.device, manifest_sha256=trust.get("manifest_sha256"),
                allow_factories=trust.get("factories") or [], allow_backends=trust.get("backends") or [],
            )
            backend.deploy(self.device)
            sample, expected = load_reference(reference)
            sample = sample.to(self.device)
            with torch.inference_mode():
                got = [t for _, t in flatten_tensors(sample(backend.infer))]
            judged = Criteria.from_dict(criteria)
            check = judged.apply(compare_outputs(expected, got, judged.tolerance), got, expected)
            record.max_abs_err = check.max_abs_err
            if not check.ok:
                record.reason = f"outputs differ from the reference: {check.reason}"
                return record.to_dict()
            m = measure(backend.infer, sample, self.device, MeasureConfig(budget_s=latency_s, min_iters=5, threads=self.threads))
            record.median_ms = m.median_ms
            record.status = DEPLOYED
            self._served.append(backend)
        except CheckpointError as exc:
            record.reason = f"checkpoint refused: {exc}"
        except Exception as exc:  # a deploy that fails on this target must not stop the others
            record.reason = f"{type(exc).__name__}: {exc}"
        finally:
            # Loaded backends keep what they need in memory; the unpacked files can go.
            shutil.rmtree(root, ignore_errors=True)
        return record.to_dict()

    def _install(self, checkpoint, reference, selection, criteria, latency_s, trust, install, record):
        from aitune.checkpoint import verify_checkpoint
        from aitune.loader import TunedModelError, load_for_class

        tmp = Path(tempfile.mkdtemp(prefix="aitune-deploy-"))
        try:
            root = layout.resolve_root(install.get("root"))
            record.root, record.sweep_id = str(root), install.get("sweep_id")
            path = unpack_to(checkpoint, tmp / "checkpoint")
            verify_checkpoint(path, trust.get("manifest_sha256"))
            factories = trust.get("factories") or []
            version_dir, new = layout.stage(
                root, path, reference, model=record.model, batch_size=record.batch_size, class_key=self.device_class_key,
                device_class=self.env.device_class(), tolerance=criteria["tolerance"], criteria=_beyond_tolerance(criteria),
                factory=factories[0] if factories else None, sweep_id=record.sweep_id, winner_key=record.winner_key,
                candidate=selection.get("winner"), positional_names=install.get("positional_names"),
                median_ms=install.get("median_ms"), shape=record.shape, shapes=install.get("shapes"),
            )
            folder = version_dir.parent
            record.previous = layout._current_or_none(folder)
            verified = layout.verify_version(version_dir, self.device, latency_s, self.threads)
            layout.activate(version_dir, verified, new)
            record.max_abs_err, record.median_ms = verified.max_abs_err, verified.median_ms
            if not verified.ok:
                record.reason, record.median_ms = verified.reason, None
                return record.to_dict()
            # Never say "verified" about a root serving can't load: load what is now current, as
            # load_tuned and serve will, and undo the switch if that fails.
            try:
                tuned = load_for_class(root, record.model, self.device, self.device_class_key)
                if tuned.version_at(record.batch_size, record.shape) != version_dir.name:
                    raise TunedModelError(f"{folder}: current is not {version_dir.name} after the switch")
            except TunedModelError as exc:
                if record.previous != version_dir.name:
                    layout.switch_back(version_dir, record.previous)
                record.reason, record.median_ms = f"installed, but load_tuned refuses it: {exc}", None
                return record.to_dict()
            record.status, record.version = DEPLOYED, version_dir.name
        except layout.DeployRootError as exc:
            record.reason = str(exc)
        except CheckpointError as exc:
            record.reason = f"checkpoint refused: {exc}"
        except Exception as exc:  # a deploy that fails on this target must not stop the others
            record.reason = f"{type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return record.to_dict()

    def check_root(self, root: str | None) -> str | None:
        """Why this node can't install under ``root`` (None: it can)."""
        try:
            layout.check_writable(root)
        except layout.DeployRootError as exc:
            return str(exc)
        return None

    def rollback(self, root: str | None, model: str, batch_size: int, latency_s: float, sweep_id: str | None,
                 shape: str = "") -> dict[str, Any]:
        """Switch this node's ``current`` for (model, this device class, batch) to the version before, verified."""
        record = DeployRecord(model=model, batch_size=batch_size, target=self.target, status=REFUSED, winner_key=None,
                              worker=self.info(), action=DeployAction.ROLLBACK, device_class_key=self.device_class_key, at=time.time(),
                              root=str(root), sweep_id=sweep_id, shape=shape)
        try:
            record.root = str(layout.resolve_root(root))
            was, to, verified = layout.rollback(root, model, self.device_class_key, batch_size, self.device, latency_s,
                                                self.threads, shape)
        except layout.DeployRootError as exc:
            record.reason = str(exc)
            return record.to_dict()
        except Exception as exc:  # never a traceback through Ray: one line naming what failed
            record.reason = f"{type(exc).__name__}: {exc}"
            return record.to_dict()
        record.previous, record.max_abs_err, record.median_ms = was, verified.max_abs_err, verified.median_ms
        if verified.ok:
            install = layout.read_install(layout.batch_dir(layout.resolve_root(root), model, self.device_class_key,
                                                           batch_size, shape) / to)
            record.status, record.version, record.winner_key = DEPLOYED, to, install.winner_key
            record.sweep_id = install.sweep_id or sweep_id
        else:
            record.reason, record.median_ms = f"rollback of {model} {at(batch_size, shape)} from {was}: {verified.reason}", None
        return record.to_dict()


class NoWinnerForTarget(ValueError):
    """A target's device class has no winner for a model being deployed."""


def start_targets(inventory, targets) -> list:
    """One deploy actor per target slot: [(slot, actor)]."""
    from cluster import plan_deploy_targets
    from cluster.actor_options import one_life_actor, slot_options

    slots = plan_deploy_targets(inventory, targets)
    actor_class = one_life_actor(DeployWorker)
    actors = []
    for slot in slots:
        config = {"kind": slot.kind, "threads": slot.threads}
        actors.append((slot, actor_class.options(**slot_options(slot)).remote(config, slot.label)))
    return actors


def shapes_of_winner(winner) -> dict[str, Any] | None:
    """The axes a winner was tuned with and why padding is refused for its model (None: verified), as
    its evaluation recorded them; None for a model whose shapes are fixed."""
    padding = ((winner.evaluation or {}).get("check") or {}).get("padding")
    if not isinstance(padding, dict) or not isinstance(padding.get("shapes"), dict):
        return None
    return {**padding["shapes"], "padding": padding.get("refused")}


def stop_targets(actors) -> None:
    import ray

    for _, actor in actors:
        ray.kill(actor, no_restart=True)


def target_infos(actors, timeout_s: float = 300) -> list[dict[str, Any]]:
    import ray

    return ray.get([actor.info.remote() for _, actor in actors], timeout=timeout_s)


def check_winners_for_targets(actors, selections, results) -> None:
    """Refuse (before anything is installed) a target whose device class has no winner for a model."""
    names = {r.device_class_key: (r.worker.device_class.get("device_name") if r.worker else None) for r in results}
    for (slot, _), info in zip(actors, target_infos(actors)):
        for model in sorted({s.model for s in selections}):
            have = {s.device_class_key for s in selections if s.model == model and s.winner_key}
            if info["device_class_key"] not in have:
                listed = ", ".join(sorted(f"{names.get(k) or '?'} [{k[:12]}]" for k in have)) or "none"
                raise NoWinnerForTarget(
                    f"target {slot.label} ({info['device_name']} [{info['device_class_key'][:12]}]) has no winner for "
                    f"{model}; device classes with one: {listed}")


def deploy_winners(spec, store, sweep_id: str, selections, results, inventory, *,
                   in_sweep: bool = True, require_winners: bool = False) -> list[DeployRecord]:
    """One deploy actor per target; each winner's checkpoint (checked by the store first) to every
    target, installed in its deploy root (``spec.deploy.root``) and recorded in the store's installs.

    ``in_sweep``: also record them as this sweep's deployments (``tune``; a later ``deploy`` of
    past winners leaves that sweep's report as it was). ``require_winners``: raise
    :class:`NoWinnerForTarget` before installing anything when a target's device class has no winner.
    """
    actors = start_targets(inventory, spec.deploy.targets)
    rollout = _Rollout(spec, store, sweep_id, actors, in_sweep)
    try:
        classes = [info["device_class_key"] for info in target_infos(actors)]
        if require_winners:
            check_winners_for_targets(actors, selections, results)
            rollout.check_roots()
        by_key = {r.key: r for r in results}
        selections = [s for s in selections if not s.superseded]  # the other shape strategy serves
        calls = [call for sel in selections if sel.winner_key is not None
                 for call in rollout.send(sel, by_key[sel.winner_key], classes)]
        rollout.refuse_classless(selections, results, classes)
        rollout.collect(calls)
    finally:
        stop_targets(actors)
    return rollout.records


class _Rollout:
    """One ``deploy_winners`` call: its targets, and the records it keeps (in the store as it goes)."""

    def __init__(self, spec, store, sweep_id: str, actors, in_sweep: bool) -> None:
        self.spec, self.store, self.sweep_id, self.actors, self.in_sweep = spec, store, sweep_id, actors, in_sweep
        self.install = {"root": spec.deploy.root, "sweep_id": sweep_id}
        self.records: list[DeployRecord] = []

    def keep(self, rec: DeployRecord) -> None:
        rec.sweep_id = rec.sweep_id or self.sweep_id
        rec.at = rec.at or time.time()
        if self.in_sweep:
            self.store.put_deploy(self.sweep_id, rec)
        self.store.put_install(rec)
        self.records.append(rec)

    def check_roots(self) -> None:
        """Every target's deploy root is usable, before anything is installed."""
        import ray

        problems = ray.get([a.check_root.remote(self.spec.deploy.root) for _, a in self.actors], timeout=120)
        for (slot, _), problem in zip(self.actors, problems):
            if problem:
                raise layout.DeployRootError(f"target {slot.label}: {problem}")

    def send(self, sel, winner, classes: list[str]) -> list:
        """The winner's deploy calls, one per target of its device class: [(selection, slot, ref)]."""
        import ray

        try:
            checkpoint = self.store.checkpoint_bytes(winner)
        except DamagedCheckpoint as exc:
            for slot, _ in self.actors:
                self.keep(DeployRecord(sel.model, sel.batch_size, slot.label, REFUSED, sel.winner_key, reason=str(exc),
                                       shape=sel.shape))
            return []
        reference = self.store.reference_bytes(winner.reference_key) if winner.reference_key else None
        factories, backends = candidate_allowlists(self.spec.model(winner.model).factory, winner.backend)
        trust = {"manifest_sha256": winner.manifest_sha256, "factories": factories, "backends": backends}
        ckpt_ref, refs_ref = ray.put(checkpoint), ray.put(reference)
        install = {**self.install, "positional_names": self._positional_names(winner.model),
                   "median_ms": _sweep_median_ms(sel, winner), "shapes": shapes_of_winner(winner)}
        return [(sel, slot, actor.deploy.remote(
                    ckpt_ref, refs_ref, sel.to_dict(), winner.config.get("precision", "float32"),
                    self.spec.tolerance_overrides(), self.spec.deploy.latency_check_s, trust, install,
                    criteria_of_winner(self.spec, winner)))
                for (slot, actor), device_class in zip(self.actors, classes)
                if device_class == sel.device_class_key]  # a winner goes to the targets of its own device class only

    def _positional_names(self, model: str) -> list[str | None] | None:
        """The spec's names of a model's positional inputs (None: a sample factory makes them)."""
        inputs = self.spec.model(model).inputs
        return None if inputs is None else [i.name for i in inputs if not i.kwarg]

    def refuse_classless(self, selections, results, classes: list[str]) -> None:
        """A target whose device class has no winner for a (model, batch) another class has one for
        was asked for and gets nothing: say so, naming the classes that have one."""
        names = {r.device_class_key: r.device_name for r in results}
        for (model, batch, shape) in sorted({(s.model, s.batch_size, s.shape) for s in selections if s.winner_key}):
            have = {s.device_class_key for s in selections
                    if (s.model, s.batch_size, s.shape) == (model, batch, shape) and s.winner_key}
            for (slot, _), device_class in zip(self.actors, classes):
                if device_class not in have:
                    listed = ", ".join(sorted(f"{names.get(k) or '?'} [{k[:12]}]" for k in have))
                    self.keep(DeployRecord(model, batch, slot.label, REFUSED, None,
                                           reason=f"no winner for this target's device class [{device_class[:12]}]; "
                                                  f"device classes with one: {listed}", shape=shape))

    def collect(self, calls) -> None:
        import ray

        for sel, slot, ref in calls:
            try:
                rec = DeployRecord.from_dict(ray.get(ref, timeout=self.spec.budgets.build_timeout_s))
            except Exception as exc:
                rec = DeployRecord(sel.model, sel.batch_size, slot.label, FAILED, sel.winner_key,
                                   reason=f"{type(exc).__name__}: {exc}", shape=sel.shape)
            self.keep(rec)


def _sweep_median_ms(sel, winner) -> float | None:
    """The winner's median in the rounds that decided it, else its first measurement's."""
    medians = (sel.decision or {}).get("medians") if isinstance(sel.decision, dict) else None
    value = medians.get(sel.winner_key) if isinstance(medians, dict) else None
    if value is None and winner.measurement is not None:
        value = winner.measurement.median_ms
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def criteria_of_winner(spec, winner) -> dict[str, Any]:
    """How a winner is verified on its targets: as it was judged in its sweep (its evaluation's
    criteria: tolerance, and gates), else (a record from before gates) by its precision's tolerance."""
    check = (winner.evaluation or {}).get("check") or {}
    try:
        # the evaluation batches of a task gate are not at hand on a target: the gates on the reference are
        return Criteria.from_dict(check).without_task().to_dict()
    except (ValueError, TypeError, KeyError):
        return Criteria(tolerance_for(winner.config.get("precision", "float32"), spec.tolerance_overrides())).to_dict()


def _beyond_tolerance(criteria: dict[str, Any]) -> dict[str, Any] | None:
    """What an install records besides its tolerance: None for a tolerance alone."""
    return criteria if set(criteria) - {"tolerance"} else None
