"""Test only: pretend GPUs that take a device class of their own.

Ray's pretend GPUs (``ray.init(num_gpus=N)``, or ``ray.cluster_utils.Cluster`` nodes with
``num_gpus``) give a worker a GPU slot while torch sees no CUDA, so every worker runs on the CPU
and all of them fall in one device class. To test a cluster of several kinds of GPU on one
machine, start each pretend node with ``AITUNE_TEST_DEVICE_NAME`` in its environment, e.g.
``cluster.add_node(num_gpus=1, resources={"accelerator_type:H100": 1},
env_vars={"AITUNE_TEST_DEVICE_NAME": "H100"})``: the GPU-slot workers on that node take that
name as their device name, and so form the device class of that name.

It changes nothing for CPU slots, and it is not meant for real clusters. On a machine with a
real GPU the test name wins over the GPU's own: there every pretend GPU worker sees that one
GPU, and without the names all of them would form one device class.
"""

from __future__ import annotations

import dataclasses
import os

from aitune.environment import Environment

ENV_VAR = "AITUNE_TEST_DEVICE_NAME"


def pretend_device(env: Environment, slot_kind: str | None) -> Environment:
    """``env`` with the test device name of this node, for a GPU slot (whatever device torch sees)."""
    name = os.environ.get(ENV_VAR, "").strip()
    if not name or slot_kind != "gpu":
        return env
    return dataclasses.replace(env, device_name=name)
