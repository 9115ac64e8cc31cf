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
        self.env = describe_environment(self.device)
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
    ) -> dict[str, Any]:
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
            # TODO(orchestrator): pass the spec's factories
            backend = load_checkpoint(path, self.device, allow_factories=True, allow_backends=True)
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
