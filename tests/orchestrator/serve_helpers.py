"""Helpers for the deploy-root and Serve tests: a tuned store, the other candidate's checkpoint, HTTP."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import torch

from aitune import deploy_root as layout
from aitune.check import tolerance_for
from aitune.examples import mlp
from orchestrator.deploy import tensor_json
from orchestrator.store import SqliteStore
from orchestrator.sweep import run_sweep
from sweep_helpers import EAGER, EAGER_BF16, quiet, tiny_spec

#: the eager fp32 model the sweep tunes (aitune.examples.mlp is seeded: same weights everywhere)
REFERENCE = mlp(width=16, depth=2)


def tuned_store(tmp: Path, root: Path):
    """A sweep of eager fp32 and bf16 on the tiny MLP, its winner installed in ``root`` on one CPU slot."""
    spec = tiny_spec(tmp / "store", [EAGER, EAGER_BF16],
                     deploy={"targets": [{"cpu_slots": 1}], "latency_check_s": 0.05, "root": str(root)})
    outcome = run_sweep(spec, console=quiet(), write_report=False)
    assert [d.status for d in outcome.deployments] == ["deployed"], outcome.deployments
    return spec, outcome


def install_runner_up(spec, outcome, root: Path) -> Path:
    """Install the candidate that did not win as a new version (what a later deploy would do)."""
    (selection,) = outcome.selections
    other = next(r for r in outcome.results if r.key != selection.winner_key and r.status == "ok")
    with SqliteStore(spec.store) as store:
        folder, reference = store.checkpoint_path(other), store.reference_bytes(other.reference_key)
    precision = other.config.get("precision", "float32")
    version, verified = layout.install(root, folder, reference, device="cpu", model="mlp", batch_size=2,
                                       tolerance=tolerance_for(precision, {}).to_dict(), factory="aitune.examples:mlp",
                                       sweep_id=outcome.sweep_id, winner_key=other.key)
    assert verified.ok, verified.reason
    return version


def batch_folder(root: Path) -> Path:
    return layout.batch_dir(root, "mlp", layout.device_class_key("cpu"), 2)


def wait_for(predicate, timeout_s: float = 90.0):
    """``predicate()``'s first true value, looked at every 0.2 s; AssertionError after ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def wait_past_switch(answers: list[list], version_of, new) -> None:
    """Until every stream's last answer came from ``new``, and then five answers more each."""
    wait_for(lambda: all(a and version_of(a[-1]) == new for a in answers))
    counts = [len(a) for a in answers]
    wait_for(lambda: all(len(a) >= c + 5 for a, c in zip(answers, counts)))


def stop_streams(stop, threads) -> None:
    stop.set()
    for t in threads:
        t.join(timeout=60)


def switched_once(versions: list, old, new) -> bool:
    """A stream's answers came from ``old``, then from ``new`` only: one switch, never back."""
    if set(versions) != {old, new}:
        return False
    switch = versions.index(new)
    return versions[:switch] == [old] * switch and versions[switch:] == [new] * (len(versions) - switch)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body, timeout: float = 30.0) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def check_answer(root: Path, x: torch.Tensor, answer: dict) -> None:
    """The answer matches eager fp32 within the tolerance of the version that gave it."""
    install = layout.read_install(batch_folder(root) / answer["version"])
    (out,) = tensor_json.decode_outputs(answer)
    torch.testing.assert_close(out.float(), REFERENCE(x).detach(), atol=install.tolerance["atol"], rtol=install.tolerance["rtol"])


def request(x: torch.Tensor) -> dict:
    return tensor_json.request(x)


def _parent_of(pid: int | None) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])  # the command may hold spaces and parentheses
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (a CLI's Ray: its raylet and GCS, and their workers)."""
    parents = {int(p): _parent_of(int(p)) for p in filter(str.isdigit, os.listdir("/proc"))}
    found, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def listening_sockets(children_of: int | None = None, within: set[int] | None = None) -> list[tuple[str, int, str]]:
    """Every listening TCP socket on this machine as (address, port, owning process's command line),
    read from /proc (Linux): what a port scan from outside would find. ``children_of``: only those
    of that process's children (a raylet's: one Ray node's workers, not another test's or user's);
    ``within``: only those of these processes."""
    import os
    import socket as s

    owners: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    owners[int(link[8:-1])] = int(pid)
        except OSError:
            continue
    found = []
    for name, family in (("tcp", s.AF_INET), ("tcp6", s.AF_INET6)):
        try:
            rows = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_ip)
            raw = raw[::-1] if family == s.AF_INET else b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
            pid = owners.get(int(fields[9]))
            if children_of is not None and _parent_of(pid) != children_of:
                continue
            if within is not None and pid not in within:
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace") if pid else "?"
            except OSError:
                cmd = "?"
            found.append((s.inet_ntop(family, raw), int(hex_port, 16), cmd))
    return found


def is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)
