"""What ``python -m orchestrator serve`` is asked (:class:`ServeRequest`), and the checks made on
it before Ray starts: the port, the limits, the address, the batching settings, the deploy root."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass
class ServeRequest:
    """What ``serve`` is asked: which store's winners (sweep, models), where to place them
    (targets, deploy root, cluster address), and the HTTP listener's address and limits."""

    store: str
    sweep: str | None = None
    model: list[str] | None = None
    target: list[str] | None = None
    root: str | None = None
    address: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_mb: float = 64.0
    body_timeout_s: float = 10.0
    #: no dynamic batching for any model
    no_batching: bool = False
    #: the queueing delay of dynamic batching: "MS" for every model, "MODEL=MS" for one (repeatable)
    max_queue_delay_ms: list[str] | None = None
    #: "direct": each replica answers HTTP itself at --port (and up), an embedded Ray only; "proxy": Ray Serve's proxy
    ingress: str = "direct"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServeRequest":
        return cls(store=args.store, sweep=args.sweep, model=args.model, target=args.target, root=args.root,
                   address=args.address, host=args.host, port=args.port, max_body_mb=args.max_body_mb,
                   body_timeout_s=args.body_timeout_s, no_batching=args.no_batching,
                   max_queue_delay_ms=args.max_queue_delay_ms, ingress=args.ingress)

    def batching(self, models: list[str]) -> dict:
        """The replicas' batching settings; ValueError naming the bad --max-queue-delay-ms."""
        delays: dict[str, float] = {}
        for text in self.max_queue_delay_ms or []:
            model, _, value = text.rpartition("=")
            key = model or "*"
            if model and model not in models:
                raise ValueError(f"--max-queue-delay-ms {text!r}: {model!r} is not served; served: {', '.join(models)}")
            try:
                ms = float(value)
            except ValueError:
                ms = float("nan")
            if not 0 <= ms <= 1000:
                raise ValueError(f"--max-queue-delay-ms {text!r}: give milliseconds from 0 to 1000, as MS or MODEL=MS")
            delays[key] = ms
        return {"off": self.no_batching, "max_queue_delay_ms": delays}


def serve_problem(args: ServeRequest) -> str | None:
    """Bad serve arguments, found before Ray starts: the port, the limits, the address to listen on."""
    import socket

    if not 1 <= args.port <= 65535:
        return f"--port {args.port}: give a port from 1 to 65535"
    for flag, value in (("--max-body-mb", args.max_body_mb), ("--body-timeout-s", args.body_timeout_s)):
        if not value > 0:
            return f"{flag} must be a positive number, got {value}"
    try:
        infos = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"--host {args.host!r}: {exc.strerror or exc}"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            return f"--port {args.port}: can't listen on {args.host}:{args.port}: {exc.strerror or exc}"
    return None


def free_port(host: str) -> int:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def nothing_installed(root, models: list[str]) -> str | None:
    """On an embedded local Ray the targets' deploy root is this machine's: what is missing there."""
    from aitune import deploy_root as layout

    for model in models:
        try:
            if not layout.live(root, model):
                return f"nothing is installed for {model} in deploy root {layout.resolve_root(root)}"
        except layout.DeployRootError as exc:
            return str(exc)
    return None


def replica_error(exc: Exception) -> str:
    """The one line that says why a replica could not start, out of Ray's traceback."""
    text = str(exc)
    for marker in ("TunedModelError: ", "DeployRootError: ", "CheckpointError: "):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip().splitlines()[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"
