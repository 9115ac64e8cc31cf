"""connect(): embedded Ray, reuse, and clear, fast errors for addresses that do not answer."""

from __future__ import annotations

import os
import time

import pytest
import ray

from cluster import ClusterConnectionError, ClusterHandle, Inventory, connect

pytestmark = pytest.mark.timeout(180)

SMALL_STORE = 200 * 1024**2
# Nothing listens on port 1 (privileged, unused): a connection is refused at once.
DEAD_ADDRESS = "127.0.0.1:1"


@pytest.fixture(autouse=True)
def no_ray_before_or_after(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_embedded_start_sets_started_here_and_shutdown_stops_it():
    handle = connect(num_cpus=2, num_gpus=2, object_store_memory=SMALL_STORE)
    try:
        assert handle.started_here and handle.embedded
        assert ray.is_initialized()
        assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
        assert ray.cluster_resources()["GPU"] == 2
        # Loopback only: the node and the GCS answer on 127.0.0.1.
        assert handle.address.startswith("127.0.0.1:")
        assert [n.address for n in Inventory.from_ray().nodes] == ["127.0.0.1"]
    finally:
        handle.shutdown()
    assert not ray.is_initialized()


def test_reuses_ray_already_initialised_and_leaves_it_running():
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=SMALL_STORE)
    handle = connect(num_cpus=8)  # sizing is ignored: Ray is already running
    assert handle == ClusterHandle(
        address=ray.get_runtime_context().gcs_address, embedded=True, started_here=False
    )
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    handle.shutdown()
    assert ray.is_initialized()


def test_explicit_bad_address_fails_fast_naming_the_address():
    start = time.monotonic()
    with pytest.raises(ClusterConnectionError) as caught:
        connect(DEAD_ADDRESS)
    assert time.monotonic() - start < 120  # it gives up, rather than retrying for ever (no speed: a bound)
    assert isinstance(caught.value, ConnectionError)
    message = str(caught.value)
    assert DEAD_ADDRESS in message and "address argument" in message
    assert "`--address` on the command line" in message  # what to do, for a CLI user too
    assert not ray.is_initialized()


def test_ray_address_env_is_used_when_no_argument(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", DEAD_ADDRESS)
    with pytest.raises(ClusterConnectionError) as caught:
        connect()
    assert caught.value.source == "RAY_ADDRESS"
    assert "RAY_ADDRESS" in str(caught.value) and DEAD_ADDRESS in str(caught.value)


def test_address_argument_wins_over_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:2")
    with pytest.raises(ClusterConnectionError) as caught:
        connect(DEAD_ADDRESS)
    assert caught.value.address == DEAD_ADDRESS and caught.value.source == "argument"


def test_dashboard_url_is_refused_with_a_hint():
    with pytest.raises(ClusterConnectionError, match="dashboard"):
        connect("http://127.0.0.1:8265")
