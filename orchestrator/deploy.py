"""Deploy: put each winner's checkpoint on every target device and verify it there.

A deploy actor pinned to the target loads the checkpoint with ``from_dict`` (every checksum
verified, device-bound artifacts checked against the device), calls ``deploy(device)``, checks the
outputs against the stored eager fp32 reference and runs a short latency check. A target that
refuses one checkpoint goes on with the others.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from aitune.canonical import sha256_of
from aitune.check import compare_outputs, tolerance_for
from aitune.checkpoint import CheckpointError, load_checkpoint
from aitune.environment import describe_environment
from aitune.measure import MeasureConfig, measure
from aitune.torch.tree import flatten_tensors
from orchestrator.pretend_gpus import pretend_device
from orchestrator.records import DeployRecord
from orchestrator.transfer import unpack_to
from orchestrator.worker import load_reference, pick_device, quiet_libraries

DEPLOYED, REFUSED = "deployed", "refused"


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
    ) -> dict[str, Any]:
        """``trust``: the manifest's SHA-256 recorded by the store, and the factories and backends
        the sweep's spec names; nothing else in the checkpoint is imported."""
        trust = trust or {}
        record = DeployRecord(
            model=selection["model"], batch_size=selection["batch_size"], target=self.target, status=REFUSED,
            winner_key=selection.get("winner_key"), worker=self.info(),
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
            check = compare_outputs(expected, got, tolerance_for(precision, tolerances))
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


def deploy_winners(spec, store, sweep_id: str, selections, results, inventory) -> list[DeployRecord]:
    """One deploy actor per target; each winner's checkpoint (checked by the store first) to every target."""
    import ray

    from cluster import plan_deploy_targets
    from orchestrator.store import DamagedCheckpoint

    slots = plan_deploy_targets(inventory, spec.deploy.targets)
    by_key = {r.key: r for r in results}
    actor_class = ray.remote(max_restarts=0)(DeployWorker)
    actors = []
    for slot in slots:
        options = dict(slot.actor_options())
        if slot.env():
            options["runtime_env"] = {"env_vars": slot.env()}
        actors.append((slot, actor_class.options(**options).remote({"kind": slot.kind, "threads": slot.threads}, slot.label)))
    records: list[DeployRecord] = []

    def refuse_all(sel, reason: str) -> None:
        for slot, _ in actors:
            rec = DeployRecord(sel.model, sel.batch_size, slot.label, REFUSED, sel.winner_key, reason=reason)
            store.put_deploy(sweep_id, rec)
            records.append(rec)

    try:
        calls = []
        for sel in selections:
            if sel.winner_key is None:
                continue
            winner = by_key[sel.winner_key]
            try:
                checkpoint = store.checkpoint_bytes(winner)
            except DamagedCheckpoint as exc:
                refuse_all(sel, str(exc))
                continue
            reference = store.reference_bytes(winner.reference_key) if winner.reference_key else None
            trust = {
                "manifest_sha256": winner.manifest_sha256,
                "factories": [spec.model(winner.model).factory],
                "backends": [winner.backend] if ":" in winner.backend else [],
            }
            ckpt_ref, refs_ref = ray.put(checkpoint), ray.put(reference)
            for slot, actor in actors:
                calls.append((sel, slot, actor.deploy.remote(
                    ckpt_ref, refs_ref, sel.to_dict(), winner.config.get("precision", "float32"),
                    spec.tolerance_overrides(), spec.deploy.latency_check_s, trust)))
        for sel, slot, ref in calls:
            try:
                rec = DeployRecord.from_dict(ray.get(ref, timeout=spec.budgets.build_timeout_s))
            except Exception as exc:
                rec = DeployRecord(sel.model, sel.batch_size, slot.label, "failed", sel.winner_key, reason=f"{type(exc).__name__}: {exc}")
            store.put_deploy(sweep_id, rec)
            records.append(rec)
    finally:
        for _, actor in actors:
            ray.kill(actor, no_restart=True)
    return records
