"""Connecting this process to Ray: an address, RAY_ADDRESS, or an embedded local Ray.

Resolution order: the ``address`` argument, then the ``RAY_ADDRESS`` environment variable
(``ray job submit`` sets it inside a job to the cluster's GCS address), then an embedded
local Ray started here. A Ray already initialised in this process is reused as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Iterator

import ray

logger = logging.getLogger(__name__)

USAGE_STATS_ENV = "RAY_USAGE_STATS_ENABLED"
ADDRESS_ENV = "RAY_ADDRESS"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
# On Linux Ray rewrites a loopback node address to the machine's outward address and binds
# its servers to every interface; only with "clusters disabled" does it keep 127.0.0.1.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"
# Ray itself retries an unreachable GCS for minutes; a plain TCP connect answers in seconds.
REACHABILITY_TIMEOUT_S = 5.0


def disable_usage_stats() -> None:
    """Keep Ray from reporting usage: these machines must make no outside traffic."""
    os.environ[USAGE_STATS_ENV] = "0"


class ClusterConnectionError(ConnectionError):
    """The Ray cluster at an explicit address (argument or RAY_ADDRESS) could not be joined."""

    def __init__(self, address: str, source: str, reason: str) -> None:
        self.address = address
        self.source = source
        self.reason = reason
        hint = (
            "unset RAY_ADDRESS to run an embedded local Ray instead"
            if source == ADDRESS_ENV
            else "leave the address out (`--address` on the command line, `address=` in Python) to run an "
            "embedded local Ray instead"
        )
        super().__init__(
            f"cannot connect to the Ray cluster at {address!r} (from {_describe_source(source)}): "
            f"{reason}. Check that `ray start --head` runs there and the port is open, or {hint}."
        )


@dataclass
class ClusterHandle:
    """What connect() joined: the GCS address, and whether Ray was started by this process."""

    address: str | None
    embedded: bool
    started_here: bool

    def shutdown(self) -> None:
        """Shut Ray down if, and only if, the connect() call that made this handle started it."""
        if self.started_here and ray.is_initialized():
            ray.shutdown()


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_memory: int | None = None,
    resources: dict | None = None,
    namespace: str = "aitune",
    log_to_driver: bool = True,
    runtime_env: dict | None = None,
) -> ClusterHandle:
    """Join a Ray cluster, or start an embedded local one; see the module docstring for the order.

    The sizing arguments only apply to an embedded Ray (a cluster's size is its own);
    ``runtime_env`` (for example ``{"working_dir": "."}`` when driving a remote cluster from
    outside it) is passed to Ray only when given.
    """
    disable_usage_stats()
    if ray.is_initialized():
        if any(v is not None for v in (num_cpus, num_gpus, object_store_memory, resources)):
            logger.warning("Ray is already initialised in this process; sizing arguments ignored")
        return ClusterHandle(address=_current_address(), embedded=_is_embedded(), started_here=False)

    common = {"namespace": namespace, "log_to_driver": log_to_driver}
    if runtime_env is not None:
        common["runtime_env"] = runtime_env

    source = "argument"
    if address is None:
        env_address = os.environ.get(ADDRESS_ENV, "").strip()
        if env_address:
            address, source = env_address, ADDRESS_ENV

    if address is None:
        with loopback_only():
            # "local" rather than None: None would join whatever `ray start` (or a test's
            # Cluster) last recorded in /tmp/ray/ray_current_cluster.
            ray.init(
                address="local",
                num_cpus=num_cpus if num_cpus is not None else _machine_cpus(),
                num_gpus=num_gpus,
                object_store_memory=object_store_memory,
                resources=resources,
                include_dashboard=False,
                _node_ip_address=LOOPBACK,
                **common,
            )
        return ClusterHandle(address=_current_address(), embedded=True, started_here=True)

    _check_reachable(address, source)
    try:
        ray.init(address=address, **common)
    except Exception as error:  # Ray raises ConnectionError, RuntimeError, AuthenticationError...
        reason = f"{type(error).__name__}: {error}"
        if os.environ.get(AUTH_MODE_ENV, "").lower() != "token":
            # A cluster with token authentication rejects us with only a generic
            # "Failed to connect" here (the real cause is in Ray's C++ log lines).
            reason += (
                f". If the cluster uses token authentication, set "
                f"{AUTH_MODE_ENV}=token here (it is {os.environ.get(AUTH_MODE_ENV, 'unset')!r}) "
                "with the cluster's token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or "
                "RAY_AUTH_TOKEN"
            )
        raise ClusterConnectionError(address, source, reason) from error
    return ClusterHandle(address=_current_address(), embedded=False, started_here=True)


def _describe_source(source: str) -> str:
    return "the RAY_ADDRESS environment variable" if source == ADDRESS_ENV else "the address argument"


def _check_reachable(address: str, source: str) -> None:
    """Fail in seconds on a host:port that accepts no TCP connection."""
    scheme, _, rest = address.rpartition("://")
    if scheme in ("http", "https"):
        raise ClusterConnectionError(
            address,
            source,
            "this is a dashboard (jobs API) URL; connect() needs the GCS address host:port "
            "(port 6379 by default), or run the driver through `ray job submit`",
        )
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" and other forms Ray resolves itself
    host = host.strip("[]")  # an IPv6 literal in brackets
    try:
        with socket.create_connection((host, int(port)), timeout=REACHABILITY_TIMEOUT_S):
            pass
    except OSError as error:
        raise ClusterConnectionError(
            address, source, f"nothing accepts TCP connections there ({error})"
        ) from error


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Within this block, Ray processes started by this process serve on 127.0.0.1 only.

    connect() uses it for the embedded Ray; tests use it around ``ray.cluster_utils.Cluster``
    (and the connect() to it) for a multi-node cluster on loopback. Scoped, not global: a
    driver that joins a real cluster must see its node's real address to find its raylet.
    """
    from ray._private import ray_constants

    saved_env = os.environ.get(_LOOPBACK_ENV)
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_LOOPBACK_ENV] = "0"  # read by the processes ray.init spawns
    if saved_flag is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False  # read by this process
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = saved_env
        if saved_flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag


def _machine_cpus() -> int:
    """CPUs this process may use (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _current_address() -> str | None:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # a Ray Client connection has no GCS address of its own
        return None


def _is_embedded() -> bool:
    """Best effort: a Ray this process started runs a head node of its own."""
    node = getattr(ray._private.worker, "_global_node", None)
    return bool(getattr(node, "head", False))
