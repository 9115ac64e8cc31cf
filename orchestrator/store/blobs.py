"""The store's files: content-addressed checkpoints and outputs, and named reference files, each checked on read.

Layout under the store root::

    checkpoints/<sha[:2]>/<sha>/        one unpacked checkpoint per manifest SHA-256
    outputs/<sha>.pt                    a candidate's outputs on its check samples (for re-checks)
    references/<ref_key>.pt             reference outputs, shared by every candidate of a model

A file is only ever read back when it is still a plain file inside the store with the hash recorded for it;
a checkpoint only when its manifest has the recorded SHA-256 and the folder holds exactly the files it lists.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import shutil
import tarfile
from pathlib import Path

from aitune.canonical import sha256_file
from aitune.files import write_atomic
from orchestrator.transfer import pack_dir, unpack_to

MANIFEST = "manifest.json"


class BlobFolder:
    """The files under one store root (``SqliteStore`` keeps their paths and hashes in its records)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put_named(self, folder: str, name: str, data: bytes) -> str:
        """Write ``folder/name`` whole (readers never see half a file); returns its path in the store."""
        return _write_atomic(self.root / folder, name, data).relative_to(self.root).as_posix()

    def put_hashed(self, folder: str, data: bytes) -> str:
        """Keep ``data`` as ``folder/<sha256>.pt``; a damaged file there is replaced. Returns its path."""
        sha = hashlib.sha256(data).hexdigest()
        path = self.root / folder / f"{sha}.pt"
        if not (path.is_file() and not path.is_symlink() and sha256_file(path) == sha):
            path.unlink(missing_ok=True)
            _write_atomic(path.parent, path.name, data)
        return path.relative_to(self.root).as_posix()

    def read_checked(self, rel: str, sha: str) -> bytes | None:
        """A stored file, only if it is still a plain file inside the store with its recorded hash."""
        path = self.inside(rel)
        if path is None or path.is_symlink() or not path.is_file():
            return None
        data = path.read_bytes()
        return data if hashlib.sha256(data).hexdigest() == sha else None

    def inside(self, rel: str | None) -> Path | None:
        """``root/rel``, unless ``rel`` is empty or leads out of the store (an edited record)."""
        if not rel:
            return None
        path = self.root / rel
        try:
            path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return None
        return path

    def put_checkpoint(self, data: bytes) -> tuple[str, str]:
        """Unpack a checkpoint into its content address; a damaged folder there is replaced.

        Returns the folder's path in the store and its manifest's SHA-256.
        """
        staging = self.root / "checkpoints" / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / f"{secrets.token_hex(8)}"
        unpack_to(data, tmp)
        try:
            manifest = tmp / MANIFEST
            if not manifest.is_file():
                raise ValueError("the worker's checkpoint has no manifest.json")
            sha = sha256_file(manifest)
            target = self.root / "checkpoints" / sha[:2] / sha
            rel = target.relative_to(self.root).as_posix()
            if target.is_dir() and not target.is_symlink() and checkpoint_problem(target, sha) is None:
                return rel, sha  # same manifest, same content, and the folder is sound: keep it
            _move_into_place(tmp, target, sha, staging)
            return rel, sha
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def checkpoint_problem(self, rel: str, manifest_sha: str) -> str | None:
        path = self.inside(rel)
        if path is None:
            return f"its checkpoint path {rel!r} leaves the store"
        return checkpoint_problem(path, manifest_sha)

    def checkpoint_bytes(self, rel: str) -> bytes:
        """The folder packed (raises OSError or ValueError); call :meth:`checkpoint_problem` first."""
        return pack_dir(self.root / rel)


def _move_into_place(tmp: Path, target: Path, sha: str, staging: Path) -> None:
    """Rename the unpacked ``tmp`` to ``target``, moving a damaged folder there aside first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    trash = None
    if target.exists() or target.is_symlink():
        trash = staging / f"damaged-{secrets.token_hex(8)}"
        os.replace(target, trash)
    try:
        os.replace(tmp, target)
    except OSError:
        # Another writer put the same checkpoint there between our check and our rename:
        # same manifest, same content; keep theirs if it is sound.
        if not (target.is_dir() and checkpoint_problem(target, sha) is None):
            raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() and not trash.is_symlink() else trash.unlink()


def checkpoint_problem(path: Path, manifest_sha: str) -> str | None:
    """The manifest's hash first, then every file: only listed artifacts, no links, every hash right."""
    from aitune.checkpoint import CheckpointError, verify_checkpoint

    if path.is_symlink() or not path.is_dir():
        return f"{path} is missing"
    manifest = path / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        return f"{manifest} is missing"
    if sha256_file(manifest) != manifest_sha:
        return f"{manifest} was changed after it was stored (its SHA-256 no longer matches the store's record)"
    try:
        listed = {a.path for a in verify_checkpoint(path).artifacts}
    except CheckpointError as e:
        return str(e)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = full.relative_to(path).as_posix()
            if full.is_symlink():
                return f"{rel} in {path} is a symbolic link; checkpoints hold only their own files"
            if full.is_file() and rel != MANIFEST and rel not in listed:
                return f"{rel} in {path} is not an artifact the manifest lists"
    return None


def manifest_sha(packed: bytes) -> str:
    """The SHA-256 of a packed checkpoint's manifest (its content address), read without unpacking."""
    try:
        with tarfile.open(fileobj=io.BytesIO(packed), mode="r:") as tar:
            member = tar.extractfile(MANIFEST)
            if member is None:
                raise KeyError(MANIFEST)
            return hashlib.sha256(member.read()).hexdigest()
    except KeyError:
        raise ValueError("the worker's checkpoint has no manifest.json") from None
    except tarfile.TarError as e:
        raise ValueError(f"not a valid checkpoint archive ({e})") from None


def _write_atomic(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / name, data)
    return folder / name
