"""Checkpoints: a directory with ``manifest.json`` and the artifacts a backend's ``to_dict()`` names.

Saving writes into a temporary sibling and renames it into place, so a crash never leaves a
half-written checkpoint. Loading verifies everything (the manifest's own SHA-256 when the caller
recorded it, format, the directory's contents, paths, sizes, checksums, the code the manifest
names, device) before anything is imported or the backend is rebuilt, so a refused checkpoint
loads nothing and runs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from aitune.canonical import sha256_file
from aitune.checkpoint_trust import Allowlist, CheckpointError, backend_class, check_factories, check_listing
from aitune.environment import Environment, describe_environment
from aitune.torch.backend.backend import Backend
from aitune.torch.backend.registry import backend_ref, config_fields

#: 2: ``backend`` is a built-in name or a plug-in's import path (1 had a separate backend_module)
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
ARTIFACT_DIR = "artifacts"
_ARTIFACT_TAG = "__artifact__"

__all__ = [
    "CheckpointError", "Manifest", "ArtifactRecord", "save_checkpoint", "read_manifest", "manifest_sha256",
    "verify_checkpoint", "check_device_compatible", "load_checkpoint", "deploy_checkpoint",
]


@dataclass
class ArtifactRecord:
    path: str  # relative to the checkpoint directory, POSIX separators
    size: int
    sha256: str


@dataclass
class Manifest:
    format_version: int
    #: a built-in backend name, or ``"package.module:ClassName"`` for a plug-in
    backend: str
    portable: bool
    config: dict[str, Any]
    graph_spec: dict[str, Any] | None
    environment: dict[str, Any]
    artifacts: list[ArtifactRecord]
    state: dict[str, Any]
    key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST) -> "Manifest":
        try:
            version = d["format_version"]
        except (KeyError, TypeError):
            raise CheckpointError(f"{where}: no format_version; this is not an aitune checkpoint manifest") from None
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: unknown checkpoint format version {version!r} (this aitune reads version {FORMAT_VERSION})"
            )
        try:
            artifacts = [ArtifactRecord(**a) for a in d["artifacts"]]
            manifest = cls(**{**d, "artifacts": artifacts})
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{where}: malformed manifest: {exc}") from None
        wrong = [name for name, ok in (
            ("backend", isinstance(manifest.backend, str)),
            ("state", isinstance(manifest.state, dict)),
            ("artifacts", all(isinstance(a.path, str) and isinstance(a.size, int) and isinstance(a.sha256, str) for a in artifacts)),
        ) if not ok]  # fmt: skip
        if wrong:
            raise CheckpointError(f"{where}: malformed manifest: wrong type of {', '.join(wrong)}")
        return manifest


def _extract_artifacts(value: Any, found: dict[Path, str], prefix: str) -> Any:
    """Replace ``Path`` values with ``{"__artifact__": relative path}``, collecting the files."""
    if isinstance(value, Path):
        if not value.is_file():
            raise CheckpointError(f"artifact {value} named in the backend's state does not exist")
        if value not in found:
            rel = f"{ARTIFACT_DIR}/{value.name}"
            if rel in found.values():  # two artifacts with one name: keep both, apart
                rel = f"{ARTIFACT_DIR}/{len(found)}/{value.name}"
            found[value] = rel
        return {_ARTIFACT_TAG: found[value]}
    if isinstance(value, dict):
        return {k: _extract_artifacts(v, found, prefix) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_extract_artifacts(v, found, prefix) for v in value]
    return value


def _resolve_artifacts(value: Any, root: Path) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARTIFACT_TAG}:
            return root / value[_ARTIFACT_TAG]
        return {k: _resolve_artifacts(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_artifacts(v, root) for v in value]
    return value


def save_checkpoint(backend: Backend, path: str | Path, extra: dict[str, Any] | None = None) -> Manifest:
    """Write ``backend`` to the directory ``path`` (which must not exist yet)."""
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"checkpoint directory {path} already exists; refusing to overwrite it")
    if backend.device is None:
        raise CheckpointError(f"backend {backend.name} has no device: build or load it before saving")
    state = backend.to_dict()
    found: dict[Path, str] = {}
    state = _extract_artifacts(state, found, "")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        records = []
        # Symlinks never go into a checkpoint; the data files travel as real copies.
        for src, rel in found.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            records.append(ArtifactRecord(rel, dest.stat().st_size, sha256_file(dest)))
        klass = type(backend)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            backend=backend_ref(klass),
            portable=klass.portable,
            config=config_fields(backend),
            graph_spec=backend.graph_spec.to_dict() if backend.graph_spec else None,
            environment=describe_environment(backend.device).to_dict(),
            artifacts=records,
            state=state,
            key=backend.key(),
            extra=dict(extra or {}),
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)  # atomic: the checkpoint appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def manifest_sha256(path: str | Path) -> str:
    """SHA-256 of the checkpoint's ``manifest.json`` bytes: record it when storing, pass it when loading."""
    return hashlib.sha256(_manifest_bytes(Path(path))).hexdigest()


def _manifest_bytes(root: Path) -> bytes:
    file = root / MANIFEST
    if file.is_symlink():
        raise CheckpointError(f"{file}: a symbolic link; a checkpoint's manifest must be a real file")
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; {root} is not a checkpoint directory")
    return file.read_bytes()


def read_manifest(path: str | Path, manifest_sha256: str | None = None) -> Manifest:
    """Parse the manifest; with ``manifest_sha256``, its bytes are checked against it first."""
    root = Path(path)
    file = root / MANIFEST
    raw = _manifest_bytes(root)
    if manifest_sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != manifest_sha256:
            raise CheckpointError(
                f"{file}: changed since it was stored (its SHA-256 is {digest}, {manifest_sha256} was recorded); refusing it"
            )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON: {exc}") from None
    return Manifest.from_dict(data, str(file))


def _safe_relative(root: Path, rel: str) -> Path:
    pure = PurePosixPath(rel)
    if pure.is_absolute() or rel.startswith("\\") or (len(rel) > 1 and rel[1] == ":"):
        raise CheckpointError(f"artifact path {rel!r} is absolute; checkpoint paths must be relative")
    if ".." in pure.parts:
        raise CheckpointError(f"artifact path {rel!r} leaves the checkpoint directory")
    full = (root / pure).resolve()
    if root.resolve() not in full.parents:
        raise CheckpointError(f"artifact path {rel!r} leaves the checkpoint directory (through a link)")
    return full


def verify_checkpoint(path: str | Path, manifest_sha256: str | None = None) -> Manifest:
    """Check the manifest (against ``manifest_sha256`` when given), that the directory holds only
    it and the artifacts, and every artifact's path, size and SHA-256; return the manifest."""
    root = Path(path)
    manifest = read_manifest(root, manifest_sha256)
    files = {art.path: _safe_relative(root, art.path) for art in manifest.artifacts}
    check_listing(root, MANIFEST, list(files))
    listed = set()
    for art in manifest.artifacts:
        file = files[art.path]
        listed.add(art.path)
        if not file.is_file():
            raise CheckpointError(f"artifact {art.path} is missing from checkpoint {root}")
        size = file.stat().st_size
        if size != art.size:
            raise CheckpointError(f"artifact {art.path} has {size} bytes, the manifest says {art.size}: it was changed")
        digest = sha256_file(file)
        if digest != art.sha256:
            raise CheckpointError(f"artifact {art.path} fails its SHA-256 check (it was changed or corrupted)")
    for ref in _artifact_refs(manifest.state):
        if ref not in listed:
            raise CheckpointError(f"the backend state names {ref!r}, which the manifest does not list")
    return manifest


def _artifact_refs(value: Any) -> list[str]:
    if isinstance(value, dict):
        if set(value) == {_ARTIFACT_TAG}:
            if not isinstance(value[_ARTIFACT_TAG], str):
                raise CheckpointError(f"the backend state names artifact {value[_ARTIFACT_TAG]!r}, which is not a path")
            return [value[_ARTIFACT_TAG]]
        return [r for v in value.values() for r in _artifact_refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _artifact_refs(v)]
    return []


def check_device_compatible(manifest: Manifest, device: torch.device | str) -> None:
    """Refuse a device-bound checkpoint on a device type or CUDA compute capability it was not built for."""
    if manifest.portable:
        return
    built = Environment.from_dict(manifest.environment)
    target = describe_environment(device) if torch.device(device).type != "cuda" or torch.cuda.is_available() else None
    target_type = torch.device(device).type
    if built.device_type != target_type:
        raise CheckpointError(
            f"{manifest.backend} checkpoint was built for device type {built.device_type!r} and can't run on "
            f"{target_type!r}: build it again on the target"
        )
    if target is not None and built.compute_capability != target.compute_capability:
        raise CheckpointError(
            f"{manifest.backend} checkpoint was built for compute capability {built.compute_capability} "
            f"({built.device_name}); the target {target.device_name} has {target.compute_capability}"
        )
    # Compiled artifacts call into the runtime that built them (AOTInductor into torch's, an
    # engine into TensorRT's): another version may crash rather than fail cleanly.
    for lib in ("torch", "tensorrt"):
        was, now = getattr(built, lib), getattr(target, lib) if target is not None else None
        if was and now and was != now:
            raise CheckpointError(f"{manifest.backend} checkpoint was built with {lib} {was}; this machine has {lib} {now}")


def load_checkpoint(
    path: str | Path,
    device: torch.device | str | None = None,
    *,
    allow_factories: Allowlist = None,
    allow_backends: Allowlist = None,
    manifest_sha256: str | None = None,
) -> Backend:
    """Verify and load a checkpoint; the backend ends in ``CHECKPOINT_LOADED``.

    The manifest names code, and anyone who can write the checkpoint can edit it, so nothing it
    names is imported unless allowed: a model factory only if it is in ``allow_factories``, a
    plug-in backend (``"package.module:Class"``) only if it is in ``allow_backends`` (built-in
    backends always); ``True`` trusts whatever the manifest names. With ``manifest_sha256`` (from
    :func:`manifest_sha256` when it was stored) an edited manifest is refused before it is read.
    With ``device``, device-bound artifacts are checked against it before anything is loaded.
    """
    root = Path(path)
    manifest, cls = _open(root, allow_factories, allow_backends, manifest_sha256)
    return _rebuild(root, manifest, cls, device)


def _open(
    root: Path, allow_factories: Allowlist, allow_backends: Allowlist, manifest_sha256: str | None
) -> tuple[Manifest, type[Backend]]:
    """The files, their hashes and the code the manifest names are checked; then the backend class is imported."""
    manifest = verify_checkpoint(root, manifest_sha256)
    where = str(root / MANIFEST)
    check_factories(manifest.state, allow_factories, where)
    return manifest, backend_class(manifest.backend, allow_backends, where)


def _rebuild(root: Path, manifest: Manifest, cls: type[Backend], device: torch.device | str | None) -> Backend:
    where = str(root / MANIFEST)
    if device is not None:
        check_device_compatible(manifest, device)
    state = _resolve_artifacts(manifest.state, root.resolve())
    try:
        backend = cls.from_dict(state)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {cls.__name__} refused the backend state: {type(exc).__name__}: {exc}") from exc
    # deploy(device) later checks the device it is given, not only the one named here
    backend.set_deploy_check(lambda target: check_device_compatible(manifest, target))
    return backend


def deploy_checkpoint(
    path: str | Path,
    device: torch.device | str | None = None,
    *,
    allow_factories: Allowlist = None,
    allow_backends: Allowlist = None,
    manifest_sha256: str | None = None,
) -> Backend:
    """Load, check against ``device`` and deploy: the one call a serving process needs.

    The allowlists and ``manifest_sha256`` are those of :func:`load_checkpoint`. Without
    ``device`` the backend deploys on the device it was saved with, and that device is the one a
    device-bound checkpoint is checked against.
    """
    root = Path(path)
    manifest, cls = _open(root, allow_factories, allow_backends, manifest_sha256)
    if device is None:
        device = manifest.state.get("device")
    backend = _rebuild(root, manifest, cls, device)
    backend.deploy(device)
    return backend
