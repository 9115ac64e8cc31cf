"""The example cluster configs: valid for their tools, usage stats off, auth mode explicit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(60)

CONFIGS = Path(__file__).resolve().parents[2] / "cluster" / "configs"


def test_ray_up_config_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CONFIGS / "ray-up.yaml").read_text())
    validate_config(prepare_config(config))


def test_ray_up_starts_every_node_without_usage_stats_and_with_token_auth():
    config = yaml.safe_load((CONFIGS / "ray-up.yaml").read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    assert all("--disable-usage-stats" in c and "RAY_AUTH_MODE=token" in c for c in ray_starts)


def test_kuberay_cluster_has_a_gpu_worker_group_and_usage_stats_off():
    cr = yaml.safe_load((CONFIGS / "kuberay-raycluster.yaml").read_text())
    assert (cr["apiVersion"], cr["kind"]) == ("ray.io/v1", "RayCluster")
    groups = [cr["spec"]["headGroupSpec"], *cr["spec"]["workerGroupSpecs"]]
    containers = [c for g in groups for c in g["template"]["spec"]["containers"]]
    for container in containers:
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["RAY_USAGE_STATS_ENABLED"] == "0", container["name"]
    gpu_limits = [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for g in cr["spec"]["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    ]
    assert any(gpu_limits)
    assert cr["spec"]["authOptions"]["mode"] == "token"


def test_readme_shows_the_submit_command_and_the_auth_mode_rule():
    text = (CONFIGS / "README.md").read_text()
    assert "ray job submit" in text and "--working-dir . -- python -m orchestrator tune SPEC" in text
    assert "RAY_AUTH_MODE" in text
