"""The deploy root: where a serving machine keeps the tuned checkpoints it runs.

Layout (every name below a model is written by this module only)::

    ROOT/MODEL/DEVICE_CLASS/device_class.json       the device class (name, versions) and its full key
    ROOT/MODEL/DEVICE_CLASS/bN/current              the version being served (a one-line file)
    ROOT/MODEL/DEVICE_CLASS/bN/vNNNN-SHA12/         one folder per installed version:
        install.json                                what was installed, from which sweep and winner
        reference.pt                                sample and eager fp32 outputs to verify against
        checkpoint/                                 the aitune checkpoint (manifest.json + artifacts/)

``DEVICE_CLASS`` is the first 16 hex digits of the SHA-256 of
:meth:`aitune.environment.Environment.device_class`. A version is installed whole (staged, then
renamed), verified where it lies, and only then does ``current`` switch to it (``os.replace``,
atomic). Earlier versions stay; :func:`rollback` switches back to the one before, verified. A
version that fails verification is removed and ``current`` stays as it was.

The deploy root is trusted like the store: ``install.json`` names the model factory that loading
imports. The checkpoint itself is checked against the manifest SHA-256 recorded at install and
every artifact's checksum, so an edited file is refused at load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from aitune.canonical import sha256_of
from aitune.checkpoint import CheckpointError, load_checkpoint, manifest_sha256, verify_checkpoint
from aitune.environment import describe_environment

INSTALL, REFERENCE, CHECKPOINT, CURRENT, DEVICE_CLASS = "install.json", "reference.pt", "checkpoint", "current", "device_class.json"
_VERSION = re.compile(r"v(\d{4,})-[0-9a-f]{12}\Z")
_BATCH = re.compile(r"b(\d+)\Z")


class DeployRootError(RuntimeError):
    """The deploy root can't be used (unwritable, damaged, nothing installed); one clear line."""


def default_root() -> Path:
    """``$XDG_CACHE_HOME/aitune/deploy``, else ``~/.cache/aitune/deploy``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "aitune" / "deploy"


def resolve_root(root: str | os.PathLike | None) -> Path:
    return Path(root).expanduser() if root else default_root()


def device_class_key(device: torch.device | str) -> str:
    return sha256_of(describe_environment(torch.device(device)).device_class())


def class_dir_name(class_key: str) -> str:
    return class_key[:16]


@dataclass
class Install:
    """What one version folder holds and where it came from (``install.json``)."""

    model: str
    batch_size: int
    device_class_key: str
    version: str
    manifest_sha256: str
    #: import path of the model factory the checkpoint names; loading imports only this one
    factory: str | None
    #: built-in backend name or a plug-in's import path
    backend: str
    #: shapes of the tensor inputs, positional then keyword (sorted by name): how calls are routed
    input_shapes: list[list[int]]
    tolerance: dict[str, float]
    reference_sha256: str
    installed_at: float
    sweep_id: str | None = None
    winner_key: str | None = None
    candidate: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Install":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Verified:
    """The outcome of checking one installed version on this device."""

    ok: bool
    max_abs_err: float | None = None
    median_ms: float | None = None
    reason: str | None = None


def input_shapes(args: tuple, kwargs: dict) -> list[list[int]]:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    tensors += [kwargs[k] for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor)]
    return [list(t.shape) for t in tensors]


def pack_reference(sample, outputs) -> bytes:
    """``reference.pt``: a sample and its eager fp32 outputs (flattened), loadable with ``weights_only=True``.

    The same format the orchestrator's workers send to the store.
    """
    from aitune.torch.tree import flatten_tensors

    flat = flatten_tensors(outputs)
    buf = io.BytesIO()
    torch.save({"args": [a.cpu() if isinstance(a, torch.Tensor) else a for a in sample.args],
                "kwargs": {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in sample.kwargs.items()},
                "paths": [p for p, _ in flat], "outputs": [t.cpu() for _, t in flat]}, buf)
    return buf.getvalue()


def install(root, checkpoint_dir: Path, reference: bytes, *, device: torch.device | str, model: str, batch_size: int,
            tolerance: dict[str, float], factory: str | None, latency_s: float = 0.05, **origin: Any) -> tuple[Path, Verified]:
    """Stage, verify on ``device`` and (when it passed) make current: the whole install, in one process."""
    env = describe_environment(torch.device(device))
    version_dir, new = stage(root, checkpoint_dir, reference, model=model, batch_size=batch_size,
                             class_key=sha256_of(env.device_class()), device_class=env.device_class(),
                             tolerance=tolerance, factory=factory, **origin)
    verified = verify_version(version_dir, device, latency_s)
    activate(version_dir, verified, new)
    return version_dir, verified


def batch_dir(root: Path, model: str, class_key: str, batch_size: int) -> Path:
    return root / model / class_dir_name(class_key) / f"b{int(batch_size)}"


def check_writable(root: str | os.PathLike | None) -> Path:
    """Create ``root`` if needed and prove a file can be written there; DeployRootError if not."""
    path = resolve_root(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise DeployRootError(f"deploy root {path} can't be written: {exc.strerror or exc}") from None
    return path


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One installer at a time per (model, device class, batch): targets on one node share the root."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def versions(folder: Path) -> list[str]:
    """Installed versions, oldest first."""
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name)]
    return sorted(found, key=lambda n: int(_VERSION.match(n).group(1)))


def current_version(folder: Path) -> str | None:
    try:
        name = (folder / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    if not _VERSION.match(name) or not (folder / name).is_dir():
        raise DeployRootError(f"{folder / CURRENT}: points at {name!r}, which is not an installed version")
    return name


def _switch(folder: Path, version: str) -> None:
    tmp = folder / f".{CURRENT}.{os.getpid()}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, folder / CURRENT)  # atomic: readers see the old version or the new one


def read_install(version_dir: Path) -> Install:
    try:
        return Install.from_dict(json.loads((version_dir / INSTALL).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise DeployRootError(f"{version_dir / INSTALL}: unreadable install record: {exc}") from None


def stage(
    root: str | os.PathLike | None,
    checkpoint_dir: Path,
    reference: bytes,
    *,
    model: str,
    batch_size: int,
    class_key: str,
    device_class: dict[str, Any],
    tolerance: dict[str, float],
    factory: str | None,
    sweep_id: str | None = None,
    winner_key: str | None = None,
    candidate: str | None = None,
) -> tuple[Path, bool]:
    """Put a checkpoint in a version folder of its own (not current yet); returns (folder, is_new).

    The same checkpoint (same manifest SHA-256) installed before is not copied again: its folder
    is returned, to be verified and switched to like a new one.
    """
    root = check_writable(root)
    folder = batch_dir(root, model, class_key, batch_size)
    sha = manifest_sha256(checkpoint_dir)
    manifest = verify_checkpoint(checkpoint_dir, sha)
    with _locked(folder):
        class_file = folder.parent / DEVICE_CLASS
        if not class_file.exists():
            class_file.write_text(json.dumps({"key": class_key, "device_class": device_class}, indent=2, sort_keys=True) + "\n")
        for name in reversed(versions(folder)):
            if name.endswith(sha[:12]) and read_install(folder / name).manifest_sha256 == sha:
                return folder / name, False
        existing = versions(folder)
        number = int(_VERSION.match(existing[-1]).group(1)) + 1 if existing else 1
        version = f"v{number:04d}-{sha[:12]}"
        sample = torch.load(io.BytesIO(reference), map_location="cpu", weights_only=True)
        install = Install(
            model=model, batch_size=int(batch_size), device_class_key=class_key, version=version, manifest_sha256=sha,
            factory=factory, backend=manifest.backend, input_shapes=input_shapes(tuple(sample["args"]), dict(sample["kwargs"])),
            tolerance=dict(tolerance), reference_sha256=hashlib.sha256(reference).hexdigest(), installed_at=time.time(),
            sweep_id=sweep_id, winner_key=winner_key, candidate=candidate,
        )
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".staging", dir=folder))
        try:
            shutil.copytree(checkpoint_dir, tmp / CHECKPOINT, symlinks=True)
            (tmp / REFERENCE).write_bytes(reference)
            (tmp / INSTALL).write_text(json.dumps(install.to_dict(), indent=2, sort_keys=True) + "\n")
            os.replace(tmp, folder / version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder / version, True


def load_version(version_dir: Path, device: torch.device | str, allow_factories=None, allow_backends=None):
    """Verify (manifest SHA-256 recorded at install, every checksum) and deploy one installed version.

    By default only the factory and plug-in backend named in ``install.json`` may be imported.
    """
    install = read_install(version_dir)
    factories = [install.factory] if install.factory else []
    backends = [install.backend] if ":" in install.backend else []
    backend = load_checkpoint(
        version_dir / CHECKPOINT, device, manifest_sha256=install.manifest_sha256,
        allow_factories=factories if allow_factories is None else allow_factories,
        allow_backends=backends if allow_backends is None else allow_backends,
    )
    backend.deploy(device)
    return install, backend


def verify_version(version_dir: Path, device: torch.device | str, latency_s: float = 0.1, threads: int = 1) -> Verified:
    """Load the installed version here and check it against its stored eager fp32 reference."""
    from aitune.check import Tolerance, compare_outputs
    from aitune.measure import MeasureConfig, measure
    from aitune.specs import Sample
    from aitune.torch.tree import flatten_tensors

    try:
        install, backend = load_version(version_dir, device)
        data = (version_dir / REFERENCE).read_bytes()
        if hashlib.sha256(data).hexdigest() != install.reference_sha256:
            return Verified(False, reason=f"{version_dir / REFERENCE}: changed since it was installed")
        ref = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        sample = Sample(tuple(ref["args"]), dict(ref["kwargs"])).to(device)
        with torch.inference_mode():
            got = [t for _, t in flatten_tensors(sample(backend.infer))]
        check = compare_outputs(list(ref["outputs"]), got, Tolerance.from_dict(install.tolerance))
        if not check.ok:
            return Verified(False, check.max_abs_err, reason=f"outputs differ from the reference: {check.reason}")
        m = measure(backend.infer, sample, device, MeasureConfig(budget_s=latency_s, min_iters=5, threads=threads))
        return Verified(True, check.max_abs_err, m.median_ms)
    except (CheckpointError, DeployRootError) as exc:
        return Verified(False, reason=f"checkpoint refused: {exc}")
    except Exception as exc:  # a version that can't run here is refused, whatever the reason
        return Verified(False, reason=f"{type(exc).__name__}: {exc}")


def activate(version_dir: Path, verified: Verified, was_new: bool) -> None:
    """After verification: switch ``current`` to a verified version, or drop a new one that failed."""
    folder = version_dir.parent
    with _locked(folder):
        if verified.ok:
            _switch(folder, version_dir.name)
        elif was_new and current_version(folder) != version_dir.name:
            shutil.rmtree(version_dir, ignore_errors=True)


def rollback(root: str | os.PathLike | None, model: str, class_key: str, batch_size: int,
             device: torch.device | str, latency_s: float = 0.1, threads: int = 1) -> tuple[str | None, str | None, Verified]:
    """Switch ``current`` back to the version installed before it, verified first.

    Returns (from version, to version, verification); ``current`` is unchanged unless it passed.
    """
    folder = batch_dir(resolve_root(root), model, class_key, batch_size)
    with _locked(folder):
        now = current_version(folder)
        older = [v for v in versions(folder) if now is None or int(_VERSION.match(v).group(1)) < int(_VERSION.match(now).group(1))]
        if not older:
            return now, None, Verified(False, reason=f"no version before {now or 'the current one'} in {folder}")
        target = older[-1]
        verified = verify_version(folder / target, device, latency_s, threads)
        if verified.ok:
            _switch(folder, target)
        return now, target, verified


@dataclass
class Live:
    model: str
    batch_size: int
    class_key: str
    device_name: str | None
    version: str
    folder: Path


def live(root: str | os.PathLike | None, model: str | None = None) -> list[Live]:
    """What is current under ``root``: one entry per (model, device class, batch size)."""
    root = resolve_root(root)
    out = []
    models = [root / model] if model else sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for mdir in models:
        for cdir in sorted(p for p in mdir.iterdir() if p.is_dir()) if mdir.is_dir() else []:
            name, key = _class_info(cdir)
            for bdir in sorted(p for p in cdir.iterdir() if p.is_dir() and _BATCH.match(p.name)):
                version = current_version(bdir)
                if version:
                    out.append(Live(mdir.name, int(_BATCH.match(bdir.name).group(1)), key, name, version, bdir / version))
    return out


def _class_info(class_dir: Path) -> tuple[str | None, str]:
    try:
        data = json.loads((class_dir / DEVICE_CLASS).read_text())
        return data["device_class"].get("device_name"), data["key"]
    except (OSError, ValueError, KeyError, AttributeError):
        return None, class_dir.name


def device_classes(root: str | os.PathLike | None, model: str) -> dict[str, str | None]:
    """The device classes ``model`` has a current version for: key prefix -> device name."""
    return {entry.class_key[:16]: entry.device_name for entry in live(root, model)}
