"""Run in a fresh process by test_roundtrip: load a checkpoint, deploy it on the CPU, infer, save.

Usage: python roundtrip_child.py CHECKPOINT INPUT.pt OUTPUT.pt REPORT.json
"""

from __future__ import annotations

import json
import sys

import torch

from aitune.checkpoint import load_checkpoint


def main(checkpoint: str, input_path: str, output_path: str, report_path: str) -> None:
    # the one model factory test_roundtrip's checkpoints name; their backends are built-ins
    backend = load_checkpoint(checkpoint, "cpu", allow_factories=["aitune.examples:small_cnn"])
    states = [backend.state.name]
    backend.deploy("cpu")
    states.append(backend.state.name)
    x = torch.load(input_path, weights_only=True)
    with torch.inference_mode():
        out = backend.infer(x)
    torch.save(out, output_path)
    with open(report_path, "w") as fh:
        json.dump({"states": states, "backend": backend.name, "device": str(backend.device), "config": backend.config.to_dict()}, fh)


if __name__ == "__main__":
    main(*sys.argv[1:5])
