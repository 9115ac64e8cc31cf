"""Deploying stored winners without tuning, rolling back, and what is live where.

``deploy_stored`` is what ``python -m orchestrator deploy STORE`` runs: it reads a past sweep's
spec, selections and results from the store and goes through the same ``deploy_winners`` as
``tune``. Everything that can be refused is refused before anything is installed: a store with
no sweeps, an unknown sweep or model, a bad target, a target whose device class has no winner, a
deploy root a target can't write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.records import DeployRecord, DeployStatus
from orchestrator.store import DB_NAME, ResultStore, SqliteStore


class DeployInputError(ValueError):
    """Bad input to deploy, rollback, serve or deployments; one clear line."""


_TARGET_FORMS = "all_gpus, gpus=N, cpu_slots=N or accelerator_type=NAME"


def parse_target(text: str) -> str | dict[str, Any]:
    """``all_gpus``, ``gpus=2``, ``cpu_slots=2``, ``accelerator_type=H200``: the spec's target forms."""
    from orchestrator.spec.sections import DeploySpec

    if text == "all_gpus":
        target: str | dict[str, Any] = text
    else:
        key, sep, value = text.partition("=")
        if not sep or key not in ("gpus", "cpu_slots", "accelerator_type"):
            raise DeployInputError(f"--target {text!r}: give one of {_TARGET_FORMS}")
        if key == "accelerator_type":
            target = {key: value}
        else:
            try:
                target = {key: int(value)}
            except ValueError:
                raise DeployInputError(f"--target {text!r}: {key} must be a whole number") from None
    try:
        DeploySpec(targets=[target])
    except Exception as exc:
        raise DeployInputError(f"--target {text!r}: {_first_line(exc)}") from None
    return target


def _first_line(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(str(e.get("msg")) for e in errors())
    return str(exc).splitlines()[0]


def open_existing(store_root: str | Path) -> SqliteStore:
    root = Path(store_root)
    if not (root / DB_NAME).is_file():
        raise DeployInputError(f"{root} is not a store (no {DB_NAME}); give the store a sweep wrote")
    return SqliteStore(root)


@dataclass
class Chosen:
    sweep_id: str
    spec: Any  # SweepSpec
    selections: list
    results: list


def choose(store: ResultStore, sweep_id: str | None, models: list[str] | None) -> Chosen:
    """The sweep (given, else the latest finished one with a winner) and its selections for ``models``."""
    from orchestrator.spec.schema import parse_spec

    sweeps = store.list_sweeps()
    if not sweeps:
        raise DeployInputError(f"store {store.root} has no sweeps: run `python -m orchestrator tune SPEC` first")
    if sweep_id is not None:
        found = [s for s in sweeps if s.id == sweep_id]
        if not found:
            raise DeployInputError(f"unknown sweep {sweep_id!r} in store {store.root}; sweeps: {', '.join(s.id for s in sweeps)}")
        sweep = found[0]
    else:
        done = [s for s in sweeps if s.status == "done" and any(x.winner_key for x in store.selections(s.id))]
        if not done:
            raise DeployInputError(f"store {store.root} has no finished sweep with a winner to deploy")
        sweep = done[-1]
    try:
        spec = parse_spec(sweep.spec)
    except Exception as exc:  # a stored spec is read back from disk: trusted for nothing
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        why = "; ".join(lines[1:] if len(lines) > 1 else lines) or type(exc).__name__
        raise DeployInputError(f"store {store.root}: the spec stored for sweep {sweep.id} can't be read: "
                               f"{why[:400]}") from None
    selections = [s for s in store.selections(sweep.id) if s.winner_key]
    known = sorted({m.name for m in spec.models})
    for name in models or []:
        if name not in known:
            raise DeployInputError(f"unknown model {name!r}: sweep {sweep.id} tuned {', '.join(known)}")
    if models:
        selections = [s for s in selections if s.model in models]
    if not selections:
        raise DeployInputError(f"sweep {sweep.id} has no winner for {', '.join(models or known)}")
    return Chosen(sweep.id, spec, selections, store.sweep_results(sweep.id))


def with_targets(spec, targets: list | None, root: str | None):
    from aitune.deploy_root import root_problem

    changes: dict[str, Any] = {}
    if targets:
        changes["targets"] = targets
    if root is not None:
        problem = root_problem(root)  # empty, a system folder, a file: refused before Ray starts
        if problem:
            raise DeployInputError(f"--root {root!r}: {problem}")
        changes["root"] = str(Path(root).expanduser().absolute())
    spec.deploy = spec.deploy.model_copy(update=changes)
    if not spec.deploy.targets:
        raise DeployInputError("no deploy targets: the sweep's spec names none; give --target (e.g. cpu_slots=1)")
    return spec


def _connect(address: str | None, ray_init: dict | None):
    from cluster import Inventory, connect

    handle = connect(address, **(ray_init or {}))
    return handle, Inventory.from_ray()


def _plan_targets(inventory, targets) -> None:
    from cluster import plan_deploy_targets

    try:
        plan_deploy_targets(inventory, targets)
    except ValueError as exc:
        raise DeployInputError(f"deploy targets: {exc}") from None


def deploy_stored(store_root: str | Path, *, sweep_id: str | None = None, models: list[str] | None = None,
                  targets: list | None = None, address: str | None = None, root: str | None = None,
                  ray_init: dict | None = None) -> list[DeployRecord]:
    """Install a past sweep's winners on the targets (the sweep's own unless given), verified there."""
    from orchestrator.deploy.install import deploy_winners

    with open_existing(store_root) as store:
        chosen = choose(store, sweep_id, models)
        spec = with_targets(chosen.spec, targets, root)
        handle, inventory = _connect(address, ray_init)
        try:
            _plan_targets(inventory, spec.deploy.targets)
            return deploy_winners(spec, store, chosen.sweep_id, chosen.selections, chosen.results, inventory,
                                  in_sweep=False, require_winners=True)
        finally:
            handle.shutdown()


def rollback_stored(store_root: str | Path, *, models: list[str] | None = None, sweep_id: str | None = None,
                    targets: list | None = None, address: str | None = None, root: str | None = None,
                    ray_init: dict | None = None) -> list[DeployRecord]:
    """On each target node (once per node and device class), switch ``current`` back one version, verified."""
    import ray

    from aitune.deploy_root import DeployRootError
    from orchestrator.deploy.install import start_targets, stop_targets, target_infos

    with open_existing(store_root) as store:
        chosen = choose(store, sweep_id, models)
        spec = with_targets(chosen.spec, targets, root)
        handle, inventory = _connect(address, ray_init)
        try:
            _plan_targets(inventory, spec.deploy.targets)
            actors = start_targets(inventory, spec.deploy.targets)
            try:
                # a root a target can't write (read-only, a file, no permission): refused before anything
                problems = ray.get([a.check_root.remote(spec.deploy.root) for _, a in actors], timeout=120)
                for (slot, _), problem in zip(actors, problems):
                    if problem:
                        raise DeployRootError(f"target {slot.label}: {problem}")
                seen, calls = set(), []
                for (slot, actor), info in zip(actors, target_infos(actors)):
                    place = (info["node_id"], info["device_class_key"])
                    if place in seen:  # one deploy root per node: roll it back once
                        continue
                    seen.add(place)
                    for model, batch, shape in sorted({(s.model, s.batch_size, s.shape) for s in chosen.selections}):
                        calls.append(actor.rollback.remote(spec.deploy.root, model, batch, spec.deploy.latency_check_s,
                                                           chosen.sweep_id, shape))
                records = [DeployRecord.from_dict(r) for r in ray.get(calls, timeout=spec.budgets.build_timeout_s)]
            finally:
                stop_targets(actors)
            for rec in records:
                store.put_install(rec)
            return records
        finally:
            handle.shutdown()


@dataclass
class LiveRow:
    node: str
    root: str
    model: str
    batch_size: int
    device: str
    version: str
    sweep_id: str
    winner: str
    median_ms: float | None
    at: float
    action: str
    class_key: str = ""
    #: where the deploy root on this host disagrees with the store (None: it agrees, or is not on this host)
    disk: str | None = None
    #: the shape point of a bucket (``seq=64``); '' for fixed shapes
    shape: str = ""


def live_deployments(store_root: str | Path) -> list[LiveRow]:
    """What each (node, deploy root, model, device class, batch) serves: its last successful install,
    checked against the deploy root itself where that root is on this host (``disk`` says where
    the two disagree, and a version current on disk that the store has no record of is a row too)."""
    import socket

    with open_existing(store_root) as store:
        if not store.list_sweeps():
            raise DeployInputError(f"store {store.root} has no sweeps: run `python -m orchestrator tune SPEC` first")
        latest: dict[tuple, DeployRecord] = {}
        for rec in store.installs():
            if rec.status == DeployStatus.DEPLOYED and rec.version:
                # the host, not Ray's node id: an embedded Ray gets a new node id every run
                worker = rec.worker or {}
                node = worker.get("hostname") or worker.get("node_id", "?")
                latest[(node, rec.root, rec.model, rec.device_class_key, rec.batch_size, rec.shape)] = rec
    rows = []
    for (node, root, model, class_key, batch, shape), rec in sorted(latest.items(),
                                                                   key=lambda kv: tuple(str(x) for x in kv[0])):
        worker = rec.worker or {}
        rows.append(LiveRow(node, root or "?", model, batch, worker.get("device_name") or worker.get("device", "?"),
                            rec.version, rec.sweep_id or "?", (rec.winner_key or "?")[:12], rec.median_ms, rec.at or 0.0,
                            rec.action, class_key or "", shape=shape))
    here = socket.gethostname()
    for row in rows:
        if row.node == here and row.root != "?":
            row.disk = _disk_disagrees(row)
    rows += _on_disk_only(here, {row.root for row in rows if row.node == here and row.root != "?"}, rows)
    return rows


def batching_lines(rows: list[LiveRow]) -> list[str]:
    """Per (deploy root on this host, model, device class): the dynamic batching ``serve`` gives it."""
    import socket

    from aitune import deploy_root as layout
    from aitune.batching import batching_in_root

    here, lines = socket.gethostname(), []
    for root, model, class_key, device in sorted({(r.root, r.model, r.class_key, r.device) for r in rows
                                                  if r.node == here and r.root != "?" and r.class_key}):
        try:
            b = batching_in_root(Path(root), model, class_key)
        except (layout.DeployRootError, ValueError, OSError) as exc:
            lines.append(f"batching of {model} on {device} (deploy root {root}): unknown: {exc}")
            continue
        lines.append(f"batching of {model} on {device} (deploy root {root}): " + (
            f"dynamic batching up to {b.max_batch} rows as {sorted(b.latency_ms)}" if b.enabled
            else f"one request per call ({b.reason})"))
    return lines


def _disk_disagrees(row: LiveRow) -> str | None:
    from aitune import deploy_root as layout

    try:
        folder = layout.batch_dir(Path(row.root), row.model, row.class_key, row.batch_size, row.shape)
        if not folder.is_dir():
            return f"on disk: nothing installed in {folder}"
        now = layout.current_version(folder)
    except (layout.DeployRootError, ValueError, OSError) as exc:
        return f"on disk: {exc}"
    if now != row.version:
        return f"on disk: {now or 'nothing current'} is current, not {row.version}"
    return None


def _on_disk_only(here: str, roots: set[str], rows: list[LiveRow]) -> list[LiveRow]:
    """Versions current in this host's deploy roots that the store has no install record of."""
    from aitune import deploy_root as layout

    known = {(row.root, row.model, row.class_key[:16], row.batch_size, row.shape) for row in rows}
    extra = []
    for root in sorted(roots):
        try:
            entries = layout.live(root)
        except (layout.DeployRootError, OSError):
            continue  # each row of that root already says what is wrong with it
        for e in entries:
            if (root, e.model, e.class_key[:16], e.batch_size, e.shape) in known:
                continue
            try:
                install = layout.read_install(e.folder)
                sweep, winner = install.sweep_id or "?", (install.winner_key or "?")[:12]
            except layout.DeployRootError:
                sweep, winner = "?", "?"
            extra.append(LiveRow(here, root, e.model, e.batch_size, e.device_name or "?", e.version, sweep, winner, None,
                                 0.0, "?", e.class_key, disk="on disk only: the store has no record of installing it",
                                 shape=e.shape))
    return extra


def format_when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
