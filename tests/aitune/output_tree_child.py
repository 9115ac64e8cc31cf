"""Run in a fresh process by test_output_tree_backends: load a checkpoint, deploy it, infer once.

Usage: python output_tree_child.py CHECKPOINT INPUT.pt OUTPUT.pt [--import-types]
With --import-types the model's module is imported first (as a serving process that imports the
model's factory would); without it, the output's types are stand-ins made from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from aitune.checkpoint import load_checkpoint


def main(checkpoint: str, input_path: str, output_path: str, *flags: str) -> None:
    if "--import-types" in flags:
        import structured_outputs  # noqa: F401
    backend = load_checkpoint(checkpoint, "cpu")
    backend.deploy("cpu")
    with torch.inference_mode():
        out = backend.infer(torch.load(input_path, weights_only=True))
    fields = list(getattr(out, "_fields", ())) or [f.name for f in dataclasses.fields(out)]
    torch.save({"type": f"{type(out).__module__}:{type(out).__qualname__}", "fields": fields,
                "first": getattr(out, fields[0])}, output_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
